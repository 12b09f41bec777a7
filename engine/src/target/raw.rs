//! Raw targets: a new sparse file (holes stay holes) or an existing block device
//! (LVM, zvol, loop: not fresh, so zero ranges are really zeroed).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::error::{Error, Result};
use crate::target::BlockTarget;

/// A raw image file or block device.
#[derive(Debug)]
pub struct RawTarget {
    file: File,
    path: PathBuf,
    size: u64,
    fresh: bool,
    /// Logical block size of a block device (`BLKZEROOUT` needs ranges aligned to it);
    /// 0 for a file.
    block_size: u64,
}

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t); BLKSSZGET = _IO(0x12, 104) writing an int;
    // BLKZEROOUT = _IO(0x12, 127) taking u64[2].
    nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blk_ssz_get, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_write_ptr_bad!(blk_zero_out, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// The size in bytes of the block device at `path` (`BLKGETSIZE64`), e.g. for a
/// free-space check before [`save_device_image`](crate::rollback::save_device_image).
/// Opens the device read-only and not exclusively, so it works while the device is in use.
///
/// # Errors
/// `Unsupported` when `path` is not a block device; `Target` (naming `path`) when it
/// cannot be opened or sized.
pub fn block_device_size(path: &Path) -> Result<u64> {
    require_block_device(path)?;
    let file = File::open(path).map_err(|e| Error::target("opening", path, e))?;
    device_size(&file, path)
}

/// Opens the block device at `path` exclusively, read-only or for writing, and returns
/// it with its size. Refused (`Target`, `ResourceBusy`, naming `path`) when
/// - `O_EXCL` fails: the device is mounted, an LVM/RAID member, or held exclusively by
///   another program;
/// - another program holds a `fcntl` lock on it. QEMU opens its disks without `O_EXCL`
///   but locks them (OFD locks, `locking=auto`), so this is what catches a running VM
///   using the device; a VM started with `locking=off` is not seen, the caller checks
///   the domain's state.
pub(crate) fn open_exclusive(path: &Path, write: bool) -> Result<(File, u64)> {
    require_block_device(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(Errno::EBUSY as i32) {
                Error::target(
                    "opening exclusively",
                    path,
                    io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "{e}: the device is in use (mounted, an LVM or RAID member, a \
                             running VM's disk, or opened exclusively by another program)"
                        ),
                    ),
                )
            } else {
                Error::target("opening exclusively", path, e)
            }
        })?;
    refuse_if_locked(&file, path)?;
    let size = device_size(&file, path)?;
    Ok((file, size))
}

/// `Err` when any other open file description holds a `fcntl` lock (OFD or POSIX)
/// anywhere on `file`: asks whether a write lock over all of it would conflict.
fn refuse_if_locked(file: &File, path: &Path) -> Result<()> {
    // SAFETY: `flock` is a plain C struct of integers, for which all zero bytes is a
    // valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(|e| Error::target("checking locks on", path, e.into()))?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(());
    }
    Err(Error::target(
        "opening exclusively",
        path,
        io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "the device is in use: another program holds a lock on it at byte {} \
                 (a running VM: QEMU locks the disks it uses)",
                fl.l_start
            ),
        ),
    ))
}

fn require_block_device(path: &Path) -> Result<()> {
    let md = std::fs::metadata(path).map_err(|e| Error::target("inspecting", path, e))?;
    if md.file_type().is_block_device() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "{} is not a block device",
            path.display()
        )))
    }
}

fn device_size(file: &File, path: &Path) -> Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`, a valid, aligned u64 we own; the
    // descriptor is owned by `file`, alive for the call.
    unsafe { ioctl::blk_get_size64(file.as_raw_fd(), &mut size) }
        .map_err(|e| Error::target("sizing", path, e.into()))?;
    Ok(size)
}

impl RawTarget {
    /// Creates a new sparse file of `size` bytes. Refuses an existing path.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::target("creating", path, e))?;
        file.set_len(size)
            .map_err(|e| Error::target("sizing", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            fresh: true,
            block_size: 0,
        })
    }

    /// Opens an existing block device to restore a disk of `disk_size` bytes into it.
    ///
    /// - Exclusively (`O_EXCL`): a device that is mounted, an LVM/RAID member or held
    ///   open exclusively by another program is refused, and so is one that another
    ///   program holds a `fcntl` lock on (a running VM: QEMU locks its disks but does
    ///   not use `O_EXCL`). The error is `Target` (`ResourceBusy`) naming `path`.
    /// - The device is not known to read as zero ([`starts_zeroed`] is false), so
    ///   [`apply`](crate::apply()) writes every hole with
    ///   [`write_zeroes`](BlockTarget::write_zeroes) (`BLKZEROOUT`, which guarantees
    ///   zeroes, unlike `BLKDISCARD`) and reads holes back in its verification.
    /// - A device larger than the disk: its tail `[disk_size, device size)` is zeroed
    ///   here, before anything else is written, so the whole device reads as the disk
    ///   followed by zeroes and nothing of its old content (a stale backup GPT header,
    ///   RAID or LVM signatures at the end) survives. The target's
    ///   [`size`](BlockTarget::size) is `disk_size`. (`BLKZEROOUT` cannot be
    ///   interrupted: a huge tail on a device without a fast zeroing command takes as
    ///   long as writing it.)
    ///
    /// Take any rollback image ([`save_device_image`](crate::rollback::save_device_image))
    /// before: this already overwrites the tail.
    ///
    /// [`starts_zeroed`]: BlockTarget::starts_zeroed
    ///
    /// # Errors
    /// `Unsupported` when `path` is not a block device or is smaller than `disk_size`;
    /// `Target` (naming `path`) when it is in use or cannot be opened, sized or its
    /// tail zeroed.
    pub fn open_block_device_for_disk(path: &Path, disk_size: u64) -> Result<Self> {
        let mut t = Self::open_block_device(path)?;
        let device_size = t.size;
        if device_size < disk_size {
            return Err(Error::Unsupported(format!(
                "{} holds {device_size} bytes, the disk needs {disk_size}",
                path.display()
            )));
        }
        t.write_zeroes(disk_size, device_size - disk_size)?;
        t.size = disk_size;
        Ok(t)
    }

    /// Opens an existing block device as a target of its own size, exclusively and not
    /// known to read as zero, as [`open_block_device_for_disk`] does, but without
    /// touching anything: restoring a disk smaller than the device this way leaves the
    /// device's tail beyond the disk as it was. To restore a disk, use
    /// [`open_block_device_for_disk`].
    ///
    /// [`open_block_device_for_disk`]: Self::open_block_device_for_disk
    ///
    /// # Errors
    /// As [`open_block_device_for_disk`](Self::open_block_device_for_disk), but never
    /// for the size.
    pub fn open_block_device(path: &Path) -> Result<Self> {
        let (file, size) = open_exclusive(path, true)?;
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `ssz`, a valid, aligned c_int we own; the
        // descriptor is owned by `file`, alive for the call.
        unsafe { ioctl::blk_ssz_get(file.as_raw_fd(), &mut ssz) }
            .map_err(|e| Error::target("sizing", path, e.into()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            fresh: false,
            block_size: u64::try_from(ssz).unwrap_or(512).max(512),
        })
    }

    /// The path written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `BLKZEROOUT` over the part of the range aligned to the logical block size (the
    /// kernel writes zeroes, or unmaps only where the device guarantees they read back
    /// as zero), zero buffers for unaligned edges and wherever the ioctl fails.
    fn zero_device_range(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let bs = self.block_size;
        let (a, b) = (offset.div_ceil(bs) * bs, end / bs * bs);
        if a >= b {
            return self.write_zero_buffers(offset, len);
        }
        self.write_zero_buffers(offset, a - offset)?;
        let range = [a, b - a];
        // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) from the pointer, which
        // points at `range`, alive for the call; the descriptor is owned by `self.file`.
        if unsafe { ioctl::blk_zero_out(self.file.as_raw_fd(), &range) }.is_err() {
            self.write_zero_buffers(a, b - a)?;
        }
        self.write_zero_buffers(b, end - b)
    }

    fn write_zero_buffers(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let buf = vec![0u8; (1usize << 20).min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            self.file
                .write_all_at(&buf[..n], pos)
                .map_err(|e| Error::target("zeroing", &self.path, e))?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl BlockTarget for RawTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn starts_zeroed(&self) -> bool {
        self.fresh
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::target("writing", &self.path, e))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::Unsupported("offset beyond 2^63".into()));
        };
        if self.block_size > 0 {
            return self.zero_device_range(offset, len);
        }
        // Punching a hole deallocates and reads back as zero; where the filesystem
        // cannot, write zeroes.
        match fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        ) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zero_buffers(offset, len),
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::target("reading back", &self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn start_writeback(&mut self) -> Result<()> {
        super::start_file_writeback(&self.file);
        Ok(())
    }

    fn storage_file(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::target("syncing", &self.path, e))
    }

    fn finish(&mut self) -> Result<()> {
        self.sync()
    }

    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if self.block_size > 0 {
            return Ok(vec![(offset, len)]);
        }
        Ok(file_data_ranges(&self.file, offset, len))
    }
}

/// The parts of `[offset, offset + len)` of a regular file that may hold data
/// (`SEEK_DATA`/`SEEK_HOLE`); the whole range when the file system cannot tell.
pub(crate) fn file_data_ranges(file: &File, offset: u64, len: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let Ok(p) = i64::try_from(pos) else { break };
        let data = match lseek(file, p, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return vec![(offset, len)],
        };
        if data >= end {
            break;
        }
        let hole = match lseek(file, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(_) => end,
        };
        out.push((data, hole - data));
        pos = hole;
    }
    out
}
