//! What travels from the readers to the writers: [`Chunk`]s of a disk's content in
//! disk order, their buffers taken from and handed back to a [`BufPool`].

/// A run of the disk in a [`Chunk`]: data (its bytes are the chunk's next `len`
/// bytes) or a hole (reads as zero: a gap or a zero frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seg {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

/// Part of a disk's content on its way from the reader to the writer: segments in
/// disk order and the bytes of the data segments, back to back.
#[derive(Debug)]
pub(super) struct Chunk {
    pub data: Vec<u8>,
    pub segs: Vec<Seg>,
    /// Bytes of the data segments that are live data (the rest are zeroes filling
    /// small gaps), for progress.
    pub live: u64,
}

/// Chunk buffers handed back by the writers for the readers to fill again, so no
/// chunk costs a fresh allocation (1 MiB allocations from several threads made glibc
/// return and re-fault memory: page faults and zeroing were ~10 % of a restore's CPU).
#[derive(Debug)]
pub(crate) struct BufPool {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
    cap: usize,
    keep: usize,
}

impl BufPool {
    /// Buffers of `cap` bytes' capacity; at most `keep` are kept for reuse.
    pub fn new(cap: usize, keep: usize) -> Self {
        Self {
            bufs: std::sync::Mutex::new(Vec::new()),
            cap,
            keep,
        }
    }

    /// A buffer of `n` bytes (contents unspecified).
    pub fn get(&self, n: usize) -> Vec<u8> {
        let reused = self.bufs.lock().ok().and_then(|mut b| b.pop());
        let mut v = reused.unwrap_or_else(|| Vec::with_capacity(self.cap.max(n)));
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0);
        }
        v
    }

    /// Hands a buffer back.
    pub fn put(&self, v: Vec<u8>) {
        if v.capacity() < self.cap {
            return;
        }
        if let Ok(mut b) = self.bufs.lock() {
            if b.len() < self.keep {
                b.push(v);
            }
        }
    }
}
