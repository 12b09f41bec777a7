use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// A directory with `d.raw` = "original" and a staged `.part` with "new".
fn setup() -> (tempfile::TempDir, PathBuf, StagedPath) {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join("d.raw");
    std::fs::write(&f, b"original").expect("write");
    let s = StagedPath::new(&f);
    std::fs::write(s.temp_path(), b"new").expect("write");
    (d, f, s)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read")
}

fn ino(p: &Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(p).expect("stat");
    (m.dev(), m.ino())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn stale_names() {
    assert_eq!(
        stale_pid(".d.qcow2.vmrestore-42.part", "d.qcow2", "part"),
        Some(42)
    );
    assert_eq!(
        stale_pid(".d.qcow2.vmrestore-42.swap", "d.qcow2", "swap"),
        Some(42)
    );
    assert_eq!(
        stale_pid(".d.qcow2.vmrestore-42.swap", "d.qcow2", "part"),
        None
    );
    // the binary's legacy in-place swap names are not the engine's
    assert_eq!(
        stale_pid(
            "..d.qcow2.vmrestore-42.new.vmrestore-42.part",
            "d.qcow2",
            "part"
        ),
        None
    );
    assert_eq!(
        stale_pid(".d.qcow2.vmrestore-42.new", "d.qcow2", "part"),
        None
    );
    assert_eq!(
        stale_pid(".d.qcow2.vmrestore-42.part.x", "d.qcow2", "part"),
        None
    );
    assert_eq!(
        stale_pid(".d.qcow2.vmrestore-.part", "d.qcow2", "part"),
        None
    );
    assert_eq!(
        stale_pid(".e.qcow2.vmrestore-42.part", "d.qcow2", "part"),
        None
    );
    assert_eq!(stale_pid("d.qcow2", "d.qcow2", "part"), None);
}

#[test]
fn remove_stale_spares_live_foreign_and_legacy_files() {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join("d.qcow2");
    // PID 0x7ffffffe does not exist; our own PID does
    let dead = d.path().join(".d.qcow2.vmrestore-2147483646.part");
    let mine = d
        .path()
        .join(format!(".d.qcow2.vmrestore-{}.part", std::process::id()));
    let other = d.path().join(".x.qcow2.vmrestore-2147483646.part");
    let legacy = d
        .path()
        .join("..d.qcow2.vmrestore-2147483646.new.vmrestore-2147483646.part");
    let swap = d.path().join(".d.qcow2.vmrestore-2147483646.swap");
    let link = d.path().join(".d.qcow2.vmrestore-2147483645.part");
    for p in [&dead, &mine, &other, &legacy, &swap] {
        std::fs::write(p, b"x").expect("write");
    }
    std::os::unix::fs::symlink(&other, &link).expect("symlink");
    assert_eq!(StagedPath::remove_stale(&f), vec![dead.clone()]);
    assert!(!dead.exists());
    for p in [&mine, &other, &legacy, &swap, &link] {
        assert!(std::fs::symlink_metadata(p).is_ok(), "{}", p.display());
    }
    // the swap file is reported, never removed
    assert_eq!(StagedPath::interrupted_exchanges(&f), vec![swap.clone()]);
    assert!(swap.exists());
}

#[test]
fn replace_without_keeping_renames_over_or_creates() {
    let (d, f, s) = setup();
    assert_eq!(s.commit_replacing(None).expect("commit"), f);
    assert_eq!(read(&f), b"new");
    assert_eq!(names(d.path()), ["d.raw"]);
    // no final file yet: created
    let g = d.path().join("e.raw");
    let s = StagedPath::new(&g);
    std::fs::write(s.temp_path(), b"e").expect("write");
    s.commit_replacing(None).expect("commit");
    assert_eq!(read(&g), b"e");
}

#[test]
fn keeping_links_the_original_then_renames() {
    let (d, f, s) = setup();
    let keep = d.path().join("d.raw.pre-restore");
    let original = ino(&f);
    let new = ino(s.temp_path());
    let mut steps = Vec::new();
    let done = s
        .commit_replacing_with(Some(&keep), Keep::Auto, &mut |st| {
            // a kill right here: the final name holds the original, so does `keep`
            assert_eq!(read(&f), b"original");
            assert_eq!(ino(&keep), original);
            steps.push(st);
            true
        })
        .expect("commit");
    assert_eq!(done, f);
    assert_eq!(steps, [Step::Linked]);
    assert_eq!((read(&f), ino(&f)), (b"new".to_vec(), new));
    assert_eq!((read(&keep), ino(&keep)), (b"original".to_vec(), original));
    assert_eq!(names(d.path()), ["d.raw", "d.raw.pre-restore"]);
}

#[test]
fn existing_rollback_is_refused_and_nothing_changes() {
    for how in [Keep::Auto, Keep::Exchange] {
        let (d, f, s) = setup();
        let keep = d.path().join("d.raw.pre-restore");
        std::fs::write(&keep, b"older rollback").expect("write");
        let (fi, ki) = (ino(&f), ino(&keep));
        let e = s
            .commit_replacing_with(Some(&keep), how, &mut |st| panic!("reached {st:?}"))
            .expect_err("must refuse");
        let msg = e.to_string();
        assert!(
            msg.contains("d.raw.pre-restore") && msg.contains("already exists"),
            "{msg}"
        );
        assert_eq!(e.kind(), crate::ErrorKind::TargetIo);
        assert_eq!((read(&f), ino(&f)), (b"original".to_vec(), fi));
        assert_eq!((read(&keep), ino(&keep)), (b"older rollback".to_vec(), ki));
        // the uncommitted new content is gone, as after any failed commit
        assert_eq!(names(d.path()), ["d.raw", "d.raw.pre-restore"]);
    }
}

#[test]
fn keeping_needs_an_existing_final_file() {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join("d.raw");
    let s = StagedPath::new(&f);
    std::fs::write(s.temp_path(), b"new").expect("write");
    let e = s
        .commit_replacing(Some(&d.path().join("k")))
        .expect_err("no original");
    assert!(e.to_string().contains("d.raw"), "{e}");
    assert!(names(d.path()).is_empty());
    // nor a directory (the exchange fallback would move it)
    std::fs::create_dir(&f).expect("mkdir");
    for how in [Keep::Auto, Keep::Exchange] {
        let s = StagedPath::new(&f);
        std::fs::write(s.temp_path(), b"new").expect("write");
        let e = s
            .commit_replacing_with(Some(&d.path().join("k")), how, &mut |_| true)
            .expect_err("directory");
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{e}");
    }
    assert_eq!(names(d.path()), ["d.raw"]);
    assert!(f.is_dir());
}

/// A kill between link and rename: final = original, rollback = the same inode. The
/// rerun drops that second name ([`StagedPath::discard_unfinished_rollback`]), the
/// dead run's `.part` goes with `remove_stale`, and the restore is simply redone.
#[test]
fn kill_between_link_and_rename_leaves_the_original_twice() {
    let (d, f, s) = setup();
    let keep = d.path().join("d.raw.pre-restore");
    let original = ino(&f);
    let temp = s.temp_path().to_path_buf();
    let e = s
        .commit_replacing_with(Some(&keep), Keep::Auto, &mut |_| false)
        .expect_err("killed");
    assert!(matches!(e, Error::Cancelled(9)));
    assert_eq!((read(&f), ino(&f)), (b"original".to_vec(), original));
    assert_eq!(ino(&keep), original);
    assert_eq!(std::fs::metadata(&f).expect("stat").nlink(), 2);
    assert_eq!(read(&temp), b"new");
    // rerun
    assert!(StagedPath::discard_unfinished_rollback(&f, &keep).expect("discard"));
    assert!(!keep.exists());
    assert_eq!(std::fs::metadata(&f).expect("stat").nlink(), 1);
    assert!(!StagedPath::discard_unfinished_rollback(&f, &keep).expect("again"));
    let s = StagedPath::new(&f);
    std::fs::write(s.temp_path(), b"newer").expect("write");
    s.commit_replacing(Some(&keep)).expect("rerun");
    assert_eq!(
        (read(&f), read(&keep)),
        (b"newer".to_vec(), b"original".to_vec())
    );
    // after a completed commit the rollback is a different file: kept
    assert!(!StagedPath::discard_unfinished_rollback(&f, &keep).expect("done"));
    assert!(keep.exists());
}

#[test]
fn exchange_fallback_keeps_the_original() {
    let (d, f, s) = setup();
    let keep = d.path().join("d.raw.pre-restore");
    let (original, new) = (ino(&f), ino(s.temp_path()));
    let swap = sibling(&f, "swap");
    let mut steps = Vec::new();
    s.commit_replacing_with(Some(&keep), Keep::Exchange, &mut |st| {
        // the final name is there at each step; the swap name holds the other content
        let (fin, sw) = match st {
            Step::Parked => (original, new),
            Step::Exchanged => (new, original),
            Step::Linked => panic!("no link on this path"),
        };
        assert_eq!((ino(&f), ino(&swap)), (fin, sw));
        assert!(!keep.exists());
        steps.push(st);
        true
    })
    .expect("commit");
    assert_eq!(steps, [Step::Parked, Step::Exchanged]);
    assert_eq!((read(&f), ino(&f)), (b"new".to_vec(), new));
    assert_eq!((read(&keep), ino(&keep)), (b"original".to_vec(), original));
    assert_eq!(names(d.path()), ["d.raw", "d.raw.pre-restore"]);
}

#[test]
fn exchange_fallback_killed_leaves_the_swap_file() {
    for (stop, final_content, swap_content) in [
        (Step::Parked, &b"original"[..], &b"new"[..]),
        (Step::Exchanged, &b"new"[..], &b"original"[..]),
    ] {
        let (d, f, s) = setup();
        let keep = d.path().join("d.raw.pre-restore");
        let swap = sibling(&f, "swap");
        s.commit_replacing_with(Some(&keep), Keep::Exchange, &mut |st| st != stop)
            .expect_err("killed");
        assert_eq!(read(&f), final_content);
        assert_eq!(read(&swap), swap_content);
        assert!(!keep.exists());
        // both contents survive under a name that remove_stale never touches
        StagedPath::remove_stale(&f);
        assert_eq!(read(&swap), swap_content);
    }
}

#[test]
fn exchange_fallback_undoes_when_the_rollback_appears_late() {
    let (d, f, s) = setup();
    let keep = d.path().join("d.raw.pre-restore");
    let original = ino(&f);
    let e = s
        .commit_replacing_with(Some(&keep), Keep::Exchange, &mut |st| {
            if st == Step::Exchanged {
                std::fs::write(&keep, b"someone else").expect("write");
            }
            true
        })
        .expect_err("keep taken");
    assert!(e.to_string().contains("d.raw.pre-restore"), "{e}");
    assert_eq!((read(&f), ino(&f)), (b"original".to_vec(), original));
    assert_eq!(read(&keep), b"someone else");
    assert_eq!(names(d.path()), ["d.raw", "d.raw.pre-restore"]);
}

/// A second thread stats the final name in a tight loop while commits with a rollback
/// run, over both paths: it must never find the name missing.
#[test]
fn final_path_never_missing_while_committing() {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path().join("d.raw");
    let keep = d.path().join("d.raw.pre-restore");
    std::fs::write(&f, b"0").expect("write");
    let stop = Arc::new(AtomicBool::new(false));
    let (checks, misses) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let watcher = {
        let (f, stop, checks, misses) = (f.clone(), stop.clone(), checks.clone(), misses.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if std::fs::symlink_metadata(&f).is_err() {
                    misses.fetch_add(1, Ordering::Relaxed);
                }
                checks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for i in 0..400u32 {
        let s = StagedPath::new(&f);
        std::fs::write(s.temp_path(), i.to_string()).expect("write");
        let how = if i % 2 == 0 {
            Keep::Auto
        } else {
            Keep::Exchange
        };
        s.commit_replacing_with(Some(&keep), how, &mut |_| true)
            .expect("commit");
        assert_eq!(
            read(&keep),
            if i == 0 {
                "0".into()
            } else {
                (i - 1).to_string()
            }
            .as_bytes()
        );
        std::fs::remove_file(&keep).expect("rm");
        // give the watcher a turn on a loaded machine
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher");
    assert_eq!(misses.load(Ordering::Relaxed), 0);
    assert!(checks.load(Ordering::Relaxed) > 400, "watcher barely ran");
}
