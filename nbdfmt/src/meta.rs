//! The meta frame's JSON (`StreamMeta`), identical in virtnbdbackup 1.9.15 and 2.47.

use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind, Result};

/// The JSON object type of [`StreamMeta::raw`].
pub type JsonMap = Map<String, Value>;

/// Longest meta JSON we accept. Real ones are ~330 bytes; the cap keeps a hostile
/// header from making us allocate gigabytes.
pub const MAX_META_LEN: u64 = 64 * 1024;

/// How the data payloads of a stream are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw payloads.
    None,
    /// One LZ4 frame (or several, for extents of 32 MiB or more) per data frame.
    /// `level` is the `-z` level when the meta records one (`true` in 0.22–1.8 streams).
    Lz4 {
        /// Compression level, when recorded.
        level: Option<i64>,
    },
}

/// Parsed stream metadata. `raw` keeps the object exactly as read (key order
/// included) for `--dump`.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamMeta {
    /// Disk size in bytes at backup time.
    pub virtual_size: u64,
    /// Sum of the lengths of all data frames.
    pub data_size: u64,
    /// `datetime.isoformat()` local time, no zone, fraction optional.
    pub date: String,
    /// Disk target (`vda`).
    pub disk_name: String,
    /// `qcow2` unless the stream says otherwise (pre-0.49 streams lack the key).
    pub disk_format: String,
    /// Checkpoint this backup created (diff: the *next* inc's name).
    pub checkpoint_name: String,
    /// Parent checkpoint; `None` for full/copy/fallback-full (`""` or `false`).
    pub parent_checkpoint: Option<String>,
    /// True for inc and diff streams.
    pub incremental: bool,
    /// `streamVersion` (or the older `stream-version`).
    pub stream_version: u64,
    /// Payload storage.
    pub compression: Compression,
    /// The JSON object as found.
    pub raw: Map<String, Value>,
}

impl StreamMeta {
    /// Parses the JSON text of a meta frame; `offset` is where the JSON starts in the file.
    pub fn parse(json: &[u8], offset: u64) -> Result<Self> {
        let bad = |reason: String| Error::from(ErrorKind::BadMeta { offset, reason });
        let value: Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        let Value::Object(raw) = value else {
            return Err(bad("not a JSON object".into()));
        };
        // read in this order: the first key that is wrong is the one reported
        let fields = Fields {
            raw: &raw,
            bad: &bad,
        };
        let virtual_size = fields.unsigned("virtualSize")?;
        let data_size = fields.unsigned("dataSize")?;
        let date = fields.date()?;
        let disk_name = fields.string("diskName")?;
        if disk_name.is_empty() {
            return Err(bad("diskName is empty".into()));
        }
        let disk_format = match raw.get("diskFormat") {
            None => "qcow2".to_owned(),
            Some(v) => v
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad("diskFormat is not a string".into()))?,
        };
        let checkpoint_name = fields.string("checkpointName")?;
        let parent_checkpoint = fields.parent()?;
        let incremental = raw
            .get("incremental")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("key \"incremental\" missing or not a boolean".into()))?;
        let (stream_version, compression) = fields.compression()?;
        if incremental && parent_checkpoint.is_none() {
            return Err(bad("incremental stream without a parentCheckpoint".into()));
        }
        Ok(Self {
            virtual_size,
            data_size,
            date,
            disk_name,
            disk_format,
            checkpoint_name,
            parent_checkpoint,
            incremental,
            stream_version,
            compression,
            raw,
        })
    }

    /// True when payloads are LZ4 frames and a trailer ends the file.
    pub fn is_compressed(&self) -> bool {
        self.compression != Compression::None
    }

    /// True for a stream that can start a chain (full, copy, or a fallback full
    /// written under an incremental file name).
    pub fn is_base(&self) -> bool {
        !self.incremental && self.parent_checkpoint.is_none()
    }

    /// The date as (year, month, day, hour, minute, second, microsecond).
    pub fn date_parts(&self) -> Option<DateParts> {
        parse_date(&self.date)
    }
}

/// The keys of a meta frame's JSON object, each read with the error that names it.
struct Fields<'a> {
    raw: &'a JsonMap,
    bad: &'a dyn Fn(String) -> Error,
}

impl Fields<'_> {
    fn unsigned(&self, k: &str) -> Result<u64> {
        self.raw
            .get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| (self.bad)(format!("key {k:?} missing or not an unsigned integer")))
    }

    fn string(&self, k: &str) -> Result<String> {
        self.raw
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| (self.bad)(format!("key {k:?} missing or not a string")))
    }

    /// `date`, when present, as virtnbdbackup writes it (empty when absent).
    fn date(&self) -> Result<String> {
        match self.raw.get("date") {
            None => Ok(String::new()),
            Some(Value::String(s)) if parse_date(s).is_some() => Ok(s.clone()),
            Some(Value::String(s)) => Err((self.bad)(format!(
                "date {s:?} is not YYYY-MM-DDTHH:MM:SS[.ffffff]"
            ))),
            Some(_) => Err((self.bad)("key \"date\" is not a string".into())),
        }
    }

    /// `parentCheckpoint`: a name, or none (`false`, `null`, empty or absent).
    fn parent(&self) -> Result<Option<String>> {
        match self.raw.get("parentCheckpoint") {
            None | Some(Value::Bool(false)) | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err((self.bad)(
                "parentCheckpoint is neither a string nor false".into(),
            )),
        }
    }

    /// The stream version and its compression: only version 2 streams compress, and
    /// only with LZ4. The older key `stream-version` wins, as in virtnbdbackup's own
    /// `isCompressed()`.
    fn compression(&self) -> Result<(u64, Compression)> {
        let version = match self
            .raw
            .get("stream-version")
            .or_else(|| self.raw.get("streamVersion"))
        {
            None => 1,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| (self.bad)("streamVersion is not an unsigned integer".into()))?,
        };
        if version != 2 {
            return Ok((version, Compression::None));
        }
        let compression = match self.raw.get("compressed").unwrap_or(&Value::Bool(false)) {
            Value::Bool(false) => Compression::None,
            Value::Bool(true) => Compression::Lz4 { level: None },
            Value::Number(n) => Compression::Lz4 { level: n.as_i64() },
            other => {
                return Err((self.bad)(format!(
                    "compressed is {other}, expected false, true or a level"
                )))
            }
        };
        if let Some(m) = self.raw.get("compressionMethod").and_then(Value::as_str) {
            if compression != Compression::None && m != "lz4" {
                return Err((self.bad)(format!("unsupported compressionMethod {m:?}")));
            }
        }
        Ok((version, compression))
    }
}

/// A calendar date and time without a zone, as virtnbdbackup writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateParts {
    /// Year.
    pub year: u32,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
    /// 0–23.
    pub hour: u32,
    /// 0–59.
    pub minute: u32,
    /// 0–60.
    pub second: u32,
    /// 0–999999; 0 when the fraction was left out.
    pub micros: u32,
}

/// Parses `YYYY-MM-DDTHH:MM:SS` with an optional `.ffffff` fraction (1–6 digits).
pub fn parse_date(s: &str) -> Option<DateParts> {
    let b = s.as_bytes();
    // ASCII up to the seconds, so that the slices below fall on char boundaries.
    if b.len() < 19
        || !b[..19].is_ascii()
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = &s[r];
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let micros = match &s[19..] {
        "" => 0,
        frac => {
            let digits = frac.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            let v: u32 = digits.parse().ok()?;
            v * 10u32.pow(6 - digits.len() as u32)
        }
    };
    let d = DateParts {
        year: num(0..4)?,
        month: num(5..7)?,
        day: num(8..10)?,
        hour: num(11..13)?,
        minute: num(14..16)?,
        second: num(17..19)?,
        micros,
    };
    let valid = (1..=12).contains(&d.month)
        && (1..=31).contains(&d.day)
        && d.hour < 24
        && d.minute < 60
        && d.second <= 60;
    valid.then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V247_FULL: &str = r#"{
    "virtualSize": 67108864,
    "dataSize": 1114112,
    "date": "2026-11-26T04:09:50.926775",
    "diskName": "vda",
    "diskFormat": "qcow2",
    "checkpointName": "virtnbdbackup.0",
    "compressed": false,
    "compressionMethod": "lz4",
    "parentCheckpoint": "",
    "incremental": false,
    "streamVersion": 2
}"#;

    #[test]
    fn parses_uncompressed_full() {
        let m = StreamMeta::parse(V247_FULL.as_bytes(), 40).expect("valid");
        assert_eq!(m.virtual_size, 67_108_864);
        assert_eq!(m.compression, Compression::None);
        assert!(m.is_base());
        assert_eq!(m.parent_checkpoint, None);
        assert_eq!(m.date_parts().map(|d| d.micros), Some(926_775));
        // key order is kept for --dump
        assert_eq!(m.raw.keys().next().map(String::as_str), Some("virtualSize"));
    }

    #[test]
    fn compressed_variants() {
        let level = V247_FULL.replace("\"compressed\": false", "\"compressed\": 9");
        assert_eq!(
            StreamMeta::parse(level.as_bytes(), 0)
                .expect("ok")
                .compression,
            Compression::Lz4 { level: Some(9) }
        );
        let old = V247_FULL.replace("\"compressed\": false", "\"compressed\": true");
        assert_eq!(
            StreamMeta::parse(old.as_bytes(), 0)
                .expect("ok")
                .compression,
            Compression::Lz4 { level: None }
        );
        // compressed: 0 still counts as compressed (virtnbdbackup's isCompressed)
        let zero = V247_FULL.replace("\"compressed\": false", "\"compressed\": 0");
        assert!(StreamMeta::parse(zero.as_bytes(), 0)
            .expect("ok")
            .is_compressed());
        // version 1 streams are never compressed
        let v1 = level.replace("\"streamVersion\": 2", "\"stream-version\": 1");
        assert!(!StreamMeta::parse(v1.as_bytes(), 0)
            .expect("ok")
            .is_compressed());
    }

    #[test]
    fn date_without_fraction_and_old_parent() {
        let s = V247_FULL
            .replace("04:09:50.926775", "04:09:50")
            .replace("\"parentCheckpoint\": \"\"", "\"parentCheckpoint\": false")
            .replace("    \"diskFormat\": \"qcow2\",\n", "");
        let m = StreamMeta::parse(s.as_bytes(), 0).expect("ok");
        assert_eq!(m.date_parts().map(|d| (d.second, d.micros)), Some((50, 0)));
        assert_eq!(m.disk_format, "qcow2");
        assert!(m.is_base());
    }

    #[test]
    fn errors_carry_the_offset() {
        for bad in [
            "{",
            "[]",
            "{\"virtualSize\": -1}",
            &V247_FULL.replace("\"incremental\": false", "\"incremental\": true"),
        ] {
            let e = StreamMeta::parse(bad.as_bytes(), 40).expect_err("invalid");
            assert_eq!(e.offset(), Some(40), "{e}");
        }
        assert!(parse_date("2026-13-01T00:00:00").is_none());
        assert!(parse_date("2026-01-01T00:00:00.").is_none());
        assert!(parse_date("2026-01-01T00:00:00.1234567").is_none());
    }

    #[test]
    fn regression_non_ascii_date_is_an_error_not_a_panic() {
        // found while writing the meta_json fuzz target: byte 19 inside a two-byte 'é'
        // made `&s[19..]` panic
        assert!(parse_date("2026-01-01T00:00:0\u{e9}").is_none());
        assert!(parse_date("2026-01-01T00:00:00\u{e9}").is_none());
        assert!(parse_date("\u{e9}026-01-01T00:00:00").is_none());
        let s = V247_FULL.replace("04:09:50.926775", "04:09:5\u{e9}");
        let e = StreamMeta::parse(s.as_bytes(), 40).expect_err("bad date");
        assert!(
            matches!(e.kind(), ErrorKind::BadMeta { offset: 40, .. }),
            "{e}"
        );
    }
}
