//! `StagedPath::commit_replacing` under real `kill -9`: a child process commits new
//! versions of a file in a loop, keeping the previous one as a rollback; the parent
//! kills it at varying moments and checks what is on disk each time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine::StagedPath;

const DIR_VAR: &str = "ENGINE_STAGED_KILL_DIR";
const LEN: usize = 64 << 10;

/// Version `n`: `LEN` bytes of `n` in decimal, repeated.
fn version(n: u64) -> Vec<u8> {
    let s = format!("{n:>12}");
    s.as_bytes().iter().copied().cycle().take(LEN).collect()
}

/// The version a file holds; panics on anything that is not a whole version.
fn version_of(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let n: u64 = std::str::from_utf8(&b[..12])
        .expect("utf8")
        .trim()
        .parse()
        .expect("number");
    assert_eq!(b, version(n), "{} is not a whole version", p.display());
    n
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("d.raw"), dir.join("d.raw.pre-restore"))
}

/// The child: commit versions until killed.
#[test]
#[ignore = "child process of kill_9_never_loses_the_final_path"]
fn child_commit_loop() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return;
    };
    let (f, keep) = paths(Path::new(&dir));
    let mut n = version_of(&f);
    loop {
        n += 1;
        let s = StagedPath::new(&f);
        std::fs::write(s.temp_path(), version(n)).expect("write");
        s.commit_replacing(Some(&keep)).expect("commit");
        std::fs::remove_file(&keep).expect("rm rollback");
    }
}

#[test]
fn kill_9_never_loses_the_final_path() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (f, keep) = paths(tmp.path());
    std::fs::write(&f, version(0)).expect("write");
    let exe = std::env::current_exe().expect("exe");
    let (mut linked_only, mut completed, mut clean) = (0, 0, 0);
    let mut last = 0;
    for round in 0..24u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_commit_loop",
                "--ignored",
                "--test-threads=1",
            ])
            .env(DIR_VAR, tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        // let it commit a while (it starts after the harness is up)
        let started = Instant::now();
        while version_of(&f) == last && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(500 + 997 * (round % 11)));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");

        // The final name is there and holds a whole version.
        let now = version_of(&f);
        assert!(now > last, "round {round}: no progress ({now})");
        match std::fs::symlink_metadata(&keep) {
            Err(_) => clean += 1,
            Ok(k) => {
                let m = std::fs::symlink_metadata(&f).expect("stat");
                if (k.dev(), k.ino()) == (m.dev(), m.ino()) {
                    // killed between link and rename: the original, twice
                    linked_only += 1;
                    assert!(StagedPath::discard_unfinished_rollback(&f, &keep).expect("discard"));
                } else {
                    // killed after the rename: the rollback is the version before
                    completed += 1;
                    assert_eq!(version_of(&keep), now - 1, "round {round}");
                    std::fs::remove_file(&keep).expect("rm");
                }
            }
        }
        // The dead child's `.part` (if any) is stale now; nothing else is left.
        StagedPath::remove_stale(&f);
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["d.raw"], "round {round}");
        last = now;
    }
    eprintln!(
        "24 kills: {clean} with no rollback name, {linked_only} between link and rename, \
         {completed} after the rename; final version {last}"
    );
}
