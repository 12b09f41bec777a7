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
//!
//! Files: `cache` ([`Lz4Cache`]), `lz4` (LZ4 frame layout and decoding); this one
//! walks the extent map.

mod cache;
mod lz4;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nbdfmt::{Error as FmtError, ErrorKind as FmtKind, Frame, FrameKind};

use crate::error::{Error, Result};
use crate::extent::{Extent, Source};
use crate::plan::{ChainFile, DiskPlan};
use cache::lock;
use lz4::{corrupt, io_err, Layout};

pub use cache::{Lz4Cache, DEFAULT_CACHE_BYTES};

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

#[derive(Debug)]
struct ChainSource {
    path: PathBuf,
    /// `None` when no live extent needs this file.
    file: Option<File>,
    compressed: bool,
    frames: Vec<Frame>,
}

impl ChainSource {
    /// The source of chain file `f` with its `frames`; opened (and its data frames
    /// checked against the file) only when `need`ed.
    fn open(f: ChainFile, frames: Vec<Frame>, need: bool) -> Result<Self> {
        let compressed = f.compressed();
        let file = if need {
            let file = File::open(&f.path).map_err(|e| io_err(&f.path, 0, e))?;
            let len = file.metadata().map_err(|e| io_err(&f.path, 0, e))?.len();
            for fr in frames.iter().filter(|fr| fr.kind == FrameKind::Data) {
                check_stored(&f.path, fr, len, compressed)?;
            }
            Some(file)
        } else {
            None
        };
        Ok(Self {
            path: f.path,
            file,
            compressed,
            frames,
        })
    }

    /// The open file (every file an extent needs is open).
    fn open_file(&self) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| {
            Error::internal(format!("internal: {} is not open", self.path.display()))
        })
    }
}

/// The stored payload of data frame `fr` lies inside the file (`len` bytes) and has the
/// size its frame (and, compressed, its LZ4 frame sizes) says.
fn check_stored(path: &Path, fr: &Frame, len: u64, compressed: bool) -> Result<()> {
    let end = fr.payload_offset.checked_add(fr.stored_len);
    if end.is_none_or(|end| end > len) {
        return Err(Error::Backup(
            FmtError::from(FmtKind::TruncatedPayload {
                offset: fr.payload_offset,
                expected: fr.stored_len,
                got: len.saturating_sub(fr.payload_offset),
            })
            .in_file(path),
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
            path,
            fr.payload_offset,
            "stored payload size does not match the frame".into(),
        ));
    }
    Ok(())
}

/// Which chain files the extents read from, each extent checked to lie inside an
/// existing data frame.
fn needed_files(
    disk: &str,
    extents: &[Extent],
    files: &[ChainFile],
    frames: &[Vec<Frame>],
) -> Result<Vec<bool>> {
    let mut needed = vec![false; files.len()];
    let chain_err = |message: String| Error::Chain {
        disk: disk.to_owned(),
        message,
    };
    for e in extents {
        let Source::Data { file, frame } = e.source else {
            continue;
        };
        let f = files
            .get(file as usize)
            .ok_or_else(|| chain_err(format!("extent names chain file #{file}")))?;
        let fr = frames[file as usize]
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
    Ok(needed)
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
        // Random access needs the extents and frames in memory (per extent, unlike a
        // restore).
        let map = plan.extent_map()?;
        let frames = plan
            .files
            .iter()
            .map(ChainFile::load_frames)
            .collect::<Result<Vec<_>>>()?;
        let DiskPlan {
            disk,
            virtual_size,
            files,
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
        let needed = needed_files(&disk, &extents, &files, &frames)?;
        let mut sources = Vec::with_capacity(files.len());
        for ((f, fr), need) in files.into_iter().zip(frames).zip(needed) {
            sources.push(ChainSource::open(f, fr, need)?);
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
        let f = src.open_file()?;
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
                    .get_or_decode(key, || lz4::decode_whole(f, &src.path, &layout, i))?;
                out.copy_from_slice(&data[(pos - ds) as usize..(to - ds) as usize]);
            } else {
                lz4::decode_range(f, &src.path, &layout, i, pos - ds, out)?;
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

    /// Where each LZ4 frame of a compressed data frame starts, computed once.
    fn layout(&self, file: u32, frame: u32) -> Result<Arc<Layout>> {
        if let Some(l) = lock(&self.layouts).get(&(file, frame)) {
            return Ok(l.clone());
        }
        let src = &self.files[file as usize];
        let fr = &src.frames[frame as usize];
        let f = src.open_file()?;
        let l = Arc::new(lz4::layout(f, &src.path, fr, frame)?);
        lock(&self.layouts).insert((file, frame), l.clone());
        Ok(l)
    }
}
