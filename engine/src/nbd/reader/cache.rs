//! [`Lz4Cache`]: decoded LZ4 frames shared by the readers of a server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::Result;

/// Default size of the decoded-LZ4 cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

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
            e.last_use = tick;
            e.slot.clone()
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
                    g.map.remove(&key);
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
                e.size = size;
                g.bytes += size;
            }
        }
        // Evict least recently used completed entries (never the one just made).
        while g.bytes > self.cap {
            let victim = g
                .map
                .iter()
                .filter(|(k, e)| **k != key && e.size > 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k);
            let Some(v) = victim else { break };
            if let Some(e) = g.map.remove(&v) {
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
