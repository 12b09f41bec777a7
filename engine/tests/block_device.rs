//! Restores into real block devices (loop devices, an LVM logical volume) and rollback
//! images of them. Root only: every test prints `SKIP: …` and passes when not run as
//! root or when a tool it needs (`losetup`, LVM with device-mapper, `mkfs.ext4`) is
//! missing. Every loop device, LV, VG and PV is removed by a guard's `Drop`, also when
//! the test fails.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use engine::target::raw::{block_device_size, RawTarget};
use engine::{apply, save_device_image, ApplyOptions, Cancel, DiskPlan, ErrorKind};
use nbdfmt::BackupSet;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-chains")
}

/// Runs a tool; `Err(stderr)` when it cannot start or fails.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `Some(reason)` when this test cannot run here.
fn unavailable(tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (loop devices)".into());
    }
    tools
        .iter()
        .find(|t| run(t, &["--version"]).is_err() && run(t, &["-V"]).is_err())
        .map(|t| format!("`{t}` is not installed"))
}

macro_rules! require {
    ($($tool:expr),*) => {
        if let Some(why) = unavailable(&[$($tool),*]) {
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

/// A loop device over a file; detached on drop.
struct Loop {
    dev: PathBuf,
    backing: PathBuf,
}

impl Loop {
    fn attach(backing: &Path) -> Self {
        let b = backing.to_str().expect("utf8 path");
        let mut last = String::new();
        // `--find` can race with other users of loop devices: retry
        for _ in 0..5 {
            match run("losetup", &["--find", "--show", b]) {
                Ok(dev) => {
                    return Self {
                        dev: dev.into(),
                        backing: backing.to_path_buf(),
                    }
                }
                Err(e) => last = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("cannot attach a loop device: {last}");
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Err(e) = run("losetup", &["-d", self.dev.to_str().unwrap_or_default()]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A sparse file of `size` bytes whose 64 KiB blocks hold 0xEE patterns, except every
/// third one (a hole), attached as a loop device.
fn patterned_loop(dir: &Path, name: &str, size: u64) -> Loop {
    let p = dir.join(name);
    let f = File::create(&p).expect("create");
    f.set_len(size).expect("size");
    let mut block = vec![0u8; 64 << 10];
    for (i, off) in (0..size).step_by(block.len()).enumerate() {
        if i % 3 == 2 {
            continue;
        }
        for (j, b) in block.iter_mut().enumerate() {
            *b = if j % 512 == 0 { i as u8 } else { 0xEE };
        }
        let n = usize::try_from(size - off).map_or(block.len(), |r| r.min(block.len()));
        std::os::unix::fs::FileExt::write_all_at(&f, &block[..n], off).expect("fill");
    }
    f.sync_all().expect("sync");
    Loop::attach(&p)
}

/// sha256 of the first `len` bytes of `p` (a file or device) and of `pad` zero bytes
/// after them.
fn sha256_of(p: &Path, len: u64, pad: u64) -> String {
    let mut h = Sha256::new();
    let f = File::open(p).expect("open");
    let n = std::io::copy(&mut f.take(len), &mut h).expect("hash");
    assert_eq!(n, len, "{} is shorter than {len}", p.display());
    std::io::copy(&mut std::io::repeat(0).take(pad), &mut h).expect("pad");
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

/// The recorded sha256 of `disk` at restore point `point` of the chain in `dir`.
fn expected_sha(dir: &str, point: &str, disk: &str) -> String {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("expected/manifest.json")).expect("manifest"),
    )
    .expect("json");
    for v in m["vms"].as_object().expect("vms").values() {
        for c in v["chains"].as_array().expect("chains") {
            if c["dir"] != dir {
                continue;
            }
            for rp in c["restore_points"].as_array().expect("points") {
                if rp["name"] == point {
                    return rp["disks"][disk]["sha256"]
                        .as_str()
                        .expect("sha")
                        .to_string();
                }
            }
        }
    }
    panic!("{dir} {point} {disk} not in the manifest");
}

fn plan(dir: &str, n: u32) -> DiskPlan {
    let set = BackupSet::scan(&fixtures().join(dir)).expect("scan");
    DiskPlan::for_point(&set, "vda", n).expect("plan")
}

fn opts(inline: bool) -> ApplyOptions {
    ApplyOptions {
        inline_max_bytes: if inline {
            engine::apply::INLINE_MAX_BYTES
        } else {
            0
        },
        ..ApplyOptions::default()
    }
}

/// Restores `dir` point `n` into the device; checks the report.
fn restore_into_device(dev: &Path, dir: &str, n: u32, inline: bool) -> engine::DiskReport {
    let p = plan(dir, n);
    let t = RawTarget::open_block_device_for_disk(dev, p.virtual_size).expect("open device");
    let mut r = apply(&[p], vec![Box::new(t)], &opts(inline)).expect("apply");
    let d = r.disks.remove(0);
    assert!(d.readback_verified, "read-back ran on the device");
    assert!(d.bytes_zeroed > 0, "holes were zeroed: {d:?}");
    assert_eq!(d.bytes_zero_skipped, 0, "a device is never skipped: {d:?}");
    d
}

/// The same restore into a new sparse file: its sha256.
fn restore_into_file(dir: &str, n: u32, tmp: &Path) -> String {
    let p = plan(dir, n);
    let out = tmp.join(format!("file-{n}.raw"));
    let size = p.virtual_size;
    let t = RawTarget::create(&out, size).expect("create");
    apply(&[p], vec![Box::new(t)], &opts(true)).expect("apply");
    sha256_of(&out, size, 0)
}

const ACC: &str = "backups/rc-acc-files";
const LZ4: &str = "backups/rc-lz4-plain/chain";

#[test]
fn loop_device_restore_equals_file_restore() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    for (dir, n, inline) in [
        (ACC, 4, true),
        (ACC, 2, false),
        (LZ4, 3, false),
        (LZ4, 1, true),
    ] {
        let size = plan(dir, n).virtual_size;
        let lo = patterned_loop(tmp.path(), &format!("lo-{n}.img"), size);
        assert_eq!(block_device_size(&lo.dev).expect("size"), size);
        restore_into_device(&lo.dev, dir, n, inline);
        let want = expected_sha(dir, &format!("virtnbdbackup.{n}"), "vda");
        assert_eq!(
            restore_into_file(dir, n, tmp.path()),
            want,
            "{dir} {n} file"
        );
        // the whole device, read back through a fresh descriptor, and the file under
        // it (the restore's sync pushed everything through the loop driver)
        assert_eq!(sha256_of(&lo.dev, size, 0), want, "{dir} {n} device");
        assert_eq!(
            sha256_of(&lo.backing, size, 0),
            want,
            "{dir} {n} backing file"
        );
    }
}

/// A device larger than the disk: its tail is zeroed, so the whole device reads as the
/// restored disk followed by zeroes (no 0xEE survives).
#[test]
fn larger_device_reads_as_the_disk_then_zeroes() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let size = plan(ACC, 3).virtual_size;
    // not a multiple of the zeroing block: exercises the unaligned edge
    let dev_size = size + 5 * MIB + 3 * 512;
    let lo = patterned_loop(tmp.path(), "big.img", dev_size);
    assert_eq!(block_device_size(&lo.dev).expect("size"), dev_size);
    restore_into_device(&lo.dev, ACC, 3, false);
    let want = expected_sha(ACC, "virtnbdbackup.3", "vda");
    assert_eq!(sha256_of(&lo.dev, size, 0), want);
    assert_eq!(
        sha256_of(&lo.dev, dev_size, 0),
        sha_with_zero_tail(ACC, 3, tmp.path(), dev_size - size),
        "device = disk + zero tail"
    );
    let mut tail = Vec::new();
    let mut f = File::open(&lo.dev).expect("open");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(size)).expect("seek");
    f.read_to_end(&mut tail).expect("read tail");
    assert_eq!(tail.len() as u64, dev_size - size);
    assert!(tail.iter().all(|&b| b == 0), "tail not zeroed");
}

/// `open_block_device` (the device as a target of its own size) leaves the tail
/// beyond a smaller disk as it was.
#[test]
fn whole_device_target_leaves_the_tail() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let p = plan(ACC, 3);
    let size = p.virtual_size;
    let dev_size = size + 2 * MIB;
    let lo = patterned_loop(tmp.path(), "whole.img", dev_size);
    let tail_before = {
        let mut f = File::open(&lo.dev).expect("open");
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(size)).expect("seek");
        let mut v = Vec::new();
        f.read_to_end(&mut v).expect("read");
        v
    };
    assert!(tail_before.contains(&0xEE));
    let t = RawTarget::open_block_device(&lo.dev).expect("open");
    assert_eq!(engine::BlockTarget::size(&t), dev_size);
    apply(&[p], vec![Box::new(t)], &opts(false)).expect("apply");
    let want = expected_sha(ACC, "virtnbdbackup.3", "vda");
    assert_eq!(sha256_of(&lo.dev, size, 0), want);
    let mut f = File::open(&lo.dev).expect("open");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(size)).expect("seek");
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).expect("read");
    assert_eq!(tail, tail_before);
}

fn sha_with_zero_tail(dir: &str, n: u32, tmp: &Path, tail: u64) -> String {
    let p = plan(dir, n);
    let out = tmp.join(format!("tail-{n}.raw"));
    let size = p.virtual_size;
    let t = RawTarget::create(&out, size).expect("create");
    apply(&[p], vec![Box::new(t)], &opts(true)).expect("apply");
    sha256_of(&out, size, tail)
}

/// A device smaller than the disk is refused before anything is written.
#[test]
fn smaller_device_is_refused_untouched() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let size = plan(ACC, 1).virtual_size;
    let lo = patterned_loop(tmp.path(), "small.img", size - MIB);
    let before = sha256_of(&lo.dev, size - MIB, 0);
    let e = RawTarget::open_block_device_for_disk(&lo.dev, size).expect_err("too small");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(
        e.to_string().contains(lo.dev.to_str().expect("utf8")),
        "{e}"
    );
    assert_eq!(sha256_of(&lo.dev, size - MIB, 0), before);
}

/// An LVM VG on a loop device with one LV; `Drop` removes LV, VG, PV and the loop
/// device in that order, whatever was created.
struct Lvm {
    vg: String,
    lv: Option<PathBuf>,
    vg_made: bool,
    pv_made: bool,
    pv: Loop,
}

impl Lvm {
    /// `--devices` keeps LVM away from every other device on the machine.
    fn cmd(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let dev = self.pv.dev.to_str().unwrap_or_default().to_string();
        let mut a = vec![
            "--devices",
            &dev,
            "--config",
            "activation { udev_sync = 0 udev_rules = 0 }",
        ];
        a.extend_from_slice(args);
        run(tool, &a)
    }
}

impl Drop for Lvm {
    fn drop(&mut self) {
        let vg = self.vg.clone();
        let steps: [(bool, &str, Vec<&str>); 3] = [
            (self.lv.is_some(), "lvremove", vec!["-f", "-y", &vg]),
            (self.vg_made, "vgremove", vec!["-f", "-y", &vg]),
            (
                self.pv_made,
                "pvremove",
                vec!["-f", "-y", self.pv.dev.to_str().unwrap_or_default()],
            ),
        ];
        for (made, tool, args) in steps {
            if made {
                if let Err(e) = self.cmd(tool, &args) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
        // then `pv` drops: losetup -d
    }
}

#[test]
fn lvm_logical_volume_restore_equals_file_restore() {
    require!("losetup", "lvcreate");
    let tmp = tempfile::tempdir().expect("tmp");
    let size = plan(LZ4, 3).virtual_size;
    let backing = tmp.path().join("pv.img");
    File::create(&backing)
        .and_then(|f| f.set_len(size + 16 * MIB))
        .expect("pv file");
    let vg = format!("vmrestore_test_{}", std::process::id());
    let mut lvm = Lvm {
        vg: vg.clone(),
        lv: None,
        vg_made: false,
        pv_made: false,
        pv: Loop::attach(&backing),
    };
    let pv = lvm.pv.dev.to_str().expect("utf8").to_string();
    lvm.cmd("pvcreate", &["-q", "-y", &pv]).expect("pvcreate");
    lvm.pv_made = true;
    lvm.cmd("vgcreate", &["-q", "-s", "1m", &vg, &pv])
        .expect("vgcreate");
    lvm.vg_made = true;
    let lv_size = format!("{}b", size + 2 * MIB);
    match lvm.cmd(
        "lvcreate",
        &["-q", "-y", "-Wn", "-Zn", "-L", &lv_size, "-n", "disk", &vg],
    ) {
        Ok(_) => lvm.lv = Some(PathBuf::from(format!("/dev/{vg}/disk"))),
        Err(e)
            if !std::fs::read_to_string("/proc/misc")
                .unwrap_or_default()
                .contains("device-mapper") =>
        {
            drop(lvm);
            // the guard removed what was made
            let vgs = run("vgs", &["--noheadings", "-o", "vg_name"]).unwrap_or_default();
            assert!(!vgs.contains(&vg), "VG left behind: {vgs}");
            assert!(!run("losetup", &["-a"])
                .unwrap_or_default()
                .contains(backing.to_str().expect("utf8")));
            eprintln!(
                "SKIP lvm_logical_volume_restore_equals_file_restore: this kernel has no \
                 device-mapper (no `device-mapper` in /proc/misc), so an LV cannot be \
                 activated; PV and VG were created and removed. lvcreate said: {e}"
            );
            return;
        }
        Err(e) => panic!("{e}"),
    }
    let lv = lvm.lv.clone().expect("lv");
    let lv_size = block_device_size(&lv).expect("size");
    assert!(lv_size >= size + 2 * MIB, "{lv_size}");
    // old content everywhere, so holes and the tail must really be zeroed
    {
        let f = OpenOptions::new().write(true).open(&lv).expect("open lv");
        let junk = vec![0xEEu8; MIB as usize];
        for off in (0..lv_size).step_by(junk.len()) {
            let n = (lv_size - off).min(MIB) as usize;
            std::os::unix::fs::FileExt::write_all_at(&f, &junk[..n], off).expect("junk");
        }
        f.sync_all().expect("sync");
    }
    restore_into_device(&lv, LZ4, 3, false);
    assert_eq!(
        sha256_of(&lv, size, 0),
        expected_sha(LZ4, "virtnbdbackup.3", "vda")
    );
    assert_eq!(
        sha256_of(&lv, lv_size, 0),
        sha_with_zero_tail(LZ4, 3, tmp.path(), lv_size - size)
    );
}

#[test]
fn rollback_image_equals_the_device_and_is_sparse() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let size = 12 * MIB + 4096 + 512;
    let lo = patterned_loop(tmp.path(), "rb.img", size);
    let img = tmp.path().join("vda.rollback.raw");
    let r = save_device_image(&lo.dev, &img, &Cancel::new()).expect("image");
    assert_eq!(r.path, img);
    assert_eq!(r.bytes_copied, size);
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), size);
    assert_eq!(sha256_of(&img, size, 0), sha256_of(&lo.dev, size, 0));
    // two of every three 64 KiB blocks hold data (the last one is shorter)
    let blocks = size.div_ceil(64 << 10);
    let data: u64 = (0..blocks)
        .filter(|i| i % 3 != 2)
        .map(|i| (size - i * (64 << 10)).min(64 << 10))
        .sum();
    assert_eq!(r.data_bytes, data);
    let allocated = std::fs::metadata(&img).expect("stat").blocks() * 512;
    assert!(
        allocated <= data + 64 * 1024 && allocated < size * 3 / 4,
        "not sparse: {allocated} bytes allocated for {data} of data"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).expect("ls").count(),
        2,
        "only the backing file and the image"
    );

    // never over an existing file, which is named
    let e = save_device_image(&lo.dev, &img, &Cancel::new()).expect_err("exists");
    assert!(e.to_string().contains("vda.rollback.raw"), "{e}");
    // a missing directory: the image path is named
    let nowhere = tmp.path().join("no/such/dir/img.raw");
    let e = save_device_image(&lo.dev, &nowhere, &Cancel::new()).expect_err("no dir");
    assert_eq!(e.kind(), ErrorKind::TargetIo);
    assert!(e.to_string().contains("no/such/dir/img.raw"), "{e}");
    // cancelled: no image and no staged file
    let cancel = Cancel::new();
    cancel.trigger(15);
    let img2 = tmp.path().join("cancelled.raw");
    let e = save_device_image(&lo.dev, &img2, &cancel).expect_err("cancelled");
    assert_eq!(e.kind(), ErrorKind::Cancelled(15));
    assert!(!img2.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 2);
}

/// Roll back after a restore: the image taken before it, written back, gives the old
/// content again.
#[test]
fn rollback_image_restores_the_old_content() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let size = plan(ACC, 1).virtual_size;
    let lo = patterned_loop(tmp.path(), "old.img", size);
    let old = sha256_of(&lo.dev, size, 0);
    let img = tmp.path().join("before.raw");
    save_device_image(&lo.dev, &img, &Cancel::new()).expect("image");
    restore_into_device(&lo.dev, ACC, 1, true);
    assert_ne!(sha256_of(&lo.dev, size, 0), old);
    {
        let mut src = File::open(&img).expect("open");
        let mut dst = OpenOptions::new().write(true).open(&lo.dev).expect("open");
        std::io::copy(&mut src, &mut dst).expect("copy back");
        dst.sync_all().expect("sync");
    }
    assert_eq!(sha256_of(&lo.dev, size, 0), old);
}

#[test]
fn device_held_exclusively_is_refused() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let lo = patterned_loop(tmp.path(), "held.img", 4 * MIB);
    let before = sha256_of(&lo.dev, 4 * MIB, 0);
    let holder = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&lo.dev)
        .expect("hold");
    let e = RawTarget::open_block_device(&lo.dev).expect_err("in use");
    let msg = e.to_string();
    assert_eq!(e.kind(), ErrorKind::TargetIo);
    assert!(
        msg.contains(lo.dev.to_str().expect("utf8")) && msg.contains("in use"),
        "{msg}"
    );
    let img = tmp.path().join("img.raw");
    let e = save_device_image(&lo.dev, &img, &Cancel::new()).expect_err("in use");
    assert!(e.to_string().contains("in use"), "{e}");
    assert!(!img.exists());
    // the size helper still answers (space checks happen while the VM may hold it)
    assert_eq!(block_device_size(&lo.dev).expect("size"), 4 * MIB);
    drop(holder);
    assert_eq!(sha256_of(&lo.dev, 4 * MIB, 0), before);
    RawTarget::open_block_device(&lo.dev).expect("free again");
}

/// A running VM: QEMU does not open its disks with `O_EXCL` but takes OFD locks on a
/// few bytes of them (here a shared lock on byte 100, like QEMU's permission locks).
#[test]
fn device_locked_like_qemu_is_refused() {
    require!("losetup");
    let tmp = tempfile::tempdir().expect("tmp");
    let lo = patterned_loop(tmp.path(), "vm.img", 4 * MIB);
    let qemu = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lo.dev)
        .expect("open like qemu");
    // SAFETY: a plain C struct of integers; all zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 100;
    fl.l_len = 1;
    nix::fcntl::fcntl(&qemu, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).expect("lock");
    let e = RawTarget::open_block_device(&lo.dev).expect_err("locked");
    let msg = e.to_string();
    assert!(msg.contains("in use") && msg.contains("byte 100"), "{msg}");
    assert!(msg.contains(lo.dev.to_str().expect("utf8")), "{msg}");
    let img = tmp.path().join("img.raw");
    let e = save_device_image(&lo.dev, &img, &Cancel::new()).expect_err("locked");
    assert!(e.to_string().contains("lock"), "{e}");
    assert!(!img.exists());
    drop(qemu);
    RawTarget::open_block_device(&lo.dev).expect("free again");
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[self.0.to_str().unwrap_or_default()]) {
            eprintln!("cleanup: {e}");
        }
    }
}

#[test]
fn mounted_device_is_refused() {
    require!("losetup", "mkfs.ext4", "mount");
    let tmp = tempfile::tempdir().expect("tmp");
    let lo = patterned_loop(tmp.path(), "fs.img", 16 * MIB);
    let dev = lo.dev.to_str().expect("utf8").to_string();
    run("mkfs.ext4", &["-q", "-F", &dev]).expect("mkfs");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    if let Err(e) = run("mount", &[&dev, mnt.to_str().expect("utf8")]) {
        eprintln!("SKIP mounted_device_is_refused: cannot mount here: {e}");
        return;
    }
    let m = Mount(mnt);
    let e = RawTarget::open_block_device(&lo.dev).expect_err("mounted");
    assert!(e.to_string().contains("in use"), "{e}");
    let e =
        save_device_image(&lo.dev, &tmp.path().join("i.raw"), &Cancel::new()).expect_err("mounted");
    assert!(e.to_string().contains("in use"), "{e}");
    drop(m);
    RawTarget::open_block_device(&lo.dev).expect("unmounted");
}

#[test]
fn a_file_is_not_a_block_device() {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("plain.raw");
    std::fs::write(&f, b"x").expect("write");
    let e = RawTarget::open_block_device(&f).expect_err("file");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("not a block device"), "{e}");
}
