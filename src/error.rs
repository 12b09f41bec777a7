//! `AppError` and `ExitStatus`: the only place where exit codes exist (spec §8).
//!
//! Every failure of the binary is an `AppError`; `AppError::exit_status` is the one
//! mapping from failure category to process status. Nothing else picks a number.

use std::path::PathBuf;
use std::process::ExitCode;

/// The process status, by category (spec §8, STYLE §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: success (also `--help`, `--version`, listings, dry-runs).
    Ok,
    /// 1: unclassified failure or internal bug.
    General,
    /// 2: configuration (config instance missing, backup root unresolvable).
    Config,
    /// 3: per-VM lock held by a live backup or restore.
    Lock,
    /// 4: storage (backup root missing, free space, collisions, `.pre-restore`).
    Storage,
    /// 5: VM or backup content (VM dir/period/data missing, incomplete chain, ...).
    Vm,
    /// 6: the restore engine (or verify/dump) failed on the backup data.
    Engine,
    /// 7: command-line usage.
    Usage,
    /// 8: a runtime dependency is missing.
    Dependency,
    /// 128 + n: cancelled by signal n (130 SIGINT, 143 SIGTERM).
    Signal(i32),
}

impl ExitStatus {
    /// The numeric process status.
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::General => 1,
            Self::Config => 2,
            Self::Lock => 3,
            Self::Storage => 4,
            Self::Vm => 5,
            Self::Engine => 6,
            Self::Usage => 7,
            Self::Dependency => 8,
            // signal numbers are small; anything odd becomes a general failure
            Self::Signal(n) => u8::try_from(128 + i64::from(n))
                .ok()
                .filter(|c| *c > 128)
                .unwrap_or(1),
        }
    }

    /// The category's name in `--json` documents (`"ok"` for success).
    pub fn category(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::General => "general",
            Self::Config => "config",
            Self::Lock => "lock",
            Self::Storage => "storage",
            Self::Vm => "vm",
            Self::Engine => "engine",
            Self::Usage => "usage",
            Self::Dependency => "dependency",
            Self::Signal(_) => "signal",
        }
    }

    /// The status of a process exit code (the inverse of [`ExitStatus::code`]).
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Ok,
            2 => Self::Config,
            3 => Self::Lock,
            4 => Self::Storage,
            5 => Self::Vm,
            6 => Self::Engine,
            7 => Self::Usage,
            8 => Self::Dependency,
            c if c > 128 => Self::Signal(i32::from(c) - 128),
            _ => Self::General,
        }
    }

    /// Every fixed row of the table (for parity tests and documentation).
    pub const TABLE: [ExitStatus; 11] = [
        Self::Ok,
        Self::General,
        Self::Config,
        Self::Lock,
        Self::Storage,
        Self::Vm,
        Self::Engine,
        Self::Usage,
        Self::Dependency,
        Self::Signal(2),
        Self::Signal(15),
    ];
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> Self {
        ExitCode::from(s.code())
    }
}

/// A boxed error used as the `source` of an [`AppError`].
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can make vmrestore fail. The variant is the category; the text
/// is what the user reads (spec §1.2, §3.6, §7.1 wordings).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Command-line usage error (unknown option, missing value, bad combination).
    #[error("{0}")]
    Usage(String),
    /// Backup root cannot be resolved from the configuration.
    #[error("{0}")]
    Config(String),
    /// A `vmbackup.conf` line vmrestore refuses to interpret.
    #[error("{}:{line}: {reason}", path.display())]
    ConfigLine {
        /// The config file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The backup root does not exist (or is not a directory).
    #[error("Backup path not found: {}", .0.display())]
    BackupRootMissing(PathBuf),
    /// Another storage problem (free space, collisions, `.pre-restore`, ...).
    #[error("{0}")]
    Storage(String),
    /// VM or backup content problem in a logged mode (also logged as an ERROR line).
    #[error("{0}")]
    Vm(String),
    /// VM or period not found in a listing mode: printed as a plain stderr line.
    #[error("{0}")]
    ListingNotFound(String),
    /// The per-VM lock is held.
    #[error("{0}")]
    Lock(String),
    /// The restore engine, verify or dump failed on the backup data.
    #[error("{message}")]
    Engine {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Source>,
    },
    /// A runtime dependency is missing.
    #[error("{0}")]
    Dependency(String),
    /// Cancelled by a signal.
    #[error("Interrupted by signal {0}")]
    Interrupted(i32),
    /// An unexpected I/O failure.
    #[error("{context}")]
    Io {
        /// What we were doing ("reading /x").
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An internal failure that has no better category.
    #[error("{0}")]
    Internal(String),
    /// A failure reported again later, as text, in the category it had (a VM that
    /// `--all` refused while planning keeps its error's exit status).
    #[error("{message}")]
    Reported {
        /// The original error's text.
        message: String,
        /// The original error's category.
        status: ExitStatus,
    },
}

impl AppError {
    /// The exit status of this failure: the one mapping in the program.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Usage(_) => ExitStatus::Usage,
            Self::Config(_) | Self::ConfigLine { .. } => ExitStatus::Config,
            Self::BackupRootMissing(_) | Self::Storage(_) => ExitStatus::Storage,
            Self::Vm(_) | Self::ListingNotFound(_) => ExitStatus::Vm,
            Self::Lock(_) => ExitStatus::Lock,
            Self::Engine { .. } => ExitStatus::Engine,
            Self::Dependency(_) => ExitStatus::Dependency,
            Self::Interrupted(sig) => ExitStatus::Signal(*sig),
            Self::Io { .. } | Self::Internal(_) => ExitStatus::General,
            Self::Reported { status, .. } => *status,
        }
    }

    /// The log component the error is reported under (spec §7.3 names).
    pub fn component(&self) -> &'static str {
        match self {
            Self::Usage(_) => "parse_args",
            Self::Config(_) | Self::ConfigLine { .. } => "resolve_backup_path",
            _ => "main",
        }
    }

    /// True when the error is printed as a bare line (listing modes, spec §3).
    pub fn is_plain(&self) -> bool {
        matches!(self, Self::ListingNotFound(_))
    }

    /// An I/O error with what we were doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// An engine-category failure without a source.
    pub fn engine(message: impl Into<String>) -> Self {
        Self::Engine {
            message: message.into(),
            source: None,
        }
    }
}

impl AppError {
    /// The same failure with `what` said first (`<what> — <message>`), for the
    /// categories whose text is free (engine, storage).
    pub fn prefixed(self, what: &str) -> Self {
        match self {
            Self::Engine { message, source } => Self::Engine {
                message: format!("{what} — {message}"),
                source,
            },
            Self::Storage(m) => Self::Storage(format!("{what} — {m}")),
            other => other,
        }
    }
}

/// An engine failure by category (spec STYLE §2: apply failures exit 6, a signal
/// 128+n, a full target 4, a failed post-restore integrity check — the read-back
/// differs — 4 with the spec §3.6 wording), its text prefixed with `what`.
pub fn engine_error(e: engine::Error, what: &str) -> AppError {
    let message = |e: &engine::Error| {
        if what.is_empty() {
            e.to_string()
        } else {
            format!("{what}: {e}")
        }
    };
    match e.kind() {
        engine::ErrorKind::Cancelled(sig) => AppError::Interrupted(sig),
        // a broken invariant of the engine is a bug, not damaged backup data
        engine::ErrorKind::Internal => AppError::Internal(message(&e)),
        engine::ErrorKind::NoSpace | engine::ErrorKind::Scratch => AppError::Storage(message(&e)),
        engine::ErrorKind::VerifyFailed => AppError::Storage(format!(
            "Restore produced corrupt disk images — {}",
            message(&e)
        )),
        _ => AppError::Engine {
            message: message(&e),
            source: Some(Box::new(e)),
        },
    }
}

impl From<engine::Error> for AppError {
    fn from(e: engine::Error) -> Self {
        engine_error(e, "")
    }
}

impl From<nbdfmt::Error> for AppError {
    /// Backup data that cannot be read is the engine category (exit 6); the message
    /// names the file and byte offset.
    fn from(e: nbdfmt::Error) -> Self {
        AppError::Engine {
            message: e.to_string(),
            source: Some(Box::new(e)),
        }
    }
}

impl From<crate::hypervisor::HvError> for AppError {
    /// A libvirt call that failed where libvirt is required (exit 8).
    fn from(e: crate::hypervisor::HvError) -> Self {
        AppError::Dependency(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_spec_table() {
        let codes: Vec<u8> = ExitStatus::TABLE.iter().map(|s| s.code()).collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 130, 143]);
        assert_eq!(ExitStatus::Signal(-1).code(), 1);
        let names: Vec<&str> = ExitStatus::TABLE.iter().map(|s| s.category()).collect();
        assert_eq!(
            names,
            [
                "ok",
                "general",
                "config",
                "lock",
                "storage",
                "vm",
                "engine",
                "usage",
                "dependency",
                "signal",
                "signal"
            ]
        );
    }

    #[test]
    fn each_category_maps_once() {
        assert_eq!(AppError::Usage("x".into()).exit_status(), ExitStatus::Usage);
        assert_eq!(
            AppError::Config("x".into()).exit_status(),
            ExitStatus::Config
        );
        assert_eq!(
            AppError::BackupRootMissing("/x".into()).exit_status(),
            ExitStatus::Storage
        );
        assert_eq!(
            AppError::ListingNotFound("x".into()).exit_status(),
            ExitStatus::Vm
        );
        assert_eq!(AppError::Lock("x".into()).exit_status(), ExitStatus::Lock);
        assert_eq!(AppError::engine("x").exit_status(), ExitStatus::Engine);
        assert_eq!(
            AppError::Dependency("x".into()).exit_status(),
            ExitStatus::Dependency
        );
        assert_eq!(AppError::Interrupted(15).exit_status().code(), 143);
        assert_eq!(
            AppError::Internal("x".into()).exit_status(),
            ExitStatus::General
        );
        assert_eq!(
            AppError::BackupRootMissing("/x".into()).to_string(),
            "Backup path not found: /x"
        );
    }

    #[test]
    fn integrity_failure_is_a_storage_error() {
        let e = engine::Error::Verify {
            path: "/r/x.qcow2".into(),
            message: "block 3 differs".into(),
        };
        let a = engine_error(e, "Disk restore failed");
        assert_eq!(a.exit_status().code(), 4);
        assert!(
            a.to_string()
                .starts_with("Restore produced corrupt disk images — Disk restore failed: "),
            "{a}"
        );
    }
}
