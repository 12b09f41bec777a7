//! The small-chain path: a single disk whose chain is small
//! ([`ApplyOptions::inline_max_bytes`]) is restored on the calling thread, without the
//! pipeline's threads (they cost more to start, hand over and stop than the copy).

use super::chunk::BufPool;
use super::options::ApplyOptions;
use super::report::{attach_checksums, DiskReport, FileStatuses};
use super::source;
use super::writer::DiskWriter;
use crate::cancel::Cancel;
use crate::error::Result;
use crate::plan::DiskPlan;
use crate::target::BlockTarget;

/// True for a disk whose live data, and what is read of its chain files (all of a file
/// a checksum check reads, the live data of the others), are both within
/// [`ApplyOptions::inline_max_bytes`].
pub(super) fn small(plan: &DiskPlan, opts: &ApplyOptions) -> bool {
    let hashed: u64 = plan
        .files
        .iter()
        .filter(|f| opts.verify_checksums && f.stored_checksum.is_some())
        .map(|f| f.file_size)
        .sum();
    opts.inline_max_bytes != 0
        && plan.data_bytes() <= opts.inline_max_bytes
        && hashed.saturating_add(plan.data_bytes()) <= opts.inline_max_bytes
}

/// The pipeline without threads, for [`small`] plans: the disk read in disk order
/// ([`source::read_disk`]) and each chunk written as it is read (through
/// [`DiskWriter`], as in the pipeline), read back through the target and checked
/// exactly as the pipeline does.
pub(super) fn apply_inline(
    plan: &DiskPlan,
    target: Box<dyn BlockTarget>,
    opts: &ApplyOptions,
) -> Result<Vec<DiskReport>> {
    let chunk = opts.chunk_size.max(4096);
    let pool = BufPool::new(chunk, 2);
    let abort = Cancel::new();
    let mut writer = DiskWriter::new(
        plan.disk.clone(),
        target,
        plan.data_bytes(),
        plan.virtual_size,
        opts,
        &abort,
        &pool,
        false,
    )?;
    let mut emit = |c| writer.accept(c);
    let files = source::read_disk(
        &plan.files,
        &plan.file_live,
        plan.virtual_size,
        opts.verify_checksums,
        chunk,
        &pool,
        &opts.cancel,
        &mut emit,
    )?;
    let mut statuses = FileStatuses::new();
    for (p, s, read) in files {
        statuses.insert(p, (s, read));
    }
    let mut reports = vec![writer.finish()?];
    attach_checksums(std::slice::from_ref(plan), &mut reports, &statuses);
    Ok(reports)
}
