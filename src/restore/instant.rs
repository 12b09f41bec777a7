//! Instant boot (`--instant-boot`): the restore point's disks are served over NBD on
//! the loopback interface straight from the backup files, empty qcow2 overlays backed
//! by those exports are created in `--restore-path`, and a transient clone (new name,
//! UUID and MACs) is started on them. The guest boots in seconds; its reads of
//! untouched clusters come from the backup, its writes land in the overlays.
//!
//! It stays temporary unless made permanent: with `--pull` every disk is block-pulled
//! (libvirt copies the backing data into the overlay while the guest runs) and the
//! clone is then defined persistently. Without `--pull`, stopping vmrestore stops the
//! clone and removes its overlays — they cannot work without the server.
//!
//! The backup tree is only read; the VM's lock is held for the whole run, so vmbackup
//! cannot rotate the files that are being served.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engine::nbd::server::{Listen, ServeHandle, ServeOptions, Server};
use engine::target::overlay::{create_overlay, OverlaySpec};
use engine::DiskPlan;
use serde_json::{json, Value};

use crate::domain::rewrite::{DiskRewrite, Rewrite};
use crate::error::{engine_error, AppError};
use crate::restore::checks::{log_predictions, safety_checks, Preflight};
use crate::restore::clone::renamed;
use crate::restore::dr::{config, disk_jobs, endpoint, rewritten};
use crate::restore::outputs::{predict_outputs, PredictedOutput};
use crate::restore::plan::{Action, NvramInstall, Report, RestorePlan, Summary, TpmRestore, TpmUuid};
use crate::restore::point::warn_disk_set_change;
use crate::restore::Context;
use crate::ui::format::iec_size;

const COMPONENT: &str = "restore_vm";

/// The default name of the temporary clone.
pub fn default_name(vm: &str) -> String {
    format!("{vm}-instant")
}

/// A random RFC 4122 UUID from the kernel, so that the TPM state can be put in
/// place under the clone's UUID before the clone starts.
fn new_uuid() -> Result<String, AppError> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_owned())
        .map_err(|e| AppError::Io {
            context: "reading /proc/sys/kernel/random/uuid".into(),
            source: e,
        })
}

/// The host part of a libvirt URI (`qemu+ssh://host/system` → `host`), if any.
fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.split(':').next().unwrap_or_default();
    (!host.is_empty()).then_some(host)
}

/// A domain called `name` exists. If it is what an interrupted instant boot leaves
/// behind (transient, disks backed by NBD on the loopback interface, overlays inside
/// `dir`), `--force` plans to stop it and remove its overlays and NVRAM copy (the
/// files returned); otherwise the name is taken.
fn leftover(ctx: &Context<'_>, name: &str, dir: &Path) -> Result<Vec<PathBuf>, AppError> {
    let taken = || {
        AppError::Vm(format!(
            "VM '{name}' already exists — choose another --name for the instant-boot clone"
        ))
    };
    if ctx.hv.is_persistent(name).unwrap_or(true) {
        return Err(taken());
    }
    let Ok(xml) = ctx.hv.xml(name, false) else {
        return Err(taken());
    };
    let loopback_nbd = nbd_sources(&xml).iter().any(|(h, _)| h == "127.0.0.1");
    let Ok(cfg) = nbdfmt::DomainConfig::parse(&xml) else {
        return Err(taken());
    };
    let overlays: Vec<PathBuf> = cfg
        .disks
        .iter()
        .filter_map(|d| d.source.as_deref().map(PathBuf::from))
        .collect();
    if !loopback_nbd || overlays.is_empty() || !overlays.iter().all(|p| p.parent() == Some(dir)) {
        return Err(taken());
    }
    if !ctx.options.force {
        let list = overlays
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(AppError::Vm(format!(
            "VM '{name}' is left over from an interrupted instant boot (transient, disks {list} backed by NBD on 127.0.0.1) — rerun with --force to stop it and remove those overlays, or `virsh destroy {name}`"
        )));
    }
    let nvram = cfg.nvram.map(PathBuf::from).filter(|p| {
        p.file_name()
            .is_some_and(|f| *f == *format!("{name}_VARS.fd"))
    });
    Ok(overlays.into_iter().chain(nvram).collect())
}

/// Stops the leftover clone `name` and removes `files` (its overlays and NVRAM).
pub(super) fn clear_leftover(
    ctx: &Context<'_>,
    name: &str,
    files: &[PathBuf],
) -> Result<(), AppError> {
    ctx.log.warn(
        COMPONENT,
        &format!("Stopping the leftover instant-boot VM '{name}' (--force)"),
    );
    ctx.hv
        .destroy(name)
        .map_err(|e| AppError::Vm(format!("Cannot stop '{name}': {e}")))?;
    Created {
        overlays: files.to_vec(),
        nvram: None,
        tpm: None,
    }
    .remove(ctx);
    Ok(())
}

/// What was created, so that a failed or ended temporary boot removes exactly that.
#[derive(Debug, Default)]
struct Created {
    overlays: Vec<PathBuf>,
    nvram: Option<PathBuf>,
    tpm: Option<PathBuf>,
}

impl Created {
    fn remove(&self, ctx: &Context<'_>) {
        for p in self.overlays.iter().chain(self.nvram.iter()) {
            match std::fs::remove_file(p) {
                Ok(()) => ctx.log.info(COMPONENT, &format!("Removed {}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => ctx
                    .log
                    .warn(COMPONENT, &format!("Cannot remove {}: {e}", p.display())),
            }
        }
        if let Some(d) = &self.tpm {
            if std::fs::remove_dir_all(d).is_ok() {
                ctx.log
                    .info(COMPONENT, &format!("Removed TPM state {}", d.display()));
            }
        }
    }
}

/// The `(host, port)` of every NBD source in a live domain XML (its disks' backing
/// stores while they read from an export).
fn nbd_sources(xml: &str) -> Vec<(String, Option<u16>)> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    doc.descendants()
        .filter(|n| n.has_tag_name("source") && n.attribute("protocol") == Some("nbd"))
        .flat_map(|s| s.children().filter(|h| h.has_tag_name("host")))
        .map(|h| {
            (
                h.attribute("name").unwrap_or_default().to_owned(),
                h.attribute("port").and_then(|p| p.parse().ok()),
            )
        })
        .collect()
}

/// Whether any disk of the running clone still reads from our exports; `None` when
/// its live XML cannot be read (it is gone).
fn backed_by_us(ctx: &Context<'_>, name: &str, port: u16) -> Option<bool> {
    ctx.hv.xml(name, false).ok().map(|x| {
        nbd_sources(&x)
            .iter()
            .any(|(h, p)| h == "127.0.0.1" && *p == Some(port))
    })
}

/// How the serving loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Signal(i32),
    Gone,
    Independent,
    Pulled,
    PullFailed,
}

/// An instant boot, planned: the overlays, their exports, the clone's definition.
#[derive(Debug)]
pub struct InstantBoot {
    /// The transient clone's name.
    pub name: String,
    /// `--pull`: make it permanent.
    pub pull: bool,
    /// Where the overlays go.
    pub dir: PathBuf,
    /// The overlays (one per disk).
    pub overlays: Vec<PredictedOutput>,
    /// The engine plans served for them.
    pub plans: Vec<DiskPlan>,
    /// The clone's UUID (chosen here so the TPM state can be placed first).
    pub uuid: String,
    /// The backup's domain XML.
    pub source: PathBuf,
    /// The rewrite of the domain XML, without the disks (their URIs are known once
    /// the server listens).
    pub rewrite: Rewrite,
    /// The NVRAM copy for the clone.
    pub nvram: Option<NvramInstall>,
    /// The TPM state.
    pub tpm: Option<TpmRestore>,
}

impl InstantBoot {
    /// Dry-run lines.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .overlays
            .iter()
            .map(|o| {
                format!(
                    "Would serve {} over NBD on 127.0.0.1 and create overlay {}",
                    o.disk,
                    o.final_path.display()
                )
            })
            .collect();
        if let Some(n) = &self.nvram {
            v.push(format!(
                "Would copy NVRAM: {} → {}",
                n.pick.source.display(),
                n.dest.display()
            ));
        }
        v.push(format!(
            "Would start transient VM '{}' with new UUID and MACs",
            self.name
        ));
        if self.pull {
            v.push(format!(
                "Would block-pull every disk of '{}' and define it persistently",
                self.name
            ));
        }
        v
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name, "pull": self.pull, "uuid": self.uuid,
            "overlays": self.overlays.iter().map(|o| json!({"disk": o.disk, "path": o.final_path})).collect::<Vec<_>>(),
            "nvram": self.nvram.as_ref().map(|n| &n.dest),
        })
    }
}

/// Plans an instant boot of the restore point as `name`.
pub(super) fn plan_instant(
    ctx: &Context<'_>,
    dir: &Path,
    name: &str,
    pull: bool,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    ctx.log.info(
        COMPONENT,
        &format!(
            "Restore mode: instant boot (temporary clone '{name}' running from the backup over NBD{})",
            if pull { ", made permanent by block pull" } else { "" }
        ),
    );
    warn_disk_set_change(ctx.set, ctx.point, t, ctx.log);
    refuse_remote(ctx)?;
    let mut actions = Vec::new();
    if ctx.hv.lookup(name).map_err(|e| AppError::Dependency(format!("{e}")))?.is_some() {
        let files = leftover(ctx, name, dir)?;
        actions.push(Action::ClearLeftover {
            name: name.to_owned(),
            files,
        });
    }
    let (source, cfg) = config(ctx, t, "the instant-boot clone")?;
    let mut overlays = predict_outputs(ctx.set, t, dir);
    renamed(&mut overlays, name, dir, Some("qcow2"));
    log_predictions(ctx, &overlays);
    if overlays.is_empty() {
        return Err(AppError::Vm(format!(
            "Restore point {t} has no disk with backup data — nothing to boot"
        )));
    }
    let finals: Vec<PathBuf> = overlays.iter().map(|o| o.final_path.clone()).collect();
    safety_checks(ctx, pf, &finals, &ctx.vm)?;
    if let Some(p) = finals.iter().find(|p| p.symlink_metadata().is_ok()) {
        let msg = format!(
            "{} already exists — the overlays of an instant boot are new files (remove it or choose another --name)",
            p.display()
        );
        pf.refuse(ctx, COMPONENT, AppError::Storage(msg.clone()), msg)?;
    }
    let plans = disk_jobs(ctx, t, &overlays)?
        .into_iter()
        .map(|j| j.plan)
        .collect();
    let uuid = new_uuid()?;
    let nvram = instant_nvram(ctx, &cfg, name, t);
    let tpm = (!ctx.options.skip_tpm)
        .then(|| crate::host::tpm::detect(&ctx.set.dir))
        .flatten()
        .map(|material| TpmRestore {
            vm_label: name.to_owned(),
            data_dir: ctx.set.dir.clone(),
            material,
            uuid: TpmUuid::New,
            root: ctx.swtpm_root.clone(),
        });
    let rewrite = Rewrite {
        name: Some(name.to_owned()),
        drop_uuid: false,
        uuid: Some(uuid.clone()),
        drop_macs: true,
        disks: Vec::new(),
        nvram: nvram.as_ref().map(|n| n.dest.display().to_string()),
    };
    let report = Report {
        disks: overlays.iter().map(|o| o.disk.clone()).collect(),
        target_path: dir.display().to_string(),
        target_name: Some(name.to_owned()),
        tpm_result: "skipped",
        summary: Summary::InstantBoot,
    };
    actions.push(Action::InstantBoot(Box::new(InstantBoot {
        name: name.to_owned(),
        pull,
        dir: dir.to_path_buf(),
        overlays,
        plans,
        uuid,
        source,
        rewrite,
        nvram,
        tpm,
    })));
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "instant-boot",
        point: ctx.point,
        checkpoint: t,
        report,
        actions,
        refusals: Vec::new(),
    })
}

/// The exports listen on the loopback interface of this host: a remote hypervisor
/// could not reach them.
fn refuse_remote(ctx: &Context<'_>) -> Result<(), AppError> {
    match uri_host(ctx.hv.uri())
        .filter(|h| !matches!(*h, "localhost" | "127.0.0.1" | "::1" | "[::1]"))
    {
        Some(h) => Err(AppError::Usage(format!(
            "--instant-boot needs the hypervisor of this host (the NBD exports listen on 127.0.0.1); {} is on {h}",
            ctx.hv.uri()
        ))),
        None => Ok(()),
    }
}

/// The checkpoint's NVRAM copy under the clone's name, as a clone restore does.
fn instant_nvram(
    ctx: &Context<'_>,
    cfg: &nbdfmt::DomainConfig,
    name: &str,
    t: u32,
) -> Option<NvramInstall> {
    let n = cfg.nvram.as_deref()?;
    let pick = crate::host::nvram::pick(ctx.set, n, t)?;
    let dest = Path::new(n)
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(format!("{name}_VARS.fd"));
    Some(NvramInstall {
        pick,
        dest,
        point: t,
        save_existing: false,
        required: true,
    })
}

/// Runs a planned instant boot: serve, overlays, clone, then wait for the end.
/// Returns the summary line and the TPM result.
pub(super) fn run(ctx: &Context<'_>, mut ib: InstantBoot) -> Result<(String, &'static str), AppError> {
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
    let end = serve_until_done(ctx, &ib.name, ib.pull, port, &ib.overlays);
    let summary = ended(ctx, &ib, end, port, handle, &created)?;
    Ok((summary, tpm))
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
        let disks: Vec<String> = ib.overlays.iter().map(|o| o.final_path.display().to_string()).collect();
        ctx.log.info(
            COMPONENT,
            &format!("'{name}' no longer reads from the backup; its disks are {}", disks.join(", ")),
        );
        crate::restore::execute::refresh_pool(ctx, &ib.dir);
        return Ok(format!(
            "Restore complete: {} — instant boot ✓ pulled ✓ defined ✓ new identity ✓ (running as '{name}')",
            ctx.vm
        ));
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
                Ok(()) => ctx.log.info(COMPONENT, &format!("Stopped temporary VM '{name}'")),
                Err(e) => ctx.log.warn(COMPONENT, &format!("Cannot stop '{name}': {e}")),
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
    std::fs::create_dir_all(&ib.dir).map_err(AppError::io(format!("creating {}", ib.dir.display())))?;
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
    ctx.hv
        .create_transient(&xml)
        .map_err(|e| AppError::engine(format!("Cannot start the instant-boot clone '{}': {e}", ib.name)))?;
    ctx.log.info(
        "define_new_identity",
        &format!("Started transient VM '{}' (UUID {}) on the overlays", ib.name, ib.uuid),
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
            &format!("NVRAM for checkpoint {} not found in backup; using checkpoint {c}", n.point),
        );
    }
    crate::host::nvram::install(&n.pick.source, &n.dest).map_err(|e| AppError::Io {
        context: format!("installing NVRAM {}", n.dest.display()),
        source: e,
    })?;
    ctx.log.info(
        "restore_nvram",
        &format!("NVRAM copied: {} → {}", n.pick.source.display(), n.dest.display()),
    );
    Ok(())
}

/// The TPM state under the clone's UUID; recorded for removal when it was new.
fn boot_tpm(ctx: &Context<'_>, ib: &InstantBoot, created: &mut Created) -> &'static str {
    let Some(t) = &ib.tpm else {
        return if ctx.options.skip_tpm { "skipped" } else { "none" };
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
            return pulled(ctx, name, pull);
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
    if let Some(sig) = ctx.cancel.signal() {
        return Some(End::Signal(sig));
    }
    if ctx.cancel.is_cancelled() {
        return Some(End::Signal(0));
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
fn pulled(ctx: &Context<'_>, name: &str, pull: bool) -> End {
    if !pull {
        ctx.log.info(
            COMPONENT,
            &format!("The disks of '{name}' were pulled outside vmrestore; stopping the server"),
        );
        return End::Independent;
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

#[cfg(test)]
mod tests {
    use super::uri_host;

    #[test]
    fn nbd_sources_of_a_live_disk() {
        let xml = "<domain><devices><disk type='file'><source file='/o/a.qcow2'/>\
            <backingStore type='network'><format type='raw'/>\
            <source protocol='nbd' name='vda'><host name='127.0.0.1' port='40001'/></source>\
            </backingStore></disk></devices></domain>";
        assert_eq!(
            super::nbd_sources(xml),
            vec![("127.0.0.1".to_owned(), Some(40001))]
        );
        assert!(super::nbd_sources("<domain/>").is_empty());
    }

    #[test]
    fn remote_uris_have_a_host() {
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(uri_host("test:///default"), None);
        assert_eq!(uri_host("qemu+ssh://root@kvm2/system"), Some("kvm2"));
        assert_eq!(uri_host("qemu+tcp://kvm3:16509/system"), Some("kvm3"));
        assert_eq!(uri_host("qemu://localhost/system?x=1"), Some("localhost"));
        assert_eq!(uri_host(""), None);
    }
}
