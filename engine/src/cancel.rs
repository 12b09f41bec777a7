//! `Cancel`: a cloneable cancellation token. Signal handlers call `trigger(sig)`;
//! blocking workers poll `is_cancelled()` between chunks, async ones await `cancelled()`.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    /// 0 = not cancelled; otherwise the signal number (or -1 for a plain cancel).
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
    pub fn trigger(&self, signal: i32) {
        let sig = if signal == 0 { -1 } else { signal };
        if self
            .0
            .signal
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.0.notify.notify_waiters();
        }
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

    /// `Err(Cancelled)` when cancelled.
    pub fn check(&self) -> crate::Result<()> {
        match self.signal() {
            None => Ok(()),
            Some(s) => Err(crate::Error::Cancelled(s)),
        }
    }
}
