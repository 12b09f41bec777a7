//! The frame-level steps of the salvage walk: headers, the stop frame, payloads
//! (plain and LZ4), stepping over what cannot be trusted.

use nbdfmt::lz4::{Lz4Buffers, Lz4FrameReader};
use nbdfmt::{ErrorKind as FmtKind, FrameHeader, FrameKind, HEADER_LEN};

use super::*;

impl Walker<'_> {
    /// Checks after the stop frame (nothing is lost by what they find).
    pub(super) fn stop(&mut self, b: &mut body::Body<'_>, h: &FrameHeader) {
        let (meta, pos, data_sum, data_frames, body_end) =
            (b.meta, b.pos, b.data_sum, b.data_frames, b.body_end);
        let trailer_len = b.trailer.as_ref().map(|t| t.len());
        let trailer_fault = b.trailer_fault.take();
        if h.start != 0 || h.length != 0 {
            self.out
                .fault(Harm::Corrupt, pos, "stop frame with non-zero fields");
        }
        if self.out.lost.is_empty() && self.out.unknown.is_empty() && data_sum != meta.data_size {
            let reason = format!(
                "the data frames add up to {data_sum} bytes, the meta's dataSize says {}",
                meta.data_size
            );
            self.out.suspect = Some(reason.clone());
            self.out.fault(Harm::Corrupt, pos, reason);
        }
        let trailer_unreadable = trailer_fault.is_some();
        if let Some((off, reason)) = trailer_fault {
            self.out.fault(
                Harm::Corrupt,
                off,
                format!("{reason}; the payload sizes were taken from the LZ4 frames"),
            );
        }
        if trailer_len.is_some_and(|n| n != data_frames) {
            self.out.fault(
                Harm::Corrupt,
                body_end,
                format!(
                    "the compression trailer lists {} payloads for {data_frames} data frames",
                    trailer_len.unwrap_or(0)
                ),
            );
        }
        let end = pos + HEADER_LEN as u64;
        // without a trailer, the body's end is not known: the trailer fault says it
        if !trailer_unreadable && end != body_end {
            self.out.fault(
                Harm::Corrupt,
                end,
                format!(
                    "{} unexpected bytes after the stop frame",
                    body_end.abs_diff(end)
                ),
            );
        }
    }

    /// The frame header at `pos`, or the damage.
    pub(super) fn header(&mut self, pos: u64) -> std::result::Result<FrameHeader, (Harm, String)> {
        let mut hdr = [0u8; HEADER_LEN];
        let got = self
            .read_at(pos, &mut hdr)
            .map_err(|e| (Harm::Corrupt, format!("I/O error: {e}")))?;
        match got {
            0 => Err((
                Harm::Truncated,
                "the file ends before the stop frame".to_owned(),
            )),
            n if n < HEADER_LEN => Err((
                Harm::Truncated,
                format!("the file ends inside a frame header ({n} of 40 bytes)"),
            )),
            _ => FrameHeader::parse(&hdr, pos).map_err(|e| (Harm::Corrupt, e.kind().to_string())),
        }
    }

    /// The header at `next`, when it is one that may follow a frame ending at disk
    /// offset `prev_end` (and, with `crlf_before`, a payload's CR LF precedes it).
    pub(super) fn header_after(
        &mut self,
        next: u64,
        prev_end: u64,
        body_end: u64,
        crlf_before: bool,
    ) -> Option<FrameHeader> {
        let mut b = [0u8; HEADER_LEN + 2];
        if next >= body_end || next < 2 {
            return None;
        }
        match self.read_at(next - 2, &mut b) {
            Ok(n) if n == b.len() && (!crlf_before || &b[..2] == b"\r\n") => {}
            _ => return None,
        }
        let h = FrameHeader::parse(&b[2..], next).ok()?;
        match h.kind {
            FrameKind::Data | FrameKind::Zero if h.start >= prev_end => Some(h),
            FrameKind::Stop => Some(h),
            _ => None,
        }
    }

    /// Past a header that cannot be trusted at `pos`, in a compressed stream: an LZ4
    /// payload starts with its magic, never with a header, so the next header is right
    /// after it (the damaged frame was a zero frame) or after a payload of the
    /// trailer's `stored` size (it was a data frame). The next header's offset, the
    /// header, and whether a data frame was stepped over.
    pub(super) fn step_over(
        &mut self,
        pos: u64,
        prev_end: u64,
        stored: Option<u64>,
        body_end: u64,
    ) -> Option<(u64, FrameHeader, bool)> {
        let zero = pos + HEADER_LEN as u64;
        if let Some(h) = self.header_after(zero, prev_end, body_end, false) {
            return Some((zero, h, false));
        }
        let data = zero.checked_add(stored?)?.checked_add(2)?;
        self.header_after(data, prev_end, body_end, true)
            .map(|h| (data, h, true))
    }

    /// An uncompressed payload of `len` bytes at `payload`: read (an unreadable one is
    /// lost) and followed by CR LF. Its stored length, and no LZ4 frames.
    pub(super) fn raw_payload(
        &mut self,
        payload: u64,
        len: u64,
    ) -> std::result::Result<(u64, Vec<u64>), PayloadFault> {
        let end = payload.saturating_add(len);
        if end.saturating_add(2) > self.size {
            return Err(PayloadFault {
                truncated: true,
                offset: payload,
                reason: format!(
                    "the file ends inside this frame's payload (expected {len} bytes and CR LF, found {})",
                    self.size.saturating_sub(payload)
                ),
            });
        }
        let mut at = payload;
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = (|| {
            while at < end {
                let n = usize::try_from(end - at)
                    .unwrap_or(usize::MAX)
                    .min(scratch.len());
                match self.read_at(at, &mut scratch[..n]) {
                    Ok(got) if got == n => at += n as u64,
                    Ok(_) => {
                        return Err(PayloadFault {
                            truncated: true,
                            offset: at,
                            reason: "the file ends inside this frame's payload".into(),
                        })
                    }
                    Err(e) => {
                        return Err(PayloadFault {
                            truncated: false,
                            offset: at,
                            reason: format!("I/O error: {e}"),
                        })
                    }
                }
            }
            Ok(())
        })();
        self.scratch = scratch;
        r?;
        self.crlf(end, false)?;
        Ok((len, Vec::new()))
    }

    /// CR LF at `at`.
    pub(super) fn crlf(
        &mut self,
        at: u64,
        truncated_if_short: bool,
    ) -> std::result::Result<(), PayloadFault> {
        let mut b = [0u8; 2];
        match self.read_at(at, &mut b) {
            Ok(2) if &b == b"\r\n" => Ok(()),
            Ok(2) => Err(PayloadFault {
                truncated: false,
                offset: at,
                reason: "no CR LF after the payload".into(),
            }),
            Ok(_) => Err(PayloadFault {
                truncated: truncated_if_short,
                offset: at,
                reason: "the file ends before the CR LF after the payload".into(),
            }),
            Err(e) => Err(PayloadFault {
                truncated: false,
                offset: at,
                reason: format!("I/O error: {e}"),
            }),
        }
    }

    /// A compressed payload at `payload` that decodes to `len` bytes: each LZ4 frame
    /// measured from its block words, then decoded with its checksums. Its stored
    /// length and LZ4 frame sizes. `no_trailer`: the body may end at the file's end.
    pub(super) fn lz4_payload(
        &mut self,
        payload: u64,
        len: u64,
        body_end: u64,
        no_trailer: bool,
    ) -> Result<std::result::Result<(u64, Vec<u64>), PayloadFault>> {
        let mut off = payload;
        let mut decoded = 0u64;
        let mut sizes = Vec::new();
        loop {
            self.cancel.check()?;
            let corrupt = |offset: u64, reason: String| PayloadFault {
                truncated: false,
                offset,
                reason,
            };
            if let Err(e) = self.goto(off) {
                return Ok(Err(corrupt(off, format!("I/O error: {e}"))));
            }
            let avail = body_end.saturating_sub(off);
            let n = nbdfmt::lz4::frame_len(&mut KeepBuf(&mut self.r), off, avail);
            // where the reader is now (one lseek, the buffer kept): a seek to an
            // unknown position would drop the 1 MiB buffer and read it again for every
            // frame (4,000,000 one-byte frames: 300 s instead of seconds)
            self.sync_pos();
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let short = matches!(e.kind(), FmtKind::TruncatedPayload { .. });
                    return Ok(Err(PayloadFault {
                        truncated: short && no_trailer,
                        offset: e.offset().unwrap_or(off),
                        reason: if short && no_trailer {
                            "the file ends inside this frame's LZ4 payload".to_owned()
                        } else {
                            e.kind().to_string()
                        },
                    }));
                }
            };
            if let Err(e) = self.goto(off) {
                return Ok(Err(corrupt(off, format!("I/O error: {e}"))));
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            let mut bufs = std::mem::take(&mut self.lz4_bufs);
            let got = decode(
                &mut self.r,
                (off, n, len - decoded),
                &mut scratch,
                &mut bufs,
                self.cancel,
            );
            self.scratch = scratch;
            self.lz4_bufs = bufs;
            self.sync_pos();
            let got = match got? {
                Ok(k) => k,
                Err(e) => {
                    return Ok(Err(corrupt(
                        e.offset().unwrap_or(off),
                        e.kind().to_string(),
                    )))
                }
            };
            self.pos = off + n;
            sizes.push(n);
            off += n;
            decoded += got;
            if decoded >= len {
                break;
            }
            if got == 0 {
                return Ok(Err(corrupt(
                    off - n,
                    "an empty LZ4 frame inside a payload".into(),
                )));
            }
        }
        if off.saturating_add(2) > body_end {
            return Ok(Err(PayloadFault {
                truncated: no_trailer,
                offset: off,
                reason: "the file ends before the CR LF after the payload".into(),
            }));
        }
        Ok(self.crlf(off, no_trailer).map(|()| (off - payload, sizes)))
    }
}

/// Decodes one LZ4 frame of `n` stored bytes (at most `max` decoded) from `r`, its
/// checksums checked; the decoded byte count.
/// Decodes the LZ4 frame of `n` bytes at `off` (at most `max` bytes out), checksums
/// verified, in buffers kept from the frame before (`bufs`).
pub(super) fn decode(
    r: &mut BufReader<File>,
    (off, n, max): (u64, u64, u64),
    scratch: &mut [u8],
    bufs: &mut Lz4Buffers,
    cancel: &Cancel,
) -> Result<nbdfmt::Result<u64>> {
    let mut dec = Lz4FrameReader::new(r, off, n, max)
        .block_path()
        .with_buffers(std::mem::take(bufs));
    let failed = loop {
        cancel.check()?;
        match dec.read_decoded(scratch) {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(e),
        }
    };
    let (done, kept) = dec.finish_keep_buffers();
    *bufs = kept;
    Ok(match failed {
        Some(e) => Err(e),
        None => done,
    })
}

/// The walk's reader for [`nbdfmt::lz4::frame_len`], whose relative seeks keep the
/// buffer (`BufReader`'s `Seek` drops it: skipping each payload then refills 1 MiB
/// per frame — 4,000,000 one-byte frames read 4 TB from the page cache).
struct KeepBuf<'a>(&'a mut BufReader<File>);

impl Read for KeepBuf<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for KeepBuf<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match pos {
            SeekFrom::Current(d) => {
                self.0.seek_relative(d)?;
                self.0.stream_position()
            }
            other => self.0.seek(other),
        }
    }
}
