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

use crate::domxml::{rewrite, DiskRewrite, Rewrite};
use crate::error::AppError;
use crate::restore::{plan_outputs, predict_outputs, target_config, PredictedOutput};

use super::vm::{log_nvram_fallback, log_predictions, restore_path, restore_tpm, safety_checks};
use super::{check_complete, endpoint, engine_error, warn_disk_set_change, Job, Outcome};

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
/// `dir`), `--force` stops it and removes its overlays and NVRAM copy; otherwise the
/// name is taken.
fn clear_leftover(job: &Job<'_>, name: &str, dir: &Path) -> Result<(), AppError> {
    let taken = || {
        AppError::Vm(format!(
            "VM '{name}' already exists — choose another --name for the instant-boot clone"
        ))
    };
    if job.hv.is_persistent(name).unwrap_or(true) {
        return Err(taken());
    }
    let Ok(xml) = job.hv.xml(name, false) else {
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
    let list = overlays
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if !job.force {
        return Err(AppError::Vm(format!(
            "VM '{name}' is left over from an interrupted instant boot (transient, disks {list} backed by NBD on 127.0.0.1) — rerun with --force to stop it and remove those overlays, or `virsh destroy {name}`"
        )));
    }
    if job.dry_run {
        job.log.warn(
            COMPONENT,
            &format!(
                "[DRY RUN] Would stop the leftover instant-boot VM '{name}' and remove {list}"
            ),
        );
        return Ok(());
    }
    job.log.warn(
        COMPONENT,
        &format!("Stopping the leftover instant-boot VM '{name}' (--force)"),
    );
    job.hv
        .destroy(name)
        .map_err(|e| AppError::Vm(format!("Cannot stop '{name}': {e}")))?;
    let nvram = cfg.nvram.map(PathBuf::from).filter(|p| {
        p.file_name()
            .is_some_and(|f| *f == *format!("{name}_VARS.fd"))
    });
    Created {
        overlays,
        nvram,
        tpm: None,
    }
    .remove(job);
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
    fn remove(&self, job: &Job<'_>) {
        for p in self.overlays.iter().chain(self.nvram.iter()) {
            match std::fs::remove_file(p) {
                Ok(()) => job.log.info(COMPONENT, &format!("Removed {}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => job
                    .log
                    .warn(COMPONENT, &format!("Cannot remove {}: {e}", p.display())),
            }
        }
        if let Some(d) = &self.tpm {
            if std::fs::remove_dir_all(d).is_ok() {
                job.log
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
fn backed_by_us(job: &Job<'_>, name: &str, port: u16) -> Option<bool> {
    job.hv.xml(name, false).ok().map(|x| {
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

/// Runs an instant boot of the restore point as `name`.
pub fn run_instant(job: &Job<'_>, name: &str, pull: bool) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    job.log.info(
        COMPONENT,
        &format!(
            "Restore mode: instant boot (temporary clone '{name}' running from the backup over NBD{})",
            if pull { ", made permanent by block pull" } else { "" }
        ),
    );
    warn_disk_set_change(job, t);
    // The exports listen on the loopback interface of this host: a remote hypervisor
    // could not reach them.
    if let Some(h) = uri_host(job.hv.uri())
        .filter(|h| !matches!(*h, "localhost" | "127.0.0.1" | "::1" | "[::1]"))
    {
        return Err(AppError::Usage(format!(
            "--instant-boot needs the hypervisor of this host (the NBD exports listen on 127.0.0.1); {} is on {h}",
            job.hv.uri()
        )));
    }
    let dir = restore_path(job)?;
    if job
        .hv
        .lookup(name)
        .map_err(|e| AppError::Dependency(format!("{e}")))?
        .is_some()
    {
        clear_leftover(job, name, dir)?;
    }
    let Some((cfg_path, cfg)) = target_config(job.set, t) else {
        return Err(AppError::Vm(
            "No VM configuration XML found in backup — cannot define the instant-boot clone".into(),
        ));
    };
    let mut outputs: Vec<PredictedOutput> = predict_outputs(job.set, t, dir);
    let single = outputs.len() == 1;
    for o in &mut outputs {
        o.file_name = if single {
            format!("{name}.qcow2")
        } else {
            format!("{name}-{}.qcow2", o.disk)
        };
        o.final_path = dir.join(&o.file_name);
    }
    log_predictions(job, &outputs);
    if outputs.is_empty() {
        return Err(AppError::Vm(format!(
            "Restore point {t} has no disk with backup data — nothing to boot"
        )));
    }
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    safety_checks(job, &finals, &job.vm)?;
    if let Some(p) = finals.iter().find(|p| p.symlink_metadata().is_ok()) {
        let msg = format!(
            "{} already exists — the overlays of an instant boot are new files (remove it or choose another --name)",
            p.display()
        );
        if !job.dry_run {
            return Err(AppError::Storage(msg));
        }
        job.log.warn(COMPONENT, &format!("[DRY RUN] {msg}"));
    }
    let disks: Vec<String> = outputs.iter().map(|o| o.disk.clone()).collect();
    let mut out = Outcome {
        checkpoint: t,
        disks,
        target_path: dir.display().to_string(),
        target_name: Some(name.to_owned()),
        tpm_result: "skipped",
        ..Outcome::default()
    };
    if job.dry_run {
        for o in &outputs {
            job.log.info(
                COMPONENT,
                &format!(
                    "[DRY RUN] Would serve {} over NBD on 127.0.0.1 and create overlay {}",
                    o.disk,
                    o.final_path.display()
                ),
            );
        }
        job.log.info(
            COMPONENT,
            &format!("[DRY RUN] Would start transient VM '{name}' with new UUID and MACs"),
        );
        out.summary = format!("Restore complete: {} [DRY RUN — no changes made]", job.vm);
        return Ok(out);
    }

    // Plans (headers only) and the server.
    let jobs = plan_outputs(
        job.set,
        t,
        &outputs,
        job.point == super::PointRequest::Latest,
    )
    .map_err(|e| engine_error(e, "Cannot plan the instant boot"))?;
    let sizes: Vec<u64> = jobs.iter().map(|j| j.plan.virtual_size).collect();
    let plans = jobs.into_iter().map(|j| j.plan).collect();
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
    job.log.info(
        COMPONENT,
        "Serving without checking .chksum first (that would read the whole chain); run --verify to check it",
    );
    for u in &uris {
        job.log.info(COMPONENT, &format!("NBD export: {u}"));
    }

    let mut created = Created::default();
    let result = boot(
        job,
        name,
        pull,
        t,
        dir,
        &cfg_path,
        &cfg,
        &outputs,
        &uris,
        &sizes,
        &mut created,
    );
    let tpm = match result {
        Ok(tpm) => tpm,
        Err(e) => {
            created.remove(job);
            let _ = handle.stop();
            return Err(e);
        }
    };
    out.tpm_result = tpm;
    out.partial = tpm == "failed";
    let end = serve_until_done(job, name, pull, port, &outputs);
    match end {
        End::Pulled | End::Independent => {
            stop(handle, job);
            job.log.info(
                COMPONENT,
                &format!(
                    "'{name}' no longer reads from the backup; its disks are {}",
                    finals
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            super::refresh_pool(job, dir);
            out.summary = format!(
                "Restore complete: {} — instant boot ✓ pulled ✓ defined ✓ new identity ✓ (running as '{name}')",
                job.vm
            );
            Ok(out)
        }
        End::Signal(_) | End::Gone | End::PullFailed => {
            if end == End::Gone {
                job.log.info(COMPONENT, &format!("'{name}' has stopped"));
            }
            // Ending by a signal is the normal end of a temporary boot; the clone
            // stopping or a failed pull is not when the user asked to keep it.
            let failed = pull && !matches!(end, End::Signal(_));
            let persistent = job.hv.is_persistent(name).unwrap_or(false);
            if persistent && backed_by_us(job, name, port) != Some(false) {
                job.log.warn(COMPONENT, &format!(
                    "'{name}' was defined persistently but its disks still read from this server; they will fail once it stops — pull them first (virsh blockpull {name} <dev> --wait)"
                ));
            } else if !persistent {
                if job.hv.lookup(name).ok().flatten().is_some() {
                    match job.hv.destroy(name) {
                        Ok(()) => job
                            .log
                            .info(COMPONENT, &format!("Stopped temporary VM '{name}'")),
                        Err(e) => job
                            .log
                            .warn(COMPONENT, &format!("Cannot stop '{name}': {e}")),
                    }
                }
                created.remove(job);
            }
            stop(handle, job);
            if failed {
                return Err(AppError::Vm(format!(
                    "Instant boot of {}: '{name}' ended before its disks were pulled — nothing was kept",
                    job.vm
                )));
            }
            out.summary = format!(
                "Instant boot ended: {} — temporary clone '{name}' stopped, overlays removed",
                job.vm
            );
            Ok(out)
        }
    }
}

fn stop(handle: ServeHandle, job: &Job<'_>) {
    match handle.stop() {
        Ok(s) => job.log.info(
            COMPONENT,
            &format!("NBD server stopped ({} connections)", s.connections),
        ),
        Err(e) => job
            .log
            .warn(COMPONENT, &format!("NBD server ended with an error: {e}")),
    }
}

/// Overlays, NVRAM, TPM, domain XML, start. Returns the TPM result; everything
/// created is recorded in `created` for the caller's cleanup.
#[allow(clippy::too_many_arguments)]
fn boot(
    job: &Job<'_>,
    name: &str,
    pull: bool,
    t: u32,
    dir: &Path,
    cfg_path: &Path,
    cfg: &nbdfmt::DomainConfig,
    outputs: &[PredictedOutput],
    uris: &[String],
    sizes: &[u64],
    created: &mut Created,
) -> Result<&'static str, AppError> {
    std::fs::create_dir_all(dir).map_err(|e| AppError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let mut rewrites = Vec::new();
    for ((o, uri), size) in outputs.iter().zip(uris).zip(sizes) {
        create_overlay(
            &o.final_path,
            &OverlaySpec {
                virtual_size: *size,
                backing: uri,
                backing_format: "raw",
            },
        )
        .map_err(|e| engine_error(e, "Cannot create the overlay"))?;
        created.overlays.push(o.final_path.clone());
        job.log.info(
            COMPONENT,
            &format!("{}: overlay {} → {uri}", o.disk, o.final_path.display()),
        );
        rewrites.push(DiskRewrite {
            target: o.disk.clone(),
            path: o.final_path.clone(),
            format: "qcow2".into(),
        });
    }
    let uuid = new_uuid()?;
    // NVRAM: the checkpoint's copy under the clone's name, as a clone restore does.
    let new_nvram = cfg.nvram.as_deref().map(|n| {
        let p = Path::new(n);
        p.parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(format!("{name}_VARS.fd"))
    });
    let pick = cfg
        .nvram
        .as_deref()
        .and_then(|n| crate::nvram::pick(job.set, n, t));
    if let (Some(p), Some(dest)) = (&pick, &new_nvram) {
        if dest.exists() {
            return Err(AppError::Storage(format!(
                "NVRAM file {} already exists — choose another --name",
                dest.display()
            )));
        }
        log_nvram_fallback(job, p, t);
        crate::nvram::install(&p.source, dest).map_err(|e| AppError::Io {
            context: format!("installing NVRAM {}", dest.display()),
            source: e,
        })?;
        created.nvram = Some(dest.clone());
        job.log.info(
            "restore_nvram",
            &format!("NVRAM copied: {} → {}", p.source.display(), dest.display()),
        );
    }
    let tpm_before = job.swtpm_root.join(&uuid).exists();
    let (_, tpm) = restore_tpm(job, name, Some(&uuid), None);
    if !tpm_before && job.swtpm_root.join(&uuid).exists() {
        created.tpm = Some(job.swtpm_root.join(&uuid));
    }
    let xml = std::fs::read_to_string(cfg_path).map_err(|e| AppError::Io {
        context: format!("reading {}", cfg_path.display()),
        source: e,
    })?;
    let rw = Rewrite {
        name: Some(name.to_owned()),
        drop_uuid: false,
        uuid: Some(uuid.clone()),
        drop_macs: true,
        disks: rewrites,
        nvram: new_nvram
            .as_ref()
            .filter(|_| pick.is_some())
            .map(|p| p.display().to_string()),
    };
    let new_xml = rewrite(&xml, &rw).map_err(|e| AppError::Engine {
        message: format!("{}: {e}", cfg_path.display()),
        source: None,
    })?;
    job.hv
        .create_transient(&new_xml)
        .map_err(|e| AppError::Engine {
            message: format!("Cannot start the instant-boot clone '{name}': {e}"),
            source: None,
        })?;
    job.log.info(
        "define_new_identity",
        &format!("Started transient VM '{name}' (UUID {uuid}) on the overlays"),
    );
    if pull {
        job.log.info(
            COMPONENT,
            "Block pull: one disk after the other (QEMU 7.2 can crash when several pulls end together); the clone is defined persistently when all are done",
        );
    } else {
        let devs: Vec<&str> = outputs.iter().map(|o| o.disk.as_str()).collect();
        job.log.info(COMPONENT, &format!(
            "'{name}' is temporary: Ctrl-C stops it and removes its overlays. To keep it, rerun with --pull, or run `virsh blockpull {name} <dev> --wait` for {} and then `virsh dumpxml {name} > {name}.xml && virsh define {name}.xml`",
            devs.join(", ")
        ));
    }
    Ok(tpm)
}

/// Serves until a signal, the clone's end, or (with `pull`) every pull finished.
fn serve_until_done(
    job: &Job<'_>,
    name: &str,
    pull: bool,
    port: u16,
    outputs: &[PredictedOutput],
) -> End {
    let mut last_report = Instant::now();
    // Pulls run one at a time: the index of the next disk to pull.
    let mut next_pull = if pull { 0 } else { outputs.len() };
    loop {
        if let Some(sig) = job.cancel.signal() {
            return End::Signal(sig);
        }
        if job.cancel.is_cancelled() {
            return End::Signal(0);
        }
        match job.hv.lookup(name) {
            Ok(None) => return End::Gone,
            Ok(Some(i)) if !i.state.is_active() => return End::Gone,
            _ => {}
        }
        let jobs: Vec<Option<(u64, u64)>> = outputs
            .iter()
            .map(|o| job.hv.block_job(name, &o.disk).ok().flatten())
            .collect();
        let running = jobs.iter().any(Option::is_some);
        if !running && next_pull < outputs.len() {
            let d = &outputs[next_pull].disk;
            if let Err(e) = job.hv.block_pull(name, d) {
                job.log.error(
                    COMPONENT,
                    &format!("Cannot start the block pull of {d}: {e}"),
                );
                return End::PullFailed;
            }
            job.log.info(COMPONENT, &format!("{d}: block pull started"));
            next_pull += 1;
            continue;
        }
        let backed = match backed_by_us(job, name, port) {
            Some(b) => b,
            None => return End::Gone,
        };
        if !running && !backed {
            if pull {
                match job.hv.xml(name, true).and_then(|x| job.hv.define(&x)) {
                    Ok(_) => {
                        job.log.info(
                            "define_new_identity",
                            &format!("Block pull complete; '{name}' is now defined persistently"),
                        );
                        return End::Pulled;
                    }
                    Err(e) => {
                        job.log.error(
                            "define_new_identity",
                            &format!("Block pull complete but defining '{name}' failed: {e} — run `virsh dumpxml {name} > {name}.xml && virsh define {name}.xml`"),
                        );
                        return End::Independent;
                    }
                }
            }
            job.log.info(
                COMPONENT,
                &format!(
                    "The disks of '{name}' were pulled outside vmrestore; stopping the server"
                ),
            );
            return End::Independent;
        }
        if running && last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            for (o, j) in outputs.iter().zip(&jobs) {
                if let Some((cur, end)) = j {
                    let pct = if *end == 0 { 0 } else { cur * 100 / end };
                    job.log.info(
                        COMPONENT,
                        &format!(
                            "{}: block pull {pct}% ({} of {})",
                            o.disk,
                            super::iec(*cur),
                            super::iec(*end)
                        ),
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
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
