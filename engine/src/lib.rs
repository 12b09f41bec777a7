//! `engine`: turns a virtnbdbackup chain into bytes on a target — plan first (one
//! extent map per disk, newest data wins), then write every live block once.
#![warn(missing_docs)]

pub mod error;
pub mod target;

pub use error::{Error, ErrorKind, Result};
pub use target::BlockTarget;
