//! Domain XML: read through `nbdfmt::DomainConfig`, rewritten byte-range by
//! byte-range for DR, clone and instant boot ([`rewrite`]).

pub mod rewrite;
