//! Server bootstrap shared by the three services: grpc.health.v1 (following
//! Redis reachability), server reflection v1 and v1alpha (grpcurl 1.8 speaks
//! only v1alpha), a per-call deadline, load shedding with RetryInfo, one
//! tracing span per call, RPC metrics, and graceful shutdown: NOT_SERVING
//! first, then drain in-flight calls, within a bound.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::contract::error::ApiError;
use crate::runtime::auth::Security;
use crate::runtime::auth::access::{Access, Decision, Table};
use crate::runtime::bounds::{
    BufferRefusal, LimitedIncoming, ResponseDeadline, Slots, StreamRequest, buffer_body,
    remote_addr,
};
use crate::runtime::context::{CallContext, TRACEPARENT, TraceContext};
use crate::state::storage::Redis;

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Limits every server applies.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Upper bound on any call; a shorter client deadline wins.
    pub request_timeout: Duration,
    /// Calls served at once across all connections; more are shed with
    /// RESOURCE_EXHAUSTED and RetryInfo instead of queueing.
    pub max_concurrent_requests: usize,
    /// How long shutdown waits for in-flight calls before giving up on them.
    pub shutdown_grace: Duration,
    /// How long to keep serving after reporting NOT_SERVING, so load
    /// balancers stop sending new calls before we stop accepting them.
    pub shutdown_delay: Duration,
    /// How long a call's request body may take to arrive after its headers;
    /// a call holds no concurrency permit before its body is in.
    pub body_read_timeout: Duration,
    /// Connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Connections open at once from one remote (IP) address.
    pub max_connections_per_address: usize,
    /// Calls (streams) open at once from one remote address, whatever
    /// their state (waiting for a body, served, streaming); more are
    /// answered RESOURCE_EXHAUSTED at once.
    pub max_calls_per_address: usize,
    /// Health and reflection calls (served without credentials) open at
    /// once in all, and from one remote address.
    pub max_public_calls: usize,
    pub max_public_calls_per_address: usize,
    /// The longest any stream stays open (server reflection, health
    /// watches): it then ends with DEADLINE_EXCEEDED.
    pub stream_lifetime: Duration,
    /// Request bytes buffered at once by pending calls (bodies read ahead
    /// until the call has its concurrency slot, health and reflection
    /// messages); a call that would go beyond it is answered
    /// RESOURCE_EXHAUSTED. One remote address holds at most a quarter.
    pub request_buffer_bytes: usize,
}

/// The largest request a service reads (every request of ours is far
/// smaller: an 8,000-character body is at most 32 KB).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// The largest response a service sends (pages stay within their budget).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// One remote address may hold at most this fraction (1/n) of the request
/// buffer budget, so one client cannot spend it for everyone.
const BUFFER_SHARES_PER_ADDRESS: usize = 4;
/// Concurrent HTTP/2 streams one connection may open.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Streams a client may reset before the server stops accepting them.
const MAX_PENDING_RESETS: usize = 64;
/// The largest header block a client may send.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// HTTP/2 keepalive: ping an idle connection this often, drop it when the
/// ping is not answered within the timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake that takes longer is dropped (slow or stalled clients).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 1024,
            shutdown_grace: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            body_read_timeout: Duration::from_secs(5),
            max_connections: 2048,
            max_connections_per_address: 256,
            max_calls_per_address: 1024,
            max_public_calls: 1024,
            max_public_calls_per_address: 64,
            stream_lifetime: Duration::from_secs(300),
            request_buffer_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The health every registered service reports: SERVING only while Redis
/// answers and the server is not shutting down.
#[derive(Clone)]
pub struct HealthGate {
    reporter: HealthReporter,
    names: Arc<Mutex<Vec<String>>>,
    state: Arc<Mutex<GateState>>,
    /// Held across one publication (the status read and reported as one
    /// step, so a stale SERVING cannot land after a drain's NOT_SERVING);
    /// holds what was last reported, and for how many names.
    published: Arc<tokio::sync::Mutex<Option<(ServingStatus, ServingStatus, usize)>>>,
}

/// The health service name that reports whether Redis takes writes: NOT_SERVING
/// while it is full (at maxmemory) though reads go on and the service as a
/// whole stays SERVING (README.md, "Abuse bounds").
pub const WRITES_HEALTH: &str = "writes";

#[derive(Debug, Clone, Copy)]
struct GateState {
    /// Redis refuses writes for want of memory.
    storage_full: bool,
    redis_ok: bool,
    /// Whether Redis was asked yet (so the first answer is logged, down
    /// as well as up).
    redis_known: bool,
    draining: bool,
}

impl HealthGate {
    fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            names: Arc::new(Mutex::new(vec![String::new()])),
            state: Arc::new(Mutex::new(GateState {
                storage_full: false,
                redis_ok: false,
                redis_known: false,
                draining: false,
            })),
            published: Arc::default(),
        }
    }

    fn register(&self, name: &str) {
        self.names.lock().unwrap().push(name.to_string());
    }

    /// Whether Redis has answered (or failed to) at least once.
    fn redis_known(&self) -> bool {
        self.state.lock().unwrap().redis_known
    }

    /// Whether the services report SERVING.
    pub fn is_serving(&self) -> bool {
        let state = *self.state.lock().unwrap();
        state.redis_ok && !state.draining
    }

    /// `error`: why Redis did not answer, when it did not.
    pub async fn set_redis_ok(&self, ok: bool, error: Option<&str>) {
        let changed = {
            let mut state = self.state.lock().unwrap();
            let changed = state.redis_ok != ok || !state.redis_known;
            state.redis_ok = ok;
            state.redis_known = true;
            changed
        };
        if changed {
            if ok {
                tracing::info!("redis reachable: SERVING");
            } else {
                tracing::warn!(
                    error = error.unwrap_or("no answer"),
                    "redis unreachable: NOT_SERVING until it answers"
                );
            }
        }
        self.publish().await;
    }

    /// Follows [`crate::contract::error::storage_full`]: logs and publishes a change.
    pub async fn set_storage_full(&self, full: bool) {
        let changed = {
            let mut state = self.state.lock().unwrap();
            let changed = state.storage_full != full;
            state.storage_full = full;
            changed
        };
        metrics::gauge!("inmail_storage_full").set(if full { 1.0 } else { 0.0 });
        if changed {
            if !full {
                tracing::info!("redis takes writes again");
            }
            self.publish().await;
        }
    }

    pub async fn begin_drain(&self) {
        self.state.lock().unwrap().draining = true;
        self.publish().await;
    }

    /// Reports the current status, once per change: watchers see each
    /// transition once, and in the order the state changed.
    async fn publish(&self) {
        let mut published = self.published.lock().await;
        let status = if self.is_serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let writes = if status == ServingStatus::Serving && !self.state.lock().unwrap().storage_full
        {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let names = self.names.lock().unwrap().clone();
        if *published == Some((status, writes, names.len())) {
            return;
        }
        for name in &names {
            self.reporter.set_service_status(name, status).await;
        }
        self.reporter
            .set_service_status(WRITES_HEALTH, writes)
            .await;
        *published = Some((status, writes, names.len()));
    }
}

/// Missed pings in a row that turn health NOT_SERVING: one answer slowed by
/// a loaded machine (an fsync stall, a busy core) does not take a replica
/// out of rotation; a Redis that is down does within about five intervals
/// of its last answer (two skipped checks, then two missed pings).
const MISSES_TO_NOT_SERVING: u32 = 2;

/// Pings Redis every `interval` and moves health with the answers, until
/// `stop` is cancelled. A single Redis that answered any command of the
/// service within the last two intervals (a call, a sweep round, the last
/// ping; not an error reply) is not pinged: that answer says as much, and
/// an idle replica's sweeps then keep its health without adding load to
/// Redis. A cluster is always pinged: the ping goes to every primary, and
/// an answer from one says nothing of the others. Once a command failed
/// without an answer (Redis went away), every connection of the service is
/// pinged until all of them answer in one check ([`Redis::check`]), so
/// health turns SERVING only when none of them still holds the failure.
pub fn spawn_redis_watch(
    redis: Redis,
    gate: HealthGate,
    interval: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut misses = 0u32;
        loop {
            let ping = tokio::time::timeout(interval.max(Duration::from_millis(200)), async {
                if redis.needs_check() {
                    return redis.check().await;
                }
                if !redis.is_cluster() && redis.answered_within(interval * 2) {
                    return Ok(());
                }
                redis.ping().await
            });
            let error = tokio::select! {
                result = ping => match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("PING timed out".to_string()),
                },
                () = stop.cancelled() => return,
            };
            if gate.state.lock().unwrap().draining {
                return;
            }
            gate.set_storage_full(crate::contract::error::storage_full())
                .await;
            match &error {
                None => {
                    misses = 0;
                    gate.set_redis_ok(true, None).await;
                }
                Some(e) => {
                    misses += 1;
                    // At start, the first answer decides.
                    if misses >= MISSES_TO_NOT_SERVING || !gate.redis_known() {
                        gate.set_redis_ok(false, Some(e)).await;
                    } else {
                        tracing::debug!(error = %e, "redis missed a ping");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
        }
    });
}

/// Collects a service's gRPC services and serves them with the shared
/// middleware.
pub struct GrpcServer {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    gate: HealthGate,
    limits: ServerLimits,
    service: &'static str,
    security: Security,
    access: Access,
    reflection: bool,
}

impl GrpcServer {
    /// `service` labels metrics and logs (e.g. "billing-credits").
    pub fn new(service: &'static str, limits: ServerLimits, security: Security) -> Self {
        let reporter = HealthReporter::new();
        let gate = HealthGate::new(reporter.clone());
        let mut routes = RoutesBuilder::default();
        routes.add_service(tonic_health::pb::health_server::HealthServer::new(
            HealthService::from_health_reporter(reporter),
        ));
        Self {
            routes,
            names: Vec::new(),
            gate,
            limits,
            service,
            security,
            access: Access::new(),
            reflection: true,
        }
    }

    /// Whether server reflection is served (on by default: grpcurl needs it).
    pub fn reflection(&mut self, on: bool) -> &mut Self {
        self.reflection = on;
        self
    }

    /// The access table in force (for tests of its completeness).
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Adds a service and its access table: who may call each of its
    /// methods.
    pub fn add_service<S>(&mut self, svc: S, table: Table) -> &mut Self
    where
        S: Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.gate.register(S::NAME);
        self.routes.add_service(svc);
        self.access.add(table);
        self.access.serve(S::NAME);
        self
    }

    pub fn health(&self) -> HealthGate {
        self.gate.clone()
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING, waits
    /// `shutdown_delay`, stops accepting and drains in-flight calls for at most
    /// `shutdown_grace`.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let local_addr = listener.local_addr().ok();
        self.access.serve(HEALTH_SERVICE);
        if self.reflection {
            self.access.serve(REFLECTION_V1);
            self.access.serve(REFLECTION_V1ALPHA);
            let v1 = self
                .reflection_builder()
                .build_v1()
                .expect("descriptor sets are valid");
            let v1alpha = self
                .reflection_builder()
                .build_v1alpha()
                .expect("descriptor sets are valid");
            self.routes.add_service(v1);
            self.routes.add_service(v1alpha);
        }

        let layer = RpcLayer::new(
            self.service,
            &self.limits,
            self.security.clone(),
            self.access.clone(),
        );
        let incoming = LimitedIncoming::new(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            Slots::new(
                self.limits.max_connections,
                self.limits.max_connections_per_address,
            ),
            self.service,
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Security::Tls { material, .. } = &self.security {
            builder = builder
                .tls_config(material.server_config().timeout(TLS_HANDSHAKE_TIMEOUT))
                .map_err(|e| {
                    tracing::error!(error = %e, "the TLS configuration is unusable");
                    e
                })?;
        }
        let server = builder
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(layer)
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tokio::pin!(server);
        tracing::info!(service = self.service, addr = ?local_addr, "serving gRPC");

        tokio::select! {
            result = &mut server => return result,
            () = shutdown => {}
        }
        tracing::info!(service = self.service, "shutting down: NOT_SERVING");
        self.gate.begin_drain().await;
        if !self.limits.shutdown_delay.is_zero() {
            // Keep answering while balancers notice NOT_SERVING.
            let _ = tokio::time::timeout(self.limits.shutdown_delay, &mut server).await;
        }
        let _ = stop_tx.send(());
        match tokio::time::timeout(self.limits.shutdown_grace, &mut server).await {
            Ok(result) => {
                tracing::info!(service = self.service, "drained; stopped");
                result
            }
            Err(_) => {
                tracing::warn!(
                    service = self.service,
                    grace = ?self.limits.shutdown_grace,
                    "in-flight calls did not finish within the grace period; stopping anyway"
                );
                Ok(())
            }
        }
    }

    fn reflection_builder(&self) -> tonic_reflection::server::Builder<'static> {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::contract::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can print ErrorInfo,
            // BadRequest and RetryInfo.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name(REFLECTION_V1)
            .with_service_name(REFLECTION_V1ALPHA);
        for name in &self.names {
            builder = builder.with_service_name(*name);
        }
        builder
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can listen for SIGTERM");
    let mut int = signal(SignalKind::interrupt()).expect("can listen for SIGINT");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The middleware around every call.
#[derive(Clone)]
pub struct RpcLayer {
    shared: Arc<LayerShared>,
}

struct LayerShared {
    service: &'static str,
    permits: Arc<Semaphore>,
    request_timeout: Duration,
    body_read_timeout: Duration,
    stream_lifetime: Duration,
    /// Calls open per remote address.
    calls: Arc<Slots>,
    /// Health and reflection calls open, in all and per remote address.
    public_calls: Arc<Slots>,
    /// Request bytes buffered at once, in all and per remote address (a
    /// quarter of the budget).
    buffer: Arc<Slots>,
    security: Security,
    access: Access,
}

impl RpcLayer {
    pub fn new(
        service: &'static str,
        limits: &ServerLimits,
        security: Security,
        access: Access,
    ) -> Self {
        Self {
            shared: Arc::new(LayerShared {
                service,
                permits: Arc::new(Semaphore::new(limits.max_concurrent_requests.max(1))),
                request_timeout: limits.request_timeout,
                body_read_timeout: limits.body_read_timeout,
                stream_lifetime: limits.stream_lifetime.max(Duration::from_millis(1)),
                calls: Slots::new(usize::MAX, limits.max_calls_per_address),
                public_calls: Slots::new(
                    limits.max_public_calls,
                    limits.max_public_calls_per_address,
                ),
                buffer: Slots::new(
                    limits.request_buffer_bytes,
                    limits.request_buffer_bytes / BUFFER_SHARES_PER_ADDRESS,
                ),
                security,
                access,
            }),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    shared: Arc<LayerShared>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<http::Request<Body>> for RpcService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();

        let method = request.uri().path().to_string();
        let method_label = shared.access.method_name(&method);
        let budget = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(shared.request_timeout, |t| t.min(shared.request_timeout));
        let trace = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .unwrap_or_else(TraceContext::new_root);
        // Who is calling, and may they call this (the access table).
        let caller = shared
            .security
            .authenticate(request.headers(), request.extensions())
            .and_then(|caller| match shared.access.decide(&method, &caller) {
                Decision::Allowed => Ok(caller),
                Decision::Unimplemented => Err(ApiError::Unimplemented {
                    message: if method.starts_with("/inmail.testclock.v1.TestClockService/") {
                        format!(
                            "{method} is not served here: the test clock is off; start the \
                             stack with TEST_CLOCK=true (tests and local experiments only)"
                        )
                    } else {
                        format!("{method} is not served here")
                    },
                }),
                Decision::Unauthenticated => Err(ApiError::unauthenticated(
                    crate::contract::reasons::UNAUTHENTICATED,
                    format!("{method} needs credentials (a client certificate or a bearer token)"),
                )),
                Decision::Denied => Err(ApiError::permission_denied(
                    crate::contract::reasons::PERMISSION_DENIED,
                    format!("{} may not call {method}", caller.describe()),
                )),
            });
        let caller = match caller {
            Ok(caller) => caller,
            Err(refused) => {
                let status = refused.into_status("server.inmail");
                record_call(shared.service, method_label, status.code(), Duration::ZERO);
                tracing::info!(method = %method, code = ?status.code(), "refused: {}", status.message());
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        // Health and reflection (streams) answer even when the server is
        // saturated, and are not read ahead.
        let exempt = method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.");
        // Calls open at once from one address are capped (health and
        // reflection, served without credentials, more tightly and in all
        // too): a refused call holds nothing once answered.
        let slots = if exempt {
            &shared.public_calls
        } else {
            &shared.calls
        };
        let peer = remote_addr(request.extensions());
        let address = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        let slot = match peer {
            Some(peer) => match slots.try_take(peer.ip()) {
                Ok(slot) => Some(slot),
                Err(_) => {
                    let status = ApiError::resource_exhausted(
                        crate::contract::reasons::SERVER_OVERLOADED,
                        format!(
                            "{} already serves its maximum of such calls open at once (from {} or in all); retry shortly",
                            shared.service,
                            peer.ip()
                        ),
                        Duration::from_millis(100),
                    )
                    .into_status("server.inmail");
                    record_call(shared.service, method_label, status.code(), Duration::ZERO);
                    tracing::debug!(method = %method, peer = %peer, "refused: too many calls open from one address");
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            None => None,
        };
        let ctx = CallContext {
            deadline: Instant::now() + budget,
            trace,
            caller,
        };
        let span = tracing::info_span!(
            "rpc",
            service = shared.service,
            method = %method,
            caller = %ctx.caller.describe(),
            trace_id = %ctx.trace.trace_id,
            span_id = %ctx.trace.span_id,
            member_id = tracing::field::Empty,
            request_id = tracing::field::Empty,
        );
        request.extensions_mut().insert(ctx);

        // Every stream ends: health and reflection streams at the caller's
        // deadline or the stream lifetime, whichever is first; the response
        // of any other call within the stream lifetime.
        let lifetime = if exempt {
            request
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
                .map_or(shared.stream_lifetime, |t| t.min(shared.stream_lifetime))
        } else {
            shared.stream_lifetime
        };
        let stream_deadline = Instant::now() + lifetime;
        if exempt {
            let (parts, body) = request.into_parts();
            let body = StreamRequest::new(body, stream_deadline, shared.buffer.clone(), address);
            request = http::Request::from_parts(parts, Body::new(body));
        }

        Box::pin(
            async move {
                let started = Instant::now();
                let mut permit = None;
                if !exempt {
                    // The whole (unary) request is read before a permit is
                    // taken: a client that sends headers and no body holds
                    // nothing, and is answered after the body read timeout.
                    let (parts, body) = request.into_parts();
                    let buffered;
                    let read = tokio::time::timeout(
                        shared.body_read_timeout.min(budget),
                        buffer_body(body, MAX_REQUEST_BYTES, &shared.buffer, address),
                    )
                    .await;
                    let bytes = match read {
                        // The bytes stay charged while the call is pending:
                        // until it has its concurrency slot (served calls
                        // are bounded by MAX_CONCURRENT_REQUESTS).
                        Ok(Ok((bytes, charged))) => {
                            buffered = charged;
                            bytes
                        }
                        Ok(Err(refusal)) => {
                            let status = match refusal {
                                BufferRefusal::TooLarge => tonic::Status::resource_exhausted(format!(
                                    "the request is larger than {MAX_REQUEST_BYTES} bytes"
                                )),
                                BufferRefusal::BudgetSpent => ApiError::resource_exhausted(
                                    crate::contract::reasons::SERVER_OVERLOADED,
                                    format!(
                                        "{} is buffering its maximum of request bytes; retry shortly",
                                        shared.service
                                    ),
                                    Duration::from_millis(100),
                                )
                                .into_status("server.inmail"),
                                BufferRefusal::Failed(err) => tonic::Status::cancelled(format!(
                                    "the request body could not be read: {err}"
                                )),
                            };
                            record_call(shared.service, method_label, status.code(), started.elapsed());
                            return Ok(status.into_http());
                        }
                        Err(_) => {
                            let status = tonic::Status::deadline_exceeded(format!(
                                "the request body did not arrive within {:?}",
                                shared.body_read_timeout.min(budget)
                            ));
                            record_call(shared.service, method_label, tonic::Code::DeadlineExceeded, started.elapsed());
                            return Ok(status.into_http());
                        }
                    };
                    request = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
                    let taken = shared.permits.clone().try_acquire_owned();
                    drop(buffered);
                    match taken {
                        Ok(taken) => permit = Some(taken),
                        Err(_) => {
                            let status = ApiError::resource_exhausted(
                                crate::contract::reasons::SERVER_OVERLOADED,
                                format!(
                                    "{} is serving its maximum of concurrent calls; retry shortly",
                                    shared.service
                                ),
                                Duration::from_millis(100),
                            )
                            .into_status("server.inmail");
                            record_call(shared.service, method_label, tonic::Code::ResourceExhausted, Duration::ZERO);
                            return Ok(status.into_http());
                        }
                    }
                }
                let remaining = budget.saturating_sub(started.elapsed());
                let outcome = tokio::time::timeout(remaining, inner.call(request)).await;
                drop(permit);
                let response = match outcome {
                    Ok(Ok(response)) => response.map(|body| {
                        Body::new(ResponseDeadline::new(body, stream_deadline, lifetime, slot))
                    }),
                    Ok(Err(err)) => return Err(err),
                    Err(_) => {
                        tracing::warn!(budget = ?budget, "deadline exceeded");
                        tonic::Status::deadline_exceeded(format!(
                            "the call did not finish within its deadline of {budget:?}"
                        ))
                        .into_http()
                    }
                };
                let response = malformed_request_is_invalid_argument(response);
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from)
                    .unwrap_or(tonic::Code::Ok);
                let elapsed = started.elapsed();
                record_call(shared.service, method_label, code, elapsed);
                if code == tonic::Code::Ok {
                    tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1e3, "ok");
                } else {
                    tracing::info!(code = ?code, elapsed_ms = elapsed.as_secs_f64() * 1e3, "failed");
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// tonic answers a request body that does not decode as the method's
/// message INTERNAL (tonic-prost's choice); it is the caller's mistake, so
/// INVALID_ARGUMENT, without the decoder's words.
fn malformed_request_is_invalid_argument<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|v| v == "13");
    let undecodable = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.starts_with("failed%20to%20decode%20Protobuf"));
    if internal && undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "the%20request%20is%20not%20a%20valid%20protobuf%20message%20of%20this%20method",
            ),
        );
    }
    response
}

/// Records one call; every label is a `&'static str` (no allocation per
/// call).
fn record_call(service: &'static str, method: &'static str, code: tonic::Code, elapsed: Duration) {
    let labels = [
        ("service", service),
        ("method", method),
        ("code", code_name(code)),
    ];
    metrics::histogram!("grpc_server_handling_seconds", &labels).record(elapsed.as_secs_f64());
    metrics::counter!("grpc_server_handled_total", &labels).increment(1);
}

/// A status code's name as the metrics label (tonic's Debug spelling).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("9x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }
}
