//! [`RestorePlan`]: what a restore will do, as a value. Every mode has a planner
//! that gathers facts and returns one; `--dry-run` prints it ([`RestorePlan::lines`],
//! [`RestorePlan::to_json`]) and stops; [`super::execute`] runs it. The plan's
//! [`Effect`]s are what the executor reports back, so a test can hold one against
//! the other.

use std::path::PathBuf;

use engine::DiskPlan;
use serde_json::{json, Value};

pub mod steps;

pub use steps::{
    Definition, Identity, InPlace, InstantBoot, NbdWrite, NvramInstall, ServePlan, TestBootSpec,
    TpmRestore, TpmUuid,
};

use crate::restore::outputs::{DiskJob, ImageFormat};
use crate::restore::point::RestorePoint;
use crate::ui::format::iec_size;

/// One restore, planned.
#[derive(Debug)]
pub struct RestorePlan {
    /// The VM name of the backup.
    pub vm: String,
    /// The mode (`dr`, `clone`, ...).
    pub mode: &'static str,
    /// The restore point as asked.
    pub point: RestorePoint,
    /// The checkpoint it resolved to.
    pub checkpoint: u32,
    /// What will be done, in order.
    pub actions: Vec<Action>,
    /// Checks that failed: a real run stops at the first; a dry run prints them all.
    pub refusals: Vec<String>,
    /// What the run reports when it succeeds.
    pub report: Report,
}

/// What a finished run reports (summary line, catalogue row, JSON).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Devices restored or attempted.
    pub disks: Vec<String>,
    /// Target path column (restore path, the original disk paths, or NBD URIs).
    pub target_path: String,
    /// The new domain name (clone, instant boot).
    pub target_name: Option<String>,
    /// TPM result when no TPM step runs (`skipped`, `none`).
    pub tpm_result: &'static str,
    /// How the success line reads.
    pub summary: Summary,
}

/// The success line of each mode (spec §3.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Summary {
    /// `Restore complete: vm — disk ✓ defined ✓ UUID ✓ MACs ✓`.
    #[default]
    Dr,
    /// `... — disk ✓ defined ✓ new identity ✓`.
    Clone,
    /// `... — disk ✓ data-only`.
    DataOnly,
    /// `Disk restore complete: vm/disks — all ✓`.
    DiskInPlace,
    /// `Disk extract complete: vm/disks → dir`.
    DiskExtract,
    /// `... — disk ✓ NBD export(s) written`.
    Nbd,
    /// Set by the instant-boot runtime.
    InstantBoot,
    /// Set by the test-boot runtime.
    TestBoot,
    /// Set by the server.
    Serve,
}

/// One step of a plan.
#[derive(Debug)]
pub enum Action {
    /// Create the restore directory.
    CreateDir(PathBuf),
    /// New images under staged names; all take their final names together, after
    /// every one was synced and read back. `replace`: `--force` allows replacing.
    WriteImages {
        /// The disks.
        jobs: Vec<DiskJob>,
        /// Existing final files may be replaced.
        replace: bool,
    },
    /// Replace one disk of a defined, shut-off VM in place.
    ReplaceDisk(InPlace),
    /// Write disks into NBD exports.
    WriteNbd(Vec<NbdWrite>),
    /// Move the existing NVRAM file aside (`.before-restore.<epoch>`).
    SaveNvram(PathBuf),
    /// Move the existing domain's TPM state aside (`<uuid>.pre-restore-<epoch>`)
    /// before it is undefined: libvirt would delete it.
    SaveTpm(PathBuf),
    /// Undefine the existing domain of that name (`--force`).
    Undefine(String),
    /// Put the checkpoint's NVRAM copy in place.
    InstallNvram(NvramInstall),
    /// Define the domain.
    Define(Definition),
    /// Put the TPM state in place.
    RestoreTpm(TpmRestore),
    /// Rescan the active storage pool that holds this directory.
    RefreshPool(PathBuf),
    /// Stop an interrupted instant boot's clone and remove its files.
    ClearLeftover {
        /// The transient domain.
        name: String,
        /// Its overlays and NVRAM copy.
        files: Vec<PathBuf>,
    },
    /// Serve the disks over NBD, boot a transient clone on overlays, wait.
    InstantBoot(Box<InstantBoot>),
    /// Serve the disks read-only over NBD until interrupted.
    Serve(ServePlan),
}

/// What one executed action did; the plan predicts the same list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Effect {
    /// Verb (`create-dir`, `write`, `replace`, `undefine`, `define`, ...).
    pub action: &'static str,
    /// What it acted on (a path, a domain name, a URI).
    pub object: String,
}

impl Effect {
    /// An effect on `object`.
    pub fn new(action: &'static str, object: impl Into<String>) -> Self {
        Self {
            action,
            object: object.into(),
        }
    }
}

fn file_names(plan: &DiskPlan) -> Vec<String> {
    plan.files
        .iter()
        .map(|f| {
            f.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// The dry-run line of one disk write (spec wording kept from 0.7).
fn write_line(job: &DiskJob) -> String {
    let names = file_names(&job.plan);
    format!(
        "{}: would read {} file(s) ({}), {} in total, and write {} of data to {}",
        job.output.disk,
        names.len(),
        names.join(", "),
        iec_size(job.plan.file_bytes()),
        iec_size(job.plan.data_bytes()),
        job.output.final_path.display()
    )
}

impl Action {
    /// What this action will do, as dry-run lines (without the `[DRY RUN] ` prefix).
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::CreateDir(d) => vec![format!("Would create directory {}", d.display())],
            Self::WriteImages { jobs, replace } => {
                let mut v: Vec<String> = jobs.iter().map(write_line).collect();
                v.extend(jobs.iter().filter_map(crate::restore::salvage::plan_line));
                if *replace {
                    v.extend(
                        jobs.iter()
                            .map(|j| &j.output.final_path)
                            .filter(|p| p.exists())
                            .map(|p| format!("Would replace existing file: {}", p.display())),
                    );
                }
                v
            }
            Self::ReplaceDisk(r) => in_place_lines(r),
            Self::WriteNbd(w) => w
                .iter()
                .map(|w| {
                    format!(
                        "{}: {} of data from {} file(s), {} disk → {}",
                        w.disk,
                        iec_size(w.plan.data_bytes()),
                        w.plan.files.len(),
                        iec_size(w.plan.virtual_size),
                        w.uri
                    )
                })
                .collect(),
            Self::SaveNvram(p) => vec![format!("Would save existing NVRAM {} aside", p.display())],
            Self::SaveTpm(d) => vec![format!(
                "Would keep the existing TPM state {} as {}.pre-restore-<time>",
                d.display(),
                d.display()
            )],
            Self::Undefine(n) => vec![format!("Would undefine existing VM: {n}")],
            Self::InstallNvram(n) => vec![format!(
                "Would restore NVRAM: {} → {}",
                n.pick.source.display(),
                n.dest.display()
            )],
            Self::Define(d) => vec![match &d.identity {
                Identity::Original { .. } => {
                    format!("Would define '{}' from {}", d.name, d.source.display())
                }
                Identity::New => format!("Would define '{}' with new UUID and MACs", d.name),
            }],
            Self::RestoreTpm(t) => vec![format!(
                "Would restore TPM: {}/tpm-state → {}",
                t.data_dir.display(),
                t.root.join(t.uuid.planned_label()).display()
            )],
            Self::RefreshPool(d) => vec![format!(
                "Would refresh the storage pool holding {}",
                d.display()
            )],
            Self::ClearLeftover { name, files } => vec![format!(
                "Would stop the leftover instant-boot VM '{name}' and remove {}",
                join_paths(files)
            )],
            Self::InstantBoot(b) => b.lines(),
            Self::Serve(s) => s.lines(),
        }
    }

    /// What executing this action will have done.
    pub fn effects(&self) -> Vec<Effect> {
        match self {
            Self::CreateDir(d) => vec![Effect::new("create-dir", d.display().to_string())],
            Self::WriteImages { jobs, .. } => jobs
                .iter()
                .map(|j| Effect::new("write", j.output.final_path.display().to_string()))
                .chain(
                    jobs.iter()
                        .filter_map(crate::restore::salvage::Salvaged::of)
                        .map(|s| Effect::new("write-damage-map", s.map.display().to_string())),
                )
                .collect(),
            Self::ReplaceDisk(r) => vec![Effect::new("replace", r.path.display().to_string())],
            Self::WriteNbd(w) => w.iter().map(|w| Effect::new("write-nbd", &w.uri)).collect(),
            Self::SaveNvram(p) => vec![Effect::new("save-nvram", p.display().to_string())],
            Self::SaveTpm(d) => vec![Effect::new("save-tpm", d.display().to_string())],
            Self::Undefine(n) => vec![Effect::new("undefine", n)],
            Self::InstallNvram(n) => {
                vec![Effect::new("install-nvram", n.dest.display().to_string())]
            }
            Self::Define(d) => vec![Effect::new("define", &d.name)],
            Self::RestoreTpm(t) => vec![Effect::new("restore-tpm", &t.vm_label)],
            Self::RefreshPool(d) => vec![Effect::new("refresh-pool", d.display().to_string())],
            Self::ClearLeftover { name, .. } => vec![Effect::new("clear-leftover", name)],
            Self::InstantBoot(b) => vec![Effect::new("instant-boot", &b.name)],
            Self::Serve(_) => vec![Effect::new("serve", "nbd")],
        }
    }

    /// The action as a JSON object.
    pub fn to_json(&self) -> Value {
        let (verb, detail) = match self {
            Self::CreateDir(d) => ("create-dir", json!({ "path": d })),
            Self::WriteImages { jobs, replace } => (
                "write-images",
                json!({ "replace": replace, "disks": jobs.iter().map(job_json).collect::<Vec<_>>() }),
            ),
            Self::ReplaceDisk(r) => (
                "replace-disk",
                json!({ "path": r.path, "rollback": r.rollback, "disk": r.output.disk, "block_device": r.device }),
            ),
            Self::WriteNbd(w) => (
                "write-nbd",
                json!({ "targets": w.iter().map(|w| json!({
                    "disk": w.disk, "uri": w.uri, "files": file_names(&w.plan),
                    "data_bytes": w.plan.data_bytes(), "virtual_size": w.plan.virtual_size,
                })).collect::<Vec<_>>() }),
            ),
            Self::SaveNvram(p) => ("save-nvram", json!({ "path": p })),
            Self::SaveTpm(d) => ("save-tpm", json!({ "dir": d })),
            Self::Undefine(n) => ("undefine", json!({ "name": n })),
            Self::InstallNvram(n) => (
                "install-nvram",
                json!({ "source": n.pick.source, "dest": n.dest, "checkpoint": n.pick.checkpoint }),
            ),
            Self::Define(d) => (
                "define",
                json!({ "name": d.name, "source": d.source,
                        "identity": if d.identity == Identity::New { "new" } else { "original" } }),
            ),
            Self::RestoreTpm(t) => (
                "restore-tpm",
                json!({ "vm": t.vm_label, "uuid": t.uuid.planned_label(), "root": t.root }),
            ),
            Self::RefreshPool(d) => ("refresh-pool", json!({ "dir": d })),
            Self::ClearLeftover { name, files } => {
                ("clear-leftover", json!({ "name": name, "files": files }))
            }
            Self::InstantBoot(b) => ("instant-boot", b.to_json()),
            Self::Serve(s) => ("serve", s.to_json()),
        };
        let mut v = json!({ "action": verb });
        if let (Some(o), Value::Object(d)) = (v.as_object_mut(), detail) {
            o.extend(d);
        }
        v
    }
}

fn join_paths(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn job_json(j: &DiskJob) -> Value {
    let mut v = json!({
        "disk": j.output.disk,
        "path": j.output.final_path,
        "format": if j.format == ImageFormat::Raw { "raw" } else { "qcow2" },
        "files": file_names(&j.plan),
        "file_bytes": j.plan.file_bytes(),
        "data_bytes": j.plan.data_bytes(),
        "virtual_size": j.plan.virtual_size,
    });
    if let (Some(s), Some(o)) = (crate::restore::salvage::Salvaged::of(j), v.as_object_mut()) {
        o.insert("salvage".into(), json!(s));
    }
    v
}

fn in_place_lines(r: &InPlace) -> Vec<String> {
    let p = &r.path;
    let mut v = vec![format!("Disk restore: {}", r.output.disk)];
    v.push(match (&r.rollback, r.device) {
        (Some(pre), false) => format!("Would rename: {} → {}", p.display(), pre.display()),
        (Some(pre), true) => format!(
            "Would save the current content of block device {} to {}",
            p.display(),
            pre.display()
        ),
        (None, false) => format!(
            "Would remove existing disk (--no-pre-restore): {}",
            p.display()
        ),
        (None, true) => format!(
            "Would overwrite block device {} without a rollback image (--no-pre-restore)",
            p.display()
        ),
    });
    v.push(format!("Would restore to: {}", p.display()));
    v
}

impl RestorePlan {
    /// Every action's dry-run lines, in order.
    pub fn lines(&self) -> Vec<String> {
        self.actions.iter().flat_map(Action::lines).collect()
    }

    /// The disks a salvage restore would write partially.
    pub fn salvaged(&self) -> Vec<crate::restore::salvage::Salvaged> {
        self.actions
            .iter()
            .flat_map(|a| match a {
                Action::WriteImages { jobs, .. } => jobs.as_slice(),
                _ => &[],
            })
            .filter_map(crate::restore::salvage::Salvaged::of)
            .collect()
    }

    /// What executing the plan will have done, in order.
    pub fn effects(&self) -> Vec<Effect> {
        self.actions.iter().flat_map(Action::effects).collect()
    }

    /// The plan as a JSON object (`--dry-run --json`).
    pub fn to_json(&self) -> Value {
        json!({
            "vm": self.vm,
            "mode": self.mode,
            "restore_point": self.point.label(),
            "checkpoint": self.checkpoint,
            "actions": self.actions.iter().map(Action::to_json).collect::<Vec<_>>(),
            "effects": self.effects(),
            "refusals": self.refusals,
        })
    }
}
