//! A client that stops taking reply bytes must not hold the server: its read
//! payload in flight counts against the budget every client shares (64 MiB), so two
//! connections that pipeline 32 MiB reads and never read their socket stalled every
//! other client's reads indefinitely. [`StallGuard`] fails a write (and a flush) that
//! makes no progress for a while with `TimedOut`; the reply task that hit it closes
//! its connection, which releases the budget.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A stream whose writes fail after `limit` without progress; reads pass through.
pub(super) struct StallGuard<S> {
    inner: S,
    limit: Duration,
    /// Running while a write or flush is pending; reset by any progress.
    timer: Option<Pin<Box<Sleep>>>,
    /// Timed out once: every later write fails at once (a reply may be cut in half,
    /// and replies queued behind it must not wait the limit again, each).
    dead: bool,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            dead: false,
        }
    }

    /// After the inner stream said `Pending`: still waiting, or the limit passed.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.timer = None;
                self.dead = true;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client took no reply bytes for {} s",
                        limit.as_secs_f64()
                    ),
                )))
            }
        }
    }

    fn dead<T>(&self) -> Option<Poll<io::Result<T>>> {
        self.dead.then(|| {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "an earlier reply timed out",
            )))
        })
    }

    fn progressed<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(d) = self.dead() {
            return d;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(d) = self.dead() {
            return d;
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progressed(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_peer_that_reads_nothing_times_out_one_that_reads_does_not() {
        let limit = Duration::from_millis(300);
        let (a, _idle) = tokio::io::duplex(8192);
        let mut g = StallGuard::new(a, limit);
        let e = g.write_all(&[7u8; 64 * 1024]).await.expect_err("stalled");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let t = std::time::Instant::now();
        assert!(g.write_all(b"next reply").await.is_err());
        assert!(t.elapsed() < limit, "a dead stream fails at once");
        // a reader that keeps taking bytes, more slowly than the limit in all, is served
        let (a, mut b) = tokio::io::duplex(8192);
        let mut g = StallGuard::new(a, limit);
        let slow = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 8192];
            while got < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got += b.read(&mut buf).await.expect("read");
            }
            got
        });
        g.write_all(&[7u8; 64 * 1024])
            .await
            .expect("slow but moving");
        g.flush().await.expect("flush");
        assert_eq!(slow.await.expect("join"), 64 * 1024);
    }
}
