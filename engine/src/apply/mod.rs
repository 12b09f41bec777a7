//! Apply: write a [`DiskPlan`] per disk to targets, each live block once.
//!
//! ```text
//!  chain files ──(reader jobs: sequential scan, LZ4 decode, adler32)──┐
//!                                                                      ├─ bounded channel per disk ─▶ writer per disk ─▶ BlockTarget
//!  (all disks in parallel, at most `readers` files at once) ───────────┘      (zero detection, progress, read-back verify)
//! ```
//! A tokio runtime owned by [`apply`] drives the pipeline; disk I/O itself runs on
//! blocking threads (`pread`/`pwrite` through the targets), never through `tokio::fs`.
//! Memory is bounded by the channel capacities (`memory_cap`) plus one chunk per worker.
//! A single small disk ([`ApplyOptions::inline_max_bytes`]) skips the pipeline: its files
//! are scanned on the calling thread and each piece goes straight to the same
//! `DiskWriter` (same zero handling, read-back and final check).

mod scan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbdfmt::checksum::ChecksumStatus;
use tokio::sync::{mpsc, Semaphore};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::extent::Source;
use crate::plan::DiskPlan;
use crate::target::BlockTarget;
use scan::{FileJob, Live};

/// Per-disk progress, reported by the writers.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Disk target.
    pub disk: String,
    /// Live data bytes handled so far.
    pub done: u64,
    /// Live data bytes in total.
    pub total: u64,
}

/// Progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Caller knobs for [`apply`].
#[derive(Clone)]
pub struct ApplyOptions {
    /// Upper bound for data buffered between readers and writers (all disks).
    pub memory_cap: usize,
    /// Size of the pieces handed from readers to writers.
    pub chunk_size: usize,
    /// Chain files read at the same time.
    pub readers: usize,
    /// Verify every chain file against its `.chksum` during the pass.
    pub verify_checksums: bool,
    /// Read the restored content back and compare it with what was written.
    pub verify_readback: bool,
    /// Chains whose files and live data are both at most this many bytes are restored
    /// on the calling thread, without the reader/writer pipeline (its threads cost more
    /// than a small copy). 0: always the pipeline.
    pub inline_max_bytes: u64,
    /// Called as data is written.
    pub progress: Option<ProgressFn>,
    /// Cancellation (signals).
    pub cancel: Cancel,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            memory_cap: 32 << 20,
            chunk_size: 1 << 20,
            readers: 2,
            verify_checksums: true,
            verify_readback: true,
            inline_max_bytes: INLINE_MAX_BYTES,
            progress: None,
            cancel: Cancel::new(),
        }
    }
}

impl std::fmt::Debug for ApplyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyOptions")
            .field("memory_cap", &self.memory_cap)
            .field("chunk_size", &self.chunk_size)
            .field("readers", &self.readers)
            .field("verify_checksums", &self.verify_checksums)
            .field("verify_readback", &self.verify_readback)
            .field("inline_max_bytes", &self.inline_max_bytes)
            .finish_non_exhaustive()
    }
}

/// What happened to one disk.
#[derive(Debug, Clone, Default)]
pub struct DiskReport {
    /// Disk target.
    pub disk: String,
    /// Data bytes written.
    pub bytes_written: u64,
    /// Data bytes that were all zero and left unallocated on a fresh target.
    pub bytes_zero_skipped: u64,
    /// Bytes explicitly zeroed (holes on targets that did not start zeroed).
    pub bytes_zeroed: u64,
    /// Bytes of backup files read.
    pub bytes_read: u64,
    /// Per chain file: the checksum outcome (`None`: no `.chksum`, or not verified).
    pub checksums: Vec<(PathBuf, Option<ChecksumStatus>)>,
    /// True when the content was read back and matched.
    pub readback_verified: bool,
    /// Wall time for this disk.
    pub duration: Duration,
}

/// What happened to all disks.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Per disk, in plan order.
    pub disks: Vec<DiskReport>,
    /// Total wall time.
    pub duration: Duration,
}

struct Chunk {
    offset: u64,
    data: Vec<u8>,
}

/// Splits a disk's extent map into one owned reader job per chain file.
fn jobs(plan: &DiskPlan) -> Vec<FileJob> {
    let mut per_file: Vec<BTreeMap<u32, Vec<Live>>> =
        (0..plan.files.len()).map(|_| BTreeMap::new()).collect();
    for e in plan.map.iter() {
        if let Source::Data { file, frame } = e.source {
            per_file[file as usize]
                .entry(frame)
                .or_default()
                .push(Live {
                    disk_start: e.start,
                    len: e.len,
                });
        }
    }
    per_file
        .into_iter()
        .zip(&plan.files)
        .map(|(m, f)| FileJob {
            path: f.path.clone(),
            file_size: f.index.file_size,
            stored_checksum: f.stored_checksum,
            compressed: f.compressed(),
            frames: m
                .into_iter()
                .map(|(i, live)| (f.index.frames[i as usize].clone(), live))
                .collect(),
        })
        .collect()
}

/// Writes every disk plan into its target (same order), verifying as configured.
/// Targets are flushed, verified and finished; the caller renames outputs afterwards.
pub fn apply(
    plans: &[DiskPlan],
    targets: Vec<Box<dyn BlockTarget>>,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    if plans.len() != targets.len() {
        return Err(Error::Internal(format!(
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
        if let Some(jobs) = small_jobs(plan, opts) {
            let started = Instant::now();
            let target = targets
                .into_iter()
                .next()
                .ok_or_else(|| Error::internal("internal: one plan but no target"))?;
            let disks = apply_inline(plan, jobs, target, opts)?;
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
        .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))?;
    let started = Instant::now();
    let disks = rt.block_on(run(plans, targets, opts))?;
    Ok(ApplyReport {
        disks,
        duration: started.elapsed(),
    })
}

/// Default of [`ApplyOptions::inline_max_bytes`]: chains this small are restored on the
/// calling thread alone, since reader, writer and read-back threads cost more to start,
/// hand over and stop than the whole copy (a 2 MiB chain: 13.8 → 10.2 ms wall, median
/// of 40 alternating runs).
pub const INLINE_MAX_BYTES: u64 = 8 << 20;

/// The reader jobs of a disk whose chain files (all of which a checksum check reads)
/// and live data are both within [`ApplyOptions::inline_max_bytes`]; `None` otherwise.
fn small_jobs(plan: &DiskPlan, opts: &ApplyOptions) -> Option<Vec<FileJob>> {
    if opts.inline_max_bytes == 0 || plan.data_bytes() > opts.inline_max_bytes {
        return None;
    }
    let jobs = jobs(plan);
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

/// [`run`] without threads, for [`small_jobs`] plans: every file scanned in turn, each
/// live piece written as it is read (through [`DiskWriter`], as in the pipeline), read
/// back through the target and checked exactly as the pipeline does.
fn apply_inline(
    plan: &DiskPlan,
    jobs: Vec<FileJob>,
    target: Box<dyn BlockTarget>,
    opts: &ApplyOptions,
) -> Result<Vec<DiskReport>> {
    let chunk = opts.chunk_size.max(4096);
    let pool = scan::BufPool::new(chunk, 2);
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
    let mut statuses = BTreeMap::new();
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

/// Per chain file of each disk: its checksum outcome and the bytes read for it.
fn attach_checksums(
    plans: &[DiskPlan],
    reports: &mut [DiskReport],
    statuses: &BTreeMap<PathBuf, (Option<ChecksumStatus>, u64)>,
) {
    for (plan, rep) in plans.iter().zip(reports.iter_mut()) {
        for f in &plan.files {
            let (s, read) = statuses.get(&f.path).cloned().unwrap_or((None, 0));
            rep.checksums.push((f.path.clone(), s));
            rep.bytes_read += read;
        }
    }
}

async fn run(
    plans: &[DiskPlan],
    targets: Vec<Box<dyn BlockTarget>>,
    opts: &ApplyOptions,
) -> Result<Vec<DiskReport>> {
    // Workers stop on the caller's cancel or on the first failure anywhere.
    let abort = Cancel::new();
    let chunk = opts.chunk_size.max(4096);
    let per_disk_slots = (opts.memory_cap / chunk / plans.len().max(1)).max(2);
    let reader_slots = Arc::new(Semaphore::new(opts.readers.max(1)));
    let pool = Arc::new(scan::BufPool::new(
        chunk,
        per_disk_slots * plans.len() + opts.readers.max(1) + 2,
    ));

    let mut writer_handles = Vec::new();
    let mut reader_handles = Vec::new();
    for (plan, target) in plans.iter().zip(targets) {
        let (tx, rx) = mpsc::channel::<Chunk>(per_disk_slots);
        {
            let disk = plan.disk.clone();
            let total = plan.data_bytes();
            let zero_ranges = plan.map.zero_ranges(plan.virtual_size);
            let opts2 = opts.clone();
            let abort2 = abort.clone();
            let pool2 = pool.clone();
            writer_handles.push(tokio::task::spawn_blocking(move || {
                write_disk(
                    disk,
                    target,
                    rx,
                    total,
                    &zero_ranges,
                    &opts2,
                    &abort2,
                    &pool2,
                )
            }));
        }
        for job in jobs(plan) {
            let verify = job.hashed(opts);
            if job.frames.is_empty() && !verify {
                reader_handles.push(tokio::spawn(async move {
                    Ok::<_, Error>((job.path, None, 0u64))
                }));
                continue;
            }
            let tx = tx.clone();
            let slots = reader_slots.clone();
            let cancel = opts.cancel.clone();
            let abort2 = abort.clone();
            let pool2 = pool.clone();
            reader_handles.push(tokio::spawn(async move {
                let _permit = slots.acquire_owned().await.map_err(|_| Error::Aborted)?;
                tokio::task::spawn_blocking(move || {
                    let mut emit = |offset: u64, data: Vec<u8>| -> Result<()> {
                        if abort2.is_cancelled() {
                            return Err(Error::Aborted);
                        }
                        tx.blocking_send(Chunk { offset, data })
                            .map_err(|_| Error::Aborted)
                    };
                    let status = scan::scan_file(&job, verify, chunk, &pool2, &cancel, &mut emit)?;
                    Ok::<_, Error>((
                        job.path.clone(),
                        status,
                        if verify { job.file_size } else { 0 },
                    ))
                })
                .await
                .map_err(|e| Error::Internal(format!("reader task failed: {e}")))?
            }));
        }
        drop(tx);
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
    let mut statuses: BTreeMap<PathBuf, (Option<ChecksumStatus>, u64)> = BTreeMap::new();
    for h in reader_handles {
        match h
            .await
            .map_err(|e| Error::Internal(format!("reader task failed: {e}")))
            .and_then(|x| x)
        {
            Ok((p, s, read)) => {
                statuses.insert(p, (s, read));
            }
            Err(e) => note(e, &abort),
        }
    }
    let mut reports = Vec::new();
    for h in writer_handles {
        match h
            .await
            .map_err(|e| Error::Internal(format!("writer task failed: {e}")))
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

/// Data written between two [`BlockTarget::start_writeback`] calls. Without them the
/// kernel starts write-out only at its background dirty threshold (10 % of RAM by
/// default, more than many a disk), so the device idles while we copy and the whole
/// image is written at the final sync. 1.7 GB buffered + fsync on the bench machine:
/// 1.4–2.4 s plain, 0.65–0.8 s with a kick every 32 MiB.
const WRITEBACK_STEP: u64 = 32 << 20;

/// How far (in bytes written) the read-back trails the writes: what was written before
/// the last `READBACK_LAG` bytes is read back (from the page cache, still there) and its
/// cache released, every [`WRITEBACK_STEP`].
const READBACK_LAG: u64 = 64 << 20;

/// One piece handed to the target: disk range, xxh3 of its bytes (0 for zeroes), zero,
/// and (once read back) a digest of where the target stored it.
#[derive(Debug, Clone, Copy)]
struct Written {
    offset: u64,
    len: u64,
    hash: u64,
    zero: bool,
    placed: u64,
}

/// Digest of a piece's host extents (0: the target has no mapping layer).
fn placement_of(ext: Option<&[(u64, u64)]>) -> u64 {
    match ext {
        None => 0,
        Some(v) => {
            let mut bytes = Vec::with_capacity(v.len() * 16);
            for (h, l) in v {
                bytes.extend_from_slice(&h.to_le_bytes());
                bytes.extend_from_slice(&l.to_le_bytes());
            }
            xxhash_rust::xxh3::xxh3_64(&bytes) | 1
        }
    }
}

/// Work for the read-back thread, sent every [`WRITEBACK_STEP`].
struct Batch {
    /// Start the write-out of the file's dirty pages first. Done on that thread, not
    /// the writer's: submitting write-out (ext4 block allocation, bio building) was
    /// ~10 % of the writer's CPU, and the writer is the restore's critical path.
    kick: bool,
    /// Pieces to read back, each with where its bytes are stored (`u64::MAX`: nowhere,
    /// reads as zero).
    checks: Vec<(Written, Vec<(u64, u64)>)>,
    /// Storage ranges to release afterwards.
    release: Vec<(u64, u64)>,
}

/// The rolling read-back (see [`write_disk`]).
struct Rolling {
    /// Written, not yet read back, in write order.
    pending: std::collections::VecDeque<Written>,
    pending_bytes: u64,
    /// Read back (or released unverified), for the final mapping check.
    done: Vec<Written>,
    buf: Vec<u8>,
    verify: bool,
    /// The read-back thread, for targets with a storage file.
    bg: Option<(
        std::sync::mpsc::SyncSender<Batch>,
        std::thread::JoinHandle<Result<()>>,
    )>,
}

impl Rolling {
    fn push(&mut self, w: Written) {
        self.pending_bytes += w.len;
        self.pending.push_back(w);
    }

    /// Hands everything but the newest `keep` bytes to the read-back (a thread reading
    /// the storage file, or inline through the target) and the cache release. The last
    /// call (`keep` 0) releases nothing: waiting for the write-out of the last pieces
    /// range by range would only delay the final sync, which writes them anyway.
    /// With `kick`, the write-out of everything written so far is started too (on the
    /// read-back thread when there is one).
    fn settle(
        &mut self,
        target: &mut dyn BlockTarget,
        keep: u64,
        kick: bool,
        disk: &str,
        opts: &ApplyOptions,
    ) -> Result<()> {
        if kick && self.bg.is_none() {
            target.start_writeback()?;
        }
        let mut batch = Vec::new();
        let mut release: Vec<(u64, u64)> = Vec::new();
        while self.pending_bytes > keep {
            let Some(mut w) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= w.len;
            if self.bg.is_none() {
                if self.verify {
                    opts.cancel.check()?;
                    check_piece(target, &mut self.buf, &w, disk)?;
                    if !w.zero {
                        w.placed = placement_of(target.host_extents(w.offset, w.len)?.as_deref());
                    }
                }
                self.done.push(w);
                continue;
            }
            let ext = target.host_extents(w.offset, w.len)?;
            if self.verify && !w.zero {
                w.placed = placement_of(ext.as_deref());
            }
            let phys = ext.unwrap_or_else(|| vec![(w.offset, w.len)]);
            if !w.zero && keep > 0 {
                for &(h, l) in phys.iter().filter(|&&(h, _)| h != u64::MAX) {
                    match release.last_mut() {
                        Some((o, ol)) if *o + *ol == h => *ol += l,
                        _ => release.push((h, l)),
                    }
                }
            }
            if self.verify {
                batch.push((w, phys));
            }
            self.done.push(w);
        }
        if batch.is_empty() && release.is_empty() && !kick {
            return Ok(());
        }
        let sent = match &self.bg {
            Some((tx, _)) => tx
                .send(Batch {
                    kick,
                    checks: batch,
                    release,
                })
                .is_ok(),
            None => true,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped: it failed.
            self.join()
        }
    }

    /// Waits for the read-back thread; its verdict.
    fn join(&mut self) -> Result<()> {
        match self.bg.take() {
            None => Ok(()),
            Some((tx, h)) => {
                drop(tx);
                h.join()
                    .map_err(|_| Error::internal("read-back thread panicked"))?
            }
        }
    }
}

/// The read-back thread: reads each piece from the storage file where the target put
/// it, compares it with its digest, then waits for the write-out of released ranges
/// and drops them from the page cache ([`crate::target::release_file_range`]).
fn readback_thread(
    file: std::fs::File,
    rx: std::sync::mpsc::Receiver<Batch>,
    disk: String,
    cancel: Cancel,
    abort: Cancel,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf: Vec<u8> = Vec::new();
    let run = |buf: &mut Vec<u8>, b: Batch| -> Result<()> {
        if b.kick {
            crate::target::start_file_writeback(&file);
        }
        for (w, phys) in b.checks {
            if abort.is_cancelled() {
                return Err(Error::Aborted);
            }
            cancel.check()?;
            let n = usize::try_from(w.len).unwrap_or(usize::MAX);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let mut at = 0usize;
            for (h, l) in phys {
                let l = usize::try_from(l).unwrap_or(usize::MAX).min(n - at);
                let piece = &mut buf[at..at + l];
                if h == u64::MAX {
                    piece.fill(0);
                } else {
                    file.read_exact_at(piece, h).map_err(|e| {
                        Error::target("reading back", std::path::Path::new(&disk), e)
                    })?;
                }
                at += l;
            }
            let ok = at == n
                && if w.zero {
                    is_zero(&buf[..n])
                } else {
                    xxhash_rust::xxh3::xxh3_64(&buf[..n]) == w.hash
                };
            if !ok {
                return Err(verify_failed(
                    &disk,
                    format!(
                        "content at disk offset {} (+{}) differs from the backup",
                        w.offset, w.len
                    ),
                ));
            }
        }
        for (h, l) in b.release {
            crate::target::release_file_range(&file, h, l);
        }
        Ok(())
    };
    while let Ok(b) = rx.recv() {
        if let Err(e) = run(&mut buf, b) {
            abort.abort();
            return Err(e);
        }
    }
    Ok(())
}

fn verify_failed(disk: &str, what: String) -> Error {
    Error::Verify {
        path: PathBuf::from(disk),
        message: what,
    }
}

/// Reads one written piece back and compares it with its digest.
fn check_piece(
    target: &mut dyn BlockTarget,
    buf: &mut Vec<u8>,
    w: &Written,
    disk: &str,
) -> Result<()> {
    let n = usize::try_from(w.len).unwrap_or(usize::MAX);
    if buf.len() < n {
        buf.resize(n, 0);
    }
    target.read_at(w.offset, &mut buf[..n])?;
    let ok = if w.zero {
        is_zero(&buf[..n])
    } else {
        xxhash_rust::xxh3::xxh3_64(&buf[..n]) == w.hash
    };
    if ok {
        Ok(())
    } else {
        Err(verify_failed(
            disk,
            format!(
                "content at disk offset {} (+{}) differs from the backup",
                w.offset, w.len
            ),
        ))
    }
}

/// Writes one disk. With `verify_readback`, every piece is read back through the target
/// (for qcow2: through the image's cluster mapping) shortly after it was written, while
/// its pages are still cached, and compared with the xxh3 of what was written; its
/// cache is then released ([`BlockTarget::release_cache`]), so the page cache holds only
/// the last ~100 MiB of the output and new writes reuse recently freed pages (on the
/// bench VM, fresh page-cache pages were the dominant cost of a restore). After the
/// last write and the flush, [`final_check`] confirms that nothing written or verified
/// earlier moved or was overwritten, and that the holes read as zero.
#[allow(clippy::too_many_arguments)]
fn write_disk(
    disk: String,
    target: Box<dyn BlockTarget>,
    mut rx: mpsc::Receiver<Chunk>,
    total: u64,
    zero_ranges: &[(u64, u64)],
    opts: &ApplyOptions,
    abort: &Cancel,
    pool: &scan::BufPool,
) -> Result<DiskReport> {
    let mut w = DiskWriter::new(disk, target, total, zero_ranges, opts, abort, pool, true)?;
    while let Some(c) = rx.blocking_recv() {
        if abort.is_cancelled() || opts.cancel.is_cancelled() {
            break;
        }
        w.accept(c)?;
    }
    w.finish()
}

/// The writer side of one disk (see [`write_disk`]): fed chunk by chunk, by the
/// pipeline's channel or directly by the scan of a small chain.
struct DiskWriter<'a> {
    disk: String,
    target: Box<dyn BlockTarget>,
    zero_ranges: &'a [(u64, u64)],
    opts: &'a ApplyOptions,
    abort: &'a Cancel,
    pool: &'a scan::BufPool,
    started: Instant,
    rep: DiskReport,
    fresh: bool,
    rolling: Rolling,
    since_writeback: u64,
    done: u64,
    total: u64,
    reported: u64,
    last_report: Instant,
}

impl<'a> DiskWriter<'a> {
    /// Zeroes the holes of a target that does not start zeroed and, with `background`
    /// and a storage file, starts the read-back thread (else pieces are read back
    /// through the target on the writing thread).
    #[allow(clippy::too_many_arguments)]
    fn new(
        disk: String,
        mut target: Box<dyn BlockTarget>,
        total: u64,
        zero_ranges: &'a [(u64, u64)],
        opts: &'a ApplyOptions,
        abort: &'a Cancel,
        pool: &'a scan::BufPool,
        background: bool,
    ) -> Result<Self> {
        let started = Instant::now();
        let mut rep = DiskReport {
            disk: disk.clone(),
            ..DiskReport::default()
        };
        let fresh = target.starts_zeroed();
        if !fresh {
            // A device or reused file: holes must be written as zeroes.
            for &(s, l) in zero_ranges {
                opts.cancel.check()?;
                target.write_zeroes(s, l)?;
                rep.bytes_zeroed += l;
            }
        }
        let storage = if background {
            target.storage_file()
        } else {
            None
        };
        let bg = storage.map(|file| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
            let (d, c, a) = (disk.clone(), opts.cancel.clone(), abort.clone());
            let h = std::thread::Builder::new()
                .name("vmrestore-readback".into())
                .spawn(move || readback_thread(file, rx, d, c, a));
            (tx, h)
        });
        let bg = match bg {
            None => None,
            Some((tx, Ok(h))) => Some((tx, h)),
            Some((_, Err(e))) => {
                return Err(Error::Internal(format!(
                    "cannot start the read-back thread: {e}"
                )))
            }
        };
        Ok(Self {
            disk,
            target,
            zero_ranges,
            opts,
            abort,
            pool,
            started,
            rep,
            fresh,
            rolling: Rolling {
                pending: std::collections::VecDeque::new(),
                pending_bytes: 0,
                done: Vec::new(),
                buf: Vec::new(),
                verify: opts.verify_readback,
                bg,
            },
            since_writeback: 0,
            done: 0,
            total,
            reported: u64::MAX,
            last_report: Instant::now(),
        })
    }

    /// Writes one chunk (or skips it: all zero on a fresh target) and hands its
    /// buffer back to the pool.
    fn accept(&mut self, c: Chunk) -> Result<()> {
        let len = c.data.len() as u64;
        let zero = is_zero(&c.data);
        if zero {
            if self.fresh {
                self.rep.bytes_zero_skipped += len;
            } else {
                self.target.write_zeroes(c.offset, len)?;
                self.rep.bytes_zeroed += len;
            }
        } else {
            self.target.write_at(c.offset, &c.data)?;
            self.rep.bytes_written += len;
            self.since_writeback += len;
        }
        let hash = if zero || !self.opts.verify_readback {
            0
        } else {
            xxhash_rust::xxh3::xxh3_64(&c.data)
        };
        self.pool.put(c.data);
        self.rolling.push(Written {
            offset: c.offset,
            len,
            hash,
            zero,
            placed: 0,
        });
        if self.since_writeback >= WRITEBACK_STEP {
            self.rolling
                .settle(&mut *self.target, READBACK_LAG, true, &self.disk, self.opts)?;
            self.since_writeback = 0;
        }
        self.done += len;
        if let Some(p) = &self.opts.progress {
            if self.last_report.elapsed() >= Duration::from_millis(200) || self.done == self.total {
                p(&Progress {
                    disk: self.disk.clone(),
                    done: self.done,
                    total: self.total,
                });
                self.reported = self.done;
                self.last_report = Instant::now();
            }
        }
        Ok(())
    }

    /// After the last chunk: the rest of the read-back, flush, the final check, the
    /// target's final metadata and sync.
    fn finish(mut self) -> Result<DiskReport> {
        let opts = self.opts;
        opts.cancel.check()?;
        if self.abort.is_cancelled() {
            // Maybe the read-back thread stopped everything: its error is the one to report.
            self.rolling.join()?;
            return Err(Error::Aborted);
        }
        self.rolling
            .settle(&mut *self.target, 0, false, &self.disk, opts)?;
        self.rolling.join()?;
        self.target.flush()?;
        if opts.verify_readback {
            final_check(
                &mut *self.target,
                &mut self.rolling,
                self.zero_ranges,
                &self.disk,
                opts,
            )?;
            self.rep.readback_verified = true;
        }
        self.target.finish()?;
        if let (Some(p), false) = (&opts.progress, self.reported == self.done) {
            p(&Progress {
                disk: self.disk.clone(),
                done: self.done,
                total: self.total,
            });
        }
        self.rep.duration = self.started.elapsed();
        Ok(self.rep)
    }
}

/// True when every byte is zero (compared 16 bytes at a time; vectorises well).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// The end of the read-back, after the flush. The pieces were read back while the
/// restore ran; this proves none of them was overwritten afterwards: they do not overlap
/// on the disk, and where the target stores data through a mapping (qcow2 clusters,
/// [`BlockTarget::host_extents`]) each piece is still stored where it was read back
/// from, and no two pieces share storage. Then every hole must read as zero.
fn final_check(
    target: &mut dyn BlockTarget,
    rolling: &mut Rolling,
    zero_ranges: &[(u64, u64)],
    disk: &str,
    opts: &ApplyOptions,
) -> Result<()> {
    let Rolling { done, buf, .. } = rolling;
    done.sort_unstable_by_key(|w| w.offset);
    if buf.is_empty() {
        buf.resize(opts.chunk_size.max(4096), 0);
    }
    let mut host: Vec<(u64, u64, u64)> = Vec::new();
    let mut prev_end = 0u64;
    for w in done.iter() {
        opts.cancel.check()?;
        if w.offset < prev_end {
            return Err(verify_failed(
                disk,
                format!("disk offset {} was written twice", w.offset),
            ));
        }
        prev_end = w.offset + w.len;
        if w.zero {
            continue;
        }
        if let Some(v) = target.host_extents(w.offset, w.len)? {
            if placement_of(Some(&v)) != w.placed {
                return Err(verify_failed(
                    disk,
                    format!(
                        "content at disk offset {} (+{}) moved after it was read back",
                        w.offset, w.len
                    ),
                ));
            }
            host.extend(
                v.into_iter()
                    .filter(|&(h, _)| h != u64::MAX)
                    .map(|(h, l)| (h, l, w.offset)),
            );
        }
    }
    host.sort_unstable();
    for pair in host.windows(2) {
        let ((h0, l0, d0), (h1, _, d1)) = (pair[0], pair[1]);
        if h0 + l0 > h1 {
            return Err(verify_failed(
                disk,
                format!("disk offsets {d0} and {d1} share storage at image offset {h1}"),
            ));
        }
    }
    for &(s, l) in zero_ranges {
        for (ds, dl) in target.data_ranges(s, l)? {
            let mut pos = ds;
            while pos < ds + dl {
                opts.cancel.check()?;
                let n = usize::try_from(ds + dl - pos)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                target.read_at(pos, &mut buf[..n])?;
                if !is_zero(&buf[..n]) {
                    return Err(verify_failed(
                        disk,
                        format!("disk offset {pos} should read as zero"),
                    ));
                }
                pos += n as u64;
            }
        }
    }
    Ok(())
}
