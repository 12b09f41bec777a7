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

pub mod all;
pub mod build;
pub mod flags;
pub mod request;
pub mod rules;
pub mod selection;

pub use flags::{usage, Flag, FlagId, Section, Takes, FLAGS};

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
    /// `--all`: every VM of the backup root.
    All,
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
    /// `--serve-public`.
    pub serve_public: bool,
    /// `--serve-tls-cert`.
    pub serve_tls_cert: Option<String>,
    /// `--serve-tls-key`.
    pub serve_tls_key: Option<String>,
    /// `--test-boot`.
    pub test_boot: bool,
    /// `--test-boot-timeout`, unparsed.
    pub test_boot_timeout: Option<String>,
    /// `--test-boot-expect`.
    pub test_boot_expect: Option<String>,
    /// `--report`.
    pub report: Option<String>,
    /// `--only`, unparsed.
    pub only: Option<String>,
    /// `--exclude`, unparsed.
    pub exclude: Option<String>,
    /// `--jobs`, unparsed.
    pub jobs: Option<String>,
    /// `--name-prefix`.
    pub name_prefix: Option<String>,
    /// `--name-suffix`.
    pub name_suffix: Option<String>,
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

/// The vmbackup release whose bash vmrestore this binary replaces flag for flag.
pub const VMBACKUP_COMPAT: &str = "0.6.0";

/// `vmrestore <version> (vmbackup <compat> compatible)`: acceptance statement 1's
/// line with our version, and the vmbackup release whose flags, exit codes and
/// backup trees it accepts, so that `vmrestore --version` tells the two apart.
pub fn version() -> String {
    format!(
        "vmrestore {} (vmbackup {VMBACKUP_COMPAT} compatible)",
        env!("CARGO_PKG_VERSION")
    )
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
            FlagId::ServePublic => self.serve_public = true,
            FlagId::ServeTlsCert => self.serve_tls_cert = value,
            FlagId::ServeTlsKey => self.serve_tls_key = value,
            FlagId::TestBoot => self.test_boot = true,
            FlagId::TestBootTimeout => self.test_boot_timeout = value,
            FlagId::TestBootExpect => self.test_boot_expect = value,
            FlagId::Report => self.report = value,
            FlagId::All => self.mode = Some(Mode::All),
            FlagId::Only => self.only = value,
            FlagId::Exclude => self.exclude = value,
            FlagId::Jobs => self.jobs = value,
            FlagId::NamePrefix => self.name_prefix = value,
            FlagId::NameSuffix => self.name_suffix = value,
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

#[cfg(test)]
mod tests {
    use super::flags::wrap;
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
    fn flag_serve_tls() {
        let a = args(&[
            "--serve-tls-cert",
            "/etc/c.pem",
            "--serve-tls-key",
            "/etc/k.pem",
        ]);
        assert_eq!(a.serve_tls_cert.as_deref(), Some("/etc/c.pem"));
        assert_eq!(a.serve_tls_key.as_deref(), Some("/etc/k.pem"));
        assert_eq!(
            err(&["--serve-tls-cert"]),
            "--serve-tls-cert requires a PEM certificate file"
        );
        assert_eq!(
            err(&["--serve-tls-key"]),
            "--serve-tls-key requires a PEM private key file"
        );
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
            format!(
                "vmrestore {} (vmbackup 0.6.0 compatible)",
                env!("CARGO_PKG_VERSION")
            )
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
