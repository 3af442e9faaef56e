//! A migration link's bandwidth cap: [`RateLimited`] wraps a stream and paces its writes to a
//! fixed byte rate (reads pass through). Operators cap a migration so it leaves room for the
//! guests' own traffic (QEMU calls this `max-bandwidth`); tests and benchmarks use it to model a
//! slow link on loopback. This module owns pacing only: it must not buffer or reorder bytes.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest write passed through at once, and the burst allowed above the average rate.
const BURST: u64 = 64 * 1024;

/// A stream whose writes average at most `rate` bytes per second (with a 64 KiB burst).
pub struct RateLimited<S> {
    inner: S,
    rate: f64,
    start: Instant,
    sent: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> RateLimited<S> {
    /// Pace writes to `rate` bytes per second; `rate` must be positive.
    pub fn new(inner: S, rate: u64) -> Self {
        assert!(rate > 0, "a rate limit of 0 bytes/s would never send");
        Self { inner, rate: rate as f64, start: Instant::now(), sent: 0, sleep: None }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RateLimited<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RateLimited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            if let Some(s) = self.sleep.as_mut() {
                ready!(s.as_mut().poll(cx));
                self.sleep = None;
            }
            let budget = (self.start.elapsed().as_secs_f64() * self.rate) as u64 + BURST;
            let allowed = budget.saturating_sub(self.sent);
            if allowed == 0 {
                // Sleep until the next 4 KiB is due (at least 1 ms).
                let wait = Duration::from_secs_f64(4096.0 / self.rate).max(Duration::from_millis(1));
                self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                continue;
            }
            let n = buf.len().min(allowed.min(BURST) as usize);
            let r = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..n]));
            if let Ok(k) = &r {
                self.sent += *k as u64;
            }
            return Poll::Ready(r);
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_average_the_rate() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut limited = RateLimited::new(a, 1 << 20);
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            b.read_to_end(&mut buf).await.map(|_| buf.len())
        });
        let started = Instant::now();
        // 64 KiB burst + 512 KiB at 1 MiB/s: about half a second.
        limited.write_all(&vec![7u8; 576 * 1024]).await.unwrap();
        limited.shutdown().await.unwrap();
        drop(limited);
        assert_eq!(reader.await.unwrap().unwrap(), 576 * 1024);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "paced too fast: {took:?}");
    }
}
