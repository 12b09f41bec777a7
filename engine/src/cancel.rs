//! `Cancel`: a cloneable cancellation token. Signal handlers call `trigger(sig)`;
//! blocking workers poll `is_cancelled()` between chunks, async ones await `cancelled()`.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::error::{Error, Result};

/// What a cancel without a signal stores (and [`Cancel::signal`] reports).
const NO_SIGNAL: i32 = -1;

#[derive(Debug, Default)]
struct Inner {
    /// 0 = not cancelled; otherwise the signal number (or [`NO_SIGNAL`]).
    signal: AtomicI32,
    notify: Notify,
}

/// Cancellation shared between the caller, signal handlers and the engine's workers.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<Inner>);

impl Cancel {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels, remembering which signal asked for it (first one wins).
    /// Async-signal-safe apart from the notify, which only touches atomics.
    /// `0` cancels without a signal, like [`abort`](Self::abort).
    pub fn trigger(&self, signal: i32) {
        let sig = if signal == 0 { NO_SIGNAL } else { signal };
        if self
            .0
            .signal
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.0.notify.notify_waiters();
        }
    }

    /// Cancels without a signal (a caller stopping a server, a worker stopping the
    /// others after a failure); [`check`](Self::check) then fails with [`Error::Aborted`].
    pub fn abort(&self) {
        self.trigger(0);
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.signal.load(Ordering::SeqCst) != 0
    }

    /// The signal that cancelled (`-1` for a cancel without a signal).
    pub fn signal(&self) -> Option<i32> {
        match self.0.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Resolves when cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// `Err` when cancelled: [`Error::Cancelled`] with the signal, or [`Error::Aborted`]
    /// for a cancel without one.
    pub fn check(&self) -> Result<()> {
        match self.signal() {
            None => Ok(()),
            Some(s) => Err(Error::cancelled(s)),
        }
    }
}
