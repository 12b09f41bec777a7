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
use crate::restore::outputs::{plan_outputs, write_staged};
use crate::restore::plan::InPlace;
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

/// A block device used by another running domain is refused.
pub fn check_device_unused(
    ctx: &Context<'_>,
    pf: &mut Preflight,
    dev: &Path,
) -> Result<(), AppError> {
    let real = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.to_path_buf());
    let users: Vec<String> = ctx
        .hv
        .live_disks()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.domain != ctx.vm)
        .filter(|l| std::fs::canonicalize(&l.path).unwrap_or_else(|_| l.path.clone()) == real)
        .filter(|l| {
            ctx.hv
                .lookup(&l.domain)
                .ok()
                .flatten()
                .is_some_and(|i| i.state.is_active())
        })
        .map(|l| l.domain)
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    let msg = format!(
        "Block device {} is in use by running VM(s) {} — refusing to overwrite it",
        dev.display(),
        users.join(", ")
    );
    pf.refuse(ctx, "restore_disk", AppError::Storage(msg.clone()), msg)
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

/// Writes disk `r` and puts it in place; returns the rollback copy, if kept.
pub fn replace(ctx: &Context<'_>, r: &InPlace) -> Result<Option<PathBuf>, AppError> {
    let what = format!("Disk restore failed for {}", r.output.disk);
    let mut jobs = plan_outputs(
        ctx.set,
        r.checkpoint,
        std::slice::from_ref(&r.output),
        !ctx.point.is_explicit(),
    )
    .map_err(|e| engine_error(e, &what))?;
    if r.device {
        let job = jobs
            .pop()
            .ok_or_else(|| AppError::Internal("no plan for the disk".into()))?;
        return replace_device(ctx, r, job).map_err(|e| engine_error(e, &what));
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
    // TEMP until engine's commit with rollback lands
    if let Some(rb) = &r.rollback {
        std::fs::hard_link(&r.path, rb)
            .map_err(AppError::io(format!("linking {}", rb.display())))?;
    }
    staged.commit(true).map_err(|e| engine_error(e, &what))?;
    Ok(r.rollback.clone())
}

/// A block device: the rollback image first (its whole current content), then the
/// restore written into the device, holes zeroed, read back.
fn replace_device(
    ctx: &Context<'_>,
    r: &InPlace,
    job: crate::restore::outputs::DiskJob,
) -> engine::Result<Option<PathBuf>> {
    if let Some(rb) = &r.rollback {
        if let Some(dir) = rb.parent() {
            std::fs::create_dir_all(dir).map_err(|e| engine::Error::target("creating", dir, e))?;
        }
        let bytes = engine::rollback::save_device_image(&r.path, rb, &ctx.cancel)?.data_bytes;
        ctx.log.info(
            "restore_disk",
            &format!(
                "Saved the current content of {} to {} ({})",
                r.path.display(),
                rb.display(),
                iec_size(bytes)
            ),
        );
    }
    let target =
        engine::target::raw::RawTarget::open_block_device_for_disk(&r.path, job.plan.virtual_size)?;
    engine::apply(&[job.plan], vec![Box::new(target)], &ctx.apply_options())?;
    Ok(r.rollback.clone())
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
