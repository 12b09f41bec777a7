//! `--vm X --serve <listen>`: instant recovery. The restore point's disks are served
//! read-only over NBD straight from the backup files (compressed chains included)
//! until SIGINT/SIGTERM; nothing is written anywhere. Boot from the URIs with
//! qemu, `qemu-img convert` them, or attach them as a backing chain.

use std::path::PathBuf;

use engine::nbd::server::{Listen, ServeOptions, Server};
use engine::{Cancel, DiskPlan};
use nbdfmt::BackupSet;

use crate::app::{restore_header_fields, Env};
use crate::error::{AppError, ExitStatus};
use crate::hypervisor::Offline;
use crate::log::{self, RunLog};
use crate::mode::{self, Job, PointRequest};
use crate::request::{DiskSelection, PointSelector, RestoreRequest};
use crate::tree;

/// `host:port` → TCP; anything with a `/` → a Unix socket path.
pub fn listen_from(v: &str) -> Result<Listen, AppError> {
    if v.contains('/') {
        Ok(Listen::Unix(PathBuf::from(v)))
    } else {
        Listen::tcp(v).map_err(|e| AppError::Usage(format!("--serve {v}: {e}")))
    }
}

/// Serves a restore point until interrupted.
pub fn run(r: &RestoreRequest, env: &Env) -> Result<ExitStatus, AppError> {
    let listen = listen_from(r.serve.as_deref().unwrap_or_default())?;
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
    let data_dir = tree::resolve_data_dir_logged(&r.root.path, &r.vm.label, r.period.as_deref())?;
    let vm = tree::resolve_vm_name(&data_dir).unwrap_or_else(|| r.vm.label.clone());
    let set = BackupSet::scan(&data_dir).map_err(|e| AppError::Io {
        context: format!("reading {}", data_dir.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    tracing::info!(target: "serve", "Data dir: {} (type: {})", data_dir.display(), set.kind.as_str());
    let point = match r.point {
        PointSelector::Latest => PointRequest::Latest,
        PointSelector::Full => PointRequest::Full,
        PointSelector::Number(n) => PointRequest::Number(
            u32::try_from(n)
                .map_err(|_| AppError::Vm(format!("Restore point {n} does not exist")))?,
        ),
    };
    let offline = Offline {
        reason: "not needed for serving".into(),
    };
    let reporter = crate::cmd::restore::TracingReporter;
    let job = Job {
        vm: vm.clone(),
        set: &set,
        point,
        restore_path: None,
        force: false,
        dry_run: false,
        skip_tpm: true,
        include_incomplete: r.include_incomplete,
        no_pre_restore: false,
        hv: &offline,
        log: &reporter,
        cancel: cancel.clone(),
        progress: None,
        swtpm_root: PathBuf::new(),
    };
    let t = mode::endpoint(&job)?;
    mode::check_complete(&job, t)?;
    let mut disks = mode::disks_at(&set, t);
    if let Some(DiskSelection::List(want)) = &r.disks {
        if let Some(d) = want.iter().find(|d| !disks.contains(d)) {
            return Err(mode::disk_not_found(d, &disks));
        }
        disks.retain(|d| want.contains(d));
    }
    let newest = point == PointRequest::Latest;
    let plans = disks
        .iter()
        .map(|d| DiskPlan::for_point_with(&set, d, t, newest))
        .collect::<engine::Result<Vec<_>>>()
        .map_err(|e| mode::engine_error(e, "Cannot serve"))?;
    let opts = ServeOptions {
        verify_checksums: true,
        ..ServeOptions::default()
    };
    let server =
        Server::bind(plans, &[listen], opts).map_err(|e| mode::engine_error(e, "Cannot serve"))?;
    tracing::info!(target: "serve", "Serving {vm} restore point {t} read-only over NBD (Ctrl-C to stop)");
    let mut out = String::new();
    for u in server.uris() {
        tracing::info!(target: "serve", "  {u}");
        out.push_str(&u);
        out.push('\n');
    }
    crate::cmd::write_stdout(&out);
    let stats = server
        .run(cancel.clone())
        .map_err(|e| mode::engine_error(e, "NBD server failed"))?;
    tracing::info!(target: "serve", "Server stopped ({} connections)", stats.connections);
    tracing::info!(target: "main", "====== vmrestore completed ======");
    Ok(ExitStatus::Ok)
}
