//! [`GrowLater`]: imago's file storage, except that the file grows in large steps and
//! takes its exact size at flush.
//!
//! When imago allocates a cluster and the guest writes only part of it, it first makes
//! the rest read as zero: past the end of the file that was an `ftruncate` per cluster
//! (ext4 then updates the inode, journals it and walks the page cache), the largest
//! single cost of restoring many small extents into a fresh image; and every write past
//! the end dirtied the inode again. Here the file is grown [`GROW_STEP`] at a time,
//! and the storage keeps its own end: nothing at or after it was ever written, so it
//! reads as zero and zeroing there is nothing to do. `flush` and `sync` cut the file
//! back to that end (holes only), so a flushed image has exactly the size imago's
//! writes gave it. Zeroing below the end is imago's own.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::Storage;

/// imago's storage driver for plain files.
type ImagoFile = imago::file::File;

/// How far ahead of its end the file is grown.
const GROW_STEP: u64 = 64 << 20;

/// See the module docs.
#[derive(Debug)]
pub(super) struct GrowLater {
    inner: ImagoFile,
    /// The size the image has: nothing at or after it was written.
    end: AtomicU64,
}

impl GrowLater {
    pub fn new(inner: ImagoFile) -> io::Result<Self> {
        let end = inner.size()?;
        Ok(Self {
            inner,
            end: AtomicU64::new(end),
        })
    }

    /// The image now reaches `end`: the file grows a step ahead when it is shorter.
    fn reach(&self, end: u64) -> io::Result<()> {
        self.end.fetch_max(end, Ordering::Relaxed);
        if end > self.inner.size()? {
            let ahead = end.div_ceil(GROW_STEP).saturating_add(1) * GROW_STEP;
            self.inner.resize(ahead, PreallocateMode::None)?;
        }
        Ok(())
    }

    /// Cuts the file back to the image's end (what lies past it is a hole).
    fn trim(&self) -> io::Result<()> {
        let end = self.end.load(Ordering::Relaxed);
        if self.inner.size()? != end {
            self.inner.resize(end, PreallocateMode::None)?;
        }
        Ok(())
    }
}

impl fmt::Display for GrowLater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl Storage for GrowLater {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.end.load(Ordering::Relaxed))
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: our caller keeps imago's contract for this call (requests serialised
        // through the storage helper, which is the inner file's), and the inner file is
        // what we are.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(bufv.len())
            .ok_or_else(|| io::Error::other("Write offset overflow"))?;
        self.reach(end)?;
        // SAFETY: as in `pure_readv`.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| io::Error::other("Write-zeroes wrap-around"))?;
        let written = self.end.load(Ordering::Relaxed);
        if offset < written {
            // SAFETY: as in `pure_readv`.
            unsafe {
                self.inner
                    .pure_write_zeroes(offset, end.min(written) - offset)?
            };
        }
        self.reach(end)
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| io::Error::other("Write-zeroes wrap-around"))?;
        self.reach(end)?;
        // SAFETY: as in `pure_readv`.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as in `pure_readv`.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        self.trim()?;
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        self.trim()?;
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: as in `pure_readv`.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)?;
        self.end.store(new_size, Ordering::Relaxed);
        Ok(())
    }
}
