//! Rollback images: before a restore overwrites a block device, its current content is
//! copied into a sparse raw file, so the administrator can put it back.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::output::StagedPath;

/// Blocks that read as zero are left as holes in the image; this is the granularity
/// (the page and filesystem block size almost everywhere).
const ZERO_BLOCK: usize = 4096;

/// Bytes read from the device at a time.
const READ_SIZE: usize = 4 << 20;

/// Written bytes between two write-outs of the image's dirty pages (a rollback image
/// of a large device must not fill the page cache).
const RELEASE_STEP: u64 = 64 << 20;

/// What [`save_device_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceImageReport {
    /// The image, under its final name.
    pub path: PathBuf,
    /// Bytes copied: the device size, which is also the image's size.
    pub bytes_copied: u64,
    /// Bytes that held data and were written; the rest (all-zero blocks) are holes.
    pub data_bytes: u64,
}

/// Copies the current content of the block device `device` into a new sparse raw file
/// `image`: all-zero 4 KiB blocks stay holes. The image is written under its staged
/// name (`.<name>.vmrestore-<pid>.part`, see [`StagedPath`]), fsynced, then renamed to
/// `image` and the directory synced: `image` exists only complete. On any failure or
/// cancellation the staged file is removed and `image` never appears.
///
/// The device is opened exclusively (`O_EXCL`), like
/// [`RawTarget::open_block_device`](crate::target::raw::RawTarget::open_block_device):
/// a device in use is refused, and nobody can mount it while it is copied. Its page
/// cache is dropped behind the copy. `cancel` is checked every 4 MiB.
///
/// # Errors
/// `Unsupported` when `device` is not a block device; `Target` naming `image` when it
/// exists already or cannot be written (`NoSpace` kind on ENOSPC), naming `device` when
/// it is in use or cannot be read; `Cancelled` when `cancel` fired.
pub fn save_device_image(
    device: &Path,
    image: &Path,
    cancel: &Cancel,
) -> Result<DeviceImageReport> {
    if std::fs::symlink_metadata(image).is_ok() {
        return Err(Error::target(
            "creating the rollback image",
            image,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
        ));
    }
    let (dev, size) = crate::target::raw::open_exclusive(device, false)?;
    let staged = StagedPath::new(image);
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(staged.temp_path())
        .map_err(|e| Error::target("creating the rollback image", image, e))?;
    let writing = |e| Error::target("writing the rollback image", image, e);
    out.set_len(size).map_err(writing)?;
    advise(&dev, 0, 0, libc::POSIX_FADV_SEQUENTIAL);

    let mut buf = vec![0u8; READ_SIZE];
    let (mut pos, mut data_bytes, mut unreleased, mut released_to) = (0u64, 0u64, 0u64, 0u64);
    while pos < size {
        cancel.check()?;
        let n = usize::try_from(size - pos).map_or(READ_SIZE, |r| r.min(READ_SIZE));
        let chunk = &mut buf[..n];
        dev.read_exact_at(chunk, pos)
            .map_err(|e| Error::target("reading", device, e))?;
        for (start, len) in data_runs(chunk) {
            out.write_all_at(&chunk[start..start + len], pos + start as u64)
                .map_err(writing)?;
            data_bytes += len as u64;
            unreleased += len as u64;
        }
        advise(&dev, pos, n as u64, libc::POSIX_FADV_DONTNEED);
        pos += n as u64;
        if unreleased >= RELEASE_STEP {
            crate::target::release_file_range(&out, released_to, pos - released_to);
            (unreleased, released_to) = (0, pos);
        }
    }
    cancel.check()?;
    out.sync_all()
        .map_err(|e| Error::target("syncing", image, e))?;
    drop(out);
    let path = staged.commit(false)?;
    Ok(DeviceImageReport {
        path,
        bytes_copied: size,
        data_bytes,
    })
}

/// `(start, len)` of the runs of [`ZERO_BLOCK`]-sized blocks of `buf` that hold
/// anything but zero bytes (the last block may be shorter).
fn data_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i * ZERO_BLOCK;
        match runs.last_mut() {
            Some((s, l)) if *s + *l == start => *l += block.len(),
            _ => runs.push((start, block.len())),
        }
    }
    runs
}

/// `posix_fadvise` as a hint: its errors are ignored.
fn advise(file: &std::fs::File, offset: u64, len: u64, advice: libc::c_int) {
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is owned by
    // `file`, alive for the call.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), o, l, advice) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_runs_skip_zero_blocks() {
        let mut b = vec![0u8; 5 * ZERO_BLOCK + 100];
        b[1] = 1; // block 0
        b[2 * ZERO_BLOCK + 7] = 1; // block 2
        b[3 * ZERO_BLOCK] = 1; // block 3, joins block 2
        b[5 * ZERO_BLOCK + 99] = 1; // short last block
        assert_eq!(
            data_runs(&b),
            vec![
                (0, ZERO_BLOCK),
                (2 * ZERO_BLOCK, 2 * ZERO_BLOCK),
                (5 * ZERO_BLOCK, 100)
            ]
        );
        assert!(data_runs(&[0u8; 3 * ZERO_BLOCK]).is_empty());
        assert!(data_runs(&[]).is_empty());
    }

    #[test]
    fn a_file_is_not_a_device() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("plain");
        std::fs::write(&f, b"x").expect("write");
        let img = d.path().join("img");
        let e = save_device_image(&f, &img, &Cancel::new()).expect_err("not a device");
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("plain"), "{e}");
        assert!(!img.exists());
        let e = crate::target::raw::block_device_size(&f).expect_err("not a device");
        assert!(e.to_string().contains("not a block device"), "{e}");
    }
}
