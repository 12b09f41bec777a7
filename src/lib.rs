//! vmrestore: restore libvirt/KVM virtual machines from vmbackup + virtnbdbackup trees.
//!
//! Layout (docs/architecture.md): `cli` (what was typed → a validated request),
//! `cmd` (one module per command), `restore` (planners, the plan, the executor),
//! `host` (config, backup tree, catalogue, locks, TPM, NVRAM), `hypervisor` (the
//! libvirt boundary), `domain` (domain XML), `ui` (log lines, progress, formats).
#![deny(unsafe_code)]
pub mod app;
pub mod cli;
pub mod cmd;
pub mod domain;
pub mod error;
pub mod host;
pub mod hypervisor;
pub mod restore;
pub mod signal;
pub mod ui;
