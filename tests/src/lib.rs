//! The test harness: a real `redis-server` on a free port per test, the three
//! real services on `127.0.0.1:0` (in this process, or as their binaries),
//! generated gRPC clients, and the real `grpcurl` binary.

pub mod grpcurl;
pub mod identity;
pub mod postgres;
pub mod processes;
pub mod redis_server;

use std::net::SocketAddr;
use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::messaging::v1 as messaging_pb;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_shared::contract::proto::testclock::v1 as testclock;
use inmail_shared::runtime::cli::parse_from;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::redis_server::{RedisServer, free_port, redis_server_binary};

pub use crate::identity::{
    As, Authed, channel_as, pki, plaintext_authed, small_window_channel_as, tls_channel,
};

pub type PlansClient =
    plans::subscription_plan_service_client::SubscriptionPlanServiceClient<Authed>;
pub type BillingClient =
    billing::billing_credits_service_client::BillingCreditsServiceClient<Authed>;
pub type MessagingClient = messaging_pb::messaging_service_client::MessagingServiceClient<Authed>;
pub type ClockClient = testclock::test_clock_service_client::TestClockServiceClient<Authed>;
pub type HealthClient = tonic_health::pb::health_client::HealthClient<Authed>;

/// Clients of each service as `who`.
pub fn plans_at(addr: SocketAddr, who: &As) -> PlansClient {
    PlansClient::new(channel_as(addr, who))
}

pub fn billing_at(addr: SocketAddr, who: &As) -> BillingClient {
    BillingClient::new(channel_as(addr, who))
}

pub fn messaging_at(addr: SocketAddr, who: &As) -> MessagingClient {
    MessagingClient::new(channel_as(addr, who))
}

pub fn clock_at(addr: SocketAddr) -> ClockClient {
    ClockClient::new(channel_as(addr, &As::Operator))
}

/// Logs of the services under test go to the test output at WARN (override
/// with TEST_LOG, e.g. TEST_LOG=debug).
pub fn init_logs() {
    let filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// One service running in this process.
pub struct Service {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Service {
    /// Stops the service gracefully (NOT_SERVING, drain) and waits for it.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), handle).await;
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Which certificate (a file stem of the test PKI) a service uses.
pub type CertificateOf = std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Extra flags and faults for the services of a stack.
#[derive(Default, Clone)]
pub struct StackOptions {
    pub plans_args: Vec<String>,
    pub billing_args: Vec<String>,
    pub messaging_args: Vec<String>,
    pub faults: ::messaging::send::Faults,
    /// The certificate (a file stem of the test PKI) each service serves and
    /// calls with, by service name; by default its own.
    pub certificate_of: Option<CertificateOf>,
    /// The JWK set (a file name of the test PKI) the services verify member
    /// tokens with; by default `jwks.json`.
    pub jwks_file: Option<&'static str>,
}

/// Redis and the three services, each on a free port, test clock on.
pub struct Stack {
    pub redis: RedisServer,
    pub plans: Service,
    pub billing: Service,
    pub messaging: Service,
    options: StackOptions,
}

fn args_for(
    binary: &str,
    listen: SocketAddr,
    redis: &[String],
    options: &StackOptions,
    extra: &[String],
    urls: &[(&str, String)],
) -> Vec<String> {
    let mut args = vec![
        binary.to_string(),
        "--listen-addr".into(),
        listen.to_string(),
    ];
    args.extend(redis.iter().cloned());
    let certificate = options
        .certificate_of
        .as_ref()
        .map_or_else(|| binary.to_string(), |of| of(binary));
    // The identity may be another's (a test of impostors); the Redis user is
    // always the binary's own.
    let mut security = pki().tls_args(&certificate);
    if let Some(jwks) = options.jwks_file {
        *security.last_mut().expect("the JWK set") = pki().file(jwks);
    }
    args.extend(security);
    args.extend(pki().redis_args(binary));
    args.extend([
        "--test-clock".into(),
        "--shutdown-grace".into(),
        "5s".into(),
    ]);
    for (flag, url) in urls {
        args.push((*flag).to_string());
        args.push(url.clone());
    }
    args.extend(extra.iter().cloned());
    args
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        Self::start_on(RedisServer::start().await, options).await
    }

    /// The services on a Redis of the caller's choosing.
    pub async fn start_on(redis: RedisServer, options: StackOptions) -> Self {
        init_logs();
        let plans_listener = listen().await;
        let billing_listener = listen().await;
        let messaging_listener = listen().await;
        let (plans_addr, billing_addr, messaging_addr) = (
            plans_listener.local_addr().unwrap(),
            billing_listener.local_addr().unwrap(),
            messaging_listener.local_addr().unwrap(),
        );
        let stack = Self {
            plans: Self::spawn_plans(plans_listener, &redis.service_args(), &options),
            billing: Self::spawn_billing(
                billing_listener,
                &redis.service_args(),
                plans_addr,
                &options,
            ),
            messaging: Self::spawn_messaging(
                messaging_listener,
                &redis.service_args(),
                plans_addr,
                billing_addr,
                &options,
            ),
            redis,
            options,
        };
        assert_eq!(stack.messaging.addr, messaging_addr);
        stack.wait_serving().await;
        stack
    }

    fn spawn_plans(listener: TcpListener, redis: &[String], options: &StackOptions) -> Service {
        let addr = listener.local_addr().unwrap();
        let cli = parse_from::<subscription_plan::Service, _, _>(args_for(
            "subscription-plan",
            addr,
            redis,
            options,
            &options.plans_args,
            &[],
        ));
        let stop = CancellationToken::new();
        let handle = tokio::spawn(subscription_plan::serve(cli.args, listener, stop.clone()));
        Service {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    fn spawn_billing(
        listener: TcpListener,
        redis: &[String],
        plans: SocketAddr,
        options: &StackOptions,
    ) -> Service {
        let addr = listener.local_addr().unwrap();
        let cli = parse_from::<billing_credits::Service, _, _>(args_for(
            "billing-credits",
            addr,
            redis,
            options,
            &options.billing_args,
            &[("--subscription-plan-url", format!("https://{plans}"))],
        ));
        let stop = CancellationToken::new();
        let handle = tokio::spawn(billing_credits::serve(cli.args, listener, stop.clone()));
        Service {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    fn spawn_messaging(
        listener: TcpListener,
        redis: &[String],
        plans: SocketAddr,
        billing: SocketAddr,
        options: &StackOptions,
    ) -> Service {
        let addr = listener.local_addr().unwrap();
        let cli = parse_from::<::messaging::Service, _, _>(args_for(
            "messaging",
            addr,
            redis,
            options,
            &options.messaging_args,
            &[
                ("--subscription-plan-url", format!("https://{plans}")),
                ("--billing-credits-url", format!("https://{billing}")),
            ],
        ));
        let stop = CancellationToken::new();
        let handle = tokio::spawn(::messaging::serve_with_faults(
            cli.args,
            options.faults.clone(),
            listener,
            stop.clone(),
        ));
        Service {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops billing and starts it again on the same address.
    pub async fn restart_billing(&mut self) {
        self.billing.stop().await;
        let listener = bind_again(self.billing.addr).await;
        self.billing = Self::spawn_billing(
            listener,
            &self.redis.service_args(),
            self.plans.addr,
            &self.options,
        );
        wait_serving(self.billing.addr).await;
    }

    /// A second messaging replica on the same Redis and services.
    pub async fn messaging_replica(&self) -> Service {
        let listener = listen().await;
        let replica = Self::spawn_messaging(
            listener,
            &self.redis.service_args(),
            self.plans.addr,
            self.billing.addr,
            &self.options,
        );
        wait_serving(replica.addr).await;
        replica
    }

    /// Another billing-credits on the same Redis and subscription-plan,
    /// serving with the test PKI's certificate `certificate` (e.g. another
    /// identity's, to impersonate billing). Not waited for: a client that
    /// checks who it reached may never see it serving.
    pub async fn billing_with_certificate(&self, certificate: &'static str) -> Service {
        let options = StackOptions {
            certificate_of: Some(std::sync::Arc::new(move |_| certificate.to_string())),
            ..self.options.clone()
        };
        Self::spawn_billing(
            listen().await,
            &self.redis.service_args(),
            self.plans.addr,
            &options,
        )
    }

    /// Another messaging on the same Redis, calling the billing-credits at
    /// `billing`.
    pub async fn messaging_calling_billing_at(&self, billing: SocketAddr) -> Service {
        let messaging = Self::spawn_messaging(
            listen().await,
            &self.redis.service_args(),
            self.plans.addr,
            billing,
            &self.options,
        );
        wait_serving(messaging.addr).await;
        messaging
    }

    pub async fn stop_plans(&mut self) {
        self.plans.stop().await;
    }

    /// subscription-plan again on its address (billing and messaging keep
    /// calling it there).
    pub async fn start_plans_again(&mut self) {
        let listener = bind_again(self.plans.addr).await;
        self.plans = Self::spawn_plans(listener, &self.redis.service_args(), &self.options);
        wait_serving(self.plans.addr).await;
    }

    pub async fn stop_billing(&mut self) {
        self.billing.stop().await;
    }

    pub async fn start_billing_again(&mut self) {
        let listener = bind_again(self.billing.addr).await;
        self.billing = Self::spawn_billing(
            listener,
            &self.redis.service_args(),
            self.plans.addr,
            &self.options,
        );
        wait_serving(self.billing.addr).await;
    }

    pub async fn wait_serving(&self) {
        for addr in [self.plans.addr, self.billing.addr, self.messaging.addr] {
            wait_serving(addr).await;
        }
    }

    /// subscription-plan as a member.
    pub fn plans_as(&self, member: &str) -> PlansClient {
        plans_at(self.plans.addr, &As::member(member))
    }

    /// subscription-plan as `who`.
    pub fn plans_with(&self, who: &As) -> PlansClient {
        plans_at(self.plans.addr, who)
    }

    /// billing-credits as a member.
    pub fn billing_as(&self, member: &str) -> BillingClient {
        billing_at(self.billing.addr, &As::member(member))
    }

    /// billing-credits as the operator (grants, reconciliation, reads).
    pub fn billing_operator(&self) -> BillingClient {
        billing_at(self.billing.addr, &As::Operator)
    }

    /// billing-credits as messaging (debit, confirm, release, refund).
    pub fn billing_as_messaging(&self) -> BillingClient {
        billing_at(self.billing.addr, &As::Service("messaging"))
    }

    /// billing-credits as `who`.
    pub fn billing_with(&self, who: &As) -> BillingClient {
        billing_at(self.billing.addr, who)
    }

    /// messaging as a member.
    pub fn messaging_as(&self, member: &str) -> MessagingClient {
        messaging_at(self.messaging.addr, &As::member(member))
    }

    /// messaging as `who`.
    pub fn messaging_with(&self, who: &As) -> MessagingClient {
        messaging_at(self.messaging.addr, who)
    }

    /// The shared test clock, through any service (here: messaging), as the
    /// operator.
    pub fn clock(&self) -> ClockClient {
        clock_at(self.messaging.addr)
    }

    pub async fn advance(&self, by: Duration) -> chrono::DateTime<chrono::Utc> {
        advance(&mut self.clock(), by).await
    }

    pub async fn set_time(&self, to: chrono::DateTime<chrono::Utc>) {
        let response = self
            .clock()
            .set_time(testclock::SetTimeRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                time: Some(inmail_shared::contract::time::to_timestamp(to)),
            })
            .await
            .expect("SetTime");
        let now = response.into_inner().now.unwrap();
        assert!(now.seconds >= to.timestamp());
    }

    pub async fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let now = self
            .clock()
            .get_time(testclock::GetTimeRequest {})
            .await
            .unwrap()
            .into_inner()
            .now
            .unwrap();
        inmail_shared::contract::time::from_timestamp(&now).unwrap()
    }

    pub async fn stop(mut self) {
        self.messaging.stop().await;
        self.billing.stop().await;
        self.plans.stop().await;
    }
}

pub async fn advance(clock: &mut ClockClient, by: Duration) -> chrono::DateTime<chrono::Utc> {
    let response = clock
        .advance_time(testclock::AdvanceTimeRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            by: Some(by.try_into().unwrap()),
        })
        .await
        .expect("AdvanceTime");
    inmail_shared::contract::time::from_timestamp(&response.into_inner().now.unwrap()).unwrap()
}

/// A listener for an in-process service, on a [`free_port`]: below the
/// ephemeral range, so that after a stop no outgoing connection can take
/// the port before [`bind_again`] binds it for the restart.
async fn listen() -> TcpListener {
    for _ in 0..10 {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", free_port())).await {
            return listener;
        }
    }
    panic!("no port to listen on");
}

async fn bind_again(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again");
}

/// A TLS channel to `addr` without credentials (health checks).
pub fn channel(addr: SocketAddr) -> Authed {
    channel_as(addr, &As::Anonymous)
}

/// Polls grpc.health.v1 until the server answers SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut client = HealthClient::new(channel(addr));
    loop {
        let status = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if matches!(status, Ok(SERVING)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never became SERVING: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The health a server reports for everything it serves.
pub async fn health(addr: SocketAddr) -> Result<i32, tonic::Status> {
    HealthClient::new(channel(addr))
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// A lazily connected plaintext channel (a stack run with
/// INSECURE_PLAINTEXT).
pub fn plaintext_channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .connect_lazy()
}

/// The overall health of a plaintext server.
pub async fn health_plaintext(addr: SocketAddr) -> Result<i32, tonic::Status> {
    tonic_health::pb::health_client::HealthClient::new(plaintext_channel(addr))
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 =
    tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// A fresh request id.
pub fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The reason of a status's google.rpc.ErrorInfo.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// The fields a status's google.rpc.BadRequest names.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Runs ReconcileLedgers over every member and asserts every ledger adds up.
pub async fn assert_ledgers_reconcile(billing: &mut BillingClient) -> u32 {
    let mut checked = 0;
    let mut token = String::new();
    loop {
        let page = billing
            .reconcile_ledgers(billing::ReconcileLedgersRequest {
                page_size: 1000,
                page_token: token.clone(),
                // Every entry, not only those past the checkpoints.
                full: true,
            })
            .await
            .expect("ReconcileLedgers")
            .into_inner();
        assert!(
            page.mismatches.is_empty(),
            "ledger mismatches: {:?}",
            page.mismatches
        );
        checked += page.members_checked;
        if page.next_page_token.is_empty() {
            return checked;
        }
        token = page.next_page_token;
    }
}

/// Items waiting in messaging's outbox (sends and refunds to finish).
pub async fn outbox_len(redis: &RedisServer) -> u64 {
    let mut conn = redis.conn().await;
    let mut total = 0;
    for shard in 0..::messaging::store::OUTBOX_SHARDS {
        let n: u64 = redis::cmd("ZCARD")
            .arg(format!("messaging:outbox:{{o{shard}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        total += n;
    }
    total
}

/// Runs `calls` at once: each waits at one barrier, then calls. Answers
/// their results in order, and fails unless at least `min_in_flight` of them
/// were in flight at the same moment (from send to answer, client side), so
/// a race test is shown to race rather than to run one call after another.
pub async fn race<T, Fut>(calls: Vec<Fut>, min_in_flight: usize) -> Vec<T>
where
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(calls.len()));
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|call| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let started = std::time::Instant::now();
                let answer = call.await;
                (answer, started, std::time::Instant::now())
            })
        })
        .collect();
    let mut answers = Vec::new();
    let mut spans = Vec::new();
    for task in tasks {
        let (answer, started, ended) = task.await.expect("a racing call panicked");
        answers.push(answer);
        spans.push((started, ended));
    }
    // The most calls in flight at once: at each start, those begun and not
    // yet answered.
    let most = spans
        .iter()
        .map(|(at, _)| {
            spans
                .iter()
                .filter(|(started, ended)| started <= at && ended > at)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most >= min_in_flight,
        "only {most} of {} calls were ever in flight at once",
        spans.len()
    );
    answers
}
