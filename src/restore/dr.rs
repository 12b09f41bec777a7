//! Planners for disaster recovery (spec §4.4: the VM comes back with its name, UUID
//! and MACs) and data-only restores (§4.6: the disks, no definition).

use std::path::{Path, PathBuf};

use nbdfmt::DomainConfig;

use crate::domain::rewrite::{rewrite, DiskRewrite, Rewrite};
use crate::error::AppError;
use crate::restore::checks::{check_defined, check_outputs, check_space, warn_left_out, Preflight};
use crate::restore::outputs::{plan_outputs, predict_outputs, target_config, DiskJob, ImageFormat};
use crate::restore::plan::{
    Action, Definition, Identity, NvramInstall, Report, RestorePlan, Summary, TpmUuid,
};
use crate::restore::point::{check_complete, warn_disk_set_change};
use crate::restore::tpm::tpm_action;
use crate::restore::Context;

/// Resolves the restore point and refuses an incomplete chain (every mode's start).
pub(super) fn endpoint(ctx: &Context<'_>) -> Result<u32, AppError> {
    let t = ctx.point.resolve(ctx.set, ctx.log)?;
    check_complete(
        ctx.set,
        ctx.point,
        t,
        ctx.options.include_incomplete,
        ctx.log,
    )?;
    Ok(t)
}

/// The engine plans of `outputs` (frame headers are read here); with
/// `--include-incomplete`, salvage plans (every file read, see `restore::salvage`).
pub(super) fn disk_jobs(
    ctx: &Context<'_>,
    t: u32,
    outputs: &[crate::restore::outputs::PredictedOutput],
) -> Result<Vec<DiskJob>, AppError> {
    if ctx.options.include_incomplete {
        return crate::restore::salvage::plan_outputs(ctx, t, outputs, ctx.options.force);
    }
    plan_outputs(ctx.set, t, outputs, !ctx.point.is_explicit())
        .map_err(|e| crate::error::engine_error(e, "Disk restore failed"))
}

/// Where each restored disk will be, for the domain XML.
pub(super) fn disk_rewrites(jobs: &[DiskJob]) -> Vec<DiskRewrite> {
    jobs.iter()
        .map(|j| DiskRewrite {
            target: j.output.disk.clone(),
            path: j.output.final_path.clone(),
            format: if j.format == ImageFormat::Raw {
                "raw".into()
            } else {
                "qcow2".into()
            },
        })
        .collect()
}

/// The backup's domain XML at `cfg_path`, rewritten.
pub(super) fn rewritten(cfg_path: &Path, rw: &Rewrite) -> Result<String, AppError> {
    let bytes = nbdfmt::small::read_small_file(cfg_path, nbdfmt::sidecar::MAX_SIDECAR_LEN)
        .map_err(AppError::io(format!("reading {}", cfg_path.display())))?;
    let xml = String::from_utf8(bytes)
        .map_err(|_| AppError::engine(format!("{}: not UTF-8", cfg_path.display())))?;
    rewrite(&xml, rw).map_err(|e| AppError::engine(format!("{}: {e}", cfg_path.display())))
}

/// The domain XML of restore point `t`, or the mode's error.
pub(super) fn config(
    ctx: &Context<'_>,
    t: u32,
    what: &str,
) -> Result<(PathBuf, DomainConfig), AppError> {
    target_config(ctx.set, t).ok_or_else(|| {
        AppError::Vm(format!(
            "No VM configuration XML found in backup — cannot define {what}"
        ))
    })
}

/// Disaster recovery: disks first (a failed restore leaves the existing VM defined
/// and untouched), then NVRAM, undefine, define, NVRAM copy, pool, TPM.
pub(super) fn plan_dr(
    ctx: &Context<'_>,
    dir: &Path,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    let defined = check_defined(ctx, pf, &ctx.vm)?;
    ctx.log.info(
        "restore_vm",
        "Restore mode: disaster recovery (original identity preserved)",
    );
    warn_disk_set_change(ctx.set, ctx.point, t, ctx.log);
    check_space(ctx, t, dir)?;
    let outputs = predict_outputs(ctx.set, t, dir);
    check_outputs(ctx, pf, &outputs)?;
    let (cfg_path, cfg) = config(ctx, t, "the VM")?;
    warn_left_out(ctx, t, &outputs, Some(&cfg));
    if cfg.macs.is_empty() {
        ctx.log.warn(
            "define_vm",
            "The domain has no network interface: there is no MAC address to preserve ('MACs ✓' below says nothing was changed)",
        );
    }
    if defined && ctx.options.force {
        refuse_running(ctx, pf)?;
    }
    let jobs = disk_jobs(ctx, t, &outputs)?;
    let mut actions = vec![Action::CreateDir(dir.to_path_buf())];
    actions.extend(dr_actions(ctx, t, defined, cfg_path, &cfg, jobs)?);
    actions.push(Action::RefreshPool(dir.to_path_buf()));
    let (tpm, tpm_result) = tpm_action(
        ctx,
        &ctx.vm,
        TpmUuid::Original {
            planned: cfg.uuid.clone(),
        },
    );
    actions.extend(tpm);
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "dr",
        point: ctx.point,
        checkpoint: t,
        report: Report {
            disks: outputs.iter().map(|o| o.disk.clone()).collect(),
            target_path: dir.display().to_string(),
            target_name: None,
            tpm_result,
            summary: Summary::Dr,
        },
        actions,
        refusals: Vec::new(),
    })
}

/// The disks, then NVRAM aside, undefine, define, the NVRAM copy.
fn dr_actions(
    ctx: &Context<'_>,
    t: u32,
    defined: bool,
    cfg_path: PathBuf,
    cfg: &DomainConfig,
    jobs: Vec<DiskJob>,
) -> Result<Vec<Action>, AppError> {
    crate::host::nvram::refuse_element_form(cfg, &cfg_path)?;
    // the test driver's NVRAM lives in its sandbox, and its domain says so
    let nvram = cfg
        .nvram
        .as_deref()
        .map(|n| ctx.host_nvram(Path::new(n), &ctx.vm));
    let xml = rewritten(
        &cfg_path,
        &Rewrite {
            name: Some(ctx.vm.clone()),
            disks: disk_rewrites(&jobs),
            // the test driver's sandbox, or a path the XML put outside libvirt's
            // NVRAM directory: the domain names the file actually installed
            nvram: nvram
                .as_ref()
                .filter(|n| cfg.nvram.as_deref().map(Path::new) != Some(n.as_path()))
                .map(|n| n.display().to_string()),
            ..Rewrite::default()
        },
    )?;
    let mut actions = vec![Action::WriteImages {
        jobs,
        replace: ctx.options.force,
    }];
    if let Some(n) = &nvram {
        actions.push(Action::SaveNvram(n.clone()));
    }
    if defined {
        actions.extend(save_tpm(ctx, &ctx.vm));
        actions.push(Action::Undefine(ctx.vm.clone()));
    }
    actions.push(Action::Define(Definition {
        name: ctx.vm.clone(),
        source: cfg_path,
        xml,
        identity: Identity::Original {
            uuid: cfg.uuid.clone(),
            macs: cfg.macs.clone(),
        },
        undo: None,
    }));
    let pick = cfg
        .nvram
        .as_deref()
        .and_then(|n| crate::host::nvram::pick(ctx.set, n, t));
    match (nvram, pick) {
        (Some(n), None) => ctx.log.warn(
            "restore_nvram",
            &format!("No per-checkpoint NVRAM in backup — using live host NVRAM {}; the guest may fail to boot if its Secure Boot/identity state has drifted", n.display()),
        ),
        (Some(n), Some(pick)) => actions.push(Action::InstallNvram(NvramInstall {
            pick,
            dest: n,
            point: t,
            save_existing: false,
            required: false,
        })),
        _ => {}
    }
    Ok(actions)
}

/// The TPM state of the defined domain `name`, when it has one: kept aside before
/// the domain is undefined (libvirt deletes it with the domain).
pub(super) fn save_tpm(ctx: &Context<'_>, name: &str) -> Option<Action> {
    let info = ctx.hv.lookup(name).ok().flatten()?;
    let dir = ctx.swtpm_root.join(&info.uuid);
    dir.is_dir().then_some(Action::SaveTpm(dir))
}

/// DR `--force` over a running VM is refused: its disks are in use.
fn refuse_running(ctx: &Context<'_>, pf: &mut Preflight) -> Result<(), AppError> {
    let Some(info) = ctx.hv.lookup(&ctx.vm).ok().flatten() else {
        return Ok(());
    };
    if !info.state.is_active() {
        return Ok(());
    }
    let msg = format!(
        "VM '{}' is {} — shut it down before a disaster-recovery restore (virsh shutdown {})",
        ctx.vm,
        info.state.as_str(),
        ctx.vm
    );
    pf.refuse(ctx, "restore_vm", AppError::Vm(msg.clone()), msg)
}

/// Data-only restore (`--skip-config`): the disks under their original names.
pub(super) fn plan_data_only(
    ctx: &Context<'_>,
    dir: &Path,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    ctx.log.info(
        "restore_vm",
        "Restore mode: data-only (--skip-config — disk restore without VM definition)",
    );
    warn_disk_set_change(ctx.set, ctx.point, t, ctx.log);
    check_space(ctx, t, dir)?;
    let outputs = predict_outputs(ctx.set, t, dir);
    check_outputs(ctx, pf, &outputs)?;
    warn_left_out(ctx, t, &outputs, None);
    let jobs = disk_jobs(ctx, t, &outputs)?;
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "data-only",
        point: ctx.point,
        checkpoint: t,
        report: Report {
            disks: outputs.iter().map(|o| o.disk.clone()).collect(),
            target_path: dir.display().to_string(),
            target_name: None,
            tpm_result: "skipped",
            summary: Summary::DataOnly,
        },
        actions: vec![
            Action::CreateDir(dir.to_path_buf()),
            Action::WriteImages {
                jobs,
                replace: ctx.options.force,
            },
            Action::RefreshPool(dir.to_path_buf()),
        ],
        refusals: Vec::new(),
    })
}
