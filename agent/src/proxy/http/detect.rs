//! Protocol detection for ports that do not declare one (`auto`, and pod
//! addresses without a Service): read the client's first bytes for at most
//! [`SNIFF_WAIT`]; an HTTP/1 request line (a known method and a space) or the
//! HTTP/2 preface means HTTP, anything else means opaque TCP, and so does
//! silence (a server-speaks-first protocol such as MySQL or SMTP waits for
//! the server: it costs that client [`SNIFF_WAIT`] once, never more). The
//! bytes read are replayed to whichever path takes the connection
//! ([`Rewind`]). [`classify`] is the pure decision.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::telemetry::http::Detection;

/// How long detection waits for the client's first bytes before treating
/// the connection as opaque TCP. Short enough that a server-speaks-first
/// client barely notices (Linkerd's 10 s is the known pain), long enough for
/// a client that connects and then writes.
pub const SNIFF_WAIT: Duration = Duration::from_millis(100);

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods recognised in a request line. A fixed list rather than "any token
/// and a space", so text protocols (Redis `SET k v`, SMTP `HELO x`) stay TCP.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// The most bytes detection reads: the longest thing it compares against.
const MAX_SNIFF: usize = 24;

/// What the bytes so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Http1,
    Http2,
    Tcp,
    /// A prefix of something recognised: read more.
    NeedMore,
}

/// Classifies a connection's first bytes (pure).
pub fn classify(b: &[u8]) -> Verdict {
    if b.is_empty() {
        return Verdict::NeedMore;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if b.len() >= H2_PREFACE.len() {
            Verdict::Http2
        } else {
            Verdict::NeedMore
        };
    }
    let mut partial = false;
    for m in METHODS {
        if b.starts_with(m) {
            return Verdict::Http1;
        }
        if m.starts_with(b) {
            partial = true;
        }
    }
    if partial {
        Verdict::NeedMore
    } else {
        Verdict::Tcp
    }
}

/// Reads the client's first bytes for up to `wait`. Returns the outcome and
/// the bytes read (to be replayed). A read error counts as TCP: the relay
/// then sees the broken connection itself.
pub async fn sniff<S: AsyncRead + Unpin>(s: &mut S, wait: Duration) -> (Detection, Vec<u8>) {
    let mut buf = Vec::with_capacity(MAX_SNIFF);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match classify(&buf) {
            Verdict::Http1 => return (Detection::Http1, buf),
            Verdict::Http2 => return (Detection::Http2, buf),
            Verdict::Tcp => return (Detection::Tcp, buf),
            Verdict::NeedMore => {}
        }
        let mut chunk = [0u8; MAX_SNIFF];
        let want = MAX_SNIFF - buf.len();
        match tokio::time::timeout_at(deadline, s.read(&mut chunk[..want])).await {
            Err(_) => return (Detection::Timeout, buf),
            Ok(Ok(0)) | Ok(Err(_)) => return (Detection::Tcp, buf),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A stream that first yields `prefix` (bytes already read), then reads
/// from the inner stream. Writes go straight through.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncWriteExt};

    #[test]
    fn classifies_request_lines_preface_and_others() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Verdict::Http1);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Verdict::Http1);
        assert_eq!(classify(H2_PREFACE), Verdict::Http2);
        assert_eq!(classify(b"PRI * HT"), Verdict::NeedMore);
        assert_eq!(classify(b"PO"), Verdict::NeedMore);
        assert_eq!(classify(b"GET"), Verdict::NeedMore);
        // Text protocols with a token and a space are not HTTP.
        assert_eq!(classify(b"SET key value\r\n"), Verdict::Tcp);
        assert_eq!(classify(b"HELO mail\r\n"), Verdict::Tcp);
        assert_eq!(classify(b"get / HTTP/1.1"), Verdict::Tcp);
        assert_eq!(classify(b"\x16\x03\x01"), Verdict::Tcp, "TLS");
    }

    #[tokio::test]
    async fn silence_is_tcp_after_the_wait_and_bytes_are_replayed() {
        let (mut client, mut server) = duplex(1024);
        let t = tokio::time::Instant::now();
        let (d, buf) = sniff(&mut server, Duration::from_millis(50)).await;
        assert_eq!((d, buf.len()), (Detection::Timeout, 0));
        assert!(t.elapsed() < Duration::from_secs(2));
        client.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        let (d, buf) = sniff(&mut server, SNIFF_WAIT).await;
        assert_eq!(d, Detection::Http1);
        let mut r = Rewind::new(buf, server);
        let mut got = vec![0u8; 18];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"POST /x HTTP/1.1\r\n");
    }
}
