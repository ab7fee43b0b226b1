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
//!
//! Between two TCP sockets (a same-node connection, a plaintext inbound one,
//! a direct one), a direction whose read fills [`MAX_BUF`] is bulk: it goes
//! on with `splice(2)` through a pipe of its own, so the kernel moves the
//! socket's pages to the other socket and no byte is copied through user
//! space. Small messages never pay for the pipe (two descriptors), and the
//! buffer is freed when the pipe takes over.

use std::{
    any::Any,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest},
    net::TcpStream,
};

use crate::tunnel::BoxStream;

const MIN_BUF: usize = 4 * 1024;
const MAX_BUF: usize = 64 * 1024;

/// Bytes moved by `splice(2)` in this process (`ferry_relay_spliced_bytes_total`).
static SPLICED: AtomicU64 = AtomicU64::new(0);

/// Bytes every relay in this process has moved with `splice(2)`.
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

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
/// `up` counts a -> b bytes, `down` counts b -> a. Two TCP sockets (also
/// boxed as a tunnel [`BoxStream`]) are relayed by [`bidi_tcp`].
pub async fn bidi<A, B>(a: A, b: B, up: &AtomicU64, down: &AtomicU64) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (mut a, mut b) = (Some(a), Some(b));
    if is_tcp(&a) && is_tcp(&b) {
        if let (Some(a), Some(b)) = (take_tcp(&mut a), take_tcp(&mut b)) {
            return bidi_tcp(&a, &b, up, down).await;
        }
    }
    match (a, b) {
        (Some(a), Some(b)) => buffered(a, b, up, down).await,
        _ => Err(std::io::Error::other("relay: a stream was lost telling TCP apart")),
    }
}

/// Whether `slot` holds a TCP socket, as itself or boxed.
fn is_tcp<S: 'static>(slot: &Option<S>) -> bool {
    let any = slot as &dyn Any;
    any.downcast_ref::<Option<TcpStream>>().is_some_and(Option::is_some)
        || any
            .downcast_ref::<Option<BoxStream>>()
            .and_then(Option::as_ref)
            .is_some_and(|s| s.as_any().is::<TcpStream>())
}

/// Takes the TCP socket out of `slot` if [`is_tcp`]; leaves anything else.
fn take_tcp<S: 'static>(slot: &mut Option<S>) -> Option<TcpStream> {
    if !is_tcp(slot) {
        return None;
    }
    let any = slot as &mut dyn Any;
    if let Some(t) = any.downcast_mut::<Option<TcpStream>>() {
        return t.take();
    }
    let boxed = any.downcast_mut::<Option<BoxStream>>()?.take()?;
    boxed.into_any().downcast::<TcpStream>().ok().map(|t| *t)
}

/// [`bidi`] through user-space buffers, for any pair of streams.
async fn buffered<A, B>(a: A, b: B, up: &AtomicU64, down: &AtomicU64) -> std::io::Result<()>
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

/// [`bidi`] between two TCP sockets: each direction starts buffered and
/// turns to `splice(2)` once it is bulk.
pub async fn bidi_tcp(a: &TcpStream, b: &TcpStream, up: &AtomicU64, down: &AtomicU64) -> std::io::Result<()> {
    let to_b = one_way_tcp(a, b, up);
    let to_a = one_way_tcp(b, a, down);
    tokio::pin!(to_b, to_a);
    tokio::select! {
        r = &mut to_b => { r?; to_a.await }
        r = &mut to_a => { r?; to_b.await }
    }
}

/// One direction between TCP sockets: as [`one_way`] until a read fills
/// [`MAX_BUF`], then by [`splice_all`] if a pipe can be had.
async fn one_way_tcp(r: &TcpStream, w: &TcpStream, count: &AtomicU64) -> std::io::Result<()> {
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let n = read_some(r, &mut buf).await?;
        if n == 0 {
            return shutdown_write(w);
        }
        write_all(w, &buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == MAX_BUF {
            // Bulk: without a pipe (out of descriptors) stay buffered.
            if let Ok(pipe) = Pipe::new() {
                drop(buf);
                return splice_all(r, w, &pipe, count).await;
            }
        }
        let len = next_len(buf.len(), n);
        if len != buf.len() {
            buf.resize(len, 0);
        }
    }
}

async fn read_some(r: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        r.readable().await?;
        match r.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

async fn write_all(w: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        w.writable().await?;
        match w.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes the EOF on: the reverse direction stays open.
fn shutdown_write(w: &TcpStream) -> std::io::Result<()> {
    match socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write) {
        // The peer is already gone: the other direction will say so.
        Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

/// A pipe for one direction's splices; both ends close on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to`, neither blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: splice reads and writes only the two descriptors it is
    // given, with no offsets (both are a pipe or a socket).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Socket to pipe to socket until EOF. The pipe is empty at every read, so
/// an `EAGAIN` from the read side is the socket's (no data), and one from
/// the write side is the socket's (send buffer full): each clears only the
/// readiness it is about.
async fn splice_all(r: &TcpStream, w: &TcpStream, pipe: &Pipe, count: &AtomicU64) -> std::io::Result<()> {
    let (rfd, wfd) = (r.as_raw_fd(), w.as_raw_fd());
    loop {
        let n = loop {
            r.readable().await?;
            match r.try_io(Interest::READABLE, || splice(rfd, pipe.write.as_raw_fd(), PIPE_LEN)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                done => break done?,
            }
        };
        if n == 0 {
            return shutdown_write(w);
        }
        let mut left = n;
        while left > 0 {
            w.writable().await?;
            match w.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), wfd, left)) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        SPLICED.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The most one splice asks for: a default pipe holds 16 pages.
const PIPE_LEN: usize = 1 << 20;

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

    /// Two real TCP connections (client <-> a, b <-> server) relayed by
    /// `bidi`: both bulk directions arrive whole, in order, across the
    /// switch from buffers to splice(2), with half-close passed on and
    /// every byte counted; most of them spliced.
    #[tokio::test]
    async fn tcp_to_tcp_bulk_is_spliced_whole_with_half_close() {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (c, l.accept().await.unwrap().0)
        }
        let ((mut client, a), (b, mut server)) = (pair().await, pair().await);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let there: Vec<u8> = (0..8_000_017u32).map(|i| (i % 251) as u8).collect();
        let back: Vec<u8> = (0..3_000_029u32).map(|i| (i % 241) as u8).collect();
        let before = spliced_bytes();
        let proxy = async { bidi(a, b, &up, &down).await.unwrap() };
        let ends = async {
            let c = async {
                client.write_all(&there).await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            };
            let s = async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                // The reverse direction still works after the client's half-close.
                server.write_all(&back).await.unwrap();
                server.shutdown().await.unwrap();
                got
            };
            let (at_client, at_server) = tokio::join!(c, s);
            assert!(
                at_server == there,
                "{} bytes arrived of {}",
                at_server.len(),
                there.len()
            );
            assert!(
                at_client == back,
                "{} bytes came back of {}",
                at_client.len(),
                back.len()
            );
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), async { tokio::join!(proxy, ends) })
            .await
            .expect("relay must finish");
        assert_eq!(up.load(Ordering::Relaxed), there.len() as u64);
        assert_eq!(down.load(Ordering::Relaxed), back.len() as u64);
        // Each direction is buffered until a read fills 64 KiB: the first
        // few reads, well under a MiB.
        let buffered_at_most = 2 * 1024 * 1024;
        let spliced = spliced_bytes() - before;
        assert!(
            spliced >= (there.len() + back.len() - buffered_at_most) as u64,
            "only {spliced} bytes spliced"
        );
    }

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
