//! `ExtentMap`: the final content of a disk as non-overlapping extents, newest wins.

use std::collections::BTreeMap;

/// Where an extent's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reads as zero (a base stream's zero frame).
    Zero,
    /// Data frame `frame` of chain file `file`; the byte for disk offset `o` is the
    /// frame's decoded payload at `o - frame.start`.
    Data {
        /// Index into the disk plan's files.
        file: u32,
        /// Index into that file's frames.
        frame: u32,
    },
}

/// A disk range and its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Disk offset.
    pub start: u64,
    /// Length (> 0).
    pub len: u64,
    /// Source.
    pub source: Source,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Non-overlapping extents keyed by start. Ranges not covered read as zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, Source)>,
}

impl ExtentMap {
    /// An empty map (all zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Lays `[start, start + len)` over the map: whatever was there is replaced.
    /// Cost: O(log n + overlapped extents).
    pub fn insert(&mut self, start: u64, len: u64, source: Source) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        // The extent starting before `start` may reach into the new range.
        let mut hit: Vec<(u64, u64, Source)> = Vec::new();
        if let Some((&s, &(l, src))) = self.map.range(..start).next_back() {
            if s + l > start {
                hit.push((s, l, src));
            }
        }
        hit.extend(
            self.map
                .range(start..end)
                .map(|(&s, &(l, src))| (s, l, src)),
        );
        for (s, l, src) in hit {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, (start - s, src));
            }
            if s + l > end {
                self.map.insert(end, (s + l - end, src));
            }
        }
        self.map.insert(start, (end - start, source));
    }

    /// Extents in disk order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.map
            .iter()
            .map(|(&start, &(len, source))| Extent { start, len, source })
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing was inserted.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes covered by data extents.
    pub fn data_bytes(&self) -> u64 {
        self.iter()
            .filter(|e| matches!(e.source, Source::Data { .. }))
            .map(|e| e.len)
            .sum()
    }

    /// Ranges of `[0, size)` that are not data (zero extents and gaps), merged.
    pub fn zero_ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, e: u64| {
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => out.push((s, e - s)),
            }
        };
        let mut pos = 0;
        for e in self.iter() {
            if e.start >= size {
                break;
            }
            push(pos, e.start);
            if matches!(e.source, Source::Zero) {
                push(e.start, e.end().min(size));
            }
            pos = e.end();
        }
        push(pos.min(size), size);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(file: u32) -> Source {
        Source::Data { file, frame: 0 }
    }

    #[test]
    fn newest_wins_and_splits() {
        let mut m = ExtentMap::new();
        m.insert(0, 100, d(0));
        m.insert(10, 10, d(1));
        m.insert(90, 20, Source::Zero);
        let v: Vec<_> = m.iter().map(|e| (e.start, e.len, e.source)).collect();
        assert_eq!(
            v,
            vec![
                (0, 10, d(0)),
                (10, 10, d(1)),
                (20, 70, d(0)),
                (90, 20, Source::Zero)
            ]
        );
        assert_eq!(m.zero_ranges(200), vec![(90, 110)]);
        assert_eq!(m.data_bytes(), 90);
    }

    proptest! {
        /// The map equals a naive per-byte model under any sequence of inserts.
        #[test]
        fn matches_byte_model(ops in proptest::collection::vec((0u64..200, 0u64..60, 0u32..4), 0..60)) {
            let mut m = ExtentMap::new();
            let mut model = vec![None::<Source>; 300];
            for (i, (s, l, k)) in ops.iter().enumerate() {
                let src = if *k == 0 { Source::Zero } else { Source::Data { file: i as u32, frame: *k } };
                m.insert(*s, *l, src);
                for b in &mut model[*s as usize..(*s + *l) as usize] { *b = Some(src); }
            }
            let mut got = vec![None::<Source>; 300];
            let mut prev_end = 0;
            for e in m.iter() {
                prop_assert!(e.start >= prev_end && e.len > 0);
                prev_end = e.end();
                for b in &mut got[e.start as usize..e.end() as usize] { *b = Some(e.source); }
            }
            prop_assert_eq!(got, model);
        }
    }
}
