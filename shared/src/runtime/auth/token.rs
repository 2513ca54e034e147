//! Member tokens: JWTs signed with Ed25519 (EdDSA) by the identity
//! provider; the services verify them with its public keys (a JWK set, keys
//! chosen by `kid`, so keys can be rotated by publishing the new one first).

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::contract::validate::is_member_id;

/// The claims of a member token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The member.
    pub sub: String,
    pub iss: String,
    pub aud: String,
    /// Expiry and issue time, seconds since the epoch.
    pub exp: u64,
    pub iat: u64,
}

/// The claims the verifier reads, loosely typed so that a missing or
/// malformed one is explained here rather than by the JSON parser.
#[derive(Debug, Deserialize)]
struct Checked {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
}

/// Verifies member tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Vec<(Option<String>, DecodingKey)>,
    validation: Validation,
    max_lifetime: Duration,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys.len())
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct TokenRules {
    pub issuer: String,
    pub audience: String,
    /// The longest a token may be valid: `exp - iat`, or `exp - now` for a
    /// token without `iat`.
    pub max_lifetime: Duration,
}

impl TokenVerifier {
    /// Reads the identity provider's public keys: a JWK set (JSON) of
    /// Ed25519 keys. `var` names the setting in errors.
    pub fn load(path: &Path, var: &str, rules: &TokenRules) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{var} {}: cannot read it: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("{var} {}: not a JWK set: {e}", path.display()))?;
        Self::from_set(&set, rules).map_err(|e| format!("{var} {}: {e}", path.display()))
    }

    pub fn from_set(set: &JwkSet, rules: &TokenRules) -> Result<Self, String> {
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a key is unusable: {e}"))?;
            keys.push((jwk.common.key_id.clone(), key));
        }
        if keys.is_empty() {
            return Err("the key set holds no key".into());
        }
        if keys.len() > 1 && keys.iter().any(|(kid, _)| kid.is_none()) {
            return Err("the key set holds several keys, so each needs a kid".into());
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.set_issuer(&[&rules.issuer]);
        validation.set_audience(&[&rules.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Ok(Self {
            keys,
            validation,
            max_lifetime: rules.max_lifetime,
        })
    }

    /// The member a token names, once its signature, issuer, audience,
    /// validity period (`nbf`, `exp`) and lifetime check out, and until when
    /// (epoch seconds, the leeway included) it stays valid. Errors are
    /// plain words for the caller, never the parser's.
    pub fn verify(&self, token: &str) -> Result<(String, u64), String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "it is not a JWT (three base64url parts: header, claims, signature)")?;
        if header.alg != Algorithm::EdDSA {
            return Err("it must be signed with EdDSA (Ed25519)".into());
        }
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|(k, _)| k.as_deref() == Some(kid.as_str()))
                .map(|(_, key)| key)
                .ok_or("no key of the identity provider has its kid")?,
            None if self.keys.len() == 1 => &self.keys[0].1,
            None => {
                return Err("it names no key (kid) and the identity provider has several".into());
            }
        };
        let data = jsonwebtoken::decode::<Checked>(token, key, &self.validation)
            .map_err(|e| plain(e.kind()))?;
        let claims = data.claims;
        let sub = match claims.sub {
            Some(serde_json::Value::String(sub)) if is_member_id(&sub) => sub,
            Some(_) => return Err("its subject (sub) is not a member id".into()),
            None => return Err("its sub claim is missing or malformed".into()),
        };
        let exp = claims
            .exp
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .ok_or("its exp claim is malformed")?;
        let now_s = crate::state::clock::system_ms() as u64 / 1000;
        let iat = match &claims.iat {
            None => now_s,
            Some(iat) => iat.as_u64().ok_or("its iat claim is malformed")?,
        };
        let lifetime = exp.saturating_sub(iat);
        if lifetime > self.max_lifetime.as_secs() {
            return Err(format!(
                "it is valid for longer than the {} a token may be (exp - iat)",
                humantime::format_duration(self.max_lifetime)
            ));
        }
        Ok((sub, exp.saturating_add(self.validation.leeway)))
    }
}

/// What is wrong with a token, in words a caller can act on.
fn plain(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => "it has expired (exp)".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "its signature does not verify".into(),
        ErrorKind::InvalidIssuer => "its issuer (iss) is not the one expected".into(),
        ErrorKind::InvalidAudience => "its audience (aud) is not the one expected".into(),
        ErrorKind::InvalidSubject => "its subject (sub) is not valid".into(),
        ErrorKind::MissingRequiredClaim(claim) => {
            format!("its {} claim is missing or malformed", known(claim))
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            format!("its {} claim is malformed", known(claim))
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "it must be signed with EdDSA (Ed25519)".into()
        }
        _ => "it is malformed".into(),
    }
}

/// A claim name to repeat to the caller: one of the registered claims, never
/// text taken from the token.
fn known(claim: &str) -> &'static str {
    ["exp", "nbf", "iat", "sub", "iss", "aud"]
        .into_iter()
        .find(|c| *c == claim)
        .unwrap_or("a registered")
}

/// Signs member tokens (the development identity provider).
pub struct TokenSigner {
    key: EncodingKey,
    kid: String,
    issuer: String,
    audience: String,
}

impl TokenSigner {
    /// `private_pem`: an Ed25519 private key (PKCS#8 PEM).
    pub fn new(
        private_pem: &[u8],
        kid: &str,
        issuer: &str,
        audience: &str,
    ) -> Result<Self, String> {
        let key = EncodingKey::from_ed_pem(private_pem)
            .map_err(|e| format!("not an Ed25519 private key (PKCS#8 PEM): {e}"))?;
        Ok(Self {
            key,
            kid: kid.to_string(),
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        })
    }

    /// A token for `member`, valid for `ttl`.
    pub fn mint(&self, member: &str, ttl: Duration) -> Result<String, String> {
        self.mint_at(member, crate::state::clock::system_ms() as u64 / 1000, ttl)
    }

    /// A token issued at `now_s` (seconds since the epoch).
    pub fn mint_at(&self, member: &str, now_s: u64, ttl: Duration) -> Result<String, String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            sub: member.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now_s,
            exp: now_s + ttl.as_secs(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| format!("cannot sign: {e}"))
    }
}
