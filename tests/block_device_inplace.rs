//! In-place restore of a VM disk that is a block device (`<disk type='block'>`): a
//! loop device, and an LVM logical volume on a loop device. Root only (loop devices,
//! device-mapper); skipped with a SKIP line otherwise. The VM is a domain of the
//! libvirt test driver whose disk source is the device.

mod clisupport;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use clisupport::{expected_sha256, prepare_backups, Run, Scratch};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// rc-lz4-plain's vda is 32 MiB; the devices are larger (the tail must read as zeros).
const DISK: u64 = 32 * MIB;

fn tool(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn skip(tools: &[&str]) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root".to_owned())
    } else {
        tools
            .iter()
            .find(|t| tool("sh", &["-c", &format!("command -v {t}")]).is_err())
            .map(|t| format!("`{t}` is not installed"))
    };
    if let Some(w) = &why {
        eprintln!("SKIP block-device in-place test: {w}");
    }
    why.is_some()
}

/// A loop device over a file; detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn over(file: &Path) -> Self {
        let dev = tool(
            "losetup",
            &["--find", "--show", file.to_str().expect("utf8")],
        )
        .expect("losetup");
        Self(dev.into())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = tool("losetup", &["-d", self.0.to_str().unwrap_or_default()]);
    }
}

/// Fills `dev` with a 0xEE pattern (so holes and the tail must really be zeroed).
fn junk(dev: &Path) {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .expect("open device");
    let len = device_len(dev);
    let block = vec![0xEEu8; MIB as usize];
    for off in (0..len).step_by(block.len()) {
        let n = usize::try_from((len - off).min(MIB)).expect("size");
        f.write_all_at(&block[..n], off).expect("junk");
    }
    f.sync_all().expect("sync");
}

fn device_len(dev: &Path) -> u64 {
    let mut f = File::open(dev).expect("open");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).expect("seek")
}

fn sha(p: &Path, len: u64) -> String {
    let mut h = Sha256::new();
    let n = std::io::copy(&mut File::open(p).expect("open").take(len), &mut h).expect("hash");
    assert_eq!(n, len);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn zeros_sha(len: u64) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut std::io::repeat(0).take(len), &mut h).expect("hash");
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A test-driver node with `rc-lz4-plain` (shut off) on `dev`, and optionally a
/// running domain `other` on the same device.
fn node(s: &Scratch, dev: &Path, other_running: bool) -> String {
    let dom = |name: &str, state: u8| {
        format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>{name}</name><memory>131072</memory><os><type>hvm</type></os><devices>\
             <disk type='block' device='disk'><source dev='{}'/><target dev='vda'/></disk>\
             </devices><test:runstate>{state}</test:runstate></domain>",
            dev.display()
        )
    };
    let mut x = format!("<node>{}", dom("rc-lz4-plain", 5));
    if other_running {
        x.push_str(&dom("other-vm", 1));
    }
    x.push_str("</node>");
    let f = s.dir.path().join("node.xml");
    fs::write(&f, x).expect("node");
    format!("test://{}", f.display())
}

fn restore(s: &Scratch, uri: &str, extra: &[&str]) -> Run {
    // a private copy per test: restores take the VM's lock under the backup root
    let backups = s.dir.path().join("backups");
    if !backups.exists() {
        prepare_backups(s.dir.path());
    }
    let root = backups.display().to_string();
    let rb = s.dir.path().join("rollback").display().to_string();
    let mut args = vec![
        "--backup-path",
        root.as_str(),
        "--connect",
        uri,
        "--vm",
        "rc-lz4-plain",
        "--disk",
        "vda",
        "--restore-point",
        "3",
    ];
    args.extend_from_slice(extra);
    s.run_env(&args, &[("VMRESTORE_ROLLBACK_DIR", rb.as_str())])
}

/// The whole check on one device: dry run changes nothing, a running user blocks,
/// the restore writes the point and keeps the old content as a rollback image.
fn restore_in_place(s: &Scratch, dev: &Path) {
    junk(dev);
    let len = device_len(dev);
    let before = sha(dev, len);
    let r = restore(s, &node(s, dev, true), &[]);
    assert_eq!(r.code, Some(4), "a running VM uses it\n{}", r.stderr);
    assert!(
        r.stderr.contains("is in use by running VM(s) other-vm"),
        "{}",
        r.stderr
    );
    let uri = node(s, dev, false);
    let r = restore(s, &uri, &["--dry-run"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("[DRY RUN] Would save the current content of block device"),
        "{}",
        r.stderr
    );
    assert_eq!(sha(dev, len), before, "a dry run wrote to the device");
    let r = restore(s, &uri, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        sha(dev, DISK),
        expected_sha256("rc-lz4-plain", "chain", "virtnbdbackup.3", "vda"),
        "the device holds restore point 3"
    );
    let tail = len - DISK;
    let mut t = Sha256::new();
    let mut f = File::open(dev).expect("open");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(DISK)).expect("seek");
    std::io::copy(&mut f.take(tail), &mut t).expect("tail");
    let tail_sha: String = t.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        tail_sha,
        zeros_sha(tail),
        "the device beyond the disk reads as zeros"
    );
    let image = s
        .dir
        .path()
        .join("rollback/rc-lz4-plain-vda.pre-restore.raw");
    assert_eq!(
        sha(&image, len),
        before,
        "the rollback image holds the old content"
    );
    assert!(
        r.stderr.contains(&format!("rm {}", image.display())),
        "{}",
        r.stderr
    );
    // a second restore refuses to overwrite the rollback image
    let r = restore(s, &uri, &[]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(
        r.stderr.contains("Pre-restore file already exists"),
        "{}",
        r.stderr
    );
}

#[test]
fn loop_device_in_place() {
    if skip(&["losetup"]) {
        return;
    }
    let s = Scratch::new();
    let backing = s.dir.path().join("disk.img");
    File::create(&backing)
        .and_then(|f| f.set_len(DISK + 4 * MIB))
        .expect("backing file");
    let dev = Loop::over(&backing);
    restore_in_place(&s, &dev.0);
}

/// LVM on a loop device, kept away from every other device (`--devices`); removed
/// on drop, whatever happened.
struct Lvm {
    pv: Loop,
    vg: String,
}

impl Lvm {
    fn cmd(&self, t: &str, args: &[&str]) -> Result<String, String> {
        let dev = self.pv.0.display().to_string();
        let mut a = vec![
            "--devices",
            dev.as_str(),
            "--config",
            "activation { udev_sync = 0 udev_rules = 0 }",
        ];
        a.extend_from_slice(args);
        tool(t, &a)
    }
}

impl Drop for Lvm {
    fn drop(&mut self) {
        let vg = self.vg.clone();
        let _ = self.cmd("lvremove", &["-f", "-y", &vg]);
        let _ = self.cmd("vgremove", &["-f", "-y", &vg]);
        let pv = self.pv.0.display().to_string();
        let _ = self.cmd("pvremove", &["-f", "-y", &pv]);
    }
}

#[test]
fn lvm_logical_volume_in_place() {
    if skip(&["losetup", "lvcreate"]) {
        return;
    }
    if !fs::read_to_string("/proc/misc")
        .unwrap_or_default()
        .contains("device-mapper")
    {
        eprintln!("SKIP lvm_logical_volume_in_place: no device-mapper in this kernel");
        return;
    }
    let s = Scratch::new();
    let backing = s.dir.path().join("pv.img");
    File::create(&backing)
        .and_then(|f| f.set_len(DISK + 16 * MIB))
        .expect("pv file");
    let lvm = Lvm {
        pv: Loop::over(&backing),
        vg: format!("vmrestore_inplace_{}", std::process::id()),
    };
    let pv = lvm.pv.0.display().to_string();
    lvm.cmd("pvcreate", &["-q", "-y", &pv]).expect("pvcreate");
    lvm.cmd("vgcreate", &["-q", "-s", "1m", &lvm.vg, &pv])
        .expect("vgcreate");
    let size = format!("{}b", DISK + 2 * MIB);
    lvm.cmd(
        "lvcreate",
        &["-q", "-y", "-Wn", "-Zn", "-L", &size, "-n", "disk", &lvm.vg],
    )
    .expect("lvcreate");
    let lv = PathBuf::from(format!("/dev/{}/disk", lvm.vg));
    assert!(lv.exists(), "{} missing", lv.display());
    restore_in_place(&s, &lv);
}

// A device smaller than the disk is refused while planning (exit 4), before any
// rollback image is taken.
#[test]
fn smaller_device_is_refused_before_the_rollback_image() {
    if skip(&["losetup"]) {
        return;
    }
    let s = Scratch::new();
    let backing = s.dir.path().join("small.img");
    File::create(&backing)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("backing");
    let dev = Loop::over(&backing);
    let r = restore(&s, &node(&s, &dev.0, false), &[]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(r.stderr.contains("holds 16777216 bytes"), "{}", r.stderr);
    assert!(
        !s.dir.path().join("rollback").exists(),
        "no rollback image was taken"
    );
}

// An interrupted device restore (its in-progress marker beside the rollback image)
// is never met with "delete the rollback image": the rerun says the device may be
// partial, where its old content is, and how to put it back.
#[test]
fn interrupted_device_restore_names_the_way_back() {
    if skip(&["losetup"]) {
        return;
    }
    let s = Scratch::new();
    let backing = s.dir.path().join("disk.img");
    File::create(&backing)
        .and_then(|f| f.set_len(DISK))
        .expect("backing");
    let dev = Loop::over(&backing);
    let rb = s.dir.path().join("rollback");
    fs::create_dir_all(&rb).expect("mkdir");
    let image = rb.join("rc-lz4-plain-vda.pre-restore.raw");
    fs::write(&image, b"old content").expect("w");
    fs::write(
        rb.join("rc-lz4-plain-vda.pre-restore.raw.in-progress"),
        b"x",
    )
    .expect("w");
    let r = restore(&s, &node(&s, &dev.0, false), &[]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(
        r.stderr.contains("was interrupted") && r.stderr.contains("dd if="),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("delete it first"), "{}", r.stderr);
    assert_eq!(fs::read(&image).expect("image"), b"old content");
    // --no-pre-restore writes the backup again and keeps the image
    let r = restore(&s, &node(&s, &dev.0, false), &["--no-pre-restore"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        sha(&dev.0, DISK),
        expected_sha256("rc-lz4-plain", "chain", "virtnbdbackup.3", "vda")
    );
    assert_eq!(fs::read(&image).expect("image"), b"old content");
}
