//! Empty qcow2 overlays over a backing image (instant boot: the overlay takes the
//! guest's writes while every unwritten cluster is read from the backing, which is
//! an NBD export of a restore point). Written by hand because the layout of an empty
//! image is fixed and tiny, and the qcow2 library we use for full restores cannot
//! record a backing file.
//!
//! Layout (cluster size 64 KiB, refcount order 4, qcow2 v3, like `qemu-img create
//! -b <backing> -F raw`): cluster 0 header + backing-format extension + backing name,
//! cluster 1 refcount table, cluster 2 the one refcount block, clusters 3.. the L1
//! table (all zero: nothing allocated, every read falls through to the backing).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const HEADER_LEN: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

/// What an overlay needs to know.
#[derive(Debug, Clone)]
pub struct OverlaySpec<'a> {
    /// Guest-visible size (the backing export's size).
    pub virtual_size: u64,
    /// Backing file name as qemu resolves it: a path or a URI
    /// (`nbd://127.0.0.1:10809/vda`, `nbd+unix:///vda?socket=/run/x.sock`).
    pub backing: &'a str,
    /// Backing format (`raw` for an NBD export).
    pub backing_format: &'a str,
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// The bytes of an empty overlay image (the whole file).
pub fn overlay_image(spec: &OverlaySpec<'_>) -> Result<Vec<u8>> {
    let refused = |m: &str| Err(Error::Unsupported(format!("qcow2 overlay: {m}")));
    if spec.virtual_size == 0 {
        return refused("virtual size is 0");
    }
    if spec.backing.is_empty() || spec.backing.len() > 1023 {
        return refused("backing name must be 1..1023 bytes");
    }
    if spec.backing_format.is_empty() || spec.backing_format.len() > 16 {
        return refused("backing format must be 1..16 bytes");
    }
    // One L2 table maps CLUSTER/8 clusters; one L1 entry per L2 table.
    let per_l2 = CLUSTER * (CLUSTER / 8);
    let l1_entries = spec.virtual_size.div_ceil(per_l2);
    let Ok(l1_size) = u32::try_from(l1_entries) else {
        return refused("virtual size too large");
    };
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    let total_clusters = 3 + l1_clusters;
    // The single refcount block covers CLUSTER/2 clusters (16-bit refcounts).
    if total_clusters > CLUSTER / 2 {
        return refused("virtual size too large for a single refcount block");
    }
    let len = usize::try_from(total_clusters * CLUSTER)
        .map_err(|_| Error::Unsupported("qcow2 overlay: too large".into()))?;
    let mut img = vec![0u8; len];

    let fmt = spec.backing_format.as_bytes();
    let ext_len = 8 + pad8(fmt.len()) + 8; // backing format + end marker
    let backing_offset = HEADER_LEN as usize + ext_len;
    let h = &mut img[..CLUSTER as usize];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[8..16].copy_from_slice(&(backing_offset as u64).to_be_bytes());
    h[16..20].copy_from_slice(&(spec.backing.len() as u32).to_be_bytes());
    h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
    // qemu works in 512-byte sectors and rounds a size up the same way.
    h[24..32].copy_from_slice(
        &spec
            .virtual_size
            .div_ceil(512)
            .saturating_mul(512)
            .to_be_bytes(),
    );
    // 32..36 crypt_method 0
    h[36..40].copy_from_slice(&l1_size.to_be_bytes());
    h[40..48].copy_from_slice(&(3 * CLUSTER).to_be_bytes()); // L1 table
    h[48..56].copy_from_slice(&CLUSTER.to_be_bytes()); // refcount table
    h[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount table clusters
                                                    // 60..64 nb_snapshots, 64..72 snapshots_offset, 72..96 feature bits: all 0
    h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit
    h[100..104].copy_from_slice(&HEADER_LEN.to_be_bytes());
    let mut p = HEADER_LEN as usize;
    h[p..p + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h[p + 4..p + 8].copy_from_slice(&(fmt.len() as u32).to_be_bytes());
    h[p + 8..p + 8 + fmt.len()].copy_from_slice(fmt);
    p += 8 + pad8(fmt.len());
    p += 8; // end-of-extensions: type 0, length 0
    debug_assert_eq!(p, backing_offset);
    h[p..p + spec.backing.len()].copy_from_slice(spec.backing.as_bytes());

    // Refcount table entry 0 → the refcount block in cluster 2.
    let rt = CLUSTER as usize;
    img[rt..rt + 8].copy_from_slice(&(2 * CLUSTER).to_be_bytes());
    // Every metadata cluster is referenced once.
    let rb = 2 * CLUSTER as usize;
    for c in 0..total_clusters as usize {
        img[rb + 2 * c..rb + 2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(img)
}

/// Creates `path` (which must not exist) as an empty overlay and syncs it.
pub fn create_overlay(path: &Path, spec: &OverlaySpec<'_>) -> Result<()> {
    let img = overlay_image(spec)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::target("creating", path, e))?;
    f.write_all(&img)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::target("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64) -> OverlaySpec<'static> {
        OverlaySpec {
            virtual_size: size,
            backing: "nbd://127.0.0.1:10809/vda",
            backing_format: "raw",
        }
    }

    #[test]
    fn header_fields() {
        let img = overlay_image(&spec(10 << 30)).expect("image");
        assert_eq!(&img[0..4], b"QFI\xfb");
        assert_eq!(img.len() as u64, 4 * CLUSTER);
        let off = u64::from_be_bytes(img[8..16].try_into().expect("slice")) as usize;
        let len = u32::from_be_bytes(img[16..20].try_into().expect("slice")) as usize;
        assert_eq!(&img[off..off + len], b"nbd://127.0.0.1:10809/vda");
        assert_eq!(
            u32::from_be_bytes(img[36..40].try_into().expect("slice")),
            20
        ); // 10 GiB / 512 MiB
        assert_eq!(&img[112..115], b"raw");
    }

    /// The header cluster's used bytes, as `xxd`-style hex lines: a change to the
    /// layout must be deliberate (regenerate with VMRESTORE_UPDATE_GOLDEN=1).
    #[test]
    fn header_golden() {
        let img = overlay_image(&spec(10 << 30)).expect("image");
        let mut hex = String::new();
        for (i, line) in img[..160].chunks(16).enumerate() {
            let bytes: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            hex.push_str(&format!("{:08x}: {}\n", i * 16, bytes.join(" ")));
        }
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/overlay-10G-nbd.hex");
        if std::env::var_os("VMRESTORE_UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &hex).expect("write golden");
        }
        assert_eq!(hex, std::fs::read_to_string(&golden).expect("golden"));
    }

    #[test]
    fn refuses_nonsense() {
        assert!(overlay_image(&spec(0)).is_err());
        let long = "x".repeat(2000);
        let s = OverlaySpec {
            backing: &long,
            ..spec(1 << 20)
        };
        assert!(overlay_image(&s).is_err());
        assert!(overlay_image(&spec(u64::MAX)).is_err());
    }

    #[test]
    fn big_disks_get_more_l1_clusters() {
        // 8 TiB: 16384 L1 entries = 2 clusters.
        let img = overlay_image(&spec(8 << 40)).expect("image");
        assert_eq!(img.len() as u64, 5 * CLUSTER);
        let rb = 2 * CLUSTER as usize;
        assert_eq!(&img[rb + 8..rb + 10], &[0, 1]); // cluster 4 referenced
        assert_eq!(&img[rb + 10..rb + 12], &[0, 0]);
    }
}
