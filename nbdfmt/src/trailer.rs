//! The compression trailer: one entry per data frame giving the stored (LZ4) size.
//!
//! ```text
//! ... stop 0000000000000000 0000000000000000\r\n
//! [4410, 298, {"149104": [140312, 8792]}, 572]\r\n      <- JSON, L bytes
//! comp 0000000000000000 <L as 16 hex>\r\n                <- last 40 bytes of the file
//! ```
//! An integer entry is one LZ4 frame; a one-key object is an extent of 32 MiB or more
//! stored as several LZ4 frames back to back (key = decimal total, value = frame sizes).

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

/// Parses the trailer JSON found at `offset` (all of it in memory; see
/// [`TrailerCursor`] for one entry at a time).
pub fn parse_trailer(json: &[u8], offset: u64) -> Result<Vec<TrailerEntry>> {
    let mut c = TrailerCursor::new(offset, json.len() as u64);
    let mut read = |at: u64, buf: &mut [u8]| -> Result<usize> {
        let at = usize::try_from(at).unwrap_or(usize::MAX).min(json.len());
        let n = buf.len().min(json.len() - at);
        buf[..n].copy_from_slice(&json[at..at + n]);
        Ok(n)
    };
    let mut out = Vec::new();
    while let Some(e) = c.next_entry(&mut read)? {
        out.push(e);
    }
    Ok(out)
}

/// Bytes of trailer JSON a [`TrailerCursor`] reads at a time.
pub const TRAILER_BUF: usize = 4096;

/// Where a [`TrailerCursor`] is in the JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the opening `[`.
    Start,
    /// After `[`: an entry or `]`.
    First,
    /// After an entry: `,` or `]`.
    Next,
    /// After the closing `]` and the whitespace to the end.
    Done,
}

/// Reads the trailer JSON one entry at a time, so a stream of millions of frames needs
/// no memory per frame: `[n, n, {"total": [n, n]}, ...]` as `json.dumps` writes it,
/// with any JSON whitespace. It accepts a subset of what a JSON parser accepts (keys
/// are plain decimal strings without escapes), and everything it accepts parses to
/// the same entries with `serde_json`.
#[derive(Debug, Clone)]
pub struct TrailerCursor {
    /// File offset of the JSON (the offset every error names).
    offset: u64,
    /// JSON length.
    len: u64,
    /// `buf[..buf_len]` holds JSON bytes from `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    buf_len: usize,
    /// Next JSON byte to look at.
    pos: u64,
    at: At,
    /// Entries returned so far.
    entries: usize,
    /// Most LZ4 frames the next chunked entry may list ([`Self::limit_frames`]).
    max_frames: usize,
}

/// Most LZ4 frames one chunked entry may list, whatever its data frame's length:
/// 2^21 sizes are 16 MiB of memory — a 64 TiB extent at virtnbdbackup's 32 MiB
/// chunks. Without a bound, one entry of a 64 MiB trailer listed 33.5M sizes (810 MiB
/// of memory for a crafted file).
pub const MAX_CHUNK_FRAMES: usize = 1 << 21;

/// Smallest chunk virtnbdbackup splits a large extent into: it compresses one NBD
/// request at a time, and servers offer requests of 32 MiB (qemu) — never below
/// this. A data frame of `n` bytes has at most `n / MIN_CHUNK + 1` LZ4 frames.
pub const MIN_CHUNK: u64 = 256 * 1024;

/// Reads JSON bytes: `(offset in the JSON, buffer) -> bytes read`.
type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<usize> + 'a;

impl TrailerCursor {
    /// A cursor over the `len` bytes of JSON at file offset `offset`.
    pub fn new(offset: u64, len: u64) -> Self {
        Self {
            offset,
            len,
            buf: Vec::new(),
            buf_start: 0,
            buf_len: 0,
            pos: 0,
            at: At::Start,
            entries: 0,
            max_frames: MAX_CHUNK_FRAMES,
        }
    }

    /// Bounds the next entry's LZ4 frame list for a data frame of `length` bytes
    /// ([`MIN_CHUNK`], [`MAX_CHUNK_FRAMES`]).
    pub fn limit_frames(&mut self, length: u64) {
        let n = usize::try_from(length / MIN_CHUNK + 1).unwrap_or(usize::MAX);
        self.max_frames = n.min(MAX_CHUNK_FRAMES);
    }

    /// Entries returned so far.
    pub fn entries(&self) -> usize {
        self.entries
    }

    fn bad(&self, reason: String) -> crate::Error {
        ErrorKind::BadTrailer {
            offset: self.offset,
            reason,
        }
        .into()
    }

    /// The byte at the cursor (`None` at the end of the JSON), reading more when needed.
    fn peek(&mut self, read: &mut ReadAt<'_>) -> Result<Option<u8>> {
        if self.pos >= self.len {
            return Ok(None);
        }
        let end = self.buf_start + self.buf_len as u64;
        if self.pos < self.buf_start || self.pos >= end {
            if self.buf.is_empty() {
                self.buf = vec![0u8; TRAILER_BUF];
            }
            let want = usize::try_from(self.len - self.pos)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = read(self.pos, &mut self.buf[..want])?;
            if n == 0 {
                return Err(self.bad(format!("ends after {} of {} bytes", self.pos, self.len)));
            }
            self.buf_start = self.pos;
            self.buf_len = n;
        }
        let i = usize::try_from(self.pos - self.buf_start).unwrap_or(usize::MAX);
        Ok(Some(self.buf[i]))
    }

    /// Skips JSON whitespace; the byte after it.
    fn skip_ws(&mut self, read: &mut ReadAt<'_>) -> Result<Option<u8>> {
        loop {
            match self.peek(read)? {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.pos += 1,
                other => return Ok(other),
            }
        }
    }

    /// After whitespace, `want` must come next.
    fn expect(&mut self, read: &mut ReadAt<'_>, want: u8, what: &str) -> Result<()> {
        match self.skip_ws(read)? {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            other => Err(self.bad(format!(
                "entry {}: expected {what}, found {}",
                self.entries,
                shown(other)
            ))),
        }
    }

    /// A JSON number that must be a size (a non-negative integer below 2^64).
    fn size(&mut self, read: &mut ReadAt<'_>) -> Result<u64> {
        let i = self.entries;
        let mut v: Option<u64> = Some(0);
        let mut digits = 0u32;
        let first = self.peek(read)?;
        while let Some(b @ b'0'..=b'9') = self.peek(read)? {
            v = v
                .and_then(|x| x.checked_mul(10))
                .and_then(|x| x.checked_add(u64::from(b - b'0')));
            digits += 1;
            self.pos += 1;
        }
        let after = self.peek(read)?;
        if digits == 0 || matches!(after, Some(b'.' | b'e' | b'E')) || first == Some(b'-') {
            return Err(self.bad(format!("entry {i}: not a size")));
        }
        if first == Some(b'0') && digits > 1 {
            return Err(self.bad(format!("entry {i}: a number has a leading zero")));
        }
        v.ok_or_else(|| self.bad(format!("entry {i}: a size does not fit in 64 bits")))
    }

    /// `{"<total>": [n, ...]}` after its `{`.
    fn chunked(&mut self, read: &mut ReadAt<'_>) -> Result<TrailerEntry> {
        let i = self.entries;
        self.expect(read, b'"', "a quoted key")?;
        let mut key: Option<u64> = Some(0);
        let mut digits = 0u32;
        if self.peek(read)? == Some(b'+') {
            self.pos += 1;
        }
        loop {
            match self.peek(read)? {
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b @ b'0'..=b'9') => {
                    key = key
                        .and_then(|x| x.checked_mul(10))
                        .and_then(|x| x.checked_add(u64::from(b - b'0')));
                    digits += 1;
                    self.pos += 1;
                }
                _ => return Err(self.bad(format!("entry {i}: the key is not a decimal size"))),
            }
        }
        let total = match key {
            Some(k) if digits > 0 => k,
            _ => return Err(self.bad(format!("entry {i}: the key is not a decimal size"))),
        };
        self.expect(read, b':', "':'")?;
        self.expect(read, b'[', "a list of sizes")?;
        let mut frames = Vec::new();
        if self.skip_ws(read)? == Some(b']') {
            return Err(self.bad(format!("entry {i}: empty frame list")));
        }
        loop {
            self.skip_ws(read)?;
            if frames.len() >= self.max_frames {
                return Err(self.bad(format!(
                    "entry {i}: more than {} LZ4 frames for one data frame (virtnbdbackup writes one per NBD request of at least {} KiB)",
                    self.max_frames,
                    MIN_CHUNK / 1024
                )));
            }
            frames.push(self.size(read)?);
            match self.skip_ws(read)? {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    break;
                }
                other => {
                    return Err(self.bad(format!(
                        "entry {i}: expected ',' or ']', found {}",
                        shown(other)
                    )))
                }
            }
        }
        match self.skip_ws(read)? {
            Some(b'}') => self.pos += 1,
            _ => {
                return Err(self.bad(format!("entry {i}: object must have exactly one key")));
            }
        }
        // checked: a saturated sum could equal a key of u64::MAX
        match frames.iter().try_fold(0u64, |a, &b| a.checked_add(b)) {
            Some(sum) if sum == total => Ok(TrailerEntry {
                frames,
                chunked: true,
            }),
            Some(sum) => Err(self.bad(format!(
                "entry {i}: key says {total} bytes, frames add up to {sum}"
            ))),
            None => Err(self.bad(format!(
                "entry {i}: frame sizes add up to more than 2^64 - 1"
            ))),
        }
    }

    /// The next entry, `None` after the last one (the JSON is then checked to its end).
    pub fn next_entry(&mut self, read: &mut ReadAt<'_>) -> Result<Option<TrailerEntry>> {
        match self.at {
            At::Done => return Ok(None),
            At::Start => {
                if self.skip_ws(read)? != Some(b'[') {
                    return Err(self.bad("not a JSON array".into()));
                }
                self.pos += 1;
                self.at = At::First;
            }
            At::First | At::Next => {}
        }
        let b = self.skip_ws(read)?;
        let entry_follows = match (self.at, b) {
            (_, Some(b']')) => false,
            (At::First, _) => true,
            (_, Some(b',')) => {
                self.pos += 1;
                true
            }
            (_, other) => {
                return Err(self.bad(format!(
                    "after entry {}: expected ',' or ']', found {}",
                    self.entries.saturating_sub(1),
                    shown(other)
                )))
            }
        };
        if !entry_follows {
            self.pos += 1;
            if self.skip_ws(read)?.is_some() {
                return Err(self.bad("bytes after the closing ']'".into()));
            }
            self.at = At::Done;
            return Ok(None);
        }
        let i = self.entries;
        let entry = match self.skip_ws(read)? {
            Some(b'{') => {
                self.pos += 1;
                self.chunked(read)?
            }
            Some(b'0'..=b'9' | b'-') => TrailerEntry {
                frames: vec![self.size(read)?],
                chunked: false,
            },
            other => {
                return Err(self.bad(format!(
                    "entry {i}: {} is neither a size nor an object",
                    shown(other)
                )))
            }
        };
        self.at = At::Next;
        self.entries += 1;
        Ok(Some(entry))
    }
}

/// A JSON byte for a message (printable, or its code).
fn shown(b: Option<u8>) -> String {
    match b {
        None => "the end".into(),
        Some(b) if b.is_ascii_graphic() => format!("'{}'", b as char),
        Some(b) => format!("byte {b:#04x}"),
    }
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

    /// What serde_json makes of a trailer (the parser this one replaced), as the oracle.
    fn serde_entries(json: &[u8]) -> Option<Vec<TrailerEntry>> {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        v.as_array()?
            .iter()
            .map(|item| match item {
                serde_json::Value::Number(n) => Some(TrailerEntry {
                    frames: vec![n.as_u64()?],
                    chunked: false,
                }),
                serde_json::Value::Object(m) if m.len() == 1 => {
                    let (k, v) = m.iter().next()?;
                    let total: u64 = k.parse().ok()?;
                    let frames = v
                        .as_array()?
                        .iter()
                        .map(serde_json::Value::as_u64)
                        .collect::<Option<Vec<u64>>>()?;
                    let sum = frames.iter().try_fold(0u64, |a, &b| a.checked_add(b))?;
                    (!frames.is_empty() && sum == total).then_some(TrailerEntry {
                        frames,
                        chunked: true,
                    })
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn cursor_reads_across_buffer_refills_and_whitespace() {
        let entries: Vec<TrailerEntry> = (0..5000u64)
            .map(|i| {
                if i % 7 == 3 {
                    TrailerEntry {
                        frames: vec![i, i + 1, 2],
                        chunked: true,
                    }
                } else {
                    TrailerEntry {
                        frames: vec![i * 1_000_003],
                        chunked: false,
                    }
                }
            })
            .collect();
        let text = encode_trailer(&entries);
        assert!(text.len() > 4 * TRAILER_BUF);
        assert_eq!(parse_trailer(text.as_bytes(), 0).expect("ok"), entries);
        let spaced = format!(
            " \n{}\t\r\n",
            text.replace(", ", " ,\n ").replace('[', "[ ")
        );
        assert_eq!(parse_trailer(spaced.as_bytes(), 0).expect("ok"), entries);
        assert_eq!(serde_entries(spaced.as_bytes()), Some(entries));
    }

    #[test]
    fn cursor_is_never_laxer_than_serde_json() {
        for bad in [
            "",
            "[",
            "[]]",
            "[] x",
            "[1 2]",
            "[,1]",
            "[1,]",
            "[01]",
            "[1.0]",
            "[1e3]",
            "[-0]",
            "[18446744073709551616]",
            r#"[{"1": []}]"#,
            r#"[{"1": [1],}]"#,
            r#"[{1: [1]}]"#,
            r#"[{"\u0031": [1]}]"#,
            r#"[{"1": [1], "1": [1]}]"#,
            r#"[{"1" [1]}]"#,
            "[true]",
            "[null]",
            r#"[{"1": [1]]"#,
            "[\u{a0}1]",
        ] {
            assert!(
                parse_trailer(bad.as_bytes(), 3).is_err(),
                "accepted {bad:?}"
            );
        }
        for good in [
            "[]",
            " [ ] ",
            "[0]",
            r#"[{"+3": [1, 2]}]"#,
            r#"[{"007": [7]}]"#,
        ] {
            let got = parse_trailer(good.as_bytes(), 0).expect(good);
            assert_eq!(serde_entries(good.as_bytes()), Some(got), "{good}");
        }
    }

    proptest::proptest! {
        /// Whatever the cursor accepts, serde_json reads as the same entries.
        #[test]
        fn cursor_agrees_with_serde(bytes in proptest::collection::vec(
            proptest::sample::select(b"[]{}\",: 0123456789+-.e\"x\n".to_vec()), 0..40)) {
            if let Ok(got) = parse_trailer(&bytes, 0) {
                proptest::prop_assert_eq!(serde_entries(&bytes), Some(got));
            }
        }
    }

    #[test]
    fn chunked_entries_list_at_most_one_frame_per_min_chunk() {
        let entry = |n: usize| {
            let sizes = vec!["20"; n].join(",");
            format!("[{{\"{}\": [{sizes}]}}]", 20 * n)
        };
        let run = |json: &str, length: u64| {
            let bytes = json.as_bytes();
            let mut c = TrailerCursor::new(1000, bytes.len() as u64);
            c.limit_frames(length);
            let mut read = |at: u64, buf: &mut [u8]| -> Result<usize> {
                let at = (at as usize).min(bytes.len());
                let n = buf.len().min(bytes.len() - at);
                buf[..n].copy_from_slice(&bytes[at..at + n]);
                Ok(n)
            };
            c.next_entry(&mut read)
        };
        // 3 MB of data: at most 3,000,000 / 256 KiB + 1 = 12 frames
        let ok = run(&entry(12), 3_000_000)
            .expect("12 frames")
            .expect("entry");
        assert_eq!(ok.frames.len(), 12);
        let e = run(&entry(13), 3_000_000).expect_err("13 frames");
        assert!(e.to_string().contains("more than 12 LZ4 frames"), "{e}");
        assert!(
            matches!(e.kind(), ErrorKind::BadTrailer { offset: 1000, .. }),
            "{e}"
        );
        // the absolute bound holds for any length
        let mut c = TrailerCursor::new(0, 0);
        c.limit_frames(u64::MAX);
        assert_eq!(c.max_frames, MAX_CHUNK_FRAMES);
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
