//! [`FrameLog`]: a list of frames kept on disk instead of in memory. The salvage
//! walk keeps the frames of a damaged file that passed its checks, and a file can
//! hold millions of them (4,000,000 one-byte frames in a 172 MB stream; 16,000,000
//! extents): as a `Vec<Frame>` that is 64+ bytes each (1.9 GB measured before this
//! log). Here they are written, as they are found, to an unlinked temporary file —
//! 3 bytes for a frame whose header follows the previous one, more for LZ4 sizes —
//! and read back one at a time by the merge and the damage map, through a small
//! window: memory per file, never per frame.
//!
//! A record: a tag byte, then LEB128 varints.
//! ```text
//!  tag: bit 0 data (else zero) · bit 1 header right after the previous frame
//!       bit 2 starts where the previous frame ended · bit 3 stored_len == length
//!       bit 4 has LZ4 frame sizes
//!  [header_offset]  [start]  length  [stored_len]  [n, size × n]
//! ```
//! The payload of a frame always starts 40 bytes after its header; the next header of
//! a data frame is 2 bytes (CR LF) after its payload.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

use nbdfmt::{Frame, FrameKind, PreadBuf, HEADER_LEN};

const DATA: u8 = 1;
const NEXT_HEADER: u8 = 2;
const NEXT_START: u8 = 4;
const STORED_IS_LENGTH: u8 = 8;
const LZ4: u8 = 16;

/// Read-back window of one log (the merge holds one per file).
const WINDOW: usize = 16 << 10;

/// Where the next frame is expected, in the file and on the disk.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    header: u64,
    disk: u64,
}

impl Cursor {
    fn after(f: &Frame) -> Self {
        let header = match f.kind {
            FrameKind::Data => f
                .payload_offset
                .saturating_add(f.stored_len)
                .saturating_add(2),
            _ => f.header_offset.saturating_add(HEADER_LEN as u64),
        };
        Self {
            header,
            disk: f.end(),
        }
    }
}

/// Frames written to a temporary file, in the order they were pushed.
#[derive(Debug, Clone)]
pub struct FrameLog {
    file: Arc<File>,
    count: u64,
    /// The directory holding the (unlinked) file, for errors.
    dir: Arc<Path>,
}

/// Appends frames to a new [`FrameLog`].
#[derive(Debug)]
pub struct FrameLogWriter {
    w: BufWriter<File>,
    dir: PathBuf,
    at: Cursor,
    count: u64,
}

impl FrameLogWriter {
    /// A log in a new unlinked file in `dir` (the system's temporary directory when
    /// `None` or when `dir` cannot hold one).
    pub fn new(dir: Option<&Path>) -> Result<Self> {
        let (file, dir) = match dir.map(|d| (tempfile::tempfile_in(d), d)) {
            Some((Ok(f), d)) => (f, d.to_path_buf()),
            _ => {
                let d = std::env::temp_dir();
                let f = tempfile::tempfile_in(&d).map_err(|e| log_error("creating", &d, e))?;
                (f, d)
            }
        };
        Ok(Self {
            w: BufWriter::with_capacity(64 << 10, file),
            dir,
            at: Cursor::default(),
            count: 0,
        })
    }

    /// Appends `f` (a data or zero frame).
    pub fn push(&mut self, f: &Frame) -> Result<()> {
        let data = f.kind == FrameKind::Data;
        let mut tag = if data { DATA } else { 0 };
        let next_header = f.header_offset == self.at.header;
        let next_start = f.start == self.at.disk;
        let stored_is_length = f.stored_len == f.length;
        tag |= if next_header { NEXT_HEADER } else { 0 };
        tag |= if next_start { NEXT_START } else { 0 };
        if data {
            tag |= if stored_is_length {
                STORED_IS_LENGTH
            } else {
                0
            };
            tag |= if f.lz4_frames.is_empty() { 0 } else { LZ4 };
        }
        let mut rec = Vec::with_capacity(32);
        rec.push(tag);
        if !next_header {
            put(&mut rec, f.header_offset);
        }
        if !next_start {
            put(&mut rec, f.start);
        }
        put(&mut rec, f.length);
        if data && !stored_is_length {
            put(&mut rec, f.stored_len);
        }
        if data && !f.lz4_frames.is_empty() {
            put(&mut rec, f.lz4_frames.len() as u64);
            for &s in &f.lz4_frames {
                put(&mut rec, s);
            }
        }
        self.w
            .write_all(&rec)
            .map_err(|e| log_error("writing", &self.dir, e))?;
        self.at = Cursor::after(f);
        self.count += 1;
        Ok(())
    }

    /// Frames pushed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The finished log.
    pub fn finish(self) -> Result<FrameLog> {
        let count = self.count;
        let dir = self.dir;
        let file = self
            .w
            .into_inner()
            .map_err(|e| log_error("writing", &dir, e.into_error()))?;
        Ok(FrameLog {
            file: Arc::new(file),
            count,
            dir: Arc::from(dir.as_path()),
        })
    }
}

/// An I/O error on the log: the directory holding it is the target (ENOSPC there is
/// "no space", as for the disk).
fn log_error(op: &'static str, dir: &Path, e: io::Error) -> Error {
    let op = match op {
        "creating" => "creating the salvage frame log in",
        "writing" => "writing the salvage frame log in",
        _ => "reading the salvage frame log in",
    };
    Error::scratch(op, dir, e)
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

impl FrameLog {
    /// Frames in the log.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads the frames back from the first, one at a time.
    pub fn reader(&self) -> FrameLogReader {
        FrameLogReader {
            r: PreadBuf::shared(self.file.clone(), WINDOW),
            left: self.count,
            at: Cursor::default(),
            dir: self.dir.clone(),
        }
    }

    /// Every frame, in memory (memory per frame: random access and tests only).
    pub fn load(&self) -> Result<Vec<Frame>> {
        let mut r = self.reader();
        let mut v = Vec::new();
        while let Some(f) = r.next_frame()? {
            v.push(f);
        }
        Ok(v)
    }
}

/// A reader of a [`FrameLog`].
#[derive(Debug)]
pub struct FrameLogReader {
    r: PreadBuf,
    left: u64,
    at: Cursor,
    dir: Arc<Path>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("salvage frame log damaged: {what}"),
    )
}

impl FrameLogReader {
    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn get(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    /// The next frame, `None` after the last.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        self.decode()
            .map_err(|e| log_error("reading", &self.dir, e))
    }

    fn decode(&mut self) -> io::Result<Option<Frame>> {
        if self.left == 0 {
            return Ok(None);
        }
        let tag = self.byte()?;
        let header_offset = if tag & NEXT_HEADER != 0 {
            self.at.header
        } else {
            self.get()?
        };
        let start = if tag & NEXT_START != 0 {
            self.at.disk
        } else {
            self.get()?
        };
        let length = self.get()?;
        let data = tag & DATA != 0;
        let stored_len = match (data, tag & STORED_IS_LENGTH != 0) {
            (false, _) => 0,
            (true, true) => length,
            (true, false) => self.get()?,
        };
        let mut lz4_frames = Vec::new();
        if data && tag & LZ4 != 0 {
            let n = self.get()?;
            // at most one LZ4 frame per stored byte (the trailer caps them far lower)
            if n > stored_len.max(1) {
                return Err(bad("more LZ4 frames than payload bytes"));
            }
            for _ in 0..n {
                lz4_frames.push(self.get()?);
            }
        }
        start
            .checked_add(length)
            .ok_or_else(|| bad("frame end overflows"))?;
        header_offset
            .checked_add(HEADER_LEN as u64)
            .ok_or_else(|| bad("header offset overflows"))?;
        let f = if data {
            Frame::data(start, length, header_offset, stored_len, lz4_frames)
        } else {
            Frame::zero(start, length, header_offset)
        };
        self.at = Cursor::after(&f);
        self.left -= 1;
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(
        data: bool,
        start: u64,
        length: u64,
        header: u64,
        stored: u64,
        lz4: Vec<u64>,
    ) -> Frame {
        if data {
            Frame::data(start, length, header, stored, lz4)
        } else {
            Frame::zero(start, length, header)
        }
    }

    #[test]
    fn a_contiguous_run_costs_three_bytes_a_frame() {
        let mut w = FrameLogWriter::new(None).expect("log");
        let mut header = 100;
        for i in 0..1000u64 {
            let f = frame(true, i, 1, header, 1, Vec::new());
            header = f.payload_offset + 3;
            w.push(&f).expect("push");
        }
        let log = w.finish().expect("finish");
        // the first record names its header offset; the rest are tag, length... and start 0
        assert!(log.file.metadata().expect("meta").len() <= 3 * 1000 + 8);
        let back = log.load().expect("load");
        assert_eq!(back.len(), 1000);
        assert_eq!(back[999].start, 999);
        assert_eq!(back[999].header_offset, back[998].payload_offset + 3);
    }

    proptest! {
        #[test]
        fn frames_read_back_as_written(
            raw in prop::collection::vec(
                (any::<bool>(), 0u64..1 << 40, 0u64..1 << 30, 0u64..1 << 40, 0u64..1 << 30,
                 prop::collection::vec(0u64..1 << 24, 0..4), any::<bool>(), any::<bool>()),
                0..64)
        ) {
            let mut w = FrameLogWriter::new(None).expect("log");
            let mut want = Vec::new();
            let mut at = Cursor::default();
            for (data, start, length, header, stored, lz4, follow_h, follow_s) in raw {
                let header = if follow_h { at.header.min(1 << 50) } else { header };
                let start = if follow_s { at.disk.min(1 << 50) } else { start };
                let stored = stored.max(lz4.len() as u64);
                let f = frame(data, start, length, header, stored, lz4);
                w.push(&f).expect("push");
                at = Cursor::after(&f);
                want.push(f);
            }
            let log = w.finish().expect("finish");
            prop_assert_eq!(log.count(), want.len() as u64);
            prop_assert_eq!(log.load().expect("load"), want.clone());
            // two readers at once do not disturb each other
            let (mut a, mut b) = (log.reader(), log.reader());
            for f in &want {
                prop_assert_eq!(a.next_frame().expect("a"), Some(f.clone()));
                prop_assert_eq!(b.next_frame().expect("b"), Some(f.clone()));
            }
            prop_assert!(a.next_frame().expect("end").is_none());
        }
    }
}
