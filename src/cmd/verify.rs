//! `--verify` (spec §4.16, natively): "this restore point will restore". Every data
//! file of the chosen data dir goes through the restore's own read pass
//! (`walk`: frame headers, trailer, sizes, every payload read and LZ4-decoded, the
//! adler32 against its `.chksum`); the restore points are then judged from those
//! results and the chain checks a restore makes (`point`: missing incrementals,
//! `.partial` leftovers, broken links, completeness, `qcow.json`). Never writes.
//!
//! Exit 6 when any restore point is not restorable or any file is damaged, naming the
//! file and byte offset. A pass says exactly what was proven: a file without `.chksum`
//! (virtnbdbackup 1.9.x, raw copies) is structurally verified only, and the summary
//! says so. SIGINT/SIGTERM stop a long verify (the engine watches the same `Cancel`).

mod point;
mod walk;

use std::collections::BTreeSet;
use std::path::Path;

use engine::Cancel;
use nbdfmt::checksum::chksum_path;
use nbdfmt::{BackupFile, BackupSet};
use serde_json::{json, Value};

use crate::error::AppError;
use crate::ui::log;
use crate::ui::write_stdout;

pub use point::PointCheck;
pub use walk::{Checksum, FileCheck, Structure};

/// Verifies every data file and restore point of `data_dir`. Logs one line per file
/// and a summary; `Err` (exit 6) when anything is not restorable.
pub fn run(data_dir: &Path, json_out: bool, cancel: &Cancel) -> Result<(), AppError> {
    let set = crate::host::tree::scan_set(data_dir)?;
    let mut files = Vec::new();
    for f in set.disks.values().flatten() {
        if let Some(sig) = cancel.signal() {
            return Err(AppError::Interrupted(sig));
        }
        let check = walk::check(f, cancel)?;
        log_file(&check);
        files.push(check);
    }
    let orphans = orphan_checksums(data_dir, &set);
    for orphan in &orphans {
        tracing::warn!(target: "verify", "Checksum file without data file: {orphan}");
    }
    let points = point::judge(&set, &files);
    let read = point::files_read(&set);
    let verdict = Verdict::new(&files, &points, |f| read.contains(&f.path));
    verdict.log_details(&points);
    if json_out {
        let doc = json_doc(data_dir, &files, &points, &orphans, &verdict);
        let text = format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        );
        write_stdout(&text);
        log::append_raw(&text);
    }
    if verdict.passed {
        tracing::info!(target: "verify", "{}", verdict.summary);
        Ok(())
    } else {
        Err(AppError::engine(verdict.summary))
    }
}

/// One log line per verified file.
fn log_file(c: &FileCheck) {
    let name = &c.name;
    match (&c.structure, &c.checksum) {
        (Structure::Ok, Checksum::Ok(v)) => {
            tracing::info!(target: "verify", "Structure OK, checksum OK: {name} (adler32 {v})");
        }
        (Structure::Ok, Checksum::NotRecorded) if c.compressed => {
            tracing::info!(target: "verify", "Structure OK, no checksum recorded: {name} (LZ4 frame checksums verified)");
        }
        (Structure::Ok, Checksum::NotRecorded) => {
            tracing::info!(target: "verify", "Structure OK, no checksum recorded: {name} (payload bytes not verifiable)");
        }
        (Structure::Ok, Checksum::Mismatch { stored, computed }) => {
            tracing::error!(target: "verify", "Structure OK, checksum MISMATCH: {name} (stored {stored}, computed {computed})");
        }
        (Structure::Ok, Checksum::Error(e)) => {
            tracing::error!(target: "verify", "Structure OK, checksum not verifiable: {name}: {e}");
        }
        (Structure::Damaged { reason, .. }, ck) => {
            let note = match ck {
                Checksum::Ok(_) => "checksum matches: the backup wrote the file this way",
                Checksum::Mismatch { .. } => "checksum MISMATCH: the file changed after the backup",
                Checksum::NotRecorded => "no checksum recorded",
                Checksum::Error(_) => "checksum not verifiable",
            };
            tracing::error!(target: "verify", "Structure DAMAGED: {name}: {reason} ({note})");
        }
    }
}

/// The outcome of a verification, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Every restore point is restorable and no file is damaged.
    pub passed: bool,
    /// The final line (`Verification passed: …` / `Verification FAILED: …`).
    pub summary: String,
    /// Groups of not restorable points with their reason, in checkpoint order.
    pub groups: Vec<(Vec<u32>, String)>,
}

impl Verdict {
    /// Judges `files` and `points`; `read(f)` says whether a restore point reads `f`
    /// (damage elsewhere still fails the verification).
    pub fn new(
        files: &[FileCheck],
        points: &[PointCheck],
        read: impl Fn(&FileCheck) -> bool,
    ) -> Self {
        let mut groups: Vec<(Vec<u32>, String)> = Vec::new();
        for p in points.iter().filter(|p| !p.restorable) {
            let reason = p.reason.clone().unwrap_or_default();
            match groups.last_mut() {
                Some((ns, r)) if *r == reason && ns.last().map(|l| l + 1) == Some(p.checkpoint) => {
                    ns.push(p.checkpoint);
                }
                _ => groups.push((vec![p.checkpoint], reason)),
            }
        }
        let good: Vec<u32> = points
            .iter()
            .filter(|p| p.restorable)
            .map(|p| p.checkpoint)
            .collect();
        let all: Vec<u32> = points.iter().map(|p| p.checkpoint).collect();
        let unread_damage = files.iter().find(|f| f.damaged() && !read(f));
        let (passed, summary) = if all.is_empty() {
            (
                false,
                "Verification FAILED: no restore point found".to_owned(),
            )
        } else if let Some((_, reason)) = groups.first() {
            let bad_all: Vec<u32> = groups.iter().flat_map(|(ns, _)| ns.clone()).collect();
            let good_part = if good.is_empty() {
                "no restore point is restorable".to_owned()
            } else {
                format!("{} restorable", points_are(&good))
            };
            let more = if groups.len() > 1 {
                format!(" (first of {} reasons, see above)", groups.len())
            } else {
                String::new()
            };
            (
                false,
                format!(
                    "Verification FAILED: {} not restorable: {reason}{more}; {good_part}",
                    points_are(&bad_all)
                ),
            )
        } else if let Some(f) = unread_damage {
            (
                false,
                format!(
                    "Verification FAILED: {} — every restore point is restorable ({}), but this file is damaged",
                    f.reason().unwrap_or_default(),
                    ranges(&all)
                ),
            )
        } else {
            (
                true,
                format!(
                    "Verification passed: every restore point is restorable ({}){}",
                    ranges(&all),
                    checksum_words(files)
                ),
            )
        };
        Self {
            passed,
            summary,
            groups,
        }
    }

    /// ERROR lines for each group of not restorable points when there is more than
    /// one reason, and the `--include-incomplete` hint for points whose data verified.
    fn log_details(&self, points: &[PointCheck]) {
        if self.groups.len() > 1 {
            for (ns, reason) in &self.groups {
                tracing::error!(target: "verify", "{} NOT restorable: {reason}", capitalise(&points_are(ns)));
            }
        }
        let side: Vec<u32> = points
            .iter()
            .filter(|p| p.side_files_only)
            .map(|p| p.checkpoint)
            .collect();
        if !side.is_empty() {
            tracing::warn!(target: "verify", "{} only side files: the data verified, and --include-incomplete restores them", capitalise(&points_lack(&side)));
        }
    }
}

/// What the checksums proved, after "every restore point is restorable (…)". A file
/// without `.chksum` is verified by its structure only: a compressed one still has
/// its LZ4 frame checksums, an uncompressed one nothing that covers its payload bytes.
fn checksum_words(files: &[FileCheck]) -> String {
    let total = files.len();
    let count = |pick: &dyn Fn(&FileCheck) -> bool| files.iter().filter(|f| pick(f)).count();
    let ok = count(&|f| matches!(f.checksum, Checksum::Ok(_)));
    let plain = count(&|f| f.checksum == Checksum::NotRecorded && !f.compressed);
    let lz4 = count(&|f| f.checksum == Checksum::NotRecorded && f.compressed);
    let verified = match ok {
        1 => "1 checksum verified".to_owned(),
        n => format!("{n} checksums verified"),
    };
    if ok == total {
        return format!("; {verified}");
    }
    let missing = total - ok;
    let (it, its) = if missing == 1 {
        ("it", "its")
    } else {
        ("them", "their")
    };
    let all = ok == 0;
    let guard = match (plain, lz4) {
        (_, 0) if all => "payload bit rot cannot be detected".to_owned(),
        (_, 0) => format!("payload bit rot in {it} cannot be detected"),
        (0, _) if all => "only the LZ4 frame checksums guard the payloads".to_owned(),
        (0, _) => format!("only LZ4 frame checksums guard {its} payloads"),
        (p, c) => format!(
            "payload bit rot cannot be detected in the {p} uncompressed one{}; only LZ4 frame checksums guard the other {c}",
            if p == 1 { "" } else { "s" }
        ),
    };
    if all {
        format!(", structure verified; no checksums recorded — {guard}")
    } else {
        let have = if missing == 1 { "has" } else { "have" };
        format!(
            ", structure verified; {verified}, {missing} of {total} files {have} no recorded checksum — {guard}"
        )
    }
}

/// `0..2, 5` for checkpoints 0, 1, 2, 5 (sorted input).
pub fn ranges(ns: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ns.len() {
        let mut j = i;
        while j + 1 < ns.len() && ns[j + 1] == ns[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            ns[i].to_string()
        } else {
            format!("{}..{}", ns[i], ns[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

/// `restore point 3 is` / `restore points 3..4 are`.
fn points_are(ns: &[u32]) -> String {
    match ns {
        [one] => format!("restore point {one} is"),
        _ => format!("restore points {} are", ranges(ns)),
    }
}

/// `restore point 3 lacks` / `restore points 3..4 lack`.
fn points_lack(ns: &[u32]) -> String {
    match ns {
        [one] => format!("restore point {one} lacks"),
        _ => format!("restore points {} lack", ranges(ns)),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The `vmrestore.verify/2` document (docs/json-output.md); `status` and `error` per
/// file keep their `verify/1` meaning.
fn json_doc(
    data_dir: &Path,
    files: &[FileCheck],
    points: &[PointCheck],
    orphans: &[String],
    verdict: &Verdict,
) -> Value {
    let files: Vec<Value> = files
        .iter()
        .map(|f| {
            let (checksum, stored, computed, error) = match &f.checksum {
                Checksum::Ok(v) => ("ok", Some(*v), Some(*v), None),
                Checksum::NotRecorded => ("not_recorded", None, None, None),
                Checksum::Mismatch { stored, computed } => {
                    ("mismatch", Some(*stored), Some(*computed), None)
                }
                Checksum::Error(e) => ("error", None, None, Some(e.clone())),
            };
            let (structure, damage) = match &f.structure {
                Structure::Ok => ("ok", Value::Null),
                Structure::Damaged { offset, reason } => {
                    ("damaged", json!({ "offset": offset, "reason": reason }))
                }
            };
            json!({
                "file": f.name,
                "disk": f.disk,
                "checkpoint": f.level.checkpoint(),
                "structure": structure,
                "damage": damage,
                "checksum": checksum,
                "stored": stored,
                "computed": computed,
                "status": checksum,
                "error": error,
            })
        })
        .collect();
    let points: Vec<Value> = points
        .iter()
        .map(|p| {
            json!({
                "restore_point": p.checkpoint,
                "restorable": p.restorable,
                "checksum_verified": p.checksum_verified,
                "reason": p.reason,
            })
        })
        .collect();
    json!({
        "schema": "vmrestore.verify/2",
        "data_dir": data_dir.display().to_string(),
        "passed": verdict.passed,
        "summary": verdict.summary,
        "files": files,
        "restore_points": points,
        "orphan_checksums": orphans,
    })
}

/// `.chksum` files whose data file is not in the set (deleted or renamed data).
fn orphan_checksums(dir: &Path, set: &BackupSet) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let known: std::collections::HashSet<_> = set
        .disks
        .values()
        .flatten()
        .map(|f| chksum_path(&f.path))
        .collect();
    let v: BTreeSet<String> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let is_chksum = matches!(BackupFile::parse(&name), BackupFile::Checksum { .. });
            (is_chksum && !known.contains(&e.path())).then_some(name)
        })
        .collect();
    v.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbdfmt::StreamLevel;

    fn file(n: u32, compressed: bool, checksum: Checksum) -> FileCheck {
        FileCheck {
            path: format!("/b/vda.inc.virtnbdbackup.{n}.data").into(),
            name: format!("vda.inc.virtnbdbackup.{n}.data"),
            disk: "vda".into(),
            level: StreamLevel::Inc(n),
            compressed,
            structure: Structure::Ok,
            checksum,
        }
    }

    fn point(n: u32, reason: Option<&str>) -> PointCheck {
        PointCheck {
            checkpoint: n,
            restorable: reason.is_none(),
            checksum_verified: false,
            reason: reason.map(str::to_owned),
            side_files_only: false,
        }
    }

    fn pass(files: &[FileCheck]) -> String {
        let points = [point(0, None), point(1, None)];
        let v = Verdict::new(files, &points, |_| true);
        assert!(v.passed, "{}", v.summary);
        v.summary
    }

    #[test]
    fn a_pass_says_what_the_checksums_proved() {
        let ok = |n| file(n, false, Checksum::Ok(7));
        let plain = |n| file(n, false, Checksum::NotRecorded);
        let lz4 = |n| file(n, true, Checksum::NotRecorded);
        let head = "Verification passed: every restore point is restorable (0..1)";
        assert_eq!(
            pass(&[ok(0), ok(1)]),
            format!("{head}; 2 checksums verified")
        );
        assert_eq!(pass(&[ok(0)]), format!("{head}; 1 checksum verified"));
        assert_eq!(
            pass(&[plain(0), plain(1)]),
            format!("{head}, structure verified; no checksums recorded — payload bit rot cannot be detected")
        );
        assert_eq!(
            pass(&[lz4(0), lz4(1)]),
            format!("{head}, structure verified; no checksums recorded — only the LZ4 frame checksums guard the payloads")
        );
        assert_eq!(
            pass(&[plain(0), lz4(1), lz4(2)]),
            format!("{head}, structure verified; no checksums recorded — payload bit rot cannot be detected in the 1 uncompressed one; only LZ4 frame checksums guard the other 2")
        );
        assert_eq!(
            pass(&[ok(0), plain(1)]),
            format!("{head}, structure verified; 1 checksum verified, 1 of 2 files has no recorded checksum — payload bit rot in it cannot be detected")
        );
        assert_eq!(
            pass(&[ok(0), lz4(1), lz4(2)]),
            format!("{head}, structure verified; 1 checksum verified, 2 of 3 files have no recorded checksum — only LZ4 frame checksums guard their payloads")
        );
    }

    #[test]
    fn a_failure_names_the_bad_and_the_good_points() {
        let files = [file(0, false, Checksum::Ok(1))];
        let points = [
            point(0, None),
            point(1, None),
            point(2, Some("missing x")),
            point(3, Some("missing x")),
            point(4, Some("y: LZ4 error in payload at byte 9: z")),
        ];
        let v = Verdict::new(&files, &points, |_| true);
        assert!(!v.passed);
        assert_eq!(v.summary, "Verification FAILED: restore points 2..4 are not restorable: missing x (first of 2 reasons, see above); restore points 0..1 are restorable");
        assert_eq!(v.groups.len(), 2);
        let v = Verdict::new(&files, &[point(0, Some("r"))], |_| true);
        assert_eq!(
            v.summary,
            "Verification FAILED: restore point 0 is not restorable: r; no restore point is restorable"
        );
        let v = Verdict::new(&files, &[], |_| true);
        assert!(!v.passed);
    }

    #[test]
    fn damage_no_point_reads_fails_too() {
        let mut bad = file(5, true, Checksum::NotRecorded);
        bad.structure = Structure::Damaged {
            offset: Some(40),
            reason: "invalid frame header at byte 40".into(),
        };
        let v = Verdict::new(&[bad], &[point(0, None)], |_| false);
        assert!(!v.passed);
        assert_eq!(v.summary, "Verification FAILED: vda.inc.virtnbdbackup.5.data: invalid frame header at byte 40 — every restore point is restorable (0), but this file is damaged");
    }

    #[test]
    fn ranges_collapse_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..2, 5, 7..8");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[]), "");
        assert_eq!(points_are(&[3, 4]), "restore points 3..4 are");
        assert_eq!(points_are(&[0]), "restore point 0 is");
    }
}
