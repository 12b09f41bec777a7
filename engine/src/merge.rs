//! [`Merge`]: the chain collapse as a k-way merge. Every stream lists its frames in
//! disk order, so walking all of a chain's files side by side, one frame each, gives
//! the final content in disk order — newest file wins — with state per *file* (its
//! current frame and a small read-ahead window), never per frame or extent.
//!
//! ```text
//!  full   [====a====)      [======b======)          each file: one cursor, one frame
//!  inc 1        [=c=)  [==d==)                      in memory at a time
//!  inc 2          [e)
//!  merge  [=a=)[c)[e)[==d==)[=====b======)  → pieces in disk order (gaps: none)
//! ```
//! A [`Piece`] borrows nothing: the frame behind a data piece is
//! [`Merge::frame`]`(file)` until the next call to [`Merge::next_piece`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use nbdfmt::{Frame, FrameKind, PreadBuf, StreamReader};

pub use crate::chain::MergeStats;
use crate::chain::{ChainFile, Frames};
use crate::error::{Error, Result};
use crate::extent::{ExtentMap, Source};
use crate::framelog::FrameLogReader;

/// Read-ahead shared by all header cursors of one merge, by file size: a chain of
/// many small files gets small windows (a frame header is 40 bytes; down to 512 bytes,
/// so 2,000 files hold 1 MiB, not 8), a big file the usual 64 KiB.
const WINDOW_BUDGET: u64 = 2 << 20;

/// The header window of a file of `size` bytes in a chain of `total` bytes.
pub(crate) fn window_for(size: u64, total: u64) -> usize {
    let share = u128::from(WINDOW_BUDGET) * u128::from(size) / u128::from(total.max(1));
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(512, nbdfmt::reader::INDEX_READAHEAD)
}

/// A run of the final disk in disk order and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Disk offset.
    pub start: u64,
    /// Length (> 0).
    pub len: u64,
    /// `None`: no frame of any file covers it (reads as zero).
    pub source: Option<Source>,
}

impl Piece {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One file's frames, one at a time.
enum Cursor<'a> {
    Memory(std::slice::Iter<'a, Frame>),
    Log(FrameLogReader),
    File(Box<StreamReader<PreadBuf>>),
}

/// A file in the merge: its cursor and its current frame.
struct Lane<'a> {
    path: &'a Path,
    cursor: Cursor<'a>,
    /// The current frame (as in the file), `None` once the file has no more.
    frame: Option<Frame>,
    /// Where the current frame ends on the disk (cut off at the disk size: a disk
    /// that shrank).
    end: u64,
    /// Index of the current frame in the file (data and zero frames).
    index: u32,
    /// Frames read so far.
    read: u64,
}

impl Lane<'_> {
    /// Moves to the next frame that starts before `size` (later ones are read, to
    /// validate the file to its end, and dropped).
    fn advance(&mut self, size: u64) -> Result<()> {
        loop {
            let next = match &mut self.cursor {
                Cursor::Memory(it) => it.next().cloned(),
                Cursor::Log(r) => r.next_frame()?,
                Cursor::File(r) => r.next_frame().map_err(|e| e.in_file(self.path))?,
            };
            let Some(fr) = next else {
                self.frame = None;
                return Ok(());
            };
            self.index = u32::try_from(self.read).map_err(|_| {
                Error::Unsupported(format!("{}: too many frames", self.path.display()))
            })?;
            self.read += 1;
            if fr.start >= size || fr.length == 0 {
                continue;
            }
            // A frame past the final size (a disk that shrank) is cut off.
            self.end = fr.end().min(size);
            self.frame = Some(fr);
            return Ok(());
        }
    }
}

/// The k-way merge of a disk's chain files (see the module docs).
pub struct Merge<'a> {
    size: u64,
    lanes: Vec<Lane<'a>>,
    /// Next disk offset to hand out.
    pos: u64,
    /// Files whose current frame starts after `pos`, by start.
    pending: BinaryHeap<Reverse<(u64, u32)>>,
    /// Files whose current frame covers `pos`, by end.
    ends: BinaryHeap<Reverse<(u64, u32)>>,
    /// The same files, newest first. Entries of files whose frame ended are dropped
    /// when they reach the top; `in_active` keeps one entry per file at most.
    active: BinaryHeap<u32>,
    in_active: Vec<bool>,
    done: bool,
}

impl std::fmt::Debug for Merge<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merge")
            .field("size", &self.size)
            .field("files", &self.lanes.len())
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl<'a> Merge<'a> {
    /// A merge of `files` (base first) over a disk of `size` bytes. Files whose frames
    /// are in the file are read through `opened[i]` when given (so a reader of their
    /// payloads shares the descriptor), else opened here.
    pub fn new(files: &'a [ChainFile], size: u64, opened: Option<&[Arc<File>]>) -> Result<Self> {
        Self::of(files.iter().collect(), size, opened)
    }

    /// [`new`](Self::new) over some of a chain's files (oldest first; indices in the
    /// pieces are into `files`).
    pub fn of(files: Vec<&'a ChainFile>, size: u64, opened: Option<&[Arc<File>]>) -> Result<Self> {
        let total: u64 = files.iter().map(|f| f.file_size).sum();
        let mut lanes = Vec::with_capacity(files.len());
        for (i, f) in files.into_iter().enumerate() {
            // No bigger than the file (a small chain's files are a few KiB).
            let window = window_for(f.file_size, total)
                .min(usize::try_from(f.file_size).unwrap_or(usize::MAX).max(4096));
            let cursor = match &f.frames {
                Frames::Memory(v) => Cursor::Memory(v.iter()),
                Frames::Log(log) => Cursor::Log(log.reader()),
                Frames::File { .. } => {
                    let file = match opened.and_then(|o| o.get(i)) {
                        Some(a) => a.clone(),
                        None => Arc::new(f.open_file()?),
                    };
                    let r = StreamReader::open(PreadBuf::shared(file, window))
                        .map_err(|e| e.in_file(&f.path))?;
                    Cursor::File(Box::new(r))
                }
            };
            lanes.push(Lane {
                path: &f.path,
                cursor,
                frame: None,
                end: 0,
                index: 0,
                read: 0,
            });
        }
        let n = lanes.len();
        let mut m = Self {
            size,
            lanes,
            pos: 0,
            pending: BinaryHeap::new(),
            ends: BinaryHeap::new(),
            active: BinaryHeap::new(),
            in_active: vec![false; n],
            done: false,
        };
        for i in 0..m.lanes.len() {
            m.load(i)?;
        }
        Ok(m)
    }

    /// Reads file `i`'s next frame and files it under pending or active.
    fn load(&mut self, i: usize) -> Result<()> {
        let lane = &mut self.lanes[i];
        lane.advance(self.size)?;
        let Some(fr) = &lane.frame else {
            return Ok(());
        };
        let (start, end) = (fr.start, lane.end);
        if start <= self.pos {
            self.activate(i, end);
        } else {
            self.pending.push(Reverse((start, i as u32)));
        }
        Ok(())
    }

    /// File `i`'s current frame (ending at `end`) covers `pos`.
    fn activate(&mut self, i: usize, end: u64) {
        self.ends.push(Reverse((end, i as u32)));
        if !self.in_active[i] {
            self.in_active[i] = true;
            self.active.push(i as u32);
        }
    }

    /// The current frame of file `file` (as in the file, not cut off at the disk size):
    /// the frame behind the last data piece from it.
    pub fn frame(&self, file: u32) -> Option<&Frame> {
        self.lanes.get(file as usize).and_then(|l| l.frame.as_ref())
    }

    /// The next piece in disk order; `None` after the last, once every file was read
    /// to its end (so every frame header was validated).
    pub fn next_piece(&mut self) -> Result<Option<Piece>> {
        if self.done {
            return Ok(None);
        }
        // Frames that ended at `pos` make way for their file's next frame.
        while let Some(&Reverse((end, id))) = self.ends.peek() {
            if end > self.pos {
                break;
            }
            self.ends.pop();
            self.load(id as usize)?;
        }
        while let Some(&Reverse((start, id))) = self.pending.peek() {
            if start > self.pos {
                break;
            }
            self.pending.pop();
            let end = self.lanes[id as usize].end;
            self.activate(id as usize, end);
        }
        if self.pos >= self.size {
            return self.finish().map(|()| None);
        }
        // Lazily drop files whose frame is no longer active.
        while let Some(&id) = self.active.peek() {
            let lane = &self.lanes[id as usize];
            if lane
                .frame
                .as_ref()
                .is_some_and(|f| f.start <= self.pos && lane.end > self.pos)
            {
                break;
            }
            self.active.pop();
            self.in_active[id as usize] = false;
        }
        let mut next = self.size;
        if let Some(&Reverse((s, _))) = self.pending.peek() {
            next = next.min(s);
        }
        if let Some(&Reverse((e, _))) = self.ends.peek() {
            next = next.min(e);
        }
        let source = self.active.peek().and_then(|&id| {
            let lane = &self.lanes[id as usize];
            lane.frame.as_ref().map(|f| match f.kind {
                FrameKind::Data => Source::Data {
                    file: id,
                    frame: lane.index,
                },
                // A zero frame means zero, also when a fallback full lands on older data.
                _ => Source::Zero,
            })
        });
        let piece = Piece {
            start: self.pos,
            len: next - self.pos,
            source,
        };
        self.pos = next;
        Ok(Some(piece))
    }

    /// Reads every file to its end (frames past the disk size are still validated).
    fn finish(&mut self) -> Result<()> {
        for lane in &mut self.lanes {
            while lane.frame.is_some() {
                lane.advance(u64::MAX)?;
            }
        }
        self.done = true;
        Ok(())
    }
}

/// Counts the final content of `files` over `size` bytes (one pass over the headers),
/// and the live data bytes of each file.
pub(crate) fn stats(files: &[ChainFile], size: u64) -> Result<(MergeStats, Vec<u64>)> {
    let mut m = Merge::new(files, size, None)?;
    let mut out = MergeStats::default();
    let mut live = vec![0u64; files.len()];
    let mut last: Option<(u64, Source)> = None;
    while let Some(p) = m.next_piece()? {
        let Some(src) = p.source else {
            last = None;
            continue;
        };
        if let Source::Data { file, .. } = src {
            out.data_bytes += p.len;
            live[file as usize] += p.len;
        }
        if last != Some((p.start, src)) {
            out.extents += 1;
        }
        last = Some((p.end(), src));
    }
    Ok((out, live))
}

/// The final content of `files` over `size` bytes as an in-memory [`ExtentMap`]
/// (memory per extent: for random access, and as the oracle of the merge's tests).
pub(crate) fn extent_map(files: &[ChainFile], size: u64) -> Result<ExtentMap> {
    let mut m = Merge::new(files, size, None)?;
    let mut map = ExtentMap::new();
    let mut run: Option<(u64, u64, Source)> = None;
    while let Some(p) = m.next_piece()? {
        match (run, p.source) {
            (Some((s, e, a)), Some(b)) if e == p.start && a == b => run = Some((s, p.end(), a)),
            _ => {
                if let Some((s, e, src)) = run.take() {
                    map.insert(s, e - s, src);
                }
                run = p.source.map(|src| (p.start, p.end(), src));
            }
        }
    }
    if let Some((s, e, src)) = run {
        map.insert(s, e - s, src);
    }
    Ok(map)
}
