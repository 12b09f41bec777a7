//! qcow2 images, created in-process with `imago` (no `qemu-img` child process).
//!
//! [`Qcow2Options`] carries what a restored image must reproduce from the source's
//! `qcow.json` (`qemu-img info` of the backed-up image); [`Qcow2Target`] creates a new image
//! with those options and implements [`BlockTarget`] on it.
//!
//! What imago 0.2.6 does and what this module adds:
//! - Cluster size, refcount width and virtual size: set through imago's create builder.
//! - compat 0.10 (qcow2 v2): imago only creates v3. We create v3, rewrite the header to v2
//!   (version 2, no v3 fields, no header extensions) and then open it with imago, which
//!   supports v2 images and then itself refuses v3-only operations. Zero ranges on v2 are
//!   real zero writes (only over allocated clusters: unallocated clusters already read as zero).
//! - Lazy refcounts (compatible feature bit 0) and the zstd compression type (header byte 104,
//!   incompatible feature bit 3, header length 112): imago cannot open an image with the
//!   compression-type bit, so both are written into the header by [`BlockTarget::finish`],
//!   after imago has flushed and closed the image. Neither changes how data is laid out: we
//!   write no compressed clusters, and refcounts are always kept exact.
//! - Refused (with [`Error::Unsupported`]): extended L2 entries, external data files, unknown
//!   compat levels or compression types, and option combinations qemu itself refuses.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
    StorageOpenOptions,
};

use super::BlockTarget;
use crate::error::{Error, Result};

/// imago's storage driver for plain files.
type ImagoFile = imago::file::File;

/// qcow2 compatibility level (`compat=` in `qemu-img create`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Compat {
    /// `0.10`: qcow2 version 2 (no zero clusters, 16-bit refcounts, no feature bits).
    V2,
    /// `1.1`: qcow2 version 3 (qemu's default).
    V3,
}

impl Qcow2Compat {
    /// Parses `qemu-img`'s spelling (`0.10`/`1.1`, also `v2`/`v3`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "1.1" | "v3" => Ok(Self::V3),
            "0.10" | "v2" => Ok(Self::V2),
            other => Err(Error::Unsupported(format!(
                "qcow2 compat level {other:?} is not supported (only 0.10 and 1.1)"
            ))),
        }
    }

    /// The name `qemu-img info` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V2 => "0.10",
            Self::V3 => "1.1",
        }
    }
}

/// Compression type recorded in the image header (for clusters a later writer compresses;
/// the restore itself writes no compressed clusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// `zlib` (qcow2's default; header value 0).
    Zlib,
    /// `zstd` (header value 1; needs compat 1.1).
    Zstd,
}

impl CompressionType {
    /// Parses `qemu-img`'s spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "zlib" => Ok(Self::Zlib),
            "zstd" => Ok(Self::Zstd),
            other => Err(Error::Unsupported(format!(
                "qcow2 compression type {other:?} is not supported (only zlib and zstd)"
            ))),
        }
    }

    /// The name `qemu-img info` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }

    /// The value of the header's `compression_type` byte.
    fn header_value(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }
}

/// Smallest cluster size qcow2 allows.
pub const MIN_CLUSTER_SIZE: u32 = 512;
/// Largest cluster size qemu (and imago) accept.
pub const MAX_CLUSTER_SIZE: u32 = 2 * 1024 * 1024;

/// Options of a new qcow2 image. [`Default`] is `qemu-img create -f qcow2`'s default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Cluster size in bytes: a power of two in 512 ..= 2 MiB. Default 64 KiB.
    pub cluster_size: u32,
    /// Compatibility level. Default 1.1.
    pub compat: Qcow2Compat,
    /// Set the lazy-refcounts header bit (compat 1.1 only). Default off.
    pub lazy_refcounts: bool,
    /// Compression type in the header. Default zlib.
    pub compression_type: CompressionType,
    /// Refcount width in bits: a power of two in 1 ..= 64; 16 with compat 0.10. Default 16.
    pub refcount_bits: u32,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Self {
            cluster_size: 65_536,
            compat: Qcow2Compat::V3,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            refcount_bits: 16,
        }
    }
}

impl Qcow2Options {
    /// Options reproducing the image described by a `qcow.json` side file.
    ///
    /// Carried over: `cluster-size`, `compat`, `lazy-refcounts`, `compression-type`,
    /// `refcount-bits`; a missing key keeps qemu's default. Refused: `extended-l2`, an external
    /// data file (`data-file` / `data-file-raw`), unknown compat levels and compression types,
    /// and combinations qemu refuses. Not carried over (as with `virtnbdrestore`): the backing
    /// file (the restored image is complete on its own), snapshots and bitmaps.
    pub fn from_qcow_info(info: &nbdfmt::QcowInfo) -> Result<Self> {
        if info.extended_l2 {
            return Err(Error::Unsupported(
                "the source qcow2 image uses extended L2 entries (extended_l2=on), which this restore cannot create".into(),
            ));
        }
        if let Some(data_file) = &info.data_file {
            return Err(Error::Unsupported(format!(
                "the source qcow2 image keeps its data in an external data file (data_file={data_file}), which this restore cannot create"
            )));
        }
        if info.encrypted {
            return Err(Error::Unsupported(
                "the source qcow2 image is encrypted, which this restore cannot create (the backup holds the plain guest data)".into(),
            ));
        }
        if info.data_file_raw {
            return Err(Error::Unsupported(
                "the source qcow2 image uses a raw external data file (data_file_raw=on), which this restore cannot create".into(),
            ));
        }
        let mut opts = Self::default();
        if let Some(cs) = info.cluster_size {
            opts.cluster_size = u32::try_from(cs).map_err(|_| {
                Error::Unsupported(format!("qcow2 cluster size {cs} is not supported"))
            })?;
        }
        if let Some(c) = &info.compat {
            opts.compat = Qcow2Compat::parse(c)?;
        }
        opts.lazy_refcounts = info.lazy_refcounts;
        if let Some(ct) = &info.compression_type {
            opts.compression_type = CompressionType::parse(ct)?;
        }
        if let Some(rb) = info.refcount_bits {
            opts.refcount_bits = u32::try_from(rb).map_err(|_| {
                Error::Unsupported(format!("qcow2 refcount width {rb} bits is not supported"))
            })?;
        }
        opts.validate()?;
        Ok(opts)
    }

    /// Checks that the options describe an image we can create exactly.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(Error::Unsupported(format!(
                "qcow2 cluster size {cs} is not supported (a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE})"
            )));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::Unsupported(format!(
                "qcow2 refcount width {rb} bits is not supported (a power of two from 1 to 64)"
            )));
        }
        if self.compat == Qcow2Compat::V2 {
            if rb != 16 {
                return Err(Error::Unsupported(format!(
                    "qcow2 refcount width {rb} bits needs compat 1.1 (compat 0.10 has 16 bits)"
                )));
            }
            if self.lazy_refcounts {
                return Err(Error::Unsupported(
                    "qcow2 lazy refcounts need compat 1.1, but compat is 0.10".into(),
                ));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(Error::Unsupported(format!(
                    "qcow2 compression type {} needs compat 1.1, but compat is 0.10",
                    self.compression_type.as_str()
                )));
            }
        }
        Ok(())
    }
}

/// Byte offsets and values in the qcow2 header (docs/interop/qcow2.txt).
mod hdr {
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

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
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
fn downgrade_to_v2(file: &File, cluster_size: usize) -> io::Result<()> {
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
fn apply_header_options(file: &File, opts: &Qcow2Options) -> io::Result<()> {
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

/// Size of the zero buffer for zero writes on v2 images.
const ZERO_CHUNK: usize = 1024 * 1024;

/// A new qcow2 image being written. See the module documentation.
#[derive(Debug)]
pub struct Qcow2Target {
    path: PathBuf,
    size: u64,
    opts: Qcow2Options,
    /// imago's view of the image; `None` once finished.
    image: Option<FormatAccess<ImagoFile>>,
    /// Our own handle on the same file, for the header and the final sync.
    file: File,
    /// Zero buffer for v2 zero writes (allocated on first use).
    zeroes: Vec<u8>,
}

fn finished_error() -> io::Error {
    io::Error::other("the qcow2 target is already finished")
}

impl Qcow2Target {
    /// Creates a new qcow2 image at `path` (which must not exist) with `virtual_size` bytes
    /// and the given options. `virtual_size` must be a multiple of 512 (qemu ignores a
    /// partial last sector).
    pub fn create(path: &Path, virtual_size: u64, opts: &Qcow2Options) -> Result<Self> {
        opts.validate()?;
        if virtual_size % 512 != 0 {
            return Err(Error::Unsupported(format!(
                "{}: qcow2 virtual size {virtual_size} is not a multiple of 512 bytes",
                path.display()
            )));
        }
        let err = |e| Error::target("create", path, e);
        // O_EXCL: never overwrite anything.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(err)?;
        let created = Self::create_in(path, file, virtual_size, opts);
        if created.is_err() {
            // We created the file, so it is ours to remove; an error here would hide the first.
            let _ = std::fs::remove_file(path);
        }
        created
    }

    fn create_in(path: &Path, file: File, virtual_size: u64, opts: &Qcow2Options) -> Result<Self> {
        let err = |e| Error::target("create", path, e);
        let storage_opts = || StorageOpenOptions::new().write(true).filename(path);
        let storage = ImagoFile::from_open_file(file.try_clone().map_err(err)?, storage_opts())
            .map_err(err)?;
        Qcow2::<ImagoFile>::create_builder(storage)
            .size(virtual_size)
            .cluster_size(opts.cluster_size as usize)
            .refcount_width(opts.refcount_bits as usize)
            .create()
            .map_err(err)?;
        if opts.compat == Qcow2Compat::V2 {
            downgrade_to_v2(&file, opts.cluster_size as usize).map_err(err)?;
        }
        let storage = ImagoFile::from_open_file(file.try_clone().map_err(err)?, storage_opts())
            .map_err(err)?;
        let qcow2 = Qcow2::<ImagoFile>::builder(storage)
            .write(true)
            .open(DenyImplicitOpenGate::default())
            .map_err(err)?;
        let image = FormatAccess::new(qcow2);
        if image.size() != virtual_size {
            return Err(err(io::Error::other(format!(
                "image has size {} instead of {virtual_size}",
                image.size()
            ))));
        }
        Ok(Self {
            path: path.to_path_buf(),
            size: virtual_size,
            opts: *opts,
            image: Some(image),
            file,
            zeroes: Vec::new(),
        })
    }

    /// The options the image was created with.
    pub fn options(&self) -> &Qcow2Options {
        &self.opts
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn image(&self, op: &'static str) -> Result<&FormatAccess<ImagoFile>> {
        self.image
            .as_ref()
            .ok_or_else(|| Error::target(op, &self.path, finished_error()))
    }

    /// Calls `visit(guest offset, length, mapping)` for each mapping run of the range
    /// (read-only: the map, read-back, allocation queries and v2 zeroing share this
    /// walk); errors name `op`.
    fn walk_mappings(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        mut visit: impl FnMut(u64, u64, &Mapping<'_, ImagoFile>),
    ) -> Result<()> {
        self.check_range(op, offset, len)?;
        let image = self.image(op)?;
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let (mapping, mlen) = image
                .get_mapping(pos, end - pos)
                .map_err(|e| Error::target(op, &self.path, e))?;
            let mlen = mlen.min(end - pos);
            if mlen == 0 {
                return Err(Error::target(
                    op,
                    &self.path,
                    io::Error::other(format!("no mapping at {pos}")),
                ));
            }
            visit(pos, mlen, &mapping);
            pos += mlen;
        }
        Ok(())
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::target(
                op,
                &self.path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {offset}+{len} is beyond the disk size {}", self.size),
                ),
            )),
        }
    }

    /// Zeroes `[offset, offset + len)` on a v2 image by writing zero buffers over the
    /// allocated parts (unallocated clusters already read as zero).
    fn write_zeroes_v2(&mut self, offset: u64, len: u64) -> Result<()> {
        let op = "write zeroes";
        let mut data = Vec::new();
        self.walk_mappings(op, offset, len, |pos, mlen, mapping| {
            if !matches!(mapping, Mapping::Zero { .. }) {
                data.push((pos, mlen));
            }
        })?;
        if data.is_empty() {
            return Ok(());
        }
        if self.zeroes.is_empty() {
            self.zeroes = vec![0u8; ZERO_CHUNK];
        }
        let image = self.image(op)?;
        for (pos, mlen) in data {
            let mut p = pos;
            while p < pos + mlen {
                let n = (pos + mlen - p).min(ZERO_CHUNK as u64) as usize;
                image
                    .write(&self.zeroes[..n], p)
                    .map_err(|e| Error::target(op, &self.path, e))?;
                p += n as u64;
            }
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` on a v3 image: whole clusters become zero clusters
    /// (their data clusters are freed), partial clusters over data get zero bytes, and ranges
    /// that already read as zero by their mapping are left alone.
    fn write_zeroes_v3(&mut self, offset: u64, len: u64) -> Result<()> {
        let op = "write zeroes";
        let path = &self.path;
        let Some(image) = self.image.as_mut() else {
            return Err(Error::target(op, path, finished_error()));
        };
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let (is_zero, mlen) = {
                let (mapping, mlen) = image
                    .get_mapping(pos, end - pos)
                    .map_err(|e| Error::target(op, path, e))?;
                (matches!(mapping, Mapping::Zero { .. }), mlen.min(end - pos))
            };
            if mlen == 0 {
                return Err(Error::target(
                    op,
                    path,
                    io::Error::other(format!("no mapping at {pos}")),
                ));
            }
            if !is_zero {
                image
                    .discard_to_zero(pos, mlen)
                    .map_err(|e| Error::target(op, path, e))?;
            }
            pos += mlen;
        }
        Ok(())
    }
}

impl BlockTarget for Qcow2Target {
    fn size(&self) -> u64 {
        self.size
    }

    fn starts_zeroed(&self) -> bool {
        true
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range("write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.image("write")?
            .write(data, offset)
            .map_err(|e| Error::target("write", &self.path, e))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range("write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.opts.compat {
            Qcow2Compat::V2 => self.write_zeroes_v2(offset, len),
            Qcow2Compat::V3 => self.write_zeroes_v3(offset, len),
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.image("read")?
            .read(buf, offset)
            .map_err(|e| Error::target("read", &self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.image("flush")?
            .flush()
            .map_err(|e| Error::target("flush", &self.path, e))
    }

    /// The data clusters imago wrote through its own descriptor are dirty pages of the
    /// same file: write-out is started through ours. (Metadata imago still holds in its
    /// caches reaches the file at `flush`.)
    fn start_writeback(&mut self) -> Result<()> {
        super::start_file_writeback(&self.file);
        Ok(())
    }

    fn storage_file(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    /// The host clusters behind the range (`u64::MAX` for zero or unallocated ones).
    fn host_extents(&mut self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        self.walk_mappings("map", offset, len, |_, mlen, mapping| {
            let h = match mapping {
                Mapping::Raw { offset, .. } => *offset,
                _ => u64::MAX,
            };
            match out.last_mut() {
                Some((p, pl))
                    if (*p == u64::MAX && h == u64::MAX) || (*p != u64::MAX && *p + *pl == h) =>
                {
                    *pl += mlen
                }
                _ => out.push((h, mlen)),
            }
        })?;
        Ok(Some(out))
    }

    fn sync(&mut self) -> Result<()> {
        let image = self.image("sync")?;
        image
            .flush()
            .map_err(|e| Error::target("flush", &self.path, e))?;
        image
            .sync()
            .map_err(|e| Error::target("sync", &self.path, e))
    }

    /// The allocated (data) parts of the range; unallocated and zero clusters read as zero.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        self.walk_mappings("map", offset, len, |pos, mlen, mapping| {
            if !matches!(mapping, Mapping::Zero { .. }) {
                match out.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += mlen,
                    _ => out.push((pos, mlen)),
                }
            }
        })?;
        Ok(out)
    }

    fn finish(&mut self) -> Result<()> {
        let image = self
            .image
            .take()
            .ok_or_else(|| Error::target("finish", &self.path, finished_error()))?;
        image
            .flush()
            .map_err(|e| Error::target("flush", &self.path, e))?;
        // imago writes nothing more after a flush; closing it first means nothing can
        // overwrite the header options below.
        drop(image);
        apply_header_options(&self.file, &self.opts)
            .map_err(|e| Error::target("finish", &self.path, e))?;
        self.file
            .sync_all()
            .map_err(|e| Error::target("sync", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn info(json: &str) -> nbdfmt::QcowInfo {
        nbdfmt::QcowInfo::parse(json.as_bytes()).expect("valid qcow.json")
    }

    fn data(fields: &str) -> nbdfmt::QcowInfo {
        info(&format!(
            r#"{{"virtual-size": 1048576, "format": "qcow2", "format-specific": {{"type": "qcow2", "data": {{{fields}}}}}}}"#
        ))
    }

    fn unsupported_message(r: Result<Qcow2Options>) -> String {
        match r {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                e.to_string()
            }
            Ok(o) => panic!("accepted: {o:?}"),
        }
    }

    #[test]
    fn defaults_when_keys_are_missing() {
        assert_eq!(
            Qcow2Options::from_qcow_info(&info("{}")).expect("ok"),
            Qcow2Options::default()
        );
        let d = Qcow2Options::default();
        assert_eq!(
            (
                d.cluster_size,
                d.compat,
                d.lazy_refcounts,
                d.compression_type,
                d.refcount_bits
            ),
            (65_536, Qcow2Compat::V3, false, CompressionType::Zlib, 16)
        );
    }

    #[test]
    fn carries_the_options_over() {
        let j = r#"{"virtual-size": 41943040, "filename": "x", "cluster-size": 131072, "format": "qcow2",
          "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zstd",
          "lazy-refcounts": true, "refcount-bits": 16, "corrupt": false, "extended-l2": false}}}"#;
        let o = Qcow2Options::from_qcow_info(&info(j)).expect("ok");
        assert_eq!(
            o,
            Qcow2Options {
                cluster_size: 131_072,
                compat: Qcow2Compat::V3,
                lazy_refcounts: true,
                compression_type: CompressionType::Zstd,
                refcount_bits: 16
            }
        );
        let o = Qcow2Options::from_qcow_info(&data(r#""compat": "0.10", "refcount-bits": 16"#))
            .expect("ok");
        assert_eq!(o.compat, Qcow2Compat::V2);
        let o = Qcow2Options::from_qcow_info(&data(r#""compat": "1.1", "refcount-bits": 1"#))
            .expect("ok");
        assert_eq!(o.refcount_bits, 1);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "1.1", "extended-l2": true"#,
        )));
        assert!(m.contains("extended_l2"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "1.1", "data-file": "/var/lib/x.raw""#,
        )));
        assert!(m.contains("data_file=/var/lib/x.raw"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "1.1", "data-file-raw": true"#,
        )));
        assert!(m.contains("data_file_raw"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(r#""compat": "2.0""#)));
        assert!(m.contains("compat") && m.contains("2.0"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compression-type": "lz4""#,
        )));
        assert!(m.contains("compression type") && m.contains("lz4"), "{m}");
        for cs in ["256", "4194304", "65537", "8589934592"] {
            let m = unsupported_message(Qcow2Options::from_qcow_info(&info(&format!(
                r#"{{"cluster-size": {cs}}}"#
            ))));
            assert!(m.contains("cluster size"), "{m}");
        }
        for rb in ["0", "3", "128"] {
            let m = unsupported_message(Qcow2Options::from_qcow_info(&data(&format!(
                r#""refcount-bits": {rb}"#
            ))));
            assert!(m.contains("refcount width"), "{m}");
        }
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "0.10", "lazy-refcounts": true"#,
        )));
        assert!(m.contains("lazy refcounts"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "0.10", "compression-type": "zstd""#,
        )));
        assert!(m.contains("zstd"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "0.10", "refcount-bits": 64"#,
        )));
        assert!(m.contains("refcount width"), "{m}");
    }

    #[test]
    fn create_refuses_an_existing_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exists.qcow2");
        std::fs::write(&path, b"precious").expect("write");
        let e =
            Qcow2Target::create(&path, 1 << 20, &Qcow2Options::default()).expect_err("must refuse");
        assert_eq!(e.kind(), ErrorKind::TargetIo);
        assert!(e.to_string().contains("exists.qcow2"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    }

    #[test]
    fn create_refuses_bad_sizes_and_options_without_leaving_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.qcow2");
        let e =
            Qcow2Target::create(&path, 1000, &Qcow2Options::default()).expect_err("unaligned size");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let bad = Qcow2Options {
            cluster_size: 3000,
            ..Qcow2Options::default()
        };
        assert_eq!(
            Qcow2Target::create(&path, 1 << 20, &bad)
                .expect_err("bad cluster")
                .kind(),
            ErrorKind::Unsupported
        );
        assert!(!path.exists());
    }

    #[test]
    fn empty_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        for opts in [
            Qcow2Options::default(),
            Qcow2Options {
                compat: Qcow2Compat::V2,
                ..Qcow2Options::default()
            },
        ] {
            let path = dir
                .path()
                .join(format!("empty-{}.qcow2", opts.compat.as_str()));
            let mut t = Qcow2Target::create(&path, 0, &opts).expect("create");
            t.write_at(0, &[]).expect("empty write");
            t.write_zeroes(0, 0).expect("empty zero");
            assert!(t.write_at(0, b"x").is_err());
            assert_eq!(t.data_ranges(0, 0).expect("map"), Vec::new());
            t.finish().expect("finish");
        }
    }

    #[test]
    fn is_send() {
        fn send<T: Send>() {}
        send::<Qcow2Target>();
    }

    #[test]
    fn roundtrip_and_bounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        for opts in [
            Qcow2Options::default(),
            Qcow2Options {
                compat: Qcow2Compat::V2,
                cluster_size: 4096,
                ..Qcow2Options::default()
            },
            Qcow2Options {
                compression_type: CompressionType::Zstd,
                lazy_refcounts: true,
                cluster_size: 512,
                ..Qcow2Options::default()
            },
        ] {
            let path = dir.path().join(format!(
                "rt-{}-{}.qcow2",
                opts.compat.as_str(),
                opts.cluster_size
            ));
            let size = 3 << 20;
            let mut t = Qcow2Target::create(&path, size, &opts).expect("create");
            assert!(t.starts_zeroed());
            assert_eq!(t.size(), size);
            let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 + 1).collect();
            t.write_at(12_345, &payload).expect("write");
            t.write_zeroes(50_000, 70_000).expect("zero");
            let mut back = vec![0u8; 300_000];
            t.read_at(0, &mut back).expect("read");
            let mut model = vec![0u8; 300_000];
            model[12_345..12_345 + payload.len()].copy_from_slice(&payload);
            model[50_000..120_000].fill(0);
            assert!(back == model, "content differs ({opts:?})");
            assert_eq!(
                t.write_at(size - 10, &[1u8; 11])
                    .expect_err("past end")
                    .kind(),
                ErrorKind::TargetIo
            );
            assert!(t.write_zeroes(u64::MAX, 2).is_err());
            assert!(t.read_at(size, &mut [0u8; 1]).is_err());
            t.write_at(size - 10, &[7u8; 10]).expect("last bytes");
            t.write_at(size, &[]).expect("empty write at the end");
            t.sync().expect("sync");
            t.finish().expect("finish");
            assert!(t.finish().is_err(), "second finish");
            assert!(t.write_at(0, b"x").is_err(), "write after finish");

            let hdr = std::fs::read(&path).expect("read image");
            let version = be32(&hdr, 4);
            assert_eq!(version, if opts.compat == Qcow2Compat::V2 { 2 } else { 3 });
            assert_eq!(1u32 << be32(&hdr, 20), opts.cluster_size);
            if version == 3 {
                let incompat = be64(&hdr, hdr::INCOMPATIBLE);
                let compat = be64(&hdr, hdr::COMPATIBLE);
                assert_eq!(compat & 1 != 0, opts.lazy_refcounts);
                assert_eq!(
                    incompat & 8 != 0,
                    opts.compression_type == CompressionType::Zstd
                );
                if opts.compression_type == CompressionType::Zstd {
                    assert_eq!(be32(&hdr, hdr::HEADER_LENGTH), 112);
                    assert_eq!(hdr[104], 1);
                }
            }
        }
    }
}
