//! A target that keeps nothing: every write is checked against the disk size and
//! dropped. With it, [`apply`](crate::apply()) runs the whole restore pass — frame
//! headers, trailer, every payload read and decoded, LZ4 and `.chksum` checks — without
//! an output, which is what a verification of the backup needs: the same code reads
//! the files for a verify as for a restore, so the two cannot disagree.
//!
//! Nothing can be read back: use it with `verify_readback: false`.

use crate::error::{Error, Result};
use crate::target::BlockTarget;

/// A [`BlockTarget`] of a fixed size that discards what is written to it.
#[derive(Debug, Clone, Default)]
pub struct NullTarget {
    size: u64,
    written: u64,
}

impl NullTarget {
    /// A target of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size, written: 0 }
    }

    /// Data bytes written to it so far (and dropped).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Refuses a range past the end, as a real target would.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::internal(format!(
                "internal: write of {len} bytes at {offset} past the end of a {}-byte target",
                self.size
            ))),
        }
    }
}

impl BlockTarget for NullTarget {
    fn size(&self) -> u64 {
        self.size
    }

    /// Nothing is stored, so nothing needs zeroing.
    fn starts_zeroed(&self) -> bool {
        true
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)
    }

    /// Always fails: the content was never kept.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Err(Error::Unsupported(format!(
            "the null target keeps no data: cannot read {} bytes at {offset} (use verify_readback: false)",
            buf.len()
        )))
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};

    use super::NullTarget;
    use crate::apply::ApplyOptions;
    use crate::chain::ChainFile;
    use crate::error::Error;
    use crate::plan::DiskPlan;
    use crate::target::BlockTarget;

    const MIB: u64 = 1 << 20;

    /// A full stream of a 4 MiB disk: 64 KiB of pseudo-random data at 1 MiB (so LZ4
    /// keeps it in one block), a zero frame, 128 KiB of 0x5a at 3 MiB.
    fn stream(compressed: bool) -> Vec<u8> {
        let mut rnd = vec![0u8; 64 << 10];
        let mut x = 0x1234_5678u32;
        for b in &mut rnd {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x.to_le_bytes()[0];
        }
        let frames = [
            WriteFrame::Data(MIB, rnd),
            WriteFrame::Zero(2 * MIB, MIB),
            WriteFrame::Data(3 * MIB, vec![0x5a; 128 << 10]),
        ];
        let opts = StreamOptions::full("vda", 4 * MIB, (64 + 128) << 10);
        let opts = if compressed { opts.compressed(3) } else { opts };
        write_stream(&opts, &frames)
    }

    fn verify_opts() -> ApplyOptions {
        ApplyOptions {
            verify_checksums: true,
            verify_readback: false,
            ..ApplyOptions::default()
        }
    }

    /// The restore pass over one file into a null target.
    fn walk(path: &Path, opts: &ApplyOptions) -> crate::Result<u64> {
        let plan = DiskPlan::from_chain("vda", vec![ChainFile::open(path)?], None)?;
        let size = plan.virtual_size;
        let report = crate::apply(&[plan], vec![Box::new(NullTarget::new(size))], opts)?;
        Ok(report.disks.iter().map(|d| d.bytes_written).sum())
    }

    #[test]
    fn discards_writes_inside_its_size_and_refuses_the_rest() {
        let mut t = NullTarget::new(4096);
        assert!(t.starts_zeroed());
        t.write_at(0, &[1; 4096]).expect("inside");
        t.write_zeroes(4095, 1).expect("inside");
        assert_eq!(t.bytes_written(), 4096);
        assert!(t.write_at(1, &[1; 4096]).is_err());
        assert!(t.write_zeroes(u64::MAX, 2).is_err());
        assert!(t.read_at(0, &mut [0; 8]).is_err());
        t.finish().expect("finish");
    }

    #[test]
    fn the_restore_pass_reads_every_payload_of_a_good_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (compressed, inline) in [(false, 0), (true, 0), (false, 8 * MIB), (true, 8 * MIB)] {
            let p = dir.path().join("vda.full.data");
            std::fs::write(&p, stream(compressed)).expect("write");
            let opts = ApplyOptions {
                inline_max_bytes: inline,
                ..verify_opts()
            };
            assert_eq!(walk(&p, &opts).expect("good stream"), (64 + 128) << 10);
        }
    }

    #[test]
    fn a_flipped_lz4_payload_byte_fails_with_file_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vda.full.data");
        let bytes = stream(true);
        std::fs::write(&p, &bytes).expect("write");
        let frames = ChainFile::open(&p)
            .expect("index")
            .load_frames()
            .expect("frames");
        let first = frames
            .iter()
            .find(|f| f.kind == nbdfmt::FrameKind::Data)
            .expect("a data frame")
            .clone();
        // well inside the first LZ4 frame's block data (past its 19-byte header)
        let at = first.payload_offset + 200;
        for inline in [0, 8 * MIB] {
            let mut damaged = bytes.clone();
            damaged[usize::try_from(at).expect("small")] ^= 0x40;
            std::fs::write(&p, &damaged).expect("write");
            let opts = ApplyOptions {
                inline_max_bytes: inline,
                ..verify_opts()
            };
            match walk(&p, &opts) {
                Err(Error::Backup(e)) => {
                    assert_eq!(e.path(), Some(p.as_path()));
                    assert_eq!(e.offset(), Some(first.payload_offset), "{e}");
                    assert!(matches!(e.kind(), nbdfmt::ErrorKind::Lz4 { .. }), "{e}");
                }
                other => panic!("expected an LZ4 error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_changed_plain_payload_byte_fails_its_chksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vda.full.data");
        let mut bytes = stream(false);
        let stored = nbdfmt::checksum::adler32_of(&bytes[..]).expect("mem");
        std::fs::write(nbdfmt::checksum::chksum_path(&p), stored.to_string()).expect("chksum");
        std::fs::write(&p, &bytes).expect("write");
        assert!(walk(&p, &verify_opts()).is_ok());
        let last = bytes.len() - 200;
        bytes[last] ^= 1; // inside the 0x5a payload
        std::fs::write(&p, &bytes).expect("write");
        match walk(&p, &verify_opts()) {
            Err(Error::Backup(e)) => assert!(
                matches!(e.kind(), nbdfmt::ErrorKind::ChecksumMismatch { stored: s, .. } if *s == stored),
                "{e}"
            ),
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
    }
}
