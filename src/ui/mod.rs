//! What the user sees: log lines and the run log, progress, text formats.

pub mod format;
pub mod header;
pub mod json;
pub mod log;
pub mod progress;
pub mod report;

use std::io::Write;

/// Writes command output to stdout; under `--json` a JSON document is held until
/// exit instead (see [`json`]). A closed pipe (`vmrestore --list | head`) is not an
/// error worth reporting, so write failures are ignored.
pub fn write_stdout(text: &str) {
    if json::hold(text) {
        return;
    }
    print(text);
}

fn print(text: &str) {
    // names from a backup tree reach listings: no control character but the line
    // breaks and tabs of the layout goes to the terminal raw
    let text = if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        std::borrow::Cow::Owned(
            text.split('\n')
                .map(|l| {
                    l.split('\t')
                        .map(format::printable)
                        .collect::<Vec<_>>()
                        .join("\t")
                })
                .collect::<Vec<_>>()
                .join("\n"),
        )
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    let mut out = std::io::stdout().lock();
    // see the doc comment: EPIPE and friends are deliberately ignored
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
