//! The pre-flight checks a planner runs (spec §4.2, §4.3) and the one place where a
//! failed check becomes either the run's error or, in a dry run, a WARN line and a
//! refusal in the plan.

use std::path::{Path, PathBuf};

use nbdfmt::SetKind;

use crate::error::AppError;
use crate::restore::outputs::PredictedOutput;
use crate::restore::preflight::{backup_bytes, collisions, free_space};
use crate::restore::Context;
use crate::ui::format::iec_size;

/// Collects failed checks while a plan is built.
#[derive(Debug)]
pub struct Preflight {
    dry_run: bool,
    notes: Vec<String>,
}

impl Preflight {
    /// A collector for a real run (`dry_run` false) or a dry run.
    pub fn new(dry_run: bool) -> Self {
        Self {
            dry_run,
            notes: Vec::new(),
        }
    }

    /// A failed check: the error of a real run; in a dry run `[DRY RUN] <note>` as a
    /// WARN under `component`, and planning goes on.
    pub fn refuse(
        &mut self,
        ctx: &Context<'_>,
        component: &str,
        error: AppError,
        note: String,
    ) -> Result<(), AppError> {
        if !self.dry_run {
            return Err(error);
        }
        ctx.log.warn(component, &format!("[DRY RUN] {note}"));
        self.notes.push(note);
        Ok(())
    }

    /// `[DRY RUN] ` in a dry run (prefix of lines logged while planning).
    pub fn prefix(&self) -> &'static str {
        if self.dry_run {
            "[DRY RUN] "
        } else {
            ""
        }
    }

    /// The refusals of a dry run.
    pub fn into_notes(self) -> Vec<String> {
        self.notes
    }
}

/// Free-space check of spec §4.3 (exit 4 when short, WARN when tight).
pub fn check_space(ctx: &Context<'_>, t: u32, dir: &Path) -> Result<(), AppError> {
    let log = ctx.log;
    let point = (ctx.set.kind == SetKind::Incremental && ctx.point.is_explicit()).then_some(t);
    let (need, files) = backup_bytes(ctx.set, point);
    if files == 0 {
        log.warn(
            "preflight_free_space",
            "No data files found to estimate size — skipping space check",
        );
        return Ok(());
    }
    let Some((free, at)) = free_space(dir) else {
        log.warn(
            "preflight_free_space",
            &format!(
                "Cannot determine free space on {} — skipping check",
                dir.display()
            ),
        );
        return Ok(());
    };
    log.info(
        "preflight_free_space",
        &format!(
            "Backup data: {} ({files} files) — Destination free: {} ({})",
            iec_size(need),
            iec_size(free),
            at.display()
        ),
    );
    if need > free {
        return Err(AppError::Storage(format!(
            "Insufficient space: restore needs {} but only {} available on {}",
            iec_size(need),
            iec_size(free),
            at.display()
        )));
    }
    if free - need < need / 10 {
        log.warn(
            "preflight_free_space",
            &format!(
                "Tight on space: only {} headroom after restore",
                iec_size(free - need)
            ),
        );
    }
    Ok(())
}

/// Spec §4.2: predicted outputs checked against every live disk. With `--force`
/// only overridable findings are allowed. `going`: domains the plan itself stops and
/// removes before it writes (a leftover instant-boot clone); their disks are no
/// collision.
pub fn safety_checks(
    ctx: &Context<'_>,
    pf: &mut Preflight,
    finals: &[PathBuf],
    source_vm: &str,
    going: &[&str],
) -> Result<(), AppError> {
    let dr = pf.prefix();
    let mut live = ctx.hv.live_disks().unwrap_or_else(|e| {
        ctx.log.warn(
            "preflight_disk_safety",
            &format!("Cannot list live disks ({e}) — collision check limited to existing files"),
        );
        Vec::new()
    });
    live.retain(|l| !going.contains(&l.domain.as_str()));
    let state_of = |name: &str| ctx.hv.lookup(name).ok().flatten().map(|i| i.state);
    let mut blocked = false;
    for c in &collisions(finals, &live, source_vm, &state_of) {
        if c.blocks_even_with_force() || !ctx.options.force {
            ctx.log.error(
                "preflight_disk_safety",
                &format!("{dr}{}", c.blocked_message()),
            );
            blocked = true;
        } else {
            ctx.log.warn(
                "preflight_disk_safety",
                &format!("{dr}{}", c.forced_message()),
            );
        }
    }
    if blocked {
        return pf.refuse(
            ctx,
            "preflight_disk_safety",
            AppError::Storage("Pre-flight disk safety check failed — see errors above".into()),
            "Would abort due to safety checks above".into(),
        );
    }
    ctx.log.info(
        "preflight_disk_safety",
        &format!("{dr}All safety checks passed"),
    );
    Ok(())
}

/// Logs the predicted outputs (spec §4.2).
pub fn log_predictions(ctx: &Context<'_>, outputs: &[PredictedOutput]) {
    if outputs.is_empty() {
        ctx.log.warn(
            "predict_output_files",
            "Could not predict output files — skipping disk safety checks",
        );
    }
    for o in outputs {
        // the backup's own file name, which a clone or an overlay does not keep
        let original = o
            .source
            .as_deref()
            .and_then(|s| std::path::Path::new(s).file_name())
            .map_or_else(|| o.file_name.clone(), |n| n.to_string_lossy().into_owned());
        ctx.log.info(
            "predict_output_files",
            &format!(
                "Predicted final: {} (original file name: {original})",
                o.final_path.display()
            ),
        );
    }
}

/// Predicted outputs, logged and checked against every live disk.
pub fn check_outputs(
    ctx: &Context<'_>,
    pf: &mut Preflight,
    outputs: &[PredictedOutput],
) -> Result<(), AppError> {
    log_predictions(ctx, outputs);
    let finals: Vec<PathBuf> = outputs.iter().map(|o| o.final_path.clone()).collect();
    safety_checks(ctx, pf, &finals, &ctx.vm, &[])
}

/// DR step 1 / clone step 1: whether `name` is defined; defined without `--force`
/// is refused.
pub fn check_defined(ctx: &Context<'_>, pf: &mut Preflight, name: &str) -> Result<bool, AppError> {
    let defined = ctx
        .hv
        .lookup(name)
        .map_err(|e| AppError::Dependency(format!("{e}")))?
        .is_some();
    if defined && !ctx.options.force {
        pf.refuse(
            ctx,
            "restore_vm",
            AppError::Vm(format!(
                "VM '{name}' already defined (use --force to override)"
            )),
            format!("VM '{name}' exists (would need --force)"),
        )?;
    }
    Ok(defined)
}

/// Says what a restore of point `t` leaves out, so nothing goes missing silently:
/// disks with backup data that this point's domain XML does not list (removed, or
/// renamed in the XML), and devices the restored domain will not have (CD-ROMs,
/// floppies, network disks: they have no backup data).
pub fn warn_left_out(
    ctx: &Context<'_>,
    t: u32,
    outputs: &[PredictedOutput],
    cfg: Option<&nbdfmt::DomainConfig>,
) {
    for (disk, files) in &ctx.set.disks {
        if outputs.iter().any(|o| &o.disk == disk) {
            continue;
        }
        let last = files
            .iter()
            .filter_map(|f| f.level.checkpoint())
            .filter(|n| *n <= t)
            .max();
        if let Some(last) = last {
            ctx.log.warn(
                "restore_vm",
                &format!("{disk}: backed up (last at checkpoint {last}) but not in the domain XML of restore point {t} — not restored; to get it: --disk {disk} --restore-point {last} --restore-path <dir>"),
            );
        }
    }
    let Some(cfg) = cfg else { return };
    for d in &cfg.disks {
        if outputs.iter().any(|o| o.disk == d.target) {
            continue;
        }
        let what = d.source.as_deref().unwrap_or("no source");
        ctx.log.warn(
            "restore_vm",
            &format!(
                "{} ({} {}, {what}) is left out of the defined domain: it has no backup data",
                d.target, d.kind, d.device
            ),
        );
    }
}
