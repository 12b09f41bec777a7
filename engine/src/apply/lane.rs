//! [`Lane`]: one chain file in the disk-order pass ([`super::source`]): reads the
//! bytes of its data frames at the disk offsets the merge asks for — straight from the
//! file ([`Stored`]), or through an LZ4 decoder that stays paused while other files'
//! frames come first (at most [`MAX_DECODERS`] of them; the least recently used one is
//! dropped beyond that and its LZ4 frame decoded again when needed). A started LZ4
//! frame is decoded to its end and checked before the lane leaves it; when the file is
//! hashed, the data frame's decoded length is checked too.

use std::path::PathBuf;

use nbdfmt::lz4::{Lz4Buffers, Lz4FrameReader};
use nbdfmt::{Error as FmtError, ErrorKind as FmtKind, Frame};

use super::stored::{Stored, StoredReader};
use crate::cancel::Cancel;
use crate::error::{Error, Result};

/// LZ4 decoders kept paused at once (a frame another file's frame interrupts);
/// beyond that the least recently used one is dropped and its frame decoded again
/// from the start of its LZ4 frame when needed.
pub(super) const MAX_DECODERS: usize = 16;

/// Decoded bytes a paused decoder buffers besides its 64 KiB window.
const DECODER_OUT: usize = 128 << 10;

/// Where a compressed lane is inside its current data frame.
pub(super) struct InFrame {
    /// Index of the data frame in its file.
    index: u32,
    fr: Frame,
    /// The LZ4 frame of the payload we are at, its file offset and the disk offset of
    /// its first byte.
    lz4: usize,
    lz4_off: u64,
    lz4_disk: u64,
    /// Inside LZ4 frame `lz4`: the decoder (which holds the file) and the disk offset
    /// of its next byte.
    dec: Option<(Lz4FrameReader<StoredReader>, u64)>,
}

/// One chain file in the pass.
pub(super) struct Lane {
    path: PathBuf,
    compressed: bool,
    stored_checksum: Option<u32>,
    /// The file, when no decoder holds it.
    stored: Option<Stored>,
    cur: Option<InFrame>,
    /// For the decoder LRU.
    used: u64,
}

/// Decode buffers handed from one LZ4 frame to the next.
#[derive(Default)]
pub(super) struct Lz4Pool(Vec<Lz4Buffers>);

impl Lane {
    /// A lane over `stored`; `stored_checksum` only when the file is hashed.
    pub fn new(
        path: PathBuf,
        compressed: bool,
        stored_checksum: Option<u32>,
        stored: Stored,
    ) -> Self {
        Self {
            path,
            compressed,
            stored_checksum,
            stored: Some(stored),
            cur: None,
            used: 0,
        }
    }

    /// The `.chksum` value when the file is hashed.
    pub fn stored_checksum(&self) -> Option<u32> {
        self.stored_checksum
    }

    /// The file, when no decoder holds it (after [`finish_frame`](Self::finish_frame)).
    pub fn stored(&mut self) -> Result<&mut Stored> {
        self.stored
            .as_mut()
            .ok_or_else(|| Error::internal("internal: chain file held by a decoder"))
    }

    fn hashing(&self) -> bool {
        self.stored_checksum.is_some()
    }

    /// Reads `dst.len()` bytes of data frame `fr` (number `index` in the file) from
    /// disk offset `at`.
    pub fn read(
        &mut self,
        index: u32,
        fr: &Frame,
        at: u64,
        dst: &mut [u8],
        ctx: &mut Ctx<'_>,
    ) -> Result<()> {
        if !self.compressed {
            let off = fr.payload_offset + (at - fr.start);
            return self.stored()?.read_at(off, dst);
        }
        if self.cur.as_ref().is_some_and(|c| c.index != index) {
            self.finish_frame(ctx)?;
        }
        if self.cur.is_none() {
            self.cur = Some(InFrame {
                index,
                fr: fr.clone(),
                lz4: 0,
                lz4_off: fr.payload_offset,
                lz4_disk: fr.start,
                dec: None,
            });
        }
        self.seek(at, ctx)?;
        let mut got = 0;
        while got < dst.len() {
            if self.cur.as_ref().is_some_and(|c| c.dec.is_none()) {
                self.start_decoder(ctx)?;
            }
            let n = self.decode(&mut dst[got..])?;
            if n == 0 {
                self.end_lz4(ctx)?;
                self.check_more_lz4()?;
            }
            got += n;
        }
        Ok(())
    }

    /// Decodes into `buf` from the active decoder; 0 at the end of its LZ4 frame.
    fn decode(&mut self, buf: &mut [u8]) -> Result<usize> {
        let Some(InFrame {
            dec: Some((d, pos)),
            ..
        }) = self.cur.as_mut()
        else {
            return Err(Error::internal("internal: no LZ4 decoder"));
        };
        let n = d
            .read_decoded(buf)
            .map_err(|e| Error::Backup(e.in_file(&self.path)))?;
        *pos += n as u64;
        Ok(n)
    }

    /// An error when the data frame has no LZ4 frame left (it decoded short).
    fn check_more_lz4(&self) -> Result<()> {
        let Some(c) = &self.cur else { return Ok(()) };
        if c.lz4 < c.fr.lz4_frames.len() {
            return Ok(());
        }
        Err(self.decoded_length(c))
    }

    fn decoded_length(&self, c: &InFrame) -> Error {
        Error::Backup(
            FmtError::from(FmtKind::DecodedLength {
                offset: c.fr.payload_offset,
                expected: c.fr.length,
                actual: c.lz4_disk - c.fr.start,
            })
            .in_file(&self.path),
        )
    }

    /// Moves to disk offset `at` of the current frame: whole LZ4 frames that end
    /// before it are skipped when their header gives their size, the rest is decoded
    /// and dropped.
    fn seek(&mut self, at: u64, ctx: &mut Ctx<'_>) -> Result<()> {
        loop {
            let c = self
                .cur
                .as_ref()
                .ok_or_else(|| Error::internal("internal: no frame"))?;
            match &c.dec {
                Some((_, pos)) if *pos == at => return Ok(()),
                Some((_, pos)) if *pos < at => {
                    let n = usize::try_from(at - pos).unwrap_or(usize::MAX).min(SCRATCH);
                    let mut scratch = ctx.take_scratch();
                    let r = self.decode(&mut scratch[..n]);
                    ctx.scratch = scratch;
                    if r? == 0 {
                        self.end_lz4(ctx)?;
                        self.check_more_lz4()?;
                    }
                }
                Some(_) => {
                    // Behind us (never in disk order): decode this frame again.
                    self.drop_decoder(ctx)?;
                    let c = self
                        .cur
                        .as_mut()
                        .ok_or_else(|| Error::internal("internal: no frame"))?;
                    c.lz4 = 0;
                    c.lz4_off = c.fr.payload_offset;
                    c.lz4_disk = c.fr.start;
                }
                None => {
                    if c.lz4_disk > at {
                        let c = self
                            .cur
                            .as_mut()
                            .ok_or_else(|| Error::internal("internal: no frame"))?;
                        c.lz4 = 0;
                        c.lz4_off = c.fr.payload_offset;
                        c.lz4_disk = c.fr.start;
                        continue;
                    }
                    if !self.skip_lz4(at)? {
                        self.check_more_lz4()?;
                        self.start_decoder(ctx)?;
                    }
                }
            }
        }
    }

    /// Skips LZ4 frame `lz4` without decoding it when its header gives a size that ends
    /// at or before `at` (and inside the data frame); true when skipped.
    fn skip_lz4(&mut self, at: u64) -> Result<bool> {
        let (off, size, disk, end) = {
            let Some(c) = &self.cur else { return Ok(false) };
            let Some(&size) = c.fr.lz4_frames.get(c.lz4) else {
                return Ok(false);
            };
            (c.lz4_off, size, c.lz4_disk, c.fr.end())
        };
        let mut h = [0u8; 15];
        let n = usize::try_from(size).unwrap_or(usize::MAX).min(h.len());
        if n < 7 {
            return Ok(false);
        }
        self.stored()?.read_at(off, &mut h[..n])?;
        let cs = nbdfmt::lz4::parse_header(&h[..n])
            .ok()
            .flatten()
            .and_then(|h| h.content_size);
        match cs {
            Some(cs) if disk.saturating_add(cs) <= at && disk.saturating_add(cs) <= end => {
                let c = self
                    .cur
                    .as_mut()
                    .ok_or_else(|| Error::internal("internal: no frame"))?;
                c.lz4 += 1;
                c.lz4_off += size;
                c.lz4_disk += cs;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Starts decoding LZ4 frame `lz4` of the current frame.
    fn start_decoder(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        self.check_more_lz4()?;
        ctx.tick += 1;
        self.used = ctx.tick;
        let hashing = self.hashing();
        let stored = self
            .stored
            .take()
            .ok_or_else(|| Error::internal("internal: chain file held by a decoder"))?;
        let c = self
            .cur
            .as_mut()
            .ok_or_else(|| Error::internal("internal: no frame"))?;
        let size = c.fr.lz4_frames[c.lz4];
        let max = c.fr.end() - c.lz4_disk;
        let d = Lz4FrameReader::new(stored.reader(c.lz4_off), c.lz4_off, size, max)
            // The xxh32 checksums inside the frame are redundant when the adler32 of
            // the whole file (stored bytes) is checked in this same pass.
            .verify_checksums(!hashing)
            .out_target(DECODER_OUT)
            .with_buffers(ctx.lz4.0.pop().unwrap_or_default());
        c.dec = Some((d, c.lz4_disk));
        ctx.decoders += 1;
        Ok(())
    }

    /// Drops the decoder without finishing its frame (evicted, or going back).
    fn drop_decoder(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        if let Some(c) = self.cur.as_mut() {
            if let Some((d, _)) = c.dec.take() {
                self.stored = Some(d.into_inner().s);
                ctx.decoders -= 1;
            }
        }
        Ok(())
    }

    /// Decodes the active LZ4 frame to its end and checks it, then moves to the next.
    fn end_lz4(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        loop {
            let mut scratch = ctx.take_scratch();
            let r = self.decode(&mut scratch);
            ctx.scratch = scratch;
            if r? == 0 {
                break;
            }
        }
        let c = self
            .cur
            .as_mut()
            .ok_or_else(|| Error::internal("internal: no frame"))?;
        let Some((d, pos)) = c.dec.take() else {
            return Ok(());
        };
        let (r, res, bufs) = d.finish_into_parts();
        self.stored = Some(r.s);
        ctx.decoders -= 1;
        if ctx.lz4.0.len() < 4 {
            ctx.lz4.0.push(bufs);
        }
        res.map_err(|e| Error::Backup(e.in_file(&self.path)))?;
        c.lz4_off += c.fr.lz4_frames[c.lz4];
        c.lz4 += 1;
        c.lz4_disk = pos;
        Ok(())
    }

    /// Leaves the current data frame: its started LZ4 frame is decoded to its end and
    /// checked; when hashing, the frame's decoded length is checked too (by the sizes
    /// its LZ4 headers give, decoding those that give none).
    pub fn finish_frame(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        if self.cur.as_ref().is_some_and(|c| c.dec.is_some()) {
            self.end_lz4(ctx)?;
        }
        if self.hashing() {
            while let Some(c) = &self.cur {
                if c.lz4 >= c.fr.lz4_frames.len() {
                    if c.lz4_disk != c.fr.end() {
                        return Err(self.decoded_length(c));
                    }
                    break;
                }
                let end = c.fr.end();
                if !self.skip_lz4(end)? {
                    self.start_decoder(ctx)?;
                    self.end_lz4(ctx)?;
                }
            }
        }
        self.cur = None;
        Ok(())
    }
}

/// What the lanes share.
pub(super) struct Ctx<'a> {
    scratch: Vec<u8>,
    lz4: Lz4Pool,
    /// Decoders alive (paused or not).
    pub decoders: usize,
    tick: u64,
    pub cancel: &'a Cancel,
}

/// Decoded bytes dropped at a time (decoding up to where the live data starts).
const SCRATCH: usize = 64 << 10;

impl<'a> Ctx<'a> {
    /// The scratch buffer (allocated on first use: only LZ4 lanes need it); put it
    /// back into `scratch` after use.
    fn take_scratch(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.scratch);
        if v.len() < SCRATCH {
            v = vec![0u8; SCRATCH];
        }
        v
    }

    pub fn new(cancel: &'a Cancel) -> Self {
        Self {
            scratch: Vec::new(),
            lz4: Lz4Pool::default(),
            decoders: 0,
            tick: 0,
            cancel,
        }
    }
}

/// Drops the least recently used paused decoder other than `keep`'s.
pub(super) fn evict(lanes: &mut [Lane], keep: usize, ctx: &mut Ctx<'_>) -> Result<()> {
    let victim = lanes
        .iter()
        .enumerate()
        .filter(|(i, l)| *i != keep && l.cur.as_ref().is_some_and(|c| c.dec.is_some()))
        .min_by_key(|(_, l)| l.used)
        .map(|(i, _)| i);
    if let Some(i) = victim {
        lanes[i].drop_decoder(ctx)?;
        if let Some(s) = lanes[i].stored.as_mut() {
            s.release();
        }
    }
    Ok(())
}
