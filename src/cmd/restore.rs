//! The restore command (spec §4.1 preamble): log file and banner, data dir and VM
//! name, lock, libvirt connection, then [`crate::restore::run`] (plan, then print
//! or execute), the summary, one catalogue row, unlock. Owns no policy of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use engine::Cancel;
use nbdfmt::BackupSet;

use crate::cli::request::{RestoreKind, RestoreRequest};
use crate::error::{AppError, ExitStatus};
use crate::host::catalogue::{self, RestoreSession};
use crate::host::env::Env;
use crate::host::lock::{self, Acquired, LockError, VmLock};
use crate::host::tree;
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, Offline};
use crate::restore::{Context, Outcome};
use crate::ui::header::restore_header_fields;
use crate::ui::log::{self, RunLog};
use crate::ui::report::{Reporter, TracingReporter};

fn utc_now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

/// A restore run: what the catalogue row and the JSON document need.
struct Session<'a> {
    r: &'a RestoreRequest,
    vm: String,
    data_dir: PathBuf,
    state_root: PathBuf,
    start_time: String,
    started: Instant,
}

/// One VM's finished restore (for a whole-host run's table).
#[derive(Debug)]
pub struct VmRun {
    /// The VM name.
    pub vm: String,
    /// How it ended.
    pub result: Result<Outcome, AppError>,
    /// How long it took.
    pub seconds: f64,
    /// The data directory restored from.
    pub source: PathBuf,
}

/// Runs a validated restore request.
pub fn run(r: &RestoreRequest, env: &Env) -> Result<ExitStatus, AppError> {
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
    let done = restore_vm(r, &cancel, &TracingReporter, true)?;
    let outcome = done.result?;
    // a salvage restore finished its writes but restored PARTIALLY: said as a WARN,
    // and its own exit status (6)
    if outcome.salvaged.is_empty() {
        tracing::info!(target: "restore_vm", "{}", outcome.summary);
    } else {
        tracing::warn!(target: "restore_vm", "{}", outcome.summary);
    }
    tracing::info!(target: "main", "====== vmrestore completed ======");
    Ok(outcome.exit_status())
}

/// One VM, inside an open run log: data dir, VM name, lock, plan → print or
/// execute, one catalogue row, the `--json` document. `Err` only for failures
/// before the VM's session starts (data dir, name); those write no row.
pub fn restore_vm(
    r: &RestoreRequest,
    cancel: &Cancel,
    log: &dyn Reporter,
    progress: bool,
) -> Result<VmRun, AppError> {
    let started = Instant::now();
    let start_time = utc_now();
    log.info("restore_vm", &format!("Starting restore: {}", r.vm.label));
    let data_dir = tree::resolve_data_dir_logged(&r.root.path, &r.vm.label, r.period.as_deref())?;
    refuse_restore_into_data(r, &data_dir)?;
    let vm = vm_name(r, &data_dir)?;
    let set = crate::host::tree::scan_set(&data_dir)?;
    log.info(
        "restore_vm",
        &format!(
            "Data dir: {} (type: {})",
            data_dir.display(),
            set.kind.as_str()
        ),
    );
    let s = Session {
        r,
        state_root: tree::state_root(&data_dir, r.vm.path_aware, &r.root.path),
        vm,
        data_dir,
        start_time,
        started,
    };
    // From here on every exit of a real restore writes one catalogue row.
    let _lock = take_lock(&s)?;
    let result = restore(&s, &set, cancel.clone(), log, progress);
    // a run whose actions all ran but whose purpose failed (a test boot without a
    // sign of life) is a failure with its evidence kept for the JSON document
    let extra = result.as_ref().ok().and_then(|o| o.extra.clone());
    let result = match result {
        Ok(o) => match &o.failure {
            Some(f) => {
                log.info("restore_vm", &o.summary);
                Err(AppError::Vm(f.clone()))
            }
            None => Ok(o),
        },
        Err(e) => Err(e),
    };
    let result = match (result, cancel.signal()) {
        (Err(_), Some(sig)) if sig > 0 => Err(AppError::Interrupted(sig)),
        (other, _) => other,
    };
    if records(r) {
        record(&s, &result);
    }
    if r.json {
        json_summary(&s, &result, extra);
    }
    Ok(VmRun {
        vm: s.vm.clone(),
        result,
        seconds: started.elapsed().as_secs_f64(),
        source: s.data_dir.clone(),
    })
}

/// The "restore path inside the backup root" check (§4.1) compares paths after
/// symlinks, but a VM directory of the root can itself be a symlink to storage
/// elsewhere: a restore path inside the *resolved* data dir would write into the
/// backup data all the same. Exit 7, as for the root.
fn refuse_restore_into_data(r: &RestoreRequest, data_dir: &Path) -> Result<(), AppError> {
    match r.kind.dir() {
        Some(dir) if crate::host::paths::is_inside(dir, data_dir) => Err(AppError::Usage(format!(
            "Restore path is inside the backup data {}: {} — choose a destination outside the backup storage",
            crate::host::paths::canonicalize_lenient(data_dir).display(),
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// The libvirt name from the backup's domain XML, else the label typed. The XML is
/// backup data, possibly crafted: a name that is not one safe path component (it
/// becomes the lock file, NVRAM and image names) is refused with exit 5.
fn vm_name(r: &RestoreRequest, data_dir: &Path) -> Result<String, AppError> {
    let Some((n, file)) = tree::vm_name_with_source(data_dir) else {
        return Ok(r.vm.label.clone());
    };
    if let Some(why) = crate::host::names::unsafe_component(&n) {
        return Err(AppError::Vm(format!(
            "{}: the domain <name> {} cannot be used as a VM name — it {why}",
            file.display(),
            crate::host::names::shown(&n)
        )));
    }
    if n != r.vm.label {
        tracing::info!(target: "restore_vm", "Resolved VM name from backup config: {} → {n}", r.vm.label);
    }
    Ok(n)
}

/// A real restore writes a catalogue row; a dry run and a read-only serve do not.
fn records(r: &RestoreRequest) -> bool {
    !r.options.dry_run && !matches!(r.kind, RestoreKind::Serve { .. })
}

/// Every real run holds the VM's lock, serving too: vmbackup must not rotate or
/// delete the files being served, and a restore must not run beside it.
fn locks(r: &RestoreRequest) -> bool {
    !r.options.dry_run
}

/// The per-VM lock (exit 3 when a live backup or restore holds it). A dry run only
/// says whether a real run would wait.
fn take_lock(s: &Session<'_>) -> Result<Option<VmLock>, AppError> {
    let vm = &s.vm;
    if !locks(s.r) {
        if let Some(pid) = lock::holder(&s.state_root, vm) {
            tracing::warn!(target: "restore_vm", "[DRY RUN] VM '{vm}' is currently locked by PID {pid} — a real restore would exit 3");
        }
        return Ok(None);
    }
    match lock::acquire(&s.state_root, vm) {
        Ok(Acquired::Held { lock, stale }) => {
            if let Some(pid) = stale {
                tracing::warn!(target: "restore_vm", "Stale lock detected for VM: {vm} (PID: {pid}) - removing and proceeding");
            }
            Ok(Some(lock))
        }
        Ok(Acquired::Unavailable { path, reason }) => {
            tracing::warn!(target: "restore_vm", "Cannot create lock {} ({reason}) — continuing without lock", path.display());
            Ok(None)
        }
        Err(e) => {
            // a name that is no single path component is the backup's fault (exit 5)
            let err = || match &e {
                LockError::Held(held) => AppError::Lock(held.to_string()),
                LockError::BadName(bad) => AppError::Vm(bad.to_string()),
            };
            if records(s.r) {
                record(s, &Err(err()));
            }
            Err(err())
        }
    }
}

/// The hypervisor: read-only for a dry run; offline (with a WARN) when a mode that
/// can do without libvirt cannot reach it; none at all for serving.
fn connect(r: &RestoreRequest) -> Result<Box<dyn Hypervisor>, AppError> {
    if matches!(r.kind, RestoreKind::Serve { .. }) {
        return Ok(Box::new(Offline {
            reason: "not needed for serving".into(),
        }));
    }
    let conn = if r.options.dry_run {
        Libvirt::connect_read_only(&r.uri)
    } else {
        Libvirt::connect(&r.uri)
    };
    match conn {
        Ok(c) => Ok(Box::new(c)),
        // a dry run plans what it can and says what it could not check (spec: a dry
        // run exits 0); the real run would stop here with exit 8
        Err(e) if r.kind.needs_libvirt() && r.options.dry_run => {
            tracing::warn!(target: "restore_vm", "[DRY RUN] No libvirt connection at {} ({}): a real run would exit 8; not checked: whether the VM is defined or running, other VMs' disks", r.uri, e.message);
            Ok(Box::new(Offline { reason: e.message }))
        }
        Err(e) if r.kind.needs_libvirt() => Err(AppError::Dependency(format!(
            "Missing dependency: cannot connect to libvirt at {}: {}",
            r.uri, e.message
        ))),
        Err(e) => {
            tracing::warn!(target: "restore_vm", "No libvirt connection ({}): live-disk collision checks are limited to existing files", e.message);
            Ok(Box::new(Offline { reason: e.message }))
        }
    }
}

fn restore(
    s: &Session<'_>,
    set: &BackupSet,
    cancel: Cancel,
    log: &dyn Reporter,
    progress: bool,
) -> Result<Outcome, AppError> {
    let r = s.r;
    crate::restore::refuse_remote(&r.uri, &r.kind)?;
    let hv = connect(r)?;
    let progress = if records(r) && progress {
        crate::ui::progress::for_restore(Arc::new(TracingReporter))
    } else {
        None
    };
    let sandbox = sandbox(r)?;
    let ctx = Context {
        vm: s.vm.clone(),
        set,
        point: r.point,
        options: r.options,
        hv: hv.as_ref(),
        log,
        cancel,
        progress,
        swtpm_root: sandbox
            .as_ref()
            .map_or_else(crate::host::tpm::swtpm_root, |s| s.join("swtpm")),
        nvram_dir: sandbox
            .as_ref()
            .map_or_else(crate::host::nvram::home, |s| s.join("nvram")),
        sandbox,
    };
    crate::restore::run(&ctx, &r.kind)
}

/// libvirt's test driver (`test:///…`) is local but runs no guest: NVRAM and swtpm
/// state go to `<restore path>/test-driver/`, not to the host's `/var/lib/libvirt`
/// (where a real VM of the same name keeps its own). The modes without a restore
/// path write no NVRAM, except a test boot (root's own state directory, never /tmp).
/// A sandbox (or its `nvram`/`swtpm`) that is already there as a symlink is refused
/// (exit 4): the files would land wherever it points.
fn sandbox(r: &RestoreRequest) -> Result<Option<PathBuf>, AppError> {
    let test_driver = r.uri.split_once("://").is_some_and(|(s, _)| s == "test");
    if !test_driver {
        return Ok(None);
    }
    let s = r
        .kind
        .dir()
        .map_or_else(|| PathBuf::from("/var/lib/vmrestore"), Path::to_path_buf)
        .join("test-driver");
    for p in [s.clone(), s.join("nvram"), s.join("swtpm")] {
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(AppError::Storage(format!(
                "{} is a symbolic link: the test driver's NVRAM and TPM state are kept in a real directory under the restore path",
                p.display()
            )));
        }
    }
    Ok(Some(s))
}

/// The period column of the catalogue: period dir, `accumulate`, or archive name.
fn period_id(data_dir: &Path, vm_label: &str) -> Option<String> {
    let name = data_dir.file_name()?.to_string_lossy().into_owned();
    if tree::is_archive(data_dir) || tree::is_period_name(&name) || name != vm_label {
        Some(name)
    } else {
        Some("accumulate".into())
    }
}

fn outcome_word(result: &Result<Outcome, AppError>) -> &'static str {
    match result {
        Ok(o) if o.partial => "partial",
        Ok(_) => "success",
        Err(AppError::Interrupted(_)) => "interrupted",
        Err(_) => "failed",
    }
}

fn exit_code(result: &Result<Outcome, AppError>) -> u8 {
    match result {
        Ok(o) => o.exit_status().code(),
        Err(e) => e.exit_status().code(),
    }
}

/// Writes the run's catalogue row; a missing or broken catalogue is one WARN.
fn record(s: &Session<'_>, result: &Result<Outcome, AppError>) {
    let row = session_row(s, result);
    if let Err(reason) = catalogue::record_restore(&s.state_root, &row) {
        tracing::warn!(
            target: "restore_vm",
            "Catalogue unavailable ({}): this restore will not be recorded ({reason})",
            catalogue::db_path(&s.state_root).display()
        );
    }
}

fn session_row(s: &Session<'_>, result: &Result<Outcome, AppError>) -> RestoreSession {
    let r = s.r;
    let o = result.as_ref().ok();
    RestoreSession {
        start_time: s.start_time.clone(),
        end_time: utc_now(),
        duration_sec: i64::try_from(s.started.elapsed().as_secs()).unwrap_or(i64::MAX),
        vm_name: s.vm.clone(),
        restore_mode: r.kind.catalogue_name().into(),
        target_name: match &r.kind {
            RestoreKind::Clone { name, .. } => Some(name.clone()),
            RestoreKind::InstantBoot { .. } => o.and_then(|o| o.target_name.clone()),
            _ => None,
        },
        source_path: s.data_dir.display().to_string(),
        period_id: period_id(&s.data_dir, &r.vm.label),
        restore_point: r.point.label(),
        checkpoint: o.map(|o| i64::from(o.checkpoint)),
        target_path: o
            .map(|o| o.target_path.clone())
            .or_else(|| r.kind.dir().map(|p| p.display().to_string())),
        disks: o
            .map(|o| o.disks.join(", "))
            .or_else(|| match r.kind.disks() {
                Some(crate::cli::request::DiskSelection::List(d)) => Some(d.join(", ")),
                _ => None,
            }),
        forced: r.options.force,
        include_incomplete: r.options.include_incomplete,
        tpm_result: o.map(|o| o.tpm_result.to_owned()).filter(|t| !t.is_empty()),
        outcome: outcome_word(result).into(),
        exit_code: i64::from(exit_code(result)),
        // a partial salvage is not an error, but what it lacks belongs to the row
        error_message: match result {
            Ok(o) if !o.salvaged.is_empty() => Some(o.summary.clone()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        },
        log_file: log::current_path().map(|p| p.display().to_string()),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned()),
        invoked_by: invoked_by(),
    }
}

fn invoked_by() -> Option<String> {
    std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
}

/// `--json`: one `vmrestore.restore/1` document on stdout (docs/json-output.md).
fn json_summary(
    s: &Session<'_>,
    result: &Result<Outcome, AppError>,
    extra: Option<serde_json::Value>,
) {
    let r = s.r;
    let o = result.as_ref().ok();
    let dry = r.options.dry_run && o.is_some();
    let doc = serde_json::json!({
        "schema": "vmrestore.restore/1",
        "vm": s.vm,
        "mode": r.kind.as_str(),
        "dry_run": r.options.dry_run,
        "clone_name": r.kind.typed_name(),
        "source": s.data_dir.display().to_string(),
        "restore_point": r.point.label(),
        "checkpoint": o.map(|o| o.checkpoint),
        "disks": o.map(|o| o.disks.clone()),
        "target_path": o.map(|o| o.target_path.clone()),
        "tpm": o.map(|o| o.tpm_result),
        "summary": o.map(|o| o.summary.clone()),
        "outcome": if dry { "dry-run" } else { outcome_word(result) },
        "exit_code": exit_code(result),
        "error": result.as_ref().err().map(ToString::to_string),
        "duration_sec": s.started.elapsed().as_secs_f64(),
        "log_file": log::current_path().map(|p| p.display().to_string()),
        "plan": o.and_then(|o| o.plan.clone()),
        "effects": o.filter(|_| !dry).map(|o| o.effects.clone()),
        "salvage": o.filter(|o| !o.salvaged.is_empty()).map(|o| o.salvaged.clone()),
        "warnings": log::warnings(),
        "test_boot": extra,
    });
    crate::ui::write_stdout(&format!(
        "{}\n",
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    ));
}
