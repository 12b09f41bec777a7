//! The small-chain path: a single disk whose chain is small
//! ([`ApplyOptions::inline_max_bytes`]) is restored on the calling thread, without the
//! pipeline's threads (they cost more to start, hand over and stop than the copy).

use super::options::ApplyOptions;
use super::report::{attach_checksums, DiskReport, FileStatuses};
use super::scan::{self, BufPool, FileJob};
use super::writer::{Chunk, DiskWriter};
use crate::cancel::Cancel;
use crate::error::Result;
use crate::plan::DiskPlan;
use crate::target::BlockTarget;

/// The reader jobs of a disk whose chain files (all of which a checksum check reads)
/// and live data are both within [`ApplyOptions::inline_max_bytes`]; `None` otherwise.
pub(super) fn small_jobs(plan: &DiskPlan, opts: &ApplyOptions) -> Option<Vec<FileJob>> {
    if opts.inline_max_bytes == 0 || plan.data_bytes() > opts.inline_max_bytes {
        return None;
    }
    let jobs = scan::jobs(plan);
    let read: u64 = jobs
        .iter()
        .map(|j| {
            if j.hashed(opts) {
                j.file_size
            } else {
                j.frames.iter().map(|(f, _)| f.length).sum()
            }
        })
        .sum();
    (read <= opts.inline_max_bytes).then_some(jobs)
}

/// The pipeline without threads, for [`small_jobs`] plans: every file scanned in turn,
/// each live piece written as it is read (through [`DiskWriter`], as in the pipeline),
/// read back through the target and checked exactly as the pipeline does.
pub(super) fn apply_inline(
    plan: &DiskPlan,
    jobs: Vec<FileJob>,
    target: Box<dyn BlockTarget>,
    opts: &ApplyOptions,
) -> Result<Vec<DiskReport>> {
    let chunk = opts.chunk_size.max(4096);
    let pool = BufPool::new(chunk, 2);
    let zero_ranges = plan.map.zero_ranges(plan.virtual_size);
    let abort = Cancel::new();
    let mut writer = DiskWriter::new(
        plan.disk.clone(),
        target,
        plan.data_bytes(),
        &zero_ranges,
        opts,
        &abort,
        &pool,
        false,
    )?;
    let mut statuses = FileStatuses::new();
    for job in jobs {
        let verify = job.hashed(opts);
        if job.frames.is_empty() && !verify {
            continue;
        }
        let mut emit = |offset: u64, data: Vec<u8>| writer.accept(Chunk { offset, data });
        let status = scan::scan_file(&job, verify, chunk, &pool, &opts.cancel, &mut emit)?;
        statuses.insert(
            job.path.clone(),
            (status, if verify { job.file_size } else { 0 }),
        );
    }
    let mut reports = vec![writer.finish()?];
    attach_checksums(std::slice::from_ref(plan), &mut reports, &statuses);
    Ok(reports)
}
