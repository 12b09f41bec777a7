//! SIGINT/SIGTERM → `engine::Cancel`. The signals are blocked in every thread (the
//! mask is inherited by threads spawned later) and received by one thread with
//! `sigwait`, so no code runs in signal context.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Blocks SIGINT and SIGTERM in the calling thread (call first thing in `main`,
/// before any thread exists) and starts the thread that turns them into a cancel.
pub fn install(cancel: engine::Cancel) -> std::io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                cancel.trigger(sig as i32);
            }
        })?;
    Ok(())
}
