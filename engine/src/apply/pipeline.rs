//! The pipeline: per disk, one reader (the disk's content in disk order, from all its
//! chain files side by side: [`source::read_disk`]; at most [`ApplyOptions::readers`]
//! disks read at once) sends chunks over a bounded channel to one writer
//! ([`DiskWriter`]). Every task runs on a blocking thread; the async side only hands
//! out reader slots and collects results. The first failure anywhere stops every task
//! (`abort`), and every task is awaited before [`run`] returns.

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::chunk::{BufPool, Chunk};
use super::options::ApplyOptions;
use super::report::{attach_checksums, DiskReport, FileStatuses};
use super::source::{self, FileOutcome};
use super::writer::DiskWriter;
use crate::cancel::Cancel;
use crate::chain::ChainFile;
use crate::error::{Error, Result};
use crate::plan::DiskPlan;
use crate::target::BlockTarget;

/// What every reader task of one run holds.
#[derive(Clone)]
struct Readers {
    /// At most [`ApplyOptions::readers`] disks are read at once.
    slots: Arc<Semaphore>,
    /// The caller's cancel (signals).
    cancel: Cancel,
    /// Set on the first failure anywhere.
    abort: Cancel,
    pool: Arc<BufPool>,
    chunk: usize,
}

/// Restores every disk through the pipeline; the reports in plan order.
pub(super) async fn run(
    plans: &[DiskPlan],
    targets: Vec<Box<dyn BlockTarget>>,
    opts: &ApplyOptions,
) -> Result<Vec<DiskReport>> {
    // Workers stop on the caller's cancel or on the first failure anywhere.
    let abort = Cancel::new();
    let chunk = opts.chunk_size.max(4096);
    let per_disk_slots = (opts.memory_cap / chunk / plans.len().max(1)).max(2);
    let readers = Readers {
        slots: Arc::new(Semaphore::new(opts.readers.max(1))),
        cancel: opts.cancel.clone(),
        abort: abort.clone(),
        pool: Arc::new(BufPool::new(
            chunk,
            per_disk_slots * plans.len() + opts.readers.max(1) + 2,
        )),
        chunk,
    };

    let mut writer_handles = Vec::new();
    let mut reader_handles = Vec::new();
    for (plan, target) in plans.iter().zip(targets) {
        let (tx, rx) = mpsc::channel::<Chunk>(per_disk_slots);
        writer_handles.push(spawn_writer(plan, target, rx, opts, &abort, &readers.pool));
        reader_handles.push(spawn_reader(plan, tx, opts, &readers));
    }

    // Every task is awaited, also after a failure: workers see `abort`/`cancel` at
    // each chunk and stop quickly, and nothing outlives this function.
    let mut first_err: Option<Error> = None;
    let mut note = |e: Error, abort: &Cancel| {
        abort.abort();
        if first_err
            .as_ref()
            .is_none_or(|f| matches!(f, Error::Aborted))
        {
            first_err = Some(e);
        }
    };
    let mut statuses = FileStatuses::new();
    for h in reader_handles {
        match h
            .await
            .map_err(|e| Error::internal(format!("reader task failed: {e}")))
            .and_then(|x| x)
        {
            Ok(files) => {
                for (p, s, read) in files {
                    statuses.insert(p, (s, read));
                }
            }
            Err(e) => note(e, &abort),
        }
    }
    let mut reports = Vec::new();
    for h in writer_handles {
        match h
            .await
            .map_err(|e| Error::internal(format!("writer task failed: {e}")))
            .and_then(|x| x)
        {
            Ok(r) => reports.push(r),
            Err(e) => note(e, &abort),
        }
    }
    opts.cancel.check()?;
    if let Some(e) = first_err {
        return Err(e);
    }
    attach_checksums(plans, &mut reports, &statuses);
    Ok(reports)
}

/// The writer task of one disk: [`write_disk`] on a blocking thread.
fn spawn_writer(
    plan: &DiskPlan,
    target: Box<dyn BlockTarget>,
    rx: mpsc::Receiver<Chunk>,
    opts: &ApplyOptions,
    abort: &Cancel,
    pool: &Arc<BufPool>,
) -> JoinHandle<Result<DiskReport>> {
    let disk = plan.disk.clone();
    let total = plan.data_bytes();
    let size = plan.virtual_size;
    let opts2 = opts.clone();
    let abort2 = abort.clone();
    let pool2 = pool.clone();
    tokio::task::spawn_blocking(move || {
        write_disk(disk, target, rx, total, size, &opts2, &abort2, &pool2)
    })
}

/// The reader task of one disk: waits for a reader slot, then reads the disk's content
/// in disk order on a blocking thread ([`source::read_disk`]), sending it to the
/// disk's writer.
fn spawn_reader(
    plan: &DiskPlan,
    tx: mpsc::Sender<Chunk>,
    opts: &ApplyOptions,
    readers: &Readers,
) -> JoinHandle<Result<Vec<FileOutcome>>> {
    // Owned copies for the thread: paths and sizes (frames stay in the files).
    let files: Vec<ChainFile> = plan.files.to_vec();
    let live = plan.file_live.clone();
    let size = plan.virtual_size;
    let verify = opts.verify_checksums;
    let r = readers.clone();
    tokio::spawn(async move {
        let _permit = r.slots.acquire_owned().await.map_err(|_| Error::Aborted)?;
        tokio::task::spawn_blocking(move || {
            let mut emit = |c: Chunk| -> Result<()> {
                if r.abort.is_cancelled() {
                    return Err(Error::Aborted);
                }
                tx.blocking_send(c).map_err(|_| Error::Aborted)
            };
            source::read_disk(
                &files, &live, size, verify, r.chunk, &r.pool, &r.cancel, &mut emit,
            )
        })
        .await
        .map_err(|e| Error::internal(format!("reader task failed: {e}")))?
    })
}

/// The writer loop of one disk: every chunk from the channel into a [`DiskWriter`]
/// until the readers are done (or anything failed), then its [`DiskWriter::finish`].
#[allow(clippy::too_many_arguments)]
fn write_disk(
    disk: String,
    target: Box<dyn BlockTarget>,
    mut rx: mpsc::Receiver<Chunk>,
    total: u64,
    size: u64,
    opts: &ApplyOptions,
    abort: &Cancel,
    pool: &BufPool,
) -> Result<DiskReport> {
    let mut w = DiskWriter::new(disk, target, total, size, opts, abort, pool, true)?;
    while let Some(c) = rx.blocking_recv() {
        if abort.is_cancelled() || opts.cancel.is_cancelled() {
            break;
        }
        w.accept(c)?;
    }
    w.finish()
}
