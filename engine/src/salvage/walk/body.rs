//! The frames after the meta frame, one step at a time: a header, then what its kind
//! asks for; damage either steps over one frame (its stored length still trusted, the
//! next header where it should be) or ends the file there.

use nbdfmt::reader::TrailerReader;
use nbdfmt::{Frame, FrameHeader, FrameKind, PreadBuf, StreamMeta, HEADER_LEN};

use super::{entry, Harm, LostFrame, PayloadFault, Walker, MAX_FAULTS};
use crate::error::Result;

/// Where the pass over the body stands.
pub(super) struct Body<'m> {
    pub meta: &'m StreamMeta,
    pub compressed: bool,
    pub trailer: Option<TrailerReader<PreadBuf>>,
    /// Why the trailer could not be read (offset, reason), until reported.
    pub trailer_fault: Option<(u64, String)>,
    /// Where the frames end: the trailer's start, or the file's end.
    pub body_end: u64,
    /// The trailer's sizes may be used to step over a damaged payload only while
    /// they agree with every payload measured so far.
    pub trailer_agrees: bool,
    /// File offset of the next header.
    pub pos: u64,
    /// Disk offset where the last frame that passed ends.
    pub prev_end: u64,
    pub data_frames: usize,
    /// Disk bytes of the data frames seen (checked against the meta's dataSize).
    pub data_sum: u64,
}

/// After one frame: go on, or the file's frames end here.
enum Step {
    Next,
    End,
}

impl Walker<'_> {
    /// The frames after the meta frame.
    pub(super) fn body(&mut self, meta: &StreamMeta, body_start: u64) -> Result<()> {
        let mut b = self.body_start(meta, body_start);
        loop {
            self.cancel.check()?;
            if let Some(reason) = self.stop_early(&b) {
                self.out.fault(Harm::Corrupt, b.pos, reason);
                break self.give_up(&b);
            }
            let step = match self.checked_header(&b) {
                Err((harm, reason)) => self.bad_header(&mut b, harm, reason),
                Ok(h) => match h.kind {
                    FrameKind::Zero => self.zero_frame(&mut b, &h)?,
                    FrameKind::Data => self.data_frame(&mut b, &h)?,
                    FrameKind::Stop => {
                        self.stop(&mut b, &h);
                        Step::End
                    }
                    FrameKind::Meta | FrameKind::Comp => {
                        let reason = format!("unexpected {} frame in the body", h.kind.as_str());
                        self.out.fault(Harm::Corrupt, b.pos, reason);
                        self.give_up(&b);
                        Step::End
                    }
                },
            };
            if let Step::End = step {
                break;
            }
        }
        if let Some((off, reason)) = b.trailer_fault {
            // the walk ended early: a truncated file has no trailer either
            if self.out.faults.is_empty() {
                self.out.fault(Harm::Corrupt, off, reason);
            }
        }
        Ok(())
    }

    fn body_start<'m>(&mut self, meta: &'m StreamMeta, body_start: u64) -> Body<'m> {
        let compressed = meta.is_compressed();
        let (trailer, trailer_fault) = match compressed.then(|| self.trailer(body_start)) {
            None => (None, None),
            Some(Ok(t)) => (Some(t), None),
            Some(Err(e)) => (None, Some((e.offset().unwrap_or(0), e.kind().to_string()))),
        };
        Body {
            meta,
            compressed,
            body_end: trailer.as_ref().map_or(self.size, |t| t.json_offset()),
            trailer_agrees: trailer.is_some(),
            trailer,
            trailer_fault,
            pos: body_start,
            prev_end: 0,
            data_frames: 0,
            data_sum: 0,
        }
    }

    /// Why the rest of the file is not walked, before the header at `b.pos`.
    fn stop_early(&self, b: &Body<'_>) -> Option<String> {
        if self.out.faults.len() >= MAX_FAULTS {
            return Some(format!(
                "{MAX_FAULTS} damaged places: the rest of the file is given up"
            ));
        }
        (b.trailer.is_some() && b.pos >= b.body_end)
            .then(|| "the frames run into the compression trailer without a stop frame".to_owned())
    }

    /// The rest of the file's frames are unknown.
    fn give_up(&mut self, b: &Body<'_>) {
        self.out.unknown_from = Some(b.prev_end);
    }

    /// The header at `b.pos`, refused when a data or zero frame is out of order or
    /// runs past the disk's end.
    fn checked_header(&mut self, b: &Body<'_>) -> std::result::Result<FrameHeader, (Harm, String)> {
        let h = self.header(b.pos)?;
        let misplaced = matches!(h.kind, FrameKind::Data | FrameKind::Zero)
            && (h.start < b.prev_end
                || h.start
                    .checked_add(h.length)
                    .is_none_or(|e| e > b.meta.virtual_size));
        if misplaced {
            return Err((
                Harm::Corrupt,
                format!(
                    "frame header for disk bytes {}+{} is out of order or past the disk's end ({})",
                    h.start, h.length, b.meta.virtual_size
                ),
            ));
        }
        Ok(h)
    }

    /// A header that cannot be trusted: a compressed stream can be followed past it
    /// (what that frame covered lies before the next one); otherwise the file ends here.
    fn bad_header(&mut self, b: &mut Body<'_>, harm: Harm, reason: String) -> Step {
        self.out.fault(harm, b.pos, reason);
        let stored = entry(&mut b.trailer, b.data_frames)
            .filter(|_| b.trailer_agrees)
            .map(|e| e.stored_len());
        let step = (harm == Harm::Corrupt && b.compressed)
            .then(|| self.step_over(b.pos, b.prev_end, stored, b.body_end))
            .flatten();
        let Some((next, nh, data)) = step else {
            self.give_up(b);
            return Step::End;
        };
        let end = match nh.kind {
            FrameKind::Stop => b.meta.virtual_size,
            _ => nh.start,
        };
        self.out.unknown.push((b.prev_end, end));
        b.data_frames += usize::from(data);
        b.pos = next;
        Step::Next
    }

    fn zero_frame(&mut self, b: &mut Body<'_>, h: &FrameHeader) -> Result<Step> {
        b.prev_end = h.end();
        self.log.push(&Frame::zero(h.start, h.length, b.pos))?;
        b.pos += HEADER_LEN as u64;
        Ok(Step::Next)
    }

    /// A data frame: its payload read (and decoded), logged when it passes.
    fn data_frame(&mut self, b: &mut Body<'_>, h: &FrameHeader) -> Result<Step> {
        b.prev_end = h.end();
        let entry = entry(&mut b.trailer, b.data_frames);
        b.data_frames += 1;
        b.data_sum = b.data_sum.saturating_add(h.length);
        let payload = b.pos + HEADER_LEN as u64;
        let taken = if b.compressed {
            self.lz4_payload(payload, h.length, b.body_end, b.trailer.is_none())?
        } else {
            self.raw_payload(payload, h.length)
        };
        let (stored, lz4_frames) = match taken {
            Ok(t) => t,
            Err(f) => {
                let stored = if b.compressed {
                    entry.filter(|_| b.trailer_agrees).map(|e| e.stored_len())
                } else {
                    Some(h.length)
                };
                return Ok(self.lost_payload(b, h, stored, f));
            }
        };
        if entry.as_ref().is_some_and(|e| e.frames != lz4_frames) {
            b.trailer_agrees = false;
        }
        self.log
            .push(&Frame::data(h.start, h.length, b.pos, stored, lz4_frames))?;
        b.pos = payload + stored + 2;
        Ok(Step::Next)
    }

    /// A data frame whose payload is lost: a stored length still trusted lets the pass
    /// go on after it, if the next header is where it says.
    fn lost_payload(
        &mut self,
        b: &mut Body<'_>,
        h: &FrameHeader,
        stored: Option<u64>,
        f: PayloadFault,
    ) -> Step {
        let harm = if f.truncated {
            Harm::Truncated
        } else {
            Harm::Corrupt
        };
        self.out.fault(harm, f.offset, f.reason.clone());
        self.out.lost.push(LostFrame {
            start: h.start,
            len: h.length,
            why: f.reason,
        });
        let payload = b.pos + HEADER_LEN as u64;
        let next = stored
            .filter(|_| !f.truncated)
            .and_then(|s| payload.checked_add(s)?.checked_add(2))
            .filter(|&n| self.header_after(n, b.prev_end, b.body_end, true).is_some());
        match next {
            Some(n) => {
                b.pos = n;
                Step::Next
            }
            None => {
                self.give_up(b);
                Step::End
            }
        }
    }
}
