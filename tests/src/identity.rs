//! Who the tests call as. One development PKI per test process (a CA, a
//! certificate per service and an operator's, the member-token signing
//! key), written to a temporary directory the services read; clients present
//! a member's bearer token, a service's certificate, or the operator's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use inmail_shared::runtime::auth::TRUST_DOMAIN;
use inmail_shared::runtime::auth::devpki::{Authority, DevPki, Pem};
use inmail_shared::runtime::auth::tls::SpiffeServerVerifier;
use inmail_shared::runtime::auth::token::TokenSigner;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Identity};

pub use inmail_shared::runtime::auth::devpki::SERVICES;

/// The issuer and audience the services are started with.
pub const ISSUER: &str = "inmail";
pub const AUDIENCE: &str = "inmail";

pub struct Pki {
    pub pki: DevPki,
    pub dir: PathBuf,
    signer: TokenSigner,
}

/// The test process's PKI.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        inmail_shared::runtime::auth::tls::install_crypto_provider();
        let pki = DevPki::generate(&["localhost", "127.0.0.1"]).expect("a development PKI");
        let dir =
            std::env::temp_dir().join(format!("inmail-pki-{}", uuid::Uuid::new_v4().simple()));
        pki.write(&dir).expect("write the PKI");
        // What README advises for production: a service certificate naming
        // only its SPIFFE id, no DNS name or address.
        for service in SERVICES {
            let pem = pki.ca.issue(service, &[]).expect("a URI-only certificate");
            std::fs::write(dir.join(format!("{service}-uri-only.crt")), pem.cert).unwrap();
            std::fs::write(dir.join(format!("{service}-uri-only.key")), pem.key).unwrap();
        }
        // A billing-credits certificate from a CA the services do not trust.
        let foreign = foreign_certificate("billing-credits");
        std::fs::write(dir.join("foreign-billing-credits.crt"), foreign.cert).unwrap();
        std::fs::write(dir.join("foreign-billing-credits.key"), foreign.key).unwrap();
        // The development key and a second one: a rotation in progress.
        let second =
            inmail_shared::runtime::auth::devpki::SigningKey::generate("dev-2").expect("a key");
        let keys = |jwks: &str| {
            serde_json::from_str::<serde_json::Value>(jwks).unwrap()["keys"][0].clone()
        };
        let both = serde_json::json!({ "keys": [keys(&pki.signing.jwks), keys(&second.jwks)] });
        std::fs::write(dir.join("jwks-two-keys.json"), both.to_string()).unwrap();
        let signer = TokenSigner::new(
            pki.signing.private_pem.as_bytes(),
            &pki.signing.kid,
            ISSUER,
            AUDIENCE,
        )
        .expect("the signing key");
        Pki { pki, dir, signer }
    })
}

impl Pki {
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// The security flags of a service (`name`: its certificate, and its
    /// Redis user: every test Redis has the services' users, so the suite
    /// runs under the shipped ACL rules).
    pub fn service_args(&self, name: &str) -> Vec<String> {
        let mut args = self.tls_args(name);
        args.extend(self.redis_args(name));
        args
    }

    /// The certificate, key, CA and JWK set flags of `name`'s identity.
    pub fn tls_args(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            self.file(&format!("{name}.crt")),
            "--tls-key-file".into(),
            self.file(&format!("{name}.key")),
            "--tls-ca-file".into(),
            self.file("ca.crt"),
            "--jwt-public-keys-file".into(),
            self.file("jwks.json"),
        ]
    }

    /// The Redis user flags of the service `name` (none for other names).
    pub fn redis_args(&self, name: &str) -> Vec<String> {
        self.redis_user(name)
            .into_iter()
            .flat_map(|(flag, value)| {
                [
                    format!("--{}", flag.to_lowercase().replace('_', "-")),
                    value,
                ]
            })
            .collect()
    }

    /// The same as environment variables (for the binaries).
    pub fn service_env(&self, name: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("TLS_CERT_FILE".into(), self.file(&format!("{name}.crt"))),
            ("TLS_KEY_FILE".into(), self.file(&format!("{name}.key"))),
            ("TLS_CA_FILE".into(), self.file("ca.crt")),
            ("JWT_PUBLIC_KEYS_FILE".into(), self.file("jwks.json")),
        ];
        env.extend(
            self.redis_user(name)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        env
    }

    /// REDIS_USERNAME and REDIS_PASSWORD_FILE of a service's Redis user.
    fn redis_user(&self, name: &str) -> Vec<(&'static str, String)> {
        if !inmail_shared::runtime::auth::redis_acl::USERS
            .iter()
            .any(|(service, _)| *service == name)
        {
            return Vec::new();
        }
        vec![
            ("REDIS_USERNAME", name.to_string()),
            (
                "REDIS_PASSWORD_FILE",
                self.file(&format!("redis-{name}.password")),
            ),
        ]
    }

    /// The `user` directives of the services' Redis users (and the probe's)
    /// as redis-server arguments, with the shipped rules.
    pub fn redis_user_args(&self) -> Vec<String> {
        use inmail_shared::runtime::auth::redis_acl::{PROBE_USER, USERS, rules};
        let mut args: Vec<String> =
            format!("--user {PROBE_USER} on nopass resetchannels -@all +ping")
                .split(' ')
                .map(String::from)
                .collect();
        for (service, prefix) in USERS {
            let (_, password) = self
                .pki
                .redis_passwords
                .iter()
                .find(|(s, _)| s == service)
                .expect("a password per service");
            args.extend(["--user".to_string(), service.to_string(), "on".into()]);
            args.push(format!(">{password}"));
            args.extend(rules(prefix, true).split_whitespace().map(String::from));
        }
        args
    }

    /// A valid token of `member`.
    pub fn token(&self, member: &str) -> String {
        self.signer
            .mint(member, Duration::from_secs(3600))
            .expect("a token")
    }

    /// A token of `member` that expired an hour ago.
    pub fn expired_token(&self, member: &str) -> String {
        let now = inmail_shared::state::clock::system_ms() as u64 / 1000;
        self.signer
            .mint_at(member, now - 7200, Duration::from_secs(3600))
            .expect("a token")
    }

    pub fn cert(&self, name: &str) -> &Pem {
        self.pki.cert(name)
    }
}

/// Who a client calls as.
#[derive(Debug, Clone)]
pub enum As {
    /// A member, with a bearer token.
    Member(String),
    /// A service, with its certificate.
    Service(&'static str),
    /// The operator, with the operator's certificate.
    Operator,
    /// TLS, no credentials.
    Anonymous,
    /// A certificate of the caller's choosing (e.g. from another CA).
    Certificate(Pem),
    /// An exact `authorization` header value.
    Header(String),
}

impl As {
    pub fn member(member: &str) -> Self {
        Self::Member(member.to_string())
    }
}

/// Adds the caller's `authorization` header, if any.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel as every test client uses it.
pub type Authed = InterceptedService<Channel, Bearer>;

fn tls_for(who: &As) -> ClientTlsConfig {
    let pki = pki();
    let tls = ClientTlsConfig::new();
    let identity = match who {
        As::Service(name) => Some(pki.cert(name).clone()),
        As::Operator => Some(pki.cert("operator").clone()),
        As::Certificate(pem) => Some(pem.clone()),
        As::Member(_) | As::Anonymous | As::Header(_) => None,
    };
    match identity {
        Some(pem) => tls.identity(Identity::from_pem(pem.cert, pem.key)),
        None => tls,
    }
}

/// Verifies that a server has a certificate of the test CA for one of the
/// services (by SPIFFE id, as the services verify each other).
pub fn any_service_verifier() -> Arc<SpiffeServerVerifier> {
    let ids = SERVICES
        .iter()
        .map(|s| format!("spiffe://{TRUST_DOMAIN}/{s}"))
        .collect();
    Arc::new(SpiffeServerVerifier::new(pki().pki.ca.cert_pem.as_bytes(), ids).expect("the test CA"))
}

/// A lazily connected TLS channel to `addr` with `who`'s client
/// certificate (if any), as a service's own clients take it.
pub fn tls_channel(addr: SocketAddr, who: &As) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config_with_verifier(tls_for(who), any_service_verifier())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .connect_lazy()
}

/// A lazily connected TLS channel to `addr` as `who`.
pub fn channel_as(addr: SocketAddr, who: &As) -> Authed {
    let channel = tls_channel(addr, who);
    let header = match who {
        As::Member(member) => Some(format!("Bearer {}", pki().token(member))),
        As::Header(value) => Some(value.clone()),
        _ => None,
    };
    InterceptedService::new(
        channel,
        Bearer(header.map(|h| h.parse().expect("ascii header"))),
    )
}

/// [`channel_as`], with the smallest HTTP/2 windows (64 KiB): a client
/// that stops reading a stream holds back the server after that much.
pub fn small_window_channel_as(addr: SocketAddr, who: &As) -> Authed {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config_with_verifier(tls_for(who), any_service_verifier())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect_lazy();
    let header = match who {
        As::Member(member) => Some(format!("Bearer {}", pki().token(member))),
        _ => None,
    };
    InterceptedService::new(
        channel,
        Bearer(header.map(|h| h.parse().expect("ascii header"))),
    )
}

/// A lazily connected plaintext channel to a stack run with
/// INSECURE_PLAINTEXT, typed like every other test channel.
pub fn plaintext_authed(addr: SocketAddr) -> Authed {
    InterceptedService::new(crate::plaintext_channel(addr), Bearer(None))
}

/// A certificate for `identity` from a CA the services do not trust.
pub fn foreign_certificate(identity: &str) -> Pem {
    Authority::new("some other CA")
        .and_then(|ca| ca.issue(identity, &["localhost", "127.0.0.1"]))
        .expect("a foreign certificate")
}
