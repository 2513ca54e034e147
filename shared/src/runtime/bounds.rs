//! What one client may hold of a server: connections (per process and per
//! remote address), calls open at once per remote address, how long any
//! stream lives, and the bytes of request bodies buffered at once.
//!
//! Connections beyond a cap are closed as soon as they are accepted (before
//! any TLS or HTTP/2 work); calls beyond a cap are answered at once with
//! `RESOURCE_EXHAUSTED` and hold nothing afterwards.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::{Bytes, http};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Counts held per key (a remote address) and in total; a slot is given
/// back when its guard drops.
#[derive(Debug)]
pub struct Slots {
    total_max: usize,
    per_key_max: usize,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    by_key: HashMap<IpAddr, usize>,
}

/// Why a slot was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    PerAddress,
}

impl Slots {
    pub fn new(total_max: usize, per_key_max: usize) -> Arc<Self> {
        Arc::new(Self {
            total_max: total_max.max(1),
            per_key_max: per_key_max.max(1),
            state: Mutex::new(SlotState::default()),
        })
    }

    /// Takes a slot for `address`, or says which cap is reached. IPv6
    /// addresses count per /64 (what one host is usually given).
    pub fn try_take(self: &Arc<Self>, address: IpAddr) -> Result<SlotGuard, Full> {
        self.try_take_n(address, 1)
    }

    /// Takes `n` units (bytes) for `address` at once.
    pub fn try_take_n(self: &Arc<Self>, address: IpAddr, n: usize) -> Result<SlotGuard, Full> {
        let key = address_key(address);
        let mut state = self.state.lock().unwrap();
        if state.total.saturating_add(n) > self.total_max {
            return Err(Full::Total);
        }
        let held = state.by_key.entry(key).or_insert(0);
        if held.saturating_add(n) > self.per_key_max {
            if *held == 0 {
                state.by_key.remove(&key);
            }
            return Err(Full::PerAddress);
        }
        *held += n;
        state.total += n;
        Ok(SlotGuard {
            slots: self.clone(),
            key,
            n,
        })
    }

    /// Slots held now (for tests and metrics).
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().total
    }
}

/// What a remote address counts as: itself (IPv4), or its /64 (IPv6).
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// One slot; given back on drop.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Arc<Slots>,
    key: IpAddr,
    n: usize,
}

impl SlotGuard {
    /// Holds `other`'s units too (taken from the same slots and address).
    pub fn merge(&mut self, mut other: SlotGuard) {
        debug_assert!(Arc::ptr_eq(&self.slots, &other.slots) && self.key == other.key);
        self.n += std::mem::take(&mut other.n);
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        let mut state = self.slots.state.lock().unwrap();
        state.total -= self.n;
        if let Some(held) = state.by_key.get_mut(&self.key) {
            *held -= self.n;
            if *held == 0 {
                state.by_key.remove(&self.key);
            }
        }
    }
}

/// The accepted connections, less those beyond the caps: those are closed
/// at once (dropped), which costs the server an accept and a close.
pub struct LimitedIncoming<S> {
    inner: S,
    slots: Arc<Slots>,
    service: &'static str,
}

impl<S> LimitedIncoming<S> {
    pub fn new(inner: S, slots: Arc<Slots>, service: &'static str) -> Self {
        Self {
            inner,
            slots,
            service,
        }
    }
}

impl<S> Stream for LimitedIncoming<S>
where
    S: Stream<Item = io::Result<TcpStream>> + Unpin,
{
    type Item = io::Result<Counted<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let stream = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => stream,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            let Ok(peer) = stream.peer_addr() else {
                continue; // gone already
            };
            match self.slots.try_take(peer.ip()) {
                Ok(guard) => {
                    return Poll::Ready(Some(Ok(Counted {
                        io: stream,
                        _guard: guard,
                    })));
                }
                Err(full) => {
                    let cap = match full {
                        Full::Total => "total",
                        Full::PerAddress => "per_address",
                    };
                    metrics::counter!("grpc_server_connections_refused_total",
                        "service" => self.service, "cap" => cap)
                    .increment(1);
                    tracing::debug!(peer = %peer, cap, "connection refused: at the cap");
                    // Closed at once with a reset: no TIME_WAIT kept here.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                }
            }
        }
    }
}

/// A connection holding its slot until it is dropped.
pub struct Counted<IO> {
    io: IO,
    _guard: SlotGuard,
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The remote address of a call's connection (plaintext or TLS).
pub fn remote_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The most request bytes one stream of health or reflection may send over
/// its life (their requests are a few hundred bytes each).
pub const MAX_STREAM_REQUEST_BYTES: usize = 64 * 1024;

/// The request body of a stream that is not read ahead (health,
/// reflection): its bytes are charged to the server's request buffer
/// budget until the handler lets the body go, at most
/// [`MAX_STREAM_REQUEST_BYTES`] of them; and it ends with
/// `DEADLINE_EXCEEDED` once the stream's lifetime is over, so a handler
/// waiting for the next message lets go.
pub struct StreamRequest {
    inner: tonic::body::Body,
    sleep: Pin<Box<Sleep>>,
    budget: Arc<Slots>,
    address: IpAddr,
    charged: Option<SlotGuard>,
    received: usize,
    done: bool,
}

impl StreamRequest {
    pub fn new(
        inner: tonic::body::Body,
        deadline: Instant,
        budget: Arc<Slots>,
        address: IpAddr,
    ) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            budget,
            address,
            charged: None,
            received: 0,
            done: false,
        }
    }

    fn fail(&mut self, status: tonic::Status) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.done = true;
        self.charged = None;
        Poll::Ready(Some(Err(status)))
    }
}

impl HttpBody for StreamRequest {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            return self.fail(tonic::Status::deadline_exceeded(
                "the stream reached its lifetime",
            ));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            self.received += data.len();
            if self.received > MAX_STREAM_REQUEST_BYTES {
                return self.fail(tonic::Status::resource_exhausted(format!(
                    "a stream may send at most {MAX_STREAM_REQUEST_BYTES} bytes"
                )));
            }
            let n = data.len();
            if n > 0 {
                match self.budget.try_take_n(self.address, n) {
                    Ok(permit) => match &mut self.charged {
                        Some(held) => held.merge(permit),
                        None => self.charged = Some(permit),
                    },
                    Err(_) => {
                        return self.fail(tonic::Status::resource_exhausted(
                            "the server's request buffer is full; retry shortly",
                        ));
                    }
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body was not buffered.
#[derive(Debug)]
pub enum BufferRefusal {
    /// Larger than the largest request a service reads.
    TooLarge,
    /// The server's request buffer budget is spent.
    BudgetSpent,
    /// The body failed (the client reset the stream).
    Failed(String),
}

/// Reads a whole request body of at most `max` bytes, charging each byte
/// to `budget` (for `address`) as it arrives; the charge is held by the
/// returned guard.
pub async fn buffer_body(
    mut body: tonic::body::Body,
    max: usize,
    budget: &Arc<Slots>,
    address: IpAddr,
) -> Result<(Bytes, Option<SlotGuard>), BufferRefusal> {
    use http_body_util::BodyExt;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut charged: Option<SlotGuard> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BufferRefusal::Failed(e.message().to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: a unary request has none that matter
        };
        if data.is_empty() {
            continue;
        }
        len += data.len();
        if len > max {
            return Err(BufferRefusal::TooLarge);
        }
        let permit = budget
            .try_take_n(address, data.len())
            .map_err(|_| BufferRefusal::BudgetSpent)?;
        match &mut charged {
            Some(held) => held.merge(permit),
            None => charged = Some(permit),
        }
        chunks.push(data);
    }
    let bytes = if chunks.len() == 1 {
        chunks.pop().unwrap()
    } else {
        let mut all = Vec::with_capacity(len);
        for chunk in &chunks {
            all.extend_from_slice(chunk);
        }
        Bytes::from(all)
    };
    Ok((bytes, charged))
}

/// A response body that ends with `DEADLINE_EXCEEDED` trailers once its
/// stream's lifetime is over, and holds what the call holds (its slot of
/// the caller's address) until hyper drops it: when the stream is over.
pub struct ResponseDeadline {
    inner: tonic::body::Body,
    sleep: Pin<Box<Sleep>>,
    lifetime: Duration,
    state: ResponseState,
    _held: Option<SlotGuard>,
}

#[derive(PartialEq, Eq)]
enum ResponseState {
    Streaming,
    /// The inner body ended (its trailers passed through).
    Ended,
    /// The lifetime ran out: our trailers were sent.
    Cut,
}

impl ResponseDeadline {
    pub fn new(
        inner: tonic::body::Body,
        deadline: Instant,
        lifetime: Duration,
        held: Option<SlotGuard>,
    ) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            lifetime,
            state: ResponseState::Streaming,
            _held: held,
        }
    }
}

impl HttpBody for ResponseDeadline {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.state != ResponseState::Streaming {
            return Poll::Ready(None);
        }
        // The deadline first: when the request side ended at the same
        // deadline, the handler's own (OK) end is not what happened.
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.state = ResponseState::Cut;
            let status = tonic::Status::deadline_exceeded(format!(
                "the stream reached its lifetime of {:?}; open a new one",
                self.lifetime
            ));
            let mut trailers = http::HeaderMap::new();
            if status.add_header(&mut trailers).is_err() {
                trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.state = ResponseState::Ended;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // An empty inner body (a trailers-only error) must say so: its
        // status is in the headers, and a client expects END_STREAM there.
        self.state != ResponseState::Streaming || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_per_address_and_in_total_and_come_back() {
        let slots = Slots::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = slots.try_take(a).unwrap();
        let _a2 = slots.try_take(a).unwrap();
        assert_eq!(slots.try_take(a).unwrap_err(), Full::PerAddress);
        let _b1 = slots.try_take(b).unwrap();
        assert_eq!(slots.try_take(b).unwrap_err(), Full::Total);
        drop(a1);
        assert_eq!(slots.held(), 2);
        let _b2 = slots.try_take(b).unwrap();
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let slots = Slots::new(10, 1);
        let _one = slots.try_take("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            slots
                .try_take("2001:db8::ffff:1".parse().unwrap())
                .unwrap_err(),
            Full::PerAddress
        );
        let _other = slots.try_take("2001:db8:0:1::1".parse().unwrap()).unwrap();
    }
}
