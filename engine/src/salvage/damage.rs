//! From what each chain member claims to the damaged ranges of the guest disk.
//!
//! Every member lays its claims over the disk, oldest first, newest winning (as the
//! plan's merge does with data): frames that were used, frames whose data is lost,
//! frames of an interrupted backup that are not used, and ranges nobody can know (a
//! missing file: the whole disk; a file that ends early: everything after its last
//! readable frame, since frames are in disk order). Where the newest claim is not a
//! used frame, the byte holds the newest *older* version the plan uses (stale) or,
//! when there is none, zeros (missing). Where it is a used frame of a file whose
//! checksum fails, the byte is unverified.
//!
//! One sweep in disk order over every member's claims side by side (its frames read
//! back from the walk's [`FrameLog`], its few other claims from memory): memory per
//! member, not per frame. The list of ranges is bounded too ([`MAX_RANGES`]); the
//! byte counts always cover every range.

use super::{DamagedRange, RangeState};
use crate::error::Result;
use crate::framelog::{FrameLog, FrameLogReader};

/// Ranges listed in a damage report per state (missing, stale, unverified); more are
/// counted (bytes and number), not listed. A disk of 16,000,000 extents over a
/// missing incremental can alternate stale and missing at every extent: 10,000
/// ranges are ~1.5 MB here and in the map. Per state, so thousands of one-byte
/// unverified ranges never hide a large missing one after them.
pub const MAX_RANGES: usize = 10_000;

/// What one member says about a disk range.
#[derive(Debug, Clone)]
pub(crate) enum Claim {
    /// A frame that is used (data or zero).
    Used,
    /// A data frame whose data is lost: why.
    Lost(String),
    /// A frame of an interrupted backup, not used.
    NotUsed,
    /// Unknown: the member's frames here could not be read.
    Unknown,
}

/// One chain member, as the map needs it.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    /// File name.
    pub name: String,
    /// Checkpoint of the member (a differential: the one it was taken on).
    pub checkpoint: u32,
    /// A differential (holds the changes since `checkpoint`).
    pub diff: bool,
    /// Its frames as the walk kept them, and what they claim (used or not).
    pub frames: Option<(FrameLog, Claim)>,
    /// Its other claims: disk ranges `(start, len)` in disk order, overlapping
    /// neither each other nor the frames (lost frames, unknown spans, a raw image,
    /// a missing file). At most one per damaged place of the file.
    pub marks: Vec<(u64, u64, Claim)>,
    /// Why its unknown ranges are unknown ("is missing", "is truncated at byte N: …").
    pub unknown_why: String,
    /// Why its used frames are unverified, when they are.
    pub suspect: Option<String>,
}

impl Layer {
    /// "ranges changed after checkpoint K": the state this member builds on.
    fn after(&self) -> String {
        match (self.diff, self.checkpoint) {
            (true, k) => format!("ranges changed after checkpoint {k}"),
            (false, 0) => "ranges of checkpoint 0".to_owned(),
            (false, k) => format!("ranges changed after checkpoint {}", k - 1),
        }
    }

    /// The (stale, missing) words of a claim that is not a used frame.
    fn words(&self, claim: &Claim) -> (String, String) {
        match claim {
            Claim::Lost(why) => (
                format!(
                    "changed at checkpoint {}, but that data is lost ({why}); the older version is used",
                    self.checkpoint
                ),
                format!("data lost ({why}); zeros written"),
            ),
            Claim::NotUsed => (
                format!(
                    "changed at checkpoint {} by the interrupted backup {}, whose data is not used; the older version is used",
                    self.checkpoint, self.name
                ),
                format!(
                    "changed at checkpoint {} by the interrupted backup {}, whose data is not used; zeros written",
                    self.checkpoint, self.name
                ),
            ),
            Claim::Unknown | Claim::Used => (
                format!(
                    "possibly stale: {} cannot be known ({} {}); older data is used",
                    self.after(),
                    self.name,
                    self.unknown_why
                ),
                format!(
                    "missing: {} {}; what it held from here on cannot be known; zeros written",
                    self.name, self.unknown_why
                ),
            ),
        }
    }
}

/// The damaged ranges: the first [`MAX_RANGES`] of each state listed, all counted.
#[derive(Debug, Default)]
pub(crate) struct Ranges {
    /// Sorted, adjacent equal ranges merged.
    pub list: Vec<DamagedRange>,
    /// Bytes by state: missing, stale, unverified.
    pub bytes: [u64; 3],
    /// Ranges not listed.
    pub omitted: u64,
    /// Listed ranges by state.
    listed: [usize; 3],
    /// The last range when it is not listed (to merge the next one into); `None`:
    /// the last range is the last of `list`.
    unlisted: Option<DamagedRange>,
}

/// Index of `state` in [`Ranges::bytes`].
pub(crate) fn slot(state: RangeState) -> usize {
    match state {
        RangeState::Missing => 0,
        RangeState::Stale => 1,
        RangeState::Unverified => 2,
    }
}

impl Ranges {
    fn push(&mut self, offset: u64, length: u64, state: RangeState, why: &str, file: &str) {
        if length == 0 {
            return;
        }
        self.bytes[slot(state)] += length;
        let last = match self.unlisted {
            Some(_) => self.unlisted.as_mut(),
            None => self.list.last_mut(),
        };
        if let Some(last) = last {
            if last.offset + last.length == offset
                && last.state == state
                && last.why == why
                && last.file == file
            {
                last.length += length;
                return;
            }
        }
        let r = DamagedRange {
            offset,
            length,
            state,
            why: why.to_owned(),
            file: file.to_owned(),
        };
        if self.listed[slot(state)] < MAX_RANGES {
            self.listed[slot(state)] += 1;
            self.list.push(r);
            self.unlisted = None;
        } else {
            self.omitted += 1;
            self.unlisted = Some(r);
        }
    }
}

/// One member's claims in disk order: its frames and its marks, side by side.
struct Claims<'a> {
    layer: &'a Layer,
    frames: Option<(FrameLogReader, &'a Claim)>,
    /// The next frame not yet current: `[start, end)`.
    next_frame: Option<(u64, u64)>,
    /// The next mark not yet current.
    mark: usize,
    /// The current claim: `[start, end)`.
    cur: Option<(u64, u64, &'a Claim)>,
}

impl<'a> Claims<'a> {
    fn new(layer: &'a Layer, size: u64) -> Result<Self> {
        let mut c = Self {
            layer,
            frames: layer.frames.as_ref().map(|(l, claim)| (l.reader(), claim)),
            next_frame: None,
            mark: 0,
            cur: None,
        };
        c.read_frame(size)?;
        c.advance(size)?;
        Ok(c)
    }

    /// Reads the next frame (cut off at `size`) into `next_frame`.
    fn read_frame(&mut self, size: u64) -> Result<()> {
        self.next_frame = None;
        let Some((r, _)) = &mut self.frames else {
            return Ok(());
        };
        while let Some(f) = r.next_frame()? {
            let end = f.end().min(size);
            if f.start < end {
                self.next_frame = Some((f.start, end));
                return Ok(());
            }
        }
        Ok(())
    }

    /// Makes the earlier of the next frame and the next mark current.
    fn advance(&mut self, size: u64) -> Result<()> {
        let marks = &self.layer.marks;
        // marks past the disk's end (a disk that shrank) or empty are not claims
        while let Some(&(s, len, _)) = marks.get(self.mark) {
            if s < s.saturating_add(len).min(size) {
                break;
            }
            self.mark += 1;
        }
        let mark = marks.get(self.mark);
        let frame = match (self.next_frame, mark) {
            (Some((s, e)), Some(m)) if s <= m.0 => Some((s, e)),
            (Some(f), None) => Some(f),
            _ => None,
        };
        self.cur = match (frame, mark, &self.frames) {
            (Some((s, e)), _, Some((_, claim))) => {
                let claim: &'a Claim = claim;
                self.read_frame(size)?;
                Some((s, e, claim))
            }
            (_, Some((s, len, claim)), _) => {
                self.mark += 1;
                Some((*s, s.saturating_add(*len).min(size), claim))
            }
            _ => None,
        };
        Ok(())
    }
}

/// The damaged ranges of a disk of `size` bytes restored from `layers` (chain
/// order). A byte no used frame covers was written as zeros.
pub(crate) fn ranges(layers: &[Layer], size: u64) -> Result<Ranges> {
    let mut claims = layers
        .iter()
        .map(|l| Claims::new(l, size))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Ranges::default();
    // the words of the last claim that needed them (a claim spans many pieces)
    let mut words: Option<(*const Claim, String, String)> = None;
    let mut pos = 0u64;
    while pos < size {
        let mut top: Option<(usize, &Claim)> = None;
        let mut used = false;
        let mut next = size;
        for (i, c) in claims.iter_mut().enumerate() {
            while c.cur.is_some_and(|(_, e, _)| e <= pos) {
                c.advance(size)?;
            }
            match c.cur {
                Some((s, e, claim)) if s <= pos => {
                    top = Some((i, claim));
                    used |= matches!(claim, Claim::Used);
                    next = next.min(e);
                }
                Some((s, _, _)) => next = next.min(s),
                None => {}
            }
        }
        if let Some((i, claim)) = top {
            let l = &layers[i];
            let len = next - pos;
            match claim {
                Claim::Used => {
                    if let Some(why) = &l.suspect {
                        out.push(pos, len, RangeState::Unverified, why, &l.name);
                    }
                }
                _ => {
                    if !words.as_ref().is_some_and(|w| std::ptr::eq(w.0, claim)) {
                        let (stale, missing) = l.words(claim);
                        words = Some((claim, stale, missing));
                    }
                    if let Some((_, stale, missing)) = &words {
                        // a used frame here is older than this claim
                        let (state, why) = if used {
                            (RangeState::Stale, stale)
                        } else {
                            (RangeState::Missing, missing)
                        };
                        out.push(pos, len, state, why, &l.name);
                    }
                }
            }
        }
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framelog::FrameLogWriter;
    use nbdfmt::Frame;

    fn layer(name: &str, k: u32, claims: Vec<(u64, u64, Claim)>) -> Layer {
        Layer {
            name: name.into(),
            checkpoint: k,
            diff: false,
            frames: None,
            marks: claims,
            unknown_why: "is missing".into(),
            suspect: None,
        }
    }

    #[test]
    fn missing_incremental_makes_all_but_newer_frames_stale() {
        // full tiles 0..100 (data 0..10, zero 10..100); inc 1 missing; inc 2 data 50..60
        let layers = vec![
            layer("full", 0, vec![(0, 10, Claim::Used), (10, 90, Claim::Used)]),
            layer("inc1", 1, vec![(0, 100, Claim::Unknown)]),
            layer("inc2", 2, vec![(50, 10, Claim::Used)]),
        ];
        let r = ranges(&layers, 100).expect("ranges").list;
        let got: Vec<_> = r.iter().map(|r| (r.offset, r.length, r.state)).collect();
        assert_eq!(
            got,
            vec![(0, 50, RangeState::Stale), (60, 40, RangeState::Stale)]
        );
        assert!(r[0].why.starts_with(
            "possibly stale: ranges changed after checkpoint 0 cannot be known (inc1 is missing)"
        ));
        assert_eq!(r[0].file, "inc1");
    }

    #[test]
    fn truncated_full_is_missing_and_lost_inc_frame_stale() {
        // full: data 0..10 used, data 10..20 lost, unknown from 20; inc 1 lost 0..5
        let layers = vec![
            layer(
                "full",
                0,
                vec![
                    (0, 10, Claim::Used),
                    (10, 10, Claim::Lost("cut".into())),
                    (20, 80, Claim::Unknown),
                ],
            ),
            layer("inc1", 1, vec![(0, 5, Claim::Lost("bad lz4".into()))]),
        ];
        let r = ranges(&layers, 100).expect("ranges").list;
        let got: Vec<_> = r.iter().map(|r| (r.offset, r.length, r.state)).collect();
        assert_eq!(
            got,
            vec![
                (0, 5, RangeState::Stale),
                (10, 10, RangeState::Missing),
                (20, 80, RangeState::Missing)
            ]
        );
        assert_eq!(r[0].file, "inc1");
        assert_eq!(r[1].file, "full");
    }

    #[test]
    fn suspect_used_frames_are_unverified_where_they_survive() {
        let mut full = layer("full", 0, vec![(0, 100, Claim::Used)]);
        full.suspect = Some("bad chksum".into());
        let layers = vec![full, layer("inc1", 1, vec![(40, 20, Claim::Used)])];
        let r = ranges(&layers, 100).expect("ranges").list;
        let got: Vec<_> = r.iter().map(|r| (r.offset, r.length, r.state)).collect();
        assert_eq!(
            got,
            vec![
                (0, 40, RangeState::Unverified),
                (60, 40, RangeState::Unverified)
            ]
        );
    }

    fn spans(r: &Ranges) -> Vec<(u64, u64, RangeState)> {
        r.list
            .iter()
            .map(|r| (r.offset, r.length, r.state))
            .collect()
    }

    fn log(frames: &[(u64, u64)]) -> FrameLog {
        let mut w = FrameLogWriter::new(None).expect("log");
        let mut header = 1000;
        for &(start, length) in frames {
            let f = Frame::data(start, length, header, length, Vec::new());
            header = f.payload_offset + length + 2;
            w.push(&f).expect("push");
        }
        w.finish().expect("finish")
    }

    #[test]
    fn frames_from_a_log_claim_like_marks_and_mix_with_them() {
        // full: frames 0..10, 20..30, lost 30..40, unknown from 40; inc1: a frame 5..25
        let mut full = layer(
            "full",
            0,
            vec![
                (30, 10, Claim::Lost("bad".into())),
                (40, 60, Claim::Unknown),
            ],
        );
        full.frames = Some((log(&[(0, 10), (20, 10)]), Claim::Used));
        let mut inc = layer("inc1", 1, Vec::new());
        inc.frames = Some((log(&[(5, 20)]), Claim::Used));
        let r = ranges(&[full, inc], 100).expect("ranges");
        let got = spans(&r);
        assert_eq!(
            got,
            vec![(30, 10, RangeState::Missing), (40, 60, RangeState::Missing)]
        );
        assert_eq!(r.bytes, [70, 0, 0]);
    }

    #[test]
    fn an_interrupted_incrementals_frames_are_stale_over_older_data() {
        let mut full = layer("full", 0, Vec::new());
        full.frames = Some((log(&[(0, 50)]), Claim::Used));
        let mut part = layer("inc1", 1, vec![(60, 40, Claim::Unknown)]);
        part.frames = Some((log(&[(40, 20)]), Claim::NotUsed));
        let r = ranges(&[full, part], 100).expect("ranges");
        let got = spans(&r);
        assert_eq!(
            got,
            vec![
                (40, 10, RangeState::Stale),
                (50, 10, RangeState::Missing),
                (60, 40, RangeState::Missing)
            ]
        );
    }

    #[test]
    fn ranges_past_the_cap_are_counted_not_listed() {
        // a base of many one-byte frames with gaps, under a missing incremental:
        // stale and missing alternate at every byte
        let n = MAX_RANGES as u64 + 500;
        let frames: Vec<(u64, u64)> = (0..n).map(|i| (2 * i, 1)).collect();
        let mut full = layer("full", 0, Vec::new());
        full.frames = Some((log(&frames), Claim::Used));
        let missing = layer("inc1", 1, vec![(0, u64::MAX, Claim::Unknown)]);
        let r = ranges(&[full, missing], 2 * n).expect("ranges");
        // each state lists its first MAX_RANGES
        assert_eq!(r.list.len(), 2 * MAX_RANGES);
        assert_eq!(r.omitted, 2 * n - 2 * MAX_RANGES as u64);
        assert_eq!(r.bytes, [n, n, 0]);
        assert_eq!(
            r.list
                .iter()
                .filter(|x| x.state == RangeState::Missing)
                .count(),
            MAX_RANGES
        );
    }
}
