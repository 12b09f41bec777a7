//! The damage map of a salvaged disk (`<disk>.damage.json`, schema
//! `vmrestore.damage/1`): its JSON, staged and synced beside the disk so that it is
//! committed with it (map first), and removed when a clean restore replaces the disk.

use std::io::Write;
use std::path::{Path, PathBuf};

use engine::salvage::{DamageReport, RangeState};
use engine::StagedPath;
use serde_json::{json, Value};

/// Where the damage map of a disk restored to `final_path` goes.
pub fn map_path(final_path: &Path) -> PathBuf {
    engine::salvage::map_path(final_path)
}

/// The damage map of `d` for the disk at `disk_path`, as JSON.
pub fn map_json(d: &DamageReport, disk_path: &Path) -> Value {
    let mut v = json!({
        "schema": "vmrestore.damage/1",
        "disk": d.disk,
        "image": disk_path,
        "restore_point": d.checkpoint,
        "virtual_size": d.virtual_size,
        "missing_bytes": d.bytes(RangeState::Missing),
        "stale_bytes": d.bytes(RangeState::Stale),
        "unverified_bytes": d.bytes(RangeState::Unverified),
        "files": d.files.iter().map(|f| json!({
            "file": f.name(),
            "checkpoint": f.checkpoint,
            "status": f.status.as_str(),
            "at_offset": f.at_offset,
            "reason": f.reason,
            "used": f.used,
        })).collect::<Vec<_>>(),
        "ranges": d.ranges.iter().map(|r| json!({
            "offset": r.offset,
            "length": r.length,
            "state": r.state.as_str(),
            "why": r.why,
            "file": r.file,
        })).collect::<Vec<_>>(),
    });
    if d.ranges_omitted > 0 {
        // the byte counts above cover these too
        v["ranges_omitted"] = json!(d.ranges_omitted);
        v["ranges_note"] = json!(format!(
            "{} more damaged ranges are not listed (at most {} of each state are): the byte counts above include them",
            d.ranges_omitted,
            engine::salvage::MAX_RANGES
        ));
    }
    v
}

/// The map of `d` written and synced under a temporary name beside
/// `<disk_path>.damage.json` (dropping it removes the file).
pub fn stage_map(d: &DamageReport, disk_path: &Path) -> engine::Result<StagedPath> {
    let final_path = map_path(disk_path);
    for p in StagedPath::remove_stale(&final_path) {
        tracing::warn!(target: "restore_disk", "Removed leftover temporary file of an interrupted restore: {}", p.display());
    }
    let s = StagedPath::new(&final_path);
    let text = serde_json::to_string_pretty(&map_json(d, disk_path))
        .map_err(|e| engine::Error::Internal(format!("damage map: {e}")))?;
    let write = || -> std::io::Result<()> {
        // our own temporary name: anything already there (a planted link) is refused
        let mut f = crate::host::files::create_new(s.temp_path())?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    write().map_err(|e| engine::Error::target("writing", s.temp_path(), e))?;
    Ok(s)
}

/// After a clean disk took `final_path`: a damage map left there by an earlier
/// salvage restore no longer describes it, and goes.
pub fn remove_stale_map(final_path: &Path) {
    let m = map_path(final_path);
    if std::fs::symlink_metadata(&m).is_ok_and(|md| md.is_file())
        && std::fs::remove_file(&m).is_ok()
    {
        tracing::warn!(target: "restore_disk", "Removed {}: it described an earlier salvage restore of {}", m.display(), final_path.display());
    }
}
