//! Issue "CLI" done-criterion: every restore point of every fixture chain restores
//! through the binary with `--skip-config` to exactly the recorded content, and every
//! damaged point is refused with nothing left behind. Runs on a copy of the tree (the
//! lock and the catalogue row are written under the copy's `_state/`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("ls") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
        }
    }
}

fn sha_of_image(img: &Path) -> String {
    let raw = img.with_extension("check.raw");
    assert!(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .expect("qemu-img")
        .success());
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(&raw).expect("raw"), &mut h).expect("hash");
    std::fs::remove_file(&raw).expect("rm");
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_fixture_point_through_skip_config() {
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: qemu-img not installed (apt-get install qemu-utils)");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-chains");
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("real-chains");
    copy_tree(&src.join("backups"), &root.join("backups"));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(src.join("expected/manifest.json")).expect("m"))
            .expect("json");
    let (mut ok, mut refused) = (0, 0);
    for (vm, v) in manifest["vms"].as_object().expect("vms") {
        for chain in v["chains"].as_array().expect("chains") {
            let dir: PathBuf = root.join(chain["dir"].as_str().expect("dir"));
            for rp in chain["restore_points"].as_array().expect("points") {
                if rp.get("interrupted").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                let name = rp["name"].as_str().expect("name");
                let point = name.strip_prefix("virtnbdbackup.").unwrap_or("latest");
                let out = tmp.path().join(format!("out-{}", ok + refused));
                let o = Command::new(env!("CARGO_BIN_EXE_vmrestore"))
                    .arg("--vm")
                    .arg(&dir)
                    .arg("--restore-path")
                    .arg(&out)
                    .args([
                        "--skip-config",
                        "--restore-point",
                        point,
                        "--connect",
                        "test:///default",
                    ])
                    .env("LOG_DIR", tmp.path().join("logs"))
                    .output()
                    .expect("run");
                let code = o.status.code();
                let stderr = String::from_utf8_lossy(&o.stderr);
                match rp["expect"].as_str() {
                    Some("ok") => {
                        assert_eq!(code, Some(0), "{vm} {} {name}: {stderr}", chain["key"]);
                        let files: Vec<PathBuf> = std::fs::read_dir(&out)
                            .expect("out")
                            .map(|e| e.expect("e").path())
                            .collect();
                        for (disk, want) in rp["disks"].as_object().expect("disks") {
                            let f = files
                                .iter()
                                .find(|f| {
                                    let n = f
                                        .file_name()
                                        .map(|n| n.to_string_lossy().into_owned())
                                        .unwrap_or_default();
                                    n.ends_with(&format!("-{disk}.qcow2"))
                                        || n == format!("{disk}.qcow2")
                                })
                                .unwrap_or_else(|| {
                                    panic!("{vm} {name}: no image for {disk} in {files:?}")
                                });
                            assert_eq!(
                                sha_of_image(f),
                                want["sha256"].as_str().expect("sha"),
                                "{vm} {} {name} {disk}",
                                chain["key"]
                            );
                        }
                        ok += 1;
                    }
                    Some("error" | "degraded") => {
                        assert_ne!(
                            code,
                            Some(0),
                            "{vm} {} {name} must be refused",
                            chain["key"]
                        );
                        assert!(
                            matches!(code, Some(4..=6)),
                            "{vm} {name}: exit {code:?}: {stderr}"
                        );
                        let left = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
                        assert_eq!(left, 0, "{vm} {name}: files left behind");
                        refused += 1;
                    }
                    other => panic!("unexpected expect {other:?}"),
                }
            }
        }
    }
    assert!(ok > 100 && refused >= 10, "ok {ok}, refused {refused}");
}
