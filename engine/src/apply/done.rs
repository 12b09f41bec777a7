//! What the final check of a disk needs, kept with bounded memory: the pieces read
//! back, in disk order ([`DoneLog`]), and the storage they use ([`SharedCheck`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use crate::error::{Error, Result};

/// One piece handed to the target: disk range, xxh3 of its bytes and (once read back)
/// a digest of where the target stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Written {
    pub offset: u64,
    pub len: u64,
    pub hash: u64,
    pub placed: u64,
}

impl Written {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Pieces read back kept in memory for the final check; more go to a temporary file.
const DONE_IN_MEMORY: usize = 64 << 10;

/// The pieces read back, in write (= disk) order, for the final check: in memory up
/// to [`DONE_IN_MEMORY`], older ones in an unnamed temporary file (32 bytes each), so a
/// disk of millions of separate pieces needs no memory per piece.
#[derive(Debug, Default)]
pub(super) struct DoneLog {
    mem: Vec<Written>,
    file: Option<BufWriter<File>>,
    spilled: u64,
}

impl DoneLog {
    pub fn push(&mut self, w: Written) -> Result<()> {
        if self.mem.len() >= DONE_IN_MEMORY {
            self.spill()?;
        }
        self.mem.push(w);
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        let err = |e| {
            Error::internal(format!(
                "cannot keep the read-back list in a temporary file: {e}"
            ))
        };
        if self.file.is_none() {
            self.file = Some(BufWriter::with_capacity(
                64 << 10,
                tempfile::tempfile().map_err(err)?,
            ));
        }
        if let Some(f) = self.file.as_mut() {
            for w in self.mem.drain(..) {
                let mut rec = [0u8; 32];
                for (i, v) in [w.offset, w.len, w.hash, w.placed].into_iter().enumerate() {
                    rec[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
                f.write_all(&rec).map_err(err)?;
                self.spilled += 1;
            }
        }
        Ok(())
    }

    /// Calls `f` for every piece, in order.
    pub fn for_each(&mut self, mut f: impl FnMut(Written) -> Result<()>) -> Result<()> {
        let err = |e| Error::internal(format!("cannot read the read-back list back: {e}"));
        if let Some(w) = self.file.take() {
            let mut file = w.into_inner().map_err(|e| err(e.into_error()))?;
            file.seek(SeekFrom::Start(0)).map_err(err)?;
            let mut r = BufReader::with_capacity(64 << 10, file);
            let mut rec = [0u8; 32];
            for _ in 0..self.spilled {
                r.read_exact(&mut rec).map_err(err)?;
                let v = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&rec[i * 8..i * 8 + 8]);
                    u64::from_le_bytes(b)
                };
                f(Written {
                    offset: v(0),
                    len: v(1),
                    hash: v(2),
                    placed: v(3),
                })?;
            }
        }
        for w in self.mem.drain(..) {
            f(w)?;
        }
        Ok(())
    }
}

/// "No two pieces share storage", checked one piece at a time in disk order: with a
/// mapping granule (a qcow2 cluster), a host granule may hold data of one guest
/// granule only, and pieces come in guest order, so it suffices to remember which
/// host granules earlier guest granules used — as runs, which a fresh image allocated
/// in order keeps few. Without a granule, host byte ranges are kept as runs.
pub(super) struct SharedCheck {
    granule: u64,
    /// Host units (granules, or bytes) used so far: start -> end.
    used: BTreeMap<u64, u64>,
    /// The last (host, guest) granule pair seen.
    last: Option<(u64, u64)>,
}

impl SharedCheck {
    pub fn new(granule: Option<u64>) -> Self {
        Self {
            granule: granule.filter(|&g| g > 0).unwrap_or(1),
            used: BTreeMap::new(),
            last: None,
        }
    }

    /// Records host units `[s, e)`; false when any was recorded before.
    fn claim(&mut self, s: u64, e: u64) -> bool {
        if let Some((_, &pe)) = self.used.range(..e).next_back() {
            if pe > s {
                return false;
            }
        }
        let (mut s2, mut e2) = (s, e);
        if let Some((&ps, &pe)) = self.used.range(..=s).next_back() {
            if pe == s {
                s2 = ps;
                self.used.remove(&ps);
            }
        }
        if let Some(&ne) = self.used.get(&e) {
            e2 = ne;
            self.used.remove(&e);
        }
        self.used.insert(s2, e2);
        true
    }

    /// Host range `[h, h + l)` holds guest bytes from `guest`; the disk offset of the
    /// other piece when it was used before.
    pub fn check(&mut self, h: u64, l: u64, guest: u64) -> bool {
        let g = self.granule;
        if g == 1 {
            return self.claim(h, h + l);
        }
        let mut hg = h / g;
        let last_hg = (h + l - 1) / g;
        let mut gg = guest / g;
        while hg <= last_hg {
            if self.last != Some((hg, gg)) {
                if !self.claim(hg, hg + 1) {
                    return false;
                }
                self.last = Some((hg, gg));
            }
            hg += 1;
            gg += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_storage_is_found_across_runs() {
        let mut c = SharedCheck::new(Some(65536));
        // two pieces of one guest cluster share its host cluster
        assert!(c.check(0, 4096, 0));
        assert!(c.check(8192, 4096, 8192));
        // the next guest clusters, host clusters in order (joined into one run)
        assert!(c.check(65536, 65536 * 3, 65536));
        assert_eq!(c.used.len(), 1);
        // a later guest cluster mapped onto host cluster 2 again
        assert!(!c.check(2 * 65536 + 100, 10, 9 * 65536));
        let mut b = SharedCheck::new(None);
        assert!(b.check(10, 10, 0));
        assert!(b.check(20, 5, 100));
        assert!(!b.check(15, 1, 200));
        assert_eq!(b.used.len(), 1);
    }

    #[test]
    fn done_log_spills_and_reads_back_in_order() {
        let mut log = DoneLog::default();
        let n = DONE_IN_MEMORY as u64 * 2 + 7;
        for i in 0..n {
            log.push(Written {
                offset: i * 10,
                len: 5,
                hash: i ^ 0xabc,
                placed: i,
            })
            .expect("push");
        }
        assert!(log.spilled > 0);
        let mut next = 0u64;
        log.for_each(|w| {
            assert_eq!(w.offset, next * 10);
            assert_eq!(w.hash, next ^ 0xabc);
            next += 1;
            Ok(())
        })
        .expect("read back");
        assert_eq!(next, n);
    }
}
