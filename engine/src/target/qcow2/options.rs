//! Options of a new qcow2 image ([`Qcow2Options`]) and how they come from a source
//! image's `qcow.json`: what this restore can reproduce, and what it refuses.

use crate::error::{Error, Result};

/// qcow2 compatibility level (`compat=` in `qemu-img create`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Compat {
    /// `0.10`: qcow2 version 2 (no zero clusters, 16-bit refcounts, no feature bits).
    V2,
    /// `1.1`: qcow2 version 3 (qemu's default).
    V3,
}

impl Qcow2Compat {
    /// Parses `qemu-img`'s spelling (`0.10`/`1.1`, also `v2`/`v3`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "1.1" | "v3" => Ok(Self::V3),
            "0.10" | "v2" => Ok(Self::V2),
            other => Err(Error::Unsupported(format!(
                "qcow2 compat level {other:?} is not supported (only 0.10 and 1.1)"
            ))),
        }
    }

    /// The name `qemu-img info` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V2 => "0.10",
            Self::V3 => "1.1",
        }
    }
}

/// Compression type recorded in the image header (for clusters a later writer compresses;
/// the restore itself writes no compressed clusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// `zlib` (qcow2's default; header value 0).
    Zlib,
    /// `zstd` (header value 1; needs compat 1.1).
    Zstd,
}

impl CompressionType {
    /// Parses `qemu-img`'s spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "zlib" => Ok(Self::Zlib),
            "zstd" => Ok(Self::Zstd),
            other => Err(Error::Unsupported(format!(
                "qcow2 compression type {other:?} is not supported (only zlib and zstd)"
            ))),
        }
    }

    /// The name `qemu-img info` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }

    /// The value of the header's `compression_type` byte.
    pub(super) fn header_value(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }
}

/// Smallest cluster size qcow2 allows.
pub const MIN_CLUSTER_SIZE: u32 = 512;
/// Largest cluster size qemu (and imago) accept.
pub const MAX_CLUSTER_SIZE: u32 = 2 * 1024 * 1024;

/// Options of a new qcow2 image. [`Default`] is `qemu-img create -f qcow2`'s default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Cluster size in bytes: a power of two in 512 ..= 2 MiB. Default 64 KiB.
    pub cluster_size: u32,
    /// Compatibility level. Default 1.1.
    pub compat: Qcow2Compat,
    /// Set the lazy-refcounts header bit (compat 1.1 only). Default off.
    pub lazy_refcounts: bool,
    /// Compression type in the header. Default zlib.
    pub compression_type: CompressionType,
    /// Refcount width in bits: a power of two in 1 ..= 64; 16 with compat 0.10. Default 16.
    pub refcount_bits: u32,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Self {
            cluster_size: 65_536,
            compat: Qcow2Compat::V3,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            refcount_bits: 16,
        }
    }
}

impl Qcow2Options {
    /// Options reproducing the image described by a `qcow.json` side file.
    ///
    /// Carried over: `cluster-size`, `compat`, `lazy-refcounts`, `compression-type`,
    /// `refcount-bits`; a missing key keeps qemu's default. Refused: `extended-l2`, an external
    /// data file (`data-file` / `data-file-raw`), unknown compat levels and compression types,
    /// and combinations qemu refuses. Not carried over (as with `virtnbdrestore`): the backing
    /// file (the restored image is complete on its own), snapshots and bitmaps.
    pub fn from_qcow_info(info: &nbdfmt::QcowInfo) -> Result<Self> {
        if info.extended_l2 {
            return Err(Error::Unsupported(
                "the source qcow2 image uses extended L2 entries (extended_l2=on), which this restore cannot create".into(),
            ));
        }
        if let Some(data_file) = &info.data_file {
            return Err(Error::Unsupported(format!(
                "the source qcow2 image keeps its data in an external data file (data_file={data_file}), which this restore cannot create"
            )));
        }
        if info.encrypted {
            return Err(Error::Unsupported(
                "the source qcow2 image is encrypted, which this restore cannot create (the backup holds the plain guest data)".into(),
            ));
        }
        if info.data_file_raw {
            return Err(Error::Unsupported(
                "the source qcow2 image uses a raw external data file (data_file_raw=on), which this restore cannot create".into(),
            ));
        }
        let mut opts = Self::default();
        if let Some(cs) = info.cluster_size {
            opts.cluster_size = u32::try_from(cs).map_err(|_| {
                Error::Unsupported(format!("qcow2 cluster size {cs} is not supported"))
            })?;
        }
        if let Some(c) = &info.compat {
            opts.compat = Qcow2Compat::parse(c)?;
        }
        opts.lazy_refcounts = info.lazy_refcounts;
        if let Some(ct) = &info.compression_type {
            opts.compression_type = CompressionType::parse(ct)?;
        }
        if let Some(rb) = info.refcount_bits {
            opts.refcount_bits = u32::try_from(rb).map_err(|_| {
                Error::Unsupported(format!("qcow2 refcount width {rb} bits is not supported"))
            })?;
        }
        opts.validate()?;
        Ok(opts)
    }

    /// Checks that the options describe an image we can create exactly.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(Error::Unsupported(format!(
                "qcow2 cluster size {cs} is not supported (a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE})"
            )));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::Unsupported(format!(
                "qcow2 refcount width {rb} bits is not supported (a power of two from 1 to 64)"
            )));
        }
        if self.compat == Qcow2Compat::V2 {
            if rb != 16 {
                return Err(Error::Unsupported(format!(
                    "qcow2 refcount width {rb} bits needs compat 1.1 (compat 0.10 has 16 bits)"
                )));
            }
            if self.lazy_refcounts {
                return Err(Error::Unsupported(
                    "qcow2 lazy refcounts need compat 1.1, but compat is 0.10".into(),
                ));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(Error::Unsupported(format!(
                    "qcow2 compression type {} needs compat 1.1, but compat is 0.10",
                    self.compression_type.as_str()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn info(json: &str) -> nbdfmt::QcowInfo {
        nbdfmt::QcowInfo::parse(json.as_bytes()).expect("valid qcow.json")
    }

    fn data(fields: &str) -> nbdfmt::QcowInfo {
        info(&format!(
            r#"{{"virtual-size": 1048576, "format": "qcow2", "format-specific": {{"type": "qcow2", "data": {{{fields}}}}}}}"#
        ))
    }

    fn unsupported_message(r: Result<Qcow2Options>) -> String {
        match r {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                e.to_string()
            }
            Ok(o) => panic!("accepted: {o:?}"),
        }
    }

    #[test]
    fn defaults_when_keys_are_missing() {
        assert_eq!(
            Qcow2Options::from_qcow_info(&info("{}")).expect("ok"),
            Qcow2Options::default()
        );
        let d = Qcow2Options::default();
        assert_eq!(
            (
                d.cluster_size,
                d.compat,
                d.lazy_refcounts,
                d.compression_type,
                d.refcount_bits
            ),
            (65_536, Qcow2Compat::V3, false, CompressionType::Zlib, 16)
        );
    }

    #[test]
    fn carries_the_options_over() {
        let j = r#"{"virtual-size": 41943040, "filename": "x", "cluster-size": 131072, "format": "qcow2",
          "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zstd",
          "lazy-refcounts": true, "refcount-bits": 16, "corrupt": false, "extended-l2": false}}}"#;
        let o = Qcow2Options::from_qcow_info(&info(j)).expect("ok");
        assert_eq!(
            o,
            Qcow2Options {
                cluster_size: 131_072,
                compat: Qcow2Compat::V3,
                lazy_refcounts: true,
                compression_type: CompressionType::Zstd,
                refcount_bits: 16
            }
        );
        let o = Qcow2Options::from_qcow_info(&data(r#""compat": "0.10", "refcount-bits": 16"#))
            .expect("ok");
        assert_eq!(o.compat, Qcow2Compat::V2);
        let o = Qcow2Options::from_qcow_info(&data(r#""compat": "1.1", "refcount-bits": 1"#))
            .expect("ok");
        assert_eq!(o.refcount_bits, 1);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "1.1", "extended-l2": true"#,
        )));
        assert!(m.contains("extended_l2"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "1.1", "data-file": "/var/lib/x.raw""#,
        )));
        assert!(m.contains("data_file=/var/lib/x.raw"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "1.1", "data-file-raw": true"#,
        )));
        assert!(m.contains("data_file_raw"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(r#""compat": "2.0""#)));
        assert!(m.contains("compat") && m.contains("2.0"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compression-type": "lz4""#,
        )));
        assert!(m.contains("compression type") && m.contains("lz4"), "{m}");
        for cs in ["256", "4194304", "65537", "8589934592"] {
            let m = unsupported_message(Qcow2Options::from_qcow_info(&info(&format!(
                r#"{{"cluster-size": {cs}}}"#
            ))));
            assert!(m.contains("cluster size"), "{m}");
        }
        for rb in ["0", "3", "128"] {
            let m = unsupported_message(Qcow2Options::from_qcow_info(&data(&format!(
                r#""refcount-bits": {rb}"#
            ))));
            assert!(m.contains("refcount width"), "{m}");
        }
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "0.10", "lazy-refcounts": true"#,
        )));
        assert!(m.contains("lazy refcounts"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "0.10", "compression-type": "zstd""#,
        )));
        assert!(m.contains("zstd"), "{m}");
        let m = unsupported_message(Qcow2Options::from_qcow_info(&data(
            r#""compat": "0.10", "refcount-bits": 64"#,
        )));
        assert!(m.contains("refcount width"), "{m}");
    }
}
