//! `vmbackup.conf` read as data (`vmrestore::host::config::parse_backup_path`).
//!
//! Input: one flag byte and one length byte, then the file. With flag bit 0 the first
//! line is padded with `x` to about 64 KiB (the line limit ± 128 bytes). Checks:
//! - the result equals a model of what `sh` would assign (`sh_line`): a rejection is
//!   a `ConfigLine` error naming the file and the first line that is over the limit or
//!   needs a shell (expansion, substitution, `~`, an operator, a word after the value,
//!   concatenated quoting); the lines before it are accepted on their own;
//! - an accepted value is non-empty text of the file, and one with `$`, a backtick
//!   or a backslash was single-quoted;
//! - line-local, last-wins semantics: a leading comment shifts error lines by one and
//!   changes nothing else, a trailing comment with `$(...)` changes nothing, a
//!   trailing assignment wins;
//! - accepted values round-trip through `BACKUP_PATH='<value>'`.
#![no_main]

use std::io::Cursor;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use vmrestore::host::config::{parse_backup_path, MAX_LINE};
use vmrestore::error::{AppError, ExitStatus};

const FILE: &str = "/opt/vmbackup/config/fz/vmbackup.conf";

type Parsed = Result<Option<PathBuf>, (usize, String)>;

fn run(text: &[u8]) -> Parsed {
    match parse_backup_path(Cursor::new(text), Path::new(FILE)) {
        Ok(v) => Ok(v),
        Err(e) => {
            assert_eq!(e.exit_status(), ExitStatus::Config, "{e}");
            let s = e.to_string();
            let AppError::ConfigLine { path, line, reason } = e else {
                panic!("not a file:line error: {s}")
            };
            assert_eq!(path, Path::new(FILE));
            assert!(s.starts_with(&format!("{FILE}:{line}: ")), "{s}");
            Err((line, reason))
        }
    }
}

/// The lines of `text` as the reader numbers them (1-based), without `\n`.
fn lines(text: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    if text.is_empty() || text.ends_with(b"\n") {
        v.pop();
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// One line as `sh` would see it, within the syntax vmrestore accepts (blanks around
/// `=` are tolerated, a trailing CR is dropped).
#[derive(Debug)]
enum Sh {
    /// Does not assign BACKUP_PATH.
    Other,
    /// Assigns this value; `false` when sh would build it from several quoted or
    /// unquoted pieces (vmrestore refuses those rather than concatenating).
    Value(Vec<u8>, bool),
    /// Needs a shell: expansion, substitution, an operator, a command after the
    /// assignment, or an unterminated quote.
    Shell,
}

fn sh_line(line: &[u8]) -> Sh {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let blank = |c: &u8| *c == b' ' || *c == b'\t';
    let skip = |i: usize| i + line[i..].iter().take_while(|c| blank(c)).count();
    let mut i = skip(0);
    if line[i..].starts_with(b"export") && line.get(i + 6).is_some_and(blank) {
        i = skip(i + 6);
    }
    if !line[i..].starts_with(b"BACKUP_PATH") {
        return Sh::Other;
    }
    i = skip(i + 11);
    if line.get(i) != Some(&b'=') {
        return Sh::Other;
    }
    i = skip(i + 1);
    let mut value = Vec::new();
    let mut pieces = 0;
    let mut unquoted_run = false;
    while let Some(&c) = line.get(i) {
        match c {
            b' ' | b'\t' | b';' => break,
            b'\'' | b'"' => {
                let Some(len) = line[i + 1..].iter().position(|&d| d == c) else {
                    return Sh::Shell;
                };
                let body = &line[i + 1..i + 1 + len];
                if c == b'"' && body.iter().any(|d| b"$`\\".contains(d)) {
                    return Sh::Shell;
                }
                value.extend_from_slice(body);
                pieces += 1;
                unquoted_run = false;
                i += len + 2;
            }
            b'$' | b'`' | b'\\' | b'&' | b'|' | b'<' | b'>' | b'(' | b')' => return Sh::Shell,
            // tilde expansion: at the start of the value and after an unquoted ':'
            b'~' if pieces == 0 || (unquoted_run && line[i - 1] == b':') => return Sh::Shell,
            _ => {
                if !unquoted_run {
                    pieces += 1;
                    unquoted_run = true;
                }
                value.push(c);
                i += 1;
            }
        }
    }
    let rest = &line[skip(i)..];
    if !(rest.is_empty() || rest.starts_with(b"#") || rest.starts_with(b";")) {
        return Sh::Shell; // `BACKUP_PATH=/a cmd` only sets it for cmd
    }
    Sh::Value(value, pieces <= 1)
}

/// What reading `text` must give, from [`sh_line`]: the last assignment wins, an
/// empty value means none, one trailing `/` goes; the first line that is too long or
/// needs a shell is the error (reason not modelled).
fn model(text: &[u8]) -> Result<Option<PathBuf>, usize> {
    let mut found = None;
    for (n, l) in lines(text).into_iter().enumerate() {
        if l.len() > MAX_LINE {
            return Err(n + 1);
        }
        match sh_line(l) {
            Sh::Other => {}
            Sh::Value(v, true) => found = Some(v),
            Sh::Value(_, false) | Sh::Shell => return Err(n + 1),
        }
    }
    Ok(found.filter(|v| !v.is_empty()).map(|v| {
        let s = match v.strip_suffix(b"/") {
            Some(t) if !t.is_empty() => t,
            _ => &v[..],
        };
        PathBuf::from(std::ffi::OsStr::from_bytes(s))
    }))
}

fn check(text: &[u8]) -> Parsed {
    let res = run(text);
    let ls = lines(text);
    let want = model(text);
    match &res {
        Err((line, reason)) => {
            assert_eq!(Err(*line), want, "rejected: {reason}");
            let l = ls[line - 1];
            assert_eq!(
                l.len() > MAX_LINE,
                reason.starts_with("line longer than"),
                "{reason}"
            );
            let before: usize = ls[..line - 1].iter().map(|l| l.len() + 1).sum();
            assert!(
                run(&text[..before]).is_ok(),
                "the lines before {line} are rejected on their own"
            );
        }
        Ok(v) => {
            assert_eq!(Ok(v.clone()), want, "accepted");
            if let Some(p) = v {
                let b = p.as_os_str().as_bytes();
                assert!(!b.is_empty() && !b.contains(&b'\n'));
                assert!(contains(text, b), "value {p:?} is not in the file");
                if b.iter().any(|c| b"$`\\".contains(c)) {
                    let quoted = [b"'".as_slice(), b].concat();
                    assert!(contains(text, &quoted), "{p:?} needs a shell");
                }
            }
        }
    }
    res
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, pad], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut text = rest.to_vec();
    if flags & 1 != 0 {
        let len = MAX_LINE - 128 + 2 * usize::from(pad);
        let at = text.iter().position(|&b| b == b'\n').unwrap_or(text.len());
        let first = text[..at].len();
        let filler = vec![b'x'; len.saturating_sub(first)];
        text.splice(at..at, filler);
    }
    let res = check(&text);

    // A leading comment shifts error lines by one and changes nothing else.
    let shifted = run(&[b"# BACKUP_PATH=$(rm -rf /)\n".as_slice(), &text].concat());
    match (&res, &shifted) {
        (Err((l, r)), Err((l2, r2))) => assert!(*l2 == l + 1 && r2 == r, "{l}/{l2}"),
        (Ok(v), Ok(v2)) => assert_eq!(v, v2),
        _ => panic!("a leading comment changed {res:?} into {shifted:?}"),
    }
    if res.is_err() {
        return;
    }
    // Trailing lines: a comment changes nothing, an assignment wins.
    let mut base = text.clone();
    if !base.is_empty() && !base.ends_with(b"\n") {
        base.push(b'\n');
    }
    let commented = run(&[&base, b"  #BACKUP_PATH=`id`\n".as_slice()].concat());
    assert_eq!(commented, res, "a trailing comment changed the result");
    let assigned = run(&[&base, b"export BACKUP_PATH = \"/zz y/\" ; x\r\n".as_slice()].concat());
    assert_eq!(assigned, Ok(Some(PathBuf::from("/zz y"))));

    // Round trip of an accepted value (one trailing `/` is removed on reading).
    if let Ok(Some(p)) = &res {
        let b = p.as_os_str().as_bytes();
        let fits = b.len() + 15 <= MAX_LINE;
        if fits && !b.contains(&b'\'') && (!b.ends_with(b"/") || b == b"/") {
            let line = [b"BACKUP_PATH='".as_slice(), b, b"'\n"].concat();
            assert_eq!(run(&line), res, "round trip of {p:?}");
        }
    }
});
