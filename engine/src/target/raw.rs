//! Raw targets: a new sparse file (holes stay holes) or an existing block device
//! (LVM, zvol, loop: not fresh, so zero ranges are really zeroed).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

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
    block_device: bool,
}

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t); BLKZEROOUT = _IO(0x12, 127) taking u64[2].
    nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(blk_zero_out, nix::request_code_none!(0x12, 127), [u64; 2]);
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
            block_device: false,
        })
    }

    /// Opens an existing block device for writing (exclusively, so a mounted or
    /// in-use device is refused by the kernel).
    pub fn open_block_device(path: &Path) -> Result<Self> {
        let md = std::fs::metadata(path).map_err(|e| Error::target("inspecting", path, e))?;
        if !md.file_type().is_block_device() {
            return Err(Error::Unsupported(format!(
                "{} is not a block device",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_excl())
            .open(path)
            .map_err(|e| Error::target("opening", path, e))?;
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 into `size`, a valid, aligned u64 we own.
        unsafe { ioctl::blk_get_size64(file.as_raw_fd(), &mut size) }
            .map_err(|e| Error::target("sizing", path, e.into()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            fresh: false,
            block_device: true,
        })
    }

    /// The path written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_zero_buffers(&mut self, offset: u64, len: u64) -> Result<()> {
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

fn libc_o_excl() -> i32 {
    nix::fcntl::OFlag::O_EXCL.bits()
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
        if self.block_device {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) from the pointer, which
            // points at `range`, alive for the call.
            match unsafe { ioctl::blk_zero_out(self.file.as_raw_fd(), &range) } {
                Ok(_) => return Ok(()),
                Err(_) => return self.write_zero_buffers(offset, len),
            }
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
        if self.block_device {
            return Ok(vec![(offset, len)]);
        }
        use nix::unistd::{lseek, Whence};
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let Ok(p) = i64::try_from(pos) else { break };
            let data = match lseek(&self.file, p, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(_) => return Ok(vec![(offset, len)]),
            };
            if data >= end {
                break;
            }
            let hole = match lseek(&self.file, data as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(end),
                Err(_) => end,
            };
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(out)
    }
}
