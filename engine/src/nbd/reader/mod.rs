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
//! The extent map and the frames behind it are not held in memory: they are an
//! `ExtentTable` in a temporary file, read a page at a time
//! (a chain of 16,000,000 extents: 2.2 GB before, ~40 MiB now).
//!
//! Files: `cache` ([`Lz4Cache`]), `lz4` (LZ4 frame layout and decoding), `table`
//! (the runs on disk); this one walks the runs.

mod cache;
mod lz4;
mod table;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nbdfmt::{Error as FmtError, ErrorKind as FmtKind, Frame};

use crate::error::{Error, Result};
use crate::plan::DiskPlan;
use cache::lock;
use lz4::{corrupt, io_err, Layout};
use table::{DataRef, ExtentTable};

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
    /// `None` when no run reads from this file.
    file: Option<File>,
    compressed: bool,
}

impl ChainSource {
    /// The open file (every file a run needs is open).
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

static NEXT_READER_ID: AtomicU64 = AtomicU64::new(1);

/// Random-access reader of one disk's content at a restore point, from its chain.
/// `&self` methods are safe to call from many threads at once.
#[derive(Debug)]
pub struct ChainReader {
    id: u64,
    disk: String,
    size: u64,
    table: ExtentTable,
    files: Vec<ChainSource>,
    layouts: Mutex<HashMap<(u32, u32), Arc<Layout>>>,
    cache: Arc<Lz4Cache>,
}

/// LZ4 layouts kept (a few hundred bytes each) before the map starts over: a
/// sequential read of a disk of millions of compressed frames does not keep one per
/// frame.
const MAX_LAYOUTS: usize = 4096;

impl ChainReader {
    /// Opens the chain files the plan needs, with a private 64 MiB cache.
    pub fn new(plan: DiskPlan) -> Result<Self> {
        Self::with_cache(plan, Arc::new(Lz4Cache::default()))
    }

    /// Opens the chain files the plan needs, sharing `cache`. One pass over the
    /// chain's frame headers writes the runs of the final disk to a temporary file
    /// and checks every data frame a run reads against its file.
    pub fn with_cache(plan: DiskPlan, cache: Arc<Lz4Cache>) -> Result<Self> {
        let DiskPlan {
            disk,
            virtual_size,
            files,
            ..
        } = plan;
        let mut opened: Vec<Option<(File, u64)>> = files.iter().map(|_| None).collect();
        let table = table::build(&files, virtual_size, |i, fr| {
            let f = &files[i as usize];
            let slot = &mut opened[i as usize];
            if slot.is_none() {
                let file = File::open(&f.path).map_err(|e| io_err(&f.path, 0, e))?;
                let len = file.metadata().map_err(|e| io_err(&f.path, 0, e))?.len();
                *slot = Some((file, len));
            }
            let len = slot.as_ref().map_or(0, |(_, l)| *l);
            check_stored(&f.path, fr, len, f.compressed())
        })?;
        let sources = files
            .into_iter()
            .zip(opened)
            .map(|(f, o)| ChainSource {
                compressed: f.compressed(),
                path: f.path,
                file: o.map(|(file, _)| file),
            })
            .collect();
        Ok(Self {
            id: NEXT_READER_ID.fetch_add(1, Ordering::Relaxed),
            disk,
            size: virtual_size,
            table,
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

    /// Data/zero runs of `[offset, offset + len)` (clamped to the disk), merged:
    /// `(length, is_data)` in disk order, at most `limit` of them (the last one
    /// complete: they may then cover less than `len`).
    pub fn allocation(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let push = |out: &mut Vec<(u64, bool)>, l: u64, data: bool| {
            if l == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.1 == data => last.0 += l,
                _ => out.push((l, data)),
            }
        };
        let mut pos = offset.min(end);
        let mut runs = self.table.from(pos)?;
        while let Some(e) = runs.next_run()? {
            if e.start >= end {
                break;
            }
            if e.start > pos {
                push(&mut out, e.start - pos, false);
                pos = e.start;
            }
            let to = e.end().min(end);
            push(&mut out, to - pos, e.data.is_some());
            pos = to;
            if out.len() > limit {
                out.truncate(limit);
                return Ok(out);
            }
        }
        push(&mut out, end - pos, false);
        out.truncate(limit);
        Ok(out)
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
        let mut runs = self.table.from(offset)?;
        while let Some(e) = runs.next_run()? {
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
            match e.data {
                None => {
                    buf[r].fill(0);
                    push(Piece::Zero {
                        offset: pos,
                        len: to - pos,
                    });
                }
                Some(d) => {
                    self.read_data(&d, pos, &mut buf[r])?;
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

    /// Reads `buf.len()` decoded bytes of the data frame `d` names at disk offset
    /// `disk_off` (the range lies inside the frame: the merge made it so).
    fn read_data(&self, d: &DataRef, disk_off: u64, buf: &mut [u8]) -> Result<()> {
        let (file, frame) = (d.file, d.frame);
        let src = self.source(file)?;
        let f = src.open_file()?;
        let rel = disk_off - d.frame_start;
        if !src.compressed {
            let at = d.payload_offset + rel;
            return f
                .read_exact_at(buf, at)
                .map_err(|e| io_err(&src.path, at, e));
        }
        let layout = self.layout(d)?;
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
                d.payload_offset,
                "LZ4 frames end before the data frame".into(),
            ));
        }
        Ok(())
    }

    /// Where each LZ4 frame of a compressed data frame starts, computed once.
    fn layout(&self, d: &DataRef) -> Result<Arc<Layout>> {
        let key = (d.file, d.frame);
        if let Some(l) = lock(&self.layouts).get(&key) {
            return Ok(l.clone());
        }
        let src = self.source(d.file)?;
        let fr = self.table.frame(d)?;
        let f = src.open_file()?;
        let l = Arc::new(lz4::layout(f, &src.path, &fr, d.frame)?);
        let mut layouts = lock(&self.layouts);
        if layouts.len() >= MAX_LAYOUTS {
            layouts.clear();
        }
        layouts.insert(key, l.clone());
        Ok(l)
    }

    fn source(&self, file: u32) -> Result<&ChainSource> {
        self.files
            .get(file as usize)
            .ok_or_else(|| Error::internal(format!("internal: no chain file #{file}")))
    }
}

#[cfg(test)]
mod tests;
