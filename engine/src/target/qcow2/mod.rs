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
//!
//! Files: `options` ([`Qcow2Options`] from `qcow.json`), `header` (raw header edits),
//! `storage` (imago's file storage, grown in large steps and cut to size at flush);
//! this one holds the target.

mod header;
mod options;
mod storage;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
    StorageOpenOptions,
};

use super::BlockTarget;
use crate::error::{Error, Result};
use header::{apply_header_options, downgrade_to_v2};
use storage::GrowLater;

pub use options::{CompressionType, Qcow2Compat, Qcow2Options, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE};

/// imago's storage driver for plain files.
type ImagoFile = imago::file::File;

/// Size of the zero buffer for zero writes on v2 images.
const ZERO_CHUNK: usize = 1024 * 1024;

/// A new qcow2 image being written. See the module documentation.
#[derive(Debug)]
pub struct Qcow2Target {
    path: PathBuf,
    size: u64,
    opts: Qcow2Options,
    /// imago's view of the image; `None` once finished.
    image: Option<FormatAccess<GrowLater>>,
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
        let qcow2 = Qcow2::<GrowLater>::builder(GrowLater::new(storage).map_err(err)?)
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

    fn image(&self, op: &'static str) -> Result<&FormatAccess<GrowLater>> {
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
        mut visit: impl FnMut(u64, u64, &Mapping<'_, GrowLater>),
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

    fn host_granule(&self) -> Option<u64> {
        Some(u64::from(self.opts.cluster_size))
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

    /// The parts of the range that may hold data: allocated clusters, less what the
    /// image file holds as a hole (the unwritten rest of a cluster whose data is only a
    /// few KiB: reading it would fault in pages of zeroes). Unallocated and zero
    /// clusters read as zero.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut mapped: Vec<(u64, u64, Option<u64>)> = Vec::new();
        self.walk_mappings("map", offset, len, |pos, mlen, mapping| {
            let host = match mapping {
                Mapping::Zero { .. } => return,
                Mapping::Raw { offset, .. } => Some(*offset),
                _ => None,
            };
            match mapped.last_mut() {
                Some((o, l, h))
                    if *o + *l == pos
                        && match (*h, host) {
                            (Some(a), Some(b)) => a + *l == b,
                            (None, None) => true,
                            _ => false,
                        } =>
                {
                    *l += mlen
                }
                _ => mapped.push((pos, mlen, host)),
            }
        })?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, l: u64| match out.last_mut() {
            Some((o, ol)) if *o + *ol == s => *ol += l,
            _ => out.push((s, l)),
        };
        for (pos, l, host) in mapped {
            match host {
                Some(h) => {
                    for (ds, dl) in super::raw::file_data_ranges(&self.file, h, l) {
                        push(pos + (ds - h), dl);
                    }
                }
                None => push(pos, l),
            }
        }
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
    use super::header::{be32, be64, hdr};
    use super::*;
    use crate::error::ErrorKind;
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
