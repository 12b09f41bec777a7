//! `--json`: one document on stdout on every exit path (docs/json-output.md).
//!
//! When `--json` is among the arguments (seen by `main` before parsing, so a usage
//! error counts too), the document a command writes through
//! [`crate::ui::write_stdout`] is held back here until the process knows its exit
//! status. [`finish`] then prints it with the common keys every document carries
//! (`ok`, `exit_code`; on failure also `category` and `error`), or, when the run
//! failed before any command wrote one, a `vmrestore.error/1` document. So a failed
//! `--verify --json` prints its `vmrestore.verify/1` document marked `ok: false`
//! instead of a second document, and a restore's `vmrestore.restore/1` keeps its own
//! `exit_code` and `error`. Only text that is a JSON document is held: the NBD URIs
//! `--serve` prints while it runs go out at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::error::{AppError, ExitStatus};

/// `--json` was among the arguments of this process.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The document written so far and not yet printed.
static HELD: Mutex<Option<String>> = Mutex::new(None);

/// The `schema` of the document printed when no command wrote one.
pub const ERROR_SCHEMA: &str = "vmrestore.error/1";

/// True when an argument is exactly `--json` (before the token loop, which may
/// fail on an earlier argument; the value of `--vm --json` counts too).
pub fn requested_in<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    args.iter().any(|a| a.as_ref() == "--json")
}

/// Called once by `main`: from now on documents are held until [`finish`].
pub fn set_requested(on: bool) {
    REQUESTED.store(on, Ordering::SeqCst);
}

fn held() -> std::sync::MutexGuard<'static, Option<String>> {
    // a poisoned lock only means a thread panicked while holding it; the text is intact
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Holds `text` when it is a document under `--json` (returns true), else leaves it
/// to the caller to print. A second document replaces nothing: the first is
/// printed as it was, so no output is ever lost.
pub(crate) fn hold(text: &str) -> bool {
    if !REQUESTED.load(Ordering::SeqCst) || !text.trim_start().starts_with('{') {
        return false;
    }
    let mut h = held();
    if let Some(earlier) = h.take() {
        super::print(&earlier);
    }
    *h = Some(text.to_owned());
    true
}

/// The keys every document carries at exit: `ok` and `exit_code`, plus `category`
/// and `error` on failure. Keys the document already has are kept (a restore's
/// `exit_code` and `error` are its own).
pub fn stamp(doc: &mut Map<String, Value>, status: ExitStatus, error: Option<&AppError>) {
    let ok = status == ExitStatus::Ok;
    let mut add = |k: &str, v: Value| {
        if !doc.contains_key(k) {
            doc.insert(k.to_owned(), v);
        }
    };
    add("ok", Value::Bool(ok));
    add("exit_code", Value::from(status.code()));
    if !ok {
        add("category", Value::from(status.category()));
        add(
            "error",
            error.map_or(Value::Null, |e| Value::from(e.to_string())),
        );
    }
}

/// The document for a run that failed before a command wrote one.
pub fn error_document(status: ExitStatus, error: Option<&AppError>) -> Value {
    let mut doc = Map::new();
    doc.insert("schema".into(), Value::from(ERROR_SCHEMA));
    stamp(&mut doc, status, error);
    Value::Object(doc)
}

/// The text printed at exit for a run that ended with `status`: the held document
/// stamped with [`stamp`], else on failure a [`ERROR_SCHEMA`] document, else nothing.
pub fn closing_text(
    held: Option<String>,
    status: ExitStatus,
    error: Option<&AppError>,
) -> Option<String> {
    let pretty = |v: &Value| format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    match held {
        Some(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(mut doc)) => {
                stamp(&mut doc, status, error);
                Some(pretty(&Value::Object(doc)))
            }
            // not an object after all: printed exactly as written
            _ => Some(text),
        },
        None if status != ExitStatus::Ok => Some(pretty(&error_document(status, error))),
        None => None,
    }
}

/// At exit (`main` only): prints the held document, or the error document.
pub fn finish(status: ExitStatus, error: Option<&AppError>) {
    if !REQUESTED.load(Ordering::SeqCst) {
        return;
    }
    if let Some(text) = closing_text(held().take(), status, error) {
        super::print(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_without_a_document_gets_the_error_document() {
        let e = AppError::Usage("Unknown option: --bogus".into());
        let text = closing_text(None, e.exit_status(), Some(&e)).expect("doc");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"schema": "vmrestore.error/1", "ok": false, "exit_code": 7,
                "category": "usage", "error": "Unknown option: --bogus"})
        );
        let keys: Vec<&String> = v.as_object().expect("obj").keys().collect();
        assert_eq!(keys, ["schema", "ok", "exit_code", "category", "error"]);
        assert_eq!(closing_text(None, ExitStatus::Ok, None), None);
    }

    #[test]
    fn a_held_document_is_stamped_and_keeps_its_own_keys() {
        let e = AppError::engine("Verification FAILED: x");
        let held = r#"{"schema": "vmrestore.verify/1", "passed": false}"#.to_owned();
        let v: Value = serde_json::from_str(
            &closing_text(Some(held), e.exit_status(), Some(&e)).expect("doc"),
        )
        .expect("json");
        assert_eq!(v["schema"], "vmrestore.verify/1");
        assert_eq!(v["passed"], false);
        assert_eq!(
            (v["ok"].clone(), v["exit_code"].clone()),
            (Value::Bool(false), Value::from(6))
        );
        assert_eq!(v["category"], "engine");
        assert_eq!(v["error"], "Verification FAILED: x");
        // a restore document's own exit_code and error stay
        let held = r#"{"schema": "vmrestore.restore/1", "exit_code": 143, "error": "Interrupted by signal 15"}"#;
        let e = AppError::Interrupted(15);
        let v: Value = serde_json::from_str(
            &closing_text(Some(held.into()), e.exit_status(), Some(&e)).expect("doc"),
        )
        .expect("json");
        assert_eq!(v["exit_code"], 143);
        assert_eq!(v["category"], "signal");
        // success: ok and exit_code only
        let v: Value = serde_json::from_str(
            &closing_text(
                Some(r#"{"schema": "vmrestore.list/1"}"#.into()),
                ExitStatus::Ok,
                None,
            )
            .expect("doc"),
        )
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"schema": "vmrestore.list/1", "ok": true, "exit_code": 0})
        );
    }

    #[test]
    fn json_is_seen_anywhere_in_the_arguments() {
        assert!(requested_in(&["--bogus", "--json"]));
        assert!(requested_in(&["--vm", "--json"]));
        assert!(!requested_in(&["--jsonx", "--vm", "x"]));
    }
}
