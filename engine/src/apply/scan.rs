//! The reader side of apply: one sequential pass over one chain file. It hands out
//! the live bytes (decoding LZ4 where needed) and, when the file has a `.chksum`,
//! feeds every byte of the file — superseded data included — through adler32, so
//! the checksum costs no second read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::iter::Peekable;
use std::path::Path;

use nbdfmt::lz4::Lz4FrameReader;
use nbdfmt::{Error as FmtError, ErrorKind as FmtKind};

use super::options::ApplyOptions;
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::extent::Source;
use crate::plan::DiskPlan;

/// Chunk buffers handed back by the writers for the readers to fill again, so no
/// chunk costs a fresh allocation (1 MiB allocations from several threads made glibc
/// return and re-fault memory: page faults and zeroing were ~10 % of a restore's CPU).
#[derive(Debug)]
pub(crate) struct BufPool {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
    cap: usize,
    keep: usize,
}

impl BufPool {
    /// Buffers of `cap` bytes' capacity; at most `keep` are kept for reuse.
    pub fn new(cap: usize, keep: usize) -> Self {
        Self {
            bufs: std::sync::Mutex::new(Vec::new()),
            cap,
            keep,
        }
    }

    /// A buffer of `n` bytes (contents unspecified).
    pub fn get(&self, n: usize) -> Vec<u8> {
        let reused = self.bufs.lock().ok().and_then(|mut b| b.pop());
        let mut v = reused.unwrap_or_else(|| Vec::with_capacity(self.cap.max(n)));
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0);
        }
        v
    }

    /// Hands a buffer back.
    pub fn put(&self, v: Vec<u8>) {
        if v.capacity() < self.cap {
            return;
        }
        if let Ok(mut b) = self.bufs.lock() {
            if b.len() < self.keep {
                b.push(v);
            }
        }
    }
}

/// A live piece of one data frame: disk range `[disk_start, disk_start + len)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Live {
    pub disk_start: u64,
    pub len: u64,
}

/// Everything the reader must produce from one file: per data frame (file order),
/// the live ranges inside it (disk order). Owned, so it can move to a worker thread.
#[derive(Debug)]
pub(crate) struct FileJob {
    pub path: std::path::PathBuf,
    pub file_size: u64,
    pub stored_checksum: Option<u32>,
    pub compressed: bool,
    pub frames: Vec<(nbdfmt::Frame, Vec<Live>)>,
}

impl FileJob {
    /// True when the scan passes the whole file through adler32 (checksums asked for
    /// and the file has a `.chksum`).
    pub fn hashed(&self, opts: &ApplyOptions) -> bool {
        opts.verify_checksums && self.stored_checksum.is_some()
    }
}

/// Splits a disk's extent map into one owned reader job per chain file.
pub(crate) fn jobs(plan: &DiskPlan) -> Vec<FileJob> {
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

/// The error for an I/O failure at `offset` of backup file `path`.
fn backup_io(path: &Path, offset: u64, source: io::Error) -> Error {
    Error::Backup(FmtError::from(FmtKind::Io { offset, source }).in_file(path))
}

/// The error for a backup file that ends `expected - got` bytes early at `offset`.
fn truncated(path: &Path, offset: u64, expected: u64, got: u64) -> Error {
    Error::Backup(
        FmtError::from(FmtKind::TruncatedPayload {
            offset,
            expected,
            got,
        })
        .in_file(path),
    )
}

/// The error for a skip backwards, which the file order of the jobs rules out.
fn backward_skip(path: &Path) -> Error {
    Error::internal(format!("internal: backward skip in {}", path.display()))
}

/// File reader that hashes what passes through when asked to.
struct Hashing {
    file: File,
    pos: u64,
    hash: Option<simd_adler32::Adler32>,
}

impl Read for Hashing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if let Some(h) = &mut self.hash {
            h.write(&buf[..n]);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Hashing {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

/// The sequential pass over a compressed file.
struct Scan<'a> {
    inner: BufReader<Hashing>,
    /// Logical position (bytes consumed from the BufReader).
    pos: u64,
    hashing: bool,
    path: std::path::PathBuf,
    /// Decoded bytes pass through here.
    buf: Vec<u8>,
    lz4_bufs: nbdfmt::lz4::Lz4Buffers,
    pool: &'a BufPool,
    cancel: &'a Cancel,
}

impl<'a> Scan<'a> {
    fn new(
        job: &FileJob,
        f: File,
        hashing: bool,
        chunk: usize,
        pool: &'a BufPool,
        cancel: &'a Cancel,
    ) -> Self {
        let hash = hashing.then(simd_adler32::Adler32::new);
        // Decoded bytes pass through `buf`: no larger than the biggest frame needs (a small
        // chain's frames are a few KiB; a fresh zeroed MiB per file showed in its profile).
        let biggest = job.frames.iter().map(|(f, _)| f.length).max().unwrap_or(0);
        Self {
            // No bigger than the file: a small chain's files are a few hundred KiB.
            inner: BufReader::with_capacity(
                usize::try_from(job.file_size)
                    .unwrap_or(usize::MAX)
                    .clamp(4096, 1 << 20),
                Hashing {
                    file: f,
                    pos: 0,
                    hash,
                },
            ),
            pos: 0,
            hashing,
            path: job.path.clone(),
            buf: vec![
                0u8;
                usize::try_from(biggest)
                    .unwrap_or(usize::MAX)
                    .clamp(1, chunk)
            ],
            lz4_bufs: nbdfmt::lz4::Lz4Buffers::default(),
            pool,
            cancel,
        }
    }

    fn io(&self, e: io::Error) -> Error {
        backup_io(&self.path, self.pos, e)
    }

    /// Advances to `off`: reading (and hashing) when verifying, else seeking.
    fn skip_to(&mut self, off: u64) -> Result<()> {
        if off < self.pos {
            return Err(backward_skip(&self.path));
        }
        if self.hashing {
            let mut left = off - self.pos;
            while left > 0 {
                let avail = match self.inner.fill_buf() {
                    Ok(b) => b.len(),
                    Err(e) => return Err(self.io(e)),
                };
                if avail == 0 {
                    return Err(truncated(&self.path, self.pos, left, 0));
                }
                let n = avail.min(usize::try_from(left).unwrap_or(usize::MAX));
                self.inner.consume(n);
                self.pos += n as u64;
                left -= n as u64;
            }
        } else if off != self.pos {
            let delta =
                i64::try_from(off - self.pos).map_err(|_| Error::internal("seek too far"))?;
            self.inner.seek_relative(delta).map_err(|e| self.io(e))?;
            self.pos = off;
        }
        Ok(())
    }

    /// One data frame: decodes the payload's LZ4 frames in order and emits only the
    /// live bytes. A frame without live bytes whose header gives its decoded size is
    /// not decoded: skipped, or (verifying) passed through adler32 only.
    fn data_frame(
        &mut self,
        fr: &nbdfmt::Frame,
        live: &[Live],
        emit: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        self.skip_to(fr.payload_offset)?;
        let mut disk_pos = fr.start;
        let mut live_iter = live.iter().peekable();
        let end_of_live = live.last().map_or(fr.start, |l| l.disk_start + l.len);
        for &size in &fr.lz4_frames {
            if disk_pos >= end_of_live && !self.hashing {
                break;
            }
            if let Some(end) = self.decoded_end(disk_pos) {
                let live_here = live_iter.peek().is_some_and(|l| l.disk_start < end);
                if !live_here && end <= fr.start + fr.length {
                    self.skip_to(self.pos + size)?;
                    disk_pos = end;
                    continue;
                }
            }
            disk_pos = self.decode_frame(fr, size, disk_pos, &mut live_iter, emit)?;
        }
        if disk_pos != fr.start + fr.length && (self.hashing || live_iter.peek().is_some()) {
            return Err(Error::Backup(
                FmtError::from(FmtKind::DecodedLength {
                    offset: fr.payload_offset,
                    expected: fr.length,
                    actual: disk_pos - fr.start,
                })
                .in_file(&self.path),
            ));
        }
        Ok(())
    }

    /// The disk offset where the LZ4 frame at the current position ends, when its
    /// header gives its decoded size (frame starting at disk offset `disk_pos`).
    fn decoded_end(&mut self, disk_pos: u64) -> Option<u64> {
        self.inner
            .fill_buf()
            .ok()
            .and_then(|b| nbdfmt::lz4::parse_header(b).ok().flatten())
            .and_then(|h| h.content_size)
            .map(|cs| disk_pos.saturating_add(cs))
    }

    /// Decodes the LZ4 frame of `size` stored bytes at the current position (disk offset
    /// `disk_pos`), emitting its live pieces; the disk offset after it.
    fn decode_frame(
        &mut self,
        fr: &nbdfmt::Frame,
        size: u64,
        mut disk_pos: u64,
        live: &mut Peekable<std::slice::Iter<'_, Live>>,
        emit: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
    ) -> Result<u64> {
        let frame_off = self.pos;
        let remaining = fr.length - (disk_pos - fr.start);
        // The xxh32 checksums inside the frame are redundant when the adler32 of
        // the whole file (stored bytes) is checked in this same pass.
        let mut dec = Lz4FrameReader::new(&mut self.inner, frame_off, size, remaining)
            .verify_checksums(!self.hashing)
            .with_buffers(std::mem::take(&mut self.lz4_bufs));
        loop {
            let n = dec
                .read_decoded(&mut self.buf)
                .map_err(|e| Error::Backup(e.in_file(&self.path)))?;
            if n == 0 {
                break;
            }
            emit_decoded(&self.buf[..n], disk_pos, live, self.pool, emit)?;
            disk_pos += n as u64;
            self.cancel.check()?;
        }
        let (done, bufs) = dec.finish_keep_buffers();
        self.lz4_bufs = bufs;
        done.map_err(|e| Error::Backup(e.in_file(&self.path)))?;
        self.pos = frame_off + size;
        Ok(disk_pos)
    }

    /// After the last data frame (when hashing): the rest of the file through adler32,
    /// and the outcome against the `.chksum`.
    fn finish_hash(mut self, job: &FileJob) -> Result<Option<nbdfmt::checksum::ChecksumStatus>> {
        self.skip_to(job.file_size)?;
        // Anything after the indexed end (the file grew?) is part of the checksum too.
        let mut rest = Vec::new();
        self.inner.read_to_end(&mut rest).map_err(|e| self.io(e))?;
        let computed = self
            .inner
            .get_ref()
            .hash
            .as_ref()
            .map_or(1, simd_adler32::Adler32::finish);
        checksum_outcome(job, computed)
    }
}

/// Emits the live parts of `decoded` (which starts at disk offset `at`), moving `live`
/// past the pieces that end inside it.
fn emit_decoded(
    decoded: &[u8],
    at: u64,
    live: &mut Peekable<std::slice::Iter<'_, Live>>,
    pool: &BufPool,
    emit: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let (a, b) = (at, at + decoded.len() as u64);
    while let Some(l) = live.peek() {
        let (ls, le) = (l.disk_start, l.disk_start + l.len);
        if ls >= b {
            break;
        }
        let s = ls.max(a);
        let e = le.min(b);
        if s < e {
            let piece = &decoded[(s - a) as usize..(e - a) as usize];
            let mut v = pool.get(piece.len());
            v.copy_from_slice(piece);
            emit(s, v)?;
        }
        if le <= b {
            live.next();
        } else {
            break;
        }
    }
    Ok(())
}

/// The outcome of a file's adler32 against its `.chksum`.
fn checksum_outcome(
    file: &FileJob,
    computed: u32,
) -> Result<Option<nbdfmt::checksum::ChecksumStatus>> {
    match file.stored_checksum {
        Some(stored) if stored != computed => Err(Error::Backup(
            FmtError::from(FmtKind::ChecksumMismatch { stored, computed }).in_file(&file.path),
        )),
        Some(stored) => Ok(Some(nbdfmt::checksum::ChecksumStatus::Ok(stored))),
        None => Ok(None),
    }
}

/// Bytes read at a time to hash the data between live pieces: small enough that the
/// copy and the adler32 pass that follows it stay in the L2 cache.
const SCRATCH: usize = 128 << 10;

/// Fills `buf` from offset `at` of `f`; the bytes read (short only at the end of the
/// file).
fn pread_full(f: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(backup_io(path, at + got as u64, e)),
        }
    }
    Ok(got)
}

/// The pass over an uncompressed file (see [`scan_plain`]).
struct Plain<'a> {
    f: &'a File,
    path: &'a Path,
    /// Next file offset to read; when hashing, everything before it went through adler32.
    pos: u64,
    hash: Option<simd_adler32::Adler32>,
    scratch: Vec<u8>,
}

impl Plain<'_> {
    /// Hashes the file from `pos` up to `off` (`None`: to its end). Nothing without a hash.
    fn hash_to(&mut self, off: Option<u64>, cancel: &Cancel) -> Result<()> {
        let Some(h) = &mut self.hash else {
            return Ok(());
        };
        loop {
            let want = match off {
                Some(o) if self.pos >= o => return Ok(()),
                Some(o) => usize::try_from(o - self.pos)
                    .unwrap_or(usize::MAX)
                    .min(self.scratch.len()),
                None => self.scratch.len(),
            };
            cancel.check()?;
            let n = pread_full(self.f, self.path, &mut self.scratch[..want], self.pos)?;
            h.write(&self.scratch[..n]);
            self.pos += n as u64;
            if n < want {
                return match off {
                    None => Ok(()),
                    Some(o) => Err(truncated(self.path, self.pos, o - self.pos, 0)),
                };
            }
        }
    }

    /// Moves to file offset `off`, hashing what lies before it when hashing.
    fn skip_to(&mut self, off: u64, cancel: &Cancel) -> Result<()> {
        if off < self.pos {
            return Err(backward_skip(self.path));
        }
        if self.hash.is_some() {
            self.hash_to(Some(off), cancel)
        } else {
            self.pos = off;
            Ok(())
        }
    }

    /// Reads the live piece `l` at `pos` straight into chunk buffers and emits them.
    fn read_live(
        &mut self,
        l: &Live,
        chunk: usize,
        pool: &BufPool,
        emit: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut left = l.len;
        let mut disk = l.disk_start;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk);
            let mut buf = pool.get(n);
            let got = pread_full(self.f, self.path, &mut buf, self.pos)?;
            if got < n {
                return Err(truncated(self.path, self.pos, n as u64, got as u64));
            }
            if let Some(h) = &mut self.hash {
                h.write(&buf);
            }
            emit(disk, buf)?;
            self.pos += n as u64;
            disk += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}

/// An uncompressed file: live pieces are read with `pread` straight into the chunk
/// buffers handed to the writer (through a `BufReader` every byte was copied twice:
/// kernel → its buffer → the chunk; the second copy was 8 % of a restore's CPU).
/// When hashing, the bytes between live pieces go through adler32 via a scratch buffer.
fn scan_plain(
    file: &FileJob,
    f: &File,
    hashing: bool,
    chunk: usize,
    pool: &BufPool,
    cancel: &Cancel,
    emit: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<Option<nbdfmt::checksum::ChecksumStatus>> {
    let mut p = Plain {
        f,
        path: &file.path,
        pos: 0,
        hash: hashing.then(simd_adler32::Adler32::new),
        scratch: if hashing {
            vec![0u8; SCRATCH]
        } else {
            Vec::new()
        },
    };
    for (fr, live) in &file.frames {
        cancel.check()?;
        for l in live {
            p.skip_to(fr.payload_offset + (l.disk_start - fr.start), cancel)?;
            p.read_live(l, chunk, pool, emit)?;
        }
    }
    // Everything after the last live piece, to the end of the file as it is now (the
    // indexed size first, so a file that shrank is reported as truncated).
    p.hash_to(Some(file.file_size), cancel)?;
    p.hash_to(None, cancel)?;
    match p.hash {
        None => Ok(None),
        Some(h) => checksum_outcome(file, h.finish()),
    }
}

/// Runs one file job: `emit(disk_offset, bytes)` for every live piece, in file order,
/// in pieces of at most `chunk` bytes. Verifies the `.chksum` when `verify` is set.
pub(crate) fn scan_file(
    file: &FileJob,
    verify: bool,
    chunk: usize,
    pool: &BufPool,
    cancel: &Cancel,
    emit: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<Option<nbdfmt::checksum::ChecksumStatus>> {
    let f = File::open(&file.path).map_err(|e| backup_io(&file.path, 0, e))?;
    let hashing = verify && file.stored_checksum.is_some();
    if !file.compressed {
        return scan_plain(file, &f, hashing, chunk, pool, cancel, emit);
    }
    let mut scan = Scan::new(file, f, hashing, chunk, pool, cancel);
    for (fr, live) in &file.frames {
        cancel.check()?;
        scan.data_frame(fr, live, emit)?;
    }
    if !hashing {
        return Ok(None);
    }
    scan.finish_hash(file)
}
