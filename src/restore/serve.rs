//! `--vm X --serve <listen>`: instant recovery. The restore point's disks are served
//! read-only over NBD straight from the backup files (compressed chains included)
//! until SIGINT/SIGTERM; nothing is written anywhere. Boot from the URIs with
//! qemu, `qemu-img convert` them, or attach them as a backing chain.

use std::path::PathBuf;

use engine::nbd::server::{Listen, ServeOptions, Server};
use engine::DiskPlan;

use crate::cli::request::DiskSelection;
use crate::error::{engine_error, AppError};
use crate::restore::disk::disk_not_found;
use crate::restore::dr::endpoint;
use crate::restore::plan::steps::listen_label;
pub use crate::restore::plan::ServePlan;
use crate::restore::plan::{Action, Report, RestorePlan, Summary};
use crate::restore::point::disks_at;
use crate::restore::Context;

/// `host:port` → TCP; anything with a `/` → a Unix socket path.
pub fn listen_from(v: &str) -> Result<Listen, AppError> {
    if v.contains('/') {
        Ok(Listen::Unix(PathBuf::from(v)))
    } else {
        Listen::tcp(v).map_err(|e| AppError::Usage(format!("--serve {v}: {e}")))
    }
}

/// Plans serving the restore point (the disks of `disk_flag`, else all).
pub(super) fn plan_serve(
    ctx: &Context<'_>,
    listen: &str,
    disk_flag: Option<&DiskSelection>,
) -> Result<RestorePlan, AppError> {
    let listen = listen_from(listen)?;
    let t = endpoint(ctx)?;
    let mut disks = disks_at(ctx.set, t);
    if let Some(DiskSelection::List(want)) = disk_flag {
        if let Some(d) = want.iter().find(|d| !disks.contains(d)) {
            return Err(disk_not_found(d, &disks));
        }
        disks.retain(|d| want.contains(d));
    }
    let newest = !ctx.point.is_explicit();
    let plans = disks
        .iter()
        .map(|d| DiskPlan::for_point_with(ctx.set, d, t, newest))
        .collect::<engine::Result<Vec<_>>>()
        .map_err(|e| engine_error(e, "Cannot serve"))?;
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "serve",
        point: ctx.point,
        checkpoint: t,
        report: Report {
            disks: disks.clone(),
            target_path: listen_label(&listen),
            target_name: None,
            tpm_result: "skipped",
            summary: Summary::Serve,
        },
        actions: vec![Action::Serve(ServePlan {
            listen,
            disks,
            plans,
            checkpoint: t,
        })],
        refusals: Vec::new(),
    })
}

/// Serves until interrupted; returns the summary line.
pub(super) fn run(ctx: &Context<'_>, s: ServePlan) -> Result<String, AppError> {
    let opts = ServeOptions {
        verify_checksums: true,
        ..ServeOptions::default()
    };
    let server =
        Server::bind(s.plans, &[s.listen], opts).map_err(|e| engine_error(e, "Cannot serve"))?;
    ctx.log.info(
        "serve",
        &format!(
            "Serving {} restore point {} read-only over NBD (Ctrl-C to stop)",
            ctx.vm, s.checkpoint
        ),
    );
    let mut out = String::new();
    for u in server.uris() {
        ctx.log.info("serve", &format!("  {u}"));
        out.push_str(&u);
        out.push('\n');
    }
    crate::ui::write_stdout(&out);
    let stats = server
        .run(ctx.cancel.clone())
        .map_err(|e| engine_error(e, "NBD server failed"))?;
    Ok(format!(
        "Server stopped ({} connections)",
        stats.connections
    ))
}
