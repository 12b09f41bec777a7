//! Small side files read whole (`.chksum`, `qcow.json`, domain XML, `.cpt`, TPM
//! metadata, TLS certificates): the backup tree can be anyone's, so such a file must
//! be a regular file — a FIFO would block the open forever and `/dev/zero` would never
//! end — and its size is refused from `fstat` before a byte is read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Reads `path` whole when it is a regular file of at most `max` bytes.
///
/// Errors are `std::io::Error`s (`NotFound` stays `NotFound`); a FIFO, socket or
/// device, or a file over `max` bytes, is `InvalidData` with a message that says
/// which, never the content.
pub fn read_small_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting
    let f: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let md = f.metadata()?;
    let ft = md.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a directory"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}, not a regular file"),
        ));
    }
    if md.len() > max {
        return Err(too_big(md.len(), max));
    }
    let mut buf = Vec::with_capacity(usize::try_from(md.len()).unwrap_or(0));
    // a file that grows while it is read stops at max + 1 bytes
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_big(buf.len() as u64, max));
    }
    Ok(buf)
}

fn too_big(len: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{len} bytes, more than the {max} a file of this kind can have"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_big_files_are_refused_without_reading() {
        let d = tempfile::tempdir().expect("tmp");
        let fifo = d.path().join("x.chksum");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(st.success());
        let e = read_small_file(&fifo, 64).expect_err("fifo");
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = read_small_file(Path::new("/dev/zero"), 64).expect_err("device");
        assert!(e.to_string().contains("device"), "{e}");
        let big = d.path().join("big");
        std::fs::write(&big, vec![b'1'; 65]).expect("w");
        let e = read_small_file(&big, 64).expect_err("big");
        assert!(e.to_string().starts_with("65 bytes"), "{e}");
        std::fs::write(&big, b"12345").expect("w");
        assert_eq!(read_small_file(&big, 64).expect("small"), b"12345");
        let e = read_small_file(&d.path().join("none"), 64).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
