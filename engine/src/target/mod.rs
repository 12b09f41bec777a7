//! Where restored bytes go. Every target implements [`BlockTarget`].
//!
//! Contract (after imago's storage contract):
//! - `write_at` writes all of the buffer or fails; no short writes.
//! - `write_zeroes` makes the range *read back as zero*. It may deallocate, but a bare
//!   discard (which may read back stale data) is never enough.
//! - `flush` hands data to the OS (metadata included for image formats); `sync`
//!   makes it durable. `sync` implies `flush`.
//! - `finish` must be called once at the end (it writes final metadata); dropping a
//!   target without `finish` leaves an incomplete file that must not take its final name.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use crate::error::Result;

pub mod nbd;
pub mod null;
pub mod overlay;
pub mod qcow2;
pub mod raw;

/// A restore destination of fixed size.
pub trait BlockTarget: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// True when every byte of the target reads as zero before anything is written
    /// (a freshly created file or image), so zero ranges need no write at all.
    fn starts_zeroed(&self) -> bool;

    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zero.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Reads guest content back (for verification).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Pushes buffered data and metadata to the OS.
    fn flush(&mut self) -> Result<()>;

    /// Makes everything written durable.
    fn sync(&mut self) -> Result<()>;

    /// Final metadata, flush and sync. Called exactly once, last.
    fn finish(&mut self) -> Result<()>;

    /// Starts writing the output's dirty page-cache data to the device, without waiting
    /// for it (a hint). [`apply`](crate::apply()) calls it every few MiB, so the device
    /// works while the restore still copies, instead of idling until the final sync, and
    /// dirty pages never pile up. Durability still comes only from `sync`/`finish`.
    /// The default does nothing (targets without a page cache of their own).
    fn start_writeback(&mut self) -> Result<()> {
        Ok(())
    }

    /// A second handle on the file holding the target's data, for reading back (at
    /// the places [`host_extents`](Self::host_extents) names) on another thread and
    /// for dropping restored ranges from the page cache. `None` (the default): the
    /// read-back goes through [`read_at`](Self::read_at).
    fn storage_file(&self) -> Option<File> {
        None
    }

    /// Where `[offset, offset + len)` is stored, for targets that map the disk onto
    /// their storage (image formats): `(storage offset, len)` pieces in disk order,
    /// `u64::MAX` as the offset of pieces stored nowhere (reading as zero). `None` when
    /// the disk is its storage (raw) or the storage is not visible (NBD): the default.
    fn host_extents(&mut self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Sub-ranges of `[offset, offset + len)` that may hold data (the rest is known to
    /// read as zero without looking). Used by read-back verification to skip holes.
    /// The default knows nothing and returns the whole range.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![(offset, len)]
        })
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file: queues write-out of its
/// dirty pages that are not already under write-out, and returns without waiting.
/// Errors are ignored: this is only a hint, and a real write error surfaces at the sync.
pub(crate) fn start_file_writeback(file: &File) {
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is owned
    // by `file`, which is alive for the call.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Waits for the write-out of `[offset, offset + len)` of `file` (starting it where
/// needed), then drops those pages from the page cache. A hint: errors are ignored
/// (a write error surfaces at the sync, a failed drop only costs memory).
pub(crate) fn release_file_range(file: &File, offset: u64, len: u64) {
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    let fd = file.as_raw_fd();
    // SAFETY: both calls only read their integer arguments; the descriptor is owned by
    // `file`, which is alive for the calls.
    unsafe {
        let _ = libc::sync_file_range(
            fd,
            o,
            l,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
        let _ = libc::posix_fadvise(fd, o, l, libc::POSIX_FADV_DONTNEED);
    }
}
