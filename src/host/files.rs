//! Files this run writes beside others' (a restore path, an evidence directory): never
//! through a symlink planted at the name. vmrestore runs as root, and such a
//! directory can be shared: a link at a predictable name (`.<disk>.damage.json.
//! vmrestore-<pid>.part`, `<clone>.json`) would otherwise make root truncate and
//! write whatever file it points at.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `O_NOFOLLOW|O_NOCTTY`: a symlink at the name fails with ELOOP, a device never
/// becomes our terminal.
const FLAGS: i32 = nix::libc::O_NOFOLLOW | nix::libc::O_NOCTTY;

/// A new file at `path`: fails when anything (a file, a symlink) has the name.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(FLAGS)
        .mode(0o644)
        .open(path)
}

/// `path` opened for writing (created, or a regular file emptied); a symlink or
/// anything but a regular file at the name is refused.
fn replace(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(FLAGS | nix::libc::O_NONBLOCK)
        .mode(0o644)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // truncated only once known to be a regular file of ours
    f.set_len(0)?;
    Ok(f)
}

/// `bytes` as the content of `path` (created, or a regular file replaced), synced
/// when `sync`; a symlink or anything but a regular file at the name is refused.
pub fn write(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let mut f = replace(path)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    Ok(())
}

/// Copies the file at `from` to `to` the way [`write`] writes, without reading it
/// whole (a console log can be large).
pub fn copy(from: &Path, to: &Path) -> io::Result<u64> {
    let mut src = File::open(from)?;
    io::copy(&mut src, &mut replace(to)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let d = tempfile::tempdir().expect("tmp");
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep\n").expect("victim");
        let link = d.path().join("planted");
        std::os::unix::fs::symlink(&victim, &link).expect("ln");
        assert!(create_new(&link).is_err());
        assert!(write(&link, b"root's bytes", true).is_err());
        let src = d.path().join("src");
        std::fs::write(&src, "console").expect("src");
        assert!(copy(&src, &link).is_err());
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "keep\n");
    }

    #[test]
    fn regular_files_are_created_and_replaced() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        write(&p, b"a longer first content", false).expect("create");
        write(&p, b"short", true).expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"short");
        let src = d.path().join("src");
        std::fs::write(&src, vec![7u8; 200_000]).expect("src");
        assert_eq!(copy(&src, &p).expect("copy"), 200_000);
        assert_eq!(std::fs::read(&p).expect("read"), vec![7u8; 200_000]);
        assert!(create_new(&p).is_err(), "the name is taken");
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        assert!(write(&fifo, b"x", false).is_err());
    }
}
