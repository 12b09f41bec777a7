//! Every restore point of the real fixture chains, restored into qcow2 with the
//! options of the newest qcow.json at that point: `qemu-img check` is clean,
//! `qemu-img info` shows the cluster size and compat of the source, and the guest
//! content (`qemu-img convert -O raw`) has the recorded sha256. qemu-img is used to
//! check results only; the engine never runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::target::qcow2::{Qcow2Options, Qcow2Target};
use engine::{apply, ApplyOptions, DiskPlan, StagedPath};
use nbdfmt::BackupSet;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img not installed (apt-get install qemu-utils)");
    }
    ok
}

fn guest_sha256(img: &Path, tmp: &Path) -> String {
    let raw = tmp.join("guest.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(&raw).expect("raw"), &mut h).expect("hash");
    std::fs::remove_file(&raw).expect("rm");
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn every_ok_point_restores_to_a_clean_qcow2_with_source_options() {
    if !qemu_img() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-chains");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(root.join("expected/manifest.json")).expect("m"))
            .expect("json");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut checked = 0;
    for (vm, v) in manifest["vms"].as_object().expect("vms") {
        for chain in v["chains"].as_array().expect("chains") {
            let set =
                BackupSet::scan(&root.join(chain["dir"].as_str().expect("dir"))).expect("scan");
            for rp in chain["restore_points"].as_array().expect("points") {
                if rp["expect"].as_str() != Some("ok") {
                    continue;
                }
                let name = rp["name"].as_str().expect("name");
                let n = if name == "copy" {
                    0
                } else {
                    nbdfmt::sidecar::checkpoint_number(name).expect("n")
                };
                for (disk, want) in rp["disks"].as_object().expect("disks") {
                    let plan = DiskPlan::for_point(&set, disk, n).expect("plan");
                    let info = plan.qcow.clone().expect("qcow.json present for ok points");
                    let opts = Qcow2Options::from_qcow_info(&info).expect("options");
                    let out: PathBuf = tmp.path().join(format!("{vm}-{disk}-{n}.qcow2"));
                    let staged = StagedPath::new(&out);
                    let t = Qcow2Target::create(staged.temp_path(), plan.virtual_size, &opts)
                        .expect("create");
                    // Odd points through the threaded pipeline, even ones inline.
                    let opts = ApplyOptions {
                        inline_max_bytes: if n % 2 == 1 {
                            0
                        } else {
                            engine::apply::INLINE_MAX_BYTES
                        },
                        ..ApplyOptions::default()
                    };
                    apply(&[plan], vec![Box::new(t)], &opts).expect("apply");
                    staged.commit(false).expect("commit");
                    let check = Command::new("qemu-img")
                        .arg("check")
                        .arg(&out)
                        .output()
                        .expect("check");
                    assert!(
                        check.status.success(),
                        "{vm} {name} {disk}: {}",
                        String::from_utf8_lossy(&check.stdout)
                    );
                    let info_out = Command::new("qemu-img")
                        .args(["info", "--output=json"])
                        .arg(&out)
                        .output()
                        .expect("info");
                    let got: Value = serde_json::from_slice(&info_out.stdout).expect("info json");
                    assert_eq!(
                        got["cluster-size"].as_u64(),
                        info.cluster_size,
                        "{vm} {name} {disk}"
                    );
                    assert_eq!(
                        got["format-specific"]["data"]["compat"].as_str(),
                        info.compat.as_deref()
                    );
                    assert_eq!(
                        got["format-specific"]["data"]["lazy-refcounts"].as_bool(),
                        Some(info.lazy_refcounts)
                    );
                    assert_eq!(
                        guest_sha256(&out, tmp.path()),
                        want["sha256"].as_str().expect("sha"),
                        "{vm} {name} {disk}"
                    );
                    std::fs::remove_file(&out).expect("rm");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 120, "{checked} disk images checked");
}

/// A 4 GiB disk holding 100 MiB of data restores to a qcow2 file of about 100 MiB.
#[test]
fn thin_output_for_a_sparse_disk() {
    use nbdfmt::writer::{StreamOptions, StreamWriter};
    let tmp = tempfile::tempdir().expect("tmp");
    let size = 4u64 << 30;
    let data = 100u64 << 20;
    let full = tmp.path().join("vda.full.data");
    {
        let f = std::io::BufWriter::new(std::fs::File::create(&full).expect("create"));
        let mut w = StreamWriter::new(f, &StreamOptions::full("vda", size, data)).expect("meta");
        let mut pos = 0u64;
        let mut seed = 1u64;
        // 100 extents of 1 MiB random data, spread over the disk, zero frames between
        for i in 0..100u64 {
            let start = i * (size / 100);
            if start > pos {
                w.zero(pos, start - pos).expect("zero");
            }
            let buf: Vec<u8> = (0..1 << 20)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            w.data(start, &buf).expect("data");
            pos = start + (1 << 20);
        }
        w.zero(pos, size - pos).expect("zero");
        w.finish().expect("finish");
    }
    let plan = DiskPlan::from_paths("vda", &[full], None).expect("plan");
    let out = tmp.path().join("vda.qcow2");
    let t = Qcow2Target::create(&out, size, &Qcow2Options::default()).expect("create");
    apply(&[plan], vec![Box::new(t)], &ApplyOptions::default()).expect("apply");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).expect("md").blocks() * 512;
    assert!(
        allocated < data + (8 << 20),
        "qcow2 allocates {allocated} bytes for {data} bytes of data"
    );
    assert!(allocated >= data, "qcow2 allocates {allocated} bytes");
}

#[test]
fn encrypted_source_image_is_refused() {
    let info = nbdfmt::QcowInfo::parse(br#"{"virtual-size": 1048576, "cluster-size": 65536, "format": "qcow2", "encrypted": true,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "encrypt": {"format": "luks"}}}}"#)
    .expect("parse");
    assert!(info.encrypted);
    let e = Qcow2Options::from_qcow_info(&info).expect_err("refused");
    assert!(e.to_string().contains("encrypted"), "{e}");
}
