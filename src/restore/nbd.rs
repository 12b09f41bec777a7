//! `--nbd-target`: the restore point's disks are written straight into NBD exports
//! (`qemu-nbd`, `nbdkit`, another host's storage) by the engine's NBD client. No VM is
//! defined. An export cannot be renamed into place, so there is no staging: the
//! export is checked (writable, large enough) before the first byte, every byte of
//! the disk is written (holes as WRITE_ZEROES, since the export is not known to be
//! zero) and read back before success is reported; on failure the log says that
//! the export holds a partial restore.

use engine::target::nbd::{NbdOptions, NbdTarget};
use engine::BlockTarget;

use crate::cli::request::{DiskSelection, NbdTargetSpec};
use crate::error::{engine_error, AppError};
use crate::restore::disk::disk_not_found;
use crate::restore::dr::endpoint;
use crate::restore::plan::{Action, NbdWrite, Report, RestorePlan, Summary};
use crate::restore::point::disks_at;
use crate::restore::Context;
use crate::ui::format::iec_size;

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
            return Err(disk_not_found(&disk, available));
        }
        out.push((disk, s.uri.clone()));
    }
    Ok(out)
}

/// Plans a restore into NBD exports.
pub(super) fn plan_nbd(
    ctx: &Context<'_>,
    specs: &[NbdTargetSpec],
    disk_flag: Option<&DiskSelection>,
) -> Result<RestorePlan, AppError> {
    let t = endpoint(ctx)?;
    ctx.log.info(
        "restore_vm",
        "Restore mode: into NBD exports (no VM definition)",
    );
    let available = disks_at(ctx.set, t);
    let pairs = resolve_targets(&available, specs, disk_flag)?;
    for d in available
        .iter()
        .filter(|d| !pairs.iter().any(|(p, _)| p == *d))
    {
        ctx.log.info(
            COMPONENT,
            &format!("{d}: not restored (no --nbd-target for it)"),
        );
    }
    let newest = !ctx.point.is_explicit();
    let mut writes = Vec::new();
    for (disk, uri) in pairs {
        let plan = crate::restore::outputs::plan_disk(ctx.set, &disk, t, newest)
            .map_err(|e| engine_error(e, "Disk restore failed"))?;
        writes.push(NbdWrite { disk, uri, plan });
    }
    let report = Report {
        disks: writes.iter().map(|w| w.disk.clone()).collect(),
        target_path: writes
            .iter()
            .map(|w| w.uri.clone())
            .collect::<Vec<_>>()
            .join(", "),
        target_name: None,
        tpm_result: "skipped",
        summary: Summary::Nbd,
    };
    Ok(RestorePlan {
        vm: ctx.vm.clone(),
        mode: "nbd",
        point: ctx.point,
        checkpoint: t,
        report,
        actions: vec![Action::WriteNbd(writes)],
        refusals: Vec::new(),
    })
}

/// Connects to and checks every export (writable, large enough) before writing any;
/// then writes every byte of each disk and reads it back.
pub(super) fn write(ctx: &Context<'_>, action: Action) -> Result<(), AppError> {
    for line in action.lines() {
        ctx.log.info(COMPONENT, &line);
    }
    let Action::WriteNbd(writes) = action else {
        return Err(AppError::Internal(
            "nbd::write takes a WriteNbd action".into(),
        ));
    };
    let mut targets: Vec<Box<dyn BlockTarget>> = Vec::new();
    for w in &writes {
        targets.push(Box::new(connect(ctx, w)?));
    }
    let plans: Vec<engine::DiskPlan> = writes.into_iter().map(|w| w.plan).collect();
    let report = engine::apply(&plans, targets, &ctx.apply_options()).map_err(|e| {
        ctx.log.error(
            COMPONENT,
            "The NBD export(s) now hold a partial restore — do not use them; rerun the restore",
        );
        engine_error(e, "Disk restore failed")
    })?;
    for d in &report.disks {
        ctx.log.info(
            COMPONENT,
            &format!(
                "{}: {} written, {} zeroed, read-back {} ({:.1}s)",
                d.disk,
                iec_size(d.bytes_written),
                iec_size(d.bytes_zeroed),
                if d.readback_verified {
                    "✓"
                } else {
                    "skipped"
                },
                d.duration.as_secs_f64()
            ),
        );
    }
    Ok(())
}

fn connect(ctx: &Context<'_>, w: &NbdWrite) -> Result<NbdTarget, AppError> {
    let (d, uri) = (&w.disk, &w.uri);
    let c = NbdTarget::connect_with(uri, NbdOptions::default())
        .map_err(|e| AppError::Storage(format!("{d}: cannot connect to NBD export {uri}: {e}")))?;
    if c.is_read_only() {
        return Err(AppError::Storage(format!(
            "{d}: NBD export {uri} is read-only"
        )));
    }
    let need = w.plan.virtual_size;
    if c.size() < need {
        return Err(AppError::Storage(format!(
            "{d}: NBD export {uri} has {} bytes; the disk needs {need}",
            c.size()
        )));
    }
    if c.size() > need {
        ctx.log.warn(COMPONENT, &format!(
            "{d}: NBD export {uri} is larger than the disk ({} > {need} bytes); the bytes beyond are left as they are",
            c.size()
        ));
    }
    Ok(c)
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
