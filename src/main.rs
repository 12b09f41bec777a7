//! The `vmrestore` binary: read the environment, install the log-line subscriber,
//! run, report, write the run-log footer, exit with the category's status.
//! Exit codes come only from `vmrestore::error`.

use std::process::ExitCode;

use vmrestore::app::{self, Env};
use vmrestore::error::{AppError, ExitStatus};
use vmrestore::ui::{json, log};

fn main() -> ExitCode {
    fixed_mmap_threshold();
    raise_open_file_limit();
    // before anything else (threads, logging): no signal may kill the run unhandled
    if vmrestore::signal::init().is_ok() {
        vmrestore::signal::started();
    }
    log::init();
    // before parsing: a usage error of a `--json` run is a JSON document too
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    json::set_requested(json::requested_in(&args));
    // An argument that is not UTF-8 is refused, never converted lossily: a lossy
    // `--restore-path n\xffu` would write into `n\u{FFFD}u`, a directory nobody named.
    let result = utf8_args(args).and_then(|argv| app::run(&argv, &Env::from_process()));
    let status = match &result {
        Ok(status) => *status,
        Err(e) => {
            app::report(e);
            e.exit_status()
        }
    };
    // a signal that no command took (a listing, --help) still ends as one
    let (status, untaken) = match (status, vmrestore::signal::pending()) {
        (ExitStatus::Ok, Some(sig)) => (ExitStatus::Signal(sig), Some(AppError::Interrupted(sig))),
        (s, _) => (s, None),
    };
    json::finish(status, untaken.as_ref().or(result.as_ref().err()));
    log::finish(status);
    finish(status)
}

fn utf8_args(args: Vec<std::ffi::OsString>) -> Result<Vec<String>, AppError> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            a.into_string().map_err(|raw| {
                AppError::Usage(format!(
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

/// glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB);
/// after that the engine's 1 MiB chunk buffers come from per-thread arenas that do
/// not shrink, and a whole-host run (`--all`, two VMs at once) peaked at 63-66 MiB
/// RSS for 16 MiB of heap. With a fixed threshold they stay mapped and go back to
/// the kernel when freed: 57-58 MiB, same time.
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called first thing in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// The chain collapse reads all of a disk's chain files side by side (a k-way merge),
/// so a chain of N points keeps N + 1 files open: with the usual soft limit of 1,024
/// descriptors a 1,000-point chain failed with EMFILE (reported against one of its
/// files). The hard limit is the administrator's; the soft one is ours to raise.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the plain struct passed by pointer;
    // called first thing in main, before any other thread exists.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
