//! `--nbd-target`: the restore point's disks are written straight into NBD exports
//! (`qemu-nbd`, `nbdkit`, another host's storage) by the engine's NBD client. No VM is
//! defined. An export cannot be renamed into place, so there is no staging: the
//! export is checked (writable, large enough) before the first byte, every byte of
//! the disk is written (holes as WRITE_ZEROES, since the export is not known to be
//! zero) and read back before success is reported; on failure the log says that
//! the export holds a partial restore.

use engine::target::nbd::{NbdOptions, NbdTarget};
use engine::BlockTarget;

use crate::error::AppError;
use crate::request::{DiskSelection, NbdTargetSpec};

use super::{apply_options, check_complete, endpoint, engine_error, iec, Job, Outcome};

const COMPONENT: &str = "restore_disk";

/// Pairs every `--nbd-target` entry with a disk of restore point `t`.
pub fn resolve_targets(
    available: &[String],
    specs: &[NbdTargetSpec],
    disk_flag: Option<&DiskSelection>,
) -> Result<Vec<(String, String)>, AppError> {
    let mut out = Vec::new();
    for s in specs {
        let disk = match (&s.disk, disk_flag) {
            (Some(d), _) => d.clone(),
            (None, Some(DiskSelection::List(l))) if l.len() == 1 => l[0].clone(),
            (None, _) if available.len() == 1 => available[0].clone(),
            (None, _) => {
                return Err(AppError::Vm(format!(
                    "The restore point has {} disks ({}): name each target, e.g. --nbd-target {}=nbd://host:port/export",
                    available.len(),
                    available.join(", "),
                    available.first().map_or("vda", String::as_str)
                )))
            }
        };
        if !available.contains(&disk) {
            return Err(super::disk_not_found(&disk, available));
        }
        out.push((disk, s.uri.clone()));
    }
    Ok(out)
}

/// Restores into NBD exports.
pub fn run_nbd(
    job: &Job<'_>,
    specs: &[NbdTargetSpec],
    disk_flag: Option<&DiskSelection>,
) -> Result<Outcome, AppError> {
    let t = endpoint(job)?;
    check_complete(job, t)?;
    job.log.info(
        "restore_vm",
        "Restore mode: into NBD exports (no VM definition)",
    );
    let available = super::disks_at(job.set, t);
    let pairs = resolve_targets(&available, specs, disk_flag)?;
    for d in available
        .iter()
        .filter(|d| !pairs.iter().any(|(p, _)| p == *d))
    {
        job.log.info(
            COMPONENT,
            &format!("{d}: not restored (no --nbd-target for it)"),
        );
    }
    let newest = job.point == super::PointRequest::Latest;
    let plans = pairs
        .iter()
        .map(|(d, _)| crate::restore::plan_disk(job.set, d, t, newest))
        .collect::<engine::Result<Vec<_>>>()
        .map_err(|e| engine_error(e, "Disk restore failed"))?;
    let mut out = Outcome {
        checkpoint: t,
        disks: pairs.iter().map(|(d, _)| d.clone()).collect(),
        target_path: pairs
            .iter()
            .map(|(_, u)| u.clone())
            .collect::<Vec<_>>()
            .join(", "),
        tpm_result: "skipped",
        ..Outcome::default()
    };
    for ((d, uri), plan) in pairs.iter().zip(&plans) {
        job.log.info(
            COMPONENT,
            &format!(
                "{}{d}: {} of data from {} file(s), {} disk → {uri}",
                if job.dry_run { "[DRY RUN] " } else { "" },
                iec(plan.data_bytes()),
                plan.files.len(),
                iec(plan.virtual_size)
            ),
        );
    }
    if job.dry_run {
        out.summary = format!("Restore complete: {} [DRY RUN — no changes made]", job.vm);
        return Ok(out);
    }
    // Connect and check every export before writing any.
    let mut targets: Vec<Box<dyn BlockTarget>> = Vec::new();
    for ((d, uri), plan) in pairs.iter().zip(&plans) {
        let c = NbdTarget::connect_with(uri, NbdOptions::default()).map_err(|e| {
            AppError::Storage(format!("{d}: cannot connect to NBD export {uri}: {e}"))
        })?;
        if c.is_read_only() {
            return Err(AppError::Storage(format!(
                "{d}: NBD export {uri} is read-only"
            )));
        }
        if c.size() < plan.virtual_size {
            return Err(AppError::Storage(format!(
                "{d}: NBD export {uri} has {} bytes; the disk needs {}",
                c.size(),
                plan.virtual_size
            )));
        }
        if c.size() > plan.virtual_size {
            job.log.warn(COMPONENT, &format!(
                "{d}: NBD export {uri} is larger than the disk ({} > {} bytes); the bytes beyond are left as they are",
                c.size(),
                plan.virtual_size
            ));
        }
        targets.push(Box::new(c));
    }
    let report = engine::apply(&plans, targets, &apply_options(job)).map_err(|e| {
        job.log.error(
            COMPONENT,
            "The NBD export(s) now hold a partial restore — do not use them; rerun the restore",
        );
        engine_error(e, "Disk restore failed")
    })?;
    for d in &report.disks {
        job.log.info(
            COMPONENT,
            &format!(
                "{}: {} written, {} zeroed, read-back {} ({:.1}s)",
                d.disk,
                iec(d.bytes_written),
                iec(d.bytes_zeroed),
                if d.readback_verified {
                    "✓"
                } else {
                    "skipped"
                },
                d.duration.as_secs_f64()
            ),
        );
    }
    out.summary = format!(
        "Restore complete: {} — disk ✓ NBD export(s) written",
        job.vm
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(d: Option<&str>, u: &str) -> NbdTargetSpec {
        NbdTargetSpec {
            disk: d.map(str::to_owned),
            uri: u.to_owned(),
        }
    }

    #[test]
    fn bare_uri_goes_to_the_only_disk_or_the_disk_flag() {
        let one = vec!["vda".to_owned()];
        let two = vec!["vda".to_owned(), "vdb".to_owned()];
        let s = [spec(None, "nbd://h/x")];
        assert_eq!(
            resolve_targets(&one, &s, None).expect("one disk"),
            vec![("vda".to_owned(), "nbd://h/x".to_owned())]
        );
        assert!(resolve_targets(&two, &s, None).is_err());
        let pick = DiskSelection::List(vec!["vdb".into()]);
        assert_eq!(
            resolve_targets(&two, &s, Some(&pick)).expect("picked")[0].0,
            "vdb"
        );
        let missing = [spec(Some("vdz"), "nbd://h/x")];
        let e = resolve_targets(&two, &missing, None)
            .expect_err("missing disk")
            .to_string();
        assert!(e.contains("vdz") && e.contains("vda, vdb"), "{e}");
    }
}
