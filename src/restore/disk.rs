//! Planners for disk restores (spec §4.7–4.9): replace disks of a shut-off VM in
//! place, keeping a `.pre-restore` rollback copy, or extract them to a directory.

use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, DomainConfig, SetKind};

use crate::cli::request::DiskSelection;
use crate::error::AppError;
use crate::restore::checks::{check_space, safety_checks, Preflight};
use crate::restore::dr::{disk_jobs, endpoint};
use crate::restore::outputs::{predict_outputs, ImageFormat, PredictedOutput};
use crate::restore::plan::{Action, InPlace, Report, RestorePlan, Summary};
use crate::restore::point::warn_disk_set_change;
use crate::restore::swap;
use crate::restore::Context;
use crate::ui::format::iec_size;

/// The error for a disk the backup does not have (spec wording).
pub fn disk_not_found(disk: &str, available: &[String]) -> AppError {
    AppError::Vm(format!(
        "Disk '{disk}' not found in backup. Available disks: {}",
        available.join(", ")
    ))
}

/// Spec §4.7 steps 1–3: the requested disks, validated against the backup.
fn select_disks(
    ctx: &Context<'_>,
    requested: &DiskSelection,
    t: u32,
    verb: &str,
) -> Result<Vec<String>, AppError> {
    let set = ctx.set;
    let union: Vec<String> = set.disks.keys().cloned().collect();
    if union.is_empty() {
        return Err(AppError::Vm(format!(
            "No disks found in backup: {}",
            set.dir.display()
        )));
    }
    let at: Vec<String> = set
        .point(t)
        .map(|p| {
            let mut at = p.disks.clone();
            if ctx.options.include_incomplete {
                // a salvage restores a disk whose file at `t` is missing or partial
                at.extend(p.expected.iter().cloned());
            }
            at.into_iter().collect()
        })
        .unwrap_or_default();
    let wanted = match requested {
        DiskSelection::All => at.clone(),
        DiskSelection::List(l) => l.clone(),
    };
    for d in &wanted {
        if !union.contains(d) {
            return Err(disk_not_found(d, &union));
        }
        if set.kind == SetKind::Incremental && !at.contains(d) {
            return Err(not_at_point(ctx, set, d, t, &at));
        }
    }
    ctx.log.info(
        "restore_disk",
        &format!(
            "Disk restore mode: {verb} '{}' (available: {})",
            wanted.join(", "),
            union.join(", ")
        ),
    );
    Ok(wanted)
}

/// A disk that exists in the backup but not at restore point `t`.
fn not_at_point(ctx: &Context<'_>, set: &BackupSet, d: &str, t: u32, at: &[String]) -> AppError {
    let last = (0..t).rev().find(|n| set.file(d, *n).is_some());
    let msg = if ctx.point.is_explicit() {
        format!(
            "Disk '{d}' is not available at restore point {t} (disks: {}).",
            at.join(", ")
        )
    } else {
        format!("Disk '{d}' is not available at the latest restore point (checkpoint {t}).")
    };
    ctx.log.error("restore_disk", &msg);
    if let Some(m) = last {
        ctx.log.error(
            "restore_disk",
            &format!("It was last backed up at checkpoint {m}."),
        );
        ctx.log.error(
            "restore_disk",
            &format!("Use --restore-point {m} to restore {d} from that checkpoint."),
        );
    }
    AppError::Vm(format!("Disk '{d}' is not available at restore point {t}"))
}

fn outputs_for(set: &BackupSet, t: u32, disks: &[String], dir: &Path) -> Vec<PredictedOutput> {
    predict_outputs(set, t, dir)
        .into_iter()
        .filter(|o| disks.contains(&o.disk))
        .collect()
}

/// Disk extract (`--disk` + `--restore-path`, spec §4.9): the VM may run; outputs get
/// the original file names in the restore path.
pub(super) fn plan_extract(
    ctx: &Context<'_>,
    dir: &Path,
    requested: &DiskSelection,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    let disks = select_disks(ctx, requested, t, "extracting")?;
    warn_disk_set_change(ctx.set, ctx.point, t, ctx.log);
    ctx.log.info(
        "restore_disk",
        &format!("Extract mode: writing to {}", dir.display()),
    );
    check_space(ctx, t, dir)?;
    let outputs = outputs_for(ctx.set, t, &disks, dir);
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    // §4.9 [INFER]: the §4.2 collision rules, with their --force and dry-run handling
    safety_checks(ctx, pf, &finals, &ctx.vm, &[])?;
    let jobs = disk_jobs(ctx, t, &outputs)?;
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "extract",
        point: ctx.point,
        checkpoint: t,
        report: Report {
            disks,
            target_path: dir.display().to_string(),
            target_name: None,
            tpm_result: "skipped",
            summary: Summary::DiskExtract,
        },
        actions: vec![
            Action::CreateDir(dir.to_path_buf()),
            Action::WriteImages {
                jobs,
                replace: ctx.options.force,
            },
        ],
        refusals: Vec::new(),
    })
}

/// Disk in place (spec §4.8): the VM must be defined and shut off.
pub(super) fn plan_in_place(
    ctx: &Context<'_>,
    requested: &DiskSelection,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    let disks = select_disks(ctx, requested, t, "replacing")?;
    warn_disk_set_change(ctx.set, ctx.point, t, ctx.log);
    let cfg = shut_off_config(ctx)?;
    let mut replaced = Vec::new();
    for d in &disks {
        replaced.push(in_place_target(ctx, pf, &cfg, d, t)?);
        ctx.log.info(
            "restore_disk",
            &format!("  {d} → {}", replaced[replaced.len() - 1].path.display()),
        );
    }
    check_in_place_space(ctx, &disks, &replaced)?;
    if ctx.point.is_explicit() {
        ctx.log.info(
            "restore_disk",
            &format!("{}Point-in-time: restore point {t}", pf.prefix()),
        );
    }
    let dir = replaced
        .first()
        .and_then(|r| r.path.parent())
        .map(Path::to_path_buf);
    let report = Report {
        disks,
        target_path: replaced
            .iter()
            .map(|r| r.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        target_name: None,
        tpm_result: "skipped",
        summary: Summary::DiskInPlace,
    };
    let mut actions: Vec<Action> = replaced.into_iter().map(Action::ReplaceDisk).collect();
    actions.extend(dir.map(Action::RefreshPool));
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "disk",
        point: ctx.point,
        checkpoint: t,
        report,
        actions,
        refusals: Vec::new(),
    })
}

/// The defined, shut-off VM's persistent configuration.
fn shut_off_config(ctx: &Context<'_>) -> Result<DomainConfig, AppError> {
    let vm = &ctx.vm;
    let Some(info) = ctx
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
    ctx.log
        .info("restore_disk", &format!("VM '{vm}' is shut off ✓"));
    ctx.hv
        .domain(vm, true)
        .map_err(|e| AppError::Vm(e.to_string()))
}

/// Where disk `d` of the VM is, in which format, and where its rollback copy goes;
/// everything that would make the write fail or hurt is refused here, before any
/// disk is touched (spec §4.8).
fn in_place_target(
    ctx: &Context<'_>,
    pf: &mut Preflight,
    cfg: &DomainConfig,
    d: &str,
    t: u32,
) -> Result<InPlace, AppError> {
    let Some(disk) = cfg.disk(d).filter(|x| x.is_disk()) else {
        return Err(missing_in_vm(ctx, cfg, d));
    };
    let Some(source) = disk.source.clone() else {
        return Err(missing_in_vm(ctx, cfg, d));
    };
    let typed = PathBuf::from(source);
    if !typed.exists() {
        return Err(missing_original(
            &typed,
            &swap::rollback_path(&ctx.vm, d, &typed, false),
        ));
    }
    // a symlinked disk is restored into the file it names: the VM's path keeps
    // resolving to the restored content, and the rollback sits beside the real file
    let path = std::fs::canonicalize(&typed).unwrap_or(typed);
    let device = swap::is_block_device(&path);
    let format = disk_format(disk.driver_type.as_deref(), device, &path)?;
    swap::refuse_interrupted_exchange(&path)?;
    swap::check_unused(ctx, pf, &path)?;
    if device {
        swap::check_device(ctx, pf, &path, d, t)?;
    }
    let rollback =
        (!ctx.options.no_pre_restore).then(|| swap::rollback_path(&ctx.vm, d, &path, device));
    if let Some(pre) = &rollback {
        swap::check_rollback_free(&path, pre, device)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| d.to_owned());
    Ok(InPlace {
        output: PredictedOutput {
            disk: d.to_owned(),
            source: Some(path.display().to_string()),
            file_name: name,
            final_path: path.clone(),
            format: Some(format),
        },
        device,
        checkpoint: t,
        path,
        rollback,
    })
}

/// The image format a disk replaced in place must keep: its domain's `<driver
/// type>` (a name ending `.img` can be qcow2, a raw disk can have no extension).
fn disk_format(driver: Option<&str>, device: bool, path: &Path) -> Result<ImageFormat, AppError> {
    match (driver, device) {
        (Some("qcow2"), true) => Err(AppError::Storage(format!(
            "{}: a qcow2 image on a block device is not supported for in-place restore — restore it with --restore-path and convert it onto the device",
            path.display()
        ))),
        (Some("qcow2"), false) => Ok(ImageFormat::Qcow2),
        (Some("raw"), _) | (None, true) => Ok(ImageFormat::Raw),
        (Some(other), _) => Err(AppError::Storage(format!(
            "{}: disk format '{other}' is not supported for in-place restore (qcow2 or raw)",
            path.display()
        ))),
        (None, false) => Ok(if path.extension().is_some_and(|e| e == "raw" || e == "img") {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        }),
    }
}

/// The VM's disk file is gone. When its `.pre-restore` copy exists, say so: an
/// interrupted restore of an older version could leave only that.
fn missing_original(path: &Path, pre: &Path) -> AppError {
    let hint = if pre.symlink_metadata().is_ok() {
        format!(
            " Its previous content is in {} (left by an interrupted restore?): move it back with `mv {} {}`, or",
            pre.display(),
            pre.display(),
            path.display()
        )
    } else {
        String::new()
    };
    AppError::Storage(format!(
        "Original disk path does not exist: {} —{hint} Use --restore-path to extract disks to a specific location instead.",
        path.display()
    ))
}

fn missing_in_vm(ctx: &Context<'_>, cfg: &DomainConfig, d: &str) -> AppError {
    AppError::Vm(format!(
        "Disk '{d}' not found in VM '{}' configuration. Available disks: {}",
        ctx.vm,
        cfg.disk_targets().join(", ")
    ))
}

/// What one filesystem must hold for an in-place restore.
#[derive(Debug, Default)]
struct Need {
    restore: u64,
    keep: u64,
}

/// The new images are written beside the originals while those still exist, and a
/// block device's rollback image goes to the rollback directory: each filesystem
/// is checked for what lands on it (spec §4.8 wording; the `.pre-restore` bytes are
/// counted as the spec says, though a file's is a hard link).
fn check_in_place_space(
    ctx: &Context<'_>,
    _disks: &[String],
    targets: &[InPlace],
) -> Result<(), AppError> {
    let mut needs: std::collections::BTreeMap<PathBuf, (u64, Need)> = Default::default();
    for t in targets {
        let restore = restore_bytes(ctx, t);
        let keep = if t.rollback.is_some() {
            swap::current_size(&t.path)
        } else {
            0
        };
        let image_dir = t
            .path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        let (write_at, keep_at) = if t.device {
            (None, swap::rollback_dir_of(t))
        } else {
            (Some(image_dir.clone()), image_dir)
        };
        for (dir, restore, keep) in [(write_at, restore, 0), (Some(keep_at), 0, keep)] {
            let Some(dir) = dir else { continue };
            let Some((free, at)) = crate::restore::preflight::free_space(&dir) else {
                ctx.log.warn(
                    "restore_disk",
                    "Cannot determine free space — skipping check",
                );
                return Ok(());
            };
            let e = needs.entry(at).or_insert((free, Need::default()));
            e.1.restore += restore;
            e.1.keep += keep;
        }
    }
    for (at, (free, n)) in &needs {
        if n.restore + n.keep > *free {
            return Err(AppError::Storage(format!(
                "Insufficient space: need {} (restore + .pre-restore) but only {} available on {}",
                iec_size(n.restore + n.keep),
                iec_size(*free),
                at.display()
            )));
        }
        let line = if n.keep > 0 {
            format!(
                "Space check: {} restore + {} .pre-restore — {} available ✓",
                iec_size(n.restore),
                iec_size(n.keep),
                iec_size(*free)
            )
        } else {
            format!(
                "Space check: {} restore — {} available ✓",
                iec_size(n.restore),
                iec_size(*free)
            )
        };
        ctx.log.info("restore_disk", &line);
    }
    Ok(())
}

/// Bytes the new image of `t` takes: the data the chain writes (frame headers are
/// read; compressed backups write more than their files hold), or the backup
/// files' size when the chain cannot be planned. A device is written in place.
fn restore_bytes(ctx: &Context<'_>, t: &InPlace) -> u64 {
    let files: u64 = ctx
        .set
        .disks
        .get(&t.output.disk)
        .map(|f| f.iter().map(|f| f.size).sum())
        .unwrap_or(0);
    if t.device {
        return 0;
    }
    // qcow2 metadata (L2 and refcount tables) stays under 1/64 of the data
    crate::restore::outputs::plan_disk(
        ctx.set,
        &t.output.disk,
        t.checkpoint,
        !ctx.point.is_explicit(),
    )
    .map_or(files, |p| p.data_bytes() + p.data_bytes() / 64)
}
