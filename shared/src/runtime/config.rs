//! Flags every binary takes, each with an environment variable. Service
//! specific flags (listen address, other services' URLs) live in each binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use crate::runtime::auth::tls::{TlsFiles, TlsMaterial};
use crate::runtime::auth::token::TokenVerifier;
use crate::runtime::auth::{self, Security, Seen};
use crate::runtime::server::ServerLimits;
use crate::runtime::telemetry::LogFormat;
use crate::state::history::HistorySettings;
use crate::state::storage::RedisSettings;

/// The flags of a service that keeps history in PostgreSQL (README.md,
/// "The history store").
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// The history store (PostgreSQL), e.g.
    /// `postgres://inmail_billing_credits@127.0.0.1:5432/billing_credits`
    /// (no password: DATABASE_PASSWORD_FILE); unset: history stays in Redis.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// The database user's password (one line).
    #[arg(long, env = "DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,

    /// The CA of PostgreSQL's certificate: connections are then TLS only,
    /// the server proving the URL's host name; unset: plaintext.
    #[arg(long, env = "DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,

    /// Connections to the history store at most.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 4)]
    pub database_pool_size: usize,

    /// How long a history statement may run (and a connection be waited for).
    #[arg(long, env = "DATABASE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub database_timeout: Duration,
}

impl HistoryArgs {
    /// The history store's settings, when one is configured.
    pub fn settings(&self) -> Option<HistorySettings> {
        self.database_url.as_ref().map(|url| HistorySettings {
            url: url.clone(),
            password_file: self.database_password_file.clone(),
            ca_file: self.database_ca_file.clone(),
            pool_size: self.database_pool_size,
            timeout: self.database_timeout,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Redis holding this service's state; with REDIS_CLUSTER, comma-separated
    /// URLs of some Redis Cluster nodes.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// REDIS_URL names Redis Cluster nodes.
    #[arg(long, env = "REDIS_CLUSTER", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub redis_cluster: bool,

    /// Bound on one Redis command or script (e.g. 2s, 500ms).
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Replicas that must have a write before it is acknowledged (Redis
    /// WAIT); 0 acknowledges once the primary has it.
    #[arg(long, env = "REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,

    /// How long a write waits for REDIS_MIN_REPLICAS before it is answered
    /// UNAVAILABLE (the client retries the same request).
    #[arg(long, env = "REDIS_REPLICA_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub redis_replica_timeout: Duration,

    /// Log format: human or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter, tracing-subscriber EnvFilter syntax (e.g. info, billing_credits=debug).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Where to serve Prometheus metrics (e.g. 127.0.0.1:9101); off when
    /// unset. Plain HTTP without authentication, so loopback only unless
    /// METRICS_ALLOW_REMOTE.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Allow METRICS_ADDR beyond loopback (e.g. a container's port that
    /// Prometheus scrapes on a private network).
    #[arg(long, env = "METRICS_ALLOW_REMOTE", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_allow_remote: bool,

    /// Upper bound on any call; a shorter client deadline wins.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// The longest one try of a call to another service may take before it
    /// counts as failed (a healthy call takes milliseconds).
    #[arg(long, env = "DOWNSTREAM_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub downstream_timeout: Duration,

    /// Changes (new request ids) one member may make at once before the
    /// daily rate applies: every record a member makes us keep is paid for.
    #[arg(long, env = "MUTATION_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub mutation_burst: u32,

    /// Changes one member may make per day, on average.
    #[arg(long, env = "MUTATIONS_PER_DAY", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub mutations_per_day: u32,

    /// Calls served at once; beyond it calls are shed with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// How long a call's request body may take to arrive after its headers.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,

    /// Client connections open at once; more are closed as accepted.
    #[arg(long, env = "MAX_INBOUND_CONNECTIONS", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inbound_connections: u32,

    /// Client connections open at once from one IP address.
    #[arg(long, env = "MAX_INBOUND_CONNECTIONS_PER_ADDRESS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inbound_connections_per_address: u32,

    /// Calls (HTTP/2 streams) open at once from one IP address.
    #[arg(long, env = "MAX_CALLS_PER_ADDRESS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_calls_per_address: u32,

    /// Health and reflection calls (no credentials needed) open at once.
    #[arg(long, env = "MAX_PUBLIC_CALLS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_public_calls: u32,

    /// Health and reflection calls open at once from one IP address.
    #[arg(long, env = "MAX_PUBLIC_CALLS_PER_ADDRESS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_public_calls_per_address: u32,

    /// The longest any stream (server reflection, health watch) stays open.
    #[arg(long, env = "STREAM_LIFETIME", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stream_lifetime: Duration,

    /// Request bytes buffered at once across all calls.
    #[arg(long, env = "REQUEST_BUFFER_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(65536..))]
    pub request_buffer_bytes: u64,

    /// How long shutdown waits for in-flight calls.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// How long to keep serving after reporting NOT_SERVING on shutdown.
    #[arg(long, env = "SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// This service's certificate (PEM), for TLS on its port and as its
    /// client identity towards the services it calls (mutual TLS).
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key of TLS_CERT_FILE (PEM).
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// The CA (PEM) that signs the services' and operators' certificates:
    /// client certificates and the servers called are verified against it.
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// The identity provider's public keys (a JWK set of Ed25519 keys)
    /// that member tokens are verified with.
    #[arg(long, env = "JWT_PUBLIC_KEYS_FILE")]
    pub jwt_public_keys_file: Option<PathBuf>,

    /// The issuer (`iss`) member tokens must name.
    #[arg(long, env = "JWT_ISSUER", default_value = "inmail")]
    pub jwt_issuer: String,

    /// The audience (`aud`) member tokens must name.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "inmail")]
    pub jwt_audience: String,

    /// The longest a member token may be valid (`exp - iat`, or `exp - now`
    /// without `iat`); longer ones are refused.
    #[arg(long, env = "JWT_MAX_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub jwt_max_lifetime: Duration,

    /// Plaintext, no authentication: for local experiments only, and only
    /// on loopback addresses (refused otherwise).
    #[arg(long, env = "INSECURE_PLAINTEXT", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_plaintext: bool,

    /// Serve gRPC server reflection (grpcurl needs it to work without
    /// .proto files).
    #[arg(long, env = "REFLECTION", default_value = "true", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub reflection: bool,

    /// The Redis user (ACL) this service connects as.
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// A file holding that user's password.
    #[arg(long, env = "REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// Turn on the shared test clock (TestClockService can move time). Never
    /// in production.
    #[arg(long, env = "TEST_CLOCK", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub test_clock: bool,

    /// Let the test clock be served on an address beyond loopback. Anyone
    /// who reaches it (with an operator certificate) can move every
    /// service's time: never in production.
    #[arg(long, env = "TEST_CLOCK_UNSAFE_ALLOW_REMOTE", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub test_clock_unsafe_allow_remote: bool,
}

impl CommonArgs {
    /// Each member's quota of changes.
    pub fn mutation_quota(&self) -> crate::state::idempotency::Quota {
        crate::state::idempotency::Quota::per_day(self.mutation_burst, self.mutations_per_day)
    }

    pub fn limits(&self) -> ServerLimits {
        ServerLimits {
            request_timeout: self.request_timeout,
            max_concurrent_requests: self.max_concurrent_requests as usize,
            shutdown_grace: self.shutdown_grace,
            shutdown_delay: self.shutdown_delay,
            body_read_timeout: self.body_read_timeout,
            max_connections: self.max_inbound_connections as usize,
            max_connections_per_address: self.max_inbound_connections_per_address as usize,
            max_calls_per_address: self.max_calls_per_address as usize,
            max_public_calls: self.max_public_calls as usize,
            max_public_calls_per_address: self.max_public_calls_per_address as usize,
            stream_lifetime: self.stream_lifetime,
            request_buffer_bytes: usize::try_from(self.request_buffer_bytes).unwrap_or(usize::MAX),
        }
    }

    /// How to reach Redis; reads REDIS_PASSWORD_FILE.
    pub fn redis(&self) -> Result<RedisSettings, String> {
        let password = match &self.redis_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        format!(
                            "REDIS_PASSWORD_FILE {}: cannot read it: {e}",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(RedisSettings {
            username: self.redis_username.clone(),
            password,
            response_timeout: self.redis_timeout,
            cluster: self.redis_cluster,
            min_replicas: self.redis_min_replicas,
            replica_timeout: self.redis_replica_timeout,
            ..RedisSettings::new(self.redis_url.clone())
        })
    }

    /// Reads and checks the security settings of a service serving on
    /// `listen` and calling `downstreams` (setting name, URL).
    pub fn security(
        &self,
        listen: SocketAddr,
        downstreams: &[(&str, &str)],
    ) -> Result<Security, String> {
        if self.test_clock && !listen.ip().is_loopback() && !self.test_clock_unsafe_allow_remote {
            return Err(format!(
                "TEST_CLOCK is on and LISTEN_ADDR {listen} is beyond loopback: anyone who reaches \
                 it could move every service's time. Listen on loopback, turn TEST_CLOCK off, or \
                 set TEST_CLOCK_UNSAFE_ALLOW_REMOTE=true (never in production)"
            ));
        }
        if self.insecure_plaintext {
            if !listen.ip().is_loopback() {
                return Err(format!(
                    "INSECURE_PLAINTEXT serves without TLS or authentication, so only on \
                     loopback; LISTEN_ADDR {listen} is not"
                ));
            }
            for (var, url) in downstreams {
                if !url.starts_with("http://") || !auth::is_loopback_url(url) {
                    return Err(format!(
                        "INSECURE_PLAINTEXT calls other services in plaintext, so only on \
                         loopback: {var} {url:?} must be an http:// loopback URL"
                    ));
                }
            }
            tracing::warn!(
                "INSECURE PLAINTEXT: no TLS and no authentication; loopback only, for local experiments"
            );
            return Ok(Security::Plaintext);
        }
        for (var, url) in downstreams {
            if !url.starts_with("https://") {
                return Err(format!(
                    "{var} {url:?} must be an https:// URL: calls between services use mutual TLS"
                ));
            }
        }
        let missing = |var: &str| {
            format!(
                "{var} is required: TLS and authentication are on (set INSECURE_PLAINTEXT=true \
                 for plaintext on loopback only)"
            )
        };
        let files = TlsFiles {
            cert: self
                .tls_cert_file
                .clone()
                .ok_or_else(|| missing("TLS_CERT_FILE"))?,
            key: self
                .tls_key_file
                .clone()
                .ok_or_else(|| missing("TLS_KEY_FILE"))?,
            ca: self
                .tls_ca_file
                .clone()
                .ok_or_else(|| missing("TLS_CA_FILE"))?,
        };
        let material = TlsMaterial::load(&files)?;
        let keys = self
            .jwt_public_keys_file
            .clone()
            .ok_or_else(|| missing("JWT_PUBLIC_KEYS_FILE"))?;
        let tokens = TokenVerifier::load(
            &keys,
            "JWT_PUBLIC_KEYS_FILE",
            &auth::token::TokenRules {
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
                max_lifetime: self.jwt_max_lifetime,
            },
        )?;
        Ok(Security::Tls {
            material: Arc::new(material),
            tokens: Arc::new(tokens),
            seen: Arc::new(Seen::default()),
        })
    }
}
