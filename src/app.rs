//! Runs one invocation: token loop → backup root (§7.1) → validated request
//! (§1.3) → the command. Builds the real dependencies (config, log file, signal
//! handling); never decides exit codes itself (those come from `AppError`).

use std::path::Path;

use engine::Cancel;

use crate::cli::request::{self, Facts, InspectRequest, Request};
use crate::cli::{self, Parsed};
use crate::cmd;
use crate::error::{AppError, ExitStatus};
use crate::host::config::{self, BackupRoot};
pub use crate::host::env::Env;
use crate::host::tree;
use crate::ui::header::invocation;
use crate::ui::log::{self, RunLog};
use crate::ui::write_stdout;

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
        Request::All(a) => {
            require_root(&a.template.root)?;
            cmd::all::run(a, env)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inspect {
    Verify,
    Dump,
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
