//! vmrestore: restore libvirt/KVM virtual machines from vmbackup + virtnbdbackup trees.
#![deny(unsafe_code)]
pub mod app;
pub mod catalogue;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod domxml;
pub mod error;
pub mod format;
pub mod hypervisor;
pub mod lock;
pub mod log;
pub mod mode;
pub mod nvram;
pub mod ownership;
pub mod preflight;
pub mod progress;
pub mod request;
pub mod restore;
pub mod signal;
pub mod tpm;
pub mod tree;
