//! Runs one invocation: token loop → backup root (§7.1) → validated request
//! (§1.3) → the command. Builds the real dependencies (config, log file, signal
//! handling); never decides exit codes itself (those come from `AppError`).

use std::path::{Path, PathBuf};

use engine::Cancel;

use crate::cli::{self, Parsed};
use crate::cmd::{self, write_stdout};
use crate::config::{self, BackupRoot, ConfigEnv};
use crate::error::{AppError, ExitStatus};
use crate::log::{self, RunLog};
use crate::request::{self, Facts, InspectRequest, Request, RestoreRequest};
use crate::tree;

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

/// Parses `argv` (without the program name) and runs it.
pub fn run(argv: &[String], env: &Env) -> Result<ExitStatus, AppError> {
    let args = match cli::parse(argv).map_err(|e| AppError::Usage(e.0))? {
        Parsed::Help => {
            write_stdout(&cli::usage());
            return Ok(ExitStatus::Ok);
        }
        Parsed::Version => {
            write_stdout(&format!("{}\n", cli::version()));
            return Ok(ExitStatus::Ok);
        }
        Parsed::Run(args) => *args,
    };
    // §1.3 step 3, for every mode
    let root = config::resolve_backup_root(
        args.cli_backup_path.as_deref(),
        args.config_instance.as_deref(),
        &env.config,
    )?;
    // step 6 needs the filesystem; computed here, reported in order by request::build
    let restore_path_inside = args.restore_path.as_deref().and_then(|p| {
        let mut roots = vec![root.path.clone()];
        roots.extend(config::configured_roots(&env.config));
        config::root_containing(Path::new(p), &roots)
    });
    let facts = Facts {
        restore_path_inside,
        default_uri: env.default_uri.clone(),
    };
    let req = request::build(args, root, &facts)?;
    dispatch(&req, env)
}

/// §1.3 step 9: the backup root must be an existing directory (exit 4).
pub fn require_root(root: &BackupRoot) -> Result<(), AppError> {
    if root.path.is_dir() {
        Ok(())
    } else {
        Err(AppError::BackupRootMissing(root.path.clone()))
    }
}

/// Runs a validated request.
pub fn dispatch(req: &Request, env: &Env) -> Result<ExitStatus, AppError> {
    match req {
        Request::List(r) => {
            require_root(&r.root)?;
            cmd::list::run(r)
        }
        Request::Points(r) => {
            require_root(&r.root)?;
            cmd::points::run(r)
        }
        Request::Verify(r) => inspect(r, Inspect::Verify, env),
        Request::Dump(r) => inspect(r, Inspect::Dump, env),
        Request::Restore(r) => {
            require_root(&r.root)?;
            cmd::restore::run(r, env)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inspect {
    Verify,
    Dump,
}

/// `vmrestore <args>` as typed, shell-quoted where needed (log header).
pub fn invocation(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    format!("vmrestore {}", quoted.join(" "))
        .trim_end()
        .to_owned()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// The log header block of a restore run (spec §7.3), for the restore flow.
pub fn restore_header_fields(r: &RestoreRequest) -> Vec<(&'static str, String)> {
    vec![
        ("Invocation", invocation(&r.invocation)),
        ("Mode", "restore".into()),
        ("VM", r.vm.label.clone()),
        ("Period", r.period.clone().unwrap_or_else(|| "auto".into())),
        ("Restore Point", r.point.label()),
        (
            "Restore Path",
            r.restore_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "unset".into()),
        ),
        (
            "Clone Name",
            r.clone_name
                .clone()
                .unwrap_or_else(|| "none (disaster recovery)".into()),
        ),
        ("Backup Path", r.root.path.display().to_string()),
        (
            "Disk Filter",
            match &r.disks {
                None | Some(request::DiskSelection::All) => "all".into(),
                Some(request::DiskSelection::List(d)) => d.join(","),
            },
        ),
        ("No Pre-Restore", yes_no(r.no_pre_restore)),
        ("Skip Config", yes_no(r.skip_config)),
        ("Skip TPM", yes_no(r.skip_tpm)),
        ("Force", yes_no(r.force)),
        ("Dry Run", yes_no(r.dry_run)),
        ("Include Incomplete", yes_no(r.include_incomplete)),
    ]
}

/// `--verify` / `--dump`: logged modes (log file, banner, footer), no lock, no
/// catalogue row (spec §4.16).
fn inspect(r: &InspectRequest, what: Inspect, env: &Env) -> Result<ExitStatus, AppError> {
    let cancel = Cancel::new();
    if let Err(e) = crate::signal::install(cancel.clone()) {
        tracing::warn!(target: "main", "Cannot install signal handling: {e}");
    }
    let mode = match what {
        Inspect::Verify => "verify",
        Inspect::Dump => "dump",
    };
    let fields = vec![
        ("Invocation", invocation(&r.invocation)),
        ("Mode", mode.to_owned()),
        ("VM", r.vm.label.clone()),
        ("Period", r.period.clone().unwrap_or_else(|| "auto".into())),
        ("Backup Path", r.root.path.display().to_string()),
    ];
    RunLog::open(&log::log_dir(env.log_dir.as_deref()), &r.vm.label, &fields);
    tracing::info!(target: "main", "====== vmrestore v{} ======", env!("CARGO_PKG_VERSION"));
    require_root(&r.root)?;
    let data_dir = tree::resolve_data_dir_logged(&r.root.path, &r.vm.label, r.period.as_deref())?;
    tracing::info!(target: "run_virtnbd_action", "Running {mode} on: {}", data_dir.display());
    match what {
        Inspect::Verify => cmd::verify::run(&data_dir, r.json, &cancel)?,
        Inspect::Dump => cmd::dump::run(&data_dir, r.json)?,
    }
    if let Some(sig) = cancel.signal() {
        return Err(AppError::Interrupted(sig));
    }
    tracing::info!(target: "main", "====== vmrestore completed ======");
    Ok(ExitStatus::Ok)
}

/// Prints a failure: a bare line for listing lookups, otherwise an ERROR log line
/// (plus one `caused by:` line per source) under the error's component.
pub fn report(e: &AppError) {
    if e.is_plain() {
        eprintln!("{e}");
        return;
    }
    let mut lines = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        lines.push(format!("  caused by: {s}"));
        source = s.source();
    }
    for l in lines {
        match e.component() {
            "parse_args" => tracing::error!(target: "parse_args", "{l}"),
            "resolve_backup_path" => tracing::error!(target: "resolve_backup_path", "{l}"),
            _ => tracing::error!(target: "main", "{l}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_quoting() {
        let a: Vec<String> = [
            "--vm",
            "my vm",
            "--list-restore-points",
            "",
            "--disk",
            "vda,vdb",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(
            invocation(&a),
            "vmrestore --vm 'my vm' --list-restore-points '' --disk vda,vdb"
        );
        assert_eq!(invocation(&[]), "vmrestore");
    }
}
