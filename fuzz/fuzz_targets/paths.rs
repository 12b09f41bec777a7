//! The path resolver (`vmrestore::host::paths`): `canonicalize_lenient` (`realpath -m`)
//! and `is_inside`, which decide whether a restore path lies in the backup tree and
//! where a created file really lands.
//!
//! A fixed directory tree is made once: `a/b/`, a symlink `l -> a/b`, a symlink
//! `up -> ..` (leaves the tree), `abs -> /` and a dangling `dead -> a/nothing`. Input
//! bytes pick path components from `a b l up abs dead x .. . ` (one per byte).
//! Checks:
//! - the result is absolute with no `.`/`..` components, and a fixed point;
//! - where the path exists, it equals `std::fs::canonicalize`;
//! - `is_inside(p, base)` is `canonicalize_lenient(p)` starting with the base's;
//! - a path through `up` or `abs` (and not back down into the tree) is never inside;
//! - a safe name (see the `names` target) joined to a real directory of the tree
//!   stays inside it;
//! - `nvram::confined(p, dir)` (where an NVRAM file from a backup XML is installed)
//!   always lands directly in `dir` (after symlinks), under a safe file name.
#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmrestore::host::nvram::confined;
use vmrestore::host::paths::{canonicalize_lenient, is_inside};

const PARTS: [&str; 10] = ["a", "b", "l", "up", "abs", "dead", "x", "..", ".", ""];

fn base() -> &'static Path {
    static BASE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &BASE
        .get_or_init(|| {
            let d = tempfile::tempdir().expect("tempdir");
            let b = std::fs::canonicalize(d.path()).expect("canonical").join("tree");
            std::fs::create_dir_all(b.join("a/b")).expect("mkdir");
            std::os::unix::fs::symlink("a/b", b.join("l")).expect("l");
            std::os::unix::fs::symlink("..", b.join("up")).expect("up");
            std::os::unix::fs::symlink("/", b.join("abs")).expect("abs");
            std::os::unix::fs::symlink("a/nothing", b.join("dead")).expect("dead");
            (d, b)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let rel: PathBuf = data.iter().take(32).map(|b| PARTS[usize::from(*b) % PARTS.len()]).collect();
    let p = base.join(&rel);
    let c = canonicalize_lenient(&p);
    assert!(c.is_absolute(), "{p:?} -> {c:?}");
    assert!(
        c.components().all(|k| !matches!(k, Component::ParentDir | Component::CurDir)),
        "{p:?} -> {c:?}"
    );
    assert_eq!(canonicalize_lenient(&c), c, "not a fixed point: {p:?}");
    if let Ok(real) = std::fs::canonicalize(&p) {
        assert_eq!(c, real, "{p:?}");
    }
    let inside = is_inside(&p, base);
    assert_eq!(inside, c.starts_with(canonicalize_lenient(base)), "{p:?}");
    // leaving through `up`/`abs` as the first component: outside unless the rest
    // climbs back into the tree by name (`up/tree/...`, `abs/...`), which the
    // alphabet cannot spell
    let first = rel.components().next();
    if matches!(first, Some(Component::Normal(n)) if n == "up" || n == "abs") {
        assert!(!inside, "{p:?} -> {c:?} counted inside");
    }
    // a safe name below a real directory of the tree stays inside it
    if let Some(name) = std::str::from_utf8(data).ok().filter(|n| {
        vmrestore::host::names::unsafe_component(n).is_none()
    }) {
        for dir in [base.to_path_buf(), base.join("a"), base.join("a/b")] {
            if name != "up" && name != "abs" && name != "l" && name != "dead" {
                assert!(is_inside(&dir.join(name), &dir), "{name:?} leaves {dir:?}");
            }
        }
    }
    // an NVRAM destination never leaves the NVRAM directory, whatever the XML said
    let nvram_dir = base.join("a/b");
    for q in [&p, &rel] {
        let dest = confined(q, &nvram_dir, "vm");
        let parent = dest.parent().map(canonicalize_lenient);
        assert_eq!(parent, Some(canonicalize_lenient(&nvram_dir)), "{q:?} -> {dest:?}");
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(vmrestore::host::names::unsafe_component(name).is_none(), "{q:?} -> {dest:?}");
        assert!(name.starts_with("vm_VARS"), "{q:?} -> {dest:?}");
    }
});
