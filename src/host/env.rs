//! The process environment vmrestore depends on.

use std::path::PathBuf;

use crate::host::config::ConfigEnv;

/// The process environment vmrestore depends on, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `VMRESTORE_CONFIG_ROOT` and `VMBACKUP_INSTANCE`.
    pub config: ConfigEnv,
    /// `LOG_DIR`, when set and non-empty.
    pub log_dir: Option<PathBuf>,
    /// `LIBVIRT_DEFAULT_URI`, when set and non-empty.
    pub default_uri: Option<String>,
}

impl Env {
    /// Reads the environment of this process.
    pub fn from_process() -> Self {
        let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            config: ConfigEnv::from_env(),
            log_dir: non_empty("LOG_DIR").map(PathBuf::from),
            default_uri: non_empty("LIBVIRT_DEFAULT_URI").map(|v| v.to_string_lossy().into_owned()),
        }
    }
}
