//! The LZ4 side of a [`ChainReader`](super::ChainReader): where each LZ4 frame of a
//! compressed data frame starts, stored and decoded ([`Layout`]), and decoding one
//! frame whole (for the cache) or up to a range (frames too big to cache).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nbdfmt::lz4::Lz4FrameReader;
use nbdfmt::{Error as FmtError, ErrorKind as FmtKind, Frame};

use crate::error::{Error, Result};

/// LZ4 frame magic (little-endian on disk).
const LZ4_MAGIC: u32 = 0x184D_2204;

pub(super) fn io_err(path: &Path, offset: u64, e: io::Error) -> Error {
    let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
        FmtKind::TruncatedPayload {
            offset,
            expected: 0,
            got: 0,
        }
    } else {
        FmtKind::Io { offset, source: e }
    };
    Error::Backup(FmtError::from(kind).in_file(path))
}

pub(super) fn corrupt(path: &Path, offset: u64, reason: String) -> Error {
    Error::Backup(FmtError::from(FmtKind::Lz4 { offset, reason }).in_file(path))
}

/// `Read` over a range of a file by `pread`, so readers share one `File`.
struct Pread<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Pread<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backup file ends inside an LZ4 frame",
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// Where the LZ4 frames of one compressed data frame start, stored and decoded.
#[derive(Debug)]
pub(super) struct Layout {
    /// File offset of each LZ4 frame, plus the end.
    pub file_off: Vec<u64>,
    /// Decoded offset (inside the data frame) of each LZ4 frame, plus the length.
    pub dec_off: Vec<u64>,
}

/// A decoder for the LZ4 frame stored at `[fs, fe)`, capped at `max_dec` bytes.
///
/// Buffers no bigger than the frame needs (a stored frame of 30 bytes gets a 30-byte
/// read buffer, and the block path sizes its decode buffers by the content size):
/// a served disk of millions of one-byte LZ4 frames allocated and zeroed megabytes
/// per frame (page faults and memset were most of its 300+ s).
fn lz4_reader(f: &File, fs: u64, fe: u64, max_dec: u64) -> Lz4FrameReader<BufReader<Pread<'_>>> {
    let cap = usize::try_from(fe - fs)
        .unwrap_or(usize::MAX)
        .clamp(64, 256 * 1024);
    let src = BufReader::with_capacity(
        cap,
        Pread {
            file: f,
            pos: fs,
            end: fe,
        },
    );
    Lz4FrameReader::new(src, fs, fe - fs, max_dec).block_path()
}

fn lz4_reader_at<'a>(
    f: &'a File,
    layout: &Layout,
    i: usize,
) -> Lz4FrameReader<BufReader<Pread<'a>>> {
    let dec_len = layout.dec_off[i + 1] - layout.dec_off[i];
    lz4_reader(f, layout.file_off[i], layout.file_off[i + 1], dec_len)
}

/// Decodes LZ4 frame `i` completely, checking its length and trailer.
pub(super) fn decode_whole(f: &File, path: &Path, layout: &Layout, i: usize) -> Result<Vec<u8>> {
    let dec_len = layout.dec_off[i + 1] - layout.dec_off[i];
    let mut dec = lz4_reader_at(f, layout, i);
    let mut out = vec![0u8; dec_len as usize];
    let mut got = 0usize;
    loop {
        if got == out.len() {
            // One more read must report the end (and checks the content checksum).
            let mut probe = [0u8; 1];
            let n = dec
                .read_decoded(&mut probe)
                .map_err(|e| Error::Backup(e.in_file(path)))?;
            if n != 0 {
                return Err(corrupt(
                    path,
                    layout.file_off[i],
                    "LZ4 frame decodes to more than its share".into(),
                ));
            }
            break;
        }
        let n = dec
            .read_decoded(&mut out[got..])
            .map_err(|e| Error::Backup(e.in_file(path)))?;
        if n == 0 {
            return Err(Error::Backup(
                FmtError::from(FmtKind::DecodedLength {
                    offset: layout.file_off[i],
                    expected: dec_len,
                    actual: got as u64,
                })
                .in_file(path),
            ));
        }
        got += n;
    }
    dec.finish().map_err(|e| Error::Backup(e.in_file(path)))?;
    Ok(out)
}

/// Streams LZ4 frame `i` up to `skip + out.len()` decoded bytes, keeping the tail.
pub(super) fn decode_range(
    f: &File,
    path: &Path,
    layout: &Layout,
    i: usize,
    skip: u64,
    out: &mut [u8],
) -> Result<()> {
    let mut dec = lz4_reader_at(f, layout, i);
    let mut scratch = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let want_end = skip + out.len() as u64;
    while pos < want_end {
        let n = dec
            .read_decoded(&mut scratch)
            .map_err(|e| Error::Backup(e.in_file(path)))?;
        if n == 0 {
            return Err(corrupt(
                path,
                layout.file_off[i],
                "LZ4 frame is shorter than its content size".into(),
            ));
        }
        let (a, b) = (pos, pos + n as u64);
        let s = a.max(skip);
        let e = b.min(want_end);
        if s < e {
            out[(s - skip) as usize..(e - skip) as usize]
                .copy_from_slice(&scratch[(s - a) as usize..(e - a) as usize]);
        }
        pos = b;
    }
    Ok(())
}

/// Where each LZ4 frame of the compressed data frame `fr` of file `f` starts.
pub(super) fn layout(f: &File, path: &Path, fr: &Frame, frame: u32) -> Result<Layout> {
    let mut file_off = Vec::with_capacity(fr.lz4_frames.len() + 1);
    let mut at = fr.payload_offset;
    for &s in &fr.lz4_frames {
        file_off.push(at);
        at += s;
    }
    file_off.push(at);
    let sizes = decoded_sizes(f, path, fr, frame, &file_off)?;
    let mut dec_off = Vec::with_capacity(sizes.len() + 1);
    let mut d = 0u64;
    for s in &sizes {
        dec_off.push(d);
        d = d
            .checked_add(*s)
            .ok_or_else(|| corrupt(path, fr.payload_offset, "LZ4 content sizes overflow".into()))?;
    }
    dec_off.push(d);
    if d != fr.length {
        return Err(Error::Backup(
            FmtError::from(FmtKind::DecodedLength {
                offset: fr.payload_offset,
                expected: fr.length,
                actual: d,
            })
            .in_file(path),
        ));
    }
    Ok(Layout { file_off, dec_off })
}

/// The decoded size of each LZ4 frame (stored at `file_off`): the data frame's length
/// for a single frame, else the headers' content sizes, else one counting pass.
fn decoded_sizes(
    f: &File,
    path: &Path,
    fr: &Frame,
    frame: u32,
    file_off: &[u64],
) -> Result<Vec<u64>> {
    let n = fr.lz4_frames.len();
    if n == 1 {
        return Ok(vec![fr.length]);
    }
    let mut v = Vec::with_capacity(n);
    for &off in &file_off[..n] {
        match content_size(f, path, off)? {
            Some(s) => v.push(s),
            None => break,
        }
    }
    if v.len() == n {
        return Ok(v);
    }
    // No content sizes in the headers: one counting pass.
    tracing::debug!(file = %path.display(), frame, "LZ4 frames without content size: counting");
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let mut dec = lz4_reader(f, file_off[i], file_off[i + 1], fr.length);
        let mut scratch = vec![0u8; 1 << 20];
        let mut count = 0u64;
        loop {
            let got = dec
                .read_decoded(&mut scratch)
                .map_err(|e| Error::Backup(e.in_file(path)))?;
            if got == 0 {
                break;
            }
            count += got as u64;
        }
        dec.finish().map_err(|e| Error::Backup(e.in_file(path)))?;
        v.push(count);
    }
    Ok(v)
}

/// The content-size field of the LZ4 frame header at `off`, if the frame has one.
fn content_size(f: &File, path: &Path, off: u64) -> Result<Option<u64>> {
    let mut h = [0u8; 14];
    f.read_exact_at(&mut h, off)
        .map_err(|e| io_err(path, off, e))?;
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != LZ4_MAGIC {
        return Err(corrupt(
            path,
            off,
            format!("bad LZ4 frame magic {magic:#010x}"),
        ));
    }
    let flg = h[4];
    if flg >> 6 != 0b01 {
        return Err(corrupt(path, off, "unsupported LZ4 frame version".into()));
    }
    if flg & 0x08 == 0 {
        return Ok(None);
    }
    let mut cs = [0u8; 8];
    cs.copy_from_slice(&h[6..14]);
    Ok(Some(u64::from_le_bytes(cs)))
}
