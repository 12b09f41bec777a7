//! [`Lz4Cache`]: decoded LZ4 frames shared by the readers of a server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::Result;

/// Default size of the decoded-LZ4 cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// What an entry is counted as besides its bytes: its map and order entries, slot
/// and `Arc`s take ~300–400 bytes (hash table slack included); counting 1 KiB keeps
/// a cache of tiny frames at ~25 MiB real. A disk of millions of one-byte LZ4 frames
/// held 4,000,000 entries (1.1 GB) under a 64 MiB cap that counted bytes only.
const ENTRY_COST: usize = 1024;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reader id, chain file, data frame, LZ4 frame.
pub(super) type Key = (u64, u32, u32, u32);

#[derive(Debug, Default)]
struct Slot {
    data: Mutex<Option<Arc<Vec<u8>>>>,
}

#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    last_use: u64,
    /// Decoded bytes held (0 while decoding).
    size: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<Key, Entry>,
    /// Keys by last use, oldest first (eviction in O(log n), not a scan).
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
    hits: u64,
    misses: u64,
}

/// Decoded LZ4 frames, least recently used evicted first; shared by all readers of a
/// server. Frames larger than half the capacity are never cached (they are decoded
/// as a stream up to the requested range instead).
#[derive(Debug)]
pub struct Lz4Cache {
    cap: usize,
    inner: Mutex<CacheInner>,
}

impl Lz4Cache {
    /// A cache holding at most `cap` decoded bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    /// Largest frame that is cached.
    pub fn max_entry(&self) -> usize {
        self.cap / 2
    }

    /// (hits, misses, bytes held) so far.
    pub fn stats(&self) -> (u64, u64, usize) {
        let g = lock(&self.inner);
        (g.hits, g.misses, g.bytes)
    }

    /// The decoded frame for `key`, decoding it with `decode` on a miss. Concurrent
    /// callers with the same key wait for one decoder.
    pub(super) fn get_or_decode(
        &self,
        key: Key,
        decode: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        let slot = {
            let mut g = lock(&self.inner);
            g.tick += 1;
            let tick = g.tick;
            let e = g.map.entry(key).or_insert_with(|| Entry {
                slot: Arc::new(Slot::default()),
                last_use: tick,
                size: 0,
            });
            let before = std::mem::replace(&mut e.last_use, tick);
            let slot = e.slot.clone();
            g.order.remove(&before);
            g.order.insert(tick, key);
            slot
        };
        let mut data = lock(&slot.data);
        if let Some(d) = &*data {
            lock(&self.inner).hits += 1;
            return Ok(d.clone());
        }
        let decoded = match decode() {
            Ok(d) => Arc::new(d),
            Err(e) => {
                drop(data);
                let mut g = lock(&self.inner);
                if g.map.get(&key).is_some_and(|e| Arc::ptr_eq(&e.slot, &slot)) {
                    if let Some(e) = g.map.remove(&key) {
                        g.order.remove(&e.last_use);
                    }
                }
                return Err(e);
            }
        };
        *data = Some(decoded.clone());
        drop(data);
        self.insert_decoded(key, &slot, decoded.len());
        Ok(decoded)
    }

    /// Accounts `size` decoded bytes for `key` (if its entry is still `slot`), then
    /// evicts least recently used completed entries (never `key`) down to the capacity.
    fn insert_decoded(&self, key: Key, slot: &Arc<Slot>, size: usize) {
        let mut g = lock(&self.inner);
        g.misses += 1;
        if let Some(e) = g.map.get_mut(&key) {
            if Arc::ptr_eq(&e.slot, slot) && e.size == 0 {
                e.size = size + ENTRY_COST;
                g.bytes += size + ENTRY_COST;
            }
        }
        // Evict least recently used completed entries (never the one just made; the
        // few still decoding are passed over).
        while g.bytes > self.cap {
            let g = &mut *g;
            let victim = g
                .order
                .values()
                .copied()
                .find(|k| *k != key && g.map.get(k).is_some_and(|e| e.size > 0));
            let Some(v) = victim else { break };
            if let Some(e) = g.map.remove(&v) {
                g.order.remove(&e.last_use);
                g.bytes -= e.size;
            }
        }
    }
}

impl Default for Lz4Cache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_entries_count_their_cost_and_the_oldest_go_first() {
        let c = Lz4Cache::new(64 * ENTRY_COST);
        for i in 0..10_000u32 {
            c.get_or_decode((1, 0, i, 0), || Ok(vec![1u8]))
                .expect("decode");
        }
        let (_, misses, held) = c.stats();
        assert_eq!(misses, 10_000);
        assert!(held <= 64 * ENTRY_COST, "{held}");
        {
            let g = lock(&c.inner);
            assert!(g.map.len() <= 64);
            assert_eq!(g.order.len(), g.map.len());
        }
        // the newest are kept, the oldest gone
        let mut decoded = false;
        c.get_or_decode((1, 0, 9_999, 0), || {
            decoded = true;
            Ok(vec![1u8])
        })
        .expect("hit");
        assert!(!decoded, "the newest entry was evicted");
        c.get_or_decode((1, 0, 0, 0), || {
            decoded = true;
            Ok(vec![1u8])
        })
        .expect("miss");
        assert!(decoded, "the oldest entry was kept");
    }
}
