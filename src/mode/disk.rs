//! Disk restore (spec §4.7–4.9): replace disks of a shut-off VM in place, keeping a
//! `.pre-restore` rollback copy, or extract them to a directory.
//!
//! In place, the new image is written and verified under a temporary name beside the
//! original first; only then is the original renamed to `.pre-restore` and the new
//! image renamed into its place — the VM's disk path never holds a partial image.

use std::path::{Path, PathBuf};

use nbdfmt::SetKind;

use crate::error::AppError;
use crate::restore::{plan_outputs, predict_outputs, write_outputs, PredictedOutput};

use super::{apply_options, check_complete, endpoint, engine_error, iec, Job, Outcome};

/// Spec §4.7 steps 1–3: the requested disks, validated against the backup.
fn select_disks(job: &Job<'_>, requested: &[String], t: u32) -> Result<Vec<String>, AppError> {
    let set = job.set;
    let union: Vec<String> = set.disks.keys().cloned().collect();
    if union.is_empty() {
        return Err(AppError::Vm(format!(
            "No disks found in backup: {}",
            set.dir.display()
        )));
    }
    let at: Vec<String> = set
        .point(t)
        .map(|p| p.disks.iter().cloned().collect())
        .unwrap_or_default();
    let wanted: Vec<String> = if requested.len() == 1 && requested[0] == "all" {
        at.clone()
    } else {
        requested.to_vec()
    };
    for d in &wanted {
        if !union.contains(d) {
            return Err(super::disk_not_found(d, &union));
        }
        if set.kind == SetKind::Incremental && !at.contains(d) {
            let last = (0..t).rev().find(|n| set.file(d, *n).is_some());
            if job.point == super::PointRequest::Latest {
                job.log.error(
                    "restore_disk",
                    &format!(
                        "Disk '{d}' is not available at the latest restore point (checkpoint {t})."
                    ),
                );
            } else {
                job.log.error(
                    "restore_disk",
                    &format!(
                        "Disk '{d}' is not available at restore point {t} (disks: {}).",
                        at.join(", ")
                    ),
                );
            }
            if let Some(m) = last {
                job.log.error(
                    "restore_disk",
                    &format!("It was last backed up at checkpoint {m}."),
                );
                job.log.error(
                    "restore_disk",
                    &format!("Use --restore-point {m} to restore {d} from that checkpoint."),
                );
            }
            return Err(AppError::Vm(format!(
                "Disk '{d}' is not available at restore point {t}"
            )));
        }
    }
    job.log.info(
        "restore_disk",
        &format!(
            "Disk restore mode: replacing '{}' (available: {})",
            wanted.join(", "),
            union.join(", ")
        ),
    );
    Ok(wanted)
}

fn outputs_for(job: &Job<'_>, t: u32, disks: &[String], dir: &Path) -> Vec<PredictedOutput> {
    predict_outputs(job.set, t, dir)
        .into_iter()
        .filter(|o| disks.contains(&o.disk))
        .collect()
}

/// Disk extract (`--disk` + `--restore-path`, spec §4.9): the VM may run; outputs get
/// the original file names in the restore path.
pub fn run_disk_extract(job: &Job<'_>, requested: &[String]) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    let disks = select_disks(job, requested, t)?;
    super::warn_disk_set_change(job, t);
    let dir = job
        .restore_path
        .as_deref()
        .ok_or_else(|| AppError::Internal("extract without --restore-path".into()))?;
    job.log.info(
        "restore_disk",
        &format!("Extract mode: writing to {}", dir.display()),
    );
    super::check_space(job, t, dir)?;
    let outputs = outputs_for(job, t, &disks, dir);
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    // §4.9 [INFER]: the §4.2 collision rules, with their --force and dry-run handling
    super::vm::safety_checks(job, &finals, &job.vm)?;
    let mut out = Outcome {
        checkpoint: t,
        disks: disks.clone(),
        target_path: dir.display().to_string(),
        tpm_result: "skipped",
        ..Outcome::default()
    };
    if job.dry_run {
        super::log_dry_run_plan(job, t, &outputs)?;
        out.summary = format!(
            "Disk restore complete: {}/{} [DRY RUN — no changes made]",
            job.vm,
            disks.join(", ")
        );
        return Ok(out);
    }
    std::fs::create_dir_all(dir).map_err(|e| AppError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let jobs = plan_outputs(
        job.set,
        t,
        &outputs,
        job.point == super::PointRequest::Latest,
    )
    .map_err(|e| engine_error(e, "Disk restore failed"))?;
    write_outputs(jobs, job.force, &apply_options(job))
        .map_err(|e| engine_error(e, &format!("Disk restore failed for {}", disks.join(", "))))?;
    for o in &outputs {
        let size = std::fs::metadata(&o.final_path)
            .map(|m| m.len())
            .unwrap_or(0);
        job.log.info(
            "restore_disk",
            &format!(
                "  {}: integrity ✓ {} ({})",
                o.disk,
                o.final_path.display(),
                iec(size)
            ),
        );
    }
    out.summary = format!(
        "Disk extract complete: {}/{} → {}",
        job.vm,
        disks.join(", "),
        dir.display()
    );
    Ok(out)
}

/// Disk in place (spec §4.8): the VM must be defined and shut off.
pub fn run_disk_in_place(job: &Job<'_>, requested: &[String]) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    let disks = select_disks(job, requested, t)?;
    super::warn_disk_set_change(job, t);
    let vm = &job.vm;
    let Some(info) = job
        .hv
        .lookup(vm)
        .map_err(|e| AppError::Dependency(e.to_string()))?
    else {
        return Err(AppError::Vm(format!(
            "VM '{vm}' is not defined in libvirt — cannot determine original disk paths. Use --restore-path to extract disks to a specific location instead."
        )));
    };
    if info.state.is_active() {
        return Err(AppError::Vm(format!(
            "VM '{vm}' is {} — shut it down first (virsh shutdown {vm}). Replacing disks under a running VM will cause corruption.",
            info.state.as_str()
        )));
    }
    job.log
        .info("restore_disk", &format!("VM '{vm}' is shut off ✓"));
    let xml = job
        .hv
        .xml(vm, true)
        .map_err(|e| AppError::Vm(e.to_string()))?;
    let cfg = nbdfmt::DomainConfig::parse(&xml)
        .map_err(|e| AppError::Vm(format!("VM '{vm}' XML: {e}")))?;
    let mut targets: Vec<(String, PathBuf)> = Vec::new();
    for d in &disks {
        let Some(path) = cfg
            .disk(d)
            .filter(|x| x.is_disk())
            .and_then(|x| x.source.clone())
        else {
            return Err(AppError::Vm(format!(
                "Disk '{d}' not found in VM '{vm}' configuration. Available disks: {}",
                cfg.disk_targets().join(", ")
            )));
        };
        let p = PathBuf::from(path);
        if !p.exists() {
            return Err(AppError::Storage(format!(
                "Original disk path does not exist: {} — Use --restore-path to extract disks to a specific location instead.",
                p.display()
            )));
        }
        let pre = pre_restore(&p);
        if pre.exists() && !job.no_pre_restore {
            return Err(AppError::Storage(format!(
                "Pre-restore file already exists: {} — delete it first or use --no-pre-restore",
                pre.display()
            )));
        }
        job.log
            .info("restore_disk", &format!("  {d} → {}", p.display()));
        targets.push((d.clone(), p));
    }
    // Space: the new images are written beside the originals while those still exist.
    let data: u64 = disks
        .iter()
        .filter_map(|d| job.set.disks.get(d))
        .flatten()
        .map(|f| f.size)
        .sum();
    let originals: u64 = targets
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let keep = if job.no_pre_restore { 0 } else { originals };
    if let Some((free, _)) = targets
        .first()
        .and_then(|(_, p)| crate::preflight::free_space(p.parent().unwrap_or(Path::new("/"))))
    {
        if data + keep > free {
            return Err(AppError::Storage(format!(
                "Insufficient space: need {} (restore + .pre-restore) but only {} available",
                iec(data + keep),
                iec(free)
            )));
        }
        if keep > 0 {
            job.log.info(
                "restore_disk",
                &format!(
                    "Space check: {} restore + {} .pre-restore — {} available ✓",
                    iec(data),
                    iec(keep),
                    iec(free)
                ),
            );
        } else {
            job.log.info(
                "restore_disk",
                &format!(
                    "Space check: {} restore — {} available ✓",
                    iec(data),
                    iec(free)
                ),
            );
        }
    } else {
        job.log.warn(
            "restore_disk",
            "Cannot determine free space — skipping check",
        );
    }
    let mut out = Outcome {
        checkpoint: t,
        disks: disks.clone(),
        target_path: targets
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        tpm_result: "skipped",
        ..Outcome::default()
    };
    if job.dry_run {
        for (d, p) in &targets {
            job.log
                .info("restore_disk", &format!("[DRY RUN] Disk restore: {d}"));
            if job.no_pre_restore {
                job.log.info(
                    "restore_disk",
                    &format!(
                        "[DRY RUN] Would remove existing disk (--no-pre-restore): {}",
                        p.display()
                    ),
                );
            } else {
                job.log.info(
                    "restore_disk",
                    &format!(
                        "[DRY RUN] Would rename: {} → {}",
                        p.display(),
                        pre_restore(p).display()
                    ),
                );
            }
            job.log.info(
                "restore_disk",
                &format!("[DRY RUN] Would restore to: {}", p.display()),
            );
        }
        if job.point != super::PointRequest::Latest {
            job.log.info(
                "restore_disk",
                &format!("[DRY RUN] Point-in-time: restore point {t}"),
            );
        }
        out.summary = format!(
            "Disk restore complete: {vm}/{} [DRY RUN — no changes made]",
            disks.join(", ")
        );
        return Ok(out);
    }
    let total = targets.len();
    let mut done: Vec<String> = Vec::new();
    let mut kept: Vec<PathBuf> = Vec::new();
    for (i, (d, p)) in targets.iter().enumerate() {
        job.log.info(
            "restore_disk",
            &format!("── Restoring {d} [{}/{total}] ──", i + 1),
        );
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| d.clone());
        let o = PredictedOutput {
            disk: d.clone(),
            source: Some(p.display().to_string()),
            file_name: name,
            final_path: p.clone(),
        };
        let result = plan_outputs(
            job.set,
            t,
            std::slice::from_ref(&o),
            job.point == super::PointRequest::Latest,
        )
        .and_then(|jobs| swap_in(jobs, p, job))
        .map_err(|e| engine_error(e, &format!("Disk restore failed for {d}")));
        match result {
            Ok(pre) => {
                if let Some(pre) = pre {
                    job.log.info(
                        "restore_disk",
                        &format!("Backed up existing: {}", pre.display()),
                    );
                    kept.push(pre);
                } else {
                    job.log.warn(
                        "restore_disk",
                        &format!("Removed existing disk (--no-pre-restore): {}", p.display()),
                    );
                }
                let owner = crate::ownership::chown_to(p, &["libvirt-qemu"]);
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
                if !matches!(owner, Ok(Some(_))) {
                    job.log.warn(
                        "restore_disk",
                        &format!("Failed to set ownership on {}", p.display()),
                    );
                }
                job.log
                    .info("restore_disk", &format!("  {d}: ownership ✓ integrity ✓"));
                done.push(d.clone());
            }
            Err(e) => {
                job.log.error("restore_disk", &format!("{e}"));
                let mut e = e;
                if !done.is_empty() {
                    let partial =
                        format!("Partial restore: {} succeeded, {d} FAILED", done.join(", "));
                    job.log.error("restore_disk", &partial);
                    for s in targets.iter().skip(i + 1) {
                        job.log.error("restore_disk", &format!("Skipped: {}", s.0));
                    }
                    // §5.4: the catalogue's error_message carries the partial-restore text
                    e = match e {
                        AppError::Engine { message, source } => AppError::Engine {
                            message: format!("{partial} — {message}"),
                            source,
                        },
                        AppError::Storage(m) => AppError::Storage(format!("{partial} — {m}")),
                        other => other,
                    };
                }
                job.log
                    .error("restore_disk", &format!("Disk restore failed for {d}"));
                super::refresh_pool(job, targets[0].1.parent().unwrap_or(Path::new("/")));
                return Err(e);
            }
        }
    }
    super::refresh_pool(job, targets[0].1.parent().unwrap_or(Path::new("/")));
    banner(job, vm, &kept);
    out.summary = format!("Disk restore complete: {vm}/{} — all ✓", disks.join(", "));
    Ok(out)
}

fn pre_restore(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".pre-restore");
    PathBuf::from(s)
}

/// Writes the new image under a temporary name, then swaps it in: original →
/// `.pre-restore` (or deleted with `--no-pre-restore`), new → original name. A
/// failure before the swap leaves the original untouched.
fn swap_in(
    jobs: Vec<crate::restore::DiskJob>,
    p: &Path,
    job: &Job<'_>,
) -> engine::Result<Option<PathBuf>> {
    let staged = engine::StagedPath::new(p);
    let _ = std::fs::remove_file(staged.temp_path());
    crate::restore::warn_removed_stale(p);
    // write beside the original (same filesystem: the swap is two renames)
    let mut jobs = jobs;
    let tmp_final = staged.temp_path().with_extension("new");
    for j in &mut jobs {
        j.output.final_path = tmp_final.clone();
    }
    write_outputs(jobs, false, &apply_options(job))?;
    let pre = pre_restore(p);
    let kept = if job.no_pre_restore {
        std::fs::remove_file(p).map_err(|e| engine::Error::target("removing", p, e))?;
        None
    } else {
        std::fs::rename(p, &pre).map_err(|e| engine::Error::target("renaming", p, e))?;
        Some(pre.clone())
    };
    if let Err(e) = std::fs::rename(&tmp_final, p) {
        // put the original back; the new image stays under its temporary name for inspection
        if kept.is_some() {
            let _ = std::fs::rename(&pre, p);
        }
        return Err(engine::Error::target("renaming into", p, e));
    }
    Ok(kept)
}

fn banner(job: &Job<'_>, vm: &str, kept: &[PathBuf]) {
    let rule = "═".repeat(59);
    job.log.plain("");
    for l in [
        rule.clone(),
        format!("CHECKPOINT CHAIN INVALIDATED for '{vm}'"),
        rule.clone(),
        "Replaced disk(s) no longer match existing QEMU checkpoint bitmaps.".into(),
        "With ENABLE_AUTO_RECOVERY_ON_CHECKPOINT_CORRUPTION=\"yes\" (the default), the next".into(),
        "backup archives the old chain and starts a fresh FULL backup.".into(),
        "With \"warn\", the next backup fails until the stale checkpoints are removed:".into(),
        format!("  for cp in $(virsh checkpoint-list {vm} --name 2>/dev/null); do"),
        format!("    virsh checkpoint-delete {vm} $cp --metadata; done"),
        rule.clone(),
    ] {
        job.log.warn("restore_disk", &l);
    }
    if kept.is_empty() {
        return;
    }
    job.log.plain("");
    job.log.warn("restore_disk", &rule);
    job.log.warn(
        "restore_disk",
        "ACTION REQUIRED: Remove .pre-restore file(s) once VM is confirmed working",
    );
    let mut total = 0;
    for k in kept {
        let size = std::fs::metadata(k).map(|m| m.len()).unwrap_or(0);
        total += size;
        job.log.warn(
            "restore_disk",
            &format!("  rm {}  ({})", k.display(), iec(size)),
        );
    }
    if kept.len() > 1 {
        job.log
            .warn("restore_disk", &format!("  Total: {}", iec(total)));
    }
    job.log.warn("restore_disk", &rule);
}
