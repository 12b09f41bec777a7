//! [`ExtentTable`]: a disk's final content for random access, kept in an unlinked
//! temporary file instead of memory. A served chain of 16,000,000 extents held as
//! extents plus every file's frames took 2.2 GB; here each run of the final disk is a
//! 72-byte record in the file (with the data frame it reads from), read back a page
//! of 256 at a time through a 32-page cache: memory is the cache (~600 KiB) and one
//! 8-byte key per page (16,000,000 extents: 500 KB), not per extent.
//!
//! Built by one pass of the chain's k-way [`Merge`]; gaps (no frame) are not stored.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nbdfmt::{Frame, FrameKind, HEADER_LEN};

use super::cache::lock;
use crate::chain::ChainFile;
use crate::error::{Error, Result};
use crate::extent::Source;
use crate::merge::Merge;

/// Records per page.
const PAGE: usize = 256;
/// Bytes per record.
const REC: usize = 72;
/// Pages kept in memory.
const CACHED_PAGES: usize = 32;

/// One run of the final disk: zeros, or data from one data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    /// Disk offset.
    pub start: u64,
    /// Length (> 0).
    pub len: u64,
    /// `None`: a zero frame.
    pub data: Option<DataRef>,
}

impl Run {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The data frame a run reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DataRef {
    pub file: u32,
    pub frame: u32,
    pub frame_start: u64,
    pub frame_len: u64,
    pub payload_offset: u64,
    pub stored_len: u64,
    /// Where its LZ4 frame sizes are in the sizes file, and how many.
    lz4_at: u64,
    lz4_n: u32,
}

impl Run {
    fn encode(&self) -> [u8; REC] {
        let mut b = [0u8; REC];
        let d = self.data.unwrap_or(DataRef {
            file: u32::MAX,
            frame: 0,
            frame_start: 0,
            frame_len: 0,
            payload_offset: 0,
            stored_len: 0,
            lz4_at: 0,
            lz4_n: 0,
        });
        let words = [
            self.start,
            self.len,
            d.frame_start,
            d.frame_len,
            d.payload_offset,
            d.stored_len,
            d.lz4_at,
        ];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b[56..60].copy_from_slice(&d.file.to_le_bytes());
        b[60..64].copy_from_slice(&d.frame.to_le_bytes());
        b[64..68].copy_from_slice(&d.lz4_n.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        let h = |i: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(a)
        };
        let file = h(56);
        Self {
            start: w(0),
            len: w(1),
            data: (file != u32::MAX).then(|| DataRef {
                file,
                frame: h(60),
                frame_start: w(2),
                frame_len: w(3),
                payload_offset: w(4),
                stored_len: w(5),
                lz4_at: w(6),
                lz4_n: h(64),
            }),
        }
    }
}

/// The runs of a disk, in disk order, on disk.
#[derive(Debug)]
pub(super) struct ExtentTable {
    runs: File,
    sizes: File,
    count: u64,
    /// Start of the first run of every page.
    firsts: Vec<u64>,
    pages: Mutex<VecDeque<(u64, Arc<Vec<Run>>)>>,
    /// Where the temporary files are (for errors).
    dir: PathBuf,
}

/// Builds the table of `files` over `size` bytes; `open(i)` is called for every chain
/// file a data run needs, with each frame it reads (to check it against the file).
pub(super) fn build(
    files: &[ChainFile],
    size: u64,
    mut check: impl FnMut(u32, &Frame) -> Result<()>,
) -> Result<ExtentTable> {
    let dir = std::env::temp_dir();
    let tmp = |what| tempfile::tempfile_in(&dir).map_err(|e| Error::scratch(what, &dir, e));
    let runs = tmp("creating the extent table in")?;
    let sizes = tmp("creating the extent table in")?;
    let werr = |e| Error::scratch("writing the extent table in", &dir, e);
    let mut rw = BufWriter::with_capacity(64 << 10, &runs);
    let mut sw = BufWriter::with_capacity(64 << 10, &sizes);
    let (mut count, mut lz4_at) = (0u64, 0u64);
    let mut firsts = Vec::new();
    let mut last_sizes: Option<(u32, u32, u64, u32)> = None;
    let mut run: Option<(Run, Source)> = None;
    let mut m = Merge::new(files, size, None)?;
    let mut flush = |r: Run, count: &mut u64| -> Result<()> {
        if *count % PAGE as u64 == 0 {
            firsts.push(r.start);
        }
        rw.write_all(&r.encode()).map_err(werr)?;
        *count += 1;
        Ok(())
    };
    while let Some(p) = m.next_piece()? {
        if let (Some((r, a)), Some(b)) = (&mut run, p.source) {
            if r.end() == p.start && *a == b {
                r.len += p.len;
                continue;
            }
        }
        if let Some((r, _)) = run.take() {
            flush(r, &mut count)?;
        }
        let Some(src) = p.source else { continue };
        let data = match src {
            Source::Zero => None,
            Source::Data { file, frame } => {
                let fr = m
                    .frame(file)
                    .ok_or_else(|| Error::internal("internal: a data piece without its frame"))?;
                // the same frame's sizes once, while its pieces follow each other
                let (at, n) = match last_sizes {
                    Some((f, i, at, n)) if f == file && i == frame => (at, n),
                    _ => {
                        check(file, fr)?;
                        let n = u32::try_from(fr.lz4_frames.len())
                            .map_err(|_| Error::Unsupported("too many LZ4 frames".into()))?;
                        for s in &fr.lz4_frames {
                            sw.write_all(&s.to_le_bytes()).map_err(werr)?;
                        }
                        let at = lz4_at;
                        lz4_at += u64::from(n) * 8;
                        last_sizes = Some((file, frame, at, n));
                        (at, n)
                    }
                };
                Some(DataRef {
                    file,
                    frame,
                    frame_start: fr.start,
                    frame_len: fr.length,
                    payload_offset: fr.payload_offset,
                    stored_len: fr.stored_len,
                    lz4_at: at,
                    lz4_n: n,
                })
            }
        };
        run = Some((
            Run {
                start: p.start,
                len: p.len,
                data,
            },
            src,
        ));
    }
    if let Some((r, _)) = run.take() {
        flush(r, &mut count)?;
    }
    rw.flush().map_err(werr)?;
    sw.flush().map_err(werr)?;
    drop((rw, sw));
    firsts.shrink_to_fit();
    Ok(ExtentTable {
        runs,
        sizes,
        count,
        firsts,
        pages: Mutex::new(VecDeque::new()),
        dir,
    })
}

impl ExtentTable {
    fn page(&self, p: u64) -> Result<Arc<Vec<Run>>> {
        {
            let mut pages = lock(&self.pages);
            if let Some(i) = pages.iter().position(|(n, _)| *n == p) {
                let hit = pages.remove(i).map(|(_, v)| v);
                if let Some(v) = hit {
                    pages.push_front((p, v.clone()));
                    return Ok(v);
                }
            }
        }
        let first = p * PAGE as u64;
        let n = (self.count - first).min(PAGE as u64) as usize;
        let mut b = vec![0u8; n * REC];
        self.runs
            .read_exact_at(&mut b, first * REC as u64)
            .map_err(|e| Error::scratch("reading the extent table in", &self.dir, e))?;
        let v = Arc::new(b.chunks_exact(REC).map(Run::decode).collect::<Vec<_>>());
        let mut pages = lock(&self.pages);
        pages.push_front((p, v.clone()));
        pages.truncate(CACHED_PAGES);
        Ok(v)
    }

    /// The runs from the first one ending after `offset`, in order.
    pub fn from(&self, offset: u64) -> Result<Runs<'_>> {
        // the page before the first page starting after `offset` holds it, or the one
        // after that
        let p = self
            .firsts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1) as u64;
        let mut it = Runs {
            table: self,
            page: None,
            next: p * PAGE as u64,
        };
        // skip the runs of that page ending at or before `offset`
        loop {
            match it.peek()? {
                Some(r) if r.end() <= offset => it.next += 1,
                _ => return Ok(it),
            }
        }
    }

    /// The frame `d` reads from, LZ4 sizes included.
    pub fn frame(&self, d: &DataRef) -> Result<Frame> {
        let mut b = vec![0u8; d.lz4_n as usize * 8];
        self.sizes
            .read_exact_at(&mut b, d.lz4_at)
            .map_err(|e| Error::scratch("reading the extent table in", &self.dir, e))?;
        Ok(Frame {
            kind: FrameKind::Data,
            start: d.frame_start,
            length: d.frame_len,
            header_offset: d.payload_offset.saturating_sub(HEADER_LEN as u64),
            payload_offset: d.payload_offset,
            stored_len: d.stored_len,
            lz4_frames: b
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_le_bytes(a)
                })
                .collect(),
        })
    }

    /// Runs in the table.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.count
    }
}

/// Runs of an [`ExtentTable`] in order.
#[derive(Debug)]
pub(super) struct Runs<'a> {
    table: &'a ExtentTable,
    page: Option<(u64, Arc<Vec<Run>>)>,
    next: u64,
}

impl Runs<'_> {
    /// The next run without moving on.
    pub fn peek(&mut self) -> Result<Option<Run>> {
        if self.next >= self.table.count {
            return Ok(None);
        }
        let p = self.next / PAGE as u64;
        if self.page.as_ref().is_none_or(|(n, _)| *n != p) {
            self.page = Some((p, self.table.page(p)?));
        }
        Ok(self
            .page
            .as_ref()
            .and_then(|(_, v)| v.get((self.next % PAGE as u64) as usize).copied()))
    }

    /// The next run.
    pub fn next_run(&mut self) -> Result<Option<Run>> {
        let r = self.peek()?;
        if r.is_some() {
            self.next += 1;
        }
        Ok(r)
    }
}
