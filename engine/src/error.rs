//! `engine::Error`: a stable kind for control flow, detail in the message and source.

use std::path::{Path, PathBuf};

/// What kind of failure, for the caller's exit-code decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A backup file is damaged, truncated, or fails its checksum.
    CorruptBackup,
    /// The chain is incomplete or its links are broken.
    BrokenChain,
    /// The target ran out of space.
    NoSpace,
    /// Writing, reading back or syncing the target failed.
    TargetIo,
    /// The restore asks for something this engine refuses to do silently wrong.
    Unsupported,
    /// The restored content read back differs from the plan.
    VerifyFailed,
    /// Cancelled (by a signal); carries the signal number.
    Cancelled(i32),
}

/// An engine failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A backup file could not be read or is damaged (file and offset inside).
    #[error(transparent)]
    Backup(#[from] nbdfmt::Error),
    /// The chain for a disk cannot be built.
    #[error("{disk}: {message}")]
    Chain {
        /// Disk target.
        disk: String,
        /// Why.
        message: String,
    },
    /// I/O on a target file or device.
    #[error("{op} {path}: {source}")]
    Target {
        /// What was being done.
        op: &'static str,
        /// The target path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An option the target cannot honour.
    #[error("{0}")]
    Unsupported(String),
    /// Read-back verification found different content.
    #[error("verification of {path} failed: {message}")]
    Verify {
        /// The target.
        path: PathBuf,
        /// Where and how it differs.
        message: String,
    },
    /// The restore was cancelled.
    #[error("cancelled by signal {0}")]
    Cancelled(i32),
}

impl Error {
    /// Wraps an I/O error on a target.
    pub fn target(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Target {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Backup(e)
                if matches!(
                    e.kind(),
                    nbdfmt::ErrorKind::BrokenLink { .. }
                        | nbdfmt::ErrorKind::NoBase
                        | nbdfmt::ErrorKind::TwoBases { .. }
                ) =>
            {
                ErrorKind::BrokenChain
            }
            Self::Backup(_) => ErrorKind::CorruptBackup,
            Self::Chain { .. } => ErrorKind::BrokenChain,
            Self::Target { source, .. } if source.raw_os_error() == Some(28) => ErrorKind::NoSpace,
            Self::Target { .. } => ErrorKind::TargetIo,
            Self::Unsupported(_) => ErrorKind::Unsupported,
            Self::Verify { .. } => ErrorKind::VerifyFailed,
            Self::Cancelled(s) => ErrorKind::Cancelled(*s),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
