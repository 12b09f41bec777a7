//! Path facts with `realpath -m` semantics: where a path really is, and whether it
//! lies inside another (component-wise, after symlinks).

use std::path::{Component, Path, PathBuf};

/// `realpath -m`: absolute, symlinks resolved on the longest existing prefix, `.` and
/// `..` folded lexically in the rest.
pub fn canonicalize_lenient(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            let mut out = c;
            for r in rest.iter().rev() {
                match Path::new(r).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    _ => out.push(r),
                }
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => {
                // ".." at the end, or nothing exists: fold lexically
                let mut out = PathBuf::new();
                for c in abs.components() {
                    match c {
                        Component::ParentDir => {
                            out.pop();
                        }
                        Component::CurDir => {}
                        other => out.push(other),
                    }
                }
                return out;
            }
        }
    }
}

/// True when `path` equals `root` or lies below it (component-wise, after
/// canonicalisation: `/backups2` is not inside `/backups`).
pub fn is_inside(path: &Path, root: &Path) -> bool {
    canonicalize_lenient(path).starts_with(canonicalize_lenient(root))
}
