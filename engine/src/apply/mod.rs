//! Apply: write a [`DiskPlan`] per disk to targets, each live block once.
//!
//! ```text
//!  chain files ──(reader per disk: merge in disk order, LZ4 decode, adler32)──┐
//!   side by side                                                               ├─ bounded channel per disk ─▶ writer per disk ─▶ BlockTarget
//!  (all disks in parallel, at most `readers` disks read at once) ──────────────┘      (zero detection, progress, read-back verify)
//! ```
//! A tokio runtime owned by [`apply`] drives the pipeline; disk I/O itself runs on
//! blocking threads (`pread`/`pwrite` through the targets), never through `tokio::fs`.
//! Memory is bounded by design: the channel capacities (`memory_cap`) plus one chunk
//! per worker, and per chain file a few small windows — never per frame or extent
//! (a list of what was written, for the final check, moves to a temporary file when
//! long). The disk is written in disk order, so neighbouring pieces from different
//! files become one write. A single small disk ([`ApplyOptions::inline_max_bytes`])
//! skips the pipeline: it is read on the calling thread and each chunk goes straight
//! to the same `DiskWriter` (same zero handling, read-back and final check).
//!
//! Files: `options` and `report` (the public types), `source` (reader side: a disk's
//! content in disk order, from its chain files side by side), `lane` (one chain file in
//! that pass: LZ4 decoding), `stored` (one chain file's bytes: read window, adler32), `writer` (`DiskWriter`: writer side of one
//! disk), `readback` (read-back verification), `done` (its list of
//! pieces, spilled to a temporary file when long), `pipeline` (threads and channels),
//! `inline` (small chains).

mod chunk;
mod done;
mod inline;
mod lane;
mod options;
mod pipeline;
mod readback;
mod report;
mod source;
mod stored;
mod writer;

use std::time::Instant;

use crate::error::{Error, Result};
use crate::plan::DiskPlan;
use crate::target::BlockTarget;

pub use options::{ApplyOptions, Progress, ProgressFn, INLINE_MAX_BYTES};
pub use report::{ApplyReport, DiskReport};

/// Writes every disk plan into its target (same order), verifying as configured.
/// Targets are flushed, verified and finished; the caller renames outputs afterwards.
pub fn apply(
    plans: &[DiskPlan],
    targets: Vec<Box<dyn BlockTarget>>,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    if plans.len() != targets.len() {
        return Err(Error::internal(format!(
            "{} plans but {} targets",
            plans.len(),
            targets.len()
        )));
    }
    for (p, t) in plans.iter().zip(&targets) {
        if t.size() < p.virtual_size {
            return Err(Error::Unsupported(format!(
                "target for {} holds {} bytes, the disk needs {}",
                p.disk,
                t.size(),
                p.virtual_size
            )));
        }
    }
    if let ([plan], [_]) = (plans, &targets[..]) {
        if inline::small(plan, opts) {
            let started = Instant::now();
            let target = targets
                .into_iter()
                .next()
                .ok_or_else(|| Error::internal("internal: one plan but no target"))?;
            let disks = inline::apply_inline(plan, target, opts)?;
            return Ok(ApplyReport {
                disks,
                duration: started.elapsed(),
            });
        }
    }
    // All disk I/O runs on blocking threads; the async side only hands out reader
    // slots and collects results, which the calling thread does (no worker threads to
    // start and stop: a fixed cost that showed on a 2 MiB chain).
    let rt = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(opts.readers.max(1) + plans.len() + 2)
        .thread_name("vmrestore-apply")
        .build()
        .map_err(|e| Error::internal(format!("cannot start the I/O runtime: {e}")))?;
    let started = Instant::now();
    let disks = rt.block_on(pipeline::run(plans, targets, opts))?;
    Ok(ApplyReport {
        disks,
        duration: started.elapsed(),
    })
}
