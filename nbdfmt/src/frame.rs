//! The 40-byte frame header: `kind SP %016x SP %016x CR LF`.
//!
//! ```text
//! offset 0..4   kind    "meta" | "data" | "zero" | "stop" | "comp"
//! offset 4      ' '
//! offset 5..21  start   16 lowercase hex digits (disk offset, or 0)
//! offset 21     ' '
//! offset 22..38 length  16 lowercase hex digits (payload / extent length)
//! offset 38..40 "\r\n"
//! ```

use crate::error::{Error, ErrorKind, Result};

/// Size of every frame header.
pub const HEADER_LEN: usize = 40;

/// The kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Stream metadata (JSON payload).
    Meta,
    /// Disk data at `start` (payload, raw or LZ4).
    Data,
    /// A range that reads as zero; no payload.
    Zero,
    /// End of the frame sequence.
    Stop,
    /// Compression trailer header (last 40 bytes of a compressed stream).
    Comp,
}

impl FrameKind {
    /// The four ASCII bytes of the kind.
    pub fn as_bytes(self) -> &'static [u8; 4] {
        match self {
            Self::Meta => b"meta",
            Self::Data => b"data",
            Self::Zero => b"zero",
            Self::Stop => b"stop",
            Self::Comp => b"comp",
        }
    }

    /// The kind as text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meta => "meta",
            Self::Data => "data",
            Self::Zero => "zero",
            Self::Stop => "stop",
            Self::Comp => "comp",
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(match b {
            b"meta" => Self::Meta,
            b"data" => Self::Data,
            b"zero" => Self::Zero,
            b"stop" => Self::Stop,
            b"comp" => Self::Comp,
            _ => return None,
        })
    }
}

/// One parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The kind.
    pub kind: FrameKind,
    /// Disk offset (data/zero), 0 otherwise.
    pub start: u64,
    /// Extent length (data/zero, uncompressed) or payload length (meta/comp).
    pub length: u64,
}

impl FrameHeader {
    /// A header.
    pub fn new(kind: FrameKind, start: u64, length: u64) -> Self {
        Self {
            kind,
            start,
            length,
        }
    }

    /// Parses 40 bytes found at `offset` in the file. Strict: lowercase or uppercase hex
    /// digits only (virtnbdbackup writes lowercase), the two spaces and the CR LF required.
    pub fn parse(buf: &[u8], offset: u64) -> Result<Self> {
        if buf.len() < HEADER_LEN {
            return Err(ErrorKind::TruncatedHeader {
                offset,
                got: buf.len(),
            }
            .into());
        }
        let buf = &buf[..HEADER_LEN];
        let bad = |reason: &'static str| -> Error {
            ErrorKind::BadHeader {
                offset,
                reason,
                printable: printable(buf),
            }
            .into()
        };
        if buf[4] != b' ' || buf[21] != b' ' {
            return Err(bad("separators are not spaces"));
        }
        if &buf[38..40] != b"\r\n" {
            return Err(bad("no CR LF at the end"));
        }
        let start = parse_hex16(&buf[5..21]).ok_or_else(|| bad("start is not 16 hex digits"))?;
        let length = parse_hex16(&buf[22..38]).ok_or_else(|| bad("length is not 16 hex digits"))?;
        let kind = FrameKind::from_bytes(&buf[0..4]).ok_or_else(|| -> Error {
            if buf[0..4].iter().all(u8::is_ascii_graphic) {
                ErrorKind::UnknownKind { offset }.into()
            } else {
                bad("kind is not ASCII")
            }
        })?;
        Ok(Self {
            kind,
            start,
            length,
        })
    }

    /// The 40 bytes virtnbdbackup writes for this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(self.kind.as_bytes());
        out[4] = b' ';
        write_hex16(&mut out[5..21], self.start);
        out[21] = b' ';
        write_hex16(&mut out[22..38], self.length);
        out[38] = b'\r';
        out[39] = b'\n';
        out
    }

    /// End of the disk range (`start + length`), saturating.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.length)
    }
}

fn parse_hex16(b: &[u8]) -> Option<u64> {
    if b.len() != 16 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

fn write_hex16(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = (15 - i) * 4;
        *slot = DIGITS[((v >> shift) & 0xf) as usize];
    }
}

/// How many bytes of `buf` are printable ASCII (error messages describe, never quote).
pub(crate) fn printable(buf: &[u8]) -> usize {
    buf.iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_real_data_header() {
        // "data" kind, start 0x2800000, length 0x10000 (ex2 of the format spec)
        let h =
            FrameHeader::parse(b"data 0000000002800000 0000000000010000\r\n", 0).expect("valid");
        assert_eq!(h, FrameHeader::new(FrameKind::Data, 0x280_0000, 0x1_0000));
    }

    #[test]
    fn encode_matches_virtnbdbackup_bytes() {
        let h = FrameHeader::new(FrameKind::Comp, 0, 0x2c);
        assert_eq!(&h.encode(), b"comp 0000000000000000 000000000000002c\r\n");
    }

    #[test]
    fn rejects_each_malformation() {
        let ok = *b"zero 0000000000100000 0000000000700000\r\n";
        let cases: Vec<(usize, u8)> = vec![
            (4, b'_'),
            (21, b'_'),
            (38, b'\n'),
            (39, b'\r'),
            (10, b'g'),
            (30, b' '),
        ];
        for (i, c) in cases {
            let mut b = ok;
            b[i] = c;
            let e = FrameHeader::parse(&b, 100).expect_err("must fail");
            assert_eq!(e.offset(), Some(100));
            assert!(matches!(e.kind(), ErrorKind::BadHeader { .. }), "{e}");
        }
        let e = FrameHeader::parse(b"DATA 0000000000000000 0000000000000000\r\n", 7)
            .expect_err("unknown");
        assert!(matches!(e.kind(), ErrorKind::UnknownKind { offset: 7, .. }));
        let e = FrameHeader::parse(b"data 00", 3).expect_err("short");
        assert!(matches!(
            e.kind(),
            ErrorKind::TruncatedHeader { offset: 3, got: 7 }
        ));
    }

    proptest! {
        #[test]
        fn encode_parse_roundtrip(k in 0usize..5, start: u64, length: u64) {
            let kind = [FrameKind::Meta, FrameKind::Data, FrameKind::Zero, FrameKind::Stop, FrameKind::Comp][k];
            let h = FrameHeader::new(kind, start, length);
            prop_assert_eq!(FrameHeader::parse(&h.encode(), 0).expect("roundtrip"), h);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FrameHeader::parse(&b, 0);
        }
    }
}
