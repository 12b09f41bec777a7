//! The writer side of one disk: [`DiskWriter`] takes the disk's content in disk order
//! (chunks from the pipeline's channel, or straight from the reader for a small chain),
//! writes it to the target, reports progress and hands every write to the read-back.

use std::time::{Duration, Instant};

use super::chunk::{BufPool, Chunk};
use super::done::Written;
use super::options::{ApplyOptions, Progress};
use super::readback::{is_zero, Rolling, PENDING_MAX, READBACK_LAG};
use super::report::DiskReport;
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::target::BlockTarget;

/// Granularity of zero detection: an aligned block of this size that is all zero is
/// not written on a fresh target (a host block that stays unallocated).
const ZERO_BLOCK: u64 = 4096;

/// Runs of `bytes` (at disk offset `at`) that are all zero or not, split at
/// [`ZERO_BLOCK`] boundaries: `(offset, len, zero)`.
fn zero_runs(
    at: u64,
    bytes: &[u8],
    mut out: impl FnMut(u64, usize, usize, bool) -> Result<()>,
) -> Result<()> {
    let mut run: Option<(usize, bool)> = None;
    let mut i = 0usize;
    while i < bytes.len() {
        let next = ((at + i as u64) / ZERO_BLOCK + 1) * ZERO_BLOCK - at;
        let e = usize::try_from(next).unwrap_or(usize::MAX).min(bytes.len());
        let z = is_zero(&bytes[i..e]);
        match run {
            Some((_, rz)) if rz == z => {}
            Some((s, rz)) => {
                out(at + s as u64, s, i, rz)?;
                run = Some((i, z));
            }
            None => run = Some((i, z)),
        }
        i = e;
    }
    if let Some((s, z)) = run {
        out(at + s as u64, s, bytes.len(), z)?;
    }
    Ok(())
}

/// Data written between two [`BlockTarget::start_writeback`] calls. Without them the
/// kernel starts write-out only at its background dirty threshold (10 % of RAM by
/// default, more than many a disk), so the device idles while we copy and the whole
/// image is written at the final sync. 1.7 GB buffered + fsync on the bench machine:
/// 1.4–2.4 s plain, 0.65–0.8 s with a kick every 32 MiB.
pub(super) const WRITEBACK_STEP: u64 = 32 << 20;

/// Writes one disk, fed chunk by chunk. With `verify_readback`, every piece is read
/// back through the target (for qcow2: through the image's cluster mapping) shortly after
/// it was written, while its pages are still cached, and compared with the xxh3 of what
/// was written; its cache is then released ([`crate::target::release_file_range`]), so
/// the page cache holds only the last ~100 MiB of the output and new writes reuse
/// recently freed pages (on the bench VM, fresh page-cache pages were the dominant cost
/// of a restore). After the last write and the flush, [`Rolling::final_check`] confirms
/// that nothing written or verified earlier moved or was overwritten, and that the
/// holes read as zero.
pub(super) struct DiskWriter<'a> {
    disk: String,
    target: Box<dyn BlockTarget>,
    /// Disk size (the holes the final check reads end there).
    size: u64,
    opts: &'a ApplyOptions,
    abort: &'a Cancel,
    pool: &'a BufPool,
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
    /// With `background` and a storage file, starts the read-back thread (else
    /// pieces are read back through the target on the writing thread).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        disk: String,
        target: Box<dyn BlockTarget>,
        total: u64,
        size: u64,
        opts: &'a ApplyOptions,
        abort: &'a Cancel,
        pool: &'a BufPool,
        background: bool,
    ) -> Result<Self> {
        let started = Instant::now();
        let rep = DiskReport {
            disk: disk.clone(),
            ..DiskReport::default()
        };
        let fresh = target.starts_zeroed();
        let storage = if background {
            target.storage_file()
        } else {
            None
        };
        let rolling = Rolling::new(storage, &disk, opts, abort)?;
        Ok(Self {
            disk,
            target,
            size,
            opts,
            abort,
            pool,
            started,
            rep,
            fresh,
            rolling,
            since_writeback: 0,
            done: 0,
            total,
            reported: u64::MAX,
            last_report: Instant::now(),
        })
    }

    /// Writes one chunk: data runs (all-zero blocks skipped on a fresh target, zeroed
    /// on another), holes (zeroed where the target did not start zeroed); hands its
    /// buffer back to the pool.
    pub(super) fn accept(&mut self, c: Chunk) -> Result<()> {
        let mut at = 0usize;
        for seg in &c.segs {
            if !seg.data {
                if !self.fresh {
                    self.target.write_zeroes(seg.offset, seg.len)?;
                    self.rep.bytes_zeroed += seg.len;
                }
                continue;
            }
            let n = usize::try_from(seg.len).unwrap_or(usize::MAX);
            let bytes = c.data.get(at..at + n).ok_or_else(|| {
                Error::internal("internal: a chunk holds fewer bytes than its segments")
            })?;
            at += n;
            if self.fresh {
                zero_runs(seg.offset, bytes, |off, s, e, zero| {
                    if zero {
                        self.rep.bytes_zero_skipped += (e - s) as u64;
                        Ok(())
                    } else {
                        self.write(off, &bytes[s..e])
                    }
                })?;
            } else if is_zero(bytes) {
                self.target.write_zeroes(seg.offset, seg.len)?;
                self.rep.bytes_zeroed += seg.len;
            } else {
                self.write(seg.offset, bytes)?;
            }
        }
        self.pool.put(c.data);
        if self.since_writeback >= WRITEBACK_STEP || self.rolling.pending_len() >= PENDING_MAX {
            self.rolling
                .settle(&mut *self.target, READBACK_LAG, true, &self.disk, self.opts)?;
            self.since_writeback = 0;
        }
        self.done += c.live;
        self.report_progress();
        Ok(())
    }

    /// Writes data and hands it to the read-back.
    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.target.write_at(offset, bytes)?;
        let len = bytes.len() as u64;
        self.rep.bytes_written += len;
        self.since_writeback += len;
        let hash = if self.opts.verify_readback {
            xxhash_rust::xxh3::xxh3_64(bytes)
        } else {
            0
        };
        self.rolling.push(Written {
            offset,
            len,
            hash,
            placed: 0,
        })
    }

    /// Calls the progress callback at most every 200 ms, and for the last chunk.
    fn report_progress(&mut self) {
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
    }

    /// After the last chunk: the rest of the read-back, flush, the final check, the
    /// target's final metadata and sync.
    pub(super) fn finish(mut self) -> Result<DiskReport> {
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
        // The device writes the rest (and the metadata the flush wrote) while the
        // final check reads: the sync in `finish` then mostly waits for what is under way.
        self.target.start_writeback()?;
        if opts.verify_readback {
            self.rolling
                .final_check(&mut *self.target, self.size, &self.disk, opts)?;
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
