//! Read-back verification of what a [`DiskWriter`](super::writer::DiskWriter) wrote: the
//! rolling read-back while the restore runs ([`Rolling`], on a thread of its own for
//! targets with a storage file) and the final check after the flush.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;

use super::done::{DoneLog, SharedCheck, Written};
use super::options::ApplyOptions;
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::target::BlockTarget;

/// How far (in bytes written) the read-back trails the writes: what was written before
/// the last `READBACK_LAG` bytes is read back (from the page cache, still there) and its
/// cache released, every [`WRITEBACK_STEP`](super::writer::WRITEBACK_STEP).
pub(super) const READBACK_LAG: u64 = 64 << 20;

/// Pieces written and not yet read back, at most (many tiny pieces far apart: the
/// read-back then runs by count, not by bytes).
pub(super) const PENDING_MAX: usize = 32 << 10;

/// Release ranges at most this far apart are released as one (see [`Rolling::settle`]).
const RELEASE_GAP: u64 = 4 << 20;

impl Written {
    /// True when `bytes` (read back from where this piece was written) are what was
    /// written.
    fn matches(&self, bytes: &[u8]) -> bool {
        xxhash_rust::xxh3::xxh3_64(bytes) == self.hash
    }

    /// The error for content that differs from this piece.
    fn differs(&self, disk: &str) -> Error {
        verify_failed(
            disk,
            format!(
                "content at disk offset {} (+{}) differs from the backup",
                self.offset, self.len
            ),
        )
    }
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

/// Work for the read-back thread, sent every
/// [`WRITEBACK_STEP`](super::writer::WRITEBACK_STEP).
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

/// The rolling read-back (see [`DiskWriter`](super::writer::DiskWriter)).
pub(super) struct Rolling {
    /// Written, not yet read back, in write order.
    pending: VecDeque<Written>,
    pending_bytes: u64,
    /// Read back (or released unverified), for the final mapping check.
    done: DoneLog,
    buf: Vec<u8>,
    verify: bool,
    /// The read-back thread, for targets with a storage file.
    bg: Option<(SyncSender<Batch>, JoinHandle<Result<()>>)>,
}

impl Rolling {
    /// With `storage` (the target's storage file), starts the read-back thread; without,
    /// pieces are read back through the target on the writing thread.
    pub(super) fn new(
        storage: Option<File>,
        disk: &str,
        opts: &ApplyOptions,
        abort: &Cancel,
    ) -> Result<Self> {
        let bg = storage.map(|file| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
            let (d, c, a) = (disk.to_owned(), opts.cancel.clone(), abort.clone());
            let h = std::thread::Builder::new()
                .name("vmrestore-readback".into())
                .spawn(move || readback_thread(file, rx, d, c, a));
            (tx, h)
        });
        let bg = match bg {
            None => None,
            Some((tx, Ok(h))) => Some((tx, h)),
            Some((_, Err(e))) => {
                return Err(Error::internal(format!(
                    "cannot start the read-back thread: {e}"
                )))
            }
        };
        Ok(Self {
            pending: VecDeque::new(),
            pending_bytes: 0,
            done: DoneLog::default(),
            buf: Vec::new(),
            verify: opts.verify_readback,
            bg,
        })
    }

    pub(super) fn push(&mut self, w: Written) -> Result<()> {
        if let Some(last) = self.pending.back() {
            if w.offset < last.end() {
                return Err(Error::internal(format!(
                    "internal: disk offset {} written out of order",
                    w.offset
                )));
            }
        }
        self.pending_bytes += w.len;
        self.pending.push_back(w);
        Ok(())
    }

    /// Pieces not yet read back.
    pub(super) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Hands everything but the newest `keep` bytes to the read-back (a thread reading
    /// the storage file, or inline through the target) and the cache release. The last
    /// call (`keep` 0) releases nothing: waiting for the write-out of the last pieces
    /// range by range would only delay the final sync, which writes them anyway.
    /// With `kick`, the write-out of everything written so far is started too (on the
    /// read-back thread when there is one). Storage ranges to release that lie close
    /// together are released as one range (one wait and one cache drop instead of one
    /// per piece: 4 KiB pieces 64 KiB apart were a `sync_file_range` each): what lies
    /// between them was written earlier too (the disk is written in order and a fresh
    /// image allocates in order), or is image metadata, which a release only writes
    /// out early.
    pub(super) fn settle(
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
        while self.pending_bytes > keep || (keep > 0 && self.pending.len() > PENDING_MAX / 2) {
            let Some(mut w) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= w.len;
            if self.bg.is_none() {
                if self.verify {
                    opts.cancel.check()?;
                    check_piece(target, &mut self.buf, &w, disk)?;
                    w.placed = placement_of(target.host_extents(w.offset, w.len)?.as_deref());
                }
                self.done.push(w)?;
                continue;
            }
            let ext = target.host_extents(w.offset, w.len)?;
            if self.verify {
                w.placed = placement_of(ext.as_deref());
            }
            let phys = ext.unwrap_or_else(|| vec![(w.offset, w.len)]);
            if keep > 0 {
                release.extend(phys.iter().filter(|&&(h, _)| h != u64::MAX));
            }
            if self.verify {
                batch.push((w, phys));
            }
            self.done.push(w)?;
        }
        let release = merge_ranges(release, RELEASE_GAP);
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
    pub(super) fn join(&mut self) -> Result<()> {
        match self.bg.take() {
            None => Ok(()),
            Some((tx, h)) => {
                drop(tx);
                h.join()
                    .map_err(|_| Error::internal("read-back thread panicked"))?
            }
        }
    }

    /// The end of the read-back, after the flush. The pieces were read back while the
    /// restore ran; this proves none of them was overwritten afterwards: they do not
    /// overlap on the disk, and where the target stores data through a mapping (qcow2
    /// clusters, [`BlockTarget::host_extents`]) each piece is still stored where it was
    /// read back from, and no two pieces share storage. Then everything of the first
    /// `size` bytes no piece wrote (gaps, zero frames, zero blocks) must read as zero.
    /// One pass over the pieces, in disk order.
    pub(super) fn final_check(
        &mut self,
        target: &mut dyn BlockTarget,
        size: u64,
        disk: &str,
        opts: &ApplyOptions,
    ) -> Result<()> {
        if self.buf.is_empty() {
            self.buf.resize(opts.chunk_size.max(4096), 0);
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut shared = SharedCheck::new(target.host_granule());
        let mut prev_end = 0u64;
        let r = self.done.for_each(|w| {
            opts.cancel.check()?;
            if w.offset < prev_end {
                return Err(verify_failed(
                    disk,
                    format!("disk offset {} was written twice", w.offset),
                ));
            }
            check_holes(target, &mut buf, prev_end, w.offset, disk, opts)?;
            prev_end = w.end();
            check_placement(target, &w, &mut shared, disk)
        });
        let r =
            r.and_then(|()| check_holes(target, &mut buf, prev_end.min(size), size, disk, opts));
        self.buf = buf;
        r
    }
}

/// The read-back thread: reads each piece from the storage file where the target put
/// it, compares it with its digest, then waits for the write-out of released ranges
/// and drops them from the page cache ([`crate::target::release_file_range`]).
fn readback_thread(
    file: File,
    rx: Receiver<Batch>,
    disk: String,
    cancel: Cancel,
    abort: Cancel,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(b) = rx.recv() {
        if let Err(e) = check_batch(&file, &mut buf, b, &disk, &cancel, &abort) {
            abort.abort();
            return Err(e);
        }
    }
    Ok(())
}

/// One [`Batch`] on the read-back thread.
fn check_batch(
    file: &File,
    buf: &mut Vec<u8>,
    b: Batch,
    disk: &str,
    cancel: &Cancel,
    abort: &Cancel,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    if b.kick {
        crate::target::start_file_writeback(file);
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
                file.read_exact_at(piece, h)
                    .map_err(|e| Error::target("reading back", std::path::Path::new(disk), e))?;
            }
            at += l;
        }
        if !(at == n && w.matches(&buf[..n])) {
            return Err(w.differs(disk));
        }
    }
    for (h, l) in b.release {
        crate::target::release_file_range(file, h, l);
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
    if w.matches(&buf[..n]) {
        Ok(())
    } else {
        Err(w.differs(disk))
    }
}

/// True when every byte is zero (compared 16 bytes at a time; vectorises well).
pub(super) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// Merges sorted-or-not storage ranges into sorted ranges, joining those less than
/// `gap` apart.
fn merge_ranges(mut v: Vec<(u64, u64)>, gap: u64) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len().min(64));
    for (h, l) in v {
        match out.last_mut() {
            Some((o, ol)) if h <= *o + *ol + gap => *ol = (*ol).max(h + l - *o),
            _ => out.push((h, l)),
        }
    }
    out
}

/// The piece is still stored where it was read back from, in storage no other piece
/// uses (see [`Rolling::final_check`]).
fn check_placement(
    target: &mut dyn BlockTarget,
    w: &Written,
    shared: &mut SharedCheck,
    disk: &str,
) -> Result<()> {
    let Some(v) = target.host_extents(w.offset, w.len)? else {
        return Ok(());
    };
    if placement_of(Some(&v)) != w.placed {
        return Err(verify_failed(
            disk,
            format!(
                "content at disk offset {} (+{}) moved after it was read back",
                w.offset, w.len
            ),
        ));
    }
    let mut guest = w.offset;
    for (h, l) in v {
        if h != u64::MAX && !shared.check(h, l, guest) {
            return Err(verify_failed(
                disk,
                format!("disk offset {guest} shares storage at image offset {h} with other data"),
            ));
        }
        guest += l;
    }
    Ok(())
}

/// `[from, to)` reads as zero (where the target may hold data at all).
fn check_holes(
    target: &mut dyn BlockTarget,
    buf: &mut [u8],
    from: u64,
    to: u64,
    disk: &str,
    opts: &ApplyOptions,
) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    for (ds, dl) in target.data_ranges(from, to - from)? {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_ranges_merge_across_small_gaps() {
        assert_eq!(
            merge_ranges(vec![(100, 4), (0, 4), (8 << 20, 1)], RELEASE_GAP),
            vec![(0, 104), (8 << 20, 1)]
        );
        assert_eq!(merge_ranges(vec![(0, 10), (2, 3)], 0), vec![(0, 10)]);
    }
}
