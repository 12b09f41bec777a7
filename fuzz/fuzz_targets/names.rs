//! The name validator (`vmrestore::host::names`): every name that becomes a path
//! component (VM, clone, disk target, period, restore point) passes through it.
//!
//! Input: any bytes, taken as a name when UTF-8 (the CLI refuses other arguments).
//! Checks:
//! - `unsafe_component` accepts exactly the model: non-empty, not `.`/`..`, no `/`,
//!   no NUL or other control character, at most 255 bytes;
//! - an accepted name joined to a directory is one component below it: the parent is
//!   the directory, the file name is the name, and lexical folding keeps it there;
//! - `shown` is bounded (80 characters of the name, escaped: no raw control
//!   characters) and `check_flag` refuses with a usage error naming the flag.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use vmrestore::error::ExitStatus;
use vmrestore::host::names::{check_flag, shown, unsafe_component, MAX_NAME};

fn model_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(char::is_control)
        && s.len() <= MAX_NAME
}

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let verdict = unsafe_component(name);
    assert_eq!(verdict.is_none(), model_ok(name), "{name:?}: {verdict:?}");
    let dir = Path::new("/var/lib/libvirt/images");
    if verdict.is_none() {
        let p = dir.join(name);
        assert_eq!(p.parent(), Some(dir), "{name:?}");
        assert_eq!(p.file_name().and_then(|f| f.to_str()), Some(name), "{name:?}");
        let normal = p.components().filter(|c| matches!(c, Component::Normal(_))).count();
        assert_eq!(normal, dir.components().count(), "{name:?} is not one component");
        assert!(vmrestore::host::paths::is_inside(&p, dir), "{name:?} leaves {dir:?}");
    }
    let s = shown(name);
    assert!(s.chars().count() <= 80 * 10 + 3, "shown() is not bounded: {}", s.len());
    assert!(!s.chars().any(char::is_control), "shown() passes a control character");
    match check_flag("--name", name) {
        Ok(()) => assert!(verdict.is_none()),
        Err(e) => {
            assert!(verdict.is_some());
            assert_eq!(e.exit_status(), ExitStatus::Usage, "{e}");
            assert!(e.to_string().starts_with("--name "), "{e}");
        }
    }
});
