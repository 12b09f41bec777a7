//! `.chksum` side files: decimal adler32 (zlib, seed 1) of the whole stream file as stored.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::error::{io_at, Error, ErrorKind, Result};

/// Parses the text of a `.chksum` file (`3124225129`, no newline; one trailing newline tolerated).
pub fn parse_chksum(text: &[u8]) -> Result<u32> {
    let t = text.strip_suffix(b"\n").unwrap_or(text);
    let t = t.strip_suffix(b"\r").unwrap_or(t);
    let bad = || {
        Error::new(ErrorKind::BadChecksumFile {
            // described, never quoted: the file may be a link to anything
            reason: format!(
                "{} bytes that are not a decimal adler32 ({} non-digit)",
                text.len(),
                t.iter().filter(|b| !b.is_ascii_digit()).count()
            ),
        })
    };
    if t.is_empty() || t.len() > 10 || !t.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(t)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(bad)
}

/// A running adler32 over everything read through it.
pub struct Adler32Reader<R> {
    inner: R,
    hash: simd_adler32::Adler32,
    bytes: u64,
}

impl<R> std::fmt::Debug for Adler32Reader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adler32Reader")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Adler32Reader<R> {
    /// Wraps a reader, starting from adler32's initial value 1.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hash: simd_adler32::Adler32::new(),
            bytes: 0,
        }
    }

    /// The checksum of everything read so far.
    pub fn checksum(&self) -> u32 {
        self.hash.finish()
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl<R: Read> Read for Adler32Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.write(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// adler32 of all bytes of `r`.
pub fn adler32_of(r: impl Read) -> io::Result<u32> {
    let mut a = Adler32Reader::new(r);
    let mut buf = vec![0u8; 1 << 20];
    while a.read(&mut buf)? != 0 {}
    Ok(a.checksum())
}

/// The `.chksum` path that belongs to a data file.
pub fn chksum_path(data_file: &Path) -> PathBuf {
    let mut s = data_file.as_os_str().to_owned();
    s.push(".chksum");
    PathBuf::from(s)
}

/// Outcome of checking one data file against its `.chksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumStatus {
    /// The stored and computed values agree.
    Ok(u32),
    /// No `.chksum` file (1.9.15 backups, raw copies).
    NotRecorded(u32),
}

/// Reads the stored checksum of `data_file`, if a `.chksum` exists.
pub fn stored_checksum(data_file: &Path) -> Result<Option<u32>> {
    let p = chksum_path(data_file);
    match crate::small::read_small_file(&p, 64) {
        Ok(t) => parse_chksum(&t).map(Some).map_err(|e| e.in_file(&p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(Error::new(ErrorKind::BadChecksumFile {
                reason: e.to_string(),
            })
            .in_file(&p))
        }
        Err(e) => Err(io_at(0)(e).in_file(&p)),
    }
}

/// Computes the adler32 of `data_file` and compares it with its `.chksum`, if any.
pub fn verify_file(data_file: &Path) -> Result<ChecksumStatus> {
    let stored = stored_checksum(data_file)?;
    let f = File::open(data_file).map_err(|e| io_at(0)(e).in_file(data_file))?;
    let computed = adler32_of(f).map_err(|e| io_at(0)(e).in_file(data_file))?;
    match stored {
        None => Ok(ChecksumStatus::NotRecorded(computed)),
        Some(s) if s == computed => Ok(ChecksumStatus::Ok(s)),
        Some(stored) => {
            Err(Error::new(ErrorKind::ChecksumMismatch { stored, computed }).in_file(data_file))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_zlib_vectors() {
        assert_eq!(adler32_of(&b""[..]).expect("mem"), 1);
        // zlib.adler32(b"hello world") == 436929629
        assert_eq!(adler32_of(&b"hello world"[..]).expect("mem"), 436_929_629);
    }

    #[test]
    fn chksum_text() {
        assert_eq!(parse_chksum(b"3124225129").expect("ok"), 3_124_225_129);
        assert_eq!(parse_chksum(b"1\n").expect("ok"), 1);
        for bad in [
            &b""[..],
            b"None",
            b"-1",
            b"4294967296",
            b"12 3",
            b"99999999999",
        ] {
            assert!(parse_chksum(bad).is_err(), "{:?}", bad);
        }
    }
}
