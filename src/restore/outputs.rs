//! The data path shared by every restore mode: which file each disk of a restore
//! point becomes (the original file name from the backup's domain XML, as
//! virtnbdrestore wrote it), the engine plan for each, and the staged write
//! (temporary name → synced → verified → final name).
//!
//! Policy (pre-flight checks, libvirt, locks, logging) lives in the callers; this
//! module never decides whether a restore *should* happen.

use std::path::{Path, PathBuf};

use engine::target::qcow2::{Qcow2Options, Qcow2Target};
use engine::target::raw::RawTarget;
use engine::{ApplyOptions, ApplyReport, BlockTarget, DiskPlan, StagedPath};
use nbdfmt::backupset::read_domain_config;
use nbdfmt::{BackupSet, DomainConfig, SetKind};

/// The output format of a restored disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// qcow2 with the source image's options (from `qcow.json`).
    Qcow2,
    /// A raw image (raw-format disks, or a `.raw`/`.img` name).
    Raw,
}

/// Where one disk of a restore point goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictedOutput {
    /// Disk target (`vda`).
    pub disk: String,
    /// The original source path from the domain XML, when known.
    pub source: Option<String>,
    /// File name written: the basename of the original source (or `<dev>.qcow2`).
    pub file_name: String,
    /// `<restore path>/<file_name>`.
    pub final_path: PathBuf,
    /// The format the image must have (a disk replaced in place keeps its domain's
    /// `<driver type>`); `None`: chosen from the backup and the file name.
    pub format: Option<ImageFormat>,
}

/// The domain XML for restore point `point`: the checkpoint's own vmconfig, else the
/// newest earlier one, else the copy/any vmconfig of the directory, else the §2.6
/// search (`config/*.xml` of the data dir, then of its parent — an archived copy
/// chain keeps its domain XML only there).
pub fn target_config(set: &BackupSet, point: u32) -> Option<(PathBuf, DomainConfig)> {
    let mut candidates: Vec<PathBuf> = (0..=point)
        .rev()
        .filter_map(|n| set.vmconfig(n))
        .map(Path::to_path_buf)
        .collect();
    candidates.extend(set.vmconfigs.values().cloned());
    candidates.extend(crate::host::tree::vm_config_candidates(&set.dir));
    candidates
        .into_iter()
        .find_map(|p| read_domain_config(&p).ok().map(|c| (p, c)))
}

/// The disks restore point `point` must produce, and their output names under
/// `restore_path`. Disks without data in the backup (excluded disks, CD-ROMs) are
/// not predicted.
pub fn predict_outputs(set: &BackupSet, point: u32, restore_path: &Path) -> Vec<PredictedOutput> {
    let Some(rp) = set.point(point) else {
        return Vec::new();
    };
    let config = target_config(set, point).map(|(_, c)| c);
    rp.expected
        .iter()
        .map(|disk| {
            let source = config
                .as_ref()
                .and_then(|c| c.disk(disk))
                .and_then(|d| d.source.clone());
            let file_name = source
                .as_deref()
                .and_then(|s| Path::new(s).file_name())
                .map(|n| n.to_string_lossy().into_owned())
                // backup data: a control character (a newline) would name a file
                // nobody can type; such a name falls back like an empty one
                .filter(|n| crate::host::names::unsafe_component(n).is_none())
                .unwrap_or_else(|| format!("{disk}.qcow2"));
            PredictedOutput {
                disk: disk.clone(),
                source,
                final_path: restore_path.join(&file_name),
                file_name,
                format: None,
            }
        })
        .collect()
}

/// One disk ready to be written.
#[derive(Debug)]
pub struct DiskJob {
    /// Where it goes.
    pub output: PredictedOutput,
    /// The engine plan.
    pub plan: DiskPlan,
    /// Output format.
    pub format: ImageFormat,
    /// qcow2 options (for [`ImageFormat::Qcow2`]).
    pub qcow2: Qcow2Options,
    /// True when the options fell back to qemu defaults (no `qcow.json`).
    pub default_options: bool,
    /// A salvage restore's damage (`--include-incomplete`): written beside the disk
    /// as `<disk>.damage.json`, committed with it.
    pub damage: Option<engine::salvage::DamageReport>,
}

/// The engine plan of one disk at `point`. A copy backup is one self-contained image
/// per disk, so it is always planned at point 0.
pub fn plan_disk(
    set: &BackupSet,
    disk: &str,
    point: u32,
    newest: bool,
) -> engine::Result<DiskPlan> {
    let point = if set.kind == SetKind::Copy { 0 } else { point };
    DiskPlan::for_point_with(set, disk, point, newest)
}

/// Plans every predicted output at `point` (reads frame headers only). With
/// `newest`, a differential taken after `point` is included (restores of "latest").
pub fn plan_outputs(
    set: &BackupSet,
    point: u32,
    outputs: &[PredictedOutput],
    newest: bool,
) -> engine::Result<Vec<DiskJob>> {
    outputs
        .iter()
        .map(|o| job_for(set, point, o, plan_disk(set, &o.disk, point, newest)?))
        .collect()
}

/// The job writing `plan` (of `o` at `point`): output format and image options.
pub fn job_for(
    set: &BackupSet,
    point: u32,
    o: &PredictedOutput,
    plan: DiskPlan,
) -> engine::Result<DiskJob> {
    let raw_source = plan.files.first().is_some_and(|f| f.raw_image);
    let raw_name = Path::new(&o.file_name)
        .extension()
        .is_some_and(|e| e == "raw" || e == "img");
    let format = o.format.unwrap_or(if raw_source || raw_name {
        ImageFormat::Raw
    } else {
        ImageFormat::Qcow2
    });
    let (qcow2, default_options) = match &plan.qcow {
        Some(info) => {
            // name the side file the refused option came from
            let opts = Qcow2Options::from_qcow_info(info).map_err(|e| {
                match (e, set.qcow_json(&o.disk, point)) {
                    (engine::Error::Unsupported(m), Some(p)) => {
                        engine::Error::Unsupported(format!("{}: {m}", p.display()))
                    }
                    (e, _) => e,
                }
            })?;
            (opts, false)
        }
        None => (Qcow2Options::default(), true),
    };
    Ok(DiskJob {
        output: o.clone(),
        plan,
        format,
        qcow2,
        default_options,
        damage: None,
    })
}

/// Removes (with a WARN each) the temporary files that killed restores left for
/// `final_path` (their process is gone).
pub fn warn_removed_stale(final_path: &Path) {
    for p in StagedPath::remove_stale(final_path) {
        tracing::warn!(target: "restore_disk", "Removed leftover temporary file of an interrupted restore: {}", p.display());
    }
}

/// Writes all jobs in parallel through the engine, each under a temporary name
/// beside its final path; returns them synced and verified, not yet committed
/// (dropping a [`StagedPath`] removes its file).
pub fn write_staged(
    jobs: Vec<DiskJob>,
    opts: &ApplyOptions,
) -> engine::Result<(ApplyReport, Vec<StagedPath>)> {
    // Two outputs with one name would share one temporary file (the pre-flight
    // refuses this; never write through it).
    for (i, j) in jobs.iter().enumerate() {
        if let Some(k) = jobs[..i]
            .iter()
            .find(|k| k.output.final_path == j.output.final_path)
        {
            return Err(engine::Error::Unsupported(format!(
                "{} and {} would both be restored to {}",
                k.output.disk,
                j.output.disk,
                j.output.final_path.display()
            )));
        }
    }
    let mut staged = Vec::new();
    let mut targets: Vec<Box<dyn BlockTarget>> = Vec::new();
    let mut plans = Vec::new();
    for j in jobs {
        let s = StagedPath::new(&j.output.final_path);
        // A stale temporary file from a killed run of the same PID is ours to replace.
        let _ = std::fs::remove_file(s.temp_path());
        warn_removed_stale(&j.output.final_path);
        targets.push(create_target(&j, s.temp_path())?);
        staged.push(s);
        plans.push(j.plan);
    }
    let report = engine::apply(&plans, targets, opts)?;
    Ok((report, staged))
}

/// A new image for `j` at `path`. A size the target refuses (image format limit,
/// EFBIG) came from the backup: the error names the file that declared it. Other OS
/// errors (ENOSPC, EACCES...) stay as they are.
fn create_target(j: &DiskJob, path: &Path) -> engine::Result<Box<dyn BlockTarget>> {
    let sized = |e: engine::Error| match (&e, j.plan.files.last()) {
        (engine::Error::Target { source, .. }, _)
            if source
                .raw_os_error()
                .is_some_and(|c| c != nix::errno::Errno::EFBIG as i32) =>
        {
            e
        }
        (_, None) => e,
        (_, Some(f)) => engine::Error::Unsupported(format!(
            "{}: cannot create a {}-byte image (virtualSize in {}): {e}",
            j.output.disk,
            j.plan.virtual_size,
            f.path.display()
        )),
    };
    Ok(match j.format {
        ImageFormat::Qcow2 => {
            Box::new(Qcow2Target::create(path, j.plan.virtual_size, &j.qcow2).map_err(sized)?)
        }
        ImageFormat::Raw => Box::new(RawTarget::create(path, j.plan.virtual_size).map_err(sized)?),
    })
}

/// Writes all jobs (see [`write_staged`]) and gives every output its final name
/// only after all were synced and verified; on any failure no output takes its
/// final name. With `replace`, existing final files are replaced (the caller
/// checked `--force`).
pub fn write_outputs(
    jobs: Vec<DiskJob>,
    replace: bool,
    opts: &ApplyOptions,
) -> engine::Result<(ApplyReport, Vec<PathBuf>)> {
    let damage: Vec<_> = jobs
        .iter()
        .map(|j| j.damage.clone().map(|d| (d, j.output.final_path.clone())))
        .collect();
    let (report, staged) = write_staged(jobs, opts)?;
    // a salvaged disk's damage map, staged like the disk
    let maps = damage
        .iter()
        .map(|d| {
            d.as_ref()
                .map(|(d, path)| crate::restore::damage_map::stage_map(d, path))
                .transpose()
        })
        .collect::<engine::Result<Vec<_>>>()?;
    if !replace {
        // All or nothing: refuse before the first rename if any final name is taken.
        if let Some(s) = staged
            .iter()
            .map(StagedPath::final_path)
            .chain(maps.iter().flatten().map(StagedPath::final_path))
            .find(|p| std::fs::symlink_metadata(p).is_ok())
        {
            return Err(engine::Error::target(
                "renaming into",
                s,
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
            ));
        }
    }
    let mut done = Vec::new();
    for (s, map) in staged.into_iter().zip(maps) {
        done.push(commit_with_map(s, map, replace)?);
    }
    Ok((report, done))
}

/// Commits a disk; a salvaged disk's map first (a disk under its final name always
/// has its map), taken back when the disk cannot follow. A clean disk takes away a
/// map an earlier salvage left at its name.
pub fn commit_with_map(
    disk: StagedPath,
    map: Option<StagedPath>,
    replace: bool,
) -> engine::Result<PathBuf> {
    let Some(map) = map else {
        let done = disk.commit(replace)?;
        crate::restore::damage_map::remove_stale_map(&done);
        return Ok(done);
    };
    let map = map.commit(replace)?;
    disk.commit(replace).inspect_err(|_| {
        // best effort: the map describes a disk that is not there
        let _ = std::fs::remove_file(&map);
    })
}
