//! Salvage restores (`--include-incomplete`): every disk is planned through
//! [`engine::salvage`], which reads each file of the chain completely and plans
//! only what is readable. A disk with damage gets a damage map beside it
//! (`<disk>.damage.json`), staged like the disk and committed with it (the map
//! first: a disk under its final name always has its map), and the run ends with
//! exit 6, catalogue outcome `partial` and a `Salvage restore: … PARTIALLY` summary.
//!
//! Owns the salvage plan and wording (the map's file: [`super::damage_map`]); the
//! planners and the executor call in through small hooks and decide nothing here.

use std::path::{Path, PathBuf};

use engine::salvage::{DamageReport, RangeState};
use nbdfmt::SetKind;

use crate::error::{engine_error, AppError};
use crate::restore::damage_map::map_path;
use crate::restore::outputs::{job_for, DiskJob, PredictedOutput};
use crate::restore::Context;
use crate::ui::format::iec_size;

/// Salvage plans of `outputs` at `t`: each disk's chain read completely, its
/// damage logged; a damaged disk's job carries its [`DamageReport`]. Without
/// `replace`, a file already at a damaged disk's map name is refused (exit 4)
/// before anything is written.
pub fn plan_outputs(
    ctx: &Context<'_>,
    t: u32,
    outputs: &[PredictedOutput],
    replace: bool,
) -> Result<Vec<DiskJob>, AppError> {
    let point = if ctx.set.kind == SetKind::Copy { 0 } else { t };
    let newest = !ctx.point.is_explicit();
    let mut jobs = Vec::new();
    for o in outputs {
        ctx.log.info(
            "restore_disk",
            &format!(
                "{}: salvage check — reading every file of the chain completely",
                o.disk
            ),
        );
        // the walk's frame logs go to $TMPDIR (a few bytes per frame; unlinked)
        let s = engine::salvage::plan_point(ctx.set, &o.disk, point, newest, None, &ctx.cancel)
            .map_err(|e| engine_error(e, "Salvage restore failed"))?;
        log_damage(ctx, &s.damage, &o.final_path);
        let mut job = job_for(ctx.set, point, o, s.plan)
            .map_err(|e| engine_error(e, "Salvage restore failed"))?;
        job.damage = (!s.damage.is_clean()).then_some(s.damage);
        let map = map_path(&o.final_path);
        if job.damage.is_some() && !replace && std::fs::symlink_metadata(&map).is_ok() {
            return Err(AppError::Storage(format!(
                "{} already exists — the damage map of this salvage restore goes there (remove it, or use --force to replace it)",
                map.display()
            )));
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// One WARN per damaged file and a line per disk on what the restore will lack.
fn log_damage(ctx: &Context<'_>, d: &DamageReport, final_path: &Path) {
    if d.is_clean() {
        ctx.log.info(
            "restore_disk",
            &format!(
                "{}: salvage check — every file read completely and verified: nothing damaged",
                d.disk
            ),
        );
        return;
    }
    for f in d
        .files
        .iter()
        .filter(|f| f.status != engine::salvage::FileStatus::Ok)
    {
        let at = f
            .at_offset
            .map(|o| format!(" at byte {o}"))
            .unwrap_or_default();
        ctx.log.warn(
            "restore_disk",
            &format!(
                "{}: {} {}{at}: {}",
                d.disk,
                f.path.display(),
                f.status.as_str().replace('_', " ").to_uppercase(),
                f.reason.as_deref().unwrap_or("")
            ),
        );
    }
    ctx.log.warn(
        "restore_disk",
        &format!(
            "{}: salvage — {} missing, {} possibly stale, {} unverified ({} damaged range(s)); damage map: {}",
            d.disk,
            iec_size(d.bytes(RangeState::Missing)),
            iec_size(d.bytes(RangeState::Stale)),
            iec_size(d.bytes(RangeState::Unverified)),
            d.range_count(),
            map_path(final_path).display()
        ),
    );
}

/// What a finished salvage restore of one disk lacks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Salvaged {
    /// Disk target.
    pub disk: String,
    /// The damage map.
    pub map: PathBuf,
    /// Bytes written as zeros because their data is lost.
    pub missing_bytes: u64,
    /// Bytes holding an older version (or possibly).
    pub stale_bytes: u64,
    /// Bytes from files whose checksum does not match.
    pub unverified_bytes: u64,
}

impl Salvaged {
    /// The salvage outcome of `job`, when it is damaged.
    pub fn of(job: &DiskJob) -> Option<Self> {
        let d = job.damage.as_ref()?;
        Some(Self {
            disk: d.disk.clone(),
            map: map_path(&job.output.final_path),
            missing_bytes: d.bytes(RangeState::Missing),
            stale_bytes: d.bytes(RangeState::Stale),
            unverified_bytes: d.bytes(RangeState::Unverified),
        })
    }

    fn words(&self) -> String {
        let mut s = format!(
            "{} restored PARTIALLY — {} bytes missing, {} bytes possibly stale",
            self.disk, self.missing_bytes, self.stale_bytes
        );
        if self.unverified_bytes > 0 {
            s.push_str(&format!(", {} bytes unverified", self.unverified_bytes));
        }
        s.push_str(&format!(", see {}", self.map.display()));
        s
    }
}

/// The run's summary line: `Salvage restore: vda restored PARTIALLY — N bytes
/// missing, M bytes possibly stale, see <map>` (one clause per damaged disk).
pub fn summary(salvaged: &[Salvaged]) -> String {
    let parts: Vec<String> = salvaged.iter().map(Salvaged::words).collect();
    format!("Salvage restore: {}", parts.join("; "))
}

/// The dry-run line of a damaged job.
pub fn plan_line(job: &DiskJob) -> Option<String> {
    let s = Salvaged::of(job)?;
    Some(format!(
        "{}: salvage — {} missing, {} possibly stale, {} unverified; would write the damage map {}",
        s.disk,
        iec_size(s.missing_bytes),
        iec_size(s.stale_bytes),
        iec_size(s.unverified_bytes),
        s.map.display()
    ))
}

/// The dry run's summary when some disk would be restored partially.
pub fn dry_run_summary(vm: &str, salvaged: &[Salvaged]) -> String {
    let parts: Vec<String> = salvaged
        .iter()
        .map(|s| {
            format!(
                "{} would be restored PARTIALLY ({} bytes missing, {} bytes possibly stale, {} bytes unverified)",
                s.disk, s.missing_bytes, s.stale_bytes, s.unverified_bytes
            )
        })
        .collect();
    format!(
        "Dry run: salvage restore of {vm}: {} [DRY RUN — no changes made]",
        parts.join("; ")
    )
}

/// Instant boot and NBD exports carry no damage map: a damaged disk is refused
/// there (exit 5), with the way to salvage it instead.
pub fn refuse_damaged(jobs: &[DiskJob], what: &str) -> Result<(), AppError> {
    match jobs.iter().find_map(|j| j.damage.as_ref()) {
        None => Ok(()),
        Some(d) => Err(AppError::Vm(format!(
            "{}: the chain is damaged and {what} cannot carry a damage map — salvage it into files instead (--include-incomplete with --restore-path)",
            d.disk
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::outputs::commit_with_map;
    use engine::StagedPath;

    fn staged(final_path: &Path, text: &str) -> StagedPath {
        let s = StagedPath::new(final_path);
        std::fs::write(s.temp_path(), text).expect("temp");
        s
    }

    #[test]
    fn the_map_goes_first_and_leaves_with_a_disk_that_cannot_follow() {
        let d = tempfile::tempdir().expect("tmp");
        let disk = d.path().join("vm-vda.qcow2");
        let map = map_path(&disk);
        // the disk's final name is taken: the map committed first is taken back
        std::fs::write(&disk, "someone else's").expect("disk");
        let e = commit_with_map(staged(&disk, "new"), Some(staged(&map, "{}")), false);
        assert!(e.is_err());
        assert!(!map.exists(), "a map without its disk");
        assert_eq!(std::fs::read(&disk).expect("disk"), b"someone else's");
        let left: Vec<_> = std::fs::read_dir(d.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "temporary files left");
        // both go in: map and disk under their final names
        std::fs::remove_file(&disk).expect("rm");
        commit_with_map(staged(&disk, "new"), Some(staged(&map, "{}")), false).expect("commit");
        assert_eq!(std::fs::read(&map).expect("map"), b"{}");
        // a clean disk written over it later takes the map away
        commit_with_map(staged(&disk, "clean"), None, true).expect("commit");
        assert!(!map.exists());
        assert_eq!(std::fs::read(&disk).expect("disk"), b"clean");
    }

    #[test]
    fn summary_names_every_damaged_disk() {
        let s = Salvaged {
            disk: "vda".into(),
            map: PathBuf::from("/r/vm-vda.qcow2.damage.json"),
            missing_bytes: 10,
            stale_bytes: 20,
            unverified_bytes: 0,
        };
        let t = Salvaged {
            disk: "vdb".into(),
            unverified_bytes: 5,
            ..s.clone()
        };
        assert_eq!(
            summary(&[s, t]),
            "Salvage restore: vda restored PARTIALLY — 10 bytes missing, 20 bytes possibly stale, see /r/vm-vda.qcow2.damage.json; vdb restored PARTIALLY — 10 bytes missing, 20 bytes possibly stale, 5 bytes unverified, see /r/vm-vda.qcow2.damage.json"
        );
    }
}
