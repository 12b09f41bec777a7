//! The host and the backup tree as vmrestore finds them: configuration, the backup
//! tree layout, vmbackup's catalogue and locks, TPM state, NVRAM files, ownership.

pub mod catalogue;
pub mod config;
pub mod env;
pub mod files;
pub mod lock;
pub mod names;
pub mod nvram;
pub mod ownership;
pub mod paths;
pub mod shadow;
pub mod state;
pub mod tpm;
pub mod tree;
