//! Names that become path components (VM names from flags and from domain XML, clone
//! names, disk targets, periods). The backup tree can be a replica anyone wrote, and
//! vmrestore runs as root: a name is one safe component or it is refused, before any
//! path is built from it.

/// Longest accepted name: a component of most filesystems (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Why `value` cannot be a single path component, or `None` when it can.
pub fn unsafe_component(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("is empty")
    } else if value == "." || value == ".." {
        Some("is `.` or `..`")
    } else if value.contains('/') {
        Some("contains `/`")
    } else if value.contains('\0') {
        Some("contains a NUL byte")
    } else if value.chars().any(char::is_control) {
        Some("contains a control character")
    } else if value.len() > MAX_NAME {
        Some("is longer than 255 bytes")
    } else {
        None
    }
}

/// `value` for a message: quoted, escaped, at most 80 characters of it.
pub fn shown(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    let more = if cut.len() < value.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

/// Checks a name typed on the command line (`field` is the flag).
pub fn check_flag(field: &str, value: &str) -> Result<(), crate::error::AppError> {
    match unsafe_component(value) {
        None => Ok(()),
        Some(why) => Err(crate::error::AppError::Usage(format!(
            "{field} {}: not usable as a name — it {why}",
            shown(value)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        for ok in ["vm", "my vm", "vm-1.2", "x..y", "é"] {
            assert_eq!(unsafe_component(ok), None, "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            &"x".repeat(256),
        ] {
            assert!(unsafe_component(bad).is_some(), "{bad:?}");
        }
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert!(shown(&"y".repeat(100)).ends_with('…'));
    }
}
