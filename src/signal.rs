//! SIGINT/SIGTERM/SIGHUP → `engine::Cancel` (an SSH session that drops sends SIGHUP:
//! the restore stops and cleans up as for Ctrl-C). The signals are blocked first
//! thing in `main`, before any thread exists (the mask is inherited by every thread
//! spawned later), and received by one thread with `sigwait`, so no code runs in
//! signal context and no signal can kill the process before its command has said
//! how to stop: one that arrives before the command installs its `Cancel` waits
//! for it (or, for a command that never installs one, ends the run with 128 + n).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// How many signals arrived so far (every one, not only the first that cancels).
static RECEIVED: AtomicU32 = AtomicU32::new(0);

/// The command's cancel once installed; before that, the first signal that came.
static ROUTE: Mutex<(Option<engine::Cancel>, Option<i32>)> = Mutex::new((None, None));

/// The number of signals received since start; work that must stop on a signal
/// even after the first one (the catalogue write of an interrupted run) compares it.
pub fn received() -> u32 {
    RECEIVED.load(Ordering::SeqCst)
}

fn set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP (call first thing in `main`) and starts the
/// thread that receives them.
pub fn init() -> std::io::Result<()> {
    let set = set();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                RECEIVED.fetch_add(1, Ordering::SeqCst);
                let mut route = ROUTE
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match &route.0 {
                    Some(c) => c.trigger(sig as i32),
                    None => {
                        route.1.get_or_insert(sig as i32);
                    }
                }
            }
        })?;
    Ok(())
}

/// Routes signals to `cancel` from now on; a signal that came before is delivered
/// at once. (Also usable without [`init`], as in tests: then it blocks the signals
/// and starts the receiving thread itself.)
pub fn install(cancel: engine::Cancel) -> std::io::Result<()> {
    if RECEIVER_STARTED.swap(true, Ordering::SeqCst) {
        let mut route = ROUTE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(sig) = route.1.take() {
            cancel.trigger(sig);
        }
        route.0 = Some(cancel);
        return Ok(());
    }
    init()?;
    install(cancel)
}

static RECEIVER_STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the receiver as started (called by `main` after [`init`]).
pub fn started() {
    RECEIVER_STARTED.store(true, Ordering::SeqCst);
}

/// A signal that came while no command had installed its cancel.
pub fn pending() -> Option<i32> {
    ROUTE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .1
}
