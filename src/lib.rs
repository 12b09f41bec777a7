//! vmrestore: restore libvirt/KVM virtual machines from vmbackup + virtnbdbackup trees.
#![deny(unsafe_code)]
pub mod restore;
pub mod domxml;
pub mod hypervisor;
pub mod lock;
pub mod signal;
pub mod nvram;
pub mod ownership;
pub mod tpm;
pub mod preflight;
pub mod mode;
pub mod error;
pub mod app;
pub mod catalogue;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod format;
pub mod log;
pub mod request;
pub mod tree;
pub mod progress;
