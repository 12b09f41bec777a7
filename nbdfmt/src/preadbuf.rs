//! [`PreadBuf`]: a `Read + Seek` view of a file for header walks, where every seek is
//! free and read-ahead adapts to the distance between reads.
//!
//! Walking a stream's headers is a seek and a 42-byte read per frame. Through a
//! `BufReader`, every absolute seek drops the buffer and the next read refills all of
//! it: 64 KiB copied per header, even when the next header was already buffered
//! (small frames) or lies megabytes away (large frames). `PreadBuf` keeps its buffer
//! across seeks, never calls `lseek` (positioned reads), and refills with the whole
//! buffer only when the read is close to the previous window; a far jump reads one
//! small block.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Read-ahead after a far jump.
const SMALL_FILL: usize = 4096;

/// Smallest window: a frame header (42 bytes) and then some. A chain of thousands of
/// files keeps one window per file open at once (the k-way merge), so windows there
/// are shared out small (2,000 files: 1 KiB each, not 4 KiB).
const MIN_CAP: usize = 512;

/// Buffered positioned reads on a [`File`]. See the module docs.
#[derive(Debug)]
pub struct PreadBuf {
    file: Arc<File>,
    pos: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_start: u64,
    /// Valid bytes in `buf`.
    buf_len: usize,
}

impl PreadBuf {
    /// Wraps `file` (reads start at offset 0) with a read-ahead window of `cap` bytes.
    pub fn new(file: File, cap: usize) -> Self {
        Self::shared(Arc::new(file), cap)
    }

    /// Like [`new`](Self::new) on a file that other readers use too (positioned reads
    /// never move a shared offset).
    pub fn shared(file: Arc<File>, cap: usize) -> Self {
        Self {
            file,
            pos: 0,
            buf: vec![0u8; cap.max(MIN_CAP)],
            buf_start: 0,
            buf_len: 0,
        }
    }

    /// The file.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    fn pread(&self, at: u64, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read_at(dst, at) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Read for PreadBuf {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        let buf_end = self.buf_start + self.buf_len as u64;
        if self.pos < self.buf_start || self.pos >= buf_end {
            if dst.len() >= self.buf.len() {
                let n = self.pread(self.pos, dst)?;
                self.pos += n as u64;
                return Ok(n);
            }
            // Near the previous window (small frames): read a whole window ahead.
            // Far away (large frames, the trailer): one small block.
            let near = self.pos >= buf_end && self.pos - buf_end < self.buf.len() as u64;
            let fill = if near || self.buf_len == 0 {
                self.buf.len()
            } else {
                SMALL_FILL.max(dst.len()).min(self.buf.len())
            };
            let mut buf = std::mem::take(&mut self.buf);
            let r = self.pread(self.pos, &mut buf[..fill]);
            self.buf = buf;
            self.buf_start = self.pos;
            self.buf_len = 0;
            self.buf_len = r?;
            if self.buf_len == 0 {
                return Ok(0);
            }
        }
        let at = usize::try_from(self.pos - self.buf_start).unwrap_or(usize::MAX);
        let n = dst.len().min(self.buf_len - at);
        dst[..n].copy_from_slice(&self.buf[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PreadBuf {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "seek before the file start");
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(bad)?,
            SeekFrom::End(d) => self
                .file
                .metadata()?
                .len()
                .checked_add_signed(d)
                .ok_or_else(bad)?,
        };
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_like_the_file_at_any_seek() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::tempfile().expect("tmp");
        f.write_all(&data).expect("write");
        let mut r = PreadBuf::new(f, 8192);
        let mut rng = 12345u64;
        for _ in 0..2000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let jump = (rng >> 33) % 3;
            let pos = match jump {
                0 => r.pos + (rng >> 40) % 100,
                1 => r.pos + (rng >> 40) % 20_000,
                _ => (rng >> 20) % 310_000,
            };
            r.seek(SeekFrom::Start(pos)).expect("seek");
            let len = ((rng >> 45) % 20_000) as usize;
            let mut got = vec![0u8; len];
            let mut n = 0;
            while n < len {
                let k = r.read(&mut got[n..]).expect("read");
                if k == 0 {
                    break;
                }
                n += k;
            }
            let lo = (pos as usize).min(data.len());
            let hi = (pos as usize + len).min(data.len());
            assert_eq!(&got[..n], &data[lo..hi], "pos {pos} len {len}");
        }
        assert_eq!(r.seek(SeekFrom::End(-10)).expect("end"), 299_990);
        assert_eq!(r.seek(SeekFrom::Current(4)).expect("cur"), 299_994);
        assert!(r.seek(SeekFrom::Current(-400_000)).is_err());
    }
}
