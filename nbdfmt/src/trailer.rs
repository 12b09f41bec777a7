//! The compression trailer: one entry per data frame giving the stored (LZ4) size.
//!
//! ```text
//! ... stop 0000000000000000 0000000000000000\r\n
//! [4410, 298, {"149104": [140312, 8792]}, 572]\r\n      <- JSON, L bytes
//! comp 0000000000000000 <L as 16 hex>\r\n                <- last 40 bytes of the file
//! ```
//! An integer entry is one LZ4 frame; a one-key object is an extent of 32 MiB or more
//! stored as several LZ4 frames back to back (key = decimal total, value = frame sizes).

use serde_json::Value;

use crate::error::{ErrorKind, Result};

/// Longest trailer JSON we accept (about six million entries).
pub const MAX_TRAILER_LEN: u64 = 64 * 1024 * 1024;

/// The stored form of one data frame's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailerEntry {
    /// Size of each LZ4 frame in the payload, in order.
    pub frames: Vec<u64>,
    /// True when written in the `{"total": [...]}` form.
    pub chunked: bool,
}

impl TrailerEntry {
    /// Bytes the payload occupies in the file.
    pub fn stored_len(&self) -> u64 {
        self.frames.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Parses the trailer JSON found at `offset`.
pub fn parse_trailer(json: &[u8], offset: u64) -> Result<Vec<TrailerEntry>> {
    let bad = |reason: String| ErrorKind::BadTrailer { offset, reason };
    let v: Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let Value::Array(items) = v else {
        return Err(bad("not a JSON array".into()).into());
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let entry = match item {
            Value::Number(n) => {
                let size = n
                    .as_u64()
                    .ok_or_else(|| bad(format!("entry {i}: {n} is not a size")))?;
                TrailerEntry {
                    frames: vec![size],
                    chunked: false,
                }
            }
            Value::Object(map) => {
                let mut it = map.into_iter();
                let (Some((key, val)), None) = (it.next(), it.next()) else {
                    return Err(bad(format!("entry {i}: object must have exactly one key")).into());
                };
                let total: u64 = key
                    .parse()
                    .map_err(|_| bad(format!("entry {i}: key {key:?} is not a decimal size")))?;
                let Value::Array(list) = val else {
                    return Err(bad(format!("entry {i}: value is not a list")).into());
                };
                let frames = list
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .ok_or_else(|| bad(format!("entry {i}: {x} is not a size")))
                    })
                    .collect::<Result<Vec<u64>, _>>()?;
                if frames.is_empty() {
                    return Err(bad(format!("entry {i}: empty frame list")).into());
                }
                // checked: a saturated sum could equal a key of u64::MAX
                match frames.iter().try_fold(0u64, |a, &b| a.checked_add(b)) {
                    Some(sum) if sum == total => {}
                    Some(sum) => {
                        return Err(bad(format!(
                            "entry {i}: key says {total} bytes, frames add up to {sum}"
                        ))
                        .into())
                    }
                    None => {
                        return Err(bad(format!(
                            "entry {i}: frame sizes add up to more than 2^64 - 1"
                        ))
                        .into())
                    }
                }
                TrailerEntry {
                    frames,
                    chunked: true,
                }
            }
            other => {
                return Err(bad(format!(
                    "entry {i}: {other} is neither a size nor an object"
                ))
                .into())
            }
        };
        out.push(entry);
    }
    Ok(out)
}

/// The trailer JSON virtnbdbackup writes (`json.dumps` default separators).
pub fn encode_trailer(entries: &[TrailerEntry]) -> String {
    let parts: Vec<String> = entries
        .iter()
        .map(|e| {
            if e.chunked {
                let list: Vec<String> = e.frames.iter().map(u64::to_string).collect();
                format!("{{\"{}\": [{}]}}", e.stored_len(), list.join(", "))
            } else {
                e.frames.first().copied().unwrap_or(0).to_string()
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_ex4_trailer() {
        let t = parse_trailer(br#"[4410, 298, {"149104": [140312, 8792]}, 572]"#, 0x25deb)
            .expect("valid");
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[2],
            TrailerEntry {
                frames: vec![140_312, 8792],
                chunked: true
            }
        );
        assert_eq!(t[2].stored_len(), 149_104);
        assert_eq!(
            encode_trailer(&t),
            r#"[4410, 298, {"149104": [140312, 8792]}, 572]"#
        );
        assert_eq!(parse_trailer(b"[]", 0).expect("empty"), vec![]);
    }

    #[test]
    fn rejects_bad_trailers_with_offset() {
        for bad in [
            "{}",
            "[-1]",
            r#"[{"10": [4, 5]}]"#,
            r#"[{"a": [1]}]"#,
            r#"[{"1": [1], "2": [2]}]"#,
            "[\"x\"]",
            "[1,",
        ] {
            let e = parse_trailer(bad.as_bytes(), 99).expect_err(bad);
            assert_eq!(e.offset(), Some(99));
        }
    }

    #[test]
    fn regression_chunk_sizes_overflowing_u64_are_rejected() {
        // found while writing the meta_json fuzz target (sizes must add up without
        // overflow): the saturating sum of [u64::MAX, 1] equalled the key u64::MAX
        let e = parse_trailer(
            br#"[{"18446744073709551615": [18446744073709551615, 1]}]"#,
            5,
        )
        .expect_err("overflow");
        assert!(
            matches!(e.kind(), ErrorKind::BadTrailer { offset: 5, .. }),
            "{e}"
        );
        assert!(parse_trailer(
            br#"[{"18446744073709551615": [18446744073709551614, 1]}]"#,
            0
        )
        .is_ok());
    }
}
