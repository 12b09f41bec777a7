//! The command line exactly as vmrestore 0.6.0 reads it (spec §1.1–§1.4): a
//! left-to-right token loop over one table of flags. Owns what was typed ([`Args`]);
//! never touches the filesystem.
//!
//! Why not clap: the bash rules do not fit its model. A value is the next token
//! verbatim even when it starts with `--` (`--vm --force` names a VM "--force"),
//! `--list-restore-points` takes its value only when the next token does not start
//! with `--`, `--help` only wins over unknown options that come *after* it, mode
//! flags share one slot (last wins) and a path-valued `--vm` and `--backup-path`
//! share another. Each flag is defined once in [`FLAGS`] (name, value, section,
//! help) and `--help` is generated from that table, so no flag can be missing
//! from the usage text.
//!
//! Only the space-separated form is accepted: `--vm=my-vm` is an unknown option
//! (exit 7), as in 0.6.0 (acceptance statement 5). Accepting `--flag=value`
//! would be allowed, but no 0.6.0 script can depend on it and rejecting it keeps
//! statement 5 true.

pub mod request;

use std::fmt::Write as _;

/// The operation selected by the last mode flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `--vm`: restore (DR, clone, data-only or disk; see `request`).
    Restore,
    /// `--list`.
    List,
    /// `--list-restore-points`.
    ListRestorePoints,
    /// `--verify`.
    Verify,
    /// `--dump`.
    Dump,
}

/// What was typed, after the token loop (ripgrep's "low-level args").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args {
    /// The mode of the last mode flag.
    pub mode: Option<Mode>,
    /// VM label: the name, or the basename of a path-valued name.
    pub vm: Option<String>,
    /// The last name-carrying value exactly as typed.
    pub vm_value: Option<String>,
    /// `--backup-path`, or the dirname of a path-valued name (last one wins).
    pub cli_backup_path: Option<String>,
    /// True when `cli_backup_path` came from a path-valued name.
    pub path_aware: bool,
    /// `--restore-path` (one trailing `/` stripped).
    pub restore_path: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--disk`, unparsed.
    pub disk: Option<String>,
    /// `--period`.
    pub period: Option<String>,
    /// `--restore-point`, unparsed.
    pub restore_point: Option<String>,
    /// `--config-instance`.
    pub config_instance: Option<String>,
    /// `--connect`.
    pub connect: Option<String>,
    /// `--serve`.
    pub serve: Option<String>,
    /// `--instant-boot`.
    pub instant_boot: bool,
    /// `--pull`.
    pub pull: bool,
    /// `--nbd-target`, unparsed.
    pub nbd_target: Option<String>,
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
    /// `--json`.
    pub json: bool,
    /// The arguments as given (for the log header).
    pub invocation: Vec<String>,
}

/// The outcome of the token loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `--help`/`-h`, or no arguments at all: print [`usage`], exit 0.
    Help,
    /// `--version`/`-V`: print [`version`], exit 0.
    Version,
    /// Anything else.
    Run(Box<Args>),
}

/// A usage error from the token loop (exit 7).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Where a flag is listed in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// RESTORE.
    Restore,
    /// CONTROL.
    Control,
    /// INSPECTION.
    Inspection,
    /// OTHER.
    Other,
}

/// Whether a flag takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// A switch.
    Nothing,
    /// The next token, verbatim; absent or empty → this usage message.
    Value(&'static str),
    /// The next token if it exists, is non-empty and does not start with `--`.
    OptionalValue,
}

/// Identifies a flag in [`FLAGS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagId {
    Vm,
    List,
    ListRestorePoints,
    Verify,
    Dump,
    RestorePath,
    Name,
    Disk,
    Period,
    RestorePoint,
    BackupPath,
    ConfigInstance,
    Force,
    DryRun,
    SkipTpm,
    SkipConfig,
    NoPreRestore,
    IncludeIncomplete,
    Connect,
    Serve,
    InstantBoot,
    Pull,
    NbdTarget,
    Json,
    Help,
    Version,
}

/// One flag: defined once, used by the parser and by `--help`.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// Which flag.
    pub id: FlagId,
    /// `--long`.
    pub long: &'static str,
    /// `-h` / `-V` only.
    pub short: Option<&'static str>,
    /// Value placeholder for `--help`.
    pub value_name: &'static str,
    /// Value rule.
    pub takes: Takes,
    /// Help section.
    pub section: Section,
    /// Help text (may span lines; continuation lines are indented by `usage`).
    pub help: &'static str,
}

/// Every flag of spec §1.2, plus `--connect`, `--serve`, `--instant-boot`, `--pull`,
/// `--nbd-target` and `--json` (new in this version).
pub const FLAGS: &[Flag] = &[
    Flag { id: FlagId::Vm, long: "--vm", short: None, value_name: "<name|path>", takes: Takes::Value("--vm requires a VM name or path"), section: Section::Restore,
        help: "VM to restore: a directory name under the backup root, or a path to a VM\ndirectory, period directory or archived chain (.archives/chain-*)" },
    Flag { id: FlagId::RestorePath, long: "--restore-path", short: None, value_name: "<dir>", takes: Takes::Value("--restore-path requires a path"), section: Section::Restore,
        help: "Directory for the restored disk images. Required for DR, clone and\n--skip-config; with --disk it selects extraction instead of in-place\nreplacement. Refused if it lies inside a backup root" },
    Flag { id: FlagId::BackupPath, long: "--backup-path", short: None, value_name: "<dir>", takes: Takes::Value("--backup-path requires a path"), section: Section::Restore,
        help: "Backup root (default: BACKUP_PATH from vmbackup.conf)" },
    Flag { id: FlagId::Period, long: "--period", short: None, value_name: "<id>", takes: Takes::Value("--period requires a period id (e.g. 20260302, 2026-W09, 202603)"), section: Section::Restore,
        help: "Period directory to use (20260302, 2026-W09, 202603, ...)\n(default: the newest period with data)" },
    Flag { id: FlagId::RestorePoint, long: "--restore-point", short: None, value_name: "<latest|full|N>", takes: Takes::Value("--restore-point requires a value (latest, full, or number)"), section: Section::Restore,
        help: "Point in time: latest (default), full (= 0) or checkpoint number N" },
    Flag { id: FlagId::Name, long: "--name", short: None, value_name: "<clone-name>", takes: Takes::Value("--name requires a name"), section: Section::Restore,
        help: "Restore as a clone with a new name, UUID and MAC addresses" },
    Flag { id: FlagId::Disk, long: "--disk", short: None, value_name: "<dev[,dev...]|all>", takes: Takes::Value("--disk requires a device name (e.g. vdb, vda,vdb, or all)"), section: Section::Restore,
        help: "Restore only these disks: in place (VM shut off) without --restore-path,\nextracted to --restore-path otherwise. 'all' = every disk of the restore point" },
    Flag { id: FlagId::SkipConfig, long: "--skip-config", short: None, value_name: "", takes: Takes::Nothing, section: Section::Control,
        help: "Data only: restore the disk images, define no VM" },
    Flag { id: FlagId::SkipTpm, long: "--skip-tpm", short: None, value_name: "", takes: Takes::Nothing, section: Section::Control,
        help: "Do not restore TPM state" },
    Flag { id: FlagId::Force, long: "--force", short: None, value_name: "", takes: Takes::Nothing, section: Section::Control,
        help: "Replace an existing (shut off) VM definition and overwrite existing files" },
    Flag { id: FlagId::DryRun, long: "--dry-run", short: None, value_name: "", takes: Takes::Nothing, section: Section::Control,
        help: "Show what would be done; change nothing" },
    Flag { id: FlagId::NoPreRestore, long: "--no-pre-restore", short: None, value_name: "", takes: Takes::Nothing, section: Section::Control,
        help: "Disk in-place restore: do not keep <disk>.pre-restore" },
    Flag { id: FlagId::IncludeIncomplete, long: "--include-incomplete", short: None, value_name: "", takes: Takes::Nothing, section: Section::Control,
        help: "Allow restoring from an INCOMPLETE chain (forensic use only)" },
    Flag { id: FlagId::List, long: "--list", short: None, value_name: "", takes: Takes::Nothing, section: Section::Inspection,
        help: "List the VMs of the backup root" },
    Flag { id: FlagId::ListRestorePoints, long: "--list-restore-points", short: None, value_name: "<name|path>", takes: Takes::OptionalValue, section: Section::Inspection,
        help: "List the restore points of a VM (all periods, or --period),\nincluding archived chains and INCOMPLETE markings" },
    Flag { id: FlagId::Verify, long: "--verify", short: None, value_name: "<name|path>", takes: Takes::Value("--verify requires a VM name"), section: Section::Inspection,
        help: "Check the adler32 checksums (.chksum) of every data file of a chain" },
    Flag { id: FlagId::Dump, long: "--dump", short: None, value_name: "<name|path>", takes: Takes::Value("--dump requires a VM name"), section: Section::Inspection,
        help: "Print the stream metadata of every data file of a chain as JSON" },
    Flag { id: FlagId::ConfigInstance, long: "--config-instance", short: None, value_name: "<name>", takes: Takes::Value("--config-instance requires an instance name"), section: Section::Inspection,
        help: "Read /opt/vmbackup/config/<name>/vmbackup.conf (default: $VMBACKUP_INSTANCE,\nelse 'default'); ignored when a backup path is given on the command line" },
    Flag { id: FlagId::Connect, long: "--connect", short: None, value_name: "<uri>", takes: Takes::Value("--connect requires a libvirt URI"), section: Section::Other,
        help: "libvirt connection URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)" },
    Flag { id: FlagId::Serve, long: "--serve", short: None, value_name: "<listen>", takes: Takes::Value("--serve requires a listen address (host:port or a unix socket path)"), section: Section::Other,
        help: "With --vm: serve the restore point's disks read-only over NBD instead of\nrestoring them (instant recovery), until interrupted. <listen> is host:port\n(TCP) or a path (Unix socket); prints one NBD URI per disk" },
    Flag { id: FlagId::InstantBoot, long: "--instant-boot", short: None, value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "With --vm and --restore-path: boot the restore point now. Serves its disks\nover NBD on 127.0.0.1, creates empty qcow2 overlays backed by them in\n--restore-path and starts a temporary (transient) clone, --name or\n<vm>-instant, new UUID and MACs. Runs until interrupted; then the clone\nis stopped and its overlays removed, unless its disks were pulled" },
    Flag { id: FlagId::Pull, long: "--pull", short: None, value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "With --instant-boot: make the clone permanent. Pulls all data from the\nbackup into the overlays while the clone runs (libvirt block pull), then\ndefines it persistently and exits; the overlays are its disks" },
    Flag { id: FlagId::NbdTarget, long: "--nbd-target", short: None, value_name: "<[dev=]uri[,...]>", takes: Takes::Value("--nbd-target requires an NBD URI (nbd://host:port/export or nbd+unix:///export?socket=path)"), section: Section::Other,
        help: "With --vm: write the restore point's disks into NBD exports (qemu-nbd,\nnbdkit, ...) instead of files, e.g. vda=nbd://host:10809/vda. A bare URI\nneeds a single disk. Defines no VM; the exports must be at least the disk size" },
    Flag { id: FlagId::Json, long: "--json", short: None, value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "Machine-readable output for --list, --list-restore-points, --verify,\n--dump and the restore summary (schemas: docs/json-output.md)" },
    Flag { id: FlagId::Help, long: "--help", short: Some("-h"), value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "Show this help and exit" },
    Flag { id: FlagId::Version, long: "--version", short: Some("-V"), value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "Show the version and exit" },
];

/// `vmrestore <version>`, exactly (acceptance statement 1, with our version).
pub fn version() -> String {
    format!("vmrestore {}", env!("CARGO_PKG_VERSION"))
}

fn find(token: &str) -> Option<&'static Flag> {
    FLAGS
        .iter()
        .find(|f| f.long == token || f.short == Some(token))
}

/// POSIX `dirname` and `basename` of a value that contains `/` (trailing `/` ignored).
fn split_path(value: &str) -> (String, String) {
    let trimmed = value.trim_end_matches('/');
    if trimmed.is_empty() {
        return ("/".into(), "/".into());
    }
    match trimmed.rfind('/') {
        None => (".".into(), trimmed.into()),
        Some(i) => {
            let dir = trimmed[..i].trim_end_matches('/');
            (
                if dir.is_empty() {
                    "/".into()
                } else {
                    dir.into()
                },
                trimmed[i + 1..].into(),
            )
        }
    }
}

/// Removes one trailing `/`, never reducing `/` to nothing.
pub fn strip_one_slash(p: &str) -> String {
    match p.strip_suffix('/') {
        Some(s) if !s.is_empty() => s.into(),
        _ => p.into(),
    }
}

impl Args {
    /// A name-carrying flag: a value with `/` also sets the CLI backup path.
    fn set_name(&mut self, value: &str) {
        self.vm_value = Some(value.to_owned());
        if value.contains('/') {
            let (dir, base) = split_path(value);
            self.vm = Some(base);
            self.cli_backup_path = Some(dir);
            self.path_aware = true;
        } else {
            self.vm = Some(value.to_owned());
        }
    }

    fn apply(&mut self, id: FlagId, value: Option<String>) {
        let v = || value.clone().unwrap_or_default();
        match id {
            FlagId::Vm => {
                self.mode = Some(Mode::Restore);
                self.set_name(&v());
            }
            FlagId::List => self.mode = Some(Mode::List),
            FlagId::ListRestorePoints => {
                self.mode = Some(Mode::ListRestorePoints);
                if let Some(val) = &value {
                    self.set_name(val);
                }
            }
            FlagId::Verify => {
                self.mode = Some(Mode::Verify);
                self.set_name(&v());
            }
            FlagId::Dump => {
                self.mode = Some(Mode::Dump);
                self.set_name(&v());
            }
            FlagId::RestorePath => self.restore_path = Some(strip_one_slash(&v())),
            FlagId::Name => self.name = value,
            FlagId::Disk => self.disk = value,
            FlagId::Period => self.period = value,
            FlagId::RestorePoint => self.restore_point = value,
            FlagId::BackupPath => {
                self.cli_backup_path = Some(strip_one_slash(&v()));
                self.path_aware = false;
            }
            FlagId::ConfigInstance => self.config_instance = value,
            FlagId::Connect => self.connect = value,
            FlagId::Serve => self.serve = value,
            FlagId::InstantBoot => self.instant_boot = true,
            FlagId::Pull => self.pull = true,
            FlagId::NbdTarget => self.nbd_target = value,
            FlagId::Force => self.force = true,
            FlagId::DryRun => self.dry_run = true,
            FlagId::SkipTpm => self.skip_tpm = true,
            FlagId::SkipConfig => self.skip_config = true,
            FlagId::NoPreRestore => self.no_pre_restore = true,
            FlagId::IncludeIncomplete => self.include_incomplete = true,
            FlagId::Json => self.json = true,
            // handled by the loop
            FlagId::Help | FlagId::Version => {}
        }
    }
}

/// Runs the token loop (spec §1.1, §1.3 steps 1–2). `argv` excludes the program name.
pub fn parse(argv: &[String]) -> Result<Parsed, UsageError> {
    if argv.is_empty() {
        return Ok(Parsed::Help);
    }
    let mut args = Args {
        invocation: argv.to_vec(),
        ..Args::default()
    };
    let mut i = 0;
    while i < argv.len() {
        let token = &argv[i];
        let Some(flag) = find(token) else {
            return Err(UsageError(format!("Unknown option: {token}")));
        };
        match flag.id {
            FlagId::Help => return Ok(Parsed::Help),
            FlagId::Version => return Ok(Parsed::Version),
            _ => {}
        }
        let value = match flag.takes {
            Takes::Nothing => None,
            Takes::Value(missing) => match argv.get(i + 1) {
                Some(v) if !v.is_empty() => {
                    i += 1;
                    Some(v.clone())
                }
                _ => return Err(UsageError(missing.to_owned())),
            },
            Takes::OptionalValue => match argv.get(i + 1) {
                Some(v) if !v.is_empty() && !v.starts_with("--") => {
                    i += 1;
                    Some(v.clone())
                }
                _ => None,
            },
        };
        args.apply(flag.id, value);
        i += 1;
    }
    Ok(Parsed::Run(Box::new(args)))
}

/// Width of the help-text column (33 + 46 keeps `--help` within 80 columns).
const HELP_WIDTH: usize = 46;

/// Greedy word wrap of a help text (its own line breaks are treated as spaces).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The `--help` text (spec §1.4), generated from [`FLAGS`].
pub fn usage() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "vmrestore v{} — Automated VM restoration for vmbackup backups",
        env!("CARGO_PKG_VERSION")
    );
    s.push_str(
        "Native restore engine: reads virtnbdbackup chains directly and restores them\n\
         in-process; it no longer wraps virtnbdrestore (nor virsh or qemu-img).\n\n\
         USAGE:\n\
         \x20 vmrestore --vm <name|path> --restore-path <dir> [options]     restore a VM\n\
         \x20 vmrestore --vm <name|path> --disk <dev[,dev...]|all> [options] restore disks\n\
         \x20 vmrestore --list [--backup-path <dir>]\n\
         \x20 vmrestore --list-restore-points <name|path> [--period <id>]\n\
         \x20 vmrestore --verify <name|path> [--period <id>]\n\
         \x20 vmrestore --dump <name|path> [--period <id>]\n\n\
         Flag values are separate arguments (--vm my-vm); the --flag=value form is\n\
         not accepted.\n",
    );
    for (section, title) in [
        (Section::Restore, "RESTORE"),
        (Section::Control, "CONTROL"),
        (Section::Inspection, "INSPECTION"),
        (Section::Other, "OTHER"),
    ] {
        let _ = writeln!(s, "\n{title}:");
        for f in FLAGS.iter().filter(|f| f.section == section) {
            let mut head = match f.short {
                Some(short) => format!("{short}, {}", f.long),
                None => f.long.to_owned(),
            };
            if !f.value_name.is_empty() {
                head.push(' ');
                head.push_str(f.value_name);
            }
            let wrapped = wrap(f.help, HELP_WIDTH);
            let mut lines = wrapped.iter();
            let first = lines.next().map(String::as_str).unwrap_or_default();
            if head.len() <= 30 {
                let _ = writeln!(s, "  {head:<30} {first}");
            } else {
                let _ = writeln!(s, "  {head}\n  {:<30} {first}", "");
            }
            for l in lines {
                let _ = writeln!(s, "  {:<30} {l}", "");
            }
        }
    }
    s.push_str(
        "\nENVIRONMENT:\n\
         \x20 VMBACKUP_INSTANCE              instance when --config-instance is not given\n\
         \x20 LOG_DIR                        log directory of restore, --verify, --dump\n\
         \x20                                (default /var/log/vmrestore)\n\
         \x20 LIBVIRT_DEFAULT_URI            default for --connect\n\
         \x20 VMRESTORE_CONFIG_ROOT          replaces /opt/vmbackup/config (tests)\n\
         \nEXIT CODES:\n\
         \x20 0 ok  1 general  2 config  3 lock  4 storage  5 VM/backup  6 engine/verify\n\
         \x20 7 usage  8 dependency  130 SIGINT  143 SIGTERM\n\
         \nEXAMPLES:\n\
         \x20 # Disaster recovery (original identity)\n\
         \x20 vmrestore --vm my-vm --restore-path /var/lib/libvirt/images\n\
         \x20 # Clone with a new identity\n\
         \x20 vmrestore --vm my-vm --name test-clone --restore-path /var/lib/libvirt/images\n\
         \x20 # Point in time: restore point 3 of week 10\n\
         \x20 vmrestore --vm my-vm --period 2026-W10 --restore-point 3 \\\n\
         \x20     --restore-path /srv/restore\n\
         \x20 # Period restore (daily policy)\n\
         \x20 vmrestore --vm my-vm --period 20260302 --restore-path /srv/restore\n\
         \x20 # Replace disks in place (VM shut off): one, several, all\n\
         \x20 vmrestore --vm my-vm --disk vdb\n\
         \x20 vmrestore --vm my-vm --disk vda,vdb,sda\n\
         \x20 vmrestore --vm my-vm --disk all\n\
         \x20 # Extract one disk, optionally at a restore point\n\
         \x20 vmrestore --vm my-vm --disk vdb --restore-path /tmp/extract\n\
         \x20 vmrestore --vm my-vm --disk vdb --restore-point 2 --restore-path /tmp/extract\n\
         \x20 # Restore from an archived chain (path-aware --vm)\n\
         \x20 vmrestore --vm /mnt/bk/my-vm/2026-W09/.archives/chain-2026-02-28 \\\n\
         \x20     --restore-path /tmp/r\n\
         \x20 # Data only, no VM definition\n\
         \x20 vmrestore --vm my-vm --restore-path /tmp/restore --skip-config\n\
         \x20 # Preview\n\
         \x20 vmrestore --vm my-vm --restore-path /tmp/restore --dry-run\n\
         \x20 # Inspection\n\
         \x20 vmrestore --list\n\
         \x20 vmrestore --list-restore-points my-vm --period 2026-W09\n\
         \x20 vmrestore --verify my-vm --period 20260303\n\
         \x20 vmrestore --dump my-vm --period 2026-W10 --json\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Parsed, UsageError> {
        parse(&args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    fn args(a: &[&str]) -> Args {
        match run(a) {
            Ok(Parsed::Run(args)) => *args,
            other => panic!("{a:?} gave {other:?}"),
        }
    }

    fn err(a: &[&str]) -> String {
        match run(a) {
            Err(e) => e.0,
            other => panic!("{a:?} gave {other:?}"),
        }
    }

    #[test]
    fn every_flag_is_in_the_help() {
        let u = usage();
        for f in FLAGS {
            assert!(u.contains(f.long), "{} missing from --help", f.long);
        }
        assert!(u.starts_with(&format!("vmrestore v{}", env!("CARGO_PKG_VERSION"))));
        assert!(u.contains("no longer wraps virtnbdrestore"));
        for s in [
            "RESTORE:",
            "CONTROL:",
            "INSPECTION:",
            "EXAMPLES:",
            "VMBACKUP_INSTANCE",
        ] {
            assert!(u.contains(s), "{s}");
        }
        // the whole text fits in 80 columns
        for l in u.lines() {
            assert!(l.chars().count() <= 80, "{l}");
        }
        assert_eq!(wrap("a b\nccc dd", 5), ["a b", "ccc", "dd"]);
    }

    #[test]
    fn flag_names_are_unique() {
        for (i, a) in FLAGS.iter().enumerate() {
            for b in &FLAGS[i + 1..] {
                assert_ne!(a.long, b.long);
                assert_ne!(a.id, b.id);
            }
        }
    }

    #[test]
    fn no_args_is_help() {
        assert_eq!(run(&[]), Ok(Parsed::Help));
    }

    #[test]
    fn flag_vm() {
        let a = args(&["--vm", "my-vm"]);
        assert_eq!(
            (a.mode, a.vm.as_deref(), a.path_aware),
            (Some(Mode::Restore), Some("my-vm"), false)
        );
        // the next token is taken verbatim
        assert_eq!(args(&["--vm", "--force"]).vm.as_deref(), Some("--force"));
        assert_eq!(err(&["--vm"]), "--vm requires a VM name or path");
        assert_eq!(err(&["--vm", ""]), "--vm requires a VM name or path");
        // path-aware
        let a = args(&["--vm", "/srv/bk/my-vm/"]);
        assert_eq!(
            (a.vm.as_deref(), a.cli_backup_path.as_deref(), a.path_aware),
            (Some("my-vm"), Some("/srv/bk"), true)
        );
        let a = args(&["--vm", "/my-vm"]);
        assert_eq!(
            (a.vm.as_deref(), a.cli_backup_path.as_deref()),
            (Some("my-vm"), Some("/"))
        );
        let a = args(&["--vm", "rel//vm"]);
        assert_eq!(
            (a.vm.as_deref(), a.cli_backup_path.as_deref()),
            (Some("vm"), Some("rel"))
        );
        assert_eq!(err(&["--vm=my-vm"]), "Unknown option: --vm=my-vm");
    }

    #[test]
    fn flag_list() {
        assert_eq!(args(&["--list"]).mode, Some(Mode::List));
        // last mode flag wins (statement 15)
        let a = args(&["--vm", "my-vm", "--list", "--backup-path", "B"]);
        assert_eq!((a.mode, a.vm.as_deref()), (Some(Mode::List), Some("my-vm")));
    }

    #[test]
    fn flag_list_restore_points() {
        let a = args(&["--list-restore-points", "my-vm"]);
        assert_eq!(
            (a.mode, a.vm.as_deref()),
            (Some(Mode::ListRestorePoints), Some("my-vm"))
        );
        let a = args(&["--list-restore-points", "--period", "2026-W10"]);
        assert_eq!((a.vm, a.period.as_deref()), (None, Some("2026-W10")));
        assert_eq!(args(&["--list-restore-points"]).vm, None);
        let a = args(&[
            "--list-restore-points",
            "/b/vm/2026-W10/.archives/chain-2026-03-05",
        ]);
        assert_eq!(
            (a.vm.as_deref(), a.cli_backup_path.as_deref()),
            (Some("chain-2026-03-05"), Some("/b/vm/2026-W10/.archives"))
        );
        assert_eq!(err(&["--list-restore-points", ""]), "Unknown option: ");
    }

    #[test]
    fn flag_verify() {
        let a = args(&["--verify", "vm"]);
        assert_eq!((a.mode, a.vm.as_deref()), (Some(Mode::Verify), Some("vm")));
        assert_eq!(err(&["--verify"]), "--verify requires a VM name");
        assert!(args(&["--verify", "/b/vm"]).path_aware);
    }

    #[test]
    fn flag_dump() {
        assert_eq!(args(&["--dump", "vm"]).mode, Some(Mode::Dump));
        assert_eq!(err(&["--dump", ""]), "--dump requires a VM name");
    }

    #[test]
    fn flag_restore_path() {
        assert_eq!(
            args(&["--restore-path", "/r/"]).restore_path.as_deref(),
            Some("/r")
        );
        assert_eq!(
            args(&["--restore-path", "/r//"]).restore_path.as_deref(),
            Some("/r/")
        );
        assert_eq!(
            args(&["--restore-path", "/"]).restore_path.as_deref(),
            Some("/")
        );
        assert_eq!(err(&["--restore-path"]), "--restore-path requires a path");
    }

    #[test]
    fn flag_name() {
        assert_eq!(args(&["--name", "c"]).name.as_deref(), Some("c"));
        assert_eq!(err(&["--name"]), "--name requires a name");
    }

    #[test]
    fn flag_disk() {
        assert_eq!(
            args(&["--disk", " vda , ,vdb "]).disk.as_deref(),
            Some(" vda , ,vdb ")
        );
        assert_eq!(
            err(&["--disk"]),
            "--disk requires a device name (e.g. vdb, vda,vdb, or all)"
        );
    }

    #[test]
    fn flag_period() {
        assert_eq!(
            args(&["--period", "2026-W09"]).period.as_deref(),
            Some("2026-W09")
        );
        assert!(err(&["--period"]).starts_with("--period requires"));
    }

    #[test]
    fn flag_restore_point() {
        assert_eq!(
            args(&["--restore-point", "-1"]).restore_point.as_deref(),
            Some("-1")
        );
        assert!(err(&["--restore-point"]).starts_with("--restore-point requires"));
    }

    #[test]
    fn flag_backup_path() {
        let a = args(&["--vm", "/x/vm", "--backup-path", "/b/"]);
        assert_eq!(
            (a.cli_backup_path.as_deref(), a.path_aware, a.vm.as_deref()),
            (Some("/b"), false, Some("vm"))
        );
        let a = args(&["--backup-path", "/b", "--vm", "/x/vm"]);
        assert_eq!(
            (a.cli_backup_path.as_deref(), a.path_aware),
            (Some("/x"), true)
        );
        assert_eq!(err(&["--backup-path"]), "--backup-path requires a path");
    }

    #[test]
    fn flag_config_instance() {
        assert_eq!(
            args(&["--config-instance", "prod"])
                .config_instance
                .as_deref(),
            Some("prod")
        );
        assert_eq!(
            err(&["--config-instance"]),
            "--config-instance requires an instance name"
        );
    }

    #[test]
    fn flag_switches() {
        let a = args(&[
            "--force",
            "--dry-run",
            "--skip-tpm",
            "--skip-config",
            "--no-pre-restore",
            "--include-incomplete",
            "--json",
        ]);
        assert!(
            a.force
                && a.dry_run
                && a.skip_tpm
                && a.skip_config
                && a.no_pre_restore
                && a.include_incomplete
                && a.json
        );
    }

    #[test]
    fn flag_connect() {
        assert_eq!(
            args(&["--connect", "test:///default"]).connect.as_deref(),
            Some("test:///default")
        );
        assert_eq!(err(&["--connect"]), "--connect requires a libvirt URI");
    }

    #[test]
    fn flag_help_and_version() {
        assert_eq!(run(&["--help"]), Ok(Parsed::Help));
        assert_eq!(run(&["-h", "--bogus"]), Ok(Parsed::Help));
        assert_eq!(err(&["--bogus", "--help"]), "Unknown option: --bogus");
        assert_eq!(run(&["-V"]), Ok(Parsed::Version));
        assert_eq!(run(&["--vm", "x", "--version"]), Ok(Parsed::Version));
        // a value is consumed before --help is seen
        assert_eq!(args(&["--vm", "--help"]).vm.as_deref(), Some("--help"));
        assert_eq!(
            version(),
            format!("vmrestore {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn removed_and_unknown_options() {
        for bad in [
            "--yes",
            "-y",
            "--verbose",
            "--quiet",
            "--log-level",
            "--debug",
            "--status",
            "--host-config",
            "--host-target",
            "vm",
            "-",
        ] {
            assert_eq!(err(&[bad]), format!("Unknown option: {bad}"));
        }
    }
}
