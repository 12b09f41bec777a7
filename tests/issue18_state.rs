//! Issue 18 regressions through the built binary: the per-VM lock under racing
//! processes (item 4), the run log in a shared directory (item 5) and symlinked
//! `_state` pieces (item 6). Each test builds its own backup root from the real-chain
//! fixture (`rc-acc-files` and the catalogue) in a temporary directory.
//!
//! The race tests stop a process inside the window that matters through the lock
//! code's test hook (`VMRESTORE_TEST_LOCK_HOOK`, debug builds only): at `stale` (a file
//! judged stale, not yet removed) the process waits until the test deletes its mark.

mod clisupport;

use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clisupport::{tree_hash, Fixture, Run, Scratch};

const VM: &str = "rc-acc-files";

/// A backup root with the catalogue and one VM, plus a scratch dir.
struct World {
    scratch: Scratch,
    root: PathBuf,
}

fn copy_keep_times(src: &Path, dst: &Path) {
    let md = fs::symlink_metadata(src).expect("metadata");
    if md.is_dir() {
        fs::create_dir_all(dst).expect("mkdir");
        for e in fs::read_dir(src).expect("read_dir") {
            let e = e.expect("entry");
            copy_keep_times(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        fs::copy(src, dst).expect("copy");
    }
    let t = md.modified().expect("mtime");
    File::open(dst)
        .and_then(|f| f.set_times(FileTimes::new().set_modified(t).set_accessed(t)))
        .expect("set_times");
}

impl World {
    /// The VM is copied as `vm_dir` (its libvirt name stays `rc-acc-files`).
    fn new(vm_dir: &str) -> Self {
        let fx = Fixture::shared();
        let scratch = Scratch::new();
        let root = scratch.dir.path().join("backups");
        fs::create_dir_all(root.join("_state")).expect("mkdir");
        fs::copy(
            fx.root.join("_state/vmbackup.db"),
            root.join("_state/vmbackup.db"),
        )
        .expect("copy db");
        copy_keep_times(&fx.root.join(VM), &root.join(vm_dir));
        for d in ["out", "swtpm", "tmp", "hook"] {
            fs::create_dir_all(scratch.dir.path().join(d)).expect("mkdir");
        }
        World { scratch, root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.scratch.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.p(rel).display().to_string()
    }

    fn lock(&self) -> PathBuf {
        self.root.join(format!("_state/locks/vmbackup-{VM}.lock"))
    }

    /// A data-only restore of `vm_dir` into `out/<out>`, not yet started.
    fn command(&self, vm_dir: &str, uri: &str, out: &str, env: &[(&str, String)]) -> Command {
        let root = self.root.display().to_string();
        let out = self.s(&format!("out/{out}"));
        let mut c = self.scratch.command(&[
            "--backup-path",
            &root,
            "--connect",
            uri,
            "--vm",
            vm_dir,
            "--restore-path",
            &out,
            "--skip-config",
        ]);
        c.env("VMRESTORE_SWTPM_ROOT", self.s("swtpm"))
            .env("TMPDIR", self.s("tmp"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, out: &str, env: &[(&str, String)]) -> Run {
        let o = self
            .command(VM, "test:///default", out, env)
            .output()
            .expect("run");
        run_of(o)
    }

    /// The race hook's environment.
    fn hook_env(&self) -> Vec<(&'static str, String)> {
        vec![("VMRESTORE_TEST_LOCK_HOOK", self.s("hook"))]
    }

    /// The hook's mark for `point` of process `pid`.
    fn mark(&self, point: &str, pid: u32) -> PathBuf {
        self.p(&format!("hook/{point}-{pid}"))
    }

    /// `(outcome, exit_code, log_file)` of every `restore_sessions` row.
    fn rows(&self) -> Vec<(String, i64, Option<String>)> {
        let c = rusqlite::Connection::open_with_flags(
            self.root.join("_state/vmbackup.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("db");
        let Ok(mut st) =
            c.prepare("SELECT outcome, exit_code, log_file FROM restore_sessions ORDER BY id")
        else {
            return Vec::new();
        };
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<rusqlite::Result<Vec<_>>>()
            .expect("rows")
    }
}

fn run_of(o: Output) -> Run {
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Waits (at most 60 s) until `done` holds; `child` exiting first is a failure.
fn wait_until(what: &str, child: &mut Child, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done() {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("process exited ({st}) before {what}");
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// WARN lines containing `s`.
fn warns(r: &Run, s: &str) -> usize {
    r.stderr
        .lines()
        .filter(|l| l.contains("] WARN: ") && l.contains(s))
        .count()
}

/// The race tests need the lock code's test hook, compiled into debug builds only.
fn hook_available() -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the lock test hook exists in debug builds only");
    }
    cfg!(debug_assertions)
}

/// A PID that is certainly dead.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn");
    let pid = c.id();
    c.wait().expect("wait");
    pid
}

fn write_lock(w: &World, content: &str) {
    fs::create_dir_all(w.lock().parent().expect("dir")).expect("mkdir");
    fs::write(w.lock(), content).expect("lock");
}

/// A live process whose command line contains "vmbackup" (killed on drop).
struct FakeBackup(Child);

impl FakeBackup {
    fn start() -> Self {
        let c = FakeBackup(
            Command::new("bash")
                .args(["-c", "exec -a vmbackup-test sleep 60"])
                .spawn()
                .expect("spawn"),
        );
        for _ in 0..500 {
            if fs::read(format!("/proc/{}/cmdline", c.0.id()))
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("vmbackup"))
            {
                return c;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the fake vmbackup never showed its name");
    }
}

impl Drop for FakeBackup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lets a process blocked reading the node-XML FIFO go on.
fn feed_fifo(fifo: &Path, child: &mut Child) {
    loop {
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(mut f) => {
                f.write_all(b"<node>\n</node>\n").expect("feed the fifo");
                return;
            }
            Err(_) if child.try_wait().expect("try_wait").is_none() => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return,
        }
    }
}

// Item 4: two restores start on the same stale lock. Before: both read the stale PID,
// the second removed the lock the first had just written, and both ran (exit 0).
// Now the first judges the stale file under its flock; the second, finding that flock
// held, waits; once the stale file is replaced, exactly one of them holds the lock
// and the other exits 3 naming it. A live lock is never removed. (Both block reading
// their node-XML FIFO after taking the lock, so the winner is still running when the
// loser looks.)
#[test]
fn issue18_4_two_restores_racing_on_a_stale_lock_one_wins() {
    if !hook_available() {
        return;
    }
    let w = World::new(VM);
    write_lock(&w, &format!("{}\n", dead_pid()));
    let fifo = |n: &str| {
        let f = w.p(&format!("node-{n}.xml"));
        nix::unistd::mkfifo(&f, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        (format!("test://{}", f.display()), f)
    };
    let ((uri_a, fifo_a), (uri_b, fifo_b)) = (fifo("a"), fifo("b"));

    // A stops with the stale file judged, its flock held
    let mut a = w
        .command(VM, &uri_a, "a", &w.hook_env())
        .spawn()
        .expect("spawn a");
    let a_pid = a.id();
    let a_stale = w.mark("stale", a_pid);
    wait_until("A judged the lock stale", &mut a, || a_stale.exists());

    // B meets the same file meanwhile
    let mut b = w
        .command(VM, &uri_b, "b", &w.hook_env())
        .spawn()
        .expect("spawn b");
    let b_pid = b.id();
    let (b_busy, b_stale) = (w.mark("busy", b_pid), w.mark("stale", b_pid));
    wait_until("B met the lock", &mut b, || {
        b_busy.exists() || b_stale.exists()
    });
    let b_judged_it_too = b_stale.exists();

    // A goes on and replaces the stale file
    fs::remove_file(&a_stale).expect("release A");
    if b_judged_it_too {
        // the old race: B goes on with what it judged before A replaced it
        wait_until("A holds the lock", &mut a, || {
            fs::read_to_string(w.lock()).is_ok_and(|t| t == format!("{a_pid}\n"))
        });
        fs::remove_file(&b_stale).expect("release B");
    }
    // the loser exits; the winner waits on its FIFO, holding the lock
    let until = Instant::now() + Duration::from_secs(30);
    let loser = loop {
        if a.try_wait().expect("try_wait").is_some() {
            break Some(a_pid);
        }
        if b.try_wait().expect("try_wait").is_some() {
            break Some(b_pid);
        }
        if Instant::now() > until {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let lock_during = fs::read_to_string(w.lock()).ok();
    feed_fifo(&fifo_a, &mut a);
    feed_fifo(&fifo_b, &mut b);
    let a = run_of(a.wait_with_output().expect("wait a"));
    let b = run_of(b.wait_with_output().expect("wait b"));

    assert!(!b_judged_it_too, "B judged the file A was replacing");
    let loser = loser.unwrap_or_else(|| {
        panic!(
            "both restores ran at once\nA:\n{}\nB:\n{}",
            a.stderr, b.stderr
        )
    });
    let (winner, lost, won) = if loser == a_pid {
        (b_pid, &a, &b)
    } else {
        (a_pid, &b, &a)
    };
    assert_eq!(lost.code, Some(3), "the loser:\n{}", lost.stderr);
    assert!(
        lost.stderr.contains(&format!(
            "VM '{VM}' is locked by another backup or restore (PID {winner}): {}",
            w.lock().display()
        )),
        "{}",
        lost.stderr
    );
    assert_eq!(
        lock_during,
        Some(format!("{winner}\n")),
        "the winner's live lock was removed"
    );
    assert_eq!(won.code, Some(0), "the winner:\n{}", won.stderr);
    assert_eq!(
        warns(&a, "Stale lock detected for VM: rc-acc-files")
            + warns(&b, "Stale lock detected for VM: rc-acc-files"),
        1,
        "the stale file was replaced once"
    );
    assert!(!w.lock().exists(), "the winner released its lock");
    assert_eq!(
        fs::read_dir(w.lock().parent().expect("dir"))
            .expect("ls")
            .count(),
        0,
        "nothing left in _state/locks"
    );
    let mut outcomes: Vec<(String, i64)> = w.rows().into_iter().map(|(o, c, _)| (o, c)).collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [("failed".to_owned(), 3), ("success".to_owned(), 0)]
    );
}

// Item 4: vmbackup (which takes no flock) replaces the stale file while a restore is
// between judging it and removing it. Before: the restore removed vmbackup's fresh
// lock and ran beside the backup. Now the file found at the name is not the inode
// judged: it is put back untouched, and the restore exits 3.
#[test]
fn issue18_4_a_vmbackup_lock_made_in_the_window_is_never_removed() {
    if !hook_available() {
        return;
    }
    let w = World::new(VM);
    write_lock(&w, &format!("{}\n", dead_pid()));
    let vmbackup = FakeBackup::start();
    let vb_pid = vmbackup.0.id();

    let mut a = w
        .command(VM, "test:///default", "a", &w.hook_env())
        .spawn()
        .expect("spawn");
    let a_stale = w.mark("stale", a.id());
    wait_until("the restore judged the lock stale", &mut a, || {
        a_stale.exists()
    });
    // vmbackup's create_lock: `rm -f`, then a noclobber `echo $$ >`
    fs::remove_file(w.lock()).expect("rm -f");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(w.lock())
        .and_then(|mut f| f.write_all(format!("{vb_pid}\n").as_bytes()))
        .expect("vmbackup's lock");
    let ino = fs::metadata(w.lock()).expect("md").ino();
    fs::remove_file(&a_stale).expect("release");
    let r = run_of(a.wait_with_output().expect("wait"));

    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "is locked by another backup or restore (PID {vb_pid})"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(
        fs::read_to_string(w.lock()).expect("vmbackup's lock is gone"),
        format!("{vb_pid}\n")
    );
    assert_eq!(
        fs::metadata(w.lock()).expect("md").ino(),
        ino,
        "the same file"
    );
    let names: Vec<_> = fs::read_dir(w.lock().parent().expect("dir"))
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names, [format!("vmbackup-{VM}.lock").as_str()]);
    assert!(!w.p("out/a").exists());
}

// Item 4: a lock vmbackup has created but not yet written (its PID follows the
// create) is not stale. Before: an empty file was removed at once.
#[test]
fn issue18_4_an_empty_lock_being_written_is_waited_for() {
    let w = World::new(VM);
    let vmbackup = FakeBackup::start();
    let vb_pid = vmbackup.0.id();
    write_lock(&w, "");
    let lock = w.lock();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        fs::OpenOptions::new()
            .write(true)
            .open(&lock)
            .and_then(|mut f| f.write_all(format!("{vb_pid}\n").as_bytes()))
            .expect("write pid");
    });
    let r = w.run("a", &[]);
    writer.join().expect("writer");
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert_eq!(
        fs::read_to_string(w.lock()).expect("lock"),
        format!("{vb_pid}\n")
    );
}

// Item 5: with the log directory uncreatable the log falls back to /tmp, where anyone
// can plant `/tmp/<label>-<timestamp>.log`. Before: a symlink there was followed and
// root's log appended to its target. Now the name is passed over: a new file is used,
// said in a WARN, in the final line and in the catalogue row.
#[test]
fn issue18_5_a_planted_tmp_log_symlink_is_not_followed() {
    let label = format!("issue18-{}-{:x}", std::process::id(), rand_u32());
    let w = World::new(&label);
    let target = w.p("root-owned-file");
    fs::write(&target, "root's file\n").expect("write");
    fs::write(w.p("not-a-dir"), "").expect("write");
    // plant the exact name for every second the run may start in (the binary runs with TZ=UTC)
    let now = chrono::Utc::now();
    let planted: Vec<PathBuf> = (-2..60)
        .map(|s| {
            let t = now + chrono::Duration::seconds(s);
            let p = PathBuf::from(format!("/tmp/{label}-{}.log", t.format("%Y%m%d-%H%M%S")));
            symlink(&target, &p).expect("plant");
            p
        })
        .collect();
    let o = w
        .command(&label, "test:///default", "a", &[])
        .env("LOG_DIR", w.p("not-a-dir/logs"))
        .output()
        .expect("run");
    let r = run_of(o);
    let used = r
        .stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once(" — log: ").map(|(_, p)| PathBuf::from(p)));
    let ours: Vec<PathBuf> = fs::read_dir("/tmp")
        .expect("ls /tmp")
        .map(|e| e.expect("e").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&label))
                && !planted.contains(p)
        })
        .collect();
    let header = used.as_ref().and_then(|p| fs::read_to_string(p).ok());
    for p in planted.iter().chain(&ours) {
        let _ = fs::remove_file(p);
    }

    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        fs::read_to_string(&target).expect("target"),
        "root's file\n",
        "the log was written through the planted symlink"
    );
    let used = used.expect("the final line names the log");
    assert_eq!(
        ours,
        std::slice::from_ref(&used),
        "exactly one new log file in /tmp"
    );
    assert!(used.starts_with("/tmp"), "{}", used.display());
    assert_eq!(
        warns(&r, "is a symbolic link (not followed): logging to "),
        1,
        "{}",
        r.stderr
    );
    assert!(r
        .stderr
        .contains(&format!(": logging to {}", used.display())));
    assert!(header
        .expect("log content")
        .contains(&format!("Log File:     {}", used.display())));
    let rows = w.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2.as_deref(), Some(used.to_str().expect("utf-8")));
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

/// What lies under `dir`: a hash of names, types, modes, sizes, mtimes and contents.
fn outside_hash(dir: &Path) -> String {
    tree_hash(dir)
}

// Item 6: `_state`, `_state/locks` or `_state/vmbackup.db` is a symlink out of the
// tree. Before: the lock was created and the restore_sessions row written through it.
// Now the piece is refused with one WARN and the restore succeeds; nothing outside
// changes.
#[test]
fn issue18_6_symlinked_state_pieces_are_refused() {
    for piece in ["_state", "_state/locks", "_state/vmbackup.db"] {
        let w = World::new(VM);
        let outside = w.p("outside");
        fs::create_dir_all(&outside).expect("mkdir");
        match piece {
            "_state" => {
                fs::rename(w.root.join("_state"), outside.join("state")).expect("move");
                symlink(outside.join("state"), w.root.join("_state")).expect("symlink");
            }
            "_state/locks" => {
                fs::create_dir(outside.join("locks")).expect("mkdir");
                symlink(outside.join("locks"), w.root.join("_state/locks")).expect("symlink");
            }
            _ => {
                fs::rename(
                    w.root.join("_state/vmbackup.db"),
                    outside.join("vmbackup.db"),
                )
                .expect("move");
                symlink(
                    outside.join("vmbackup.db"),
                    w.root.join("_state/vmbackup.db"),
                )
                .expect("symlink");
            }
        }
        let before = outside_hash(&outside);
        let r = w.run("r", &[]);
        assert_eq!(r.code, Some(0), "{piece}: {}", r.stderr);
        assert!(w.p("out/r").is_dir(), "{piece}: restored");
        assert_eq!(
            outside_hash(&outside),
            before,
            "{piece}: something outside the tree changed"
        );
        let lock_warns = warns(&r, "Cannot create lock");
        let db_warns = warns(&r, "Catalogue unavailable");
        let (lock_expected, db_expected) = match piece {
            "_state" => (1, 1),
            "_state/locks" => (1, 0),
            _ => (0, 1),
        };
        assert_eq!(lock_warns, lock_expected, "{piece}: {}", r.stderr);
        assert_eq!(db_warns, db_expected, "{piece}: {}", r.stderr);
        assert_eq!(
            warns(&r, "symbolic link"),
            lock_expected + db_expected,
            "{piece}: the WARN says why\n{}",
            r.stderr
        );
        if piece == "_state/locks" {
            assert_eq!(w.rows().len(), 1, "the catalogue inside is still written");
        }
        if piece == "_state/vmbackup.db" {
            assert!(!w.lock().exists(), "the lock inside was taken and released");
            assert!(w.root.join("_state/locks").is_dir());
        }
    }
}
