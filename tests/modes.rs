//! Restore modes through the library against libvirt's in-process test driver
//! (`test:///default`, no daemon): DR, clone and data-only restores of copies of the
//! real fixture chains. Disk content is checked with qemu-img (a test-only tool).

mod clisupport;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use clisupport::expected_sha256 as expected;
use clisupport::guest_sha;
use vmrestore::cli::request::{RestoreKind, RestoreOptions};
use vmrestore::hypervisor::libvirt::Libvirt;
use vmrestore::hypervisor::Hypervisor;
use vmrestore::restore::{self, Context, Effect, Outcome, RestorePoint};
use vmrestore::ui::report::Reporter;

#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Reporter for Lines {
    fn info(&self, _: &str, m: &str) {
        self.0.lock().expect("lock").push(format!("INFO: {m}"));
    }
    fn warn(&self, _: &str, m: &str) {
        self.0.lock().expect("lock").push(format!("WARN: {m}"));
    }
    fn error(&self, _: &str, m: &str) {
        self.0.lock().expect("lock").push(format!("ERROR: {m}"));
    }
    fn plain(&self, l: &str) {
        self.0.lock().expect("lock").push(l.to_owned());
    }
}

impl Lines {
    fn has(&self, s: &str) -> bool {
        self.0.lock().expect("lock").iter().any(|l| l.contains(s))
    }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/real-chains")
        .join(rel)
}

/// Copies a chain dir (files and sub-dirs) and points its NVRAM paths into `nvram_dir`.
fn copy_chain(src: &Path, dst: &Path, nvram_dir: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("ls") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_chain(&e.path(), &to, nvram_dir);
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("vmconfig.") {
                let x = std::fs::read_to_string(&to).expect("xml").replace(
                    "/var/lib/libvirt/qemu/nvram",
                    &nvram_dir.display().to_string(),
                );
                std::fs::write(&to, x).expect("write");
            }
        }
    }
}

/// The test driver's `test:///default` is one instance per process: tests that define
/// the same domain take turns.
static DEFINES: Mutex<()> = Mutex::new(());

fn qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn job<'a>(
    set: &'a nbdfmt::BackupSet,
    vm: &str,
    hv: &'a dyn Hypervisor,
    log: &'a Lines,
    swtpm: &Path,
) -> Context<'a> {
    Context {
        vm: vm.to_owned(),
        set,
        point: RestorePoint::Latest,
        options: RestoreOptions::default(),
        hv,
        log,
        cancel: engine::Cancel::new(),
        progress: None,
        swtpm_root: swtpm.to_path_buf(),
        // beside swtpm's root: copy_chain points the XMLs' NVRAM there
        nvram_dir: swtpm.with_file_name("nvram"),
        sandbox: None,
    }
}

/// Plans, executes, and checks that the executor did exactly what the plan (as a
/// dry run prints it) said it would.
fn plan_and_run(
    ctx: &Context<'_>,
    kind: &RestoreKind,
) -> Result<Outcome, vmrestore::error::AppError> {
    let plan = restore::plan(ctx, kind)?;
    let printed: Vec<Effect> = plan.effects();
    assert_eq!(
        plan.to_json()["effects"],
        serde_json::to_value(&printed).expect("json"),
        "the JSON plan lists the same effects"
    );
    let o = restore::execute::execute(ctx, plan)?;
    assert_eq!(o.effects, printed, "executed effects = planned effects");
    Ok(o)
}

#[test]
fn data_only_restores_a_removed_disk_at_its_point() {
    let tmp = tempfile::tempdir().expect("tmp");
    let set = nbdfmt::BackupSet::scan(&fixture("backups/rc-shrink/202606")).expect("scan");
    let hv = Libvirt::connect("test:///default").expect("test driver");
    let log = Lines::default();
    let mut j = job(&set, "rc-shrink", &hv, &log, &tmp.path().join("swtpm"));
    j.point = RestorePoint::Number(2);
    let kind = RestoreKind::DataOnly {
        dir: tmp.path().join("out"),
        ignored_name: None,
    };
    let o = plan_and_run(&j, &kind).expect("restore");
    assert_eq!(
        o.effects.iter().map(|e| e.action).collect::<Vec<_>>(),
        vec!["create-dir", "write", "write", "write", "refresh-pool"]
    );
    assert_eq!(o.disks, vec!["sda", "vda", "vdb"]);
    assert!(o.summary.ends_with("— disk ✓ data-only"), "{}", o.summary);
    assert!(
        log.has("Disk configuration changed between checkpoint 2 and the latest checkpoint (4).")
    );
    if qemu_img() {
        for d in ["sda", "vda", "vdb"] {
            let f = tmp.path().join(format!("out/rc-shrink-{d}.qcow2"));
            assert_eq!(
                guest_sha(&f),
                expected("rc-shrink", "202606", "virtnbdbackup.2", d),
                "{d}"
            );
        }
    }
    // a second run refuses to overwrite without --force, and changes nothing
    let e = restore::run(&j, &kind).expect_err("collision");
    assert!(
        e.to_string()
            .contains("Pre-flight disk safety check failed"),
        "{e}"
    );
    assert!(log.has("BLOCKED: File already exists"));
}

#[test]
fn dr_keeps_identity_and_clone_gets_a_new_one() {
    let _turn = DEFINES.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tmp");
    let nvram_dir = tmp.path().join("nvram");
    let chain = tmp.path().join("chain");
    copy_chain(&fixture("backups/rc-uefi-tpm/2026-W26"), &chain, &nvram_dir);
    let set = nbdfmt::BackupSet::scan(&chain).expect("scan");
    let hv = Libvirt::connect("test:///default").expect("test driver");
    let swtpm = tmp.path().join("swtpm");
    let log = Lines::default();
    let out = tmp.path().join("images");
    let j = job(&set, "rc-uefi-tpm", &hv, &log, &swtpm);
    let dr = RestoreKind::Dr { dir: out.clone() };
    let o = plan_and_run(&j, &dr).expect("dr");
    assert!(o.effects.contains(&Effect::new("define", "rc-uefi-tpm")));
    assert!(o
        .effects
        .contains(&Effect::new("restore-tpm", "rc-uefi-tpm")));
    assert_eq!(
        o.summary,
        "Restore complete: rc-uefi-tpm — disk ✓ defined ✓ UUID ✓ MACs ✓ TPM ✓"
    );
    let info = hv.lookup("rc-uefi-tpm").expect("lookup").expect("defined");
    assert_eq!(info.uuid, "88551b77-adbf-56aa-950b-b773d24f7f3f");
    let xml = hv.xml("rc-uefi-tpm", true).expect("xml");
    assert!(
        xml.contains(&out.join("rc-uefi-tpm-vda.qcow2").display().to_string()),
        "{xml}"
    );
    let nv = std::fs::read(nvram_dir.join("rc-uefi-tpm_VARS.fd")).expect("nvram installed");
    assert_eq!(
        nv,
        std::fs::read(chain.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.0")).expect("backup nvram")
    );
    assert!(swtpm
        .join("88551b77-adbf-56aa-950b-b773d24f7f3f/tpm2")
        .is_dir());
    if qemu_img() {
        assert_eq!(
            guest_sha(&out.join("rc-uefi-tpm-vdb.qcow2")),
            expected("rc-uefi-tpm", "2026-W26", "virtnbdbackup.0", "vdb")
        );
    }
    // again without --force: refused, nothing changed
    let e = restore::run(&j, &dr).expect_err("defined");
    assert_eq!(
        e.to_string(),
        "VM 'rc-uefi-tpm' already defined (use --force to override)"
    );

    // clone next to it
    let log2 = Lines::default();
    let j2 = job(&set, "rc-uefi-tpm", &hv, &log2, &swtpm);
    let clone = RestoreKind::Clone {
        dir: out.clone(),
        name: "rc-uefi-tpm-clone".into(),
    };
    let o = plan_and_run(&j2, &clone).expect("clone");
    assert!(
        o.summary
            .starts_with("Restore complete: rc-uefi-tpm — disk ✓ defined ✓ new identity ✓"),
        "{}",
        o.summary
    );
    let c = hv
        .lookup("rc-uefi-tpm-clone")
        .expect("lookup")
        .expect("clone defined");
    assert_ne!(c.uuid, info.uuid);
    let cxml = hv.xml("rc-uefi-tpm-clone", true).expect("xml");
    assert!(
        cxml.contains("rc-uefi-tpm-clone-vda.qcow2") && cxml.contains("rc-uefi-tpm-clone_VARS.fd"),
        "{cxml}"
    );
    let orig_macs = nbdfmt::DomainConfig::parse(&xml).expect("p").macs;
    let clone_macs = nbdfmt::DomainConfig::parse(&cxml).expect("p").macs;
    assert!(
        orig_macs.iter().all(|m| !clone_macs.contains(m)),
        "{orig_macs:?} {clone_macs:?}"
    );
    assert!(
        swtpm.join(&c.uuid).join("tpm2").is_dir(),
        "TPM under the clone's UUID"
    );
    // the original is untouched
    assert_eq!(hv.xml("rc-uefi-tpm", true).expect("xml"), xml);
    for n in ["rc-uefi-tpm", "rc-uefi-tpm-clone"] {
        hv.undefine(n).expect("cleanup");
    }
}

/// Issue 18: the backup's domain XML is data from a replica, and vmrestore runs as
/// root. Its `<nvram>` pointing outside libvirt's NVRAM directory (here: a directory
/// holding a "victim" file of that name) must not make a DR install the backup's bytes
/// there: the file goes into the NVRAM directory, the domain's `<nvram>` names it, a
/// WARN says so, and the victim is untouched.
#[test]
fn dr_installs_nvram_only_in_the_nvram_directory() {
    let _turn = DEFINES.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tmp");
    let elsewhere = tmp.path().join("etc");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let victim = elsewhere.join("rc-uefi-tpm_VARS.fd");
    std::fs::write(&victim, "root's file\n").expect("victim");
    let chain = tmp.path().join("chain");
    copy_chain(&fixture("backups/rc-uefi-tpm/2026-W26"), &chain, &elsewhere);
    // the TPM metadata names another domain's UUID: the state still goes to the
    // domain restored, never into that domain's swtpm directory
    let meta = chain.join("tpm-state/BACKUP_METADATA.txt");
    let text = std::fs::read_to_string(&meta).expect("metadata");
    let other = "11111111-2222-3333-4444-555555555555";
    let crafted: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("VM UUID:") {
                format!("VM UUID: {other}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&meta, crafted).expect("metadata");
    let set = nbdfmt::BackupSet::scan(&chain).expect("scan");
    let hv = Libvirt::connect("test:///default").expect("test driver");
    let log = Lines::default();
    let j = job(&set, "rc-uefi-tpm", &hv, &log, &tmp.path().join("swtpm"));
    let dr = RestoreKind::Dr {
        dir: tmp.path().join("images"),
    };
    let o = plan_and_run(&j, &dr).expect("dr");
    let installed = tmp.path().join("nvram/rc-uefi-tpm_VARS.fd");
    assert!(
        o.effects.contains(&Effect::new(
            "install-nvram",
            installed.display().to_string()
        )),
        "{:?}",
        o.effects
    );
    assert_eq!(
        std::fs::read(&installed).expect("installed"),
        std::fs::read(chain.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.0")).expect("backup")
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).expect("ls").count(), 1);
    let xml = hv.xml("rc-uefi-tpm", true).expect("xml");
    assert!(xml.contains(&installed.display().to_string()), "{xml}");
    assert!(log.has("The backup's domain XML puts NVRAM at"));
    let swtpm = tmp.path().join("swtpm");
    assert!(swtpm
        .join("88551b77-adbf-56aa-950b-b773d24f7f3f/tpm2")
        .is_dir());
    assert!(!swtpm.join(other).exists());
    assert!(log.has("The TPM metadata names UUID"));
    hv.undefine("rc-uefi-tpm").expect("cleanup");
    // another domain's NVRAM file, named in the XML: never the target
    let chain2 = tmp.path().join("chain2");
    let nvram = tmp.path().join("nvram");
    copy_chain(&fixture("backups/rc-uefi-tpm/2026-W26"), &chain2, &nvram);
    for e in std::fs::read_dir(&chain2).expect("ls") {
        let p = e.expect("entry").path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmconfig."))
        {
            let x = std::fs::read_to_string(&p).expect("xml");
            std::fs::write(&p, x.replace("rc-uefi-tpm_VARS.fd<", "victim-vm_VARS.fd<")).expect("w");
        }
    }
    let victim = nvram.join("victim-vm_VARS.fd");
    std::fs::write(&victim, "victim's NVRAM").expect("victim");
    let set = nbdfmt::BackupSet::scan(&chain2).expect("scan");
    let log = Lines::default();
    let j = job(&set, "rc-uefi-tpm", &hv, &log, &tmp.path().join("swtpm"));
    let dr2 = RestoreKind::Dr {
        dir: tmp.path().join("images2"),
    };
    plan_and_run(&j, &dr2).expect("dr");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "victim's NVRAM"
    );
    assert!(hv
        .xml("rc-uefi-tpm", true)
        .expect("xml")
        .contains(&installed.display().to_string()));
    hv.undefine("rc-uefi-tpm").expect("cleanup");
    // libvirt's <source file=…/> form of <nvram> is refused: nothing would rewrite it
    for e in std::fs::read_dir(&chain2).expect("ls") {
        let p = e.expect("entry").path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmconfig."))
        {
            let x = std::fs::read_to_string(&p).expect("xml");
            let at = x.find("<nvram").expect("nvram");
            let end = x[at..].find("</nvram>").expect("end") + at + "</nvram>".len();
            let form = format!(
                "<nvram type='file'><source file='{}'/></nvram>",
                victim.display()
            );
            std::fs::write(&p, format!("{}{form}{}", &x[..at], &x[end..])).expect("w");
        }
    }
    let set = nbdfmt::BackupSet::scan(&chain2).expect("scan");
    let log = Lines::default();
    let j = job(&set, "rc-uefi-tpm", &hv, &log, &tmp.path().join("swtpm"));
    let dr3 = RestoreKind::Dr {
        dir: tmp.path().join("images3"),
    };
    let e = restore::plan(&j, &dr3).expect_err("element form");
    assert!(e.to_string().contains("<source> element"), "{e}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "victim's NVRAM"
    );
}
