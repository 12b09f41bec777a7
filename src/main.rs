//! The `vmrestore` binary: read the environment, install the log-line subscriber,
//! run, report, write the run-log footer, exit with the category's status.
//! Exit codes come only from `vmrestore::error`.

use std::process::ExitCode;

use vmrestore::app::{self, Env};
use vmrestore::error::ExitStatus;
use vmrestore::ui::log;

fn main() -> ExitCode {
    // before anything else (threads, logging): no signal may kill the run unhandled
    if vmrestore::signal::init().is_ok() {
        vmrestore::signal::started();
    }
    log::init();
    // An argument that is not UTF-8 is refused, never converted lossily: a lossy
    // `--restore-path n\xffu` would write into `n\u{FFFD}u`, a directory nobody named.
    let argv = match utf8_args() {
        Ok(a) => a,
        Err(e) => {
            app::report(&e);
            let status = e.exit_status();
            log::finish(status);
            return finish(status);
        }
    };
    let env = Env::from_process();
    let status = match app::run(&argv, &env) {
        Ok(status) => status,
        Err(e) => {
            app::report(&e);
            e.exit_status()
        }
    };
    // a signal that no command took (a listing, --help) still ends as one
    let status = match (status, vmrestore::signal::pending()) {
        (ExitStatus::Ok, Some(sig)) => ExitStatus::Signal(sig),
        (s, _) => s,
    };
    log::finish(status);
    finish(status)
}

fn utf8_args() -> Result<Vec<String>, vmrestore::error::AppError> {
    std::env::args_os()
        .skip(1)
        .enumerate()
        .map(|(i, a)| {
            a.into_string().map_err(|raw| {
                vmrestore::error::AppError::Usage(format!(
                    "argument {} ({}) is not valid UTF-8: vmrestore takes UTF-8 names and paths",
                    i + 1,
                    std::os::unix::ffi::OsStrExt::as_bytes(raw.as_os_str()).escape_ascii()
                ))
            })
        })
        .collect()
}

fn finish(status: ExitStatus) -> ExitCode {
    status.into()
}
