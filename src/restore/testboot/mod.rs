//! `--test-boot`: "will this VM come back?" answered before the disaster. The restore
//! point is booted without being restored — the instant-boot path (NBD exports of
//! the backup, throwaway overlays) — as a transient, isolated clone: its own name
//! `<vm>-testboot-<time>`, a new UUID, every NIC's link down, no host devices or
//! shared directories, its own NVRAM/TPM copies. vmrestore waits for a sign of life
//! (the guest agent answering, a pattern on the serial console), saves a screenshot
//! and the console log, and removes everything it made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::AppError;
use crate::restore::checks::Preflight;
use crate::restore::plan::{Action, RestorePlan, Summary, TestBootSpec};
use crate::restore::Context;

mod report;
mod screenshot;
mod watch;

pub(in crate::restore) use watch::{watch, TestResult};

/// `<vm>-testboot-<YYYYmmddHHMMSS>`: unique per second, sorted by time.
fn test_name(vm: &str) -> String {
    format!(
        "{vm}-testboot-{}",
        chrono::Local::now().format("%Y%m%d%H%M%S")
    )
}

/// Plans a test boot: an instant boot of the point, isolated and watched.
pub(super) fn plan_test_boot(
    ctx: &Context<'_>,
    dir: Option<&Path>,
    timeout: u64,
    expect: Option<String>,
    report: Option<&Path>,
    pf: &mut Preflight,
) -> Result<RestorePlan, AppError> {
    let name = test_name(&ctx.vm);
    let temp_dir = dir.is_none();
    // not a world-writable /tmp: root's own state directory (qemu traverses it)
    let base = std::env::var_os("VMRESTORE_TESTBOOT_DIR").map_or_else(
        || PathBuf::from("/var/lib/vmrestore/testboot"),
        PathBuf::from,
    );
    let dir = dir.map_or_else(|| base.join(&name), Path::to_path_buf);
    ctx.log.info(
        "restore_vm",
        &format!("Test boot: the restore point boots as '{name}' (isolated, temporary) — nothing is restored"),
    );
    let mut plan = crate::restore::instant::plan_instant(ctx, &dir, &name, false, pf)?;
    let evidence_dir = report
        .map(Path::to_path_buf)
        .or_else(|| crate::ui::log::current_path().and_then(|p| p.parent().map(Path::to_path_buf)))
        .unwrap_or_else(|| dir.clone());
    for a in &mut plan.actions {
        if let Action::InstantBoot(b) = a {
            let console_log = dir.join(format!("{name}.console.log"));
            b.rewrite.isolate = true;
            b.rewrite.serial_log = Some(console_log.clone());
            b.test = Some(TestBootSpec {
                timeout: Duration::from_secs(timeout),
                expect: expect.clone(),
                console_log,
                evidence_dir: evidence_dir.clone(),
                report: report.is_some(),
                temp_dir,
            });
        }
    }
    plan.mode = "test-boot";
    plan.report.summary = Summary::TestBoot;
    plan.report.target_name = Some(name);
    Ok(plan)
}

/// After the teardown: the evidence kept (screenshot, console log, result JSON,
/// report page), the overlay directory removed when it was made for this boot.
pub(in crate::restore) fn finish(
    ctx: &Context<'_>,
    ib: &crate::restore::plan::InstantBoot,
    spec: &TestBootSpec,
    result: &TestResult,
) {
    if let Err(e) = report::keep(ctx, &ctx.vm, ib, spec, result) {
        ctx.log.warn(
            "restore_vm",
            &format!(
                "Cannot write the test-boot evidence to {}: {e}",
                spec.evidence_dir.display()
            ),
        );
    }
    let _ = std::fs::remove_file(&spec.console_log);
    if spec.temp_dir && std::fs::remove_dir(&ib.dir).is_err() {
        ctx.log
            .warn("restore_vm", &format!("Cannot remove {}", ib.dir.display()));
    }
}

/// Where a file of the evidence goes.
fn evidence(spec: &TestBootSpec, name: &str, ext: &str) -> PathBuf {
    spec.evidence_dir.join(format!("{name}.{ext}"))
}
