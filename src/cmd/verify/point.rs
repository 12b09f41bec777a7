//! Restore points judged from the verified files, by the rules a restore applies: a
//! point is restorable when no checkpoint at or before it is incomplete
//! ([`BackupSet::broken_at`], what `restore::point::check_complete` refuses), every
//! file its disks' chains read passed [`walk::check`](super::walk::check), and the
//! `qcow.json` the restore would read parses. No file is read twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, ProblemKind, QcowInfo, SetKind};

use super::walk::{Checksum, FileCheck};

/// The verdict on one restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointCheck {
    /// Checkpoint number.
    pub checkpoint: u32,
    /// A restore of this point would succeed with the data the backup wrote.
    pub restorable: bool,
    /// Every file the point reads has a `.chksum` that matched.
    pub checksum_verified: bool,
    /// Why it is not restorable (the first reason, as the restore would meet it).
    pub reason: Option<String>,
    /// Not restorable only because side files (`qcow.json`) are missing: its data
    /// verified, and `--include-incomplete` restores it.
    pub side_files_only: bool,
}

/// The restore points of `set` (a full or copy set has one: 0), each judged from
/// `files` (the checks of every data file of `set`).
pub fn judge(set: &BackupSet, files: &[FileCheck]) -> Vec<PointCheck> {
    let by_path: HashMap<&Path, &FileCheck> = files.iter().map(|f| (f.path.as_path(), f)).collect();
    let mut qcow = QcowCache::default();
    let latest = set.latest();
    let points = match set.kind {
        SetKind::Incremental => &set.points[..],
        _ => &set.points[..set.points.len().min(1)],
    };
    points
        .iter()
        .map(|p| {
            let n = p.checkpoint;
            let newest = set.kind == SetKind::Incremental && Some(n) == latest;
            let data = data_of(set, n, newest, &p.expected, &by_path, &mut qcow);
            let broken = set.broken_at().filter(|b| b.checkpoint <= n);
            // the restore refuses an incomplete chain before it reads any file
            let refusal = broken
                .and_then(|b| b.problems.first())
                .map(ToString::to_string);
            let side_files_only = refusal.is_some()
                && data.reason.is_none()
                && set.points[..=n as usize].iter().all(|q| {
                    q.problems
                        .iter()
                        .all(|x| x.kind == ProblemKind::MissingQcowJson)
                });
            let reason = refusal.or(data.reason);
            PointCheck {
                checkpoint: n,
                restorable: reason.is_none(),
                checksum_verified: data.all_checksums,
                reason,
                side_files_only,
            }
        })
        .collect()
}

/// The data files any judged point reads.
pub fn files_read(set: &BackupSet) -> HashSet<PathBuf> {
    let latest = set.latest();
    let points = match set.kind {
        SetKind::Incremental => &set.points[..],
        _ => &set.points[..set.points.len().min(1)],
    };
    let mut out = HashSet::new();
    for p in points {
        let newest = set.kind == SetKind::Incremental && Some(p.checkpoint) == latest;
        for d in &p.expected {
            if let Ok(chain) = chain_of(set, d, p.checkpoint, newest) {
                out.extend(chain.into_iter().map(|f| f.path.clone()));
            }
        }
    }
    out
}

/// What the data of one point looks like, leaving the chain-completeness rule aside.
struct PointData {
    reason: Option<String>,
    all_checksums: bool,
}

fn chain_of<'s>(
    set: &'s BackupSet,
    disk: &str,
    n: u32,
    newest: bool,
) -> Result<Vec<&'s nbdfmt::StreamFile>, nbdfmt::Problem> {
    // a copy set is one self-contained image per disk, planned at point 0
    let n = if set.kind == SetKind::Copy { 0 } else { n };
    if newest {
        set.chain_with_diff(disk, n)
    } else {
        set.chain(disk, n)
    }
}

fn data_of(
    set: &BackupSet,
    n: u32,
    newest: bool,
    expected: &std::collections::BTreeSet<String>,
    by_path: &HashMap<&Path, &FileCheck>,
    qcow: &mut QcowCache,
) -> PointData {
    let mut reason: Option<String> = None;
    let mut all_checksums = !expected.is_empty();
    if expected.is_empty() {
        reason = Some("no disk of this restore point has backup data".into());
    }
    for d in expected {
        match chain_of(set, d, n, newest) {
            Err(problem) => {
                all_checksums = false;
                reason.get_or_insert_with(|| problem.to_string());
            }
            Ok(chain) => {
                for f in chain {
                    let Some(fc) = by_path.get(f.path.as_path()) else {
                        all_checksums = false;
                        reason.get_or_insert_with(|| format!("{}: not verified", f.file_name()));
                        continue;
                    };
                    if !matches!(fc.checksum, Checksum::Ok(_)) {
                        all_checksums = false;
                    }
                    if let Some(r) = fc.reason() {
                        reason.get_or_insert(r);
                    }
                }
            }
        }
        let qn = if set.kind == SetKind::Copy { 0 } else { n };
        if let Some(p) = set.qcow_json(d, qn) {
            if let Err(e) = qcow.parse(p) {
                reason.get_or_insert(e);
            }
        }
    }
    PointData {
        reason,
        all_checksums,
    }
}

/// `qcow.json` files parsed once each, as the restore's planner parses them.
#[derive(Default)]
struct QcowCache(BTreeMap<PathBuf, Result<(), String>>);

impl QcowCache {
    fn parse(&mut self, path: &Path) -> Result<(), String> {
        self.0
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let bytes = nbdfmt::small::read_small_file(path, nbdfmt::sidecar::MAX_SIDECAR_LEN)
                    .map_err(|e| format!("{name}: {e}"))?;
                QcowInfo::parse(&bytes)
                    .map(|_| ())
                    .map_err(|e| format!("{name}: {}", e.kind()))
            })
            .clone()
    }
}
