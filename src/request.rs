//! What was typed ([`Args`]) → what is needed ([`Request`]), with the validation
//! order of spec §1.3 steps 4–8. No I/O: the backup root (step 3) and the
//! restore-path containment (step 6) are computed by the caller and passed in as
//! data, so the first failure still wins in the spec's order.

use std::path::PathBuf;

use crate::cli::{Args, Mode};
use crate::config::BackupRoot;
use crate::error::AppError;

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

/// `--restore-point`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSelector {
    /// All checkpoints (default).
    Latest,
    /// `full`: checkpoint 0, passed as an explicit endpoint.
    Full,
    /// Checkpoints 0..=N (u64: any unsigned decimal is valid syntax; too large → exit 5 later).
    Number(u64),
}

impl PointSelector {
    /// Parses `latest`, `full` or an unsigned decimal (spec §1.2, acceptance 10).
    pub fn parse(v: &str) -> Result<Self, AppError> {
        match v {
            "latest" => Ok(Self::Latest),
            "full" => Ok(Self::Full),
            _ if !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()) => {
                Ok(Self::Number(v.parse().unwrap_or(u64::MAX)))
            }
            _ => Err(AppError::Usage(format!(
                "Invalid restore point: {v} (use latest, full, or number)"
            ))),
        }
    }

    /// True for an explicit `full`/`N` (point-in-time).
    pub fn is_explicit(self) -> bool {
        self != Self::Latest
    }

    /// As typed in the log header.
    pub fn label(self) -> String {
        match self {
            Self::Latest => "latest".into(),
            Self::Full => "full".into(),
            Self::Number(n) => n.to_string(),
        }
    }
}

/// `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSelection {
    /// `all`: every disk present at the target checkpoint.
    All,
    /// These devices, in the order given (trimmed, empty items dropped, deduplicated).
    List(Vec<String>),
}

impl DiskSelection {
    /// Parses the `--disk` value; an empty list is a usage error.
    pub fn parse(v: &str) -> Result<Self, AppError> {
        if v.trim() == "all" {
            return Ok(Self::All);
        }
        let mut disks: Vec<String> = Vec::new();
        for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            if !disks.iter().any(|x| x == d) {
                disks.push(d.to_owned());
            }
        }
        if disks.is_empty() {
            return Err(AppError::Usage("No disk names specified".into()));
        }
        Ok(Self::List(disks))
    }
}

/// One `--nbd-target` entry: `[dev=]uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTargetSpec {
    /// The disk (`vda`); `None` for a bare URI (the only disk restored).
    pub disk: Option<String>,
    /// `nbd://host[:port]/export` or `nbd+unix:///export?socket=path`.
    pub uri: String,
}

/// Parses `--nbd-target`: comma-separated `[dev=]uri`, at most one bare URI and only
/// alone, no disk twice, plain NBD only (TLS URIs are refused, not downgraded).
pub fn parse_nbd_targets(v: &str) -> Result<Vec<NbdTargetSpec>, AppError> {
    let bad = |m: String| Err(AppError::Usage(format!("--nbd-target {v}: {m}")));
    let mut out: Vec<NbdTargetSpec> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (disk, uri) = match item.split_once('=') {
            Some((d, u)) if !d.contains(':') && !d.contains('/') => {
                (Some(d.trim().to_owned()), u.trim())
            }
            _ => (None, item),
        };
        if uri.starts_with("nbds://") || uri.starts_with("nbds+unix://") {
            return bad(format!("{uri}: NBD over TLS is not supported"));
        }
        if !(uri.starts_with("nbd://") || uri.starts_with("nbd+unix://")) {
            return bad(format!(
                "{uri}: not an NBD URI (nbd://host:port/export or nbd+unix:///export?socket=path)"
            ));
        }
        if disk.as_deref() == Some("") {
            return bad(format!("{item}: empty disk name"));
        }
        if out.iter().any(|o| o.disk.is_some() && o.disk == disk) {
            return bad(format!("disk {} named twice", disk.unwrap_or_default()));
        }
        out.push(NbdTargetSpec {
            disk,
            uri: uri.to_owned(),
        });
    }
    if out.is_empty() {
        return bad("no URI given".into());
    }
    if out.len() > 1 && out.iter().any(|o| o.disk.is_none()) {
        return bad("with several targets every one needs its disk (vda=nbd://...)".into());
    }
    Ok(out)
}

/// Which restore (spec §4.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// `--vm --restore-path`: disaster recovery, original identity.
    Dr,
    /// `--vm --name C --restore-path`: new identity.
    Clone,
    /// `--vm --skip-config --restore-path`: disks only, no definition.
    DataOnly,
    /// `--vm --disk D`: replace disks of the defined VM in place.
    DiskInPlace,
    /// `--vm --disk D --restore-path P`: extract disks.
    DiskExtract,
    /// `--vm --serve <listen>`: export the restore point over NBD (instant recovery).
    Serve,
    /// `--vm --instant-boot --restore-path P`: boot a transient clone from overlays
    /// over NBD exports of the restore point.
    InstantBoot,
    /// `--vm --nbd-target URI`: write the disks into NBD exports.
    Nbd,
}

impl RestoreMode {
    /// Name used in logs and the catalogue (`dr`, `clone`, `data-only`, `disk`, `extract`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dr => "dr",
            Self::Clone => "clone",
            Self::DataOnly => "data-only",
            Self::DiskInPlace => "disk",
            Self::DiskExtract => "extract",
            Self::Serve => "serve",
            Self::InstantBoot => "instant-boot",
            Self::Nbd => "nbd",
        }
    }
}

/// `--vm`: everything a restore needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// Backup root.
    pub root: BackupRoot,
    /// The VM.
    pub vm: VmTarget,
    /// Which restore.
    pub mode: RestoreMode,
    /// `--restore-path` (one trailing `/` stripped); `None` only for disk in-place.
    pub restore_path: Option<PathBuf>,
    /// `--name` (Clone mode; also kept for the WARN when `--skip-config` ignores it).
    pub clone_name: Option<String>,
    /// `--disk` (disk modes only).
    pub disks: Option<DiskSelection>,
    /// `--period`.
    pub period: Option<String>,
    /// `--restore-point`.
    pub point: PointSelector,
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
    /// libvirt URI (`--connect`, else `LIBVIRT_DEFAULT_URI`, else `qemu:///system`).
    pub uri: String,
    /// `--json`.
    pub json: bool,
    /// `--serve <listen>`.
    pub serve: Option<String>,
    /// `--pull` (instant boot: make the clone permanent).
    pub pull: bool,
    /// `--nbd-target`, parsed.
    pub nbd_targets: Vec<NbdTargetSpec>,
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
}

/// Facts computed by the caller (with I/O) that validation needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The backup root that contains `--restore-path`, if any (§4.1 step 1).
    pub restore_path_inside: Option<PathBuf>,
    /// `LIBVIRT_DEFAULT_URI`, if set and non-empty.
    pub default_uri: Option<String>,
}

/// Steps 4–8 of spec §1.3 (plus the mode-specific pure checks), first failure wins.
pub fn build(args: Args, root: BackupRoot, facts: &Facts) -> Result<Request, AppError> {
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
        .map(PointSelector::parse)
        .transpose()?
        .unwrap_or(PointSelector::Latest);
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
    {
        return Err(AppError::Usage("--restore-path is required for restore (unless --disk is used for in-place replacement)".into()));
    }
    let vm = args.vm.clone().map(|label| VmTarget {
        label,
        typed: args.vm_value.clone().unwrap_or_default(),
        path_aware: args.path_aware,
    });
    let need_vm = |msg: &str| vm.clone().ok_or_else(|| AppError::Usage(msg.to_owned()));
    Ok(match mode {
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
            let restore_mode = match (&disks, &args.restore_path) {
                _ if args.serve.is_some() => RestoreMode::Serve,
                _ if args.instant_boot => RestoreMode::InstantBoot,
                _ if !nbd_targets.is_empty() => RestoreMode::Nbd,
                (Some(_), None) => RestoreMode::DiskInPlace,
                (Some(_), Some(_)) => RestoreMode::DiskExtract,
                (None, _) if args.skip_config => RestoreMode::DataOnly,
                (None, _) if args.name.is_some() => RestoreMode::Clone,
                (None, _) => RestoreMode::Dr,
            };
            Request::Restore(RestoreRequest {
                root,
                vm: need_vm("--vm requires a VM name or path")?,
                mode: restore_mode,
                restore_path: args.restore_path.map(PathBuf::from),
                clone_name: args.name,
                disks,
                period: args.period,
                point,
                force: args.force,
                dry_run: args.dry_run,
                skip_tpm: args.skip_tpm,
                skip_config: args.skip_config,
                no_pre_restore: args.no_pre_restore,
                include_incomplete: args.include_incomplete,
                uri: args
                    .connect
                    .or_else(|| facts.default_uri.clone())
                    .unwrap_or_else(|| DEFAULT_URI.into()),
                json: args.json,
                serve: args.serve,
                pull: args.pull,
                nbd_targets,
                invocation: args.invocation,
            })
        }
    })
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
    ];
    if exclusive.iter().filter(|x| **x).count() > 1 {
        return usage("--serve, --instant-boot and --nbd-target cannot be combined");
    }
    if args.pull && !args.instant_boot {
        return usage("--pull requires --instant-boot");
    }
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
    use crate::config::RootSource;

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
            Ok(Request::Restore(r)) => r.mode,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            mode(&["--vm", "v", "--restore-path", "/r"]),
            RestoreMode::Dr
        );
        assert_eq!(
            mode(&["--vm", "v", "--restore-path", "/r", "--name", "c"]),
            RestoreMode::Clone
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
            RestoreMode::DataOnly
        );
        assert_eq!(
            mode(&["--vm", "v", "--disk", "vda"]),
            RestoreMode::DiskInPlace
        );
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
            RestoreMode::DiskExtract
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
                    r.disks,
                    Some(DiskSelection::List(vec!["vda".into(), "vdb".into()]))
                );
                assert_eq!(
                    (r.point, r.vm.label.as_str(), r.vm.path_aware),
                    (PointSelector::Full, "v", true)
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
                (r.disks, r.uri.as_str()),
                (Some(DiskSelection::All), "test:///default")
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            PointSelector::parse("007").ok(),
            Some(PointSelector::Number(7))
        );
        assert_eq!(
            PointSelector::parse("99999999999999999999999").ok(),
            Some(PointSelector::Number(u64::MAX))
        );
    }
}
