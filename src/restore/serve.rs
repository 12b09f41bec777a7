//! `--vm X --serve <listen>`: instant recovery. The restore point's disks are served
//! read-only over NBD straight from the backup files (compressed chains included)
//! until SIGINT/SIGTERM; nothing is written anywhere. Boot from the URIs with
//! qemu, `qemu-img convert` them, or attach them as a backing chain.

use std::path::PathBuf;

use engine::nbd::server::{Listen, ServeOptions, Server, TlsConfig, TlsFile};
use engine::DiskPlan;

use crate::cli::request::{DiskSelection, ServeTls};
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

/// The certificate and key of `--serve-tls-cert`/`--serve-tls-key`, loaded and
/// matched while planning: a bad file is a usage error (exit 7) naming it, before
/// anything listens (and in a dry run too).
fn load_tls(tls: Option<&ServeTls>) -> Result<Option<TlsConfig>, AppError> {
    let Some(t) = tls else { return Ok(None) };
    TlsConfig::from_pem_files(&t.cert, &t.key)
        .map(Some)
        .map_err(|e| {
            let flag = match e.file() {
                Some(TlsFile::Cert) => "--serve-tls-cert",
                Some(TlsFile::Key) => "--serve-tls-key",
                None => "--serve-tls-cert/--serve-tls-key",
            };
            AppError::Usage(format!("{flag}: {e}"))
        })
}

/// Loopback and Unix sockets by default: the server has no authentication, so any
/// other address exposes whole disks to every host that reaches it and needs
/// `--serve-public` (then a WARN says so; with TLS the disks are encrypted on the
/// wire, but any client that trusts the certificate, or does not check it, reads them).
fn check_exposure(
    ctx: &Context<'_>,
    typed: &str,
    listen: &Listen,
    public: bool,
    tls: bool,
) -> Result<(), AppError> {
    let Listen::Tcp(addr) = listen else {
        return Ok(());
    };
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !public {
        return Err(AppError::Usage(format!(
            "--serve {typed}: not a loopback address — the NBD server has no authentication, so every host that reaches {addr} could read the disks; add --serve-public to allow it, or serve on 127.0.0.1 / a Unix socket and tunnel (ssh -L)"
        )));
    }
    let msg = if tls {
        format!("Serving on {addr} over TLS: encrypted, but WITHOUT client authentication (no client certificates): every host that reaches this port can read the disks of {}", ctx.vm)
    } else {
        format!("Serving on {addr} WITHOUT authentication or encryption: every host that reaches this port can read the disks of {}", ctx.vm)
    };
    ctx.log.warn("serve", &msg);
    Ok(())
}

/// An NBD URI a client can use: a wildcard listen address (`0.0.0.0`, `[::]`) is
/// replaced by this host's name.
fn usable_uri(uri: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        return uri.to_owned();
    }
    // `nbd://` and `nbds://` alike: the host follows the first `//`
    uri.replacen("//0.0.0.0:", &format!("//{host}:"), 1)
        .replacen("//[::]:", &format!("//{host}:"), 1)
}

/// Plans serving the restore point (the disks of `disk_flag`, else all).
pub(super) fn plan_serve(
    ctx: &Context<'_>,
    listen: &str,
    disk_flag: Option<&DiskSelection>,
    public: bool,
    tls: Option<&ServeTls>,
) -> Result<RestorePlan, AppError> {
    let typed = listen;
    let listen = listen_from(listen)?;
    let tls = load_tls(tls)?;
    check_exposure(ctx, typed, &listen, public, tls.is_some())?;
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
            tls,
        })],
        refusals: Vec::new(),
    })
}

/// Serves until interrupted; returns the summary line.
pub(super) fn run(ctx: &Context<'_>, s: ServePlan) -> Result<String, AppError> {
    let tls = if s.tls.is_some() { " over TLS" } else { "" };
    let opts = ServeOptions {
        verify_checksums: true,
        tls: s.tls,
        ..ServeOptions::default()
    };
    let server =
        Server::bind(s.plans, &[s.listen], opts).map_err(|e| engine_error(e, "Cannot serve"))?;
    ctx.log.info(
        "serve",
        &format!(
            "Serving {} restore point {} read-only over NBD{tls} (Ctrl-C to stop)",
            ctx.vm, s.checkpoint
        ),
    );
    let mut out = String::new();
    for u in server.uris().iter().map(|u| usable_uri(u)) {
        ctx.log.info("serve", &format!("  {u}"));
        out.push_str(&u);
        out.push('\n');
    }
    crate::ui::write_stdout(&out);
    let stats = server
        .run(ctx.cancel.clone())
        .map_err(|e| engine_error(e, "NBD server failed"))?;
    ctx.log.info(
        "serve",
        &format!("Server stopped ({} connections)", stats.connections),
    );
    // serving ends by a signal: the exit status says which (130 SIGINT, 143 SIGTERM)
    if let Some(sig) = ctx.cancel.signal().filter(|s| *s > 0) {
        return Err(AppError::Interrupted(sig));
    }
    Ok(format!(
        "Server stopped ({} connections)",
        stats.connections
    ))
}
