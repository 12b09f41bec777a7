//! The writer side of one disk: [`DiskWriter`] takes the live pieces (from the
//! pipeline's channel or straight from the scan of a small chain), writes them to the
//! target, reports progress and hands every piece to the read-back.

use std::time::{Duration, Instant};

use super::options::{ApplyOptions, Progress};
use super::readback::{is_zero, Rolling, Written, READBACK_LAG};
use super::report::DiskReport;
use super::scan::BufPool;
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::target::BlockTarget;

/// A live piece on its way from a reader to the writer: its disk offset and bytes.
pub(super) struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
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
    zero_ranges: &'a [(u64, u64)],
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
    /// Zeroes the holes of a target that does not start zeroed and, with `background`
    /// and a storage file, starts the read-back thread (else pieces are read back
    /// through the target on the writing thread).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        disk: String,
        mut target: Box<dyn BlockTarget>,
        total: u64,
        zero_ranges: &'a [(u64, u64)],
        opts: &'a ApplyOptions,
        abort: &'a Cancel,
        pool: &'a BufPool,
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
        let rolling = Rolling::new(storage, &disk, opts, abort)?;
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
            rolling,
            since_writeback: 0,
            done: 0,
            total,
            reported: u64::MAX,
            last_report: Instant::now(),
        })
    }

    /// Writes one chunk (or skips it: all zero on a fresh target) and hands its
    /// buffer back to the pool.
    pub(super) fn accept(&mut self, c: Chunk) -> Result<()> {
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
        self.report_progress();
        Ok(())
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
        if opts.verify_readback {
            self.rolling
                .final_check(&mut *self.target, self.zero_ranges, &self.disk, opts)?;
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
