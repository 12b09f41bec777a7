//! Decoding one LZ4 frame of a compressed data payload, streamed and capped.
//!
//! virtnbdbackup writes LZ4 *frame format* (python-lz4 `lz4.frame.compress`): 64 KiB
//! blocks, linked (or independent for inputs of one block), block and content
//! checksums, content size stored. Frames are only decodable from their start, so a
//! reader that needs the tail of an extent still decodes the head and drops it.

use std::io::{self, Read, Take};

use lz4_flex::frame::FrameDecoder;

use crate::error::{Error, ErrorKind, Result};

/// Streams the decoded bytes of exactly one LZ4 frame of `compressed_len` bytes.
///
/// Reading returns an error (never a panic, never unbounded memory) when the frame is
/// corrupt or would decode to more than `max_decoded` bytes. Call [`finish`](Self::finish)
/// after the last read to check that the frame used all its stored bytes.
pub struct Lz4FrameReader<R: Read> {
    dec: FrameDecoder<Take<R>>,
    frame_offset: u64,
    max_decoded: u64,
    decoded: u64,
}

impl<R: Read> std::fmt::Debug for Lz4FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lz4FrameReader")
            .field("frame_offset", &self.frame_offset)
            .field("decoded", &self.decoded)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Lz4FrameReader<R> {
    /// `src` must be positioned at the frame's magic, which is at `frame_offset` in the file.
    pub fn new(src: R, frame_offset: u64, compressed_len: u64, max_decoded: u64) -> Self {
        Self {
            dec: FrameDecoder::new(src.take(compressed_len)),
            frame_offset,
            max_decoded,
            decoded: 0,
        }
    }

    /// Bytes decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Reads up to `buf.len()` decoded bytes; `Ok(0)` at the end of the frame.
    pub fn read_decoded(&mut self, buf: &mut [u8]) -> Result<usize> {
        // Ask for at most one byte beyond the cap, so an over-long frame is caught
        // without decoding all of it.
        let room = self
            .max_decoded
            .saturating_sub(self.decoded)
            .saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match self.dec.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(self.lz4_error(&e)),
        };
        self.decoded += n as u64;
        if self.decoded > self.max_decoded {
            return Err(ErrorKind::DecodedLength {
                offset: self.frame_offset,
                expected: self.max_decoded,
                actual: self.decoded,
            }
            .into());
        }
        Ok(n)
    }

    /// Checks that the frame ended exactly at its stored length. Returns bytes decoded.
    pub fn finish(self) -> Result<u64> {
        self.finish_into_inner().1
    }

    /// Gives the source back (positioned wherever decoding stopped).
    pub fn into_inner(self) -> R {
        self.dec.into_inner().into_inner()
    }

    /// Like [`finish`](Self::finish), and gives the source back whatever the outcome.
    pub fn finish_into_inner(self) -> (R, Result<u64>) {
        let left = self.dec.get_ref().limit();
        let r = if left != 0 {
            Err(ErrorKind::Lz4 {
                offset: self.frame_offset,
                reason: format!("LZ4 frame ended {left} bytes before its stored size"),
            }
            .into())
        } else {
            Ok(self.decoded)
        };
        (self.dec.into_inner().into_inner(), r)
    }

    fn lz4_error(&self, e: &io::Error) -> Error {
        let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
            "frame is truncated".to_owned()
        } else {
            e.to_string()
        };
        ErrorKind::Lz4 {
            offset: self.frame_offset,
            reason,
        }
        .into()
    }
}

/// Decodes a whole LZ4 frame held in memory (at most `max_decoded` bytes of output).
pub fn decode_frame(src: &[u8], frame_offset: u64, max_decoded: u64) -> Result<Vec<u8>> {
    let mut r = Lz4FrameReader::new(src, frame_offset, src.len() as u64, max_decoded);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read_decoded(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    r.finish()?;
    Ok(out)
}

/// Encodes `data` as one LZ4 frame with virtnbdbackup's settings (block and content
/// checksums, content size, 64 KiB blocks; linked blocks above one block).
#[cfg(any(test, feature = "writer"))]
pub fn encode_frame(data: &[u8]) -> Vec<u8> {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    use std::io::Write;
    let mode = if data.len() > 64 * 1024 {
        BlockMode::Linked
    } else {
        BlockMode::Independent
    };
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(mode)
        .block_checksums(true)
        .content_checksum(true)
        .content_size(Some(data.len() as u64));
    let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
    // Writing into a Vec cannot fail.
    enc.write_all(data).expect("invariant: writing to a Vec");
    enc.finish().expect("invariant: writing to a Vec")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_caps() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let f = encode_frame(&data);
        assert_eq!(
            decode_frame(&f, 0, data.len() as u64).expect("decodes"),
            data
        );
        let e = decode_frame(&f, 5, 1000).expect_err("over cap");
        assert!(matches!(
            e.kind(),
            ErrorKind::DecodedLength { offset: 5, .. }
        ));
    }

    #[test]
    fn corrupt_and_truncated_frames_fail() {
        let data = vec![7u8; 100_000];
        let mut f = encode_frame(&data);
        let mid = f.len() / 2;
        f[mid] ^= 0x40;
        assert!(decode_frame(&f, 0, 200_000).is_err());
        let f = encode_frame(&data);
        let e = decode_frame(&f[..f.len() - 3], 11, 200_000).expect_err("truncated");
        assert_eq!(e.offset(), Some(11));
        // trailing bytes after a complete frame inside the stored size
        let mut g = encode_frame(&data);
        g.extend_from_slice(&[0, 0, 0]);
        assert!(decode_frame(&g, 0, 200_000).is_err());
    }
}
