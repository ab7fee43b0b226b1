//! Bodies of the L7 path.
//! - [`Tee`]: the client's request body on its way to the first attempt,
//!   counted, and kept (up to [`MAX_REPLAY`]) so that retries and mirrors can
//!   send it again. Nothing waits for the body: it streams as it arrives; a
//!   copy becomes [`Replay::Ready`] only once the whole body went by within
//!   the limit (else [`Replay::Gone`]: no retry, no mirror).
//! - [`replay`]: a kept body, sent again.
//! - [`Counted`]: a response body on its way to the client, counting bytes,
//!   reading `grpc-status` from trailers, and ending the request's record
//!   when it ends (or is dropped).
//! - [`Metered`]: a request body passed on as it comes, counted (the
//!   destination side, which keeps nothing: it does not retry).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    HeaderMap,
};
use tokio::sync::watch;

use crate::telemetry::http::RequestRecord;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the L7 path sends, either way.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Request bodies up to this size are kept for retries and mirrors.
pub const MAX_REPLAY: usize = 64 * 1024;

pub fn empty() -> Body {
    Empty::new().map_err(|n| match n {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed_unsync()
}

/// A whole request body, kept.
#[derive(Debug, Default)]
pub struct Kept {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

/// Whether the request body can be sent again.
#[derive(Clone, Debug)]
pub enum Replay {
    /// Still streaming.
    Pending,
    Ready(Arc<Kept>),
    /// Too large, failed, or abandoned before its end.
    Gone,
}

/// The client's request body, counted and kept. See the module doc.
pub struct Tee {
    inner: Incoming,
    kept: Kept,
    len: usize,
    overflow: bool,
    done: bool,
    tx: watch::Sender<Replay>,
    counted: Arc<std::sync::atomic::AtomicU64>,
}

impl Tee {
    /// Wraps `inner`, counting into `counted`; the receiver tells whether
    /// (and when) the body can be replayed.
    pub fn new(inner: Incoming, counted: Arc<std::sync::atomic::AtomicU64>) -> (Self, watch::Receiver<Replay>) {
        let (tx, rx) = watch::channel(Replay::Pending);
        let mut t = Self {
            inner,
            kept: Kept::default(),
            len: 0,
            overflow: false,
            done: false,
            tx,
            counted,
        };
        if t.inner.is_end_stream() {
            t.finish();
        }
        (t, rx)
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let r = if self.overflow {
            Replay::Gone
        } else {
            Replay::Ready(Arc::new(std::mem::take(&mut self.kept)))
        };
        self.tx.send_replace(r);
    }

    fn fail(&mut self) {
        self.done = true;
        self.tx.send_replace(Replay::Gone);
    }
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.counted.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if !this.overflow {
                        this.len += d.len();
                        if this.len > MAX_REPLAY {
                            this.overflow = true;
                            this.kept = Kept::default();
                        } else {
                            this.kept.data.push(d.clone());
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    this.kept.trailers = Some(t.clone());
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if !self.done {
            self.tx.send_replace(Replay::Gone);
        }
    }
}

/// A kept body, as a body again.
struct ReplayBody {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.trailers.is_none() {
            SizeHint::with_exact(self.data.iter().map(|d| d.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

/// `k` as a body to send again.
pub fn replay(k: &Kept) -> Body {
    ReplayBody {
        data: k.data.iter().cloned().collect(),
        trailers: k.trailers.clone(),
    }
    .boxed_unsync()
}

/// A request body on its way, counting its data bytes into `counted`.
pub struct Metered<B> {
    inner: B,
    counted: Arc<std::sync::atomic::AtomicU64>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, counted: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { inner, counted }
    }
}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.counted.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body on its way to the client. See the module doc.
pub struct Counted<B> {
    inner: B,
    record: Option<RequestRecord>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, record: RequestRecord) -> Self {
        Self {
            inner,
            record: Some(record),
        }
    }
}

/// The `grpc-status` of a header block, if any.
pub fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.record = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.record = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = this.record.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        r.response_bytes += d.len() as u64;
                    } else if let Some(t) = frame.trailers_ref() {
                        if let Some(s) = grpc_status(t) {
                            r.grpc_status = Some(s);
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    this.record = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
