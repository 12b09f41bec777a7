//! Ownership of restored files: the first existing user of a list, with its group.

use std::path::Path;

use nix::unistd::{chown, Group, User};

/// chowns `path` to the first user in `users` that exists (and its same-named group,
/// else the user's primary group). Returns the user chosen, `None` if none exists.
pub fn chown_to(path: &Path, users: &[&str]) -> std::io::Result<Option<String>> {
    for name in users {
        if let Ok(Some(u)) = User::from_name(name) {
            let gid = Group::from_name(name)
                .ok()
                .flatten()
                .map_or(u.gid, |g| g.gid);
            chown(path, Some(u.uid), Some(gid)).map_err(std::io::Error::from)?;
            return Ok(Some((*name).to_owned()));
        }
    }
    Ok(None)
}

/// Recursively chowns a tree (used for TPM state).
pub fn chown_tree(path: &Path, users: &[&str]) -> std::io::Result<Option<String>> {
    let who = chown_to(path, users)?;
    if who.is_some() && path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), users)?;
        }
    }
    Ok(who)
}
