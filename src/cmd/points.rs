//! `--list-restore-points` (spec §3.2): restore points of every period (or one),
//! the archived chains under them, and `⚠ INCOMPLETE` markings from the chain
//! completeness rules (§2.8, computed by `nbdfmt::BackupSet`). Read-only; stdout
//! only; no log file, no catalogue.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nbdfmt::{BackupSet, SetKind, StreamLevel};
use serde_json::{json, Value};

use crate::cli::request::PointsRequest;
use crate::error::{AppError, ExitStatus};
use crate::host::tree;
use crate::ui::format;
use crate::ui::write_stdout;

const INCOMPLETE: &str = "⚠ INCOMPLETE";

/// One row of a restore-point table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Checkpoint number.
    pub number: u32,
    /// When the backup was taken (see [`DateSource`]).
    pub date: Option<SystemTime>,
    /// Where the date comes from.
    pub date_source: DateSource,
    /// `FULL (base)`, `Incremental`, `FULL (only)` or `COPY (offline)`.
    pub label: &'static str,
    /// Disks with a data file for this checkpoint.
    pub disks: Vec<String>,
    /// At or after the chain's first incomplete checkpoint.
    pub incomplete: bool,
    /// Side files of this point that are missing although its data is there.
    pub missing: Vec<String>,
}

/// Where a restore point's date comes from, most trustworthy first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateSource {
    /// `<creationTime>` of the checkpoint XML: when libvirt took the checkpoint.
    Checkpoint,
    /// The `date` of the stream metadata: when virtnbdbackup wrote the stream.
    Stream,
    /// A file's modification time: a copy that did not keep times shows the copy's.
    File,
    /// Nothing known.
    None,
}

impl DateSource {
    /// JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoint",
            Self::Stream => "stream",
            Self::File => "file",
            Self::None => "none",
        }
    }
}

/// The restore points of one data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The directory.
    pub dir: PathBuf,
    /// Its type.
    pub kind: SetKind,
    /// Rows in checkpoint order.
    pub rows: Vec<Row>,
    /// First incomplete checkpoint and the first failing file.
    pub broken: Option<(u32, String)>,
    /// Devices of all data files.
    pub union: Vec<String>,
}

impl Chain {
    /// Reads a data dir (an unreadable one shows as `unknown` with no rows).
    pub fn read(dir: &Path) -> Self {
        let Ok(set) = BackupSet::scan(dir) else {
            return Self {
                dir: dir.to_path_buf(),
                kind: SetKind::Unknown,
                rows: Vec::new(),
                broken: None,
                union: Vec::new(),
            };
        };
        let broken = set.broken_at().map(|p| {
            (
                p.checkpoint,
                p.problems
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        });
        let rows = match set.kind {
            SetKind::Incremental => set
                .points
                .iter()
                .map(|p| {
                    let label = if p.checkpoint == 0 {
                        "FULL (base)"
                    } else {
                        "Incremental"
                    };
                    row(&set, p.checkpoint, label, broken.as_ref())
                })
                .collect(),
            SetKind::Full => vec![row(&set, 0, "FULL (only)", broken.as_ref())],
            SetKind::Copy => vec![row(&set, 0, "COPY (offline)", broken.as_ref())],
            SetKind::Unknown => Vec::new(),
        };
        Self {
            dir: dir.to_path_buf(),
            kind: set.kind,
            rows,
            broken,
            union: set.disks.keys().cloned().collect(),
        }
    }
}

/// One restore point's row: its date from the best source there is, its disks, and
/// the side files it lacks.
fn row(set: &BackupSet, n: u32, label: &'static str, broken: Option<&(u32, String)>) -> Row {
    let (date, date_source) = point_date(set, n);
    let mut missing = Vec::new();
    if set.kind == SetKind::Incremental && !set.checkpoint_xmls.contains_key(&n) {
        missing.push(format!("checkpoints/virtnbdbackup.{n}.xml"));
    }
    Row {
        number: n,
        date,
        date_source,
        label,
        disks: set
            .point(n)
            .map(|p| p.disks.iter().cloned().collect())
            .unwrap_or_default(),
        incomplete: broken.is_some_and(|(b, _)| n >= *b),
        missing,
    }
}

/// The files whose data makes restore point `n`.
fn point_files(set: &BackupSet, n: u32) -> impl Iterator<Item = &nbdfmt::StreamFile> {
    set.disks.values().flatten().filter(move |f| match f.level {
        StreamLevel::Inc(i) => i == n,
        StreamLevel::Full | StreamLevel::Copy => n == 0,
        _ => false,
    })
}

/// When restore point `n` was taken: the checkpoint's `<creationTime>`, else the
/// stream metadata's date, else a file time (labelled as such).
pub fn point_date(set: &BackupSet, n: u32) -> (Option<SystemTime>, DateSource) {
    let created = set
        .checkpoint_xmls
        .get(&n)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|x| nbdfmt::CheckpointConfig::parse(&x).ok())
        .and_then(|c| c.creation_time);
    if let Some(t) = created {
        return (
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t)),
            DateSource::Checkpoint,
        );
    }
    let streamed = point_files(set, n)
        .filter_map(|f| f.meta())
        .find_map(|m| format::stream_time(&m.date));
    if let Some(t) = streamed {
        return (Some(t), DateSource::Stream);
    }
    let file_time = set
        .checkpoint_xmls
        .get(&n)
        .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .or_else(|| point_files(set, n).find_map(|f| f.mtime));
    match file_time {
        Some(t) => (Some(t), DateSource::File),
        None => (None, DateSource::None),
    }
}

/// An archived chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// `chain-YYYY-MM-DD[.N]`.
    pub name: String,
    /// `du -s` bytes.
    pub size: u64,
    /// Its restore points.
    pub chain: Chain,
}

/// One `── label ──` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Period name, `(accumulate)` or `(archive)`.
    pub label: String,
    /// The section's chain.
    pub chain: Chain,
    /// Archived chains, one group per `.archives` directory.
    pub archives: Vec<Vec<Archive>>,
}

/// Collects the sections for VM label `label` under `root` (§3.2).
pub fn collect(root: &Path, label: &str, period: Option<&str>) -> Result<Vec<Section>, AppError> {
    let vm_dir = root.join(label);
    if !vm_dir.is_dir() {
        return Err(AppError::ListingNotFound(format!(
            "VM not found: {}",
            vm_dir.display()
        )));
    }
    let dirs: Vec<(String, PathBuf)> = if let Some(p) = period {
        let d = vm_dir.join(p);
        if !d.is_dir() {
            return Err(AppError::ListingNotFound(format!(
                "Period not found: {}",
                d.display()
            )));
        }
        vec![(p.to_owned(), d)]
    } else if tree::has_backup_data(&vm_dir) {
        let label = if tree::is_archive(&vm_dir) {
            "(archive)"
        } else {
            "(accumulate)"
        };
        vec![(label.to_owned(), vm_dir.clone())]
    } else {
        let periods = tree::period_candidates(&vm_dir);
        if periods.is_empty() {
            return Err(AppError::ListingNotFound(format!(
                "No period directories in: {}",
                vm_dir.display()
            )));
        }
        periods
            .into_iter()
            .map(|p| (p.clone(), vm_dir.join(p)))
            .collect()
    };
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut sections = Vec::new();
    for (label, dir) in dirs {
        let mut archives = Vec::new();
        for owner in [&vm_dir, &dir] {
            let archive_dir = owner.join(".archives");
            let key = std::fs::canonicalize(&archive_dir).unwrap_or(archive_dir);
            let chains = tree::archive_chains(owner);
            if chains.is_empty() || !seen.insert(key) {
                continue;
            }
            archives.push(
                chains
                    .iter()
                    .map(|c| Archive {
                        name: c
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        size: tree::disk_usage(c),
                        chain: Chain::read(c),
                    })
                    .collect(),
            );
        }
        sections.push(Section {
            label,
            chain: Chain::read(&dir),
            archives,
        });
    }
    Ok(sections)
}

fn table(out: &mut String, chain: &Chain) {
    let rule = format!("  {}", "─".repeat(70));
    let _ = writeln!(
        out,
        "  Restore Point   Date                 Type            Disk(s)\n{rule}"
    );
    for r in &chain.rows {
        let date = r
            .date
            .map(format::local_datetime)
            .unwrap_or_else(|| "-".into());
        let mark = if r.date_source == DateSource::File {
            "*"
        } else {
            " "
        };
        let _ = write!(
            out,
            "  {:<15} {:<19}{mark} {:<15} {}",
            r.number,
            date,
            r.label,
            format::disk_set(r.disks.iter())
        );
        if r.incomplete {
            let _ = write!(out, "  {INCOMPLETE}");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{rule}\n  Total: {}", chain.rows.len());
    if chain.rows.iter().any(|r| r.date_source == DateSource::File) {
        let _ = writeln!(
            out,
            "  * file modification time: no backup time is recorded for this point"
        );
    }
    for r in chain.rows.iter().filter(|r| !r.missing.is_empty()) {
        let _ = writeln!(
            out,
            "  ⚠ Restore point {}: {} missing (its data is present)",
            r.number,
            r.missing.join(", ")
        );
    }
    if let Some((b, reason)) = &chain.broken {
        match b.checked_sub(1) {
            Some(good) => {
                let _ = writeln!(
                    out,
                    "  {INCOMPLETE}: {reason} — latest is not restorable (use --restore-point {good} or --include-incomplete)"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {INCOMPLETE}: {reason} — no restore point of this chain is restorable (--include-incomplete for forensic recovery)"
                );
            }
        }
    }
    out.push('\n');
}

/// The §3.2 text.
pub fn render(label: &str, sections: &[Section]) -> String {
    let mut out = format!("\nRestore Points: {label}\n\n");
    for s in sections {
        let mark = if s.chain.broken.is_some() {
            format!("  {INCOMPLETE}")
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "  ── {} ──\n  Directory: {}\n  Type: {}{mark}\n\n",
            s.label,
            s.chain.dir.display(),
            s.chain.kind.as_str()
        );
        table(&mut out, &s.chain);
        for group in &s.archives {
            out.push_str("  Archived Chains:\n");
            for a in group {
                let _ = write!(
                    out,
                    "    {:<30} {:>6}  {}",
                    a.name,
                    format::du_size(a.size),
                    a.chain.kind.as_str()
                );
                if !a.chain.union.is_empty() {
                    let _ = write!(out, "  [{}]", format::disk_set(a.chain.union.iter()));
                }
                if a.chain.broken.is_some() {
                    let _ = write!(out, "  {INCOMPLETE}");
                }
                out.push('\n');
                table(&mut out, &a.chain);
            }
        }
    }
    out
}

fn chain_json(c: &Chain) -> Value {
    let rows: Vec<Value> = c
        .rows
        .iter()
        .map(|r| {
            json!({
                "restore_point": r.number,
                "date": r.date.map(format::local_datetime),
                "date_source": r.date_source.as_str(),
                "mtime_epoch": r.date.and_then(|d| d.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                "missing": r.missing,
                "type": r.label,
                "disks": r.disks,
                "incomplete": r.incomplete,
            })
        })
        .collect();
    json!({
        "directory": c.dir.display().to_string(),
        "type": c.kind.as_str(),
        "disks": c.union,
        "incomplete": c.broken.as_ref().map(|(b, reason)| json!({ "broken_at": b, "reason": reason })),
        "restore_points": rows,
    })
}

/// The `--json` document (schema `vmrestore.restore-points/1`, docs/json-output.md).
pub fn to_json(label: &str, sections: &[Section]) -> Value {
    let sections: Vec<Value> = sections
        .iter()
        .map(|s| {
            let mut v = chain_json(&s.chain);
            v["label"] = json!(s.label);
            v["archived_chains"] = s
                .archives
                .iter()
                .flatten()
                .map(|a| {
                    let mut c = chain_json(&a.chain);
                    c["name"] = json!(a.name);
                    c["size_bytes"] = json!(a.size);
                    c["size"] = json!(format::du_size(a.size));
                    c
                })
                .collect();
            v
        })
        .collect();
    json!({ "schema": "vmrestore.restore-points/1", "vm": label, "sections": sections })
}

/// Runs `--list-restore-points`.
pub fn run(req: &PointsRequest) -> Result<ExitStatus, AppError> {
    let sections = collect(&req.root.path, &req.vm.label, req.period.as_deref())?;
    if req.json {
        write_stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&to_json(&req.vm.label, &sections)).unwrap_or_default()
        ));
    } else {
        write_stdout(&render(&req.vm.label, &sections));
    }
    Ok(ExitStatus::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_44_row_layout() {
        let chain = Chain {
            dir: "/b/my-vm/2026-W10".into(),
            kind: SetKind::Incremental,
            rows: vec![Row {
                number: 0,
                date: None,
                date_source: DateSource::None,
                label: "FULL (base)",
                disks: vec!["vda".into()],
                incomplete: false,
                missing: vec![],
            }],
            broken: None,
            union: vec!["vda".into()],
        };
        let text = render(
            "my-vm",
            &[Section {
                label: "2026-W10".into(),
                chain,
                archives: vec![],
            }],
        );
        let rule = format!("  {}", "─".repeat(70));
        let expected = format!(
            "\nRestore Points: my-vm\n\n  ── 2026-W10 ──\n  Directory: /b/my-vm/2026-W10\n  Type: incremental\n\n  Restore Point   Date                 Type            Disk(s)\n{rule}\n  0               -                    FULL (base)     vda\n{rule}\n  Total: 1\n\n"
        );
        assert_eq!(text, expected);
    }
}
