//! Issue 21, "the first hour": what a newcomer reads on failure must be true and
//! machine-readable. `--json` prints exactly one document on every exit path
//! (docs/json-output.md); a `caused by:` line never repeats its message; `--help`
//! says where logs go.

mod clisupport;

use clisupport::{prepare_backups, Fixture, Run, Scratch};
use serde_json::Value;

/// The whole of stdout as one JSON document (fails on trailing output, so a second
/// document is caught too).
fn doc(r: &Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
            r.stdout, r.stderr
        )
    })
}

/// A failure document: ok=false, the process's exit code and the category.
fn assert_failure(r: &Run, schema: &str, code: i32, category: &str) -> Value {
    assert_eq!(r.code, Some(code), "stderr:\n{}", r.stderr);
    let v = doc(r);
    // `schema` may be given without its major version ("vmrestore.verify/")
    let got = v["schema"].as_str().unwrap_or_default();
    assert!(
        got == schema || (schema.ends_with('/') && got.starts_with(schema)),
        "{v}"
    );
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["exit_code"], code, "{v}");
    assert_eq!(v["category"], category, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    v
}

#[test]
fn json_usage_error_before_and_after_the_flag() {
    for (args, error) in [
        (&["--json", "--bogus"][..], "Unknown option: --bogus"),
        (&["--bogus", "--json"][..], "Unknown option: --bogus"),
        (
            &["--backup-path", "/", "--vm", "x", "--json"][..],
            "--restore-path is required for restore (unless --disk is used for in-place replacement)",
        ),
    ] {
        let r = Scratch::new().run(args);
        let v = assert_failure(&r, "vmrestore.error/1", 7, "usage");
        assert_eq!(v["error"], error);
        assert!(r.stderr.contains("ERROR: "), "the log line stays on stderr: {}", r.stderr);
    }
}

#[test]
fn json_non_utf8_argument_is_a_usage_document() {
    use std::os::unix::ffi::OsStrExt;
    let s = Scratch::new();
    let out = s
        .command(&["--json", "--vm"])
        .arg(std::ffi::OsStr::from_bytes(b"n\xffu"))
        .output()
        .expect("run");
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("utf-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_failure(&r, "vmrestore.error/1", 7, "usage");
}

#[test]
fn json_config_error() {
    let s = Scratch::new();
    let r = s.run(&["--list", "--json", "--config-instance", "nope"]);
    let v = assert_failure(&r, "vmrestore.error/1", 2, "config");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Config instance 'nope' not found"),
        "{v}"
    );
    assert!(s.logs().is_empty(), "a config error writes no log file");
}

#[test]
fn json_missing_vm_in_a_restore() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    let out = s.dir.path().join("out");
    let r = s.run(&[
        "--vm",
        "nosuch",
        "--json",
        "--backup-path",
        &fx.root_str(),
        "--restore-path",
        &out.display().to_string(),
        "--skip-config",
    ]);
    let v = assert_failure(&r, "vmrestore.error/1", 5, "vm");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("nosuch"),
        "{v}"
    );
}

#[test]
fn json_listing_not_found() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = Scratch::new().run(&[
        "--list-restore-points",
        "nosuch",
        "--json",
        "--backup-path",
        &fx.root_str(),
    ]);
    assert_failure(&r, "vmrestore.error/1", 5, "vm");
    // the plain line of the text mode stays on stderr
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
    let r = Scratch::new().run(&["--list", "--json", "--backup-path", "/does/not/exist"]);
    assert_failure(&r, "vmrestore.error/1", 4, "storage");
}

#[test]
fn json_verify_failure_is_the_verify_document_marked_failed() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = Scratch::new().run(&[
        "--verify",
        "rc-damage",
        "--period",
        "20260515",
        "--json",
        "--backup-path",
        &fx.root_str(),
    ]);
    let v = assert_failure(&r, "vmrestore.verify/", 6, "engine");
    assert_eq!(v["passed"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Verification FAILED"),
        "{v}"
    );
    // success: the same document, ok=true
    let r = Scratch::new().run(&[
        "--verify",
        "rc-v247-chk",
        "--json",
        "--backup-path",
        &fx.root_str(),
    ]);
    assert_eq!(r.code, Some(0));
    let v = doc(&r);
    assert!(v["schema"]
        .as_str()
        .is_some_and(|s| s.starts_with("vmrestore.verify/")));
    assert_eq!(
        (v["ok"].as_bool(), v["exit_code"].as_i64()),
        (Some(true), Some(0))
    );
    assert!(v.get("category").is_none());
}

// A restore that fails after it started prints its own vmrestore.restore/1 document
// (once) and the stderr ERROR line does not repeat itself as `caused by:`.
#[test]
fn failed_restore_prints_one_document_and_no_repeated_cause() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let out = s.dir.path().join("out");
    let args = [
        "--vm",
        "rc-damage",
        "--period",
        "20260515",
        "--backup-path",
        &root.display().to_string(),
        "--restore-path",
        &out.display().to_string(),
        "--skip-config",
    ];
    let r = s.run(&[&args[..], &["--json"]].concat());
    let v = assert_failure(&r, "vmrestore.restore/1", 6, "engine");
    assert_eq!(v["outcome"], "failed");
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("] ERROR: "))
        .collect();
    let message = errors
        .iter()
        .find(|l| l.contains("Disk restore failed"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{}", r.stderr));
    assert!(message.contains("checksum mismatch"), "{message}");
    for l in &errors {
        if let Some((_, cause)) = l.split_once("caused by: ") {
            assert!(!message.contains(cause), "repeated cause:\n{}", r.stderr);
        }
    }
    // without --json: nothing on stdout
    let r = s.run(&args);
    assert_eq!((r.code, r.stdout.as_str()), (Some(6), ""));
}

#[test]
fn json_success_documents_carry_ok() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = Scratch::new().run(&["--list", "--json", "--backup-path", &fx.root_str()]);
    assert_eq!(r.code, Some(0));
    let v = doc(&r);
    assert_eq!(
        (
            v["schema"].as_str(),
            v["ok"].as_bool(),
            v["exit_code"].as_i64()
        ),
        (Some("vmrestore.list/1"), Some(true), Some(0))
    );
    // --help and --version are text even with --json
    let r = Scratch::new().run(&["--version", "--json"]);
    assert!(r.stdout.starts_with("vmrestore "), "{}", r.stdout);
}

// --help tells the log directory order of src/ui/log.rs::log_dir.
#[test]
fn help_tells_where_logs_go() {
    let r = Scratch::new().run(&["--help"]);
    let flat = r.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(
            "LOG_DIR log directory of restore, --verify, --dump; unset: /var/log/vmrestore (created if it can be), else $XDG_STATE_HOME/vmrestore or ~/.local/state/vmrestore, else /var/tmp/vmrestore-<uid>"
        ),
        "{}",
        r.stdout
    );
}
