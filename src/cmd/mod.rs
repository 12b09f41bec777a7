//! One module per command. Commands print user-facing output with
//! [`write_stdout`] and diagnostics with `tracing`; they never pick exit codes
//! themselves (they return `AppError`s).

pub mod dump;
pub mod list;
pub mod points;
pub mod restore;
pub mod serve;
pub mod verify;

use std::io::Write;

/// Writes command output to stdout. A closed pipe (`vmrestore --list | head`) is
/// not an error worth reporting, so write failures are ignored.
pub fn write_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    // see the doc comment: EPIPE and friends are deliberately ignored
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
