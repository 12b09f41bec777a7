//! `--list` (spec §3.1): one block per VM directory of the backup root, with the
//! catalogue's `Chains:` line when available. Read-only; stdout only; no log file.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nbdfmt::{BackupSet, SetKind};
use serde_json::{json, Value};

use crate::cli::request::ListRequest;
use crate::error::{AppError, ExitStatus};
use crate::host::catalogue::{self, ChainHealth};
use crate::host::tree;
use crate::ui::format;
use crate::ui::write_stdout;

/// 62 × `═`.
pub fn list_rule() -> String {
    "═".repeat(62)
}

/// What `--list` shows about one VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSummary {
    /// Directory name.
    pub name: String,
    /// `du -s` of the VM dir, bytes.
    pub size: u64,
    /// Type of the representative data dir.
    pub kind: SetKind,
    /// Restore points summed over the periods (archives excluded).
    pub points: u64,
    /// Archived chains.
    pub archives: usize,
    /// Disk set at the latest checkpoint of the representative dir.
    pub disks: Vec<String>,
    /// `.tpm-backup-marker` in the representative dir.
    pub tpm: bool,
    /// Periods, newest first; `None` for accumulate VMs.
    pub periods: Option<Vec<String>>,
    /// Catalogue summary, when available.
    pub health: Option<ChainHealth>,
}

fn scan_set(dir: &Path) -> Option<BackupSet> {
    BackupSet::scan(dir).ok()
}

/// Restore points a data dir contributes: checkpoint XMLs, or 1 for a full/copy dir
/// without any (§2.7, §3.1).
fn point_count(set: Option<&BackupSet>) -> u64 {
    let Some(set) = set else { return 0 };
    match set.checkpoint_xmls.len() {
        0 if matches!(set.kind, SetKind::Full | SetKind::Copy) => 1,
        n => n as u64,
    }
}

/// Disk set at the latest checkpoint (union when there are no checkpoint XMLs).
fn latest_disks(set: &BackupSet) -> Vec<String> {
    match set
        .checkpoint_xmls
        .keys()
        .next_back()
        .and_then(|&n| set.point(n))
    {
        Some(p) => p.disks.iter().cloned().collect(),
        None => set.disks.keys().cloned().collect(),
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Summarises one VM directory; `None` for a periodic VM without period dirs.
pub fn summarise(
    root: &Path,
    name: &str,
    health: &BTreeMap<String, ChainHealth>,
) -> Option<VmSummary> {
    let vm_dir = root.join(name);
    let accumulate = tree::has_backup_data(&vm_dir);
    let (representative, points, owners, periods) = if accumulate {
        let set = scan_set(&vm_dir);
        let points = point_count(set.as_ref());
        (vm_dir.clone(), points, vec![vm_dir.clone()], None)
    } else {
        let periods = tree::period_candidates(&vm_dir);
        if periods.is_empty() {
            return None;
        }
        let dirs: Vec<PathBuf> = periods.iter().map(|p| vm_dir.join(p)).collect();
        let points = dirs.iter().map(|d| point_count(scan_set(d).as_ref())).sum();
        // newest mtime among periods with data; ties go to the first in version order
        let mut best: Option<(SystemTime, &PathBuf)> = None;
        for d in dirs.iter().filter(|d| tree::has_backup_data(d)) {
            let t = mtime(d).unwrap_or(SystemTime::UNIX_EPOCH);
            if best.is_none_or(|(bt, _)| t > bt) {
                best = Some((t, d));
            }
        }
        let representative = best
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| dirs[0].clone());
        let mut owners = vec![vm_dir.clone()];
        owners.extend(dirs);
        (representative, points, owners, Some(periods))
    };
    let mut seen = HashSet::new();
    let archives = owners
        .iter()
        .flat_map(|o| tree::archive_chains(o))
        .filter(|c| seen.insert(std::fs::canonicalize(c).unwrap_or_else(|_| c.clone())))
        .count();
    let set = scan_set(&representative);
    Some(VmSummary {
        name: name.to_owned(),
        size: tree::disk_usage(&vm_dir),
        kind: set.as_ref().map_or(SetKind::Unknown, |s| s.kind),
        points,
        archives,
        disks: set.as_ref().map(latest_disks).unwrap_or_default(),
        tpm: representative.join(".tpm-backup-marker").exists(),
        periods,
        health: health.get(name).cloned(),
    })
}

/// Every VM of the root, in byte order.
pub fn summarise_all(root: &Path) -> Vec<VmSummary> {
    let health = catalogue::list_health(root);
    tree::vm_dirs(root)
        .iter()
        .filter_map(|n| summarise(root, n, &health))
        .collect()
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The detail line: `<type> · <R> point(s)[ · <A> archive(s)][ [disks]][ [TPM]]`.
pub fn detail_line(s: &VmSummary) -> String {
    let mut d = format!(
        "{} · {}",
        s.kind.as_str(),
        plural(s.points, "point", "points")
    );
    if s.archives > 0 {
        let _ = write!(d, " · {}", plural(s.archives as u64, "archive", "archives"));
    }
    if s.disks.len() > 1 {
        let _ = write!(d, " [{}]", format::disk_set(s.disks.iter()));
    }
    if s.tpm {
        d.push_str(" [TPM]");
    }
    d
}

/// The §3.1 text.
pub fn render(root_display: &str, vms: &[VmSummary]) -> String {
    // names come from the backup tree: control characters are shown escaped
    let mut out = format!(
        "\nAvailable VMs in: {}\n{}\n",
        format::printable(root_display),
        list_rule()
    );
    for s in vms {
        let name = format::printable(&s.name);
        let _ = write!(out, "\n  {name:<53} {:>6}\n", format::du_size(s.size));
        let _ = writeln!(out, "    {}", detail_line(s));
        if let Some(p) = &s.periods {
            let _ = writeln!(out, "    Periods: {}", format::printable(&p.join(" ")));
        }
        if let Some(h) = &s.health {
            let _ = writeln!(out, "    {}", h.line());
        }
    }
    let _ = write!(out, "\n{}\n", list_rule());
    out
}

/// The `--json` document (schema `vmrestore.list/1`, docs/json-output.md).
pub fn to_json(root_display: &str, vms: &[VmSummary]) -> Value {
    let vms: Vec<Value> = vms
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "size_bytes": s.size,
                "size": format::du_size(s.size),
                "layout": if s.periods.is_some() { "periodic" } else { "accumulate" },
                "type": s.kind.as_str(),
                "restore_points": s.points,
                "archives": s.archives,
                "disks": s.disks,
                "tpm": s.tpm,
                "periods": s.periods,
                "catalogue": s.health.as_ref().map(|h| json!({
                    "active": h.active,
                    "broken": h.broken,
                    "last_backup": h.last_backup.as_deref().map(catalogue::iso_utc),
                })),
            })
        })
        .collect();
    json!({ "schema": "vmrestore.list/1", "backup_root": root_display, "vms": vms })
}

/// Runs `--list`.
pub fn run(req: &ListRequest) -> Result<ExitStatus, AppError> {
    let root = &req.root.path;
    let shown = root.display().to_string();
    let vms = summarise_all(root);
    if vms.is_empty() {
        tracing::warn!(target: "list_vms", "No backups found in {shown}");
    }
    if req.json {
        write_stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&to_json(&shown, &vms)).unwrap_or_default()
        ));
    } else {
        write_stdout(&render(&shown, &vms));
    }
    Ok(ExitStatus::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> VmSummary {
        VmSummary {
            name: "my-vm".into(),
            size: 276 * 1024,
            kind: SetKind::Incremental,
            points: 3,
            archives: 2,
            disks: vec!["vda".into()],
            tpm: true,
            periods: Some(vec!["2026-W11".into(), "2026-W10".into()]),
            health: Some(ChainHealth {
                active: 1,
                broken: 0,
                last_backup: Some("2026-03-08 22:00:01".into()),
            }),
        }
    }

    #[test]
    fn spec_example_block() {
        let app = VmSummary {
            name: "app".into(),
            size: 36 * 1024,
            points: 2,
            archives: 1,
            tpm: false,
            periods: None,
            health: None,
            ..summary()
        };
        let web = VmSummary {
            name: "web".into(),
            size: 56 * 1024,
            kind: SetKind::Copy,
            archives: 0,
            disks: vec!["vda".into(), "sda".into()],
            tpm: false,
            periods: Some(vec![
                "20260304".into(),
                "20260303".into(),
                "20260302".into(),
            ]),
            health: None,
            ..summary()
        };
        let text = render("/mnt/backups/vm", &[app, summary(), web]);
        let rule = list_rule();
        let expected = format!(
            "\nAvailable VMs in: /mnt/backups/vm\n{rule}\n\n  app                                                      36K\n    incremental · 2 points · 1 archive\n\n  my-vm                                                   276K\n    incremental · 3 points · 2 archives [TPM]\n    Periods: 2026-W11 2026-W10\n    Chains: 1 active, 0 broken, last backup 2026-03-08T22:00:01Z\n\n  web                                                      56K\n    copy · 3 points [sda, vda]\n    Periods: 20260304 20260303 20260302\n\n{rule}\n"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn statement_34_singulars() {
        let s = VmSummary {
            points: 1,
            archives: 1,
            tpm: false,
            ..summary()
        };
        assert_eq!(detail_line(&s), "incremental · 1 point · 1 archive");
        let s = VmSummary { archives: 0, ..s };
        assert_eq!(detail_line(&s), "incremental · 1 point");
    }

    #[test]
    fn statement_40_empty_root_layout() {
        assert_eq!(
            render("B", &[]),
            format!("\nAvailable VMs in: B\n{0}\n\n{0}\n", list_rule())
        );
    }
}
