//! Path facts with `realpath -m` semantics: where a path really is, and whether it
//! lies inside another (component-wise, after symlinks).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// `realpath -m`: absolute, every symlink resolved (dangling ones too, by their
/// target), `.` and `..` folded against the resolved path, components that do not
/// exist kept as they are.
///
/// Component by component, as the kernel walks a path: `/else/x/../link` is
/// `/else/link` resolved, even though `x` does not exist yet — a creation of that path
/// (`mkdir -p`) would make `x` and then follow `link`. (Folding the missing tail
/// lexically, as this did before, left `link` unresolved: a restore path through it
/// could point into the backup tree and pass the "not inside the backup root" check.)
pub fn canonicalize_lenient(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut todo: VecDeque<OsString> = components(&abs);
    let mut out = PathBuf::from("/");
    // the kernel's limit on symlinks in one lookup (ELOOP beyond it)
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            out.pop();
            continue;
        }
        let next = out.join(&c);
        match std::fs::read_link(&next) {
            Ok(target) if links < 40 => {
                links += 1;
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                for t in components(&target).into_iter().rev() {
                    todo.push_front(t);
                }
            }
            _ => out = next,
        }
    }
    out
}

/// The names of `p` (`.` dropped, `..` kept), without the root.
fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// True when `path` equals `root` or lies below it (component-wise, after
/// canonicalisation: `/backups2` is not inside `/backups`).
pub fn is_inside(path: &Path, root: &Path) -> bool {
    canonicalize_lenient(path).starts_with(canonicalize_lenient(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn realpath_m(p: &Path) -> Option<PathBuf> {
        let out = std::process::Command::new("realpath")
            .arg("-m")
            .arg(p)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim_end()))
    }

    #[test]
    fn a_link_behind_a_missing_dir_and_dotdot_is_resolved() {
        let d = tempfile::tempdir().expect("tmp");
        let base = std::fs::canonicalize(d.path()).expect("canonical");
        std::fs::create_dir_all(base.join("backups/vm")).expect("mkdir");
        std::fs::create_dir_all(base.join("else")).expect("mkdir");
        symlink(base.join("backups"), base.join("else/link")).expect("symlink");
        // `mkdir -p else/x/../link/vm/out` makes x, then follows link: into the tree
        let p = base.join("else/x/../link/vm/out");
        assert_eq!(canonicalize_lenient(&p), base.join("backups/vm/out"));
        assert!(is_inside(&p, &base.join("backups")));
    }

    #[test]
    fn dangling_links_loops_and_realpath() {
        let d = tempfile::tempdir().expect("tmp");
        let base = std::fs::canonicalize(d.path()).expect("canonical");
        std::fs::create_dir_all(base.join("a/b")).expect("mkdir");
        symlink("a/nothing", base.join("dead")).expect("dead");
        symlink("loop2", base.join("loop1")).expect("loop1");
        symlink("loop1", base.join("loop2")).expect("loop2");
        symlink("../..", base.join("a/b/up2")).expect("up2");
        symlink("/", base.join("abs")).expect("abs");
        assert_eq!(
            canonicalize_lenient(&base.join("dead/f")),
            base.join("a/nothing/f")
        );
        // a loop ends (the kernel says ELOOP; any answer, no hang)
        let _ = canonicalize_lenient(&base.join("loop1/x"));
        for rel in [
            "a/b/up2",
            "a/b/up2/a/./b/../b",
            "dead/../x",
            "abs/etc/../tmp",
            "x/y/../../a/b/up2/../..",
            "a/b/../../dead",
        ] {
            let p = base.join(rel);
            if let Some(want) = realpath_m(&p) {
                assert_eq!(canonicalize_lenient(&p), want, "{rel}");
            }
        }
    }
}
