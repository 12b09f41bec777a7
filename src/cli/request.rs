//! What a command needs ([`Request`]), built from what was typed by
//! [`build`](crate::cli::build::build).

use std::path::{Path, PathBuf};

pub use crate::cli::selection::{parse_nbd_targets, DiskSelection, NbdTargetSpec, RestorePoint};

use crate::host::config::BackupRoot;

/// The default libvirt URI when neither `--connect` nor `LIBVIRT_DEFAULT_URI` is set.
pub const DEFAULT_URI: &str = "qemu:///system";

/// The VM a command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTarget {
    /// The label V: a VM directory name, or the basename of a path-valued argument.
    pub label: String,
    /// The argument exactly as typed.
    pub typed: String,
    /// True when the backup root came from a path-valued VM argument (§5.1).
    pub path_aware: bool,
}

/// `--list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// Backup root.
    pub root: BackupRoot,
    /// `--json`.
    pub json: bool,
}

/// `--list-restore-points`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointsRequest {
    /// Backup root.
    pub root: BackupRoot,
    /// The VM.
    pub vm: VmTarget,
    /// `--period`.
    pub period: Option<String>,
    /// `--json`.
    pub json: bool,
}

/// `--verify` and `--dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectRequest {
    /// Backup root.
    pub root: BackupRoot,
    /// The VM.
    pub vm: VmTarget,
    /// `--period`.
    pub period: Option<String>,
    /// `--json`.
    pub json: bool,
    /// The arguments as given (log header).
    pub invocation: Vec<String>,
}

/// Which restore (spec §4.0), with the data only that restore has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreKind {
    /// `--vm --restore-path`: disaster recovery, original identity.
    Dr {
        /// `--restore-path`.
        dir: PathBuf,
    },
    /// `--vm --name C --restore-path`: new identity.
    Clone {
        /// `--restore-path`.
        dir: PathBuf,
        /// `--name`.
        name: String,
    },
    /// `--vm --skip-config --restore-path`: disks only, no definition.
    DataOnly {
        /// `--restore-path`.
        dir: PathBuf,
        /// `--name` given anyway (ignored, with a WARN).
        ignored_name: Option<String>,
    },
    /// `--vm --disk D`: replace disks of the defined VM in place.
    DiskInPlace {
        /// `--disk`.
        disks: DiskSelection,
    },
    /// `--vm --disk D --restore-path P`: extract disks.
    DiskExtract {
        /// `--restore-path`.
        dir: PathBuf,
        /// `--disk`.
        disks: DiskSelection,
    },
    /// `--vm --serve <listen>`: export the restore point over NBD (instant recovery).
    Serve {
        /// `--serve`.
        listen: String,
        /// `--disk`, if given.
        disks: Option<DiskSelection>,
        /// `--serve-public`: a non-loopback address is allowed.
        public: bool,
        /// `--serve-tls-cert` and `--serve-tls-key`: serve over TLS.
        tls: Option<ServeTls>,
    },
    /// `--vm --instant-boot --restore-path P`: boot a transient clone from overlays
    /// over NBD exports of the restore point.
    InstantBoot {
        /// `--restore-path` (the overlays).
        dir: PathBuf,
        /// `--name`; `None`: `<vm>-instant`, named once the VM name is resolved.
        name: Option<String>,
        /// `--pull`.
        pull: bool,
    },
    /// `--vm --test-boot`: boot the restore point as an isolated throwaway clone and
    /// wait for a sign of life.
    TestBoot {
        /// `--restore-path` for the overlays, else a temporary directory.
        dir: Option<PathBuf>,
        /// `--test-boot-timeout` (seconds).
        timeout: u64,
        /// `--test-boot-expect`.
        expect: Option<String>,
        /// `--report`.
        report: Option<PathBuf>,
    },
    /// `--vm --nbd-target URI`: write the disks into NBD exports.
    Nbd {
        /// `--nbd-target`, parsed.
        targets: Vec<NbdTargetSpec>,
        /// `--disk`, if given.
        disks: Option<DiskSelection>,
    },
}

impl RestoreKind {
    /// Name used in logs, plans and JSON (`dr`, `clone`, `data-only`, `disk`, `extract`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Dr { .. } => "dr",
            Self::Clone { .. } => "clone",
            Self::DataOnly { .. } => "data-only",
            Self::DiskInPlace { .. } => "disk",
            Self::DiskExtract { .. } => "extract",
            Self::Serve { .. } => "serve",
            Self::InstantBoot { .. } => "instant-boot",
            Self::TestBoot { .. } => "test-boot",
            Self::Nbd { .. } => "nbd",
        }
    }

    /// The catalogue's `restore_mode` column (extract is `disk-extract` there).
    pub fn catalogue_name(&self) -> &'static str {
        match self {
            Self::DiskExtract { .. } => "disk-extract",
            other => other.as_str(),
        }
    }

    /// `--restore-path`, for the modes that have one.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Self::Dr { dir }
            | Self::Clone { dir, .. }
            | Self::DataOnly { dir, .. }
            | Self::DiskExtract { dir, .. }
            | Self::InstantBoot { dir, .. } => Some(dir),
            Self::TestBoot { dir, .. } => dir.as_deref(),
            Self::DiskInPlace { .. } | Self::Serve { .. } | Self::Nbd { .. } => None,
        }
    }

    /// `--name` as typed (for the log header and the catalogue).
    pub fn typed_name(&self) -> Option<&str> {
        match self {
            Self::Clone { name, .. } => Some(name),
            Self::InstantBoot { name, .. } => name.as_deref(),
            Self::DataOnly { ignored_name, .. } => ignored_name.as_deref(),
            _ => None,
        }
    }

    /// `--disk`, for the modes that take one.
    pub fn disks(&self) -> Option<&DiskSelection> {
        match self {
            Self::DiskInPlace { disks } | Self::DiskExtract { disks, .. } => Some(disks),
            Self::Serve { disks, .. } | Self::Nbd { disks, .. } => disks.as_ref(),
            _ => None,
        }
    }

    /// True for the modes that cannot work without libvirt.
    pub fn needs_libvirt(&self) -> bool {
        matches!(
            self,
            Self::Dr { .. }
                | Self::Clone { .. }
                | Self::DiskInPlace { .. }
                | Self::InstantBoot { .. }
        )
    }
}

/// The restore flags every mode shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// `--force`.
    pub force: bool,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--skip-tpm`.
    pub skip_tpm: bool,
    /// `--skip-config`.
    pub skip_config: bool,
    /// `--no-pre-restore`.
    pub no_pre_restore: bool,
    /// `--include-incomplete`.
    pub include_incomplete: bool,
    /// Restores running at once in this process (`--all --jobs`): each gets this
    /// share of the engine's data buffers, so the run's memory does not grow with
    /// `--jobs` (0 and 1: a restore alone).
    pub concurrent: u8,
}

/// `--vm`: everything a restore needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// Backup root.
    pub root: BackupRoot,
    /// The VM.
    pub vm: VmTarget,
    /// Which restore, with its own data.
    pub kind: RestoreKind,
    /// `--period`.
    pub period: Option<String>,
    /// `--restore-point`.
    pub point: RestorePoint,
    /// The shared flags.
    pub options: RestoreOptions,
    /// libvirt URI (`--connect`, else `LIBVIRT_DEFAULT_URI`, else `qemu:///system`).
    pub uri: String,
    /// `--json`.
    pub json: bool,
    /// The arguments as given (log header).
    pub invocation: Vec<String>,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `--list`.
    List(ListRequest),
    /// `--list-restore-points`.
    Points(PointsRequest),
    /// `--verify`.
    Verify(InspectRequest),
    /// `--dump`.
    Dump(InspectRequest),
    /// `--vm`.
    Restore(RestoreRequest),
    /// `--all`.
    All(AllRequest),
}

/// Facts computed by the caller (with I/O) that validation needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The backup root that contains `--restore-path`, if any (§4.1 step 1).
    pub restore_path_inside: Option<PathBuf>,
    /// `LIBVIRT_DEFAULT_URI`, if set and non-empty.
    pub default_uri: Option<String>,
}

/// The PEM files of `--serve-tls-cert` and `--serve-tls-key` (read when serving is
/// planned, so that a bad file fails before anything listens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeTls {
    /// `--serve-tls-cert`: the certificate chain.
    pub cert: PathBuf,
    /// `--serve-tls-key`: its private key.
    pub key: PathBuf,
}

/// `--all`: the same restore for every VM of the backup root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllRequest {
    /// The restore each VM gets; its `vm` is filled per VM (a clone's name too).
    pub template: RestoreRequest,
    /// `--only`.
    pub only: Vec<String>,
    /// `--exclude`.
    pub exclude: Vec<String>,
    /// `--jobs`.
    pub jobs: Option<usize>,
    /// `--name-prefix` / `--name-suffix` (clones).
    pub clone_affixes: Option<(String, String)>,
}
