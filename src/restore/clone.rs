//! Planner for a clone (spec §4.5): a new VM next to the original, with a new name,
//! UUID, MACs, disk files and NVRAM; the original is never modified.

use std::path::{Path, PathBuf};

use crate::domain::rewrite::Rewrite;
use crate::error::AppError;
use crate::restore::checks::{check_defined, check_outputs, check_space, warn_left_out, Preflight};
use crate::restore::dr::{config, disk_jobs, disk_rewrites, endpoint, rewritten};
use crate::restore::outputs::{predict_outputs, PredictedOutput};
use crate::restore::plan::{
    Action, Definition, Identity, NvramInstall, Report, RestorePlan, Summary, TpmUuid,
};
use crate::restore::point::warn_disk_set_change;
use crate::restore::tpm::tpm_action;
use crate::restore::Context;

/// The outputs renamed for `name`: `<name>.<ext>` for one disk, `<name>-<dev>.<ext>`
/// for several.
pub(super) fn renamed(outputs: &mut [PredictedOutput], name: &str, dir: &Path, ext: Option<&str>) {
    let single = outputs.len() == 1;
    for o in outputs.iter_mut() {
        let ext = ext.map(str::to_owned).unwrap_or_else(|| {
            Path::new(&o.file_name)
                .extension()
                .map_or_else(|| "qcow2".to_owned(), |e| e.to_string_lossy().into_owned())
        });
        o.file_name = if single {
            format!("{name}.{ext}")
        } else {
            format!("{name}-{}.{ext}", o.disk)
        };
        o.final_path = dir.join(&o.file_name);
    }
}

/// `<dir of the original NVRAM>/<name>_<suffix of the original>`.
pub(super) fn clone_nvram(original: &str, name: &str) -> PathBuf {
    let p = Path::new(original);
    let base = p
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix = base
        .rsplit_once('_')
        .map_or("VARS.fd".to_owned(), |(_, s)| s.to_owned());
    p.parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(format!("{name}_{suffix}"))
}

/// The disks, undefine, the NVRAM copy, the definition with a new identity.
fn clone_actions(
    ctx: &Context<'_>,
    t: u32,
    name: &str,
    defined: bool,
    cfg_path: PathBuf,
    cfg: &nbdfmt::DomainConfig,
    jobs: Vec<crate::restore::outputs::DiskJob>,
) -> Result<Vec<Action>, AppError> {
    crate::host::nvram::refuse_element_form(cfg, &cfg_path)?;
    let pick = cfg
        .nvram
        .as_deref()
        .and_then(|n| crate::host::nvram::pick(ctx.set, n, t));
    let nvram = match (&cfg.nvram, pick) {
        (Some(n), Some(pick)) => Some(NvramInstall {
            pick,
            dest: ctx.host_nvram(&clone_nvram(n, name), name),
            point: t,
            save_existing: true,
            required: true,
        }),
        (Some(_), None) => {
            ctx.log.warn("restore_nvram", "No per-checkpoint NVRAM in backup — the clone gets a fresh NVRAM from its firmware template");
            None
        }
        _ => None,
    };
    let xml = rewritten(
        &cfg_path,
        &Rewrite {
            name: Some(name.to_owned()),
            drop_uuid: true,
            drop_macs: true,
            disks: disk_rewrites(&jobs),
            nvram: nvram.as_ref().map(|n| n.dest.display().to_string()),
            ..Rewrite::default()
        },
    )?;
    let mut actions = vec![Action::WriteImages {
        jobs,
        replace: ctx.options.force,
    }];
    if defined {
        actions.extend(crate::restore::dr::save_tpm(ctx, name));
        actions.push(Action::Undefine(name.to_owned()));
    }
    let undo = nvram.as_ref().map(|n| n.dest.clone());
    actions.extend(nvram.map(Action::InstallNvram));
    actions.push(Action::Define(Definition {
        name: name.to_owned(),
        source: cfg_path,
        xml,
        identity: Identity::New,
        undo,
    }));
    Ok(actions)
}

/// Plans a clone called `name` in `dir`.
pub(super) fn plan_clone(
    ctx: &Context<'_>,
    dir: &Path,
    name: &str,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    let defined = check_defined(ctx, pf, name)?;
    ctx.log.info(
        "restore_vm",
        "Restore mode: clone (new identity — new UUID, new MACs)",
    );
    warn_disk_set_change(ctx.set, ctx.point, t, ctx.log);
    check_space(ctx, t, dir)?;
    let (cfg_path, cfg) = config(ctx, t, "clone")?;
    let mut outputs = predict_outputs(ctx.set, t, dir);
    renamed(&mut outputs, name, dir, None);
    check_outputs(ctx, pf, &outputs)?;
    warn_left_out(ctx, t, &outputs, Some(&cfg));
    let jobs = disk_jobs(ctx, t, &outputs)?;
    let mut actions = vec![Action::CreateDir(dir.to_path_buf())];
    actions.extend(clone_actions(ctx, t, name, defined, cfg_path, &cfg, jobs)?);
    actions.push(Action::RefreshPool(dir.to_path_buf()));
    let (tpm, tpm_result) = tpm_action(ctx, name, TpmUuid::New);
    actions.extend(tpm);
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "clone",
        point: ctx.point,
        checkpoint: t,
        report: Report {
            disks: outputs.iter().map(|o| o.disk.clone()).collect(),
            target_path: dir.display().to_string(),
            target_name: Some(name.to_owned()),
            tpm_result,
            summary: Summary::Clone,
        },
        actions,
        refusals: Vec::new(),
    })
}
