//! `engine::Error`: a stable kind for control flow, detail in the message and source.

use std::path::{Path, PathBuf};

/// What kind of failure, for the caller's exit-code decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A backup file is damaged, truncated, or fails its checksum.
    CorruptBackup,
    /// The chain is incomplete or its links are broken.
    BrokenChain,
    /// The target ran out of space (ENOSPC), or its owner out of quota (EDQUOT).
    NoSpace,
    /// Writing, reading back or syncing the target failed.
    TargetIo,
    /// The engine's temporary working space (`$TMPDIR`: salvage frame logs, the
    /// extent tables of served disks) is missing or unwritable.
    Scratch,
    /// The restore asks for something this engine refuses to do silently wrong.
    Unsupported,
    /// The restored content read back differs from the plan.
    VerifyFailed,
    /// Cancelled by a signal; carries the signal number (positive).
    Cancelled(i32),
    /// Stopped without a signal: the caller cancelled without naming one
    /// ([`Cancel::abort`](crate::cancel::Cancel::abort)), or a worker stopped because
    /// another part of the same run failed (that failure is the one reported then).
    Aborted,
    /// A condition that should not happen: an engine bug, or a worker thread or runtime
    /// that could not start or panicked. Nothing about the backup or the target.
    Internal,
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
    /// I/O on the engine's own temporary files in `dir`.
    #[error("{op} {dir}: {source} (TMPDIR chooses the directory)")]
    Scratch {
        /// What was being done.
        op: &'static str,
        /// The directory of the temporary files.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An option or request the engine or the target cannot honour.
    #[error("{0}")]
    Unsupported(String),
    /// See [`ErrorKind::Internal`].
    #[error("{0}")]
    Internal(String),
    /// Read-back verification found different content.
    #[error("verification of {path} failed: {message}")]
    Verify {
        /// The target.
        path: PathBuf,
        /// Where and how it differs.
        message: String,
    },
    /// The restore was cancelled by a signal.
    #[error("cancelled by signal {0}")]
    Cancelled(i32),
    /// See [`ErrorKind::Aborted`].
    #[error("aborted")]
    Aborted,
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

    /// Wraps an I/O error on a temporary file in `dir`.
    pub fn scratch(op: &'static str, dir: &Path, source: std::io::Error) -> Self {
        Self::Scratch {
            op,
            dir: dir.to_path_buf(),
            source,
        }
    }

    /// An [`Error::Internal`] with this message.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }

    /// The error for a cancel that stored `signal`: [`Error::Cancelled`] for a signal,
    /// [`Error::Aborted`] for a cancel without one (stored as a value `<= 0`).
    pub(crate) fn cancelled(signal: i32) -> Self {
        if signal > 0 {
            Self::Cancelled(signal)
        } else {
            Self::Aborted
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
            Self::Target { source, .. } if is_no_space(source) => ErrorKind::NoSpace,
            Self::Target { .. } => ErrorKind::TargetIo,
            Self::Scratch { source, .. } if is_no_space(source) => ErrorKind::NoSpace,
            Self::Scratch { .. } => ErrorKind::Scratch,
            Self::Unsupported(_) => ErrorKind::Unsupported,
            Self::Internal(_) => ErrorKind::Internal,
            Self::Verify { .. } => ErrorKind::VerifyFailed,
            Self::Cancelled(s) => ErrorKind::Cancelled(*s),
            Self::Aborted => ErrorKind::Aborted,
        }
    }
}

/// ENOSPC (`StorageFull`) and EDQUOT (`QuotaExceeded`): either way the target has no
/// room for the restore, and the remedy (free space or quota) is the caller's.
fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn target_error(errno: i32) -> Error {
        Error::target(
            "writing",
            Path::new("/t"),
            std::io::Error::from_raw_os_error(errno),
        )
    }

    #[test]
    fn kinds_of_os_errors_and_cancels() {
        assert_eq!(target_error(libc::ENOSPC).kind(), ErrorKind::NoSpace);
        assert_eq!(target_error(libc::EDQUOT).kind(), ErrorKind::NoSpace);
        assert_eq!(target_error(libc::EIO).kind(), ErrorKind::TargetIo);
        assert_eq!(Error::cancelled(15).kind(), ErrorKind::Cancelled(15));
        assert_eq!(Error::cancelled(-1).kind(), ErrorKind::Aborted);
        assert_eq!(Error::internal("x").kind(), ErrorKind::Internal);
        let scratch = |errno| {
            Error::scratch(
                "creating",
                Path::new("/tmp"),
                std::io::Error::from_raw_os_error(errno),
            )
        };
        assert_eq!(scratch(libc::ENOENT).kind(), ErrorKind::Scratch);
        assert_eq!(scratch(libc::EROFS).kind(), ErrorKind::Scratch);
        assert_eq!(scratch(libc::ENOSPC).kind(), ErrorKind::NoSpace);
    }
}
