//! Helpers shared by the fuzz targets (nbdfmt/fuzz, and the domxml target of the root
//! crate's fuzz/, which depends on this library): an allocator that records the largest
//! single allocation and the peak of live heap bytes, so targets can assert that
//! hostile lengths never turn into big allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `System`, counting. Install with `#[global_allocator]`.
#[derive(Debug)]
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Heap use seen since the last [`reset`].
#[derive(Debug, Clone, Copy)]
pub struct HeapUse {
    /// Largest single allocation (or reallocation target), in bytes.
    pub largest: usize,
    /// Peak of live bytes above the level at `reset`.
    pub peak_above_start: usize,
}

/// Starts a measurement.
pub fn reset() {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    START.store(live, Ordering::Relaxed);
}

static START: AtomicUsize = AtomicUsize::new(0);

/// What was used since [`reset`].
pub fn heap_use() -> HeapUse {
    HeapUse {
        largest: LARGEST.load(Ordering::Relaxed),
        peak_above_start: PEAK
            .load(Ordering::Relaxed)
            .saturating_sub(START.load(Ordering::Relaxed)),
    }
}
