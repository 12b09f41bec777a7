//! The JSON inside streams: the meta frame (`StreamMeta::parse`) and the compression
//! trailer (`parse_trailer`). Errors carry the offset given; accepted metas are
//! internally consistent; `encode_trailer(parse(x))` parses back to the same entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdfmt::meta::parse_date;
use nbdfmt::trailer::{encode_trailer, parse_trailer};
use nbdfmt::{Compression, StreamMeta};
use nbdfmt_fuzz::{heap_use, reset, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn check_meta(data: &[u8]) {
    match StreamMeta::parse(data, 40) {
        Ok(m) => {
            assert!(!m.disk_name.is_empty());
            assert!(
                m.date.is_empty() || parse_date(&m.date).is_some(),
                "{:?}",
                m.date
            );
            assert_eq!(m.date_parts().is_some(), !m.date.is_empty());
            assert!(!m.incremental || m.parent_checkpoint.is_some());
            assert!(m.parent_checkpoint.as_deref() != Some(""));
            if m.stream_version != 2 {
                assert_eq!(m.compression, Compression::None);
            }
            assert_eq!(
                m.raw.get("virtualSize").and_then(|v| v.as_u64()),
                Some(m.virtual_size)
            );
            assert_eq!(
                m.raw.get("dataSize").and_then(|v| v.as_u64()),
                Some(m.data_size)
            );
            assert_eq!(m.is_base(), !m.incremental && m.parent_checkpoint.is_none());
        }
        Err(e) => assert_eq!(e.offset(), Some(40), "{e}"),
    }
}

fn check_trailer(data: &[u8]) {
    match parse_trailer(data, 7) {
        Ok(entries) => {
            for (i, e) in entries.iter().enumerate() {
                assert!(!e.frames.is_empty(), "entry {i}");
                assert!(e.chunked || e.frames.len() == 1, "entry {i}: {e:?}");
                let exact = e.frames.iter().try_fold(0u64, |a, &b| a.checked_add(b));
                assert_eq!(
                    exact,
                    Some(e.stored_len()),
                    "entry {i}: frame sizes overflow: {e:?}"
                );
            }
            let text = encode_trailer(&entries);
            let again = parse_trailer(text.as_bytes(), 0).expect("encode_trailer output parses");
            assert_eq!(again, entries, "{text}");
            assert_eq!(encode_trailer(&again), text);
        }
        Err(e) => assert_eq!(e.offset(), Some(7), "{e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    reset();
    check_meta(data);
    check_trailer(data);
    // serde_json's Value and the entry list grow linearly with the input, never with a
    // number found in it.
    let used = heap_use();
    let bound = (64 << 10) + 256 * data.len();
    assert!(
        used.peak_above_start <= bound,
        "peak heap {} bytes for a {}-byte input",
        used.peak_above_start,
        data.len()
    );
});
