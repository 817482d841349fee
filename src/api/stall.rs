//! A client connection whose writes may not stall for long.
//!
//! An answer is built whole in memory (`Full<Bytes>`: a state value up to `--max-body`, a page of
//! events of a few MiB) and held until the client has read it. hyper bounds how long a request's
//! head may take, but nothing how long writing an answer may: a client that stops reading (or
//! never sends HTTP/2 window updates) kept its answers, and its connection slot, for as long as
//! it liked. `Stalling` ends the connection once a write has made no progress for `limit`, as
//! nginx's `send_timeout` does; any progress starts the wait again, so a slow but moving client
//! is served. Reads are left alone: idle connections are hyper's (header timeout, HTTP/2 pings).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// How long a write to a client may make no progress before its connection is closed.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

pub struct Stalling<T> {
    inner: T,
    limit: Duration,
    /// Armed when a write first finds the socket full, cleared by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Stalling<T> {
    pub fn new(inner: T, limit: Duration) -> Stalling<T> {
        Stalling { inner, limit, stalled: None }
    }

    /// After a write or flush that made no progress: an error once it has been so for `limit`.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("raftbridge_http_write_stalls_total").increment(1);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("the client read nothing for {limit:?}"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalling<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalling<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A peer that reads nothing ends the connection after the limit; one that reads, however
    /// slowly, keeps it (each read is progress).
    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_for_the_limit_fails() {
        let limit = Duration::from_secs(30);
        let (near, far) = tokio::io::duplex(1024);
        let mut conn = Stalling::new(near, limit);
        let started = tokio::time::Instant::now();
        let err = conn.write_all(&[7u8; 4096]).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), limit, "failed when the limit passed, not before");

        let (near, mut far2) = tokio::io::duplex(1024);
        let mut conn = Stalling::new(near, limit);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 8192];
            let mut n = 0;
            while n < got.len() {
                tokio::time::sleep(Duration::from_secs(20)).await;
                n += far2.read(&mut got[n..]).await.expect("read");
            }
            n
        });
        conn.write_all(&[7u8; 8192]).await.expect("a slow reader is served");
        assert_eq!(reader.await.expect("reader"), 8192);
        drop(far);
    }
}
