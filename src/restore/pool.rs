//! Storage pools (spec §4.12): after a restore, the pool holding the new images is
//! rescanned so `virsh vol-list` shows them.

use std::path::Path;

use crate::restore::Context;

/// Spec §4.12: refreshes the active pool whose path is the longest component-wise
/// prefix of `dir`; never fatal.
pub fn refresh_pool(ctx: &Context<'_>, dir: &Path) {
    let Ok(pools) = ctx.hv.active_pools() else {
        return;
    };
    let dir = crate::restore::preflight::canonicalize_lenient(dir);
    if let Some(p) = crate::hypervisor::pool_for(&pools, &dir) {
        match ctx.hv.refresh_pool(&p.name) {
            Ok(()) => ctx.log.info(
                "refresh_storage_pool",
                &format!("Refreshed storage pool '{}'", p.name),
            ),
            Err(_) => ctx.log.warn(
                "refresh_storage_pool",
                &format!("Failed to refresh storage pool '{}'", p.name),
            ),
        }
    }
}
