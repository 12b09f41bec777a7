//! Replacing a disk in place (spec §4.8) and naming its rollback copy. A file is
//! written and verified under a temporary name beside the original first; then the
//! original is hard-linked to `<disk>.pre-restore` and the new image renamed over
//! it, so the VM's disk path never holds a partial image and never goes missing,
//! whenever the process dies. A block device cannot be renamed: its current
//! content is copied to a rollback image first, then the restore is written into it.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::error::{engine_error, AppError};
use crate::restore::checks::Preflight;
use crate::restore::damage_map;
use crate::restore::outputs::{commit_with_map, plan_outputs, write_staged};
use crate::restore::plan::InPlace;
use crate::restore::salvage::{self, Salvaged};
use crate::restore::Context;
use crate::ui::format::iec_size;

/// Where rollback images of block devices go; `VMRESTORE_ROLLBACK_DIR` overrides it.
pub fn device_rollback_dir() -> PathBuf {
    std::env::var_os("VMRESTORE_ROLLBACK_DIR").map_or_else(
        || PathBuf::from("/var/lib/vmrestore/pre-restore"),
        PathBuf::from,
    )
}

/// True when `p` (after symlinks, as `/dev/vg/lv` is one) is a block device.
pub fn is_block_device(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// The rollback copy of disk `d` at `path`: `<path>.pre-restore` for a file,
/// `<rollback dir>/<vm>-<d>.pre-restore.raw` for a block device.
pub fn rollback_path(vm: &str, d: &str, path: &Path, device: bool) -> PathBuf {
    if device {
        return device_rollback_dir().join(format!("{vm}-{d}.pre-restore.raw"));
    }
    let mut s = path.as_os_str().to_owned();
    s.push(".pre-restore");
    PathBuf::from(s)
}

/// The directory whose filesystem holds the new image and the rollback copy.
pub fn rollback_dir_of(t: &InPlace) -> PathBuf {
    match (&t.rollback, t.device) {
        (Some(r), true) => r
            .parent()
            .map_or_else(device_rollback_dir, Path::to_path_buf),
        _ => t
            .path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
    }
}

/// Bytes the rollback copy of `path` takes (a file's size, a device's size).
pub fn current_size(path: &Path) -> u64 {
    if is_block_device(path) {
        return engine::target::raw::block_device_size(path).unwrap_or(0);
    }
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What identifies a disk whatever path names it: a device's number (a `mknod`
/// alias is the same device), a file's device and inode (a link is the same file).
fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some(if m.file_type().is_block_device() {
        (u64::MAX, m.rdev())
    } else {
        (m.dev(), m.ino())
    })
}

/// A disk that another running domain also uses is refused: writing it (or, for a
/// file, swapping it out from under that domain) would corrupt both.
pub fn check_unused(ctx: &Context<'_>, pf: &mut Preflight, disk: &Path) -> Result<(), AppError> {
    let Some(id) = identity(disk) else {
        return Ok(());
    };
    let mut users: Vec<String> = ctx
        .hv
        .live_disks()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.domain != ctx.vm && identity(&l.path) == Some(id))
        .filter(|l| {
            ctx.hv
                .lookup(&l.domain)
                .ok()
                .flatten()
                .is_some_and(|i| i.state.is_active())
        })
        .map(|l| l.domain)
        .collect();
    users.dedup();
    if users.is_empty() {
        return Ok(());
    }
    let msg = format!(
        "{} is in use by running VM(s) {} — refusing to replace it",
        disk.display(),
        users.join(", ")
    );
    pf.refuse(ctx, "restore_disk", AppError::Storage(msg.clone()), msg)
}

/// A block device must hold the disk and be free: a mounted device, one a program
/// holds exclusively, or one smaller than the disk is refused before the rollback
/// image is taken.
pub fn check_device(
    ctx: &Context<'_>,
    pf: &mut Preflight,
    dev: &Path,
    d: &str,
    t: u32,
) -> Result<(), AppError> {
    use std::os::unix::fs::OpenOptionsExt;
    let busy = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(dev)
        .err()
        .filter(|e| e.raw_os_error() == Some(nix::libc::EBUSY));
    if busy.is_some() {
        let msg = format!(
            "Block device {} is in use (mounted, or held by another program) — refusing to overwrite it",
            dev.display()
        );
        pf.refuse(ctx, "restore_disk", AppError::Storage(msg.clone()), msg)?;
    }
    let size = engine::target::raw::block_device_size(dev).unwrap_or(0);
    let need = crate::restore::outputs::plan_disk(ctx.set, d, t, !ctx.point.is_explicit())
        .map(|p| p.virtual_size)
        .unwrap_or(0);
    if size < need {
        let msg = format!(
            "Block device {} holds {size} bytes; disk {d} needs {need}",
            dev.display()
        );
        pf.refuse(ctx, "restore_disk", AppError::Storage(msg.clone()), msg)?;
    }
    Ok(())
}

/// The marker that says a device restore is under way: written before the device
/// is touched, removed after it was written and read back. Found by a later run, it
/// means the device may hold a partial restore and `rollback` is the only copy.
pub fn in_progress_marker(rollback: &Path) -> PathBuf {
    let mut s = rollback.as_os_str().to_owned();
    s.push(".in-progress");
    PathBuf::from(s)
}

/// The rollback copy's name must be free — or a leftover this run knows how to
/// treat: the second name of an unchanged original (file), which is dropped.
pub fn check_rollback_free(path: &Path, pre: &Path, device: bool) -> Result<(), AppError> {
    if device && in_progress_marker(pre).exists() {
        return Err(AppError::Storage(format!(
            "A previous restore of {} was interrupted: the device may hold a PARTIAL restore, and {} holds its content from before — put it back with `dd if={} of={} bs=4M conv=fsync status=progress`, or restore the backup again with --no-pre-restore (which keeps {}); then remove {}",
            path.display(),
            pre.display(),
            pre.display(),
            path.display(),
            pre.display(),
            in_progress_marker(pre).display()
        )));
    }
    if pre.symlink_metadata().is_ok() && !is_unfinished_rollback(path, pre) {
        return Err(AppError::Storage(format!(
            "Pre-restore file already exists: {} — delete it first or use --no-pre-restore",
            pre.display()
        )));
    }
    Ok(())
}

/// True when `pre` is a second name of `path` (same inode): what a kill between the
/// two steps of [`engine::StagedPath::commit_replacing`] leaves. The original is
/// intact; the executor drops that name before it starts.
pub fn is_unfinished_rollback(path: &Path, pre: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::symlink_metadata(path),
        std::fs::symlink_metadata(pre),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A killed exchange (filesystems without hard links) leaves a `.swap` file beside
/// the disk holding either the original or the restored content; which one cannot
/// be told, so the disk is not touched again until an administrator looks.
pub fn refuse_interrupted_exchange(path: &Path) -> Result<(), AppError> {
    let left = engine::StagedPath::interrupted_exchanges(path);
    if left.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
    Err(AppError::Storage(format!(
        "An interrupted restore left {} beside {}: one of the two holds the original disk, the other the restored one — compare them (qemu-img compare) and remove the wrong one before restoring again",
        names.join(", "),
        path.display()
    )))
}

/// Writes disk `r` and puts it in place; returns the rollback copy, if kept, and
/// what a salvage restore (`--include-incomplete`) could not restore.
pub fn replace(
    ctx: &Context<'_>,
    r: &InPlace,
) -> Result<(Option<PathBuf>, Option<Salvaged>), AppError> {
    let what = format!("Disk restore failed for {}", r.output.disk);
    let mut jobs = if ctx.options.include_incomplete {
        salvage::plan_outputs(ctx, r.checkpoint, std::slice::from_ref(&r.output), true)?
    } else {
        plan_outputs(
            ctx.set,
            r.checkpoint,
            std::slice::from_ref(&r.output),
            !ctx.point.is_explicit(),
        )
        .map_err(|e| engine_error(e, &what))?
    };
    let salvaged = jobs.first().and_then(Salvaged::of);
    let damage = jobs.first().and_then(|j| j.damage.clone());
    if r.device {
        salvage::refuse_damaged(&jobs, "a block device restored in place")?;
        let job = jobs
            .pop()
            .ok_or_else(|| AppError::Internal("no plan for the disk".into()))?;
        return replace_device(ctx, r, job).map(|kept| (kept, None));
    }
    remove_legacy_leftovers(&r.path);
    if let Some(pre) = &r.rollback {
        if engine::StagedPath::discard_unfinished_rollback(&r.path, pre)
            .map_err(|e| engine_error(e, &what))?
        {
            ctx.log.warn(
                "restore_disk",
                &format!(
                    "Removed {}: a second name of the unchanged original left by an interrupted restore",
                    pre.display()
                ),
            );
        }
    }
    let (_, mut staged) =
        write_staged(jobs, &ctx.apply_options()).map_err(|e| engine_error(e, &what))?;
    let staged = staged
        .pop()
        .ok_or_else(|| AppError::Internal("no staged output for the disk".into()))?;
    let map = damage
        .map(|d| damage_map::stage_map(&d, &r.path))
        .transpose()
        .map_err(|e| engine_error(e, &what))?;
    // TEMP until engine's commit with rollback lands
    if let Some(rb) = &r.rollback {
        std::fs::hard_link(&r.path, rb)
            .map_err(AppError::io(format!("linking {}", rb.display())))?;
    }
    commit_with_map(staged, map, true).map_err(|e| engine_error(e, &what))?;
    Ok((r.rollback.clone(), salvaged))
}

/// A block device: the rollback image first (its whole current content), then the
/// restore written into the device, holes zeroed, read back.
fn replace_device(
    ctx: &Context<'_>,
    r: &InPlace,
    job: crate::restore::outputs::DiskJob,
) -> Result<Option<PathBuf>, AppError> {
    let what = format!("Disk restore failed for {}", r.output.disk);
    let marker = match &r.rollback {
        Some(rb) => Some(save_device(ctx, r, rb).map_err(|e| engine_error(e, &what))?),
        None => None,
    };
    let written =
        engine::target::raw::RawTarget::open_block_device_for_disk(&r.path, job.plan.virtual_size)
            .and_then(|target| {
                engine::apply(&[job.plan], vec![Box::new(target)], &ctx.apply_options())
            });
    match written {
        Ok(_) => {
            if let Some(m) = &marker {
                let _ = std::fs::remove_file(m);
            }
            Ok(r.rollback.clone())
        }
        Err(e) => {
            let kept = match &r.rollback {
                Some(rb) => format!("its previous content is in {} — put it back with `dd if={} of={} bs=4M conv=fsync status=progress`, or rerun with --no-pre-restore", rb.display(), rb.display(), r.path.display()),
                None => "no copy of its previous content was kept (--no-pre-restore)".to_owned(),
            };
            ctx.log.error(
                "restore_disk",
                &format!(
                    "Block device {} may now hold a PARTIAL restore: {kept}",
                    r.path.display()
                ),
            );
            Err(engine_error(e, &what))
        }
    }
}

/// The device's whole current content into the rollback image (a stale temporary
/// image of a killed run is removed first), and the in-progress marker beside it.
fn save_device(ctx: &Context<'_>, r: &InPlace, rb: &Path) -> engine::Result<PathBuf> {
    if let Some(dir) = rb.parent() {
        std::fs::create_dir_all(dir).map_err(|e| engine::Error::target("creating", dir, e))?;
    }
    for p in engine::StagedPath::remove_stale(rb) {
        ctx.log.warn(
            "restore_disk",
            &format!(
                "Removed leftover temporary rollback image of an interrupted restore: {}",
                p.display()
            ),
        );
    }
    let saved = engine::rollback::save_device_image(&r.path, rb, &ctx.cancel)?;
    ctx.log.info(
        "restore_disk",
        &format!(
            "Saved the current content of {} to {} ({} of data)",
            r.path.display(),
            rb.display(),
            iec_size(saved.data_bytes)
        ),
    );
    let marker = in_progress_marker(rb);
    let text = format!("{}\n", r.path.display());
    crate::host::files::write(&marker, text.as_bytes(), true)
        .map_err(|e| engine::Error::target("writing", &marker, e))?;
    Ok(marker)
}

/// Temporary files an interrupted in-place restore of an older version left beside
/// `path` (`..<name>.vmrestore-<pid>.new.vmrestore-<pid>.part`, `.<name>.vmrestore-<pid>.new`)
/// whose process is gone.
fn remove_legacy_leftovers(path: &Path) {
    crate::restore::outputs::warn_removed_stale(path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = legacy_pid(&entry, &name) else {
            continue;
        };
        let alive = i32::try_from(pid).map_or(true, |p| {
            !matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
                Err(nix::errno::Errno::ESRCH)
            )
        });
        if !alive
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            tracing::warn!(target: "restore_disk", "Removed leftover temporary file of an interrupted restore: {}", e.path().display());
        }
    }
}

/// The PID of a 0.7 in-place temporary name for `name`, if `entry` is one.
fn legacy_pid(entry: &str, name: &str) -> Option<u32> {
    let rest = entry
        .strip_prefix(&format!("..{name}.vmrestore-"))
        .or_else(|| entry.strip_prefix(&format!(".{name}.vmrestore-")))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let pid: u32 = rest[..digits].parse().ok()?;
    let tail = &rest[digits..];
    let nested = tail
        .strip_prefix(".new.vmrestore-")
        .and_then(|t| t.strip_suffix(".part"))
        .is_some_and(|p| p.parse::<u32>() == Ok(pid));
    (tail == ".new" || nested).then_some(pid)
}

/// libvirt-qemu ownership and 0600 on a replaced file (not on a device).
pub fn set_owner(ctx: &Context<'_>, r: &InPlace) {
    if r.device {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let owner = crate::host::ownership::chown_to(&r.path, &["libvirt-qemu"]);
    let _ = std::fs::set_permissions(&r.path, std::fs::Permissions::from_mode(0o600));
    if !matches!(owner, Ok(Some(_))) {
        ctx.log.warn(
            "restore_disk",
            &format!("Failed to set ownership on {}", r.path.display()),
        );
    }
}

/// The banner after an in-place restore: the checkpoint chain is invalid now, and
/// the rollback copies wait to be removed.
pub fn banner(ctx: &Context<'_>, vm: &str, kept: &[PathBuf]) {
    let log = ctx.log;
    let rule = "═".repeat(59);
    log.plain("");
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
        log.warn("restore_disk", &l);
    }
    if kept.is_empty() {
        return;
    }
    log.plain("");
    log.warn("restore_disk", &rule);
    log.warn(
        "restore_disk",
        "ACTION REQUIRED: Remove .pre-restore file(s) once VM is confirmed working",
    );
    let mut total = 0;
    for k in kept {
        let size = std::fs::metadata(k).map(|m| m.len()).unwrap_or(0);
        total += size;
        log.warn(
            "restore_disk",
            &format!("  rm {}  ({})", k.display(), iec_size(size)),
        );
    }
    if kept.len() > 1 {
        log.warn("restore_disk", &format!("  Total: {}", iec_size(total)));
    }
    log.warn("restore_disk", &rule);
}

#[cfg(test)]
mod tests {
    use super::legacy_pid;

    #[test]
    fn legacy_names() {
        assert_eq!(
            legacy_pid("..d.qcow2.vmrestore-12.new.vmrestore-12.part", "d.qcow2"),
            Some(12)
        );
        assert_eq!(legacy_pid(".d.qcow2.vmrestore-12.new", "d.qcow2"), Some(12));
        assert_eq!(legacy_pid(".d.qcow2.vmrestore-12.part", "d.qcow2"), None);
        assert_eq!(
            legacy_pid("..d.qcow2.vmrestore-12.new.vmrestore-13.part", "d.qcow2"),
            None
        );
    }
}
