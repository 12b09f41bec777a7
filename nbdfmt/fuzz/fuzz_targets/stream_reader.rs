//! Whole stream files (plain and LZ4-compressed): open, walk every frame, read every
//! payload through a small buffer. Whatever the bytes: no panic, no allocation sized by
//! a hostile length, yielded data stays inside its frame and inside `virtualSize`, and a
//! stream read to its `stop` frame yields exactly `dataSize` bytes. The cheaper readers
//! (`StreamIndex`, `read_meta`) must accept what the full walk accepts, and agree.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use nbdfmt::reader::read_meta;
use nbdfmt::{FrameKind, StreamIndex, StreamReader};
use nbdfmt_fuzz::{heap_use, reset, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// No single allocation may exceed this: LZ4 block buffers (at most 8 MiB + 16 MiB for
/// the largest block size a frame can declare) are the biggest legitimate ones.
const MAX_SINGLE_ALLOC: usize = 32 << 20;
/// Live heap above the start of the run; inputs are at most a few hundred KiB.
const MAX_PEAK: usize = 64 << 20;

/// An odd size, so chunks straddle LZ4 blocks and payload ends.
const BUF_LEN: usize = 1021;

fn check(data: &[u8]) {
    let Ok(mut r) = StreamReader::open(Cursor::new(data)) else {
        return;
    };
    let meta = r.meta().clone();
    assert_eq!(r.file_size(), data.len() as u64);
    let mut buf = [0u8; BUF_LEN];
    let mut frames = Vec::new();
    let mut sum = 0u64;
    let mut prev_end = 0u64;
    let complete = 'walk: loop {
        let f = match r.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break 'walk true,
            Err(_) => break 'walk false,
        };
        assert!(matches!(f.kind, FrameKind::Data | FrameKind::Zero), "{f:?}");
        assert!(
            f.start >= prev_end,
            "{f:?} overlaps the previous frame (end {prev_end})"
        );
        let end = f.start.checked_add(f.length).expect("frame end overflows");
        assert!(
            end <= meta.virtual_size,
            "{f:?} past virtualSize {}",
            meta.virtual_size
        );
        assert!(f.payload_offset <= data.len() as u64);
        prev_end = end;
        let mut got = 0u64;
        if f.kind == FrameKind::Data {
            loop {
                match r.read_chunk(&mut buf) {
                    Ok(Some((at, n))) => {
                        assert!(n > 0 && n <= BUF_LEN);
                        assert_eq!(at, f.start + got, "chunks of {f:?} are not contiguous");
                        got += n as u64;
                        assert!(f.start + got <= end, "chunk {at}+{n} beyond {f:?}");
                    }
                    Ok(None) => {
                        assert_eq!(
                            got, f.length,
                            "payload of {f:?} ended short without an error"
                        );
                        break;
                    }
                    // a damaged payload ends the walk: the stream is rejected
                    Err(_) => break 'walk false,
                }
            }
        }
        sum += got;
        frames.push(f);
    };
    if !complete {
        // A stream rejected part-way may still have yielded data, never past the limits
        // checked above.
        return;
    }
    assert!(r.is_finished());
    assert_eq!(
        sum, meta.data_size,
        "accepted stream yields {sum} bytes, meta says {}",
        meta.data_size
    );
    if let Some(entries) = r.trailer_entries() {
        assert_eq!(
            entries,
            frames.iter().filter(|f| f.kind == FrameKind::Data).count()
        );
    }
    let index = StreamIndex::read(Cursor::new(data))
        .expect("StreamIndex accepts what the full walk accepts");
    assert_eq!(index.frames, frames);
    assert_eq!(index.meta, meta);
    assert_eq!(
        read_meta(Cursor::new(data)).expect("read_meta accepts what open accepts"),
        meta
    );
}

fuzz_target!(|data: &[u8]| {
    reset();
    check(data);
    let _ = StreamIndex::read(Cursor::new(data));
    let _ = read_meta(Cursor::new(data));
    let used = heap_use();
    assert!(
        used.largest <= MAX_SINGLE_ALLOC,
        "single allocation of {} bytes for a {}-byte input",
        used.largest,
        data.len()
    );
    assert!(
        used.peak_above_start <= MAX_PEAK,
        "peak heap {} bytes for a {}-byte input",
        used.peak_above_start,
        data.len()
    );
});
