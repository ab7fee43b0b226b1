//! Bidirectional copy with half-close: when one side finishes sending, the
//! other side's write half is shut down and the reverse direction continues.
//! Byte counters are updated per read, so live views see progress.
//!
//! Each direction's buffer starts at [`MIN_BUF`] and doubles, up to
//! [`MAX_BUF`], each time a read fills it: a connection that is idle or
//! carries small request/response messages holds 2 × 4 KiB, a bulk transfer
//! reads 64 KiB at a time after four full reads. With a fixed 64 KiB each
//! way, 10,000 connections held open from one pod took the agent to 1.2 GB
//! of RSS (tests/tests/delivery.rs; figures in docs/security.md).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MIN_BUF: usize = 4 * 1024;
const MAX_BUF: usize = 64 * 1024;

/// The buffer's next size after a read of `n` bytes into `len`.
fn next_len(len: usize, n: usize) -> usize {
    if n == len {
        (len * 2).min(MAX_BUF)
    } else {
        len
    }
}

async fn one_way<R, W>(mut r: R, mut w: W, count: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction open.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        let len = next_len(buf.len(), n);
        if len != buf.len() {
            buf.resize(len, 0);
        }
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

    #[test]
    fn buffers_grow_on_full_reads_only_up_to_the_cap() {
        assert_eq!(next_len(MIN_BUF, 100), MIN_BUF);
        assert_eq!(next_len(MIN_BUF, MIN_BUF), 2 * MIN_BUF);
        let mut len = MIN_BUF;
        for _ in 0..10 {
            len = next_len(len, len);
        }
        assert_eq!(len, MAX_BUF);
    }

    /// A bulk transfer larger than every buffer size arrives whole.
    #[tokio::test]
    async fn a_bulk_copy_arrives_whole_while_buffers_grow() {
        let (mut client, a) = duplex(256 * 1024);
        let (b, mut server) = duplex(256 * 1024);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let proxy = async { bidi(a, b, &up, &down).await.unwrap() };
        let ends = async {
            let send = async {
                client.write_all(&data).await.unwrap();
                client.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.shutdown().await.unwrap();
                got
            };
            let ((), got) = tokio::join!(send, recv);
            assert!(got == data, "{} bytes arrived of {}", got.len(), data.len());
        };
        tokio::join!(proxy, ends);
        assert_eq!(up.load(Ordering::Relaxed), data.len() as u64);
    }
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
