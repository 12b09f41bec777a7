//! [`ChainReader`]: random access to a disk's restored content straight from its
//! backup chain, without restoring it first.
//!
//! A read walks the plan's extent map: zero extents and gaps give zeros; raw data is a
//! `pread` from the chain file (opened once); LZ4 data decodes the payload's LZ4 frame
//! that holds the range, from its start (frames cannot be entered in the middle). The
//! decoded size of every LZ4 frame comes from its header's content-size field (or, if
//! missing, from one decoding pass), so a read only decodes the frames it touches.
//! Decoded frames are kept in a small shared LRU ([`Lz4Cache`], 64 MiB by default), so
//! sequential reads of a 32 MiB frame in 2 MiB requests decode it once; concurrent
//! readers of the same frame wait for one decoder instead of decoding it twice.
//!
//! Every read is checked against the index (file sizes, frame bounds, decoded lengths);
//! damage is an [`Error`], never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nbdfmt::lz4::Lz4FrameReader;
use nbdfmt::{Error as FmtError, ErrorKind as FmtKind, Frame, FrameKind};

use crate::error::{Error, Result};
use crate::extent::{Extent, Source};
use crate::plan::DiskPlan;

/// Default size of the decoded-LZ4 cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// LZ4 frame magic (little-endian on disk).
const LZ4_MAGIC: u32 = 0x184D_2204;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(path: &Path, offset: u64, e: io::Error) -> Error {
    let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
        FmtKind::TruncatedPayload {
            offset,
            expected: 0,
            got: 0,
        }
    } else {
        FmtKind::Io { offset, source: e }
    };
    Error::Backup(FmtError::from(kind).in_file(path))
}

fn corrupt(path: &Path, offset: u64, reason: String) -> Error {
    Error::Backup(FmtError::from(FmtKind::Lz4 { offset, reason }).in_file(path))
}

/// A part of a read: data or a run of zeros, at a disk offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Bytes that come from a data extent (they may still happen to be zero).
    Data {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A zero extent or a gap: reads as zero, holds no data.
    Zero {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

impl Piece {
    /// Disk offset.
    pub fn offset(&self) -> u64 {
        match *self {
            Self::Data { offset, .. } | Self::Zero { offset, .. } => offset,
        }
    }

    /// Length.
    pub fn len(&self) -> u64 {
        match *self {
            Self::Data { len, .. } | Self::Zero { len, .. } => len,
        }
    }

    /// True for an empty piece (never produced).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for data.
    pub fn is_data(&self) -> bool {
        matches!(self, Self::Data { .. })
    }
}

type Key = (u64, u32, u32, u32);

#[derive(Debug, Default)]
struct Slot {
    data: Mutex<Option<Arc<Vec<u8>>>>,
}

#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    last_use: u64,
    /// Decoded bytes held (0 while decoding).
    size: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<Key, Entry>,
    tick: u64,
    bytes: usize,
    hits: u64,
    misses: u64,
}

/// Decoded LZ4 frames, least recently used evicted first; shared by all readers of a
/// server. Frames larger than half the capacity are never cached (they are decoded
/// as a stream up to the requested range instead).
#[derive(Debug)]
pub struct Lz4Cache {
    cap: usize,
    inner: Mutex<CacheInner>,
}

impl Lz4Cache {
    /// A cache holding at most `cap` decoded bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    /// Largest frame that is cached.
    pub fn max_entry(&self) -> usize {
        self.cap / 2
    }

    /// (hits, misses, bytes held) so far.
    pub fn stats(&self) -> (u64, u64, usize) {
        let g = lock(&self.inner);
        (g.hits, g.misses, g.bytes)
    }

    /// The decoded frame for `key`, decoding it with `decode` on a miss. Concurrent
    /// callers with the same key wait for one decoder.
    fn get_or_decode(
        &self,
        key: Key,
        decode: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        let slot = {
            let mut g = lock(&self.inner);
            g.tick += 1;
            let tick = g.tick;
            let e = g.map.entry(key).or_insert_with(|| Entry {
                slot: Arc::new(Slot::default()),
                last_use: tick,
                size: 0,
            });
            e.last_use = tick;
            e.slot.clone()
        };
        let mut data = lock(&slot.data);
        if let Some(d) = &*data {
            lock(&self.inner).hits += 1;
            return Ok(d.clone());
        }
        let decoded = match decode() {
            Ok(d) => Arc::new(d),
            Err(e) => {
                drop(data);
                let mut g = lock(&self.inner);
                if g.map.get(&key).is_some_and(|e| Arc::ptr_eq(&e.slot, &slot)) {
                    g.map.remove(&key);
                }
                return Err(e);
            }
        };
        *data = Some(decoded.clone());
        drop(data);
        let mut g = lock(&self.inner);
        g.misses += 1;
        let size = decoded.len();
        if let Some(e) = g.map.get_mut(&key) {
            if Arc::ptr_eq(&e.slot, &slot) && e.size == 0 {
                e.size = size;
                g.bytes += size;
            }
        }
        // Evict least recently used completed entries (never the one just made).
        while g.bytes > self.cap {
            let victim = g
                .map
                .iter()
                .filter(|(k, e)| **k != key && e.size > 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k);
            let Some(v) = victim else { break };
            if let Some(e) = g.map.remove(&v) {
                g.bytes -= e.size;
            }
        }
        Ok(decoded)
    }
}

impl Default for Lz4Cache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_BYTES)
    }
}

/// `Read` over a range of a file by `pread`, so readers share one `File`.
struct Pread<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Pread<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backup file ends inside an LZ4 frame",
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// Where the LZ4 frames of one compressed data frame start, stored and decoded.
#[derive(Debug)]
struct Layout {
    /// File offset of each LZ4 frame, plus the end.
    file_off: Vec<u64>,
    /// Decoded offset (inside the data frame) of each LZ4 frame, plus the length.
    dec_off: Vec<u64>,
}

#[derive(Debug)]
struct ChainSource {
    path: PathBuf,
    /// `None` when no live extent needs this file.
    file: Option<File>,
    compressed: bool,
    frames: Vec<Frame>,
}

static NEXT_READER_ID: AtomicU64 = AtomicU64::new(1);

/// Random-access reader of one disk's content at a restore point, from its chain.
/// `&self` methods are safe to call from many threads at once.
#[derive(Debug)]
pub struct ChainReader {
    id: u64,
    disk: String,
    size: u64,
    extents: Vec<Extent>,
    files: Vec<ChainSource>,
    layouts: Mutex<HashMap<(u32, u32), Arc<Layout>>>,
    cache: Arc<Lz4Cache>,
}

impl ChainReader {
    /// Opens the chain files the plan needs, with a private 64 MiB cache.
    pub fn new(plan: DiskPlan) -> Result<Self> {
        Self::with_cache(plan, Arc::new(Lz4Cache::default()))
    }

    /// Opens the chain files the plan needs, sharing `cache`.
    pub fn with_cache(plan: DiskPlan, cache: Arc<Lz4Cache>) -> Result<Self> {
        let DiskPlan {
            disk,
            virtual_size,
            files,
            map,
            ..
        } = plan;
        let extents: Vec<Extent> = map
            .iter()
            .filter(|e| e.start < virtual_size)
            .map(|e| Extent {
                len: e.len.min(virtual_size - e.start),
                ..e
            })
            .collect();
        let mut needed = vec![false; files.len()];
        let chain_err = |message: String| Error::Chain {
            disk: disk.clone(),
            message,
        };
        for e in &extents {
            let Source::Data { file, frame } = e.source else {
                continue;
            };
            let f = files
                .get(file as usize)
                .ok_or_else(|| chain_err(format!("extent names chain file #{file}")))?;
            let fr = f
                .index
                .frames
                .get(frame as usize)
                .ok_or_else(|| chain_err(format!("{}: no frame #{frame}", f.path.display())))?;
            if fr.kind != FrameKind::Data || e.start < fr.start || e.end() > fr.end() {
                return Err(chain_err(format!(
                    "{}: extent {}+{} is outside data frame {}+{}",
                    f.path.display(),
                    e.start,
                    e.len,
                    fr.start,
                    fr.length
                )));
            }
            needed[file as usize] = true;
        }
        let mut sources = Vec::with_capacity(files.len());
        for (f, need) in files.into_iter().zip(needed) {
            let compressed = f.compressed();
            let file = if need {
                let file = File::open(&f.path).map_err(|e| io_err(&f.path, 0, e))?;
                let len = file.metadata().map_err(|e| io_err(&f.path, 0, e))?.len();
                for fr in f
                    .index
                    .frames
                    .iter()
                    .filter(|fr| fr.kind == FrameKind::Data)
                {
                    let end = fr.payload_offset.checked_add(fr.stored_len);
                    if end.is_none_or(|end| end > len) {
                        return Err(Error::Backup(
                            FmtError::from(FmtKind::TruncatedPayload {
                                offset: fr.payload_offset,
                                expected: fr.stored_len,
                                got: len.saturating_sub(fr.payload_offset),
                            })
                            .in_file(&f.path),
                        ));
                    }
                    let ok = if compressed {
                        !fr.lz4_frames.is_empty()
                            && fr
                                .lz4_frames
                                .iter()
                                .try_fold(0u64, |a, &b| a.checked_add(b))
                                == Some(fr.stored_len)
                    } else {
                        fr.stored_len == fr.length
                    };
                    if !ok {
                        return Err(corrupt(
                            &f.path,
                            fr.payload_offset,
                            "stored payload size does not match the frame".into(),
                        ));
                    }
                }
                Some(file)
            } else {
                None
            };
            sources.push(ChainSource {
                path: f.path,
                file,
                compressed,
                frames: f.index.frames,
            });
        }
        Ok(Self {
            id: NEXT_READER_ID.fetch_add(1, Ordering::Relaxed),
            disk,
            size: virtual_size,
            extents,
            files: sources,
            layouts: Mutex::new(HashMap::new()),
            cache,
        })
    }

    /// Disk target (`vda`).
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The shared cache.
    pub fn cache(&self) -> &Arc<Lz4Cache> {
        &self.cache
    }

    /// Index of the first extent ending after `offset`.
    fn first_extent(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.end() <= offset)
    }

    /// Data/zero runs of `[offset, offset + len)` (clamped to the disk), merged:
    /// `(length, is_data)` in disk order.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |l: u64, data: bool| {
            if l == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.1 == data => last.0 += l,
                _ => out.push((l, data)),
            }
        };
        let mut pos = offset.min(end);
        for e in &self.extents[self.first_extent(pos)..] {
            if e.start >= end {
                break;
            }
            if e.start > pos {
                push(e.start - pos, false);
                pos = e.start;
            }
            let to = e.end().min(end);
            push(to - pos, matches!(e.source, Source::Data { .. }));
            pos = to;
        }
        push(end - pos, false);
        out
    }

    /// Fills `buf` with the disk content at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_pieces(offset, buf).map(|_| ())
    }

    /// Fills `buf` with the disk content at `offset` and tells which parts are data
    /// and which are zero extents or gaps (merged, in order, covering the buffer).
    pub fn read_pieces(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<Piece>> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{}: read of {len} bytes at {offset} is past the end ({})",
                    self.disk, self.size
                ))
            })?;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut push = |p: Piece| match (pieces.last_mut(), p) {
            (Some(Piece::Data { len, .. }), Piece::Data { len: l, .. })
            | (Some(Piece::Zero { len, .. }), Piece::Zero { len: l, .. }) => *len += l,
            _ => pieces.push(p),
        };
        let mut pos = offset;
        let slice = |a: u64, b: u64| (a - offset) as usize..(b - offset) as usize;
        for e in &self.extents[self.first_extent(offset)..] {
            if e.start >= end {
                break;
            }
            if e.start > pos {
                let r = slice(pos, e.start);
                buf[r].fill(0);
                push(Piece::Zero {
                    offset: pos,
                    len: e.start - pos,
                });
                pos = e.start;
            }
            let to = e.end().min(end);
            let r = slice(pos, to);
            match e.source {
                Source::Zero => {
                    buf[r].fill(0);
                    push(Piece::Zero {
                        offset: pos,
                        len: to - pos,
                    });
                }
                Source::Data { file, frame } => {
                    self.read_data(file, frame, pos, &mut buf[r])?;
                    push(Piece::Data {
                        offset: pos,
                        len: to - pos,
                    });
                }
            }
            pos = to;
        }
        if pos < end {
            let r = slice(pos, end);
            buf[r].fill(0);
            push(Piece::Zero {
                offset: pos,
                len: end - pos,
            });
        }
        Ok(pieces)
    }

    /// Reads `buf.len()` decoded bytes of data frame `frame` of file `file` at disk
    /// offset `disk_off` (the range lies inside the frame: checked at construction).
    fn read_data(&self, file: u32, frame: u32, disk_off: u64, buf: &mut [u8]) -> Result<()> {
        let src = &self.files[file as usize];
        let fr = &src.frames[frame as usize];
        let Some(f) = &src.file else {
            return Err(Error::Internal(format!(
                "internal: {} is not open",
                src.path.display()
            )));
        };
        let rel = disk_off - fr.start;
        if !src.compressed {
            let at = fr.payload_offset + rel;
            return f
                .read_exact_at(buf, at)
                .map_err(|e| io_err(&src.path, at, e));
        }
        let layout = self.layout(file, frame)?;
        let rel_end = rel + buf.len() as u64;
        let n = layout.dec_off.len() - 1;
        // First LZ4 frame whose decoded range ends after `rel`.
        let mut i = layout.dec_off[1..].partition_point(|&d| d <= rel);
        let mut pos = rel;
        while pos < rel_end && i < n {
            let (ds, de) = (layout.dec_off[i], layout.dec_off[i + 1]);
            let to = de.min(rel_end);
            let out = &mut buf[(pos - rel) as usize..(to - rel) as usize];
            let dec_len = de - ds;
            if dec_len <= self.cache.max_entry() as u64 {
                let key = (self.id, file, frame, i as u32);
                let data = self
                    .cache
                    .get_or_decode(key, || self.decode_whole(f, &src.path, &layout, i))?;
                out.copy_from_slice(&data[(pos - ds) as usize..(to - ds) as usize]);
            } else {
                self.decode_range(f, &src.path, &layout, i, pos - ds, out)?;
            }
            pos = to;
            i += 1;
        }
        if pos < rel_end {
            return Err(corrupt(
                &src.path,
                fr.payload_offset,
                "LZ4 frames end before the data frame".into(),
            ));
        }
        Ok(())
    }

    /// A decoder for the LZ4 frame stored at `[fs, fe)`, capped at `max_dec` bytes.
    fn lz4_reader(
        f: &File,
        fs: u64,
        fe: u64,
        max_dec: u64,
    ) -> Lz4FrameReader<BufReader<Pread<'_>>> {
        let src = BufReader::with_capacity(
            256 * 1024,
            Pread {
                file: f,
                pos: fs,
                end: fe,
            },
        );
        Lz4FrameReader::new(src, fs, fe - fs, max_dec)
    }

    fn lz4_reader_at<'a>(
        f: &'a File,
        layout: &Layout,
        i: usize,
    ) -> Lz4FrameReader<BufReader<Pread<'a>>> {
        let dec_len = layout.dec_off[i + 1] - layout.dec_off[i];
        Self::lz4_reader(f, layout.file_off[i], layout.file_off[i + 1], dec_len)
    }

    /// Decodes LZ4 frame `i` completely, checking its length and trailer.
    fn decode_whole(&self, f: &File, path: &Path, layout: &Layout, i: usize) -> Result<Vec<u8>> {
        let dec_len = layout.dec_off[i + 1] - layout.dec_off[i];
        let mut dec = Self::lz4_reader_at(f, layout, i);
        let mut out = vec![0u8; dec_len as usize];
        let mut got = 0usize;
        loop {
            if got == out.len() {
                // One more read must report the end (and checks the content checksum).
                let mut probe = [0u8; 1];
                let n = dec
                    .read_decoded(&mut probe)
                    .map_err(|e| Error::Backup(e.in_file(path)))?;
                if n != 0 {
                    return Err(corrupt(
                        path,
                        layout.file_off[i],
                        "LZ4 frame decodes to more than its share".into(),
                    ));
                }
                break;
            }
            let n = dec
                .read_decoded(&mut out[got..])
                .map_err(|e| Error::Backup(e.in_file(path)))?;
            if n == 0 {
                return Err(Error::Backup(
                    FmtError::from(FmtKind::DecodedLength {
                        offset: layout.file_off[i],
                        expected: dec_len,
                        actual: got as u64,
                    })
                    .in_file(path),
                ));
            }
            got += n;
        }
        dec.finish().map_err(|e| Error::Backup(e.in_file(path)))?;
        Ok(out)
    }

    /// Streams LZ4 frame `i` up to `skip + out.len()` decoded bytes, keeping the tail.
    fn decode_range(
        &self,
        f: &File,
        path: &Path,
        layout: &Layout,
        i: usize,
        skip: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let mut dec = Self::lz4_reader_at(f, layout, i);
        let mut scratch = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        let want_end = skip + out.len() as u64;
        while pos < want_end {
            let n = dec
                .read_decoded(&mut scratch)
                .map_err(|e| Error::Backup(e.in_file(path)))?;
            if n == 0 {
                return Err(corrupt(
                    path,
                    layout.file_off[i],
                    "LZ4 frame is shorter than its content size".into(),
                ));
            }
            let (a, b) = (pos, pos + n as u64);
            let s = a.max(skip);
            let e = b.min(want_end);
            if s < e {
                out[(s - skip) as usize..(e - skip) as usize]
                    .copy_from_slice(&scratch[(s - a) as usize..(e - a) as usize]);
            }
            pos = b;
        }
        Ok(())
    }

    /// Where each LZ4 frame of a compressed data frame starts, computed once.
    fn layout(&self, file: u32, frame: u32) -> Result<Arc<Layout>> {
        if let Some(l) = lock(&self.layouts).get(&(file, frame)) {
            return Ok(l.clone());
        }
        let src = &self.files[file as usize];
        let fr = &src.frames[frame as usize];
        let Some(f) = &src.file else {
            return Err(Error::Internal(format!(
                "internal: {} is not open",
                src.path.display()
            )));
        };
        let mut file_off = Vec::with_capacity(fr.lz4_frames.len() + 1);
        let mut at = fr.payload_offset;
        for &s in &fr.lz4_frames {
            file_off.push(at);
            at += s;
        }
        file_off.push(at);
        let n = fr.lz4_frames.len();
        let mut sizes: Option<Vec<u64>> = if n == 1 {
            Some(vec![fr.length])
        } else {
            let mut v = Vec::with_capacity(n);
            for &off in &file_off[..n] {
                match content_size(f, &src.path, off)? {
                    Some(s) => v.push(s),
                    None => break,
                }
            }
            (v.len() == n).then_some(v)
        };
        if sizes.is_none() {
            // No content sizes in the headers: one counting pass.
            tracing::debug!(file = %src.path.display(), frame, "LZ4 frames without content size: counting");
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let mut dec = Self::lz4_reader(f, file_off[i], file_off[i + 1], fr.length);
                let mut scratch = vec![0u8; 1 << 20];
                let mut count = 0u64;
                loop {
                    let got = dec
                        .read_decoded(&mut scratch)
                        .map_err(|e| Error::Backup(e.in_file(&src.path)))?;
                    if got == 0 {
                        break;
                    }
                    count += got as u64;
                }
                dec.finish()
                    .map_err(|e| Error::Backup(e.in_file(&src.path)))?;
                v.push(count);
            }
            sizes = Some(v);
        }
        let sizes = sizes.unwrap_or_default();
        let mut dec_off = Vec::with_capacity(n + 1);
        let mut d = 0u64;
        for s in &sizes {
            dec_off.push(d);
            d = d.checked_add(*s).ok_or_else(|| {
                corrupt(
                    &src.path,
                    fr.payload_offset,
                    "LZ4 content sizes overflow".into(),
                )
            })?;
        }
        dec_off.push(d);
        if d != fr.length {
            return Err(Error::Backup(
                FmtError::from(FmtKind::DecodedLength {
                    offset: fr.payload_offset,
                    expected: fr.length,
                    actual: d,
                })
                .in_file(&src.path),
            ));
        }
        let l = Arc::new(Layout { file_off, dec_off });
        lock(&self.layouts).insert((file, frame), l.clone());
        Ok(l)
    }
}

/// The content-size field of the LZ4 frame header at `off`, if the frame has one.
fn content_size(f: &File, path: &Path, off: u64) -> Result<Option<u64>> {
    let mut h = [0u8; 14];
    f.read_exact_at(&mut h, off)
        .map_err(|e| io_err(path, off, e))?;
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != LZ4_MAGIC {
        return Err(corrupt(
            path,
            off,
            format!("bad LZ4 frame magic {magic:#010x}"),
        ));
    }
    let flg = h[4];
    if flg >> 6 != 0b01 {
        return Err(corrupt(path, off, "unsupported LZ4 frame version".into()));
    }
    if flg & 0x08 == 0 {
        return Ok(None);
    }
    let mut cs = [0u8; 8];
    cs.copy_from_slice(&h[6..14]);
    Ok(Some(u64::from_le_bytes(cs)))
}
