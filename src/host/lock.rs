//! The per-VM lock shared with vmbackup: `<state root>/_state/locks/vmbackup-<vm>.lock`
//! holding the holder's PID and a newline (spec §6).
//!
//! vmbackup creates the file with `O_CREAT|O_EXCL` (bash `noclobber`), writes its PID,
//! and judges a holder by that PID: alive and running vmbackup, vmrestore or
//! virtnbdbackup. vmrestore writes the same file and also holds an exclusive `flock` on
//! it for the whole run, so two vmrestores can never both pass the check:
//!
//! - a file is judged only while its `flock` is ours; a `flock` held by someone else
//!   means a live vmrestore (or one replacing a stale file this instant);
//! - a stale file is removed only after it was renamed to a private name and found to
//!   be the very inode judged; anything else found there (a lock vmbackup, which takes
//!   no `flock`, made meanwhile) is linked back, never removed;
//! - an empty file is given [`EMPTY_GRACE`] to receive its PID: vmbackup writes it just
//!   after creating the file.
//!
//! The directories are opened without following symlinks ([`crate::host::state`]), and
//! the VM name must be one path component.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, FlockArg, OFlag};
use nix::sys::stat::{fstatat, Mode};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

use crate::host::state::{is_regular, Dir, Refusal};

/// How long a lock file whose `flock` someone holds without a live PID in it (a
/// vmrestore replacing a stale file) is waited for before it counts as held.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// How long an empty lock file is given to receive its PID.
pub const EMPTY_GRACE: Duration = Duration::from_secs(2);

const POLL: Duration = Duration::from_millis(20);

/// A lock file is a PID and a newline: read no further than this.
const MAX_READ: usize = 64;

/// Longest VM name accepted for a lock file name (issue 18).
const MAX_NAME: usize = 255;

/// A held lock: the open file, its `flock`, and the directory it lives in. Released
/// (removed if it is still our file with our PID) on drop.
#[derive(Debug)]
pub struct VmLock {
    path: PathBuf,
    dir: Dir,
    name: String,
    handle: Option<Handle>,
    pid: u32,
}

/// An open lock file. Its `flock`, when taken, belongs to the open file and is let
/// go when the file is closed (dropped). nix's `Flock` guard is not used: its drop
/// panics when an unlock fails (an NFS unlock interrupted by a signal can), and a
/// lock file must never abort a restore's cleanup.
#[derive(Debug)]
struct Handle {
    file: File,
}

/// `flock(LOCK_EX|LOCK_NB)` on `file`.
#[allow(deprecated)] // the plain call, for the reason given at `Handle`
fn try_flock(file: &File) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    nix::fcntl::flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock)
}

impl Handle {
    fn file(&self) -> &File {
        &self.file
    }

    /// Tries the `flock` of `file` without waiting: `Err` carries
    /// the file back (unlocked) and whether someone else holds the `flock` (rather
    /// than the filesystem having none).
    fn lock(file: File) -> Result<Handle, (File, bool)> {
        match try_flock(&file) {
            Ok(()) => Ok(Handle { file }),
            Err(e) => Err((file, e == Errno::EWOULDBLOCK)),
        }
    }

    /// A handle without a `flock` (the filesystem has none): the PID protects it.
    fn plain(file: File) -> Handle {
        Handle { file }
    }

    /// Closes the file, letting go of its `flock`.
    fn release(self) {}
}

/// What happened when taking the lock.
#[derive(Debug)]
pub enum Acquired {
    /// We hold it. `stale` is the PID text of a dead or foreign holder we replaced.
    Held {
        /// The lock.
        lock: VmLock,
        /// A stale holder that was removed.
        stale: Option<String>,
    },
    /// The lock cannot be taken safely here (read-only tree, a `_state` piece that is
    /// a symlink or of the wrong type): continue without a lock.
    Unavailable {
        /// The lock path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A live backup or restore holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("VM '{vm}' is locked by another backup or restore (PID {pid}): {}", path.display())]
pub struct LockHeld {
    /// VM name.
    pub vm: String,
    /// Holder.
    pub pid: u32,
    /// Lock file.
    pub path: PathBuf,
}

/// A VM name that cannot be a lock file name: it would not be one file inside
/// `_state/locks`.
#[derive(Debug, thiserror::Error)]
#[error("VM name {name:?} cannot name a lock file: {why}")]
pub struct BadVmName {
    /// The name (printed escaped).
    pub name: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// A live holder.
    #[error(transparent)]
    Held(#[from] LockHeld),
    /// The VM name is not a single safe path component.
    #[error(transparent)]
    BadName(#[from] BadVmName),
}

/// `vmbackup-<vm>.lock`, when `vm` is one safe path component: not empty, not `.` or
/// `..`, no `/` or NUL, at most 255 bytes.
fn lock_name(vm: &str) -> Result<String, BadVmName> {
    let why = if vm.is_empty() {
        Some("it is empty")
    } else if vm == "." || vm == ".." {
        Some("it is a directory reference")
    } else if vm.contains('/') {
        Some("it contains '/'")
    } else if vm.contains('\0') {
        Some("it contains a NUL byte")
    } else if vm.len() > MAX_NAME {
        Some("it is longer than 255 bytes")
    } else {
        None
    };
    match why {
        Some(why) => Err(BadVmName {
            name: vm.to_owned(),
            why,
        }),
        None => Ok(format!("vmbackup-{vm}.lock")),
    }
}

/// The lock file of `vm` under `state_root`; refused unless `vm` is one safe path
/// component.
pub fn lock_path(state_root: &Path, vm: &str) -> Result<PathBuf, BadVmName> {
    Ok(locks_dir(state_root).join(lock_name(vm)?))
}

fn locks_dir(state_root: &Path) -> PathBuf {
    state_root.join("_state").join("locks")
}

/// `_state/locks`, opened without following symlinks.
fn open_locks(state_root: &Path, create: bool) -> Result<Dir, Refusal> {
    Dir::state(state_root, create)?.subdir("locks", create)
}

/// True when `pid` is alive and runs vmbackup, vmrestore or virtnbdbackup.
fn is_backup_process(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let s = String::from_utf8_lossy(&cmd);
            s.contains("vmbackup") || s.contains("vmrestore") || s.contains("virtnbdbackup")
        }
        Err(_) => false,
    }
}

/// The start of an open lock file, trimmed.
fn read_text(file: &File) -> String {
    let mut buf = [0u8; MAX_READ];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

/// What is at the lock file name.
enum Found {
    /// Nothing (any more): try to create it.
    Gone,
    /// A live holder.
    Live(u32),
    /// Being written, or held by a vmrestore replacing a stale file: look again.
    Busy(Option<u32>),
    /// A dead, foreign or empty holder, judged while holding its `flock`.
    Stale { handle: Handle, text: String },
}

/// Judges the file at `name`. `empty_since` is when this run first found it empty.
fn inspect(dir: &Dir, name: &str, empty_since: &mut Option<Instant>) -> Result<Found, Refusal> {
    let Some(st) = dir.lstat(name)? else {
        return Ok(Found::Gone);
    };
    if !is_regular(&st) {
        return Err(dir.wrong(name, "regular file"));
    }
    // O_NONBLOCK|O_NOFOLLOW: a FIFO or symlink swapped in since the lstat neither
    // blocks nor leads anywhere. Read-write when allowed (nothing is written): NFS
    // emulates flock with POSIX locks, and an exclusive one needs a writable file.
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let opened = match openat(dir, name, flags | OFlag::O_RDWR, Mode::empty()) {
        Err(Errno::EACCES | Errno::EROFS | Errno::EPERM) => {
            openat(dir, name, flags | OFlag::O_RDONLY, Mode::empty())
        }
        other => other,
    };
    let file = match opened {
        Ok(fd) => File::from(fd),
        Err(Errno::ENOENT) => return Ok(Found::Gone),
        Err(Errno::ELOOP) => return Err(dir.wrong(name, "regular file")),
        Err(errno) => {
            return Err(Refusal::Io {
                path: dir.join(name),
                errno,
            })
        }
    };
    let io = |e: std::io::Error| Refusal::Io {
        path: dir.join(name),
        errno: e.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
    };
    let md = file.metadata().map_err(io)?;
    if !md.file_type().is_file() {
        return Err(dir.wrong(name, "regular file"));
    }
    if (md.dev(), md.ino()) != (st.st_dev, st.st_ino) {
        return Ok(Found::Gone); // replaced since the lstat: look again
    }
    let (handle, held_elsewhere) = match Handle::lock(file) {
        Ok(h) => (h, false),
        // held: by whom is told by the PID; no flock on this filesystem: PIDs only
        Err((f, held)) => (Handle::plain(f), held),
    };
    // a flock granted on a file that was removed meanwhile says nothing about the name
    if handle.file().metadata().map_err(io)?.nlink() == 0 {
        return Ok(Found::Gone);
    }
    let text = read_text(handle.file());
    let pid = text.parse::<u32>().ok();
    let me = std::process::id();
    match pid {
        Some(p) if p != me && is_backup_process(p) => return Ok(Found::Live(p)),
        // our own PID under a flock held elsewhere: another lock of this very process
        Some(p) if p == me && held_elsewhere => return Ok(Found::Live(p)),
        _ => {}
    }
    if held_elsewhere {
        hook("busy", false);
        return Ok(Found::Busy(pid));
    }
    if text.is_empty() {
        let young = md
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < EMPTY_GRACE);
        if young && empty_since.get_or_insert_with(Instant::now).elapsed() < EMPTY_GRACE {
            return Ok(Found::Busy(None));
        }
    }
    Ok(Found::Stale { handle, text })
}

/// A random 64-bit value for private file names.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::process::id(), Instant::now()))
}

/// True when `name` in `dir` is the inode of `file`.
fn still_names(dir: &Dir, name: &str, file: &File) -> bool {
    match (
        file.metadata(),
        fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW),
    ) {
        (Ok(md), Ok(st)) => (md.dev(), md.ino()) == (st.st_dev, st.st_ino),
        _ => false,
    }
}

/// What [`remove_if_same`] did.
#[derive(Debug, PartialEq, Eq)]
enum Removal {
    /// The file judged was removed.
    Removed,
    /// The name was already free.
    Gone,
    /// Another file had taken the name: it is back under it, untouched.
    PutBack,
    /// Another file had taken the name, and the name was taken again before it could
    /// be put back: it is left under this private name (never removed).
    Displaced(String),
}

/// Removes `name` only if it still is the inode of `file`: renames it to a private
/// name first (atomic), compares, and unlinks the private name, or links a stranger
/// back under `name` (`link` fails rather than replace).
fn remove_if_same(dir: &Dir, name: &str, file: &File) -> std::io::Result<Removal> {
    let md = file.metadata()?;
    // a fixed-length name (a long lock name must not make it too long): hidden, and
    // no `vmbackup-*.lock` for anyone globbing the directory
    let aside = format!(".vmrestore-stale-{}-{:016x}", std::process::id(), nonce());
    match renameat(dir, name, dir, aside.as_str()) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(Removal::Gone),
        Err(e) => return Err(e.into()),
    }
    let moved = fstatat(dir, aside.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if (moved.st_dev, moved.st_ino) == (md.dev(), md.ino()) {
        unlinkat(dir, aside.as_str(), UnlinkatFlags::NoRemoveDir)?;
        return Ok(Removal::Removed);
    }
    match linkat(dir, aside.as_str(), dir, name, AtFlags::empty()) {
        Ok(()) => {
            unlinkat(dir, aside.as_str(), UnlinkatFlags::NoRemoveDir)?;
            Ok(Removal::PutBack)
        }
        Err(_) => Ok(Removal::Displaced(aside)),
    }
}

/// Creates the lock file (`O_CREAT|O_EXCL`), writes our PID, then takes its `flock`.
/// The PID comes first so that a reader can judge the file at once; a reader holds
/// the `flock` only for a moment, which is waited out.
fn create(dir: &Dir, name: &str, pid: u32) -> std::io::Result<Handle> {
    // read-write: the release reads the PID back through this descriptor
    let flags = OFlag::O_RDWR
        | OFlag::O_CREAT
        | OFlag::O_EXCL
        | OFlag::O_NOFOLLOW
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let mut file = File::from(openat(dir, name, flags, Mode::from_bits_truncate(0o644))?);
    if let Err(e) = file.write_all(format!("{pid}\n").as_bytes()) {
        // our own new file (just created, still open): best effort, the write error is the news
        let _ = remove_if_same(dir, name, &file);
        return Err(e);
    }
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        match Handle::lock(file) {
            Ok(h) => return Ok(h),
            Err((f, true)) if Instant::now() < until => {
                file = f;
                sleep(POLL);
            }
            // no flock here, or never let go: the PID protects it as it does vmbackup's
            Err((f, _)) => return Ok(Handle::plain(f)),
        }
    }
}

/// The live holder of `vm`'s lock, if any (for the dry-run warning). Creates nothing.
pub fn holder(state_root: &Path, vm: &str) -> Option<u32> {
    let name = lock_name(vm).ok()?;
    let dir = open_locks(state_root, false).ok()?;
    match inspect(&dir, &name, &mut None).ok()? {
        Found::Live(pid) | Found::Busy(Some(pid)) => Some(pid),
        Found::Gone | Found::Busy(None) => None,
        Found::Stale { handle, .. } => {
            handle.release();
            None
        }
    }
}

/// Takes the lock (spec §6): a live holder is a conflict; a dead, foreign or empty
/// one is stale and replaced; the file is created with `O_EXCL` and `flock`ed.
pub fn acquire(state_root: &Path, vm: &str) -> Result<Acquired, LockError> {
    let name = lock_name(vm)?;
    let path = locks_dir(state_root).join(&name);
    let unavailable = |reason: String| {
        Ok(Acquired::Unavailable {
            path: path.clone(),
            reason,
        })
    };
    let held = |pid: Option<u32>| {
        Err(LockError::Held(LockHeld {
            vm: vm.to_owned(),
            pid: pid.unwrap_or(0),
            path: path.clone(),
        }))
    };
    let dir = match open_locks(state_root, true) {
        Ok(d) => d,
        Err(r) => return unavailable(r.to_string()),
    };
    let pid = std::process::id();
    let started = Instant::now();
    let mut empty_since = None;
    let mut stale = None;
    let mut last_pid = None;
    while started.elapsed() < TAKEOVER_WAIT {
        match create(&dir, &name, pid) {
            // judged stale and removed by someone whose PID check does not know us
            // (a renamed binary): the name is not ours, look again
            Ok(handle) if !still_names(&dir, &name, handle.file()) => handle.release(),
            Ok(handle) => {
                return Ok(Acquired::Held {
                    lock: VmLock {
                        path,
                        dir,
                        name,
                        handle: Some(handle),
                        pid,
                    },
                    stale,
                })
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return unavailable(e.to_string()),
        }
        match inspect(&dir, &name, &mut empty_since) {
            Err(r) => return unavailable(r.to_string()),
            Ok(Found::Gone) => {}
            Ok(Found::Live(p)) => return held(Some(p)),
            Ok(Found::Busy(p)) => {
                last_pid = p.or(last_pid);
                sleep(POLL);
            }
            Ok(Found::Stale { handle, text }) => {
                hook("stale", true);
                let removal = remove_if_same(&dir, &name, handle.file());
                // the flock is let go only once the name is dealt with
                handle.release();
                match removal {
                    Ok(Removal::Removed) => stale = Some(text),
                    Ok(_) => {}
                    Err(e) => return unavailable(e.to_string()),
                }
            }
        }
    }
    held(last_pid)
}

impl VmLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        // Only our own file with our PID: a lock someone put in its place stays.
        if read_text(handle.file()) == self.pid.to_string() {
            // release is best effort: a lock left behind is judged stale by the next run
            let _ = remove_if_same(&self.dir, &self.name, handle.file());
        }
        handle.release();
    }
}

/// Test hook, debug builds only: with `VMRESTORE_TEST_LOCK_HOOK=<dir>` the lock code
/// creates `<dir>/<point>-<pid>` where a race matters (`busy`: a `flock` held by
/// someone else without a live PID; `stale`: a file judged stale, its `flock` held,
/// not yet removed) and, when `wait`, stops until the test deletes it (at most 60 s).
/// Release builds ignore the variable.
#[cfg(debug_assertions)]
fn hook(point: &str, wait: bool) {
    let Some(dir) = std::env::var_os("VMRESTORE_TEST_LOCK_HOOK") else {
        return;
    };
    let mark = Path::new(&dir).join(format!("{point}-{}", std::process::id()));
    if std::fs::write(&mark, b"").is_err() || !wait {
        return;
    }
    let until = Instant::now() + Duration::from_secs(60);
    while mark.exists() && Instant::now() < until {
        sleep(Duration::from_millis(10));
    }
}

#[cfg(not(debug_assertions))]
fn hook(_point: &str, _wait: bool) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn ok(r: Result<Acquired, LockError>) -> (VmLock, Option<String>) {
        match r {
            Ok(Acquired::Held { lock, stale }) => (lock, stale),
            other => panic!("not held: {other:?}"),
        }
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|r| {
                r.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn path(root: &Path, vm: &str) -> PathBuf {
        lock_path(root, vm).expect("valid name")
    }

    #[test]
    fn acquire_release_stale_and_conflict() {
        let root = tempfile::tempdir().expect("tmp");
        let p = path(root.path(), "vm1");
        {
            let (lock, stale) = ok(acquire(root.path(), "vm1"));
            assert_eq!(stale, None);
            assert_eq!(
                fs::read_to_string(lock.path()).expect("read"),
                format!("{}\n", std::process::id())
            );
            // a second acquire in this process finds its flock held and our PID: held
            let Err(LockError::Held(h)) = acquire(root.path(), "vm1") else {
                panic!("second acquire must conflict")
            };
            assert_eq!(h.pid, std::process::id());
            assert_eq!(h.path, p);
        }
        assert!(!p.exists(), "released on drop");
        assert!(names(&locks_dir(root.path())).is_empty(), "nothing left");
        // a dead PID is stale
        fs::write(&p, "999999999\n").expect("write");
        let (_lock, stale) = ok(acquire(root.path(), "vm1"));
        assert_eq!(stale.as_deref(), Some("999999999"));
    }

    #[test]
    fn a_lock_with_our_own_pid_is_stale() {
        // this test binary's command line contains "vmrestore": without the PID check
        // it would count as a live holder
        let root = tempfile::tempdir().expect("tmp");
        let p = path(root.path(), "vm1");
        fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        fs::write(&p, format!("{}\n", std::process::id())).expect("write");
        let (lock, stale) = ok(acquire(root.path(), "vm1"));
        assert_eq!(stale, Some(std::process::id().to_string()));
        assert_eq!(
            fs::read_to_string(lock.path()).expect("read"),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn read_only_tree_is_unavailable_not_fatal() {
        let root = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(root.path().join("_state")).expect("mkdir");
        // a file where the locks directory should be makes it uncreatable, even as root
        fs::write(root.path().join("_state/locks"), "x").expect("write");
        assert!(matches!(
            acquire(root.path(), "vm1"),
            Ok(Acquired::Unavailable { .. })
        ));
    }

    // issue 18 (1): a name that is not one safe component never becomes a path
    #[test]
    fn issue18_lock_names_are_one_component() {
        let root = tempfile::tempdir().expect("tmp");
        let long = "x".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "../../etc/x",
            "a/b",
            "/abs",
            "a\0b",
            long.as_str(),
        ] {
            assert!(lock_path(root.path(), bad).is_err(), "{bad:?}");
            assert!(
                matches!(acquire(root.path(), bad), Err(LockError::BadName(_))),
                "{bad:?}"
            );
            assert_eq!(holder(root.path(), bad), None);
        }
        assert!(!root.path().join("_state").exists(), "nothing created");
        let e = lock_path(root.path(), "../x").expect_err("bad");
        assert_eq!(
            e.to_string(),
            r#"VM name "../x" cannot name a lock file: it contains '/'"#
        );
        // the longest name whose lock file the filesystem takes: held and released
        let longest = "x".repeat(241);
        {
            let (lock, _) = ok(acquire(root.path(), &longest));
            assert!(lock.path().exists());
            fs::write(lock.path(), "999999999\n").expect("a stale one");
        }
        let (lock, stale) = ok(acquire(root.path(), &longest));
        assert_eq!(stale.as_deref(), Some("999999999"));
        drop(lock);
        assert!(names(&locks_dir(root.path())).is_empty(), "released");
        fs::remove_dir_all(root.path().join("_state")).expect("rm");
        for good in ["vm", "..vm", "vm..", "my vm", longest.as_str()] {
            assert_eq!(
                path(root.path(), good),
                root.path()
                    .join("_state/locks")
                    .join(format!("vmbackup-{good}.lock"))
            );
        }
    }

    // issue 18 (4): a file put at the name while a stale one is being removed (vmbackup
    // takes no flock) is put back, never removed
    #[test]
    fn issue18_remove_if_same_puts_a_stranger_back() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = open_locks(root.path(), true).expect("dir");
        let p = dir.join("vmbackup-vm.lock");
        fs::write(&p, "999999999\n").expect("write");
        let judged = File::open(&p).expect("open");
        fs::remove_file(&p).expect("rm");
        fs::write(&p, "4242\n").expect("stranger");
        let ino = fs::metadata(&p).expect("md").ino();
        assert_eq!(
            remove_if_same(&dir, "vmbackup-vm.lock", &judged).expect("ok"),
            Removal::PutBack
        );
        assert_eq!(fs::read_to_string(&p).expect("read"), "4242\n");
        assert_eq!(fs::metadata(&p).expect("md").ino(), ino, "the same file");
        assert_eq!(names(dir.path()), ["vmbackup-vm.lock"]);
        let same = File::open(&p).expect("open");
        assert_eq!(
            remove_if_same(&dir, "vmbackup-vm.lock", &same).expect("ok"),
            Removal::Removed
        );
        assert_eq!(
            remove_if_same(&dir, "vmbackup-vm.lock", &same).expect("ok"),
            Removal::Gone
        );
        assert!(names(dir.path()).is_empty());
    }

    // issue 18 (4): vmbackup creates its file, then writes its PID: an empty file is
    // waited for, and a PID that appears meanwhile is honoured
    #[test]
    fn issue18_an_empty_fresh_lock_is_waited_for() {
        let root = tempfile::tempdir().expect("tmp");
        let p = path(root.path(), "vm1");
        fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        let mut holder_proc = std::process::Command::new("bash")
            .args(["-c", "exec -a vmbackup-test sleep 30"])
            .spawn()
            .expect("spawn");
        let hp = holder_proc.id();
        for _ in 0..200 {
            if fs::read(format!("/proc/{hp}/cmdline"))
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("vmbackup"))
            {
                break;
            }
            sleep(Duration::from_millis(10));
        }
        fs::write(&p, "").expect("empty");
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                sleep(Duration::from_millis(300));
                // vmbackup's `echo $$ >` on the file it created
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|mut f| f.write_all(format!("{hp}\n").as_bytes()))
                    .expect("write pid");
            })
        };
        let r = acquire(root.path(), "vm1");
        writer.join().expect("writer");
        let _ = holder_proc.kill();
        let _ = holder_proc.wait();
        let Err(LockError::Held(h)) = r else {
            panic!("a fresh empty lock was taken over: {r:?}")
        };
        assert_eq!(h.pid, hp);
        assert_eq!(fs::read_to_string(&p).expect("read"), format!("{hp}\n"));
        // an old empty file is stale at once
        fs::write(&p, "").expect("empty");
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_modified(old))
            .expect("mtime");
        let t = Instant::now();
        let (_lock, stale) = ok(acquire(root.path(), "vm1"));
        assert_eq!(stale.as_deref(), Some(""));
        assert!(t.elapsed() < EMPTY_GRACE);
    }

    // issue 18 (6): a symlinked `_state/locks` (or a symlink at the lock name) is
    // refused: nothing is created through it
    #[test]
    fn issue18_symlinks_are_not_followed() {
        let root = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(root.path().join("_state")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("_state/locks"))
            .expect("symlink");
        let Ok(Acquired::Unavailable { reason, .. }) = acquire(root.path(), "vm1") else {
            panic!("must be unavailable")
        };
        assert!(reason.contains("symbolic link"), "{reason}");
        assert_eq!(holder(root.path(), "vm1"), None);
        assert!(names(outside.path()).is_empty());

        let r2 = tempfile::tempdir().expect("tmp");
        let locks = r2.path().join("_state/locks");
        fs::create_dir_all(&locks).expect("mkdir");
        let target = outside.path().join("target");
        fs::write(&target, "keep\n").expect("write");
        std::os::unix::fs::symlink(&target, locks.join("vmbackup-vm1.lock")).expect("symlink");
        assert!(matches!(
            acquire(r2.path(), "vm1"),
            Ok(Acquired::Unavailable { .. })
        ));
        assert_eq!(fs::read_to_string(&target).expect("read"), "keep\n");
        assert!(locks.join("vmbackup-vm1.lock").is_symlink());
    }
}
