//! SIGINT/SIGTERM/SIGHUP → `engine::Cancel` (an SSH session that drops sends SIGHUP:
//! the restore stops and cleans up as for Ctrl-C). The signals are blocked in every thread (the
//! mask is inherited by threads spawned later) and received by one thread with
//! `sigwait`, so no code runs in signal context.

use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// How many signals arrived so far (every one, not only the first that cancels).
static RECEIVED: AtomicU32 = AtomicU32::new(0);

/// The number of signals received since start; work that must stop on a signal
/// even after the first one (the catalogue write of an interrupted run) compares it.
pub fn received() -> u32 {
    RECEIVED.load(Ordering::SeqCst)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (call first thing in `main`,
/// before any thread exists) and starts the thread that turns them into a cancel.
pub fn install(cancel: engine::Cancel) -> std::io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                RECEIVED.fetch_add(1, Ordering::SeqCst);
                cancel.trigger(sig as i32);
            }
        })?;
    Ok(())
}
