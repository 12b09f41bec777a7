//! Text formats shared by the listings and logged modes: GNU `du -sh` and
//! `numfmt --to=iec-i --suffix=B` sizes (spec §3.5), local dates, disk sets, and
//! Python `json.dumps(indent=4)` output for `--dump`. Pure functions, no I/O.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde_json::Value;

const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];

/// Scales `n` (≥ 1024) the way GNU `human_readable` does with `human_ceiling` and
/// autoscaling: one decimal below 10, an integer otherwise, always rounded up.
fn human(n: u64, suffix: impl Fn(&str) -> String) -> String {
    let n = u128::from(n);
    let mut div: u128 = 1024;
    for unit in UNITS {
        if n < 1024 * div {
            let tenths = (n * 10).div_ceil(div);
            if tenths < 100 {
                return format!("{}.{}{}", tenths / 10, tenths % 10, suffix(unit));
            }
            let whole = n.div_ceil(div);
            if whole < 1024 {
                return format!("{whole}{}", suffix(unit));
            }
        }
        div *= 1024;
    }
    // beyond exbibytes: cannot happen for a u64, but stay total
    format!("{}{}", n.div_ceil(div / 1024), suffix("E"))
}

/// `du -sh` style: `0`, `512`, `4.0K`, `28K`, `1.2G` (allocated bytes in, 1024-based).
pub fn du_size(bytes: u64) -> String {
    if bytes < 1024 {
        return bytes.to_string();
    }
    human(bytes, str::to_owned)
}

/// `numfmt --to=iec-i --suffix=B` style: `1023B`, `1.0KiB`, `10KiB`, `1.1GiB`.
pub fn iec_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    human(bytes, |u| format!("{u}iB"))
}

/// A file time as local `YYYY-MM-DD HH:MM:SS` (no fraction), as `date` prints it.
pub fn local_datetime(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// A stream metadata date (`2026-03-02 03:00:01.123456` or ISO `T` form, the local
/// time of the backup host, as virtnbdbackup writes it) as a time.
pub fn stream_time(date: &str) -> Option<SystemTime> {
    let d = nbdfmt::meta::parse_date(date)?;
    let naive = chrono::NaiveDate::from_ymd_opt(i32::try_from(d.year).ok()?, d.month, d.day)?
        .and_hms_micro_opt(d.hour, d.minute, d.second, d.micros)?;
    let local = naive.and_local_timezone(chrono::Local).earliest()?;
    Some(SystemTime::from(local))
}

/// Whether the block device holding `dir` rotates (`/sys/block/<dev>/queue/
/// rotational`); `None` when it cannot be told (a network or virtual filesystem).
pub fn rotational(dir: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let mut d = dir.to_path_buf();
    let dev = loop {
        if let Ok(m) = std::fs::metadata(&d) {
            break m.dev();
        }
        if !d.pop() {
            return None;
        }
    };
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // a partition's queue is its disk's
    [
        sys.join("queue/rotational"),
        sys.join("../queue/rotational"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|v| v.trim() == "1")
}

/// The current local time as `YYYY-MM-DD HH:MM:SS`.
pub fn now_local() -> String {
    local_datetime(SystemTime::now())
}

/// A disk set as the listings print it: byte order, joined with `", "`.
pub fn disk_set<'a>(disks: impl IntoIterator<Item = &'a String>) -> String {
    let set: BTreeSet<&String> = disks.into_iter().collect();
    set.into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `<m>m <s>s` for a duration in whole seconds.
pub fn duration(secs: u64) -> String {
    format!("{}m {}s", secs / 60, secs % 60)
}

/// Python's `json.dumps(value, indent=4)` (default separators, `ensure_ascii=True`),
/// which is what `virtnbdrestore -o dump` printed. Object key order is kept.
pub fn python_json(value: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, value, 0);
    out
}

fn write_json(out: &mut String, v: &Value, level: usize) {
    let pad = |out: &mut String, level: usize| out.extend(std::iter::repeat_n("    ", level));
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_json_string(out, s),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                pad(out, level + 1);
                write_json(out, item, level + 1);
            }
            out.push('\n');
            pad(out, level);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            out.push_str("{\n");
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                pad(out, level + 1);
                write_json_string(out, k);
                out.push_str(": ");
                write_json(out, item, level + 1);
            }
            out.push('\n');
            pad(out, level);
            out.push('}');
        }
    }
}

/// Python's `ensure_ascii` string encoding: everything outside space..`~` escaped.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn du_style_matches_gnu_du() {
        // GNU human_ceiling: one decimal below 10, always rounded up
        assert_eq!(du_size(0), "0");
        assert_eq!(du_size(512), "512");
        assert_eq!(du_size(1023), "1023");
        assert_eq!(du_size(1024), "1.0K");
        assert_eq!(du_size(4096), "4.0K");
        assert_eq!(du_size(4097), "4.1K");
        assert_eq!(du_size(10 * 1024 - 1), "10K");
        assert_eq!(du_size(28 * 1024), "28K");
        assert_eq!(du_size(1024 * 1024 - 1), "1.0M");
        assert_eq!(du_size(1024 * 1024), "1.0M");
        assert_eq!(du_size(800 * 1024 * 1024), "800M");
        assert_eq!(du_size(1_200_000_000), "1.2G");
        assert_eq!(du_size(1_288_490_189), "1.3G"); // 1.2000000002 rounds up
        assert_eq!(du_size(1_400_000_000), "1.4G");
        assert_eq!(du_size(u64::MAX), "16E");
    }

    #[test]
    fn iec_style_matches_numfmt() {
        assert_eq!(iec_size(0), "0B");
        assert_eq!(iec_size(1023), "1023B");
        assert_eq!(iec_size(1024), "1.0KiB");
        assert_eq!(iec_size(1536), "1.5KiB");
        assert_eq!(iec_size(10229), "10KiB"); // 9.99 rounds up to 10
        assert_eq!(iec_size(198 * 1024), "198KiB");
        assert_eq!(iec_size(1_100_000_000), "1.1GiB");
        assert_eq!(iec_size(100 * 1024 * 1024 * 1024), "100GiB");
    }

    #[test]
    fn python_json_layout() {
        let v: Value = serde_json::from_str(
            r#"[{"b": 1, "a": [], "c": {}, "d": "é\"\u0001", "e": [true, null]}]"#,
        )
        .expect("json");
        let expected = "[\n    {\n        \"b\": 1,\n        \"a\": [],\n        \"c\": {},\n        \"d\": \"\\u00e9\\\"\\u0001\",\n        \"e\": [\n            true,\n            null\n        ]\n    }\n]";
        assert_eq!(python_json(&v), expected);
        assert_eq!(python_json(&Value::Array(vec![])), "[]");
        assert_eq!(
            python_json(&Value::String("😀".into())),
            "\"\\ud83d\\ude00\""
        );
    }

    #[test]
    fn small_helpers() {
        assert_eq!(duration(0), "0m 0s");
        assert_eq!(duration(125), "2m 5s");
        let disks = ["vdb".to_owned(), "sda".to_owned(), "vda".to_owned()];
        assert_eq!(disk_set(disks.iter()), "sda, vda, vdb");
    }
}

/// `s` with every control character escaped (`\u{1b}`): names from a backup tree go
/// to terminals, and an escape sequence in a VM directory's name must not recolour or
/// rewrite the screen.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::printable("vm\u{1b}[31mRED"), "vm\\u{1b}[31mRED");
        assert_eq!(super::printable("plain é"), "plain é");
    }
}
