//! What every binary's `main` does around its service: telemetry, Redis, the
//! clock, the listener, signals, and the `healthcheck` subcommand.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::runtime::auth::Security;
use crate::runtime::config::CommonArgs;
use crate::runtime::server::{GrpcServer, ServerLimits, shutdown_signal, spawn_redis_watch};
use crate::runtime::telemetry::{init_tracing, install_metrics};
use crate::runtime::testclock::TestClockApi;
use crate::state::clock::Clock;
use crate::state::storage::Redis;

/// How often health re-checks Redis.
pub const REDIS_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// A service's connection to Redis, its clock and its security.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub redis: Redis,
    pub clock: Clock,
    pub security: Security,
    reflection: bool,
}

impl Runtime {
    /// Checks the settings of a service serving on `listen` and calling
    /// `downstreams` (setting name, URL), and prepares Redis (without
    /// dialing: a service starts while Redis is down).
    pub fn open(
        common: &CommonArgs,
        listen: SocketAddr,
        downstreams: &[(&str, &str)],
    ) -> Result<Self, String> {
        crate::runtime::auth::tls::install_crypto_provider();
        let redis = Redis::open(&common.redis()?)?;
        let security = common.security(listen, downstreams)?;
        let clock = if common.test_clock {
            tracing::warn!(
                "TEST CLOCK ON: time can be moved through TestClockService; never use this in production"
            );
            Clock::test(redis.clone())
        } else {
            Clock::system()
        };
        Ok(Self {
            redis,
            clock,
            security,
            reflection: common.reflection,
        })
    }

    /// A channel to `service` (mutual TLS unless in plaintext mode; the
    /// server must present `spiffe://inmail/<service>`).
    pub fn channel(
        &self,
        var: &str,
        url: &str,
        service: &str,
    ) -> Result<tonic::transport::Channel, String> {
        crate::runtime::client::channel(&self.security, var, url, service)
    }

    /// The gRPC server of `service`: health, reflection (unless turned off),
    /// the test clock when it is on, and the shared middleware.
    pub fn server(&self, service: &'static str, limits: ServerLimits) -> GrpcServer {
        let mut server = GrpcServer::new(service, limits, self.security.clone());
        server.reflection(self.reflection);
        if self.clock.is_test() {
            server.add_service(
                TestClockApi::new(self.clock.clone()).into_server(),
                crate::runtime::auth::access::TEST_CLOCK,
            );
        }
        server
    }

    /// Serves until `stop` is cancelled, with health following Redis.
    pub async fn serve(
        &self,
        server: GrpcServer,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> Result<(), String> {
        spawn_redis_watch(
            self.redis.clone(),
            server.health(),
            REDIS_WATCH_INTERVAL,
            stop.clone(),
        );
        server
            .serve(listener, async move { stop.cancelled().await })
            .await
            .map_err(|e| format!("gRPC server failed: {e}"))
    }
}

/// Runs a service binary: sets up telemetry, binds `listen`, runs `serve`
/// until SIGTERM/SIGINT, and turns any start-up error into a clear message and
/// exit code 1.
pub fn run_service<F, Fut>(
    service: &'static str,
    common: &CommonArgs,
    listen: SocketAddr,
    serve: F,
) -> ExitCode
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    if let Err(message) = init_tracing(common.log_format, &common.log_level) {
        eprintln!("{service}: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if let Some(addr) = common.metrics_addr {
            if !addr.ip().is_loopback() && !common.metrics_allow_remote {
                return Err(format!(
                    "METRICS_ADDR {addr} is beyond loopback: metrics are plain HTTP without \
                     authentication. Serve them on loopback (e.g. 127.0.0.1:9101), or set \
                     METRICS_ALLOW_REMOTE=true where only your scraper can reach the port"
                ));
            }
            install_metrics(addr, service).await?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on LISTEN_ADDR {listen}: {e}"))?;
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            on_signal.cancel();
        });
        serve(listener, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("{service}: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The `healthcheck` subcommand: asks the service listening on `listen` (on
/// loopback when it listens on all addresses) for its overall health, over
/// TLS unless the service runs in plaintext; exit 0 when SERVING, 1
/// otherwise.
pub fn healthcheck(listen: SocketAddr, common: &CommonArgs) -> ExitCode {
    let target = if listen.ip().is_unspecified() {
        let loopback = match listen.ip() {
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        SocketAddr::new(loopback, listen.port())
    } else {
        listen
    };
    crate::runtime::auth::tls::install_crypto_provider();
    let tls = if common.insecure_plaintext {
        None
    } else {
        let files = match (
            &common.tls_cert_file,
            &common.tls_key_file,
            &common.tls_ca_file,
        ) {
            (Some(cert), Some(key), Some(ca)) => crate::runtime::auth::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            _ => {
                eprintln!(
                    "healthcheck: TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE are needed (or INSECURE_PLAINTEXT=true)"
                );
                return ExitCode::FAILURE;
            }
        };
        match crate::runtime::auth::tls::TlsMaterial::load(&files) {
            Ok(material) => Some(material.trust_only()),
            Err(message) => {
                eprintln!("healthcheck: {message}");
                return ExitCode::FAILURE;
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(async move {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{target}"))
            .map_err(|e| e.to_string())?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| format!("cannot reach {target}: {e}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("health check failed: {}", e.message()))?;
        Ok::<i32, String>(response.into_inner().status)
    });
    match answer {
        Ok(status)
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 =>
        {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            let name = tonic_health::pb::health_check_response::ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            println!("{name}");
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
