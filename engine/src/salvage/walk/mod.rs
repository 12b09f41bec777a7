//! The tolerant pass over one stream file: every frame header is checked, every
//! payload read (LZ4 payloads decoded with their block and content checksums), and
//! damage ends the file there instead of failing the restore. Where the damaged
//! frame's stored length can still be trusted (the header parsed; for LZ4, the
//! trailer is intact and agreed so far) and the next header is where it should be,
//! only that frame is given up. Nothing is written here: the frames that passed go
//! into an ordinary [`DiskPlan`](crate::DiskPlan) and are read again by the apply.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use nbdfmt::meta::MAX_META_LEN;
use nbdfmt::reader::TrailerReader;
use nbdfmt::{FrameHeader, FrameKind, PreadBuf, StreamMeta, HEADER_LEN};

use crate::cancel::Cancel;
use crate::error::Result;
use crate::framelog::{FrameLog, FrameLogWriter};

mod body;
mod frames;

/// How a file is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Harm {
    /// It ends early.
    Truncated,
    /// Its bytes are wrong (or unreadable).
    Corrupt,
}

/// One place where a file is damaged.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub harm: Harm,
    /// File offset.
    pub offset: u64,
    pub reason: String,
}

/// A data frame whose header was read but whose payload is lost: disk range and why.
#[derive(Debug, Clone)]
pub(crate) struct LostFrame {
    pub start: u64,
    pub len: u64,
    pub why: String,
}

/// The file's `.chksum`, against the file as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Checksum {
    /// No `.chksum`.
    None,
    /// It matches.
    Ok(u32),
    /// It does not.
    Mismatch { stored: u32, computed: u32 },
    /// It cannot be read or parsed (or the file cannot be read to its end).
    Unusable(String),
}

/// What the pass found.
#[derive(Debug)]
pub(crate) struct Walk {
    /// The meta frame, when readable.
    pub meta: Option<StreamMeta>,
    /// Frames that passed (data and zero), in file order, on disk.
    pub frames: FrameLog,
    /// Data frames given up.
    pub lost: Vec<LostFrame>,
    /// Disk offset from which the file's frames are unknown (the pass stopped there).
    pub unknown_from: Option<u64>,
    /// Disk ranges `[start, end)` a frame with an untrusted header may have covered
    /// (the pass went on after it).
    pub unknown: Vec<(u64, u64)>,
    /// Damage, first found first.
    pub faults: Vec<Fault>,
    /// Why the frames that passed cannot be trusted either (a header lies).
    pub suspect: Option<String>,
    /// The `.chksum` outcome.
    pub checksum: Checksum,
    /// File size.
    pub file_size: u64,
}

impl Found {
    fn fault(&mut self, harm: Harm, offset: u64, reason: impl Into<String>) {
        self.faults.push(Fault {
            harm,
            offset,
            reason: reason.into(),
        });
    }
}

/// A payload that could not be taken: the damage, and whether it is the file's end.
struct PayloadFault {
    truncated: bool,
    offset: u64,
    reason: String,
}

/// Damaged places one file may have before the rest of it is given up: each one is
/// a few claims and reasons in memory (~300 bytes), so a file of millions of damaged
/// frames costs ~3 MB, not gigabytes — and one corrupt payload in 2,000 of a
/// 4,000,000-frame file is still stepped over every time.
pub(crate) const MAX_FAULTS: usize = 10_000;

/// Position unknown: the next read seeks.
const LOST_POS: u64 = u64::MAX;

struct Walker<'a> {
    r: BufReader<File>,
    /// Position of `r` (or [`LOST_POS`]).
    pos: u64,
    size: u64,
    cancel: &'a Cancel,
    scratch: Vec<u8>,
    /// LZ4 decode buffers, kept from one frame to the next.
    lz4_bufs: nbdfmt::lz4::Lz4Buffers,
    /// Where the frames that passed go.
    log: FrameLogWriter,
    out: Found,
}

/// What the pass found, but the frames (which go to the log).
#[derive(Debug)]
pub(crate) struct Found {
    pub meta: Option<StreamMeta>,
    pub lost: Vec<LostFrame>,
    pub unknown_from: Option<u64>,
    pub unknown: Vec<(u64, u64)>,
    pub faults: Vec<Fault>,
    pub suspect: Option<String>,
}

/// Walks the stream file at `path`, its good frames logged in a file in `spill` (the
/// temporary directory when `None`). Only a cancellation or a log that cannot be
/// written is an error: everything else the file does wrong is in the [`Walk`].
pub(crate) fn walk(path: &Path, spill: Option<&Path>, cancel: &Cancel) -> Result<Walk> {
    let mut out = Found {
        meta: None,
        lost: Vec::new(),
        unknown_from: None,
        unknown: Vec::new(),
        faults: Vec::new(),
        suspect: None,
    };
    let log = FrameLogWriter::new(spill)?;
    let (out, log, file_size) = match File::open(path) {
        Err(e) => {
            out.fault(Harm::Corrupt, 0, format!("cannot be opened: {e}"));
            out.unknown_from = Some(0);
            (out, log, 0)
        }
        Ok(f) => {
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            let mut w = Walker {
                size,
                r: BufReader::with_capacity(1 << 20, f),
                pos: 0,
                cancel,
                scratch: vec![0u8; 1 << 20],
                lz4_bufs: nbdfmt::lz4::Lz4Buffers::default(),
                log,
                out,
            };
            match w.meta() {
                Some((meta, body_start)) => {
                    w.body(&meta, body_start)?;
                    w.out.meta = Some(meta);
                }
                None => w.out.unknown_from = Some(0),
            }
            (w.out, w.log, size)
        }
    };
    Ok(Walk {
        meta: out.meta,
        frames: log.finish()?,
        lost: out.lost,
        unknown_from: out.unknown_from,
        unknown: out.unknown,
        faults: out.faults,
        suspect: out.suspect,
        checksum: checksum(path, cancel)?,
        file_size,
    })
}

impl Walker<'_> {
    fn goto(&mut self, off: u64) -> io::Result<()> {
        if self.pos == off {
            return Ok(());
        }
        match i64::try_from(i128::from(off) - i128::from(self.pos)) {
            Ok(delta) if self.pos != LOST_POS => self.r.seek_relative(delta)?,
            _ => {
                self.r.seek(SeekFrom::Start(off))?;
            }
        }
        self.pos = off;
        Ok(())
    }

    /// Learns where the reader is after someone else moved it.
    fn sync_pos(&mut self) {
        self.pos = self.r.stream_position().unwrap_or(LOST_POS);
    }

    /// Fills `buf` from file offset `off`; the bytes read (short only at the end).
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.goto(off)?;
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.pos = LOST_POS;
                    return Err(e);
                }
            }
        }
        self.pos = off + got as u64;
        Ok(got)
    }

    /// The meta frame and where the body starts, or `None` (the fault recorded).
    fn meta(&mut self) -> Option<(StreamMeta, u64)> {
        let mut hdr = [0u8; HEADER_LEN];
        let got = match self.read_at(0, &mut hdr) {
            Ok(n) => n,
            Err(e) => {
                self.out.fault(Harm::Corrupt, 0, format!("I/O error: {e}"));
                return None;
            }
        };
        if got < HEADER_LEN {
            self.out.fault(
                Harm::Truncated,
                0,
                format!("the file ends inside the meta header ({got} bytes)"),
            );
            return None;
        }
        let h = match FrameHeader::parse(&hdr, 0) {
            Ok(h) if h.kind == FrameKind::Meta && h.length <= MAX_META_LEN => h,
            Ok(_) => {
                self.out.fault(
                    Harm::Corrupt,
                    0,
                    "the file does not start with a meta frame",
                );
                return None;
            }
            Err(e) => {
                self.out.fault(Harm::Corrupt, 0, e.kind().to_string());
                return None;
            }
        };
        let json_off = HEADER_LEN as u64;
        // capped by MAX_META_LEN above
        let mut json = vec![0u8; h.length as usize + 2];
        let got = match self.read_at(json_off, &mut json) {
            Ok(n) => n,
            Err(e) => {
                self.out
                    .fault(Harm::Corrupt, json_off, format!("I/O error: {e}"));
                return None;
            }
        };
        if got < json.len() {
            self.out.fault(
                Harm::Truncated,
                json_off,
                "the file ends inside the meta JSON",
            );
            return None;
        }
        let meta = match StreamMeta::parse(&json[..h.length as usize], json_off) {
            Ok(m) => m,
            Err(e) => {
                self.out
                    .fault(Harm::Corrupt, json_off, e.kind().to_string());
                return None;
            }
        };
        if &json[h.length as usize..] != b"\r\n" {
            self.out.fault(
                Harm::Corrupt,
                json_off + h.length,
                "no CR LF after the meta JSON",
            );
            return None;
        }
        Some((meta, json_off + h.length + 2))
    }
}

/// Entry `i` of the trailer, when there is one and it can still be read.
fn entry(t: &mut Option<TrailerReader<PreadBuf>>, i: usize) -> Option<nbdfmt::TrailerEntry> {
    t.as_mut()?.get(i).ok().flatten().cloned()
}

impl Walker<'_> {
    /// The compression trailer, read through its own descriptor (the walk's buffer
    /// stays where the frames are).
    fn trailer(&mut self, body_start: u64) -> nbdfmt::Result<TrailerReader<PreadBuf>> {
        let f = self.r.get_ref().try_clone().map_err(|e| {
            nbdfmt::Error::from(nbdfmt::ErrorKind::Io {
                offset: body_start,
                source: e,
            })
        })?;
        TrailerReader::open(PreadBuf::new(f, 64 << 10), self.size, body_start)
    }
}

/// The file against its `.chksum` (read in pieces, so a cancel is seen).
fn checksum(path: &Path, cancel: &Cancel) -> Result<Checksum> {
    let stored = match nbdfmt::checksum::stored_checksum(path) {
        Ok(None) => return Ok(Checksum::None),
        Ok(Some(s)) => s,
        Err(e) => return Ok(Checksum::Unusable(e.to_string())),
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Ok(Checksum::Unusable(format!("cannot be read: {e}"))),
    };
    let mut h = simd_adler32::Adler32::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        cancel.check()?;
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.write(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Ok(Checksum::Unusable(format!(
                    "cannot be read to its end: {e}"
                )))
            }
        }
    }
    let computed = h.finish();
    Ok(if computed == stored {
        Checksum::Ok(stored)
    } else {
        Checksum::Mismatch { stored, computed }
    })
}
