//! `FrameHeader::parse` on any bytes: errors carry the offset; an accepted header
//! re-encodes canonically (lowercase hex) to the same 40 bytes up to letter case, and
//! encode → parse is the identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdfmt::{ErrorKind, FrameHeader, HEADER_LEN};

const OFFSET: u64 = 0x1234;

fuzz_target!(|data: &[u8]| {
    match FrameHeader::parse(data, OFFSET) {
        Ok(h) => {
            assert!(data.len() >= HEADER_LEN);
            let enc = h.encode();
            assert_eq!(
                FrameHeader::parse(&enc, 0).expect("encode output parses"),
                h
            );
            assert!(
                enc[5..21]
                    .iter()
                    .chain(&enc[22..38])
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "encode is not lowercase hex: {:?}",
                String::from_utf8_lossy(&enc)
            );
            // Only the hex letters' case may differ from the input.
            assert_eq!(&enc[..], &data[..HEADER_LEN].to_ascii_lowercase()[..]);
            assert_eq!(h.end(), h.start.saturating_add(h.length));
        }
        Err(e) => {
            assert_eq!(e.offset(), Some(OFFSET), "{e}");
            assert_eq!(
                data.len() < HEADER_LEN,
                matches!(e.kind(), ErrorKind::TruncatedHeader { .. }),
                "{e}"
            );
            let _ = e.to_string();
        }
    }
});
