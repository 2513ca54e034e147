//! Who is calling, and what they may do (README.md, "Who may call what").
//!
//! Three kinds of caller: services prove who they are with a client
//! certificate (mutual TLS) whose SPIFFE-style URI SAN names them
//! (`spiffe://inmail/messaging`); operators too (`spiffe://inmail/operator`,
//! or `spiffe://inmail/operator/<name>`); members present a bearer token (a
//! JWT signed by the identity provider, EdDSA), whose subject is the member.
//! Every server checks each call against its access table ([`access`]): a
//! method missing from the table is refused. A member may act for and read
//! only itself ([`Caller::act_for`]).

pub mod access;
pub mod devpki;
pub mod redis_acl;
pub mod seen;
pub mod tls;
pub mod token;

use crate::contract::error::ApiError;
use crate::contract::reasons;

/// The trust domain of the SPIFFE ids.
pub const TRUST_DOMAIN: &str = "inmail";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A service (`spiffe://inmail/<name>`).
    Service(String),
    /// An operator (`spiffe://inmail/operator[/<name>]`).
    Operator(String),
    /// A member, by the verified token's subject.
    Member(String),
    /// No credentials: only what is open to anyone (health, reflection).
    Anonymous,
    /// The plaintext, no-authentication mode on loopback, for local
    /// experiments only.
    Local,
}

impl Caller {
    /// The caller named by a verified certificate's SPIFFE id, if it is one
    /// of ours.
    pub fn from_spiffe(uri: &str) -> Option<Self> {
        let path = uri.strip_prefix(&format!("spiffe://{TRUST_DOMAIN}/"))?;
        let mut parts = path.split('/');
        let first = parts.next().filter(|p| !p.is_empty())?;
        if first == "operator" {
            let name = parts.next().unwrap_or("operator");
            return Some(Self::Operator(name.to_string()));
        }
        parts
            .next()
            .is_none()
            .then(|| Self::Service(first.to_string()))
    }

    /// A member's call may name only that member (`field` holds the member
    /// the call acts for or reads); services and operators the access table
    /// let in act for any member.
    pub fn act_for(&self, field: &str, member: &str) -> Result<(), ApiError> {
        match self {
            Self::Member(subject) if subject == member => Ok(()),
            Self::Member(_) => Err(ApiError::permission_denied(
                reasons::PERMISSION_DENIED,
                format!("{field} must be the authenticated member"),
            )),
            Self::Service(_) | Self::Operator(_) | Self::Local => Ok(()),
            Self::Anonymous => Err(ApiError::unauthenticated(
                reasons::UNAUTHENTICATED,
                "this call needs credentials",
            )),
        }
    }

    /// A member acting with a token (not a service or an operator).
    pub fn is_member(&self) -> bool {
        matches!(self, Self::Member(_))
    }

    /// For logs and spans.
    pub fn describe(&self) -> String {
        match self {
            Self::Service(name) => format!("service:{name}"),
            Self::Operator(name) => format!("operator:{name}"),
            Self::Member(member) => format!("member:{member}"),
            Self::Anonymous => "anonymous".into(),
            Self::Local => "local".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_name_services_and_operators() {
        assert_eq!(
            Caller::from_spiffe("spiffe://inmail/messaging"),
            Some(Caller::Service("messaging".into()))
        );
        assert_eq!(
            Caller::from_spiffe("spiffe://inmail/operator/ana"),
            Some(Caller::Operator("ana".into()))
        );
        assert_eq!(
            Caller::from_spiffe("spiffe://inmail/operator"),
            Some(Caller::Operator("operator".into()))
        );
        assert_eq!(Caller::from_spiffe("spiffe://other/messaging"), None);
        assert_eq!(Caller::from_spiffe("spiffe://inmail/a/b"), None);
        assert_eq!(Caller::from_spiffe("spiffe://inmail/"), None);
    }

    #[test]
    fn members_act_only_for_themselves() {
        let sam = Caller::Member("sam".into());
        assert!(sam.act_for("member_id", "sam").is_ok());
        let denied = sam.act_for("member_id", "rita").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            Caller::Service("messaging".into())
                .act_for("member_id", "rita")
                .is_ok()
        );
        assert_eq!(
            Caller::Anonymous
                .act_for("member_id", "rita")
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }
}

use std::sync::Arc;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use self::tls::TlsMaterial;
use self::token::TokenVerifier;

/// How a service proves itself and checks its callers.
#[derive(Clone, Debug)]
pub enum Security {
    /// TLS on the port, mutual TLS towards other services, member tokens.
    Tls {
        material: Arc<TlsMaterial>,
        tokens: Arc<TokenVerifier>,
        /// Callers of certificates and tokens already verified.
        seen: Arc<Seen>,
    },
    /// Plaintext and no authentication, on loopback only (asked for by
    /// name: INSECURE_PLAINTEXT).
    Plaintext,
}

pub(crate) fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What a server verified already (see [`seen`]).
#[derive(Default)]
pub struct Seen {
    certificates: seen::Seen<Caller>,
    /// Member by token, until the token's expiry plus the verifier's leeway.
    tokens: seen::Seen<String>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seen").finish_non_exhaustive()
    }
}

impl Security {
    /// Who is calling: the verified client certificate's SPIFFE id, else
    /// the bearer token's member, else nobody. A token that does not verify
    /// is UNAUTHENTICATED.
    pub fn authenticate(
        &self,
        headers: &tonic::codegen::http::HeaderMap,
        extensions: &tonic::codegen::http::Extensions,
    ) -> Result<Caller, ApiError> {
        let (tokens, seen) = match self {
            Self::Plaintext => return Ok(Caller::Local),
            Self::Tls { tokens, seen, .. } => (tokens, seen),
        };
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let peer = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        if let Some(chain) = peer.as_ref().and_then(|c| c.first()) {
            if let Some(caller) = seen.certificates.get(chain.as_ref(), now_s) {
                return Ok(caller);
            }
            let caller = tls::uri_sans(chain)
                .iter()
                .find_map(|uri| Caller::from_spiffe(uri))
                // A certificate of our CA without one of our ids: known to
                // nobody's table.
                .unwrap_or_else(|| Caller::Service(String::new()));
            seen.certificates.put(chain.as_ref(), caller.clone(), None);
            return Ok(caller);
        }
        let Some(value) = headers.get("authorization") else {
            return Ok(Caller::Anonymous);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                ApiError::unauthenticated(
                    reasons::UNAUTHENTICATED,
                    "the authorization header must be 'Bearer <token>'",
                )
            })?;
        let token = token.trim();
        if let Some(member) = seen.tokens.get(token.as_bytes(), now_s) {
            return Ok(Caller::Member(member));
        }
        tokens
            .verify(token)
            .map(|(member, expires_s)| {
                seen.tokens
                    .put(token.as_bytes(), member.clone(), Some(expires_s));
                Caller::Member(member)
            })
            .map_err(|why| {
                ApiError::unauthenticated(
                    reasons::UNAUTHENTICATED,
                    format!("the bearer token is not valid: {why}"),
                )
            })
    }
}
