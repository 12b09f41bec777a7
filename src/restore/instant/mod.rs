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

use crate::domain::rewrite::Rewrite;
use crate::error::AppError;
use crate::restore::checks::{log_predictions, safety_checks, Preflight};
use crate::restore::clone::renamed;
use crate::restore::dr::{config, disk_jobs, endpoint};
use crate::restore::outputs::{predict_outputs, PredictedOutput};
use crate::restore::plan::{
    Action, InstantBoot, NvramInstall, Report, RestorePlan, Summary, TpmRestore, TpmUuid,
};
use crate::restore::point::warn_disk_set_change;
use crate::restore::Context;

mod run;

pub(super) use run::run;

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
pub(super) struct Created {
    pub(super) overlays: Vec<PathBuf>,
    pub(super) nvram: Option<PathBuf>,
    pub(super) tpm: Option<PathBuf>,
}

impl Created {
    pub(super) fn remove(&self, ctx: &Context<'_>) {
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
pub(super) fn backed_by_us(ctx: &Context<'_>, name: &str, port: u16) -> Option<bool> {
    ctx.hv.xml(name, false).ok().map(|x| {
        nbd_sources(&x)
            .iter()
            .any(|(h, p)| h == "127.0.0.1" && *p == Some(port))
    })
}

/// How the serving loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Signal(i32),
    Gone,
    Independent,
    Pulled,
    PullFailed,
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
    let mut actions = Vec::new();
    if ctx
        .hv
        .lookup(name)
        .map_err(|e| AppError::Dependency(format!("{e}")))?
        .is_some()
    {
        let files = leftover(ctx, name, dir)?;
        actions.push(Action::ClearLeftover {
            name: name.to_owned(),
            files,
        });
    }
    let (source, cfg) = config(ctx, t, "the instant-boot clone")?;
    crate::host::nvram::refuse_element_form(&cfg, &ctx.set.dir)?;
    let mut overlays = predict_outputs(ctx.set, t, dir);
    renamed(&mut overlays, name, dir, Some("qcow2"));
    log_predictions(ctx, &overlays);
    if overlays.is_empty() {
        return Err(AppError::Vm(format!(
            "Restore point {t} has no disk with backup data — nothing to boot"
        )));
    }
    check_overlays(ctx, pf, &overlays, actions.first())?;
    let jobs = disk_jobs(ctx, t, &overlays)?;
    crate::restore::salvage::refuse_damaged(&jobs, "an instant boot")?;
    let plans = jobs.into_iter().map(|j| j.plan).collect();
    let report = Report {
        disks: overlays.iter().map(|o| o.disk.clone()).collect(),
        target_path: dir.display().to_string(),
        target_name: Some(name.to_owned()),
        tpm_result: "skipped",
        summary: Summary::InstantBoot,
    };
    let boot = InstantBoot {
        name: name.to_owned(),
        pull,
        dir: dir.to_path_buf(),
        overlays,
        plans,
        uuid: new_uuid()?,
        source,
        rewrite: Rewrite::default(),
        nvram: instant_nvram(ctx, &cfg, name, t),
        tpm: None,
        test: None,
    };
    actions.push(Action::InstantBoot(Box::new(identity(ctx, boot))));
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

/// The overlays are new files nobody uses; a leftover clone this plan stops first
/// does not collide, nor do its files.
fn check_overlays(
    ctx: &Context<'_>,
    pf: &mut Preflight,
    overlays: &[PredictedOutput],
    first: Option<&Action>,
) -> Result<(), AppError> {
    let finals: Vec<PathBuf> = overlays.iter().map(|o| o.final_path.clone()).collect();
    // a leftover clone this plan stops first does not collide, nor do its files
    let (going, removed): (Vec<&str>, Vec<PathBuf>) = match first {
        Some(Action::ClearLeftover { name, files }) => (vec![name.as_str()], files.clone()),
        _ => (Vec::new(), Vec::new()),
    };
    safety_checks(ctx, pf, &finals, &ctx.vm, &going)?;
    if let Some(p) = finals
        .iter()
        .find(|p| p.symlink_metadata().is_ok() && !removed.contains(p))
    {
        let msg = format!(
            "{} already exists — the overlays of an instant boot are new files (remove it or choose another --name)",
            p.display()
        );
        pf.refuse(ctx, COMPONENT, AppError::Storage(msg.clone()), msg)?;
    }
    Ok(())
}

/// The clone's identity: new name and MACs, the UUID chosen here, the NVRAM copy,
/// and the TPM state under that UUID.
fn identity(ctx: &Context<'_>, mut boot: InstantBoot) -> InstantBoot {
    boot.tpm = (!ctx.options.skip_tpm)
        .then(|| crate::host::tpm::detect(&ctx.set.dir))
        .flatten()
        .map(|material| TpmRestore {
            vm_label: boot.name.clone(),
            data_dir: ctx.set.dir.clone(),
            material,
            uuid: TpmUuid::New,
            root: ctx.swtpm_root.clone(),
        });
    boot.rewrite = Rewrite {
        name: Some(boot.name.clone()),
        drop_uuid: false,
        uuid: Some(boot.uuid.clone()),
        drop_macs: true,
        disks: Vec::new(),
        nvram: boot.nvram.as_ref().map(|n| n.dest.display().to_string()),
        ..Rewrite::default()
    };
    boot
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
    let dest = ctx.host_nvram(
        &Path::new(n)
            .parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(format!("{name}_VARS.fd")),
        name,
    );
    Some(NvramInstall {
        pick,
        dest,
        point: t,
        save_existing: false,
        required: true,
    })
}

#[cfg(test)]
mod tests {

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
}
