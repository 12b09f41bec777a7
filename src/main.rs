//! The `vmrestore` binary: read the environment, install the log-line subscriber,
//! run, report, write the run-log footer, exit with the category's status.
//! Exit codes come only from `vmrestore::error`.

use std::process::ExitCode;

use vmrestore::app::{self, Env};
use vmrestore::error::ExitStatus;
use vmrestore::ui::log;

fn main() -> ExitCode {
    // Arguments that are not UTF-8 are taken lossily (VM names and paths written
    // by vmbackup are ASCII; see §2.1 name sanitising).
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    log::init();
    let env = Env::from_process();
    let status = match app::run(&argv, &env) {
        Ok(status) => status,
        Err(e) => {
            app::report(&e);
            e.exit_status()
        }
    };
    log::finish(status);
    finish(status)
}

fn finish(status: ExitStatus) -> ExitCode {
    status.into()
}
