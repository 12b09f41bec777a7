//! [`Stored`]: the bytes of one chain file as the disk-order pass reads them. Reads
//! come in file order per file (a stream lists its frames in disk order), interleaved
//! with the other files of the chain; each file keeps a small read-ahead window, and,
//! when its `.chksum` is verified, passes every byte through adler32 exactly once, in
//! order — superseded data included — so the checksum costs no second read.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbdfmt::{Error as FmtError, ErrorKind as FmtKind};

use crate::cancel::Cancel;
use crate::error::{Error, Result};

/// The read window of a file of `size` bytes in a chain of `total` bytes: 2 MiB shared
/// out by size, at least 2 KiB (a run of small frames per `pread`; a chain of 2,000
/// files keeps 2,000 windows, 4 MiB at this floor), at most 64 KiB (a
/// fresh window is page faults: on a 2 MiB chain, 256 KiB windows cost a fifth of the
/// restore).
pub(super) fn window_for(size: u64, total: u64) -> usize {
    let share = (2u128 << 20) * u128::from(size) / u128::from(total.max(1));
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(2 << 10, 64 << 10)
}

/// Reads of this many bytes or more go straight into the caller's buffer (one copy,
/// not two through the window).
const DIRECT: usize = 16 << 10;

/// The error for an I/O failure at `offset` of backup file `path`.
pub(super) fn backup_io(path: &Path, offset: u64, source: io::Error) -> Error {
    Error::Backup(FmtError::from(FmtKind::Io { offset, source }).in_file(path))
}

/// The error for a backup file that ends `expected - got` bytes early at `offset`.
pub(super) fn truncated(path: &Path, offset: u64, expected: u64, got: u64) -> Error {
    Error::Backup(
        FmtError::from(FmtKind::TruncatedPayload {
            offset,
            expected,
            got,
        })
        .in_file(path),
    )
}

/// One chain file's stored bytes (see the module docs).
pub(super) struct Stored {
    path: PathBuf,
    file: Arc<File>,
    /// Size the plan saw (a file that shrank since is truncated).
    size: u64,
    hash: Option<simd_adler32::Adler32>,
    /// When hashing: every byte before it went through adler32.
    hash_pos: u64,
    /// `win[..win_len]` holds the file from `win_start` (allocated on first use).
    win: Vec<u8>,
    win_cap: usize,
    win_start: u64,
    win_len: usize,
    /// Bytes read from the file.
    pub read: u64,
    /// Checked while a long stretch is hashed.
    cancel: Cancel,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("path", &self.path)
            .field("hash_pos", &self.hash_pos)
            .finish_non_exhaustive()
    }
}

impl Stored {
    /// A file of `size` bytes, hashed when `hash`, with a window of `win_cap` bytes.
    pub fn new(
        path: &Path,
        file: Arc<File>,
        size: u64,
        hash: bool,
        win_cap: usize,
        cancel: &Cancel,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            file,
            size,
            hash: hash.then(simd_adler32::Adler32::new),
            hash_pos: 0,
            win: Vec::new(),
            // No bigger than the file (a small chain's files are a few KiB).
            win_cap: win_cap.min(usize::try_from(size).unwrap_or(usize::MAX).max(4096)),
            win_start: 0,
            win_len: 0,
            read: 0,
            cancel: cancel.clone(),
        }
    }

    /// `pread` until `buf` is full or the file ends; the bytes read.
    fn pread(&mut self, buf: &mut [u8], at: u64) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(backup_io(&self.path, at + got as u64, e)),
            }
        }
        self.read += got as u64;
        Ok(got)
    }

    /// Passes `bytes`, read from file offset `at`, through adler32 where they extend
    /// what was hashed.
    fn hash_read(&mut self, at: u64, bytes: &[u8]) {
        let Some(h) = &mut self.hash else { return };
        let end = at + bytes.len() as u64;
        if at <= self.hash_pos && self.hash_pos < end {
            let from = usize::try_from(self.hash_pos - at).unwrap_or(usize::MAX);
            h.write(&bytes[from..]);
            self.hash_pos = end;
        }
    }

    /// Fills the window from `at` (up to its capacity); the bytes it holds.
    fn fill(&mut self, at: u64) -> Result<usize> {
        if self.win.len() < self.win_cap {
            self.win = vec![0u8; self.win_cap];
        }
        let mut win = std::mem::take(&mut self.win);
        let r = self.pread(&mut win, at);
        self.win = win;
        self.win_start = at;
        self.win_len = r?;
        let n = self.win_len;
        if self.hash.is_some() {
            let win = std::mem::take(&mut self.win);
            self.hash_read(at, &win[..n]);
            self.win = win;
        }
        Ok(n)
    }

    /// Copies what the window holds of `[at, at + dst.len())` from its start; the
    /// bytes copied.
    fn copy_from_window(&self, at: u64, dst: &mut [u8]) -> usize {
        let end = self.win_start + self.win_len as u64;
        if at < self.win_start || at >= end {
            return 0;
        }
        let i = usize::try_from(at - self.win_start).unwrap_or(usize::MAX);
        let n = dst.len().min(self.win_len - i);
        dst[..n].copy_from_slice(&self.win[i..i + n]);
        n
    }

    /// Reads `dst.len()` bytes at file offset `at` (an error when the file ends first).
    /// Reads at or after the hashed part stream the file in order through the window
    /// (whatever lies before `at` is hashed on the way); reads of [`DIRECT`] bytes or
    /// more (or of the whole window) go straight into `dst`.
    pub fn read_at(&mut self, mut at: u64, mut dst: &mut [u8]) -> Result<()> {
        let want = dst.len() as u64;
        let start = at;
        while !dst.is_empty() {
            let n = self.copy_from_window(at, dst);
            if n > 0 {
                at += n as u64;
                dst = &mut dst[n..];
                continue;
            }
            if self.hash.is_some() && self.hash_pos < at {
                // Hash up to `at` through the window, which then holds what follows.
                self.cancel.check()?;
                let pos = self.hash_pos;
                if self.fill(pos)? == 0 {
                    return Err(truncated(&self.path, pos, at - pos, 0));
                }
                continue;
            }
            if dst.len() >= self.win_cap.min(DIRECT) {
                let got = self.pread(dst, at)?;
                self.hash_read(at, &dst[..got]);
                if got < dst.len() {
                    return Err(truncated(&self.path, start, want, at - start + got as u64));
                }
                return Ok(());
            }
            if self.fill(at)? == 0 {
                return Err(truncated(&self.path, start, want, at - start));
            }
        }
        Ok(())
    }

    /// After the last read: the rest of the file through adler32 (the size the plan
    /// saw first, so a file that shrank is truncated, then anything it grew by); the
    /// computed checksum, `None` when not hashing.
    /// `check` (cancellation) runs before every read.
    pub fn finish_checked(&mut self, check: &dyn Fn() -> Result<()>) -> Result<Option<u32>> {
        if self.hash.is_none() {
            return Ok(None);
        }
        while self.hash_pos < self.size {
            check()?;
            let pos = self.hash_pos;
            if self.fill(pos)? == 0 {
                return Err(truncated(&self.path, pos, self.size - pos, 0));
            }
        }
        loop {
            check()?;
            if self.fill(self.hash_pos)? == 0 {
                break;
            }
        }
        self.win = Vec::new();
        Ok(self.hash.take().map(|h| h.finish()))
    }

    /// Drops the window (the file is not read for a while, or any more).
    pub fn release(&mut self) {
        self.win = Vec::new();
        self.win_len = 0;
    }

    /// `Read + Seek` over the file (for a [`nbdfmt::StreamReader`] that walks it from
    /// start to end: everything goes through the window, and the hash, once).
    pub fn seekable(&mut self) -> StoredSeek<'_> {
        StoredSeek { s: self, pos: 0 }
    }

    /// A `Read` of the file from `at` (for a decoder), in order.
    pub fn reader(self, at: u64) -> StoredReader {
        StoredReader { s: self, pos: at }
    }
}

/// [`Stored`] as a `Read` from a position: what an LZ4 decoder reads from.
#[derive(Debug)]
pub(super) struct StoredReader {
    pub s: Stored,
    pub pos: u64,
}

impl Read for StoredReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.s.size.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.s
            .read_at(self.pos, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// [`Stored`] as `Read + Seek` (see [`Stored::seekable`]); the end is the size the plan
/// saw.
#[derive(Debug)]
pub(super) struct StoredSeek<'a> {
    s: &'a mut Stored,
    pos: u64,
}

impl Read for StoredSeek<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.s.size.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.s
            .read_at(self.pos, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for StoredSeek<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "seek before the file start");
        self.pos = match to {
            io::SeekFrom::Start(p) => p,
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(bad)?,
            io::SeekFrom::End(d) => self.s.size.checked_add_signed(d).ok_or_else(bad)?,
        };
        Ok(self.pos)
    }
}
