//! Runs one invocation: token loop → backup root (§7.1) → validated request
//! (§1.3) → the command. Builds the real dependencies (config, log file, signal
//! handling); never decides exit codes itself (those come from `AppError`).

use std::path::Path;

use engine::Cancel;

use crate::cli::build;
use crate::cli::request::{Facts, InspectRequest, Request};
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
            // vmbackup's bash vmrestore in /usr/local/bin hides /usr/bin/vmrestore
            if let Some(w) = crate::host::shadow::check_process() {
                tracing::warn!(target: "main", "{w}");
            }
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
    // step 6 needs the filesystem; computed here, reported in order by build::build
    let restore_path_inside = args.restore_path.as_deref().and_then(|p| {
        let mut roots = vec![root.path.clone()];
        roots.extend(config::configured_roots(&env.config));
        config::root_containing(Path::new(p), &roots)
    });
    let facts = Facts {
        restore_path_inside,
        default_uri: env.default_uri.clone(),
    };
    let req = build::build(args, root, &facts)?;
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

/// The lines of a failure: the message, then one `  caused by:` line per source
/// that says something new. Engine errors carry their cause in the message already
/// (`Disk restore failed: <cause>`) and keep it as `source()` for callers that
/// match on it; repeating that text as `caused by: <same text>` tells the reader
/// nothing, so a source whose text is already shown is skipped.
pub fn report_lines(e: &AppError) -> Vec<String> {
    let mut shown = e.to_string();
    let mut lines = vec![shown.clone()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !shown.contains(&text) {
            lines.push(format!("  caused by: {text}"));
            shown.push('\n');
            shown.push_str(&text);
        }
        source = s.source();
    }
    lines
}

/// Prints a failure: a bare line for listing lookups, otherwise an ERROR log line
/// (plus the `caused by:` lines of [`report_lines`]) under the error's component.
pub fn report(e: &AppError) {
    if e.is_plain() {
        eprintln!("{e}");
        return;
    }
    for l in report_lines(e) {
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

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Cause(String, #[source] Option<Box<Cause>>);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let inner = "vda.inc.virtnbdbackup.2.data: frame header at byte 1049 is not a frame";
        let e = AppError::Engine {
            message: format!("Disk restore failed: {inner}"),
            source: Some(Box::new(Cause(
                inner.into(),
                Some(Box::new(Cause(
                    "No such file or directory (os error 2)".into(),
                    None,
                ))),
            ))),
        };
        assert_eq!(
            report_lines(&e),
            [
                format!("Disk restore failed: {inner}"),
                "  caused by: No such file or directory (os error 2)".to_owned()
            ]
        );
        let io = AppError::io("reading /x")(std::io::Error::other("disk on fire"));
        assert_eq!(
            report_lines(&io),
            ["reading /x", "  caused by: disk on fire"]
        );
    }
}
