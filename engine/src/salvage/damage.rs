//! From what each chain member claims to the damaged ranges of the guest disk.
//!
//! Every member lays its claims over the disk, oldest first, newest winning (as the
//! plan's extent map does with data): frames that were used, frames whose data is
//! lost, frames of an interrupted backup that are not used, and ranges nobody can
//! know (a missing file: the whole disk; a file that ends early: everything after
//! its last readable frame, since frames are in disk order). Where the newest claim
//! is not a used frame, the byte holds the newest *older* version the plan uses
//! (stale) or, when there is none, zeros (missing). Where it is a used frame of a
//! file whose checksum fails, the byte is unverified.

use std::collections::BTreeMap;

use super::{DamagedRange, RangeState};
use crate::extent::ExtentMap;

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
    /// Its claims: disk ranges `(start, len)` in any order.
    pub claims: Vec<(u64, u64, Claim)>,
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
}

/// Non-overlapping ranges keyed by start, newest wins; the value is an index.
#[derive(Debug, Default)]
struct Overlay {
    map: BTreeMap<u64, (u64, usize)>,
}

impl Overlay {
    fn insert(&mut self, start: u64, len: u64, v: usize) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        let mut hit: Vec<(u64, u64, usize)> = Vec::new();
        if let Some((&s, &(l, x))) = self.map.range(..start).next_back() {
            if s + l > start {
                hit.push((s, l, x));
            }
        }
        hit.extend(self.map.range(start..end).map(|(&s, &(l, x))| (s, l, x)));
        for (s, l, x) in hit {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, (start - s, x));
            }
            if s + l > end {
                self.map.insert(end, (s + l - end, x));
            }
        }
        self.map.insert(start, (end - start, v));
    }
}

/// The damaged ranges of a disk of `size` bytes restored from `layers` (chain order)
/// with the data map `used` (what the plan writes). Sorted, adjacent equal ranges
/// merged.
pub(crate) fn ranges(layers: &[Layer], used: &ExtentMap, size: u64) -> Vec<DamagedRange> {
    // (layer, claim) per index
    let mut claims: Vec<(usize, &Claim)> = Vec::new();
    let mut overlay = Overlay::default();
    for (i, l) in layers.iter().enumerate() {
        for (start, len, c) in &l.claims {
            let end = start.saturating_add(*len).min(size);
            if *start < end {
                claims.push((i, c));
                overlay.insert(*start, end - start, claims.len() - 1);
            }
        }
    }
    let mut out: Vec<DamagedRange> = Vec::new();
    for (&start, &(len, id)) in &overlay.map {
        let (li, claim) = claims[id];
        let l = &layers[li];
        match claim {
            Claim::Used => {
                if let Some(why) = &l.suspect {
                    push(&mut out, start, len, RangeState::Unverified, why, &l.name);
                }
            }
            Claim::Lost(why) => {
                let stale = format!(
                    "changed at checkpoint {}, but that data is lost ({why}); the older version is used",
                    l.checkpoint
                );
                let missing = format!("data lost ({why}); zeros written");
                split(&mut out, used, start, len, (&stale, &missing), &l.name);
            }
            Claim::NotUsed => {
                let stale = format!(
                    "changed at checkpoint {} by the interrupted backup {}, whose data is not used; the older version is used",
                    l.checkpoint, l.name
                );
                let missing = format!(
                    "changed at checkpoint {} by the interrupted backup {}, whose data is not used; zeros written",
                    l.checkpoint, l.name
                );
                split(&mut out, used, start, len, (&stale, &missing), &l.name);
            }
            Claim::Unknown => {
                let stale = format!(
                    "possibly stale: {} cannot be known ({} {}); older data is used",
                    l.after(),
                    l.name,
                    l.unknown_why
                );
                let missing = format!(
                    "missing: {} {}; what it held from here on cannot be known; zeros written",
                    l.name, l.unknown_why
                );
                split(&mut out, used, start, len, (&stale, &missing), &l.name);
            }
        }
    }
    out
}

/// `[start, start + len)` as stale where `used` has an older version, missing where
/// it has none.
fn split(
    out: &mut Vec<DamagedRange>,
    used: &ExtentMap,
    start: u64,
    len: u64,
    (stale, missing): (&str, &str),
    file: &str,
) {
    let end = start + len;
    let mut pos = start;
    for e in used.iter() {
        if e.end() <= pos {
            continue;
        }
        if e.start >= end {
            break;
        }
        if e.start > pos {
            push(out, pos, e.start - pos, RangeState::Missing, missing, file);
        }
        let s = e.start.max(pos);
        let t = e.end().min(end);
        push(out, s, t - s, RangeState::Stale, stale, file);
        pos = t;
    }
    if pos < end {
        push(out, pos, end - pos, RangeState::Missing, missing, file);
    }
}

fn push(
    out: &mut Vec<DamagedRange>,
    offset: u64,
    length: u64,
    state: RangeState,
    why: &str,
    file: &str,
) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.offset + last.length == offset
            && last.state == state
            && last.why == why
            && last.file == file
        {
            last.length += length;
            return;
        }
    }
    out.push(DamagedRange {
        offset,
        length,
        state,
        why: why.to_owned(),
        file: file.to_owned(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Source;

    fn layer(name: &str, k: u32, claims: Vec<(u64, u64, Claim)>) -> Layer {
        Layer {
            name: name.into(),
            checkpoint: k,
            diff: false,
            claims,
            unknown_why: "is missing".into(),
            suspect: None,
        }
    }

    fn d(file: u32) -> Source {
        Source::Data { file, frame: 0 }
    }

    #[test]
    fn missing_incremental_makes_all_but_newer_frames_stale() {
        // full tiles 0..100 (data 0..10, zero 10..100); inc 1 missing; inc 2 data 50..60
        let layers = vec![
            layer("full", 0, vec![(0, 10, Claim::Used), (10, 90, Claim::Used)]),
            layer("inc1", 1, vec![(0, 100, Claim::Unknown)]),
            layer("inc2", 2, vec![(50, 10, Claim::Used)]),
        ];
        let mut used = ExtentMap::new();
        used.insert(0, 10, d(0));
        used.insert(10, 90, Source::Zero);
        used.insert(50, 10, d(1));
        let r = ranges(&layers, &used, 100);
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
        let mut used = ExtentMap::new();
        used.insert(0, 10, d(0));
        let r = ranges(&layers, &used, 100);
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
        let mut used = ExtentMap::new();
        used.insert(0, 100, d(0));
        used.insert(40, 20, d(1));
        let r = ranges(&layers, &used, 100);
        let got: Vec<_> = r.iter().map(|r| (r.offset, r.length, r.state)).collect();
        assert_eq!(
            got,
            vec![
                (0, 40, RangeState::Unverified),
                (60, 40, RangeState::Unverified)
            ]
        );
    }
}
