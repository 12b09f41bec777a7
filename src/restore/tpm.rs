//! The TPM step (spec §4.11): planned when the backup has TPM material and
//! `--skip-tpm` is not given; a failure is a WARN and `TPM ✗` in the summary, never
//! the restore's failure.

use crate::host::tpm;
use crate::restore::plan::{Action, TpmRestore, TpmUuid};
use crate::restore::Context;

/// The TPM action for `vm_label`, and the catalogue value when there is none.
pub(super) fn tpm_action(
    ctx: &Context<'_>,
    vm_label: &str,
    uuid: TpmUuid,
) -> (Option<Action>, &'static str) {
    if ctx.options.skip_tpm {
        return (None, "skipped");
    }
    let Some(material) = tpm::detect(&ctx.set.dir) else {
        return (None, "none");
    };
    // the backup's TPM metadata names the UUID the state belongs to
    let uuid = match uuid {
        TpmUuid::Original { planned } => TpmUuid::Original {
            planned: material.metadata_uuid.clone().or(planned),
        },
        TpmUuid::New => TpmUuid::New,
    };
    let action = Action::RestoreTpm(TpmRestore {
        vm_label: vm_label.to_owned(),
        data_dir: ctx.set.dir.clone(),
        material,
        uuid,
        root: ctx.swtpm_root.clone(),
    });
    (Some(action), "restored")
}

/// Runs a TPM action; `defined_uuid` is the UUID of the domain just defined.
/// Returns the summary token and the catalogue value.
pub(super) fn restore_tpm(
    ctx: &Context<'_>,
    t: &TpmRestore,
    defined_uuid: Option<&str>,
) -> (&'static str, &'static str) {
    let log = ctx.log;
    let failed = (" TPM ✗ (manual unlock required)", "failed");
    if t.material.state_dir.is_none() {
        log.warn(
            "restore_tpm",
            &format!(
                "Marker present but no tpm-state/ in {}",
                t.data_dir.display()
            ),
        );
        log.warn("restore_tpm", "TPM restore failed (non-fatal)");
        return failed;
    }
    // The state goes to the domain just defined: a metadata UUID (backup data) naming
    // another domain would otherwise replace that domain's TPM.
    let uuid = match &t.uuid {
        TpmUuid::New => defined_uuid.map(str::to_owned),
        TpmUuid::Original { .. } => {
            let meta = t.material.metadata_uuid.as_deref();
            if let (Some(m), Some(d)) = (meta, defined_uuid) {
                if !m.eq_ignore_ascii_case(d) {
                    log.warn(
                        "restore_tpm",
                        &format!(
                            "The TPM metadata names UUID {} but the restored domain is {d}: the state goes to {d}",
                            crate::ui::format::printable(m)
                        ),
                    );
                }
            }
            defined_uuid.or(meta).map(str::to_owned)
        }
    };
    let Some(uuid) = uuid else {
        log.error("restore_tpm", "Cannot determine UUID for TPM restore");
        return failed;
    };
    log.info(
        "restore_tpm",
        &format!("Restoring TPM for {} (UUID: {uuid})", t.vm_label),
    );
    match tpm::restore(
        &t.material,
        &t.root,
        &uuid,
        crate::restore::context::epoch(),
    ) {
        Ok(r) => {
            if let Some(prev) = &r.saved_previous {
                log.warn(
                    "restore_tpm",
                    &format!("Backing up existing TPM to {}", prev.display()),
                );
            }
            if r.owner.is_none() {
                log.warn(
                    "restore_tpm",
                    "Neither user tss nor swtpm exists — TPM state left owned by root",
                );
            }
            log.info(
                "restore_tpm",
                &format!("TPM state restored: {}", r.target.display()),
            );
            (" TPM ✓", "restored")
        }
        Err(e) => {
            log.warn("restore_tpm", &format!("{e}"));
            log.warn("restore_tpm", "TPM restore failed (non-fatal)");
            failed
        }
    }
}
