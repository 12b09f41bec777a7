//! What was typed ([`Args`]) → what is needed ([`Request`]), with the validation
//! order of spec §1.3 steps 4–8. No I/O: the backup root (step 3) and the
//! restore-path containment (step 6) are computed by the caller and passed in as
//! data, so the first failure still wins in the spec's order.

use std::path::{Path, PathBuf};

pub use crate::cli::all::AllRequest;
pub use crate::cli::selection::{parse_nbd_targets, DiskSelection, NbdTargetSpec, RestorePoint};

use crate::cli::{Args, Mode};
use crate::error::AppError;
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

/// Steps 4–8 of spec §1.3, in order: the mode and the restore point.
fn checked_steps(args: &Args, facts: &Facts) -> Result<(Mode, RestorePoint), AppError> {
    // 4
    if args.disk.is_some() && args.name.is_some() {
        return Err(AppError::Usage(
            "--disk and --name cannot be combined (disk restore replaces disk files, it does not create a VM)".into(),
        ));
    }
    // 5
    let point = args
        .restore_point
        .as_deref()
        .map(RestorePoint::parse)
        .transpose()?
        .unwrap_or(RestorePoint::Latest);
    // 6
    if let (Some(inside), Some(p)) = (&facts.restore_path_inside, &args.restore_path) {
        return Err(AppError::Usage(format!(
            "Restore path is inside backup root {}: {p} — choose a destination outside the backup storage",
            inside.display()
        )));
    }
    // 7
    let Some(mode) = args.mode else {
        return Err(AppError::Usage("No mode specified (try --help)".into()));
    };
    // 8
    if mode == Mode::Restore
        && args.restore_path.is_none()
        && args.disk.is_none()
        && args.serve.is_none()
        && args.nbd_target.is_none()
        && !args.test_boot
    {
        return Err(AppError::Usage("--restore-path is required for restore (unless --disk is used for in-place replacement)".into()));
    }
    Ok((mode, point))
}

/// Steps 4–8 of spec §1.3 (plus the mode-specific pure checks), first failure wins.
pub fn build(args: Args, root: BackupRoot, facts: &Facts) -> Result<Request, AppError> {
    let (mode, point) = checked_steps(&args, facts)?;
    let vm = args.vm.clone().map(|label| VmTarget {
        label,
        typed: args.vm_value.clone().unwrap_or_default(),
        path_aware: args.path_aware,
    });
    let need_vm = |msg: &str| vm.clone().ok_or_else(|| AppError::Usage(msg.to_owned()));
    check_names(&args)?;
    Ok(match mode {
        Mode::All => Request::All(crate::cli::all::all_request(args, root, point, facts)?),
        Mode::List => Request::List(ListRequest {
            root,
            json: args.json,
        }),
        Mode::ListRestorePoints => Request::Points(PointsRequest {
            root,
            vm: need_vm("VM name required for --list-restore-points")?,
            period: args.period,
            json: args.json,
        }),
        Mode::Verify | Mode::Dump => {
            let r = InspectRequest {
                root,
                vm: need_vm("VM name required")?,
                period: args.period,
                json: args.json,
                invocation: args.invocation,
            };
            if mode == Mode::Verify {
                Request::Verify(r)
            } else {
                Request::Dump(r)
            }
        }
        Mode::Restore => {
            let disks = args.disk.as_deref().map(DiskSelection::parse).transpose()?;
            let nbd_targets = args
                .nbd_target
                .as_deref()
                .map(parse_nbd_targets)
                .transpose()?
                .unwrap_or_default();
            check_new_modes(&args, &disks, &nbd_targets)?;
            let vm = need_vm("--vm requires a VM name or path")?;
            let kind = restore_kind(&args, disks, nbd_targets)?;
            Request::Restore(RestoreRequest {
                root,
                vm,
                kind,
                period: args.period,
                point,
                options: RestoreOptions {
                    force: args.force,
                    dry_run: args.dry_run,
                    skip_tpm: args.skip_tpm,
                    skip_config: args.skip_config,
                    no_pre_restore: args.no_pre_restore,
                    include_incomplete: args.include_incomplete,
                    concurrent: 1,
                },
                uri: args
                    .connect
                    .or_else(|| facts.default_uri.clone())
                    .unwrap_or_else(|| DEFAULT_URI.into()),
                json: args.json,
                invocation: args.invocation,
            })
        }
    })
}

/// Every typed value that becomes a path component is one safe component (exit 7
/// naming the flag): `--vm`'s name, `--name`, `--period`, `--disk` and the disks of
/// `--nbd-target`.
fn check_names(args: &Args) -> Result<(), AppError> {
    use crate::host::names::check_flag;
    if let Some(label) = &args.vm {
        check_flag(
            if args.path_aware {
                "--vm (last path component)"
            } else {
                "--vm"
            },
            label,
        )?;
    }
    if let Some(n) = &args.name {
        check_flag("--name", n)?;
    }
    if let Some(p) = &args.period {
        check_flag("--period", p)?;
    }
    if let Some(DiskSelection::List(disks)) =
        args.disk.as_deref().map(DiskSelection::parse).transpose()?
    {
        for d in &disks {
            check_flag("--disk", d)?;
        }
    }
    for t in args
        .nbd_target
        .as_deref()
        .map(parse_nbd_targets)
        .transpose()?
        .unwrap_or_default()
    {
        if let Some(d) = &t.disk {
            check_flag("--nbd-target", d)?;
        }
    }
    Ok(())
}

/// Which restore the flags ask for (spec §4.0), carrying each mode's own data.
pub(crate) fn restore_kind(
    args: &Args,
    disks: Option<DiskSelection>,
    targets: Vec<NbdTargetSpec>,
) -> Result<RestoreKind, AppError> {
    let dir = args.restore_path.as_ref().map(PathBuf::from);
    let need_dir = || {
        dir.clone().ok_or_else(|| {
            AppError::Usage("--restore-path is required for restore (unless --disk is used for in-place replacement)".into())
        })
    };
    Ok(match (disks, &dir) {
        (disks, _) if args.serve.is_some() => RestoreKind::Serve {
            listen: args.serve.clone().unwrap_or_default(),
            disks,
            public: args.serve_public,
            tls: serve_tls(args),
        },
        (_, _) if args.test_boot => RestoreKind::TestBoot {
            dir: dir.clone(),
            timeout: test_boot_timeout(args)?,
            expect: args.test_boot_expect.clone(),
            report: args.report.as_ref().map(PathBuf::from),
        },
        (_, _) if args.instant_boot => RestoreKind::InstantBoot {
            dir: need_dir()?,
            name: args.name.clone(),
            pull: args.pull,
        },
        (disks, _) if !targets.is_empty() => RestoreKind::Nbd { targets, disks },
        (Some(disks), None) => RestoreKind::DiskInPlace { disks },
        (Some(disks), Some(dir)) => RestoreKind::DiskExtract {
            dir: dir.clone(),
            disks,
        },
        (None, _) if args.skip_config => RestoreKind::DataOnly {
            dir: need_dir()?,
            ignored_name: args.name.clone(),
        },
        (None, _) => match &args.name {
            Some(name) => RestoreKind::Clone {
                dir: need_dir()?,
                name: name.clone(),
            },
            None => RestoreKind::Dr { dir: need_dir()? },
        },
    })
}

/// `--test-boot` boots every disk under a name of its own; its options need it.
pub(crate) fn check_test_boot(args: &Args, disks: &Option<DiskSelection>) -> Result<(), AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    let needs = args.test_boot_timeout.is_some()
        || args.test_boot_expect.is_some()
        || args.report.is_some();
    if needs && !args.test_boot {
        return usage("--test-boot-timeout, --test-boot-expect and --report require --test-boot");
    }
    if !args.test_boot {
        return Ok(());
    }
    if disks.is_some() || args.skip_config || args.pull || args.name.is_some() {
        return usage("--test-boot boots every disk of the restore point as <vm>-testboot-<time>; --disk, --skip-config, --pull and --name cannot be used with it");
    }
    if let Some(re) = &args.test_boot_expect {
        if let Err(e) = regex::Regex::new(re) {
            return Err(AppError::Usage(format!(
                "--test-boot-expect: not a regular expression: {e}"
            )));
        }
    }
    Ok(())
}

/// `--test-boot-timeout` (default 120 s): a whole number of seconds, 1..=86400.
fn test_boot_timeout(args: &Args) -> Result<u64, AppError> {
    let Some(v) = &args.test_boot_timeout else {
        return Ok(120);
    };
    v.parse::<u64>()
        .ok()
        .filter(|s| (1..=86_400).contains(s))
        .ok_or_else(|| {
            AppError::Usage(format!(
                "--test-boot-timeout {v}: a whole number of seconds from 1 to 86400"
            ))
        })
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

fn serve_tls(args: &Args) -> Option<ServeTls> {
    match (&args.serve_tls_cert, &args.serve_tls_key) {
        (Some(cert), Some(key)) => Some(ServeTls {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }),
        _ => None,
    }
}

/// TLS flags only with `--serve`, and only as a pair: a certificate without its key
/// (or the reverse) cannot serve, and silently serving in plaintext would be worse.
pub(crate) fn check_serve_tls(args: &Args) -> Result<(), AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    let (cert, key) = (args.serve_tls_cert.is_some(), args.serve_tls_key.is_some());
    if (cert || key) && args.serve.is_none() {
        return usage("--serve-tls-cert and --serve-tls-key require --serve");
    }
    match (cert, key) {
        (true, false) => {
            usage("--serve-tls-cert requires --serve-tls-key (the certificate's private key)")
        }
        (false, true) => {
            usage("--serve-tls-key requires --serve-tls-cert (the certificate of that key)")
        }
        _ => Ok(()),
    }
}

/// The combinations of `--serve`, `--instant-boot`, `--pull` and `--nbd-target`
/// that mean nothing, refused before anything is read.
fn check_new_modes(
    args: &Args,
    disks: &Option<DiskSelection>,
    nbd: &[NbdTargetSpec],
) -> Result<(), AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    let exclusive = [
        args.serve.is_some(),
        args.instant_boot,
        args.nbd_target.is_some(),
        args.test_boot,
    ];
    if exclusive.iter().filter(|x| **x).count() > 1 {
        return usage("--serve, --instant-boot, --test-boot and --nbd-target cannot be combined");
    }
    check_test_boot(args, disks)?;
    if args.pull && !args.instant_boot {
        return usage("--pull requires --instant-boot");
    }
    if args.serve_public && args.serve.is_none() {
        return usage("--serve-public requires --serve");
    }
    check_serve_tls(args)?;
    if args.instant_boot {
        if disks.is_some() {
            return usage("--instant-boot boots every disk of the restore point; --disk cannot be used with it");
        }
        if args.skip_config {
            return usage("--instant-boot defines a VM; --skip-config cannot be used with it");
        }
    }
    if !nbd.is_empty() {
        if args.restore_path.is_some() {
            return usage(
                "--nbd-target writes into NBD exports; --restore-path cannot be used with it",
            );
        }
        match disks {
            Some(DiskSelection::All) => {
                return usage("--nbd-target: name each disk (vda=nbd://...) instead of --disk all")
            }
            Some(DiskSelection::List(l)) if l.len() > 1 || nbd.iter().any(|t| t.disk.is_some()) => {
                return usage("--nbd-target with --disk: give one disk and one bare URI")
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Parsed};
    use crate::host::config::RootSource;

    fn root() -> BackupRoot {
        BackupRoot {
            path: "/b".into(),
            source: RootSource::Cli,
        }
    }

    fn req(a: &[&str], facts: &Facts) -> Result<Request, AppError> {
        match parse(&a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()) {
            Ok(Parsed::Run(args)) => build(*args, root(), facts),
            other => panic!("{other:?}"),
        }
    }

    fn usage(a: &[&str]) -> String {
        match req(a, &Facts::default()) {
            Err(AppError::Usage(m)) => m,
            other => panic!("{a:?}: {other:?}"),
        }
    }

    #[test]
    fn validation_order() {
        // statement 9 beats everything after it
        assert!(usage(&[
            "--vm",
            "v",
            "--disk",
            "vda",
            "--name",
            "c",
            "--restore-point",
            "x"
        ])
        .starts_with("--disk and --name"));
        // statement 10
        for bad in ["foo", "-1", "3abc", "+3", " 3"] {
            assert_eq!(
                usage(&["--list", "--restore-point", bad]),
                format!("Invalid restore point: {bad} (use latest, full, or number)")
            );
        }
        // step 6 before step 7
        let f = Facts {
            restore_path_inside: Some("/b".into()),
            default_uri: None,
        };
        match req(&["--restore-path", "/b/r"], &f) {
            Err(AppError::Usage(m)) => assert_eq!(m, "Restore path is inside backup root /b: /b/r — choose a destination outside the backup storage"),
            other => panic!("{other:?}"),
        }
        // statements 11-13
        assert_eq!(
            usage(&["--backup-path", "/b"]),
            "No mode specified (try --help)"
        );
        assert_eq!(usage(&["--vm", "v"]), "--restore-path is required for restore (unless --disk is used for in-place replacement)");
        assert_eq!(
            usage(&["--list-restore-points"]),
            "VM name required for --list-restore-points"
        );
        assert_eq!(
            usage(&["--list-restore-points", "--period", "2026-W10"]),
            "VM name required for --list-restore-points"
        );
        assert_eq!(
            usage(&["--vm", "v", "--disk", ","]),
            "No disk names specified"
        );
    }

    #[test]
    fn restore_modes() {
        let mode = |a: &[&str]| match req(a, &Facts::default()) {
            Ok(Request::Restore(r)) => r.kind.as_str(),
            other => panic!("{other:?}"),
        };
        assert_eq!(mode(&["--vm", "v", "--restore-path", "/r"]), "dr");
        assert_eq!(
            mode(&["--vm", "v", "--restore-path", "/r", "--name", "c"]),
            "clone"
        );
        assert_eq!(
            mode(&[
                "--vm",
                "v",
                "--restore-path",
                "/r",
                "--name",
                "c",
                "--skip-config"
            ]),
            "data-only"
        );
        assert_eq!(mode(&["--vm", "v", "--disk", "vda"]), "disk");
        assert_eq!(
            mode(&[
                "--vm",
                "v",
                "--disk",
                "vda",
                "--restore-path",
                "/r",
                "--skip-config"
            ]),
            "extract"
        );
        match req(
            &[
                "--vm",
                "/x/v",
                "--disk",
                " vda , ,vdb,vda ",
                "--restore-point",
                "full",
            ],
            &Facts::default(),
        ) {
            Ok(Request::Restore(r)) => {
                assert_eq!(
                    r.kind.disks(),
                    Some(&DiskSelection::List(vec!["vda".into(), "vdb".into()]))
                );
                assert_eq!(
                    (r.point, r.vm.label.as_str(), r.vm.path_aware),
                    (RestorePoint::Full, "v", true)
                );
                assert_eq!(r.uri, DEFAULT_URI);
            }
            other => panic!("{other:?}"),
        }
        let f = Facts {
            restore_path_inside: None,
            default_uri: Some("test:///default".into()),
        };
        match req(&["--vm", "v", "--disk", "all"], &f) {
            Ok(Request::Restore(r)) => assert_eq!(
                (r.kind.disks(), r.uri.as_str()),
                (Some(&DiskSelection::All), "test:///default")
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            RestorePoint::parse("007").ok(),
            Some(RestorePoint::Number(7))
        );
        assert_eq!(
            RestorePoint::parse("99999999999999999999999").ok(),
            Some(RestorePoint::Number(u64::MAX))
        );
    }

    #[test]
    fn serve_tls_flags() {
        let serve = ["--vm", "v", "--serve", "/run/s.sock"];
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            serve.iter().chain(extra).copied().collect()
        };
        match req(
            &with(&["--serve-tls-cert", "c.pem", "--serve-tls-key", "k.pem"]),
            &Facts::default(),
        ) {
            Ok(Request::Restore(r)) => match r.kind {
                RestoreKind::Serve { tls: Some(t), .. } => {
                    assert_eq!(t.cert, PathBuf::from("c.pem"));
                    assert_eq!(t.key, PathBuf::from("k.pem"));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        match req(&serve, &Facts::default()) {
            Ok(Request::Restore(r)) => {
                assert!(matches!(r.kind, RestoreKind::Serve { tls: None, .. }))
            }
            other => panic!("{other:?}"),
        }
        assert!(usage(&with(&["--serve-tls-cert", "c.pem"])).contains("requires --serve-tls-key"));
        assert!(usage(&with(&["--serve-tls-key", "k.pem"])).contains("requires --serve-tls-cert"));
        let m = usage(&[
            "--vm",
            "v",
            "--skip-config",
            "--restore-path",
            "/r",
            "--serve-tls-cert",
            "c.pem",
            "--serve-tls-key",
            "k.pem",
        ]);
        assert!(m.contains("require --serve"), "{m}");
    }
}
