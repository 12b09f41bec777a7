//! The running instant boot: the NBD server, the overlays, the transient clone, and
//! the wait for its end (Ctrl-C, the clone stopping, or every disk pulled).

use std::time::{Duration, Instant};

use engine::nbd::server::{Listen, ServeHandle, ServeOptions, Server};
use engine::target::overlay::{create_overlay, OverlaySpec};

use super::{backed_by_us, Created, End, COMPONENT};
use crate::domain::rewrite::DiskRewrite;
use crate::error::{engine_error, AppError};
use crate::restore::dr::rewritten;
use crate::restore::outputs::PredictedOutput;
use crate::restore::plan::InstantBoot;
use crate::restore::plan::NvramInstall;
use crate::restore::Context;
use crate::ui::format::iec_size;

/// How a run of an instant or test boot ended.
#[derive(Debug)]
pub(in crate::restore) struct Booted {
    /// The summary line.
    pub summary: String,
    /// The TPM result.
    pub tpm: &'static str,
    /// A test boot's result.
    pub test: Option<crate::restore::testboot::TestResult>,
}

/// Runs a planned instant boot: serve, overlays, clone, then wait for the end (or,
/// for a test boot, for a sign of life, and tear down).
pub(in crate::restore) fn run(ctx: &Context<'_>, mut ib: InstantBoot) -> Result<Booted, AppError> {
    let sizes: Vec<u64> = ib.plans.iter().map(|p| p.virtual_size).collect();
    let plans = std::mem::take(&mut ib.plans);
    let listen = Listen::tcp("127.0.0.1:0").map_err(|e| engine_error(e, "Cannot serve"))?;
    let server = Server::bind(plans, &[listen], ServeOptions::default())
        .map_err(|e| engine_error(e, "Cannot serve"))?;
    let port = server.tcp_addrs().first().map_or(0, |a| a.port());
    let uris = server.uris();
    // The server has its own stop: on Ctrl-C the clone is stopped first, then the
    // server, so the guest never sees its disks vanish under it.
    let handle = server
        .spawn(engine::Cancel::new())
        .map_err(|e| engine_error(e, "Cannot serve"))?;
    ctx.log.info(
        COMPONENT,
        "Serving without checking .chksum first (that would read the whole chain); run --verify to check it",
    );
    for u in &uris {
        ctx.log.info(COMPONENT, &format!("NBD export: {u}"));
    }
    let mut created = Created::default();
    let tpm = match boot(ctx, &ib, &uris, &sizes, &mut created) {
        Ok(tpm) => tpm,
        Err(e) => {
            created.remove(ctx);
            let _ = handle.stop();
            return Err(e);
        }
    };
    if let Some(spec) = &ib.test {
        let result = crate::restore::testboot::watch(ctx, &ib, spec);
        teardown(ctx, &ib.name, &created);
        stop(handle, ctx);
        crate::restore::testboot::finish(ctx, &ib, spec, &result);
        return Ok(Booted {
            summary: result.summary(&ctx.vm, &ib.name),
            tpm,
            test: Some(result),
        });
    }
    let end = serve_until_done(ctx, &ib.name, ib.pull, port, &ib.overlays);
    let summary = ended(ctx, &ib, end, port, handle, &created)?;
    Ok(Booted {
        summary,
        tpm,
        test: None,
    })
}

/// Stops the transient clone (if it still runs) and removes what was made for it.
fn teardown(ctx: &Context<'_>, name: &str, created: &Created) {
    if ctx.hv.lookup(name).ok().flatten().is_some() {
        match ctx.hv.destroy(name) {
            Ok(()) => ctx
                .log
                .info(COMPONENT, &format!("Stopped temporary VM '{name}'")),
            Err(e) => ctx
                .log
                .warn(COMPONENT, &format!("Cannot stop '{name}': {e}")),
        }
    }
    created.remove(ctx);
}

/// What happens when the serving loop ends: the summary line, or the error of a
/// clone that was to be kept and was not.
fn ended(
    ctx: &Context<'_>,
    ib: &InstantBoot,
    end: End,
    port: u16,
    handle: ServeHandle,
    created: &Created,
) -> Result<String, AppError> {
    let name = &ib.name;
    if matches!(end, End::Pulled | End::Independent) {
        stop(handle, ctx);
        let disks: Vec<String> = ib
            .overlays
            .iter()
            .map(|o| o.final_path.display().to_string())
            .collect();
        ctx.log.info(
            COMPONENT,
            &format!(
                "'{name}' no longer reads from the backup; its disks are {}",
                disks.join(", ")
            ),
        );
        crate::restore::pool::refresh_pool(ctx, &ib.dir);
        return match (end, ib.pull) {
            (End::Pulled, _) => Ok(format!(
                "Restore complete: {} — instant boot ✓ pulled ✓ defined ✓ new identity ✓ (running as '{name}')",
                ctx.vm
            )),
            (_, false) => Ok(format!(
                "Instant boot ended: {} — the disks of '{name}' were pulled outside vmrestore; it keeps running as a transient domain (virsh dumpxml {name} > {name}.xml && virsh define {name}.xml keeps it)",
                ctx.vm
            )),
            (_, true) => Err(AppError::Vm(format!(
                "Instant boot of {}: the disks of '{name}' were pulled, but it is NOT defined persistently (see above) — run `virsh dumpxml {name} > {name}.xml && virsh define {name}.xml` before it stops",
                ctx.vm
            ))),
        };
    }
    if end == End::Gone {
        ctx.log.info(COMPONENT, &format!("'{name}' has stopped"));
    }
    // Ending by a signal is the normal end of a temporary boot; the clone stopping
    // or a failed pull is not when the user asked to keep it.
    let failed = ib.pull && !matches!(end, End::Signal(_));
    let persistent = ctx.hv.is_persistent(name).unwrap_or(false);
    if persistent && backed_by_us(ctx, name, port) != Some(false) {
        ctx.log.warn(COMPONENT, &format!(
            "'{name}' was defined persistently but its disks still read from this server; they will fail once it stops — pull them first (virsh blockpull {name} <dev> --wait)"
        ));
    } else if !persistent {
        if ctx.hv.lookup(name).ok().flatten().is_some() {
            match ctx.hv.destroy(name) {
                Ok(()) => ctx
                    .log
                    .info(COMPONENT, &format!("Stopped temporary VM '{name}'")),
                Err(e) => ctx
                    .log
                    .warn(COMPONENT, &format!("Cannot stop '{name}': {e}")),
            }
        }
        created.remove(ctx);
    }
    stop(handle, ctx);
    if failed {
        return Err(AppError::Vm(format!(
            "Instant boot of {}: '{name}' ended before its disks were pulled — nothing was kept",
            ctx.vm
        )));
    }
    Ok(format!(
        "Instant boot ended: {} — temporary clone '{name}' stopped, overlays removed",
        ctx.vm
    ))
}

fn stop(handle: ServeHandle, ctx: &Context<'_>) {
    match handle.stop() {
        Ok(s) => ctx.log.info(
            COMPONENT,
            &format!("NBD server stopped ({} connections)", s.connections),
        ),
        Err(e) => ctx
            .log
            .warn(COMPONENT, &format!("NBD server ended with an error: {e}")),
    }
}

/// Overlays, NVRAM, TPM, domain XML, start. Returns the TPM result; everything
/// created is recorded in `created` for the caller's cleanup.
fn boot(
    ctx: &Context<'_>,
    ib: &InstantBoot,
    uris: &[String],
    sizes: &[u64],
    created: &mut Created,
) -> Result<&'static str, AppError> {
    std::fs::create_dir_all(&ib.dir)
        .map_err(AppError::io(format!("creating {}", ib.dir.display())))?;
    let mut rewrite = ib.rewrite.clone();
    for ((o, uri), size) in ib.overlays.iter().zip(uris).zip(sizes) {
        let spec = OverlaySpec {
            virtual_size: *size,
            backing: uri,
            backing_format: "raw",
        };
        create_overlay(&o.final_path, &spec)
            .map_err(|e| engine_error(e, "Cannot create the overlay"))?;
        created.overlays.push(o.final_path.clone());
        ctx.log.info(
            COMPONENT,
            &format!("{}: overlay {} → {uri}", o.disk, o.final_path.display()),
        );
        rewrite.disks.push(DiskRewrite {
            target: o.disk.clone(),
            path: o.final_path.clone(),
            format: "qcow2".into(),
        });
    }
    if let Some(n) = &ib.nvram {
        install_nvram(ctx, n)?;
        created.nvram = Some(n.dest.clone());
    }
    let tpm = boot_tpm(ctx, ib, created);
    let xml = rewritten(&ib.source, &rewrite)?;
    ctx.hv.create_transient(&xml).map_err(|e| {
        AppError::engine(format!(
            "Cannot start the instant-boot clone '{}': {e}",
            ib.name
        ))
    })?;
    ctx.log.info(
        "define_new_identity",
        &format!(
            "Started transient VM '{}' (UUID {}) on the overlays",
            ib.name, ib.uuid
        ),
    );
    log_next_steps(ctx, ib);
    Ok(tpm)
}

fn install_nvram(ctx: &Context<'_>, n: &NvramInstall) -> Result<(), AppError> {
    if n.dest.exists() {
        return Err(AppError::Storage(format!(
            "NVRAM file {} already exists — choose another --name",
            n.dest.display()
        )));
    }
    if let Some(c) = n.pick.checkpoint.filter(|c| *c != n.point) {
        ctx.log.info(
            "restore_nvram",
            &format!(
                "NVRAM for checkpoint {} not found in backup; using checkpoint {c}",
                n.point
            ),
        );
    }
    crate::host::nvram::install(&n.pick.source, &n.dest).map_err(|e| AppError::Io {
        context: format!("installing NVRAM {}", n.dest.display()),
        source: e,
    })?;
    ctx.log.info(
        "restore_nvram",
        &format!(
            "NVRAM copied: {} → {}",
            n.pick.source.display(),
            n.dest.display()
        ),
    );
    Ok(())
}

/// The TPM state under the clone's UUID; recorded for removal when it was new.
fn boot_tpm(ctx: &Context<'_>, ib: &InstantBoot, created: &mut Created) -> &'static str {
    let Some(t) = &ib.tpm else {
        return if ctx.options.skip_tpm {
            "skipped"
        } else {
            "none"
        };
    };
    let dir = t.root.join(&ib.uuid);
    let existed = dir.exists();
    let (_, result) = crate::restore::tpm::restore_tpm(ctx, t, Some(&ib.uuid));
    if !existed && dir.exists() {
        created.tpm = Some(dir);
    }
    result
}

fn log_next_steps(ctx: &Context<'_>, ib: &InstantBoot) {
    let name = &ib.name;
    if ib.test.is_some() {
        return;
    }
    if ib.pull {
        ctx.log.info(
            COMPONENT,
            "Block pull: one disk after the other (QEMU 7.2 can crash when several pulls end together); the clone is defined persistently when all are done",
        );
    } else {
        let devs: Vec<&str> = ib.overlays.iter().map(|o| o.disk.as_str()).collect();
        ctx.log.info(COMPONENT, &format!(
            "'{name}' is temporary: Ctrl-C stops it and removes its overlays. To keep it, rerun with --pull, or run `virsh blockpull {name} <dev> --wait` for {} and then `virsh dumpxml {name} > {name}.xml && virsh define {name}.xml`",
            devs.join(", ")
        ));
    }
}

/// Serves until a signal, the clone's end, or (with `pull`) every pull finished.
fn serve_until_done(
    ctx: &Context<'_>,
    name: &str,
    pull: bool,
    port: u16,
    outputs: &[PredictedOutput],
) -> End {
    let mut last_report = Instant::now();
    // Pulls run one at a time: the index of the next disk to pull.
    let mut next_pull = if pull { 0 } else { outputs.len() };
    loop {
        if let Some(end) = clone_ended(ctx, name) {
            return end;
        }
        let jobs: Vec<Option<(u64, u64)>> = outputs
            .iter()
            .map(|o| ctx.hv.block_job(name, &o.disk).ok().flatten())
            .collect();
        let running = jobs.iter().any(Option::is_some);
        if !running && next_pull < outputs.len() {
            if let Err(end) = start_pull(ctx, name, &outputs[next_pull].disk) {
                return end;
            }
            next_pull += 1;
            continue;
        }
        let Some(backed) = backed_by_us(ctx, name, port) else {
            return End::Gone;
        };
        if !running && !backed {
            return pulled(ctx, name, pull, outputs);
        }
        if running && last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            report_pulls(ctx, outputs, &jobs);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A signal, or the clone gone or shut off.
fn clone_ended(ctx: &Context<'_>, name: &str) -> Option<End> {
    // a cancel without a signal (Cancel::abort) reads as Some(-1): an end like Ctrl-C
    if let Some(sig) = ctx.cancel.signal() {
        return Some(End::Signal(sig));
    }
    match ctx.hv.lookup(name) {
        Ok(None) => Some(End::Gone),
        Ok(Some(i)) if !i.state.is_active() => Some(End::Gone),
        _ => None,
    }
}

fn start_pull(ctx: &Context<'_>, name: &str, d: &str) -> Result<(), End> {
    if let Err(e) = ctx.hv.block_pull(name, d) {
        ctx.log.error(
            COMPONENT,
            &format!("Cannot start the block pull of {d}: {e}"),
        );
        return Err(End::PullFailed);
    }
    ctx.log.info(COMPONENT, &format!("{d}: block pull started"));
    Ok(())
}

/// No disk reads from the server any more: define the clone (with `pull`), or it
/// was pulled by hand.
fn pulled(ctx: &Context<'_>, name: &str, pull: bool, outputs: &[PredictedOutput]) -> End {
    if !pull {
        ctx.log.info(
            COMPONENT,
            &format!("The disks of '{name}' were pulled outside vmrestore; stopping the server"),
        );
        return End::Independent;
    }
    if let Err(e) = make_durable(ctx, name, outputs) {
        // the clone runs and holds the data: keep it, and say what is not confirmed
        ctx.log.warn(COMPONENT, &format!("{e} — it reaches the disk when QEMU flushes (guest sync, shutdown); a host crash before that loses it"));
    }
    match ctx.hv.xml(name, true).and_then(|x| ctx.hv.define(&x)) {
        Ok(_) => {
            ctx.log.info(
                "define_new_identity",
                &format!("Block pull complete; '{name}' is now defined persistently"),
            );
            End::Pulled
        }
        Err(e) => {
            ctx.log.error(
                "define_new_identity",
                &format!("Block pull complete but defining '{name}' failed: {e} — run `virsh dumpxml {name} > {name}.xml && virsh define {name}.xml`"),
            );
            End::Independent
        }
    }
}

/// A finished pull lives in QEMU's caches until QEMU flushes: the overlay on disk
/// can still name its backing file and read as zeros (seen 20 s after the pull).
/// Each overlay is flushed through QEMU, then fsynced, before success is said, so
/// a host crash after the command returns loses nothing.
fn make_durable(ctx: &Context<'_>, name: &str, outputs: &[PredictedOutput]) -> Result<(), String> {
    for o in outputs {
        let p = &o.final_path;
        ctx.hv
            .flush_image(name, p)
            .map_err(|e| format!("{}: the pulled data is not confirmed on disk: {e}", o.disk))?;
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: syncing {}: {e}", o.disk, p.display()))?;
        ctx.log.info(
            COMPONENT,
            &format!(
                "{}: pulled data flushed and synced to {}",
                o.disk,
                p.display()
            ),
        );
    }
    Ok(())
}

fn report_pulls(ctx: &Context<'_>, outputs: &[PredictedOutput], jobs: &[Option<(u64, u64)>]) {
    for (o, j) in outputs.iter().zip(jobs) {
        if let Some((cur, end)) = j {
            let pct = (cur * 100).checked_div(*end).unwrap_or(0);
            ctx.log.info(
                COMPONENT,
                &format!(
                    "{}: block pull {pct}% ({} of {})",
                    o.disk,
                    iec_size(*cur),
                    iec_size(*end)
                ),
            );
        }
    }
}
