//! DR, clone and data-only restores (spec §4.4–4.6, §4.10–4.12).

use std::path::{Path, PathBuf};

use crate::domxml::{rewrite, DiskRewrite, Rewrite};
use crate::error::AppError;
use crate::preflight::collisions;
use crate::restore::{
    plan_outputs, predict_outputs, target_config, write_outputs, ImageFormat, PredictedOutput,
};

use super::{
    apply_options, check_complete, check_space, endpoint, engine_error, epoch,
    warn_disk_set_change, Job, Outcome,
};

/// Spec §4.2: predicted outputs checked against every live disk. With `--force`
/// only overridable findings are allowed; in dry-run the run goes on with a WARN.
pub(super) fn safety_checks(
    job: &Job<'_>,
    finals: &[PathBuf],
    source_vm: &str,
) -> Result<(), AppError> {
    let dr = if job.dry_run { "[DRY RUN] " } else { "" };
    let live = match job.hv.live_disks() {
        Ok(l) => l,
        Err(e) => {
            job.log.warn(
                "preflight_disk_safety",
                &format!(
                    "Cannot list live disks ({e}) — collision check limited to existing files"
                ),
            );
            Vec::new()
        }
    };
    let state_of = |name: &str| job.hv.lookup(name).ok().flatten().map(|i| i.state);
    let found = collisions(finals, &live, source_vm, &state_of);
    let mut blocked = false;
    for c in &found {
        if c.blocks_even_with_force() || !job.force {
            job.log.error(
                "preflight_disk_safety",
                &format!("{dr}{}", c.blocked_message()),
            );
            blocked = true;
        } else {
            job.log.warn(
                "preflight_disk_safety",
                &format!("{dr}{}", c.forced_message()),
            );
        }
    }
    if blocked {
        if job.dry_run {
            job.log.warn(
                "preflight_disk_safety",
                "[DRY RUN] Would abort due to safety checks above",
            );
            return Ok(());
        }
        return Err(AppError::Storage(
            "Pre-flight disk safety check failed — see errors above".into(),
        ));
    }
    job.log.info(
        "preflight_disk_safety",
        &format!("{dr}All safety checks passed"),
    );
    Ok(())
}

pub(super) fn log_predictions(job: &Job<'_>, outputs: &[PredictedOutput]) {
    if outputs.is_empty() {
        job.log.warn(
            "predict_output_files",
            "Could not predict output files — skipping disk safety checks",
        );
    }
    for o in outputs {
        job.log.info(
            "predict_output_files",
            &format!(
                "Predicted final: {} (original file name: {})",
                o.final_path.display(),
                o.file_name
            ),
        );
    }
}

/// Spec §4.2 for DR and data-only: the outputs under their original names, logged
/// and checked against every live disk.
fn predict_and_check(job: &Job<'_>, t: u32, dir: &Path) -> Result<Vec<PredictedOutput>, AppError> {
    let outputs = predict_outputs(job.set, t, dir);
    log_predictions(job, &outputs);
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    safety_checks(job, &finals, &job.vm)?;
    Ok(outputs)
}

pub(super) fn restore_path<'a>(job: &'a Job<'_>) -> Result<&'a Path, AppError> {
    job.restore_path.as_deref().ok_or_else(|| AppError::Usage("--restore-path is required for restore (unless --disk is used for in-place replacement)".into()))
}

/// Writes the disks (engine), logging each result. `replace`: `--force` allowed
/// replacing existing final files.
fn write_disks(
    job: &Job<'_>,
    t: u32,
    outputs: &[PredictedOutput],
    replace: bool,
) -> Result<Vec<(String, PathBuf, ImageFormat)>, AppError> {
    let jobs = plan_outputs(
        job.set,
        t,
        outputs,
        job.point == super::PointRequest::Latest,
    )
    .map_err(|e| engine_error(e, "Disk restore failed"))?;
    let mut written = Vec::new();
    for j in &jobs {
        if j.default_options && j.format == ImageFormat::Qcow2 {
            job.log.warn("restore_disk", &format!("{}: no qcow.json at this restore point — creating the image with qemu's default options", j.output.disk));
        }
        job.log.info(
            "restore_disk",
            &format!(
                "{}: {} of data from {} file(s) → {}",
                j.output.disk,
                super::iec(j.plan.data_bytes()),
                j.plan.files.len(),
                j.output.final_path.display()
            ),
        );
        written.push((j.output.disk.clone(), j.output.final_path.clone(), j.format));
    }
    let (report, _) = write_outputs(jobs, replace, &apply_options(job))
        .map_err(|e| engine_error(e, "Disk restore failed"))?;
    for d in &report.disks {
        let bad = d.checksums.iter().filter(|(_, s)| s.is_some()).count();
        job.log.info(
            "restore_disk",
            &format!(
                "{}: {} written, {} zero skipped, {} checksum(s) verified, read-back {} ({:.1}s)",
                d.disk,
                super::iec(d.bytes_written),
                super::iec(d.bytes_zero_skipped),
                bad,
                if d.readback_verified {
                    "✓"
                } else {
                    "skipped"
                },
                d.duration.as_secs_f64()
            ),
        );
    }
    Ok(written)
}

/// Data-only restore (`--skip-config`, spec §4.6).
pub fn run_data_only(job: &Job<'_>) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    job.log.info(
        "restore_vm",
        "Restore mode: data-only (--skip-config — disk restore without VM definition)",
    );
    warn_disk_set_change(job, t);
    let dir = restore_path(job)?;
    check_space(job, t, dir)?;
    let outputs = predict_and_check(job, t, dir)?;
    let disks: Vec<String> = outputs.iter().map(|o| o.disk.clone()).collect();
    let mut out = Outcome {
        checkpoint: t,
        disks: disks.clone(),
        target_path: dir.display().to_string(),
        tpm_result: "skipped",
        ..Outcome::default()
    };
    if job.dry_run {
        super::log_dry_run_plan(job, t, &outputs)?;
        out.summary = format!("Restore complete: {} [DRY RUN — no changes made]", job.vm);
        return Ok(out);
    }
    std::fs::create_dir_all(dir).map_err(|e| AppError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    write_disks(job, t, &outputs, job.force)?;
    job.log
        .info("restore_vm", &format!("Disk restored to {}", dir.display()));
    super::refresh_pool(job, dir);
    if !job.skip_tpm {
        job.log.info(
            "restore_vm",
            "Skipping VM definition (--skip-config — data-only restore)",
        );
        job.log.info(
            "restore_vm",
            "Skipping TPM restore (--skip-config implies data-only)",
        );
    }
    out.summary = format!("Restore complete: {} — disk ✓ data-only", job.vm);
    Ok(out)
}

/// The TPM step (spec §4.11): returns the summary token and the catalogue value.
pub(super) fn restore_tpm(
    job: &Job<'_>,
    vm_label: &str,
    uuid: Option<&str>,
    fallback_uuid: Option<String>,
) -> (&'static str, &'static str) {
    if job.skip_tpm {
        return ("", "skipped");
    }
    let Some(material) = crate::tpm::detect(&job.set.dir) else {
        return ("", "none");
    };
    let failed = (" TPM ✗ (manual unlock required)", "failed");
    if material.state_dir.is_none() {
        job.log.warn(
            "restore_tpm",
            &format!(
                "Marker present but no tpm-state/ in {}",
                job.set.dir.display()
            ),
        );
        job.log
            .warn("restore_tpm", "TPM restore failed (non-fatal)");
        return failed;
    }
    let uuid = uuid
        .map(str::to_owned)
        .or_else(|| material.metadata_uuid.clone())
        .or(fallback_uuid);
    let Some(uuid) = uuid else {
        job.log
            .error("restore_tpm", "Cannot determine UUID for TPM restore");
        return failed;
    };
    let root = job.swtpm_root.clone();
    if job.dry_run {
        job.log.info(
            "restore_tpm",
            &format!(
                "[DRY RUN] Would restore TPM: {}/tpm-state → {}",
                job.set.dir.display(),
                root.join(&uuid).display()
            ),
        );
        return (" TPM ✓", "restored");
    }
    job.log.info(
        "restore_tpm",
        &format!("Restoring TPM for {vm_label} (UUID: {uuid})"),
    );
    match crate::tpm::restore(&material, &root, &uuid, epoch()) {
        Ok(r) => {
            if let Some(prev) = &r.saved_previous {
                job.log.warn(
                    "restore_tpm",
                    &format!("Backing up existing TPM to {}", prev.display()),
                );
            }
            if r.owner.is_none() {
                job.log.warn(
                    "restore_tpm",
                    "Neither user tss nor swtpm exists — TPM state left owned by root",
                );
            }
            job.log.info(
                "restore_tpm",
                &format!("TPM state restored: {}", r.target.display()),
            );
            (" TPM ✓", "restored")
        }
        Err(e) => {
            job.log.warn("restore_tpm", &format!("{e}"));
            job.log
                .warn("restore_tpm", "TPM restore failed (non-fatal)");
            failed
        }
    }
}

/// The existence check of DR step 1 / clone step 1. Returns whether `name` is defined.
fn check_defined(job: &Job<'_>, name: &str) -> Result<bool, AppError> {
    let defined = job
        .hv
        .lookup(name)
        .map_err(|e| AppError::Dependency(format!("{e}")))?
        .is_some();
    if defined && !job.force {
        if job.dry_run {
            job.log.warn(
                "restore_vm",
                &format!("[DRY RUN] VM '{name}' exists (would need --force)"),
            );
        } else {
            return Err(AppError::Vm(format!(
                "VM '{name}' already defined (use --force to override)"
            )));
        }
    } else if defined && job.dry_run {
        job.log.warn(
            "restore_vm",
            &format!("[DRY RUN] Would undefine existing VM: {name}"),
        );
    }
    Ok(defined)
}

fn disk_rewrites(written: &[(String, PathBuf, ImageFormat)]) -> Vec<DiskRewrite> {
    written
        .iter()
        .map(|(d, p, f)| DiskRewrite {
            target: d.clone(),
            path: p.clone(),
            format: if *f == ImageFormat::Raw {
                "raw".into()
            } else {
                "qcow2".into()
            },
        })
        .collect()
}

fn undefine_existing(job: &Job<'_>, name: &str) {
    job.log
        .warn("restore_vm", &format!("Undefining existing VM: {name}"));
    if job.hv.undefine(name).is_err() {
        job.log.warn(
            "restore_vm",
            &format!("Failed to undefine '{name}' — continuing anyway"),
        );
    }
}

/// Disaster recovery (spec §4.4): the VM comes back with its name, UUID and MACs.
pub fn run_dr(job: &Job<'_>) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    let defined = check_defined(job, &job.vm)?;
    job.log.info(
        "restore_vm",
        "Restore mode: disaster recovery (original identity preserved)",
    );
    warn_disk_set_change(job, t);
    let dir = restore_path(job)?;
    check_space(job, t, dir)?;
    let outputs = predict_and_check(job, t, dir)?;
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    let Some((cfg_path, cfg)) = target_config(job.set, t) else {
        return Err(AppError::Vm(
            "No VM configuration XML found in backup — cannot define the VM".into(),
        ));
    };
    if defined && job.force {
        if let Some(info) = job.hv.lookup(&job.vm).ok().flatten() {
            if info.state.is_active() {
                let msg = format!("VM '{}' is {} — shut it down before a disaster-recovery restore (virsh shutdown {})", job.vm, info.state.as_str(), job.vm);
                if job.dry_run {
                    job.log.warn("restore_vm", &format!("[DRY RUN] {msg}"));
                } else {
                    return Err(AppError::Vm(msg));
                }
            }
        }
    }
    let disks: Vec<String> = outputs.iter().map(|o| o.disk.clone()).collect();
    let mut out = Outcome {
        checkpoint: t,
        disks,
        target_path: dir.display().to_string(),
        ..Outcome::default()
    };
    let nvram_pick = cfg
        .nvram
        .as_deref()
        .and_then(|n| crate::nvram::pick(job.set, n, t).map(|p| (n.to_owned(), p)));
    if job.dry_run {
        job.log.info(
            "restore_vm",
            &format!(
                "[DRY RUN] Would restore {} disk(s) to {} and define '{}' from {}",
                outputs.len(),
                dir.display(),
                job.vm,
                cfg_path.display()
            ),
        );
        super::log_dry_run_plan(job, t, &outputs)?;
        for f in finals.iter().filter(|f| f.exists()) {
            job.log.info(
                "restore_vm",
                &format!("[DRY RUN] Would replace existing file: {}", f.display()),
            );
        }
        if let Some((dest, p)) = &nvram_pick {
            job.log.info(
                "restore_vm",
                &format!(
                    "[DRY RUN] Would restore NVRAM: {} → {dest}",
                    p.source.display()
                ),
            );
        }
        out.tpm_result = restore_tpm(job, &job.vm, None, cfg.uuid.clone()).1;
        out.summary = format!("Restore complete: {} [DRY RUN — no changes made]", job.vm);
        return Ok(out);
    }
    std::fs::create_dir_all(dir).map_err(|e| AppError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    // Disks first: a failed restore leaves the existing VM defined and untouched.
    let written = write_disks(job, t, &outputs, job.force)?;
    job.log
        .info("restore_vm", &format!("Disk restored to {}", dir.display()));
    let ts = epoch();
    if let Some(n) = &cfg.nvram {
        match crate::nvram::save_existing(Path::new(n), ts) {
            Ok(Some(aside)) => job.log.info(
                "restore_vm",
                &format!("Saved existing NVRAM: {n} → {}", aside.display()),
            ),
            Ok(None) => {}
            Err(e) => {
                return Err(AppError::Io {
                    context: format!("saving NVRAM {n}"),
                    source: e,
                })
            }
        }
    }
    if defined {
        undefine_existing(job, &job.vm);
    }
    let xml = std::fs::read_to_string(&cfg_path).map_err(|e| AppError::Io {
        context: format!("reading {}", cfg_path.display()),
        source: e,
    })?;
    let new_xml = rewrite(
        &xml,
        &Rewrite {
            name: Some(job.vm.clone()),
            disks: disk_rewrites(&written),
            ..Rewrite::default()
        },
    )
    .map_err(|e| AppError::Engine {
        message: format!("{}: {e}", cfg_path.display()),
        source: None,
    })?;
    job.log.info(
        "define_vm",
        &format!("Defining VM from backup config: {}", cfg_path.display()),
    );
    let info = job.hv.define(&new_xml).map_err(|e| {
        job.log.error("define_vm", "virsh define failed");
        AppError::Engine {
            message: format!("VM define failed: {e}"),
            source: None,
        }
    })?;
    let uuid_ok = cfg
        .uuid
        .as_deref()
        .is_none_or(|u| u.eq_ignore_ascii_case(&info.uuid));
    if uuid_ok {
        job.log
            .info("define_vm", &format!("UUID preserved: {}", info.uuid));
    } else {
        job.log.warn(
            "define_vm",
            "Failed to re-inject UUID (TPM may be misaligned)",
        );
    }
    for mac in &cfg.macs {
        job.log.info("define_vm", &format!("MAC preserved: {mac}"));
    }
    nvram_step(
        job,
        t,
        &cfg.nvram,
        nvram_pick.as_ref().map(|(_, p)| p),
        cfg.nvram.as_deref().map(Path::new),
    );
    super::refresh_pool(job, dir);
    let (tok, res) = restore_tpm(job, &job.vm, None, Some(info.uuid.clone()));
    out.tpm_result = res;
    out.partial = res == "failed" || !uuid_ok;
    out.summary = format!(
        "Restore complete: {} — disk ✓ defined ✓ UUID {} MACs ✓{tok}",
        job.vm,
        if uuid_ok { "✓" } else { "✗" }
    );
    Ok(out)
}

/// Spec §4.10: the NVRAM copy of checkpoint `t` is missing and an earlier one is used.
pub(super) fn log_nvram_fallback(job: &Job<'_>, pick: &crate::nvram::NvramPick, t: u32) {
    if let Some(c) = pick.checkpoint.filter(|c| *c != t) {
        job.log.info(
            "restore_nvram",
            &format!("NVRAM for checkpoint {t} not found in backup; using checkpoint {c}"),
        );
    }
}

fn nvram_step(
    job: &Job<'_>,
    t: u32,
    nvram: &Option<String>,
    pick: Option<&crate::nvram::NvramPick>,
    dest: Option<&Path>,
) {
    let (Some(n), Some(dest)) = (nvram, dest) else {
        return;
    };
    match pick {
        None => job.log.warn(
            "restore_nvram",
            &format!("No per-checkpoint NVRAM in backup — using live host NVRAM {n}; the guest may fail to boot if its Secure Boot/identity state has drifted"),
        ),
        Some(p) => {
            log_nvram_fallback(job, p, t);
            match crate::nvram::install(&p.source, dest) {
                Ok(()) => job.log.info("restore_nvram", &format!("NVRAM restored: {} → {}", p.source.display(), dest.display())),
                Err(e) => job.log.warn("restore_nvram", &format!("NVRAM restore failed: {e}")),
            }
        }
    }
}

/// Clone (spec §4.5): a new VM next to the original, with a new name, UUID, MACs,
/// disk files and NVRAM; the original is never modified.
pub fn run_clone(job: &Job<'_>, clone: &str) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    let defined = check_defined(job, clone)?;
    job.log.info(
        "restore_vm",
        "Restore mode: clone (new identity — new UUID, new MACs)",
    );
    warn_disk_set_change(job, t);
    let dir = restore_path(job)?;
    check_space(job, t, dir)?;
    let Some((cfg_path, cfg)) = target_config(job.set, t) else {
        return Err(AppError::Vm(
            "No VM configuration XML found in backup — cannot define clone".into(),
        ));
    };
    let mut outputs = predict_outputs(job.set, t, dir);
    let single = outputs.len() == 1;
    for o in &mut outputs {
        let ext = Path::new(&o.file_name)
            .extension()
            .map_or_else(|| "qcow2".to_owned(), |e| e.to_string_lossy().into_owned());
        o.file_name = if single {
            format!("{clone}.{ext}")
        } else {
            format!("{clone}-{}.{ext}", o.disk)
        };
        o.final_path = dir.join(&o.file_name);
    }
    log_predictions(job, &outputs);
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    safety_checks(job, &finals, &job.vm)?;
    let new_nvram = cfg.nvram.as_deref().map(|n| {
        let p = Path::new(n);
        let base = p
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        let suffix = base
            .rsplit_once('_')
            .map_or("VARS.fd".to_owned(), |(_, s)| s.to_owned());
        p.parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(format!("{clone}_{suffix}"))
    });
    let nvram_pick = cfg
        .nvram
        .as_deref()
        .and_then(|n| crate::nvram::pick(job.set, n, t));
    let disks: Vec<String> = outputs.iter().map(|o| o.disk.clone()).collect();
    let mut out = Outcome {
        checkpoint: t,
        disks,
        target_path: dir.display().to_string(),
        target_name: Some(clone.to_owned()),
        ..Outcome::default()
    };
    if job.dry_run {
        job.log.info(
            "restore_vm",
            &format!("[DRY RUN] Would define '{clone}' with new UUID and MACs"),
        );
        super::log_dry_run_plan(job, t, &outputs)?;
        if let (Some(p), Some(d)) = (&nvram_pick, &new_nvram) {
            job.log.info(
                "restore_vm",
                &format!(
                    "[DRY RUN] Would restore NVRAM: {} → {}",
                    p.source.display(),
                    d.display()
                ),
            );
        }
        if crate::tpm::detect(&job.set.dir).is_some() && !job.skip_tpm {
            job.log.info(
                "restore_tpm",
                &format!(
                    "[DRY RUN] Would restore TPM: {}/tpm-state → {}",
                    job.set.dir.display(),
                    job.swtpm_root.join("<new UUID>").display()
                ),
            );
        }
        out.summary = format!("Restore complete: {} [DRY RUN — no changes made]", job.vm);
        return Ok(out);
    }
    std::fs::create_dir_all(dir).map_err(|e| AppError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let written = write_disks(job, t, &outputs, job.force)?;
    if defined {
        undefine_existing(job, clone);
    }
    if let (Some(p), Some(dest)) = (&nvram_pick, &new_nvram) {
        log_nvram_fallback(job, p, t);
        if let Ok(Some(aside)) = crate::nvram::save_existing(dest, epoch()) {
            job.log.info(
                "restore_nvram",
                &format!(
                    "Saved existing NVRAM: {} → {}",
                    dest.display(),
                    aside.display()
                ),
            );
        }
        crate::nvram::install(&p.source, dest).map_err(|e| AppError::Io {
            context: format!("installing NVRAM {}", dest.display()),
            source: e,
        })?;
        job.log.info(
            "restore_nvram",
            &format!("NVRAM copied: {} → {}", p.source.display(), dest.display()),
        );
    } else if cfg.nvram.is_some() {
        job.log.warn("restore_nvram", "No per-checkpoint NVRAM in backup — the clone gets a fresh NVRAM from its firmware template");
    }
    let xml = std::fs::read_to_string(&cfg_path).map_err(|e| AppError::Io {
        context: format!("reading {}", cfg_path.display()),
        source: e,
    })?;
    let rw = Rewrite {
        name: Some(clone.to_owned()),
        drop_uuid: true,
        drop_macs: true,
        disks: disk_rewrites(&written),
        nvram: new_nvram
            .as_ref()
            .filter(|_| nvram_pick.is_some())
            .map(|p| p.display().to_string()),
        uuid: None,
    };
    let new_xml = rewrite(&xml, &rw).map_err(|e| AppError::Engine {
        message: format!("{}: {e}", cfg_path.display()),
        source: None,
    })?;
    let info = match job.hv.define(&new_xml) {
        Ok(i) => i,
        Err(e) => {
            if let (Some(d), Some(_)) = (&new_nvram, &nvram_pick) {
                let _ = std::fs::remove_file(d);
            }
            job.log
                .error("define_new_identity", &format!("virsh define failed: {e}"));
            return Err(AppError::Engine {
                message: format!("virsh define failed: {e}"),
                source: None,
            });
        }
    };
    job.log.info(
        "define_new_identity",
        &format!("Defined '{clone}' with new UUID: {}", info.uuid),
    );
    if let Ok(x) = job.hv.xml(clone, true) {
        if let Ok(c) = nbdfmt::DomainConfig::parse(&x) {
            for m in c.macs {
                job.log
                    .info("define_new_identity", &format!("New MAC: {m}"));
            }
        }
    }
    super::refresh_pool(job, dir);
    let (tok, res) = restore_tpm(job, clone, Some(&info.uuid), None);
    out.tpm_result = res;
    out.partial = res == "failed";
    out.summary = format!(
        "Restore complete: {} — disk ✓ defined ✓ new identity ✓{tok}",
        job.vm
    );
    Ok(out)
}
