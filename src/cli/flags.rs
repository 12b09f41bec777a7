//! The flag table: every flag defined once (name, value rule, `--help` section and
//! text), read by the token loop and by `--help`, which is generated from it.

use std::fmt::Write as _;

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
    ServePublic,
    ServeTlsCert,
    ServeTlsKey,
    TestBoot,
    All,
    Only,
    Exclude,
    Jobs,
    NamePrefix,
    NameSuffix,
    TestBootTimeout,
    TestBootExpect,
    Report,
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
        help: "Salvage restore of a damaged or INCOMPLETE chain: every readable byte up to\nthe restore point (missing files, truncated or corrupt frames, .chksum\nmismatches, .partial leftovers). Each damaged disk gets <disk>.damage.json\n(missing/stale/unverified ranges); the run exits 6 and says PARTIALLY" },
    Flag { id: FlagId::List, long: "--list", short: None, value_name: "", takes: Takes::Nothing, section: Section::Inspection,
        help: "List the VMs of the backup root" },
    Flag { id: FlagId::ListRestorePoints, long: "--list-restore-points", short: None, value_name: "<name|path>", takes: Takes::OptionalValue, section: Section::Inspection,
        help: "List the restore points of a VM (all periods, or --period),\nincluding archived chains and INCOMPLETE markings" },
    Flag { id: FlagId::Verify, long: "--verify", short: None, value_name: "<name|path>", takes: Takes::Value("--verify requires a VM name"), section: Section::Inspection,
        help: "Check that every restore point of a chain will restore: each data file is\nread as a restore reads it (frames, LZ4 checksums, .chksum) and the chain\nchecked for gaps; exit 6 names the damaged file and byte offset" },
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
    Flag { id: FlagId::ServePublic, long: "--serve-public", short: None, value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "With --serve: allow a listen address that is not loopback (0.0.0.0, a LAN\naddress). The NBD server has no authentication: every host that reaches\nthe port can read the disks" },
    Flag { id: FlagId::ServeTlsCert, long: "--serve-tls-cert", short: None, value_name: "<file>", takes: Takes::Value("--serve-tls-cert requires a PEM certificate file"), section: Section::Other,
        help: "With --serve and --serve-tls-key: serve over TLS with this PEM certificate\n(chain, leaf first). Clients must STARTTLS; the URIs are nbds:// and\nnbds+unix://. Encrypts; clients are still not authenticated" },
    Flag { id: FlagId::ServeTlsKey, long: "--serve-tls-key", short: None, value_name: "<file>", takes: Takes::Value("--serve-tls-key requires a PEM private key file"), section: Section::Other,
        help: "With --serve and --serve-tls-cert: the certificate's PEM private key" },
    Flag { id: FlagId::All, long: "--all", short: None, value_name: "", takes: Takes::Nothing, section: Section::Restore,
        help: "Whole-host restore: every VM of the backup root at its latest point (or\n--restore-point/--period), as DR into --restore-path (--skip-config: data\nonly; --name-prefix/--name-suffix: clones; --test-boot: test boots). One\nplan, one shared space check, a final table; a failed VM does not stop the others" },
    Flag { id: FlagId::Only, long: "--only", short: None, value_name: "<vm[,vm...]>", takes: Takes::Value("--only requires VM names"), section: Section::Restore,
        help: "With --all: only these VMs" },
    Flag { id: FlagId::Exclude, long: "--exclude", short: None, value_name: "<vm[,vm...]>", takes: Takes::Value("--exclude requires VM names"), section: Section::Restore,
        help: "With --all: not these VMs" },
    Flag { id: FlagId::Jobs, long: "--jobs", short: None, value_name: "<n>", takes: Takes::Value("--jobs requires a number"), section: Section::Restore,
        help: "With --all: VMs restored at the same time (default: 1 on a rotating\ndisk, 2 otherwise)" },
    Flag { id: FlagId::NamePrefix, long: "--name-prefix", short: None, value_name: "<text>", takes: Takes::Value("--name-prefix requires a text"), section: Section::Restore,
        help: "With --all: restore clones named <prefix><vm><suffix>" },
    Flag { id: FlagId::NameSuffix, long: "--name-suffix", short: None, value_name: "<text>", takes: Takes::Value("--name-suffix requires a text"), section: Section::Restore,
        help: "With --all: restore clones named <prefix><vm><suffix>" },
    Flag { id: FlagId::TestBoot, long: "--test-boot", short: None, value_name: "", takes: Takes::Nothing, section: Section::Other,
        help: "With --vm: boot the restore point without restoring it (NBD + throwaway\noverlays) as an isolated transient clone (<vm>-testboot-<time>, new UUID,\nNICs link-down) and wait for a sign of life on its serial console or guest\nagent; saves a screenshot and the console log, removes everything. Exit 0\nonly when the guest showed a sign of life" },
    Flag { id: FlagId::TestBootTimeout, long: "--test-boot-timeout", short: None, value_name: "<seconds>", takes: Takes::Value("--test-boot-timeout requires a number of seconds"), section: Section::Other,
        help: "How long --test-boot waits for a sign of life (default 120)" },
    Flag { id: FlagId::TestBootExpect, long: "--test-boot-expect", short: None, value_name: "<regex>", takes: Takes::Value("--test-boot-expect requires a regular expression"), section: Section::Other,
        help: "With --test-boot: the sign of life is this regular expression on the\nserial console (with a guest agent channel, the agent must answer too)" },
    Flag { id: FlagId::Report, long: "--report", short: None, value_name: "<dir>", takes: Takes::Value("--report requires a directory"), section: Section::Other,
        help: "With --test-boot: write the result, screenshot and console log to <dir>\nand (re)build <dir>/index.html, one page over every result in <dir>" },
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

/// Width of the help-text column (33 + 46 keeps `--help` within 80 columns).
const HELP_WIDTH: usize = 46;

/// Greedy word wrap of a help text (its own line breaks are treated as spaces).
pub(crate) fn wrap(text: &str, width: usize) -> Vec<String> {
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
            flag_help(&mut s, f);
        }
    }
    s.push_str(FOOTER);
    s
}

/// One flag's lines of `--help`: head in a 30-column field, then the wrapped text.
fn flag_help(s: &mut String, f: &Flag) {
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

/// The environment, exit codes and examples at the end of `--help`.
const FOOTER: &str = "\nENVIRONMENT:\n\
         \x20 VMBACKUP_INSTANCE              instance when --config-instance is not given\n\
         \x20 LOG_DIR                        log directory of restore, --verify, --dump;\n\
         \x20                                unset: /var/log/vmrestore (created if it can\n\
         \x20                                be), else $XDG_STATE_HOME/vmrestore or\n\
         \x20                                ~/.local/state/vmrestore, else\n\
         \x20                                /var/tmp/vmrestore-<uid>\n\
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
         \x20 vmrestore --dump my-vm --period 2026-W10 --json\n";
