//! The restore command (spec §4.1 preamble, then a [`crate::mode`] function): log
//! file and banner, data dir and VM name, lock, libvirt connection, the mode, the
//! summary, one catalogue row, unlock. Owns no policy of its own.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use engine::Cancel;
use nbdfmt::BackupSet;

use crate::app::{restore_header_fields, Env};
use crate::catalogue::{self, RestoreSession};
use crate::error::{AppError, ExitStatus};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, Offline};
use crate::lock::{self, Acquired};
use crate::log::{self, RunLog};
use crate::mode::{self, Job, Outcome, PointRequest, Reporter};
use crate::request::{DiskSelection, PointSelector, RestoreMode, RestoreRequest};
use crate::tree;

/// Sends mode output to the log-line subscriber under the mode's component names.
#[derive(Debug, Clone, Copy)]
pub struct TracingReporter;

macro_rules! emit {
    ($level:ident, $component:expr, $msg:expr, [$($c:literal),*]) => {
        match $component {
            $($c => tracing::$level!(target: $c, "{}", $msg),)*
            _ => tracing::$level!(target: "restore_vm", "{}", $msg),
        }
    };
}

macro_rules! components {
    ($level:ident, $component:expr, $msg:expr) => {
        emit!(
            $level,
            $component,
            $msg,
            [
                "restore_vm",
                "preflight_free_space",
                "preflight_disk_safety",
                "predict_output_files",
                "restore_disk",
                "define_vm",
                "define_new_identity",
                "restore_nvram",
                "restore_tpm",
                "refresh_storage_pool",
                "main"
            ]
        )
    };
}

impl Reporter for TracingReporter {
    fn info(&self, component: &str, msg: &str) {
        components!(info, component, msg);
    }
    fn warn(&self, component: &str, msg: &str) {
        components!(warn, component, msg);
    }
    fn error(&self, component: &str, msg: &str) {
        components!(error, component, msg);
    }
    fn plain(&self, line: &str) {
        crate::cmd::write_stdout(&format!("{line}\n"));
    }
}

fn utc_now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The period column of the catalogue: period dir, `accumulate`, or archive name.
fn period_id(data_dir: &Path, vm_label: &str) -> Option<String> {
    let name = data_dir.file_name()?.to_string_lossy().into_owned();
    if tree::is_archive(data_dir) || tree::is_period_name(&name) {
        Some(name)
    } else if name == vm_label {
        Some("accumulate".into())
    } else {
        Some(name)
    }
}

fn point_request(p: PointSelector) -> Result<PointRequest, AppError> {
    Ok(match p {
        PointSelector::Latest => PointRequest::Latest,
        PointSelector::Full => PointRequest::Full,
        PointSelector::Number(n) => PointRequest::Number(
            u32::try_from(n)
                .map_err(|_| AppError::Vm(format!("Restore point {n} does not exist")))?,
        ),
    })
}

/// Runs a validated restore request.
pub fn run(r: &RestoreRequest, env: &Env) -> Result<ExitStatus, AppError> {
    if r.mode == RestoreMode::Serve {
        return crate::cmd::serve::run(r, env);
    }
    let cancel = Cancel::new();
    if let Err(e) = crate::signal::install(cancel.clone()) {
        tracing::warn!(target: "main", "Cannot install signal handling: {e}");
    }
    RunLog::open(
        &log::log_dir(env.log_dir.as_deref()),
        &r.vm.label,
        &restore_header_fields(r),
    );
    tracing::info!(target: "main", "====== vmrestore v{} ======", env!("CARGO_PKG_VERSION"));
    let started = Instant::now();
    let start_time = utc_now();
    tracing::info!(target: "restore_vm", "Starting restore: {}", r.vm.label);
    let data_dir = tree::resolve_data_dir_logged(&r.root.path, &r.vm.label, r.period.as_deref())?;
    let vm = match tree::resolve_vm_name(&data_dir) {
        Some(n) if n != r.vm.label => {
            tracing::info!(target: "restore_vm", "Resolved VM name from backup config: {} → {n}", r.vm.label);
            n
        }
        Some(n) => n,
        None => r.vm.label.clone(),
    };
    let set = BackupSet::scan(&data_dir).map_err(|e| AppError::Io {
        context: format!("reading {}", data_dir.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    tracing::info!(target: "restore_vm", "Data dir: {} (type: {})", data_dir.display(), set.kind.as_str());
    let state_root = tree::state_root(&data_dir, r.vm.path_aware, &r.root.path);

    // From here on every exit writes one catalogue row (not in dry-run).
    let _lock = if r.dry_run {
        if let Some(pid) = lock::holder(&state_root, &vm) {
            tracing::warn!(target: "restore_vm", "[DRY RUN] VM '{vm}' is currently locked by PID {pid} — a real restore would exit 3");
        }
        None
    } else {
        match lock::acquire(&state_root, &vm) {
            Ok(Acquired::Held { lock, stale }) => {
                if let Some(pid) = stale {
                    tracing::warn!(target: "restore_vm", "Stale lock detected for VM: {vm} (PID: {pid}) - removing and proceeding");
                }
                Some(lock)
            }
            Ok(Acquired::Unavailable { path, reason }) => {
                tracing::warn!(target: "restore_vm", "Cannot create lock {} ({reason}) — continuing without lock", path.display());
                None
            }
            Err(held) => {
                let e = AppError::Lock(held.to_string());
                record(
                    r,
                    &vm,
                    &data_dir,
                    &state_root,
                    &start_time,
                    started,
                    None,
                    &Err(&e),
                );
                return Err(e);
            }
        }
    };
    let result = run_mode(r, &vm, &set, cancel.clone());
    let result = match (result, cancel.signal()) {
        (Err(_), Some(sig)) if sig > 0 => Err(AppError::Interrupted(sig)),
        (other, _) => other,
    };
    if !r.dry_run {
        record(
            r,
            &vm,
            &data_dir,
            &state_root,
            &start_time,
            started,
            result.as_ref().ok(),
            &result.as_ref().map(|_| ()),
        );
    }
    if r.json {
        json_summary(r, &vm, &data_dir, started, &result);
    }
    let outcome = result?;
    tracing::info!(target: "restore_vm", "{}", outcome.summary);
    tracing::info!(target: "main", "====== vmrestore completed ======");
    Ok(ExitStatus::Ok)
}

fn connect(r: &RestoreRequest) -> Result<Box<dyn Hypervisor>, AppError> {
    let needs_libvirt = matches!(
        r.mode,
        RestoreMode::Dr | RestoreMode::Clone | RestoreMode::DiskInPlace | RestoreMode::InstantBoot
    );
    let conn = if r.dry_run {
        Libvirt::connect_read_only(&r.uri)
    } else {
        Libvirt::connect(&r.uri)
    };
    match conn {
        Ok(c) => Ok(Box::new(c)),
        Err(e) if needs_libvirt => Err(AppError::Dependency(format!(
            "Missing dependency: cannot connect to libvirt at {}: {}",
            r.uri, e.message
        ))),
        Err(e) => {
            tracing::warn!(target: "restore_vm", "No libvirt connection ({}): live-disk collision checks are limited to existing files", e.message);
            Ok(Box::new(Offline { reason: e.message }))
        }
    }
}

fn run_mode(
    r: &RestoreRequest,
    vm: &str,
    set: &BackupSet,
    cancel: Cancel,
) -> Result<Outcome, AppError> {
    let hv = connect(r)?;
    let reporter = TracingReporter;
    let progress = if r.dry_run {
        None
    } else {
        crate::progress::for_restore(Arc::new(TracingReporter))
    };
    let job = Job {
        vm: vm.to_owned(),
        set,
        point: point_request(r.point)?,
        restore_path: r.restore_path.clone(),
        force: r.force,
        dry_run: r.dry_run,
        skip_tpm: r.skip_tpm,
        include_incomplete: r.include_incomplete,
        no_pre_restore: r.no_pre_restore,
        hv: hv.as_ref(),
        log: &reporter,
        cancel,
        progress,
        swtpm_root: crate::tpm::swtpm_root(),
    };
    let disks = || match &r.disks {
        Some(DiskSelection::List(d)) => d.clone(),
        _ => vec!["all".to_owned()],
    };
    match r.mode {
        RestoreMode::Dr => mode::run_dr(&job),
        RestoreMode::Clone => mode::run_clone(&job, r.clone_name.as_deref().unwrap_or_default()),
        RestoreMode::DataOnly => {
            if r.clone_name.is_some() {
                tracing::warn!(target: "restore_vm", "--name is ignored with --skip-config (data-only restore defines no VM)");
            }
            mode::run_data_only(&job)
        }
        RestoreMode::DiskInPlace => mode::run_disk_in_place(&job, &disks()),
        RestoreMode::DiskExtract => mode::run_disk_extract(&job, &disks()),
        RestoreMode::InstantBoot => {
            let name = r
                .clone_name
                .clone()
                .unwrap_or_else(|| mode::instant_default_name(vm));
            mode::run_instant(&job, &name, r.pull)
        }
        RestoreMode::Nbd => mode::run_nbd(&job, &r.nbd_targets, r.disks.as_ref()),
        RestoreMode::Serve => Err(AppError::Internal(
            "serve requests are dispatched to cmd::serve".into(),
        )),
    }
}

/// Writes the run's catalogue row; a missing or broken catalogue is one WARN.
#[allow(clippy::too_many_arguments)]
fn record(
    r: &RestoreRequest,
    vm: &str,
    data_dir: &Path,
    state_root: &Path,
    start_time: &str,
    started: Instant,
    outcome: Option<&Outcome>,
    result: &Result<(), &AppError>,
) {
    let exit = match result {
        Ok(()) => 0,
        Err(e) => e.exit_status().code(),
    };
    let row = RestoreSession {
        start_time: start_time.to_owned(),
        end_time: utc_now(),
        duration_sec: i64::try_from(started.elapsed().as_secs()).unwrap_or(i64::MAX),
        vm_name: vm.to_owned(),
        restore_mode: match r.mode {
            RestoreMode::DiskExtract => "disk-extract".into(),
            m => m.as_str().into(),
        },
        target_name: r
            .clone_name
            .clone()
            .filter(|_| matches!(r.mode, RestoreMode::Clone | RestoreMode::InstantBoot)),
        source_path: data_dir.display().to_string(),
        period_id: period_id(data_dir, &r.vm.label),
        restore_point: r.point.label(),
        checkpoint: outcome.map(|o| i64::from(o.checkpoint)),
        target_path: outcome
            .map(|o| o.target_path.clone())
            .or_else(|| r.restore_path.as_ref().map(|p| p.display().to_string())),
        disks: outcome
            .map(|o| o.disks.join(", "))
            .or_else(|| match &r.disks {
                Some(DiskSelection::List(d)) => Some(d.join(", ")),
                _ => None,
            }),
        forced: r.force,
        include_incomplete: r.include_incomplete,
        tpm_result: outcome
            .map(|o| o.tpm_result.to_owned())
            .filter(|t| !t.is_empty()),
        outcome: match result {
            Ok(()) if outcome.is_some_and(|o| o.partial) => "partial".into(),
            Ok(()) => "success".into(),
            Err(AppError::Interrupted(_)) => "interrupted".into(),
            Err(_) => "failed".into(),
        },
        exit_code: i64::from(exit),
        error_message: result.as_ref().err().map(ToString::to_string),
        log_file: log::current_path().map(|p| p.display().to_string()),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned()),
        invoked_by: std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::getuid())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            }),
    };
    if let Err(reason) = catalogue::record_restore(state_root, &row) {
        tracing::warn!(
            target: "restore_vm",
            "Catalogue unavailable ({}): this restore will not be recorded ({reason})",
            catalogue::db_path(state_root).display()
        );
    }
}

/// `--json`: one `vmrestore.restore/1` document on stdout (docs/json-output.md).
fn json_summary(
    r: &RestoreRequest,
    vm: &str,
    data_dir: &Path,
    started: Instant,
    result: &Result<Outcome, AppError>,
) {
    let (outcome, exit, error) = match result {
        Ok(o) if o.partial => ("partial", 0, None),
        Ok(_) => ("success", 0, None),
        Err(AppError::Interrupted(_)) => (
            "interrupted",
            result.as_ref().err().map_or(1, |e| e.exit_status().code()),
            result.as_ref().err().map(ToString::to_string),
        ),
        Err(e) => ("failed", e.exit_status().code(), Some(e.to_string())),
    };
    let o = result.as_ref().ok();
    let doc = serde_json::json!({
        "schema": "vmrestore.restore/1",
        "vm": vm,
        "mode": r.mode.as_str(),
        "dry_run": r.dry_run,
        "clone_name": r.clone_name,
        "source": data_dir.display().to_string(),
        "restore_point": r.point.label(),
        "checkpoint": o.map(|o| o.checkpoint),
        "disks": o.map(|o| o.disks.clone()),
        "target_path": o.map(|o| o.target_path.clone()),
        "tpm": o.map(|o| o.tpm_result),
        "summary": o.map(|o| o.summary.clone()),
        "outcome": if r.dry_run && o.is_some() { "dry-run" } else { outcome },
        "exit_code": exit,
        "error": error,
        "duration_sec": started.elapsed().as_secs_f64(),
        "log_file": log::current_path().map(|p| p.display().to_string()),
    });
    crate::cmd::write_stdout(&format!(
        "{}\n",
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    ));
}
