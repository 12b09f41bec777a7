//! `StreamReader`: walks the frames of one sparse stream, validating as it goes, and
//! streams data payloads (raw or LZ4) in caller-sized pieces with bounded memory.
//!
//! What it enforces (virtnbdrestore checks none of it): the first frame is `meta`;
//! every header is well formed; data/zero frames strictly increase, never overlap and
//! stay inside `virtualSize`; payloads are complete and followed by CR LF; the data
//! lengths add up to `dataSize`; a compressed stream has exactly one trailer entry per
//! data frame and each payload decodes to exactly its header length; `stop` ends the
//! body exactly where the trailer (or the file) begins.

use std::io::{self, Read, Seek, SeekFrom};

use crate::error::{io_at, Error, ErrorKind, Result};
use crate::frame::{FrameHeader, FrameKind, HEADER_LEN};
use crate::lz4::Lz4FrameReader;
use crate::meta::{StreamMeta, MAX_META_LEN};
use crate::trailer::{parse_trailer, TrailerCursor, TrailerEntry, MAX_TRAILER_LEN};

const CRLF: &[u8; 2] = b"\r\n";

/// A data or zero frame as found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// `Data` or `Zero`.
    pub kind: FrameKind,
    /// Disk offset.
    pub start: u64,
    /// Disk length (uncompressed).
    pub length: u64,
    /// File offset of the 40-byte header.
    pub header_offset: u64,
    /// File offset of the payload (data frames; equals the next byte for zero frames).
    pub payload_offset: u64,
    /// Bytes of payload stored in the file (0 for zero frames).
    pub stored_len: u64,
    /// For compressed data frames: the size of each LZ4 frame of the payload.
    pub lz4_frames: Vec<u64>,
}

impl Frame {
    /// A zero frame whose 40-byte header is at `header_offset`.
    pub fn zero(start: u64, length: u64, header_offset: u64) -> Frame {
        Frame {
            kind: FrameKind::Zero,
            start,
            length,
            header_offset,
            payload_offset: header_offset.saturating_add(HEADER_LEN as u64),
            stored_len: 0,
            lz4_frames: Vec::new(),
        }
    }

    /// A data frame whose header is at `header_offset`, its payload of `stored_len`
    /// bytes (in `lz4_frames` LZ4 frames when compressed) right after it.
    pub fn data(
        start: u64,
        length: u64,
        header_offset: u64,
        stored_len: u64,
        lz4_frames: Vec<u64>,
    ) -> Frame {
        Frame {
            kind: FrameKind::Data,
            start,
            length,
            header_offset,
            payload_offset: header_offset.saturating_add(HEADER_LEN as u64),
            stored_len,
            lz4_frames,
        }
    }

    /// End of the disk range.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

struct Payload {
    payload_offset: u64,
    length: u64,
    /// Next disk offset to hand out.
    disk_pos: u64,
    /// Next stored byte to read.
    file_pos: u64,
    /// Uncompressed: stored bytes left.
    raw_left: u64,
    /// Compressed: LZ4 frames not yet started.
    lz4_left: std::collections::VecDeque<u64>,
    /// Compressed: size of the LZ4 frame being decoded.
    lz4_current: u64,
    decoded: u64,
}

/// The compression trailer of an open stream: validated and counted at open, then read
/// one entry per data frame (no memory per frame).
#[derive(Debug)]
struct Trailer {
    /// File offset of the JSON.
    json_off: u64,
    /// Entries in the trailer.
    count: usize,
    cursor: TrailerCursor,
}

/// Reads one stream file frame by frame. See the module docs for what it checks.
pub struct StreamReader<R: Read + Seek> {
    src: Option<R>,
    lz4: Option<Lz4FrameReader<R>>,
    meta: StreamMeta,
    meta_len: u64,
    file_size: u64,
    body_end: u64,
    trailer: Option<Trailer>,
    next_header: u64,
    crlf_before_header: bool,
    payload: Option<Payload>,
    data_frames: usize,
    prev_end: u64,
    data_sum: u64,
    finished: bool,
}

impl<R: Read + Seek> std::fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("disk", &self.meta.disk_name)
            .field("next_header", &self.next_header)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

fn read_at<R: Read + Seek>(src: &mut R, offset: u64, buf: &mut [u8]) -> Result<usize> {
    src.seek(SeekFrom::Start(offset)).map_err(io_at(offset))?;
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_at(offset + got as u64)(e)),
        }
    }
    Ok(got)
}

impl<R: Read + Seek> StreamReader<R> {
    /// Reads the meta frame (and, for compressed streams, the trailer at the end of the
    /// file) and positions before the first body frame.
    pub fn open(mut src: R) -> Result<Self> {
        let file_size = src.seek(SeekFrom::End(0)).map_err(io_at(0))?;
        let h = meta_header(&mut src)?;
        let json_off = HEADER_LEN as u64;
        // length is capped above, so this fits in memory
        let mut json = vec![0u8; h.length as usize + 2];
        let got = read_at(&mut src, json_off, &mut json)?;
        if got < h.length as usize {
            return Err(ErrorKind::TruncatedPayload {
                offset: json_off,
                expected: h.length,
                got: got as u64,
            }
            .into());
        }
        if got < json.len() || &json[h.length as usize..] != CRLF {
            return Err(ErrorKind::MissingCrlf {
                offset: json_off + h.length,
            }
            .into());
        }
        let meta = StreamMeta::parse(&json[..h.length as usize], json_off)?;
        let body_start = json_off + h.length + 2;

        let (body_end, trailer) = if meta.is_compressed() {
            let (json_off, len) = trailer_extent(&mut src, file_size, body_start)?;
            let mut check = TrailerCursor::new(json_off, len);
            let mut read = |at: u64, buf: &mut [u8]| read_at(&mut src, json_off + at, buf);
            while check.next_entry(&mut read)?.is_some() {}
            let count = check.entries();
            let t = Trailer {
                json_off,
                count,
                cursor: TrailerCursor::new(json_off, len),
            };
            (json_off, Some(t))
        } else {
            (file_size, None)
        };
        Ok(Self {
            src: Some(src),
            lz4: None,
            meta,
            meta_len: h.length,
            file_size,
            body_end,
            trailer,
            next_header: body_start,
            crlf_before_header: false,
            payload: None,
            data_frames: 0,
            prev_end: 0,
            data_sum: 0,
            finished: false,
        })
    }

    /// The stream's metadata.
    pub fn meta(&self) -> &StreamMeta {
        &self.meta
    }

    /// Length of the meta JSON.
    pub fn meta_len(&self) -> u64 {
        self.meta_len
    }

    /// File size in bytes.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// The number of compression trailer entries, for compressed streams (the entries
    /// themselves come with the frames: [`Frame::lz4_frames`]).
    pub fn trailer_entries(&self) -> Option<usize> {
        self.trailer.as_ref().map(|t| t.count)
    }

    /// True once the `stop` frame was read and the stream validated to its end.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn src(&mut self) -> &mut R {
        if let Some(dec) = self.lz4.take() {
            // Abandoning a frame part-way: take the source back.
            self.src = Some(dec.into_inner());
        }
        self.src
            .as_mut()
            .expect("invariant: the source is held by the reader or the decoder")
    }

    /// The next data or zero frame, or `None` after `stop`. An unread payload of the
    /// previous frame is skipped (its CR LF is still checked).
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.finished {
            return Ok(None);
        }
        self.payload = None;
        let h = self.read_header()?;
        let offset = self.next_header;
        match h.kind {
            FrameKind::Data | FrameKind::Zero => {
                self.check_placement(&h, offset)?;
                self.prev_end = h.end();
                if h.kind == FrameKind::Zero {
                    self.next_header = offset + HEADER_LEN as u64;
                    self.crlf_before_header = false;
                    return Ok(Some(Frame::zero(h.start, h.length, offset)));
                }
                self.data_frame(&h, offset).map(Some)
            }
            FrameKind::Stop => {
                self.stop_frame(&h, offset)?;
                self.finished = true;
                Ok(None)
            }
            FrameKind::Meta | FrameKind::Comp => Err(ErrorKind::UnexpectedFrame {
                offset,
                kind: h.kind.as_str(),
                reason: "only data, zero or stop frames may follow the meta frame",
            }
            .into()),
        }
    }

    /// The header at `next_header`, after the CR LF that ends the previous payload.
    fn read_header(&mut self) -> Result<FrameHeader> {
        let pre = if self.crlf_before_header { 2 } else { 0 };
        let at = self.next_header - pre;
        let mut buf = [0u8; HEADER_LEN + 2];
        let want = HEADER_LEN + pre as usize;
        let got = read_at(self.src(), at, &mut buf[..want])?;
        if pre == 2 {
            if got < 2 {
                return Err(ErrorKind::TruncatedPayload {
                    offset: at,
                    expected: 2,
                    got: got as u64,
                }
                .into());
            }
            if &buf[..2] != CRLF {
                return Err(ErrorKind::MissingCrlf { offset: at }.into());
            }
        }
        let offset = self.next_header;
        if offset >= self.body_end && self.trailer.is_some() {
            // The body ran into the trailer without a stop frame.
            return Err(ErrorKind::TruncatedHeader { offset, got: 0 }.into());
        }
        FrameHeader::parse(&buf[pre as usize..got], offset)
    }

    /// A data or zero frame starts after the previous one and ends inside the disk.
    fn check_placement(&self, h: &FrameHeader, offset: u64) -> Result<()> {
        if h.start < self.prev_end {
            return Err(ErrorKind::OutOfOrder {
                offset,
                start: h.start,
                previous_end: self.prev_end,
            }
            .into());
        }
        let end = h.start.checked_add(h.length);
        if end.is_none_or(|e| e > self.meta.virtual_size) {
            return Err(ErrorKind::PastVirtualSize {
                offset,
                start: h.start,
                length: h.length,
                virtual_size: self.meta.virtual_size,
            }
            .into());
        }
        Ok(())
    }

    /// A data frame: its stored size (from the trailer when compressed) must fit
    /// before the body's end; its payload becomes the one `read_payload` hands out.
    fn data_frame(&mut self, h: &FrameHeader, offset: u64) -> Result<Frame> {
        let payload_offset = offset + HEADER_LEN as u64;
        let (stored_len, lz4_frames) = match self.next_trailer_entry(h.length)? {
            None => (h.length, Vec::new()),
            Some(Err(entries)) => {
                return Err(ErrorKind::TrailerCountMismatch {
                    offset,
                    entries,
                    data_frames: self.data_frames + 1,
                }
                .into());
            }
            Some(Ok(entry)) => (entry.stored_len(), entry.frames),
        };
        let room = self.body_end.saturating_sub(payload_offset);
        if stored_len.checked_add(2).is_none_or(|n| n > room) {
            return Err(ErrorKind::TruncatedPayload {
                offset: payload_offset,
                expected: stored_len,
                got: room.min(stored_len),
            }
            .into());
        }
        self.data_frames += 1;
        self.data_sum = self.data_sum.saturating_add(h.length);
        self.next_header = payload_offset + stored_len + 2;
        self.crlf_before_header = true;
        self.payload = Some(Payload {
            payload_offset,
            length: h.length,
            disk_pos: h.start,
            file_pos: payload_offset,
            raw_left: if self.trailer.is_none() {
                stored_len
            } else {
                0
            },
            lz4_left: lz4_frames.iter().copied().collect(),
            lz4_current: 0,
            decoded: 0,
        });
        Ok(Frame::data(
            h.start, h.length, offset, stored_len, lz4_frames,
        ))
    }

    /// The stop frame: its fields are zero, and the body it ends adds up (dataSize,
    /// the trailer's entry count, nothing between it and the trailer).
    fn stop_frame(&self, h: &FrameHeader, offset: u64) -> Result<()> {
        if h.start != 0 || h.length != 0 {
            return Err(ErrorKind::BadHeader {
                offset,
                reason: "stop frame with non-zero fields",
                printable: crate::frame::printable(&h.encode()),
            }
            .into());
        }
        if self.data_sum != self.meta.data_size {
            return Err(ErrorKind::DataSizeMismatch {
                offset,
                declared: self.meta.data_size,
                actual: self.data_sum,
            }
            .into());
        }
        if let Some(t) = self
            .trailer
            .as_ref()
            .filter(|t| t.count != self.data_frames)
        {
            return Err(ErrorKind::TrailerCountMismatch {
                offset,
                entries: t.count,
                data_frames: self.data_frames,
            }
            .into());
        }
        let end = offset + HEADER_LEN as u64;
        if end != self.body_end {
            return Err(ErrorKind::TrailingData {
                offset: end,
                len: self.body_end.saturating_sub(end),
            }
            .into());
        }
        Ok(())
    }

    /// The trailer entry of the next data frame: `None` for an uncompressed stream,
    /// `Some(Err(count))` when the trailer has no more entries.
    fn next_trailer_entry(
        &mut self,
        length: u64,
    ) -> Result<Option<std::result::Result<TrailerEntry, usize>>> {
        // Takes the source back from an abandoned decoder first.
        self.src();
        let (Some(t), Some(src)) = (self.trailer.as_mut(), self.src.as_mut()) else {
            return Ok(None);
        };
        if self.data_frames >= t.count {
            return Ok(Some(Err(t.count)));
        }
        let json_off = t.json_off;
        t.cursor.limit_frames(length);
        let mut read = |at: u64, buf: &mut [u8]| read_at(src, json_off + at, buf);
        match t.cursor.next_entry(&mut read)? {
            Some(e) => Ok(Some(Ok(e))),
            None => Ok(Some(Err(t.count))),
        }
    }

    /// Reads the next piece of the current data frame's payload, decoded, into `buf`.
    /// Returns the disk offset and length of the piece, or `None` when the payload is
    /// complete (its decoded length then equals the header's length).
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> Result<Option<(u64, usize)>> {
        if buf.is_empty() {
            return Ok(None);
        }
        let Some(mut p) = self.payload.take() else {
            return Ok(None);
        };
        let r = self.read_chunk_inner(&mut p, buf);
        if matches!(r, Ok(Some(_))) {
            self.payload = Some(p);
        }
        r
    }

    fn read_chunk_inner(
        &mut self,
        p: &mut Payload,
        buf: &mut [u8],
    ) -> Result<Option<(u64, usize)>> {
        if self.trailer.is_none() {
            if p.raw_left == 0 {
                return Ok(None);
            }
            let n = usize::try_from(p.raw_left)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let pos = p.file_pos;
            let got = read_at(self.src(), pos, &mut buf[..n])?;
            if got < n {
                return Err(ErrorKind::TruncatedPayload {
                    offset: p.payload_offset,
                    expected: p.length,
                    got: pos - p.payload_offset + got as u64,
                }
                .into());
            }
            let at = p.disk_pos;
            p.file_pos += n as u64;
            p.disk_pos += n as u64;
            p.raw_left -= n as u64;
            return Ok(Some((at, n)));
        }
        loop {
            if let Some(dec) = self.lz4.as_mut() {
                let n = dec.read_decoded(buf)?;
                if n > 0 {
                    let at = p.disk_pos;
                    p.disk_pos += n as u64;
                    p.decoded += n as u64;
                    return Ok(Some((at, n)));
                }
                let dec = self.lz4.take().expect("invariant: checked above");
                let (src, r) = dec.finish_into_inner();
                self.src = Some(src);
                r?;
                p.file_pos += p.lz4_current;
                continue;
            }
            let Some(size) = p.lz4_left.pop_front() else {
                if p.decoded != p.length {
                    return Err(ErrorKind::DecodedLength {
                        offset: p.payload_offset,
                        expected: p.length,
                        actual: p.decoded,
                    }
                    .into());
                }
                return Ok(None);
            };
            let pos = p.file_pos;
            let mut src = self.src.take().expect("invariant: no decoder is active");
            if let Err(e) = src.seek(SeekFrom::Start(pos)) {
                self.src = Some(src);
                return Err(io_at(pos)(e));
            }
            p.lz4_current = size;
            let max = p.length - p.decoded;
            self.lz4 = Some(Lz4FrameReader::new(src, pos, size, max));
        }
    }

    /// Reads the whole current payload into a vector (at most `cap` bytes, else an error).
    pub fn read_payload(&mut self, cap: u64) -> Result<Vec<u8>> {
        let (len, off) = match &self.payload {
            Some(p) => (p.length, p.payload_offset),
            None => return Ok(Vec::new()),
        };
        if len > cap {
            return Err(ErrorKind::DecodedLength {
                offset: off,
                expected: cap,
                actual: len,
            }
            .into());
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut buf = vec![0u8; (len as usize).clamp(1, 1 << 20)];
        while let Some((_, n)) = self.read_chunk(&mut buf)? {
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }
}

/// Reads the compression trailer of a stream file of `file_size` bytes whose body
/// starts at `body_start`: the file offset where the trailer JSON starts (the end of
/// the frame body) and its entries (all in memory). For a reader that walks a damaged
/// stream itself.
pub fn read_trailer<R: Read + Seek>(
    src: &mut R,
    file_size: u64,
    body_start: u64,
) -> Result<(u64, Vec<TrailerEntry>)> {
    let (json_off, len) = trailer_extent(src, file_size, body_start)?;
    // length is capped by trailer_extent, so this fits in memory
    let mut json = vec![0u8; len as usize];
    read_at(src, json_off, &mut json)?;
    let entries = parse_trailer(&json, json_off)?;
    Ok((json_off, entries))
}

/// The compression trailer of a stream file, checked to its end once and then read
/// one entry at a time, in order: memory per entry, not per frame (a trailer of
/// 4,000,000 entries held as a list is ~280 MB). For a reader that walks a damaged
/// stream itself.
#[derive(Debug)]
pub struct TrailerReader<R: Read + Seek> {
    src: R,
    json_off: u64,
    count: usize,
    cursor: TrailerCursor,
    /// The entry at index `cursor.entries() - 1`.
    cur: Option<TrailerEntry>,
}

impl<R: Read + Seek> TrailerReader<R> {
    /// Finds and checks the trailer of a stream file of `file_size` bytes whose body
    /// starts at `body_start`.
    pub fn open(mut src: R, file_size: u64, body_start: u64) -> Result<Self> {
        let (json_off, len) = trailer_extent(&mut src, file_size, body_start)?;
        let mut check = TrailerCursor::new(json_off, len);
        let mut read = |at: u64, buf: &mut [u8]| read_at(&mut src, json_off + at, buf);
        while check.next_entry(&mut read)?.is_some() {}
        Ok(Self {
            src,
            json_off,
            count: check.entries(),
            cursor: TrailerCursor::new(json_off, len),
            cur: None,
        })
    }

    /// File offset of the trailer JSON: where the frame body ends.
    pub fn json_offset(&self) -> u64 {
        self.json_off
    }

    /// Entries in the trailer.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when the trailer lists no payload.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Entry `i` (`None` past the last); `i` never goes back from one call to the next.
    ///
    /// # Errors
    /// An I/O error, or `i` before the entry of the call before.
    pub fn get(&mut self, i: usize) -> Result<Option<&TrailerEntry>> {
        if i >= self.count {
            return Ok(None);
        }
        if i + 1 < self.cursor.entries() {
            return Err(ErrorKind::BadTrailer {
                offset: self.json_off,
                reason: format!(
                    "entry {i} asked for after entry {}",
                    self.cursor.entries() - 1
                ),
            }
            .into());
        }
        let (src, json_off) = (&mut self.src, self.json_off);
        let mut read = |at: u64, buf: &mut [u8]| read_at(src, json_off + at, buf);
        while self.cursor.entries() <= i {
            self.cur = self.cursor.next_entry(&mut read)?;
        }
        Ok(self.cur.as_ref())
    }
}

/// Finds the compression trailer from the `comp` header at the end of the file: the
/// file offset and length of its JSON (checked to be followed by CR LF).
fn trailer_extent<R: Read + Seek>(
    src: &mut R,
    file_size: u64,
    body_start: u64,
) -> Result<(u64, u64)> {
    // Smallest compressed stream: body_start + stop(40) + "[]"(2) + CRLF(2) + comp(40).
    let min = body_start + HEADER_LEN as u64 + 2 + 2 + HEADER_LEN as u64;
    let comp_off = file_size.saturating_sub(HEADER_LEN as u64);
    if file_size < min {
        return Err(ErrorKind::TrailerMissing {
            offset: comp_off,
            reason: format!("file has only {file_size} bytes"),
        }
        .into());
    }
    let mut hdr = [0u8; HEADER_LEN];
    read_at(src, comp_off, &mut hdr)?;
    let h = FrameHeader::parse(&hdr, comp_off).map_err(|e| {
        Error::new(ErrorKind::TrailerMissing {
            offset: comp_off,
            reason: e.kind().to_string(),
        })
    })?;
    if h.kind != FrameKind::Comp {
        return Err(ErrorKind::TrailerMissing {
            offset: comp_off,
            reason: format!("found a {} header", h.kind.as_str()),
        }
        .into());
    }
    let room = comp_off - 2 - (body_start + HEADER_LEN as u64);
    if h.length > MAX_TRAILER_LEN || h.length > room {
        return Err(ErrorKind::TrailerPastFile {
            offset: comp_off,
            len: h.length,
            file_size,
        }
        .into());
    }
    let json_off = comp_off - 2 - h.length;
    let mut crlf = [0u8; 2];
    let got = read_at(src, comp_off - 2, &mut crlf)?;
    if got < 2 || &crlf != CRLF {
        return Err(ErrorKind::MissingCrlf {
            offset: comp_off - 2,
        }
        .into());
    }
    Ok((json_off, h.length))
}

/// Read-ahead window of [`StreamIndex::read_file`].
pub const INDEX_READAHEAD: usize = 64 * 1024;

/// Every frame of one stream, read from headers and trailer only (payloads skipped).
#[derive(Debug, Clone)]
pub struct StreamIndex {
    /// The stream metadata.
    pub meta: StreamMeta,
    /// Data and zero frames in file order.
    pub frames: Vec<Frame>,
    /// File size.
    pub file_size: u64,
}

impl StreamIndex {
    /// Walks all frame headers of a stream and validates its structure.
    pub fn read<R: Read + Seek>(src: R) -> Result<Self> {
        let mut r = StreamReader::open(src)?;
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame()? {
            frames.push(f);
        }
        Ok(Self {
            meta: r.meta.clone(),
            frames,
            file_size: r.file_size,
        })
    }

    /// [`read`](Self::read) on a file, through a [`crate::PreadBuf`] (the fast way to
    /// walk the headers of a file).
    pub fn read_file(file: std::fs::File) -> Result<Self> {
        Self::read(crate::PreadBuf::new(file, INDEX_READAHEAD))
    }

    /// Data frames only.
    pub fn data_frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(|f| f.kind == FrameKind::Data)
    }
}

/// Reads every payload of a stream (decoding LZ4) and hands the pieces to `sink`,
/// so that all payload-level checks run. Returns the number of data bytes seen.
pub fn read_all<R: Read + Seek>(src: R, mut sink: impl FnMut(u64, &[u8])) -> Result<u64> {
    let mut r = StreamReader::open(src)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    while let Some(f) = r.next_frame()? {
        if f.kind == FrameKind::Data {
            while let Some((at, n)) = r.read_chunk(&mut buf)? {
                sink(at, &buf[..n]);
                total += n as u64;
            }
        }
    }
    Ok(total)
}

/// The 40-byte header at the start of a stream: a meta frame whose JSON is no longer
/// than [`MAX_META_LEN`] (so the JSON can be read into memory).
fn meta_header<R: Read + Seek>(src: &mut R) -> Result<FrameHeader> {
    let mut hdr = [0u8; HEADER_LEN];
    let got = read_at(src, 0, &mut hdr)?;
    let h = FrameHeader::parse(&hdr[..got], 0)?;
    if h.kind != FrameKind::Meta {
        return Err(ErrorKind::UnexpectedFrame {
            offset: 0,
            kind: h.kind.as_str(),
            reason: "a stream starts with a meta frame",
        }
        .into());
    }
    if h.length > MAX_META_LEN {
        return Err(ErrorKind::MetaTooLarge {
            offset: 0,
            len: h.length,
            max: MAX_META_LEN,
        }
        .into());
    }
    Ok(h)
}

/// Reads only the meta frame of a stream file (40 bytes + the JSON), without the
/// trailer or any frame. Cheap enough to call for every file of a directory.
pub fn read_meta<R: Read + Seek>(mut src: R) -> Result<StreamMeta> {
    let h = meta_header(&mut src)?;
    let mut json = vec![0u8; h.length as usize];
    let got = read_at(&mut src, HEADER_LEN as u64, &mut json)?;
    if got < json.len() {
        return Err(ErrorKind::TruncatedPayload {
            offset: HEADER_LEN as u64,
            expected: h.length,
            got: got as u64,
        }
        .into());
    }
    StreamMeta::parse(&json, HEADER_LEN as u64)
}

/// True when the first bytes look like a sparse stream (`meta ` header) rather than a
/// raw disk image (virtnbdbackup stores raw-format disks as plain `copy.data` images).
pub fn looks_like_stream(first: &[u8]) -> bool {
    first.len() >= 5 && &first[..5] == b"meta "
}
