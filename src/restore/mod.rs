//! Restores: every mode is a planner that gathers facts (backup set, libvirt,
//! filesystem) and returns a [`RestorePlan`]; pre-flight checks run while planning
//! and refuse through one [`checks::Preflight`]; `--dry-run` prints the plan and
//! stops ([`dry_run`]); one executor ([`execute`]) runs any plan.
//!
//! ```text
//! RestoreRequest ──plan()──▶ RestorePlan ──dry_run()──▶ printed lines / JSON
//!                                       └──execute()──▶ Outcome (+ Effects)
//! ```

use crate::cli::request::RestoreKind;
use crate::error::AppError;

pub mod checks;
mod clone;
mod context;
pub mod damage_map;
mod disk;
mod dr;
pub mod execute;
pub mod instant;
mod nbd;
pub mod outputs;
pub mod plan;
pub mod point;
pub mod pool;
pub mod preflight;
pub mod salvage;
pub mod serve;
pub mod swap;
pub mod testboot;
mod tpm;

pub use context::{Context, Outcome};
pub use plan::{Action, Effect, RestorePlan};
pub use point::RestorePoint;

/// Plans the restore `kind` asks for. In a real run the first failed check is the
/// error; in a dry run failed checks are WARN lines and `plan.refusals`.
pub fn plan(ctx: &Context<'_>, kind: &RestoreKind) -> Result<RestorePlan, AppError> {
    refuse_remote(ctx.hv.uri(), kind)?;
    let mut pf = checks::Preflight::new(ctx.options.dry_run);
    let mut plan = match kind {
        RestoreKind::Dr { dir } => dr::plan_dr(ctx, dir, &mut pf)?,
        RestoreKind::Clone { dir, name } => clone::plan_clone(ctx, dir, name, &mut pf)?,
        RestoreKind::DataOnly { dir, ignored_name } => {
            if ignored_name.is_some() {
                ctx.log.warn(
                    "restore_vm",
                    "--name is ignored with --skip-config (data-only restore defines no VM)",
                );
            }
            dr::plan_data_only(ctx, dir, &mut pf)?
        }
        RestoreKind::DiskInPlace { disks } => disk::plan_in_place(ctx, disks, &mut pf)?,
        RestoreKind::DiskExtract { dir, disks } => disk::plan_extract(ctx, dir, disks, &mut pf)?,
        RestoreKind::InstantBoot { dir, name, pull } => {
            let name = name
                .clone()
                .unwrap_or_else(|| instant::default_name(&ctx.vm));
            instant::plan_instant(ctx, dir, &name, *pull, &mut pf)?
        }
        RestoreKind::Nbd { targets, disks } => nbd::plan_nbd(ctx, targets, disks.as_ref())?,
        RestoreKind::TestBoot {
            dir,
            timeout,
            expect,
            report,
        } => testboot::plan_test_boot(
            ctx,
            dir.as_deref(),
            *timeout,
            expect.clone(),
            report.as_deref(),
            &mut pf,
        )?,
        RestoreKind::Serve {
            listen,
            disks,
            public,
            tls,
        } => serve::plan_serve(ctx, listen, disks.as_ref(), *public, tls.as_ref())?,
    };
    refuse_nothing_written(ctx, kind, &plan, &mut pf)?;
    plan.refusals = pf.into_notes();
    Ok(plan)
}

/// A DR, clone or data-only restore that would write no disk at all is not a
/// success: the restore point's domain XML names none of the backed-up disks (a
/// hand-edited or crafted `vmconfig`), and "disk ✓" with an empty restore path would
/// be a lie. Exit 5, with the way to get the data anyway.
fn refuse_nothing_written(
    ctx: &Context<'_>,
    kind: &RestoreKind,
    plan: &RestorePlan,
    pf: &mut checks::Preflight,
) -> Result<(), AppError> {
    let whole_vm = matches!(
        kind,
        RestoreKind::Dr { .. } | RestoreKind::Clone { .. } | RestoreKind::DataOnly { .. }
    );
    let writes = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::WriteImages { jobs, .. } if !jobs.is_empty()));
    if !whole_vm || writes {
        return Ok(());
    }
    let backed_up: Vec<&str> = ctx.set.disks.keys().map(String::as_str).collect();
    let msg = format!(
        "Nothing to restore at checkpoint {}: the domain XML of that restore point names none of the backed-up disks ({}) — to get one anyway: --disk <name> --restore-path <dir>",
        plan.checkpoint,
        if backed_up.is_empty() { "none".to_owned() } else { backed_up.join(", ") }
    );
    pf.refuse(ctx, "restore_vm", AppError::Vm(msg.clone()), msg)
}

/// The modes that define a domain or write its disks, NVRAM or TPM state on this
/// host cannot target a hypervisor on another one: its domain would point at files
/// that are not there (and the NBD exports of an instant boot listen on loopback).
pub fn refuse_remote(uri: &str, kind: &RestoreKind) -> Result<(), AppError> {
    let local_only = matches!(
        kind,
        RestoreKind::Dr { .. }
            | RestoreKind::Clone { .. }
            | RestoreKind::DiskInPlace { .. }
            | RestoreKind::InstantBoot { .. }
            | RestoreKind::TestBoot { .. }
    );
    match crate::hypervisor::remote_host(uri).filter(|_| local_only) {
        Some(host) => Err(AppError::Usage(format!(
            "--connect {uri}: a {} restore writes disks, NVRAM and TPM state on this host, and the domain on {host} would point at files it does not have — run vmrestore on {host}, or restore the disks with --skip-config / --disk … --restore-path and copy them there",
            kind.as_str()
        ))),
        None => Ok(()),
    }
}

/// Plans, then prints the plan (dry run) or executes it.
pub fn run(ctx: &Context<'_>, kind: &RestoreKind) -> Result<Outcome, AppError> {
    let plan = plan(ctx, kind)?;
    if ctx.options.dry_run {
        return Ok(dry_run(ctx, &plan));
    }
    execute::execute(ctx, plan)
}

/// `--dry-run`: prints every action of the plan, and says whether the run would
/// abort. The only place a dry run differs from a real run after planning.
pub fn dry_run(ctx: &Context<'_>, plan: &RestorePlan) -> Outcome {
    for line in plan.lines() {
        ctx.log.info("restore_vm", &format!("[DRY RUN] {line}"));
    }
    let summary = if plan.refusals.is_empty() {
        format!("Restore complete: {} [DRY RUN — no changes made]", plan.vm)
    } else {
        format!(
            "Dry run: the restore of {} would abort ({} check(s) failed, see above) — no changes made",
            plan.vm,
            plan.refusals.len()
        )
    };
    let salvaged = plan.salvaged();
    let summary = match plan.report.summary {
        _ if plan.refusals.is_empty() && !salvaged.is_empty() => {
            salvage::dry_run_summary(&plan.vm, &salvaged)
        }
        plan::Summary::Serve | plan::Summary::InstantBoot | plan::Summary::TestBoot
            if plan.refusals.is_empty() =>
        {
            format!(
                "Dry run: {} would be {} — nothing started",
                plan.vm,
                if plan.report.summary == plan::Summary::Serve {
                    "served"
                } else {
                    "booted"
                }
            )
        }
        plan::Summary::DiskInPlace | plan::Summary::DiskExtract if plan.refusals.is_empty() => {
            format!(
                "Disk restore complete: {}/{} [DRY RUN — no changes made]",
                plan.vm,
                plan.report.disks.join(", ")
            )
        }
        _ => summary,
    };
    Outcome {
        summary,
        checkpoint: plan.checkpoint,
        disks: plan.report.disks.clone(),
        target_path: plan.report.target_path.clone(),
        tpm_result: plan.report.tpm_result,
        partial: false,
        target_name: plan.report.target_name.clone(),
        effects: Vec::new(),
        plan: Some(plan.to_json()),
        extra: None,
        failure: None,
        salvaged: Vec::new(),
    }
}
