//! Decoding one LZ4 frame of a compressed data payload, streamed and capped.
//!
//! virtnbdbackup writes LZ4 *frame format* (python-lz4 `lz4.frame.compress`): 64 KiB
//! blocks, linked (or independent for inputs of one block), block and content
//! checksums, content size stored. Frames are only decodable from their start, so a
//! reader that needs the tail of an extent still decodes the head and drops it.
//!
//! The frame layer (header, block words, checksums) is parsed here and each block is
//! decoded with lz4_flex's block API, so the xxh32 checksums can be left unchecked
//! when the caller verifies the stored bytes otherwise (the file's `.chksum` adler32
//! in the same pass): they were most of the CPU time of decoding.

use std::hash::Hasher as _;
use std::io::{self, Read, Take};

use lz4_flex::block::{decompress_into, decompress_into_with_dict};
use lz4_flex::frame::FrameDecoder;
use twox_hash::XxHash32;

use crate::error::{Error, ErrorKind, Result};

/// LZ4 frame magic (little-endian on disk).
pub const MAGIC: u32 = 0x184D_2204;
/// How far back a linked block may refer.
const WINDOW: usize = 64 * 1024;
/// Decoded bytes buffered per decoder (besides the window): several blocks, so the
/// window is moved to the front only every few blocks.
const OUT_TARGET: usize = 1 << 20;

/// The fields of an LZ4 frame descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Header length in bytes (magic to header checksum).
    pub len: usize,
    /// Blocks are independent (no references into earlier blocks).
    pub independent: bool,
    /// Each block is followed by the xxh32 of its stored bytes.
    pub block_checksums: bool,
    /// The end mark is followed by the xxh32 of the decoded content.
    pub content_checksum: bool,
    /// Decoded size, when stored.
    pub content_size: Option<u64>,
    /// Largest decoded size of one block.
    pub max_block: usize,
}

/// Parses an LZ4 frame header from the start of `b`. `Ok(None)`: `b` is too short to
/// tell. Checks magic, version, reserved bits, block size and the header checksum;
/// dictionary ids are refused.
pub fn parse_header(b: &[u8]) -> std::result::Result<Option<FrameHeader>, String> {
    if b.len() < 7 {
        return Ok(None);
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(format!("not an LZ4 frame (magic {magic:#010x})"));
    }
    let (flg, bd) = (b[4], b[5]);
    if flg >> 6 != 0b01 {
        return Err(format!("unsupported LZ4 frame version {}", flg >> 6));
    }
    if flg & 0b10 != 0 || bd & 0x8F != 0 {
        return Err("reserved bits set in the LZ4 frame header".into());
    }
    if flg & 0b1 != 0 {
        return Err("LZ4 frames with a dictionary id are not supported".into());
    }
    let max_block = match (bd >> 4) & 0x7 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        n => return Err(format!("invalid LZ4 block size code {n}")),
    };
    let has_size = flg & 0b1000 != 0;
    let len = if has_size { 15 } else { 7 };
    if b.len() < len {
        return Ok(None);
    }
    let content_size = has_size.then(|| {
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[6..14]);
        u64::from_le_bytes(c)
    });
    let hc = (XxHash32::oneshot(0, &b[4..len - 1]) >> 8) as u8;
    if hc != b[len - 1] {
        return Err("LZ4 frame header checksum mismatch".into());
    }
    Ok(Some(FrameHeader {
        len,
        independent: flg & 0b10_0000 != 0,
        block_checksums: flg & 0b1_0000 != 0,
        content_checksum: flg & 0b100 != 0,
        content_size,
        max_block,
    }))
}

/// Streams the decoded bytes of exactly one LZ4 frame of `compressed_len` bytes.
///
/// Reading returns an error (never a panic, never unbounded memory) when the frame is
/// corrupt or would decode to more than `max_decoded` bytes. Call [`finish`](Self::finish)
/// after the last read to check that the frame used all its stored bytes.
///
/// Blocks are decoded with lz4_flex's block decoder; the xxh32 block and content
/// checksums are checked unless [`verify_checksums(false)`](Self::verify_checksums)
/// says the stored bytes are verified otherwise (the `.chksum` adler32 of the file).
/// The header checksum, block sizes and the stored content size are always checked.
pub struct Lz4FrameReader<R: Read> {
    src: Src<R>,
    /// Stored size of the frame.
    stored: u64,
    frame_offset: u64,
    max_decoded: u64,
    decoded: u64,
    verify: bool,
    header: Option<FrameHeader>,
    done: bool,
    /// Stored bytes of one compressed block.
    cbuf: Vec<u8>,
    /// Decoded bytes: `[.. out_start]` history (window), `[out_start, out_end)` not yet
    /// handed out.
    out: Vec<u8>,
    out_start: usize,
    out_end: usize,
    content: Option<XxHash32>,
    /// Decoded bytes buffered besides the window ([`OUT_TARGET`] unless set).
    out_target: usize,
}

/// Decode buffers carried from one [`Lz4FrameReader`] to the next.
#[derive(Debug, Default)]
pub struct Lz4Buffers {
    out: Vec<u8>,
    cbuf: Vec<u8>,
}

/// Checksums verified: lz4_flex's frame decoder (as fast as the block path plus
/// xxh32, measured). Checksums skipped: the block path below.
enum Src<R: Read> {
    Flex(FrameDecoder<Take<R>>),
    Own(Take<R>),
}

impl<R: Read> Src<R> {
    fn get_mut(&mut self) -> &mut Take<R> {
        match self {
            Src::Flex(d) => d.get_mut(),
            Src::Own(t) => t,
        }
    }

    fn limit(&self) -> u64 {
        match self {
            Src::Flex(d) => d.get_ref().limit(),
            Src::Own(t) => t.limit(),
        }
    }

    fn into_inner(self) -> R {
        match self {
            Src::Flex(d) => d.into_inner().into_inner(),
            Src::Own(t) => t.into_inner(),
        }
    }
}

impl<R: Read> std::fmt::Debug for Lz4FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lz4FrameReader")
            .field("frame_offset", &self.frame_offset)
            .field("decoded", &self.decoded)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Lz4FrameReader<R> {
    /// `src` must be positioned at the frame's magic, which is at `frame_offset` in the file.
    pub fn new(src: R, frame_offset: u64, compressed_len: u64, max_decoded: u64) -> Self {
        Self {
            src: Src::Flex(FrameDecoder::new(src.take(compressed_len))),
            stored: compressed_len,
            frame_offset,
            max_decoded,
            decoded: 0,
            verify: true,
            header: None,
            done: false,
            cbuf: Vec::new(),
            out: Vec::new(),
            out_start: 0,
            out_end: 0,
            content: None,
            out_target: OUT_TARGET,
        }
    }

    /// Buffers about `bytes` of decoded data (at least one block) besides the window,
    /// instead of 1 MiB: for a decoder that is kept while others run (a chain's files
    /// read side by side), where memory matters more than moving the window less often.
    /// Only the checksum-skipping path uses it.
    #[must_use]
    pub fn out_target(mut self, bytes: usize) -> Self {
        self.out_target = bytes;
        self
    }

    /// Whether to check the frame's xxh32 block and content checksums (default: yes).
    /// Turn off only when the stored bytes are verified by other means in the same pass.
    #[must_use]
    pub fn verify_checksums(mut self, verify: bool) -> Self {
        self.verify = verify;
        self.src = match self.src {
            Src::Flex(d) if !verify => Src::Own(d.into_inner()),
            Src::Own(t) if verify => Src::Flex(FrameDecoder::new(t)),
            s => s,
        };
        self
    }

    /// Decodes with this crate's block path even while checksums are verified (they
    /// are, block and content, as lz4_flex's frame decoder does): with reused buffers
    /// ([`with_buffers`](Self::with_buffers)) a reader of millions of tiny frames does
    /// not allocate and free megabytes for each (the salvage walk of 4,000,000
    /// one-byte frames: ~75 µs a frame with fresh buffers). Call before reading.
    #[must_use]
    pub fn block_path(mut self) -> Self {
        self.src = match self.src {
            Src::Flex(d) if self.header.is_none() && self.decoded == 0 => Src::Own(d.into_inner()),
            s => s,
        };
        self
    }

    /// The checksum-verifying path: lz4_flex's frame decoder.
    fn read_flex(&mut self, buf: &mut [u8]) -> Option<Result<usize>> {
        let Src::Flex(dec) = &mut self.src else {
            return None;
        };
        // Ask for at most one byte beyond the cap, so an over-long frame is caught
        // without decoding all of it.
        let room = self
            .max_decoded
            .saturating_sub(self.decoded)
            .saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match dec.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "frame is truncated".to_owned()
                } else {
                    e.to_string()
                };
                return Some(Err(self.err(reason)));
            }
        };
        if n == 0 && !buf.is_empty() {
            // lz4_flex takes a source ending inside the header for "no frame"; no
            // complete frame is shorter than 11 bytes (header 7, end mark 4).
            if self.decoded == 0 && self.stored < 11 {
                return Some(Err(self.err("frame is truncated".into())));
            }
            self.done = true;
        }
        self.decoded += n as u64;
        if self.decoded > self.max_decoded {
            return Some(Err(ErrorKind::DecodedLength {
                offset: self.frame_offset,
                expected: self.max_decoded,
                actual: self.decoded,
            }
            .into()));
        }
        Some(Ok(n))
    }

    /// Decodes into buffers left by an earlier reader ([`finish_keep_buffers`](Self::finish_keep_buffers)):
    /// a chain file holds one LZ4 frame per data frame, and fresh megabyte buffers for
    /// each (zero-filled, page-faulted, unmapped again) cost more than decoding small
    /// frames. Only the checksum-skipping path uses them.
    #[must_use]
    pub fn with_buffers(mut self, bufs: Lz4Buffers) -> Self {
        if self.header.is_none() {
            self.out = bufs.out;
            self.cbuf = bufs.cbuf;
        }
        self
    }

    /// Like [`finish`](Self::finish), and hands the decode buffers on to the next
    /// frame's reader ([`with_buffers`](Self::with_buffers)).
    pub fn finish_keep_buffers(mut self) -> (Result<u64>, Lz4Buffers) {
        let bufs = Lz4Buffers {
            out: std::mem::take(&mut self.out),
            cbuf: std::mem::take(&mut self.cbuf),
        };
        (self.finish(), bufs)
    }

    /// Like [`finish_into_inner`](Self::finish_into_inner), and hands the decode
    /// buffers on to the next frame's reader ([`with_buffers`](Self::with_buffers)).
    pub fn finish_into_parts(mut self) -> (R, Result<u64>, Lz4Buffers) {
        let bufs = Lz4Buffers {
            out: std::mem::take(&mut self.out),
            cbuf: std::mem::take(&mut self.cbuf),
        };
        let (r, res) = self.finish_into_inner();
        (r, res, bufs)
    }

    /// Bytes decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Reads the rest of the frame in reads of `step` bytes (the caller still calls
    /// [`finish`](Self::finish) or [`finish_keep_buffers`](Self::finish_keep_buffers)).
    pub fn read_to_vec(&mut self, step: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; step.max(1)];
        loop {
            let n = self.read_decoded(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads up to `buf.len()` decoded bytes; `Ok(0)` at the end of the frame.
    pub fn read_decoded(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(r) = self.read_flex(buf) {
            return r;
        }
        while self.out_start == self.out_end {
            if self.done {
                return Ok(0);
            }
            self.next_block()?;
        }
        let n = buf.len().min(self.out_end - self.out_start);
        buf[..n].copy_from_slice(&self.out[self.out_start..self.out_start + n]);
        self.out_start += n;
        Ok(n)
    }

    /// Checks that the frame ended exactly at its stored length. Returns bytes decoded.
    pub fn finish(self) -> Result<u64> {
        self.finish_into_inner().1
    }

    /// Gives the source back (positioned wherever decoding stopped).
    pub fn into_inner(self) -> R {
        self.src.into_inner()
    }

    /// Like [`finish`](Self::finish), and gives the source back whatever the outcome.
    pub fn finish_into_inner(self) -> (R, Result<u64>) {
        let left = self.src.limit();
        let r = if !self.done || self.out_start != self.out_end {
            Err(self.err("the LZ4 frame was not read to its end".into()))
        } else if left != 0 {
            Err(self.err(format!(
                "LZ4 frame ended {left} bytes before its stored size"
            )))
        } else {
            Ok(self.decoded)
        };
        (self.src.into_inner(), r)
    }

    fn err(&self, reason: String) -> Error {
        ErrorKind::Lz4 {
            offset: self.frame_offset,
            reason,
        }
        .into()
    }

    fn read_src(&mut self, range: std::ops::Range<usize>, into_out: bool) -> Result<()> {
        let buf = if into_out {
            &mut self.out[range]
        } else {
            &mut self.cbuf[range]
        };
        match self.src.get_mut().read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.err("frame is truncated".into()))
            }
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    fn read_u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        match self.src.get_mut().read_exact(&mut b) {
            Ok(()) => Ok(u32::from_le_bytes(b)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.err("frame is truncated".into()))
            }
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    fn read_header(&mut self) -> Result<FrameHeader> {
        let mut b = [0u8; 15];
        self.read_src_small(&mut b[..7])?;
        let h = match parse_header(&b[..7]).map_err(|r| self.err(r))? {
            Some(h) => h,
            None => {
                self.read_src_small(&mut b[7..15])?;
                parse_header(&b)
                    .map_err(|r| self.err(r))?
                    .ok_or_else(|| self.err("frame is truncated".into()))?
            }
        };
        // Room for the window and several blocks, but never more than the frame can
        // decode to.
        let k = (self.out_target / h.max_block).max(1);
        let mut cap = h.max_block * k + if h.independent { 0 } else { WINDOW };
        let limit = h.content_size.unwrap_or(u64::MAX).min(self.max_decoded);
        if let Ok(l) = usize::try_from(limit.saturating_add(1)) {
            cap = cap.min(l);
        }
        // Reused buffers keep their old bytes: every byte of `out` handed out or used
        // as history is written by this frame first, and `cbuf` holds one block's
        // stored bytes, read before use.
        let cblen = h
            .max_block
            .min(usize::try_from(self.src.limit()).unwrap_or(usize::MAX));
        for (v, n) in [(&mut self.out, cap), (&mut self.cbuf, cblen)] {
            v.truncate(n);
            v.resize(n, 0);
        }
        if self.verify && h.content_checksum {
            self.content = Some(XxHash32::with_seed(0));
        }
        self.header = Some(h);
        Ok(h)
    }

    fn read_src_small(&mut self, b: &mut [u8]) -> Result<()> {
        match self.src.get_mut().read_exact(b) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.err("frame is truncated".into()))
            }
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    /// Decodes the next block into `out[out_start..out_end]`, or reads the end mark.
    fn next_block(&mut self) -> Result<()> {
        let h = match self.header {
            Some(h) => h,
            None => self.read_header()?,
        };
        let word = self.read_u32()?;
        if word == 0 {
            return self.end_mark(h);
        }
        let stored = (word & 0x7FFF_FFFF) as usize;
        let raw = word & 0x8000_0000 != 0;
        if stored > h.max_block {
            return Err(self.err(format!(
                "LZ4 block of {stored} bytes exceeds the frame's block size {}",
                h.max_block
            )));
        }
        if stored as u64 > self.src.limit() || (!raw && stored > self.cbuf.len()) {
            return Err(self.err("frame is truncated".into()));
        }
        // Most a block may still decode to: the block size, the content size, the cap.
        let left = h
            .content_size
            .unwrap_or(u64::MAX)
            .min(self.max_decoded.saturating_add(1))
            .saturating_sub(self.decoded);
        let room = h.max_block.min(usize::try_from(left).unwrap_or(usize::MAX));
        // Where the block goes: after the history, or (when full) after the window
        // moved to the front.
        let mut pos = self.out_end;
        if pos + room > self.out.len() {
            let keep = if h.independent { 0 } else { pos.min(WINDOW) };
            if keep + room > self.out.len() {
                // Only possible when the content is larger than announced.
                return Err(self.over_length(h));
            }
            self.out.copy_within(pos - keep..pos, 0);
            pos = keep;
        }
        let n = if raw {
            if stored > room {
                return Err(self.over_length(h));
            }
            self.read_src(pos..pos + stored, true)?;
            if h.block_checksums {
                let sum = self.read_u32()?;
                if self.verify && XxHash32::oneshot(0, &self.out[pos..pos + stored]) != sum {
                    return Err(self.err("LZ4 block checksum mismatch".into()));
                }
            }
            stored
        } else {
            self.read_src(0..stored, false)?;
            if h.block_checksums {
                let sum = self.read_u32()?;
                if self.verify && XxHash32::oneshot(0, &self.cbuf[..stored]) != sum {
                    return Err(self.err("LZ4 block checksum mismatch".into()));
                }
            }
            let dict_from = if h.independent {
                pos
            } else {
                pos.saturating_sub(WINDOW)
            };
            let (hist, rest) = self.out.split_at_mut(pos);
            let input = &self.cbuf[..stored];
            let r = if dict_from == pos {
                decompress_into(input, &mut rest[..room])
            } else {
                decompress_into_with_dict(input, &mut rest[..room], &hist[dict_from..])
            };
            match r {
                Ok(n) => n,
                Err(lz4_flex::block::DecompressError::OutputTooSmall { .. })
                    if room < h.max_block =>
                {
                    return Err(self.over_length(h));
                }
                Err(e) => return Err(self.err(format!("corrupt LZ4 block: {e}"))),
            }
        };
        self.decoded += n as u64;
        if self.decoded > self.max_decoded {
            return Err(ErrorKind::DecodedLength {
                offset: self.frame_offset,
                expected: self.max_decoded,
                actual: self.decoded,
            }
            .into());
        }
        if let Some(c) = &mut self.content {
            c.write(&self.out[pos..pos + n]);
        }
        self.out_start = pos;
        self.out_end = pos + n;
        Ok(())
    }

    /// The error for a block that decodes beyond the content size or the cap.
    fn over_length(&self, h: FrameHeader) -> Error {
        match h.content_size {
            Some(c) if c <= self.max_decoded => self.err(format!(
                "LZ4 frame decodes to more than its content size {c}"
            )),
            _ => ErrorKind::DecodedLength {
                offset: self.frame_offset,
                expected: self.max_decoded,
                actual: self.max_decoded.saturating_add(1),
            }
            .into(),
        }
    }

    fn end_mark(&mut self, h: FrameHeader) -> Result<()> {
        if let Some(c) = h.content_size {
            if c != self.decoded {
                return Err(self.err(format!(
                    "LZ4 frame decoded to {} bytes, its header says {c}",
                    self.decoded
                )));
            }
        }
        if h.content_checksum {
            let sum = self.read_u32()?;
            if let Some(c) = &self.content {
                if c.finish_32() != sum {
                    return Err(self.err("LZ4 content checksum mismatch".into()));
                }
            }
        }
        self.done = true;
        Ok(())
    }
}

/// The stored length of the LZ4 frame at the current position of `src` (file offset
/// `frame_offset`), from its header and block words alone: no block is decoded. This
/// is what a trailer entry records, for a payload whose trailer is lost (a truncated
/// or interrupted compressed stream). At most `available` bytes are looked at; the
/// position of `src` afterwards is unspecified.
///
/// # Errors
/// [`ErrorKind::TruncatedPayload`] when the frame needs more than `available` bytes
/// (`expected`: the bytes it needs so far), [`ErrorKind::Lz4`] for an invalid header
/// or block word, [`ErrorKind::Io`] when reading fails.
pub fn frame_len<R: Read + io::Seek>(
    src: &mut R,
    frame_offset: u64,
    available: u64,
) -> Result<u64> {
    let short = |need: u64| -> Error {
        ErrorKind::TruncatedPayload {
            offset: frame_offset,
            expected: need,
            got: available,
        }
        .into()
    };
    let bad = |reason: String| -> Error {
        ErrorKind::Lz4 {
            offset: frame_offset,
            reason,
        }
        .into()
    };
    let io_err =
        |at: u64| move |e: io::Error| -> Error { crate::error::io_at(frame_offset + at)(e) };
    let mut b = [0u8; 15];
    if available < 7 {
        return Err(short(7));
    }
    src.read_exact(&mut b[..7]).map_err(io_err(0))?;
    let h = match parse_header(&b[..7]).map_err(bad)? {
        Some(h) => h,
        None => {
            if available < 15 {
                return Err(short(15));
            }
            src.read_exact(&mut b[7..15]).map_err(io_err(7))?;
            parse_header(&b).map_err(bad)?.ok_or_else(|| short(15))?
        }
    };
    let mut pos = h.len as u64;
    loop {
        if pos + 4 > available {
            return Err(short(pos + 4));
        }
        let mut w = [0u8; 4];
        src.read_exact(&mut w).map_err(io_err(pos))?;
        pos += 4;
        let word = u32::from_le_bytes(w);
        if word == 0 {
            if h.content_checksum {
                pos += 4;
            }
            return if pos > available {
                Err(short(pos))
            } else {
                Ok(pos)
            };
        }
        let stored = u64::from(word & 0x7FFF_FFFF);
        if stored > h.max_block as u64 {
            return Err(bad(format!(
                "LZ4 block of {stored} bytes exceeds the frame's block size {}",
                h.max_block
            )));
        }
        let skip = stored + if h.block_checksums { 4 } else { 0 };
        if pos + skip > available {
            return Err(short(pos + skip));
        }
        // `skip` is at most 4 MiB + 4: it fits an i64
        src.seek(io::SeekFrom::Current(skip as i64))
            .map_err(io_err(pos))?;
        pos += skip;
    }
}

/// Decodes a whole LZ4 frame held in memory (at most `max_decoded` bytes of output).
pub fn decode_frame(src: &[u8], frame_offset: u64, max_decoded: u64) -> Result<Vec<u8>> {
    let mut r = Lz4FrameReader::new(src, frame_offset, src.len() as u64, max_decoded);
    let out = r.read_to_vec(64 * 1024)?;
    r.finish()?;
    Ok(out)
}

/// Encodes `data` as one LZ4 frame with virtnbdbackup's settings (block and content
/// checksums, content size, 64 KiB blocks; linked blocks above one block).
#[cfg(any(test, feature = "writer"))]
pub fn encode_frame(data: &[u8]) -> Vec<u8> {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    use std::io::Write;
    let mode = if data.len() > 64 * 1024 {
        BlockMode::Linked
    } else {
        BlockMode::Independent
    };
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(mode)
        .block_checksums(true)
        .content_checksum(true)
        .content_size(Some(data.len() as u64));
    let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
    // Writing into a Vec cannot fail.
    enc.write_all(data).expect("invariant: writing to a Vec");
    enc.finish().expect("invariant: writing to a Vec")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_caps() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let f = encode_frame(&data);
        assert_eq!(
            decode_frame(&f, 0, data.len() as u64).expect("decodes"),
            data
        );
        let e = decode_frame(&f, 5, 1000).expect_err("over cap");
        assert!(matches!(
            e.kind(),
            ErrorKind::DecodedLength { offset: 5, .. }
        ));
    }

    #[test]
    fn frame_len_walks_blocks_without_decoding() {
        for data in [
            vec![7u8; 100],
            (0..300_000u32)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<u8>>(),
            Vec::new(),
        ] {
            let f = encode_frame(&data);
            let mut buf = f.clone();
            buf.extend_from_slice(b"\r\ndata ...");
            let mut c = std::io::Cursor::new(&buf);
            assert_eq!(
                frame_len(&mut c, 0, buf.len() as u64).expect("measured"),
                f.len() as u64
            );
            // every prefix is too short, never a wrong length
            for cut in [0, 6, 7, 14, 15, f.len() / 2, f.len() - 1] {
                let mut c = std::io::Cursor::new(&f[..cut]);
                let e = frame_len(&mut c, 9, cut as u64).expect_err("short");
                assert!(
                    matches!(e.kind(), ErrorKind::TruncatedPayload { offset: 9, .. }),
                    "{e}"
                );
            }
        }
        let mut f = encode_frame(&[1u8; 1000]);
        f[0] ^= 1;
        let mut c = std::io::Cursor::new(&f);
        let e = frame_len(&mut c, 3, f.len() as u64).expect_err("magic");
        assert!(matches!(e.kind(), ErrorKind::Lz4 { offset: 3, .. }), "{e}");
    }

    #[test]
    fn corrupt_and_truncated_frames_fail() {
        let data = vec![7u8; 100_000];
        let mut f = encode_frame(&data);
        let mid = f.len() / 2;
        f[mid] ^= 0x40;
        assert!(decode_frame(&f, 0, 200_000).is_err());
        let f = encode_frame(&data);
        let e = decode_frame(&f[..f.len() - 3], 11, 200_000).expect_err("truncated");
        assert_eq!(e.offset(), Some(11));
        // trailing bytes after a complete frame inside the stored size
        let mut g = encode_frame(&data);
        g.extend_from_slice(&[0, 0, 0]);
        assert!(decode_frame(&g, 0, 200_000).is_err());
    }

    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    use proptest::prelude::*;
    use std::io::Write;

    fn encode(data: &[u8], bs: BlockSize, linked: bool, bc: bool, cc: bool, cs: bool) -> Vec<u8> {
        let info = FrameInfo::new()
            .block_size(bs)
            .block_mode(if linked {
                BlockMode::Linked
            } else {
                BlockMode::Independent
            })
            .block_checksums(bc)
            .content_checksum(cc)
            .content_size(cs.then_some(data.len() as u64));
        let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(data).expect("vec");
        enc.finish().expect("vec")
    }

    /// Decodes with reads of `step` bytes.
    fn decode(f: &[u8], max: u64, verify: bool, step: usize) -> Result<Vec<u8>> {
        let mut r = Lz4FrameReader::new(f, 3, f.len() as u64, max).verify_checksums(verify);
        let out = r.read_to_vec(step)?;
        r.finish()?;
        // the block path verifies the same way
        let mut b = Lz4FrameReader::new(f, 3, f.len() as u64, max)
            .verify_checksums(verify)
            .block_path()
            .with_buffers(Lz4Buffers::default());
        let same = b.read_to_vec(step)?;
        b.finish()?;
        assert_eq!(same, out, "block path and frame decoder disagree");
        Ok(out)
    }

    /// Compressible data with long-distance repeats (exercises linked blocks).
    fn data_from(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 4 {
                0 if v.len() > 70_000 => {
                    let back = 1 + (x >> 8) as usize % 65_535;
                    let n = 4 + (x >> 32) as usize % 300;
                    for _ in 0..n {
                        let b = v[v.len() - back];
                        v.push(b);
                    }
                }
                1 => v.extend(std::iter::repeat_n(
                    (x >> 40) as u8,
                    (x >> 20) as usize % 200,
                )),
                _ => v.extend_from_slice(&x.to_le_bytes()),
            }
        }
        v.truncate(len);
        v
    }

    fn block_size(i: u8) -> BlockSize {
        match i % 4 {
            0 => BlockSize::Max64KB,
            1 => BlockSize::Max256KB,
            2 => BlockSize::Max1MB,
            _ => BlockSize::Max4MB,
        }
    }

    #[test]
    fn every_frame_layout_roundtrips() {
        let data = data_from(9, 700_000);
        for bs in 0..4 {
            for flags in 0..16u8 {
                let (linked, bc, cc, cs) = (
                    flags & 1 != 0,
                    flags & 2 != 0,
                    flags & 4 != 0,
                    flags & 8 != 0,
                );
                let f = encode(&data, block_size(bs), linked, bc, cc, cs);
                for verify in [true, false] {
                    let got = decode(&f, data.len() as u64, verify, 100_003).expect("decodes");
                    assert!(got == data, "bs {bs} flags {flags:04b} verify {verify}");
                }
            }
        }
        // empty content, incompressible (stored) blocks
        let f = encode(&[], BlockSize::Max64KB, true, true, true, true);
        assert!(decode(&f, 0, true, 10).expect("empty").is_empty());
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let f = encode(&noise, BlockSize::Max64KB, true, true, true, false);
        assert_eq!(decode(&f, 200_000, true, 65_536).expect("stored"), noise);
    }

    #[test]
    fn checksums_are_checked_only_when_asked() {
        let data = data_from(3, 200_000);
        let f = encode(&data, BlockSize::Max64KB, true, true, true, true);
        // Flip a block checksum byte (the first block's checksum follows its data).
        let h = parse_header(&f).expect("header").expect("complete");
        let first = u32::from_le_bytes([f[h.len], f[h.len + 1], f[h.len + 2], f[h.len + 3]]);
        let at = h.len + 4 + (first & 0x7FFF_FFFF) as usize;
        let mut g = f.clone();
        g[at] ^= 1;
        let e = decode(&g, 200_000, true, 4096).expect_err("block checksum");
        assert_eq!(e.offset(), Some(3));
        assert_eq!(decode(&g, 200_000, false, 4096).expect("unchecked"), data);
        // Content checksum: the last 4 bytes.
        let mut g = f.clone();
        let last = g.len() - 1;
        g[last] ^= 0x80;
        let e = decode(&g, 200_000, true, 4096).expect_err("content checksum");
        assert_eq!(e.offset(), Some(3));
        assert_eq!(decode(&g, 200_000, false, 4096).expect("unchecked"), data);
        // The header checksum and the content size are always checked.
        let mut g = f.clone();
        g[h.len - 1] ^= 1;
        assert!(decode(&g, 200_000, false, 4096).is_err());
        let mut g = f;
        g[6] ^= 1; // content size, header checksum fixed up
        let hc = (XxHash32::oneshot(0, &g[4..h.len - 1]) >> 8) as u8;
        g[h.len - 1] = hc;
        let e = decode(&g, 400_000, false, 4096).expect_err("content size");
        assert_eq!(e.offset(), Some(3));
    }

    #[test]
    fn bad_headers_fail() {
        let f = encode(
            b"hello hello hello",
            BlockSize::Max64KB,
            false,
            true,
            true,
            true,
        );
        for (i, x) in [
            (0usize, 1u8),
            (4, 0x40),
            (4, 0x80),
            (4, 0x02),
            (4, 0x01),
            (5, 0x80),
            (5, 0x30),
            (5, 0x01),
        ] {
            let mut g = f.clone();
            g[i] ^= x;
            for verify in [true, false] {
                assert!(decode(&g, 100, verify, 7).is_err(), "byte {i} ^ {x:#x}");
            }
        }
        for cut in 1..f.len() {
            let e = decode(&f[..cut], 100, false, 7).expect_err("truncated");
            assert_eq!(e.offset(), Some(3));
            // lz4_flex (the verifying path) takes a frame cut at a block boundary (blocks or
            // end mark missing) for a whole one; the callers check the decoded length.
            match decode(&f[..cut], 100, true, 7) {
                Err(e) => assert_eq!(e.offset(), Some(3)),
                Ok(out) => assert!(out.len() <= 17, "cut {cut}"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_roundtrip(seed in any::<u64>(), len in 0usize..600_000, bs in 0u8..4,
                          flags in 0u8..16, step in 1usize..200_000) {
            let data = data_from(seed, len);
            let f = encode(&data, block_size(bs), flags & 1 != 0, flags & 2 != 0,
                           flags & 4 != 0, flags & 8 != 0);
            prop_assert_eq!(decode(&f, len as u64, true, step).expect("decodes"), data.clone());
            prop_assert_eq!(decode(&f, len as u64, false, step).expect("decodes"), data);
            if len > 0 {
                let r = decode(&f, len as u64 - 1, true, step);
                prop_assert!(r.is_err());
            }
        }

        /// Frames decoded one after the other with the buffers carried over (as a
        /// restore does) give what fresh readers give, whatever the previous frame's block
        /// size, length, history or failure left in them.
        #[test]
        fn prop_carried_buffers_match_fresh(
            frames in proptest::collection::vec(
                (any::<u64>(), 0usize..200_000, 0u8..4, 0u8..16, any::<bool>()), 1..6),
            step in 1usize..100_000,
        ) {
            let mut bufs = Lz4Buffers::default();
            for (seed, len, bs, flags, corrupt) in frames {
                let data = data_from(seed, len);
                let mut f = encode(&data, block_size(bs), flags & 1 != 0, flags & 2 != 0,
                                   flags & 4 != 0, flags & 8 != 0);
                if corrupt {
                    let i = (seed as usize) % f.len();
                    f[i] ^= 0x5a;
                }
                let fresh = decode(&f, len as u64, false, step);
                let mut r = Lz4FrameReader::new(&f[..], 3, f.len() as u64, len as u64)
                    .verify_checksums(false)
                    .with_buffers(std::mem::take(&mut bufs));
                let carried = r.read_to_vec(step);
                let (done, b) = r.finish_keep_buffers();
                bufs = b;
                let carried = carried.and_then(|out| done.map(|_| out));
                match (fresh, carried) {
                    (Ok(a), Ok(b)) => {
                        prop_assert_eq!(&a, &b);
                        if !corrupt {
                            prop_assert_eq!(&a, &data);
                        }
                    }
                    (Err(_), Err(_)) => {}
                    (a, b) => prop_assert!(false, "fresh {:?} vs carried {:?}", a.map(|v| v.len()), b.map(|v| v.len())),
                }
            }
        }

        /// Corrupted frames: an error or (checksums off) some output within the cap,
        /// never a panic; with both checksums on, never wrong data.
        #[test]
        fn prop_corrupt_never_panics(seed in any::<u64>(), len in 1usize..300_000, bs in 0u8..2,
                                     flags in 0u8..16, edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                                     cut in any::<usize>()) {
            let data = data_from(seed, len);
            let mut f = encode(&data, block_size(bs), flags & 1 != 0, flags & 2 != 0,
                               flags & 4 != 0, flags & 8 != 0);
            for (at, x) in edits {
                let i = at % f.len();
                f[i] ^= x.max(1);
            }
            if cut % 3 == 0 {
                let keep = cut % (f.len() + 1);
                f.truncate(keep);
            }
            for verify in [true, false] {
                if let Ok(out) = decode(&f, 2 * len as u64, verify, 65_536) {
                    prop_assert!(out.len() <= 2 * len);
                    if verify && flags & 6 == 6 {
                        prop_assert_eq!(&out, &data);
                    }
                }
            }
        }

        #[test]
        fn prop_random_bytes_never_panic(mut b in proptest::collection::vec(any::<u8>(), 0..2000), hdr in any::<bool>()) {
            if hdr && b.len() >= 7 {
                b[..4].copy_from_slice(&MAGIC.to_le_bytes());
                b[4] = (b[4] & 0x3C) | 0x40;
                b[5] &= 0x70;
                b[5] |= 0x40;
            }
            for verify in [true, false] {
                let _ = decode(&b, 1 << 20, verify, 1000);
            }
        }
    }
}
