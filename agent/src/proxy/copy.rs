//! Bidirectional copy with half-close: when one side finishes sending, the
//! other side's write half is shut down and the reverse direction continues.
//! Byte counters are updated per read, so live views see progress.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 64 * 1024;

async fn one_way<R, W>(mut r: R, mut w: W, count: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction open.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copies both ways until both directions end, or until either fails: an
/// error (a reset, say) on one side ends the whole connection at once, since
/// the other side would otherwise wait forever for an EOF that never comes.
/// `up` counts a -> b bytes, `down` counts b -> a.
pub async fn bidi<A, B>(a: A, b: B, up: &AtomicU64, down: &AtomicU64) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let to_b = one_way(ar, bw, up);
    let to_a = one_way(br, aw, down);
    tokio::pin!(to_b, to_a);
    tokio::select! {
        r = &mut to_b => { r?; to_a.await }
        r = &mut to_a => { r?; to_b.await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close() {
        let (mut client, a) = duplex(1024);
        let (b, mut server) = duplex(1024);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let proxy = async { bidi(a, b, &up, &down).await.unwrap() };
        let ends = async {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            // The reverse direction still works after the client's half-close.
            server.write_all(b"world!").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"world!");
        };
        tokio::join!(proxy, ends);
        assert_eq!((up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)), (5, 6));
    }

    /// A side that fails must not leave the proxy waiting on the other one.
    #[tokio::test]
    async fn an_error_on_one_side_ends_the_connection() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                b: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::task::Poll::Ready(Ok(b.len()))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        // The upstream never sends and never closes: only the error can end this.
        let (_upstream_peer, upstream) = duplex(1024);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), bidi(Broken, upstream, &up, &down)).await;
        assert_eq!(
            r.expect("bidi must not hang").unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }
}
