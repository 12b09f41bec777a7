//! The restore modes (spec §4): DR, clone, data-only, disk in place, disk extract.
//! Each runs its checks first and touches nothing until all of them passed; every
//! output is written under a temporary name and takes its final name only after the
//! engine synced and read it back.
//!
//! This module decides *what* to do; output lines go through [`Reporter`], exit
//! codes come from [`AppError`] categories.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::{ApplyOptions, Cancel};
use nbdfmt::{BackupSet, SetKind};

use crate::error::AppError;
use crate::hypervisor::Hypervisor;

mod disk;
mod instant;
mod nbd;
mod vm;

pub use disk::{run_disk_extract, run_disk_in_place};
pub use instant::{default_name as instant_default_name, run_instant};
pub use nbd::run_nbd;
pub use vm::{run_clone, run_data_only, run_dr};

/// Where the user-visible lines go (stderr + log file in the binary, a buffer in tests).
pub trait Reporter: Send + Sync {
    /// An INFO line from `component`.
    fn info(&self, component: &str, msg: &str);
    /// A WARN line.
    fn warn(&self, component: &str, msg: &str);
    /// An ERROR line.
    fn error(&self, component: &str, msg: &str);
    /// A bare line on stdout (banners, spacing).
    fn plain(&self, line: &str) {
        println!("{line}");
    }
}

/// `--restore-point` as typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointRequest {
    /// All checkpoints.
    Latest,
    /// Checkpoint 0.
    Full,
    /// Checkpoints 0..=N.
    Number(u32),
}

impl PointRequest {
    /// As requested (`latest`, `full`, `N`), for the catalogue.
    pub fn as_text(self) -> String {
        match self {
            Self::Latest => "latest".into(),
            Self::Full => "full".into(),
            Self::Number(n) => n.to_string(),
        }
    }
}

/// Everything a restore mode needs, resolved by the caller (data dir, VM name, lock).
pub struct Job<'a> {
    /// The VM name from the backup's XML (libvirt name).
    pub vm: String,
    /// The scanned data directory.
    pub set: &'a BackupSet,
    /// `--restore-point`.
    pub point: PointRequest,
    /// `--restore-path`.
    pub restore_path: Option<PathBuf>,
    /// `--force`.
    pub force: bool,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--skip-tpm`.
    pub skip_tpm: bool,
    /// `--include-incomplete`.
    pub include_incomplete: bool,
    /// `--no-pre-restore`.
    pub no_pre_restore: bool,
    /// The hypervisor connection (read-only for dry-run).
    pub hv: &'a dyn Hypervisor,
    /// Output lines.
    pub log: &'a dyn Reporter,
    /// Cancellation from SIGINT/SIGTERM.
    pub cancel: Cancel,
    /// Progress lines for the engine.
    pub progress: Option<engine::apply::ProgressFn>,
    /// swtpm's state root (`/var/lib/libvirt/swtpm`).
    pub swtpm_root: PathBuf,
}

impl std::fmt::Debug for Job<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("vm", &self.vm)
            .field("dir", &self.set.dir)
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

/// What a finished restore reports (summary line and catalogue row).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The final summary line (spec §3.4).
    pub summary: String,
    /// Resolved endpoint checkpoint.
    pub checkpoint: u32,
    /// Devices restored or attempted.
    pub disks: Vec<String>,
    /// Target path column (restore path, or the original disk paths).
    pub target_path: String,
    /// `restored` | `failed` | `skipped` | `none`.
    pub tpm_result: &'static str,
    /// True when the summary carries `TPM ✗` or `UUID ✗`.
    pub partial: bool,
    /// Clone name.
    pub target_name: Option<String>,
}

/// Spec §4.1 step 6: the endpoint checkpoint T.
pub fn endpoint(job: &Job<'_>) -> Result<u32, AppError> {
    let set = job.set;
    if set.kind != SetKind::Incremental {
        if job.point != PointRequest::Latest {
            job.log.warn(
                "restore_vm",
                &format!("Point-in-time ignored (backup type: {})", set.kind.as_str()),
            );
        }
        return Ok(0);
    }
    let latest = set
        .checkpoint_xmls
        .keys()
        .max()
        .copied()
        .or_else(|| set.latest())
        .unwrap_or(0);
    let t = match job.point {
        PointRequest::Latest => latest,
        PointRequest::Full => 0,
        PointRequest::Number(n) => n,
    };
    if t > latest {
        return Err(AppError::Vm(format!(
            "Restore point {t} does not exist (latest restore point is {latest})"
        )));
    }
    if job.point != PointRequest::Latest {
        job.log
            .info("restore_vm", &format!("Point-in-time: virtnbdbackup.{t}"));
    }
    Ok(t)
}

/// Spec §2.8: refuse an endpoint at or after the first incomplete checkpoint.
pub fn check_complete(job: &Job<'_>, t: u32) -> Result<(), AppError> {
    let Some(broken) = job.set.broken_at() else {
        return Ok(());
    };
    if broken.checkpoint > t {
        return Ok(());
    }
    if job.include_incomplete {
        job.log.warn("restore_vm", "Restoring from an INCOMPLETE chain (--include-incomplete): restored data may be inconsistent");
        return Ok(());
    }
    let reason = broken
        .problems
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    let label = if job.point == PointRequest::Latest {
        "the latest restore point".to_owned()
    } else {
        format!("restore point {t}")
    };
    job.log.error(
        "restore_vm",
        &format!(
            "Chain is INCOMPLETE at restore point {} ({reason}) — refusing to restore {label}.",
            broken.checkpoint
        ),
    );
    if broken.checkpoint == 0 {
        job.log.error("restore_vm", "There is no restorable restore point in this chain; use --include-incomplete for forensic recovery.");
    } else {
        job.log.error(
            "restore_vm",
            &format!(
                "Restore an earlier good restore point (--restore-point {}) or use --include-incomplete for forensic recovery.",
                broken.checkpoint - 1
            ),
        );
    }
    Err(AppError::Vm(format!(
        "Chain is INCOMPLETE at restore point {} ({reason})",
        broken.checkpoint
    )))
}

/// Spec §2.9: warn when the disk set at T differs from the latest one.
pub fn warn_disk_set_change(job: &Job<'_>, t: u32) {
    let set = job.set;
    let Some(latest) = set.latest() else { return };
    if set.kind != SetKind::Incremental || job.point == PointRequest::Latest || t == latest {
        return;
    }
    let (Some(at), Some(last)) = (set.point(t), set.point(latest)) else {
        return;
    };
    if at.disks == last.disks {
        return;
    }
    let fmt =
        |d: &std::collections::BTreeSet<String>| d.iter().cloned().collect::<Vec<_>>().join(", ");
    job.log.warn("restore_vm", &format!("Disk configuration changed between checkpoint {t} and the latest checkpoint ({latest})."));
    job.log.warn(
        "restore_vm",
        &format!(
            "  Checkpoint {t}: {} ({} disks)",
            fmt(&at.disks),
            at.disks.len()
        ),
    );
    job.log.warn(
        "restore_vm",
        &format!(
            "  Latest (CP {latest}): {} ({} disks)",
            fmt(&last.disks),
            last.disks.len()
        ),
    );
    job.log.warn(
        "restore_vm",
        &format!("  Restoring with checkpoint {t} disk configuration."),
    );
}

/// Dry-run: the plan without the apply — per disk the chain files it would read and
/// the bytes it would write (frame headers only are read).
pub fn log_dry_run_plan(
    job: &Job<'_>,
    t: u32,
    outputs: &[crate::restore::PredictedOutput],
) -> Result<(), AppError> {
    let newest = job.point == PointRequest::Latest;
    let jobs = crate::restore::plan_outputs(job.set, t, outputs, newest)
        .map_err(|e| engine_error(e, "Cannot plan the restore"))?;
    for j in &jobs {
        let names: Vec<String> = j
            .plan
            .files
            .iter()
            .map(|f| {
                f.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        job.log.info(
            "restore_disk",
            &format!(
                "[DRY RUN] {}: would read {} file(s) ({}), {} in total, and write {} of data to {}",
                j.output.disk,
                names.len(),
                names.join(", "),
                iec(j.plan.file_bytes()),
                iec(j.plan.data_bytes()),
                j.output.final_path.display()
            ),
        );
    }
    Ok(())
}

/// Engine options for a job.
pub fn apply_options(job: &Job<'_>) -> ApplyOptions {
    ApplyOptions {
        cancel: job.cancel.clone(),
        progress: job.progress.clone(),
        ..ApplyOptions::default()
    }
}

/// Maps an engine failure to its category (spec STYLE §2: apply failures exit 6,
/// cancellation 128+n, a full target 4, a failed post-restore integrity check — the
/// read-back differs — 4 with the spec §3.6 wording).
pub fn engine_error(e: engine::Error, what: &str) -> AppError {
    match e.kind() {
        engine::ErrorKind::Cancelled(sig) if sig > 0 => AppError::Interrupted(sig),
        engine::ErrorKind::NoSpace => AppError::Storage(format!("{what}: {e}")),
        engine::ErrorKind::VerifyFailed => AppError::Storage(format!(
            "Restore produced corrupt disk images — {what}: {e}"
        )),
        _ => AppError::Engine {
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        },
    }
}

/// Seconds since the epoch (for `.before-restore.<epoch>` names).
pub fn epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Formats a byte count like `numfmt --to=iec-i --suffix=B` (spec §3.5).
/// The disks restore point `t` must produce (those with data in the backup).
pub fn disks_at(set: &BackupSet, t: u32) -> Vec<String> {
    set.point(t)
        .map(|p| p.expected.iter().cloned().collect())
        .unwrap_or_default()
}

/// The error for a disk the backup does not have (spec wording).
pub fn disk_not_found(disk: &str, available: &[String]) -> AppError {
    AppError::Vm(format!(
        "Disk '{disk}' not found in backup. Available disks: {}",
        available.join(", ")
    ))
}

pub fn iec(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    let unit = UNITS[i - 1];
    if v < 10.0 {
        let r = (v * 10.0).ceil() / 10.0;
        if r >= 10.0 {
            format!("{}{unit}", r.ceil() as u64)
        } else {
            format!("{r:.1}{unit}")
        }
    } else {
        format!("{}{unit}", v.ceil() as u64)
    }
}

/// Free-space check of spec §4.3 (exit 4 when short, WARN when tight).
pub fn check_space(job: &Job<'_>, t: u32, dir: &Path) -> Result<(), AppError> {
    let point =
        (job.set.kind == SetKind::Incremental && job.point != PointRequest::Latest).then_some(t);
    let (need, files) = crate::preflight::backup_bytes(job.set, point);
    if files == 0 {
        job.log.warn(
            "preflight_free_space",
            "No data files found to estimate size — skipping space check",
        );
        return Ok(());
    }
    let Some((free, at)) = crate::preflight::free_space(dir) else {
        job.log.warn(
            "preflight_free_space",
            &format!(
                "Cannot determine free space on {} — skipping check",
                dir.display()
            ),
        );
        return Ok(());
    };
    job.log.info(
        "preflight_free_space",
        &format!(
            "Backup data: {} ({files} files) — Destination free: {} ({})",
            iec(need),
            iec(free),
            at.display()
        ),
    );
    if need > free {
        return Err(AppError::Storage(format!(
            "Insufficient space: restore needs {} but only {} available on {}",
            iec(need),
            iec(free),
            at.display()
        )));
    }
    if free - need < need / 10 {
        job.log.warn(
            "preflight_free_space",
            &format!(
                "Tight on space: only {} headroom after restore",
                iec(free - need)
            ),
        );
    }
    Ok(())
}

/// A progress callback printing one plain line per disk every few seconds.
pub fn line_progress(log: Arc<dyn Reporter>) -> engine::apply::ProgressFn {
    let last =
        std::sync::Mutex::new(std::collections::HashMap::<String, std::time::Instant>::new());
    Arc::new(move |p: &engine::Progress| {
        let now = std::time::Instant::now();
        let mut m = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = m
            .get(&p.disk)
            .is_none_or(|t| now.duration_since(*t).as_secs() >= 2)
            || p.done == p.total;
        if due {
            m.insert(p.disk.clone(), now);
            let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
            log.info(
                "restore_disk",
                &format!("{}: {} of {} ({pct}%)", p.disk, iec(p.done), iec(p.total)),
            );
        }
    })
}

/// Spec §4.12: refreshes the active pool whose path is the longest component-wise
/// prefix of `dir`; never fatal.
pub(crate) fn refresh_pool(job: &Job<'_>, dir: &Path) {
    let Ok(pools) = job.hv.active_pools() else {
        return;
    };
    let dir = crate::preflight::canonicalize_lenient(dir);
    if let Some(p) = crate::hypervisor::pool_for(&pools, &dir) {
        match job.hv.refresh_pool(&p.name) {
            Ok(()) => job.log.info(
                "refresh_storage_pool",
                &format!("Refreshed storage pool '{}'", p.name),
            ),
            Err(_) => job.log.warn(
                "refresh_storage_pool",
                &format!("Failed to refresh storage pool '{}'", p.name),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::iec;

    #[test]
    fn integrity_failure_is_a_storage_error() {
        let e = engine::Error::Verify {
            path: "/r/x.qcow2".into(),
            message: "block 3 differs".into(),
        };
        let a = super::engine_error(e, "Disk restore failed");
        assert_eq!(a.exit_status().code(), 4);
        assert!(
            a.to_string()
                .starts_with("Restore produced corrupt disk images — Disk restore failed: "),
            "{a}"
        );
    }

    #[test]
    fn numfmt_iec() {
        assert_eq!(iec(1023), "1023B");
        assert_eq!(iec(1024), "1.0KiB");
        assert_eq!(iec(1536), "1.5KiB");
        assert_eq!(iec(198 * 1024), "198KiB");
        assert_eq!(iec(10229), "10KiB");
        assert_eq!(iec(100 << 30), "100GiB");
        assert_eq!(iec((1u64 << 30) + (1 << 26)), "1.1GiB");
    }
}
