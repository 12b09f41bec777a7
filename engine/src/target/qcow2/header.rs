//! Raw qcow2 header edits imago cannot make: the downgrade of a fresh image to v2, and
//! the lazy-refcounts and compression-type header options (written by
//! [`BlockTarget::finish`](crate::target::BlockTarget::finish)).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::options::{CompressionType, Qcow2Compat, Qcow2Options};

/// Byte offsets and values in the qcow2 header (docs/interop/qcow2.txt).
pub(super) mod hdr {
    pub const MAGIC: u32 = 0x5146_49fb;
    pub const VERSION: usize = 4;
    pub const V2_LEN: usize = 72;
    pub const INCOMPATIBLE: usize = 72;
    pub const COMPATIBLE: usize = 80;
    pub const HEADER_LENGTH: usize = 100;
    pub const COMPRESSION_TYPE: usize = 104;
    /// v3 header without the compression type field.
    pub const V3_BASE_LEN: usize = 104;
    /// v3 header with the compression type field (padded to a multiple of 8).
    pub const V3_CT_LEN: usize = 112;
    pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
    pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
    pub const EXT_FEATURE_NAME_TABLE: u32 = 0x6803_f857;
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads the header cluster and returns it with the end offset of the header extensions.
fn read_header(file: &File, cluster_size: usize) -> io::Result<(Vec<u8>, usize)> {
    let mut buf = vec![0u8; cluster_size];
    file.read_exact_at(&mut buf, 0)?;
    if be32(&buf, 0) != hdr::MAGIC {
        return Err(invalid("not a qcow2 header".into()));
    }
    let version = be32(&buf, hdr::VERSION);
    let ext_start = match version {
        2 => hdr::V2_LEN,
        3 => be32(&buf, hdr::HEADER_LENGTH) as usize,
        v => return Err(invalid(format!("unexpected qcow2 version {v}"))),
    };
    let mut pos = ext_start;
    loop {
        if pos + 8 > buf.len() {
            return Err(invalid(
                "qcow2 header extensions run past the first cluster".into(),
            ));
        }
        let (ty, len) = (be32(&buf, pos), be32(&buf, pos + 4) as usize);
        pos += 8;
        if ty == 0 {
            break;
        }
        pos = pos
            .checked_add(len.next_multiple_of(8))
            .filter(|&p| p <= buf.len())
            .ok_or_else(|| invalid("qcow2 header extension too long".into()))?;
    }
    Ok((buf, pos))
}

/// Splits a header-extension area (ending with its end marker) into whole extensions.
fn split_extensions(area: &[u8]) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 8 <= area.len() {
        let ty = be32(area, pos);
        if ty == 0 {
            break;
        }
        let end = (pos + 8 + (be32(area, pos + 4) as usize).next_multiple_of(8)).min(area.len());
        out.push((ty, &area[pos..end]));
        pos = end;
    }
    out
}

/// Turns the freshly created (empty, v3) image into a v2 image: version 2, no v3 fields and
/// no header extensions (imago only writes the feature-name table, which v2 has no use for).
pub(super) fn downgrade_to_v2(file: &File, cluster_size: usize) -> io::Result<()> {
    let (mut buf, ext_end) = read_header(file, cluster_size)?;
    if be32(&buf, hdr::VERSION) != 3 || be32(&buf, 8) != 0 {
        return Err(invalid("unexpected header from the qcow2 creator".into()));
    }
    buf[hdr::VERSION..hdr::VERSION + 4].copy_from_slice(&2u32.to_be_bytes());
    // Everything after the v2 header reads as the end-of-extensions marker.
    buf[hdr::V2_LEN..ext_end].fill(0);
    file.write_all_at(&buf[..ext_end], 0)
}

/// Writes the v3 header options imago cannot set: lazy refcounts and the compression type.
/// Runs after imago has flushed and closed the image.
pub(super) fn apply_header_options(file: &File, opts: &Qcow2Options) -> io::Result<()> {
    if opts.compat != Qcow2Compat::V3
        || (!opts.lazy_refcounts && opts.compression_type == CompressionType::Zlib)
    {
        return Ok(());
    }
    let cluster_size = opts.cluster_size as usize;
    let (buf, ext_end) = read_header(file, cluster_size)?;
    if be32(&buf, hdr::VERSION) != 3 || be32(&buf, 8) != 0 {
        return Err(invalid(
            "unexpected qcow2 header before setting the image options".into(),
        ));
    }
    let header_len = be32(&buf, hdr::HEADER_LENGTH) as usize;
    let mut incompat = be64(&buf, hdr::INCOMPATIBLE);
    let mut compat = be64(&buf, hdr::COMPATIBLE);
    if opts.lazy_refcounts {
        compat |= hdr::COMPAT_LAZY_REFCOUNTS;
    }

    if header_len < hdr::V3_BASE_LEN || header_len % 8 != 0 {
        return Err(invalid(format!(
            "unexpected qcow2 header length {header_len}"
        )));
    }
    let mut out = buf[..header_len].to_vec();
    let mut extensions = split_extensions(&buf[header_len..ext_end]);
    if opts.compression_type != CompressionType::Zlib {
        incompat |= hdr::INCOMPAT_COMPRESSION_TYPE;
        // The compression type field must lie inside the header: 104 + 1, padded to 112.
        if out.len() < hdr::V3_CT_LEN {
            out.resize(hdr::V3_CT_LEN, 0);
        }
        out[hdr::COMPRESSION_TYPE] = opts.compression_type.header_value();
        let len = out.len() as u32;
        out[hdr::HEADER_LENGTH..hdr::HEADER_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
    }
    out[hdr::INCOMPATIBLE..hdr::INCOMPATIBLE + 8].copy_from_slice(&incompat.to_be_bytes());
    out[hdr::COMPATIBLE..hdr::COMPATIBLE + 8].copy_from_slice(&compat.to_be_bytes());

    let ext_len = |e: &[(u32, &[u8])]| e.iter().map(|(_, b)| b.len()).sum::<usize>() + 8;
    if out.len() + ext_len(&extensions) > cluster_size {
        // As qemu and imago do: the feature-name table is optional, drop it to make room.
        extensions.retain(|(ty, _)| *ty != hdr::EXT_FEATURE_NAME_TABLE);
        if out.len() + ext_len(&extensions) > cluster_size {
            return Err(invalid(
                "qcow2 header does not fit in the first cluster".into(),
            ));
        }
    }
    for (_, bytes) in &extensions {
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(&[0u8; 8]); // end of extensions
    if out.len() < ext_end {
        out.resize(ext_end, 0);
    }
    file.write_all_at(&out, 0)
}
