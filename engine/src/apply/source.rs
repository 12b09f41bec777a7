//! The reader side of apply: a disk's final content in disk order, read from its chain
//! files side by side ([`Merge`]) and handed on in [`Chunk`]s.
//!
//! ```text
//!  merge (frame headers) ─▶ piece ─▶ lane of its file ─▶ bytes ─▶ chunk (coalesced) ─▶ emit
//!                                    (window, adler32,
//!                                     LZ4 decoder)
//! ```
//! Memory is per file: a header window, a read window, an adler32 state and (LZ4, at
//! most [`MAX_DECODERS`] at a time) a paused decoder ([`Lane`]); never per frame or
//! extent.
//! Pieces next to each other on the disk travel in one segment, and so do pieces
//! separated by a gap that holds no whole 4 KiB block (the gap is sent as zeroes: the
//! target allocates those blocks anyway), so a million one-byte frames are a handful of
//! writes, not a million.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use nbdfmt::checksum::ChecksumStatus;
use nbdfmt::{Error as FmtError, ErrorKind as FmtKind, FrameKind, StreamReader};

use super::chunk::{BufPool, Chunk, Seg};
use super::lane::{evict, Ctx, Lane, MAX_DECODERS};
use super::stored::{window_for, Stored};
use crate::cancel::Cancel;
use crate::chain::{ChainFile, Frames};
use crate::error::{Error, Result};
use crate::extent::Source;
use crate::merge::Merge;

/// Segments per chunk at most (tiny pieces apart on the disk).
const MAX_SEGS: usize = 4096;

/// Host block size the gap rule works with (see the module docs).
const BLOCK: u64 = 4096;

/// What the pass learned about one chain file: checksum outcome and bytes read.
pub(super) type FileOutcome = (PathBuf, Option<ChecksumStatus>, u64);

/// Chunks being filled (see the module docs for the gap rule).
struct Builder<'a> {
    pool: &'a BufPool,
    cap: usize,
    data: Vec<u8>,
    filled: usize,
    segs: Vec<Seg>,
    live: u64,
    /// A hole not yet put into `segs` (it may become zeroes between two data pieces).
    hole: Option<(u64, u64)>,
}

impl<'a> Builder<'a> {
    fn new(pool: &'a BufPool, cap: usize) -> Self {
        Self {
            pool,
            cap,
            data: Vec::new(),
            filled: 0,
            segs: Vec::new(),
            live: 0,
            hole: None,
        }
    }

    fn hole(&mut self, at: u64, len: u64) {
        match &mut self.hole {
            Some((s, l)) if *s + *l == at => *l += len,
            _ => {
                self.put_hole();
                self.hole = Some((at, len));
            }
        }
    }

    fn put_hole(&mut self) {
        if let Some((s, l)) = self.hole.take() {
            match self.segs.last_mut() {
                Some(Seg {
                    offset,
                    len,
                    data: false,
                }) if *offset + *len == s => *len += l,
                _ => self.segs.push(Seg {
                    offset: s,
                    len: l,
                    data: false,
                }),
            }
        }
    }

    /// Hands the chunk on when it holds anything.
    fn flush(&mut self, emit: &mut dyn FnMut(Chunk) -> Result<()>) -> Result<()> {
        if self.segs.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.data);
        self.filled = 0;
        let c = Chunk {
            data,
            segs: std::mem::take(&mut self.segs),
            live: std::mem::take(&mut self.live),
        };
        emit(c)
    }

    /// Room in the chunk for up to `len` bytes of data at disk offset `at`: a slice
    /// of at most that many bytes (flushing a full chunk first).
    fn slot(
        &mut self,
        at: u64,
        len: u64,
        emit: &mut dyn FnMut(Chunk) -> Result<()>,
    ) -> Result<&mut [u8]> {
        if self.filled == self.cap || self.segs.len() >= MAX_SEGS {
            self.put_hole();
            self.flush(emit)?;
        }
        if self.data.capacity() == 0 {
            // Only what is filled is touched (an idle pool buffer costs no memory).
            self.data = self.pool.get(0);
        }
        let room = self.cap - self.filled;
        // Zeroes instead of a hole that holds no whole block, when they fit.
        let prev_end = match self.segs.last() {
            Some(s) if s.data => Some(s.offset + s.len),
            _ => None,
        };
        let fill = match (prev_end, self.hole) {
            (Some(e), Some((hs, hl))) if hs == e && hs + hl == at => {
                let gap = at - e;
                (e.div_ceil(BLOCK) * BLOCK + BLOCK > at && gap < room as u64).then_some(gap)
            }
            _ => None,
        };
        match fill {
            Some(gap) => {
                self.hole = None;
                let g = gap as usize;
                self.data.resize(self.filled + g, 0);
                self.filled += g;
                if let Some(s) = self.segs.last_mut() {
                    s.len += gap;
                }
            }
            None => self.put_hole(),
        }
        let room = self.cap - self.filled;
        let n = usize::try_from(len).unwrap_or(usize::MAX).min(room);
        match self.segs.last_mut() {
            Some(s) if s.data && s.offset + s.len == at => s.len += n as u64,
            _ => self.segs.push(Seg {
                offset: at,
                len: n as u64,
                data: true,
            }),
        }
        self.live += n as u64;
        let from = self.filled;
        self.filled += n;
        self.data.resize(self.filled, 0);
        Ok(&mut self.data[from..from + n])
    }
}

/// Reads a disk's final content in disk order (see the module docs) and hands it to
/// `emit` in chunks of at most `chunk` bytes; per chain file its checksum outcome (when
/// `verify` and it has a `.chksum`) and the bytes read. `live[i]`: the live data bytes
/// of file `i` (the plan's count): files without any take no part in the merge (their
/// frames are superseded everywhere), and those with a checksum to verify are hashed on
/// a thread of their own meanwhile; a file without either is not opened at all.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_disk(
    files: &[ChainFile],
    live: &[u64],
    size: u64,
    verify: bool,
    chunk: usize,
    pool: &BufPool,
    cancel: &Cancel,
    emit: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<Vec<FileOutcome>> {
    let hashed = |f: &ChainFile| verify && f.stored_checksum.is_some();
    let is_live = |i: usize| live.get(i).is_none_or(|&l| l > 0);
    let (merged, dead): (Vec<usize>, Vec<usize>) = (0..files.len()).partition(|&i| is_live(i));
    let dead: Vec<usize> = dead.into_iter().filter(|&i| hashed(&files[i])).collect();
    // Either side stops the other when it fails.
    let (stop, failed) = (Cancel::new(), Cancel::new());
    let mut out: Vec<Option<FileOutcome>> = vec![None; files.len()];
    std::thread::scope(|sc| -> Result<()> {
        let helper = if dead.is_empty() {
            None
        } else {
            let (dead, stop, failed) = (&dead, &stop, &failed);
            let h = std::thread::Builder::new()
                .name("vmrestore-hash".into())
                .spawn_scoped(sc, move || {
                    let r = hash_files(files, dead, cancel, stop);
                    if r.is_err() {
                        failed.abort();
                    }
                    r
                })
                .map_err(|e| Error::internal(format!("cannot start a hashing thread: {e}")))?;
            Some(h)
        };
        let r = merge_pass(
            files, &merged, size, verify, chunk, pool, cancel, &failed, emit,
        );
        if r.is_err() {
            stop.abort();
        }
        let hashed = match helper {
            None => Ok(Vec::new()),
            Some(h) => h
                .join()
                .map_err(|_| Error::internal("hashing thread panicked"))?,
        };
        // The failure that stopped the other side is the one to report.
        let (r, hashed) = match (r, hashed) {
            (Err(Error::Aborted), Err(e)) | (Err(e), _) | (_, Err(e)) => return Err(e),
            (Ok(r), Ok(h)) => (r, h),
        };
        for (i, o) in r.into_iter().chain(hashed) {
            out[i] = Some(o);
        }
        Ok(())
    })?;
    Ok(out
        .into_iter()
        .zip(files)
        .map(|(o, f)| o.unwrap_or_else(|| (f.path.clone(), None, 0)))
        .collect())
}

/// The checksum outcome of a file whose adler32 is `computed` (`None`: not hashed).
fn outcome(
    f: &ChainFile,
    stored: Option<u32>,
    computed: Option<u32>,
) -> Result<Option<ChecksumStatus>> {
    match (stored, computed) {
        (Some(s), Some(c)) if s != c => Err(Error::Backup(
            FmtError::from(FmtKind::ChecksumMismatch {
                stored: s,
                computed: c,
            })
            .in_file(&f.path),
        )),
        (Some(s), Some(_)) => Ok(Some(ChecksumStatus::Ok(s))),
        _ => Ok(None),
    }
}

/// Hashes files `which` of `files` whole, one after the other.
fn hash_files(
    files: &[ChainFile],
    which: &[usize],
    cancel: &Cancel,
    stop: &Cancel,
) -> Result<Vec<(usize, FileOutcome)>> {
    let mut out = Vec::with_capacity(which.len());
    for &i in which {
        let f = &files[i];
        let mut s = Stored::new(
            &f.path,
            Arc::new(f.open_file()?),
            f.file_size,
            true,
            256 << 10,
            cancel,
        );
        let computed = s.finish_checked(&|| {
            cancel.check()?;
            if stop.is_cancelled() {
                return Err(Error::Aborted);
            }
            Ok(())
        })?;
        out.push((
            i,
            (
                f.path.clone(),
                outcome(f, f.stored_checksum, computed)?,
                s.read,
            ),
        ));
    }
    Ok(out)
}

/// The merge over files `which` of `files` (those with live data), reading their bytes
/// in disk order (see [`read_disk`]).
#[allow(clippy::too_many_arguments)]
fn merge_pass(
    files: &[ChainFile],
    which: &[usize],
    size: u64,
    verify: bool,
    chunk: usize,
    pool: &BufPool,
    cancel: &Cancel,
    failed: &Cancel,
    emit: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<Vec<(usize, FileOutcome)>> {
    let sub: Vec<&ChainFile> = which.iter().map(|&i| &files[i]).collect();
    if let [f] = sub[..] {
        if !f.compressed() && matches!(f.frames, Frames::File { .. }) {
            let o = one_plain_file(f, size, verify, chunk, pool, cancel, emit)?;
            return Ok(vec![(which[0], o)]);
        }
    }
    let opened = sub
        .iter()
        .map(|f| f.open_file().map(Arc::new))
        .collect::<Result<Vec<Arc<File>>>>()?;
    let total: u64 = sub.iter().map(|f| f.file_size).sum();
    let mut lanes: Vec<Lane> = sub
        .iter()
        .zip(&opened)
        .map(|(f, file)| {
            let hash = verify && f.stored_checksum.is_some();
            let win = window_for(f.file_size, total);
            Lane::new(
                f.path.clone(),
                f.compressed(),
                f.stored_checksum.filter(|_| hash),
                Stored::new(&f.path, file.clone(), f.file_size, hash, win, cancel),
            )
        })
        .collect();
    // Frames held in memory need no header cursor; the others share the descriptor.
    let mut merge = Merge::of(sub.clone(), size, Some(&opened))?;
    drop(opened);
    let mut ctx = Ctx::new(cancel);
    let mut b = Builder::new(pool, chunk);
    let mut n = 0u64;
    while let Some(p) = merge.next_piece()? {
        n += 1;
        if n % 4096 == 0 {
            ctx.cancel.check()?;
            if failed.is_cancelled() {
                return Err(Error::Aborted);
            }
        }
        let Some(Source::Data { file, frame }) = p.source else {
            b.hole(p.start, p.len);
            continue;
        };
        let fr = merge
            .frame(file)
            .ok_or_else(|| Error::internal("internal: a data piece without its frame"))?;
        let lane = &mut lanes[file as usize];
        let mut at = p.start;
        while at < p.end() {
            ctx.cancel.check()?;
            if failed.is_cancelled() {
                return Err(Error::Aborted);
            }
            let dst = b.slot(at, p.end() - at, emit)?;
            let len = dst.len() as u64;
            lane.read(frame, fr, at, dst, &mut ctx)?;
            at += len;
        }
        if ctx.decoders > MAX_DECODERS {
            evict(&mut lanes, file as usize, &mut ctx)?;
        }
    }
    b.put_hole();
    b.flush(emit)?;
    drop(merge);
    let mut out = Vec::with_capacity(lanes.len());
    for ((lane, f), &i) in lanes.iter_mut().zip(&sub).zip(which) {
        ctx.cancel.check()?;
        lane.finish_frame(&mut ctx)?;
        let stored_checksum = lane.stored_checksum();
        let stored = lane.stored()?;
        let computed = stored.finish_checked(&|| {
            cancel.check()?;
            if failed.is_cancelled() {
                return Err(Error::Aborted);
            }
            Ok(())
        })?;
        let read = stored.read;
        stored.release();
        out.push((
            i,
            (f.path.clone(), outcome(f, stored_checksum, computed)?, read),
        ));
    }
    Ok(out)
}

/// The pass for a disk whose only live file is an uncompressed stream: no merge, the
/// file read once from start to end — frame headers, payloads and (when hashed) what
/// lies between them through one window — instead of a header walk beside the reads.
fn one_plain_file(
    f: &ChainFile,
    size: u64,
    verify: bool,
    chunk: usize,
    pool: &BufPool,
    cancel: &Cancel,
    emit: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<FileOutcome> {
    let hash = verify && f.stored_checksum.is_some();
    let win = window_for(1, 1);
    let file = Arc::new(f.open_file()?);
    let mut stored = Stored::new(&f.path, file, f.file_size, hash, win, cancel);
    let mut r = StreamReader::open(stored.seekable()).map_err(|e| e.in_file(&f.path))?;
    let mut b = Builder::new(pool, chunk);
    let mut pos = 0u64;
    let mut n = 0u64;
    while let Some(fr) = r.next_frame().map_err(|e| e.in_file(&f.path))? {
        n += 1;
        if n % 4096 == 0 {
            cancel.check()?;
        }
        let end = fr.end().min(size);
        if fr.start >= end {
            continue;
        }
        if fr.start > pos {
            b.hole(pos, fr.start - pos);
        }
        pos = end;
        if fr.kind != FrameKind::Data {
            b.hole(fr.start, end - fr.start);
            continue;
        }
        let mut at = fr.start;
        while at < end {
            cancel.check()?;
            let dst = b.slot(at, end - at, emit)?;
            let want = dst.len();
            let mut got = 0;
            while got < want {
                match r
                    .read_chunk(&mut dst[got..])
                    .map_err(|e| e.in_file(&f.path))?
                {
                    Some((_, k)) => got += k,
                    None => {
                        return Err(Error::internal(format!(
                            "internal: {}: the frame at disk offset {} ended early",
                            f.path.display(),
                            fr.start
                        )))
                    }
                }
            }
            at += want as u64;
        }
    }
    if pos < size {
        b.hole(pos, size - pos);
    }
    b.put_hole();
    b.flush(emit)?;
    drop(r);
    let computed = stored.finish_checked(&|| cancel.check())?;
    let read = stored.read;
    let status = outcome(f, f.stored_checksum.filter(|_| hash), computed)?;
    Ok((f.path.clone(), status, read))
}
