//! The restore point: one type from the command line (`--restore-point latest|full|N`)
//! to the engine (a checkpoint number), and the rules that resolve and check it
//! against a backup set (spec §4.1 step 6, §2.8, §2.9).

use std::collections::BTreeSet;

use nbdfmt::{BackupSet, SetKind};

pub use crate::cli::selection::RestorePoint;
use crate::error::AppError;
use crate::ui::report::Reporter;

impl RestorePoint {
    /// Spec §4.1 step 6: the endpoint checkpoint of this point in `set`. Full and copy
    /// backups have one point (0); asking for another is a WARN, not an error.
    pub fn resolve(self, set: &BackupSet, log: &dyn Reporter) -> Result<u32, AppError> {
        if set.kind != SetKind::Incremental {
            if self.is_explicit() {
                log.warn(
                    "restore_vm",
                    &format!("Point-in-time ignored (backup type: {})", set.kind.as_str()),
                );
            }
            return Ok(0);
        }
        // the newest point any source knows (data files, vmconfigs, checkpoint XMLs,
        // the .cpt list): a missing side file never makes "latest" step back
        let latest = set.latest().unwrap_or(0);
        warn_missing_sources(set, latest, log);
        let t = match self {
            Self::Latest => latest,
            Self::Full => 0,
            Self::Number(n) => u32::try_from(n)
                .map_err(|_| AppError::Vm(format!("Restore point {n} does not exist")))?,
        };
        if t > latest {
            return Err(AppError::Vm(format!(
                "Restore point {t} does not exist (latest restore point is {latest})"
            )));
        }
        if self.is_explicit() {
            log.info("restore_vm", &format!("Point-in-time: virtnbdbackup.{t}"));
        }
        Ok(t)
    }
}

/// A WARN for each side file of the latest point that is missing although its data
/// is there (an interrupted backup, a partial copy of the tree).
fn warn_missing_sources(set: &BackupSet, latest: u32, log: &dyn Reporter) {
    if latest > 0 && !set.checkpoint_xmls.contains_key(&latest) {
        log.warn(
            "restore_vm",
            &format!("Restore point {latest} has no checkpoints/virtnbdbackup.{latest}.xml in {} — restoring it from its data files", set.dir.display()),
        );
    }
    if set.vmconfig(latest).is_none() && !set.vmconfigs.is_empty() {
        log.warn(
            "restore_vm",
            &format!("Restore point {latest} has no vmconfig in {} — the newest earlier domain XML is used", set.dir.display()),
        );
    }
}

/// Spec §2.8: refuse an endpoint at or after the first incomplete checkpoint, unless
/// `include_incomplete` (then one WARN).
pub fn check_complete(
    set: &BackupSet,
    point: RestorePoint,
    t: u32,
    include_incomplete: bool,
    log: &dyn Reporter,
) -> Result<(), AppError> {
    let Some(broken) = set.broken_at() else {
        return Ok(());
    };
    if broken.checkpoint > t {
        return Ok(());
    }
    if include_incomplete {
        log.warn("restore_vm", "Restoring from an INCOMPLETE chain (--include-incomplete): restored data may be inconsistent");
        return Ok(());
    }
    let reason = broken
        .problems
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    let label = if point.is_explicit() {
        format!("restore point {t}")
    } else {
        "the latest restore point".to_owned()
    };
    log.error(
        "restore_vm",
        &format!(
            "Chain is INCOMPLETE at restore point {} ({reason}) — refusing to restore {label}.",
            broken.checkpoint
        ),
    );
    let advice = match broken.checkpoint {
        0 => "There is no restorable restore point in this chain; use --include-incomplete for forensic recovery.".to_owned(),
        c => format!("Restore an earlier good restore point (--restore-point {}) or use --include-incomplete for forensic recovery.", c - 1),
    };
    log.error("restore_vm", &advice);
    Err(AppError::Vm(format!(
        "Chain is INCOMPLETE at restore point {} ({reason})",
        broken.checkpoint
    )))
}

/// Spec §2.9: warn when the disk set at `t` differs from the latest one.
pub fn warn_disk_set_change(set: &BackupSet, point: RestorePoint, t: u32, log: &dyn Reporter) {
    let Some(latest) = set.latest() else { return };
    if set.kind != SetKind::Incremental || !point.is_explicit() || t == latest {
        return;
    }
    let (Some(at), Some(last)) = (set.point(t), set.point(latest)) else {
        return;
    };
    // the disk *configuration* is what each point's domain XML expects; the data
    // files of an interrupted latest backup (a `.partial`) say nothing about it
    if at.expected == last.expected {
        return;
    }
    let fmt = |d: &BTreeSet<String>| d.iter().cloned().collect::<Vec<_>>().join(", ");
    log.warn("restore_vm", &format!("Disk configuration changed between checkpoint {t} and the latest checkpoint ({latest})."));
    log.warn(
        "restore_vm",
        &format!(
            "  Checkpoint {t}: {} ({} disks)",
            fmt(&at.expected),
            at.expected.len()
        ),
    );
    log.warn(
        "restore_vm",
        &format!(
            "  Latest (CP {latest}): {} ({} disks)",
            fmt(&last.expected),
            last.expected.len()
        ),
    );
    log.warn(
        "restore_vm",
        &format!("  Restoring with checkpoint {t} disk configuration."),
    );
}

/// The disks restore point `t` must produce (those with data in the backup).
pub fn disks_at(set: &BackupSet, t: u32) -> Vec<String> {
    set.point(t)
        .map(|p| p.expected.iter().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::RestorePoint;

    #[test]
    fn parse_points() {
        assert_eq!(
            RestorePoint::parse("007").ok(),
            Some(RestorePoint::Number(7))
        );
        assert_eq!(
            RestorePoint::parse("99999999999999999999999").ok(),
            Some(RestorePoint::Number(u64::MAX))
        );
        assert!(RestorePoint::parse("-1").is_err());
        assert_eq!(RestorePoint::Full.label(), "full");
    }
}
