//! Member tokens: JWTs signed with Ed25519 (EdDSA) by the identity
//! provider; the services verify them with its public keys (a JWK set, keys
//! chosen by `kid`, so keys can be rotated by publishing the new one first).

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::validate::is_member_id;

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

/// Verifies member tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Vec<(Option<String>, DecodingKey)>,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl TokenVerifier {
    /// Reads the identity provider's public keys: a JWK set (JSON) of
    /// Ed25519 keys. `var` names the setting in errors.
    pub fn load(path: &Path, var: &str, issuer: &str, audience: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{var} {}: cannot read it: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("{var} {}: not a JWK set: {e}", path.display()))?;
        Self::from_set(&set, issuer, audience).map_err(|e| format!("{var} {}: {e}", path.display()))
    }

    pub fn from_set(set: &JwkSet, issuer: &str, audience: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a key is unusable: {e}"))?;
            keys.push((jwk.common.key_id.clone(), key));
        }
        if keys.is_empty() {
            return Err("the key set holds no key".into());
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 30;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Ok(Self { keys, validation })
    }

    /// The member a token names, once its signature, issuer, audience and
    /// expiry check out, and until when (epoch seconds, the leeway included)
    /// it stays valid.
    pub fn verify(&self, token: &str) -> Result<(String, u64), String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let candidates: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|(k, _)| k.as_deref() == Some(kid.as_str()))
                .map(|(_, key)| key)
                .collect(),
            None => self.keys.iter().map(|(_, key)| key).collect(),
        };
        let mut last = "no key matches the token's kid".to_string();
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) if is_member_id(&data.claims.sub) => {
                    let until = data.claims.exp.saturating_add(self.validation.leeway);
                    return Ok((data.claims.sub, until));
                }
                Ok(_) => return Err("the token's subject is not a member id".into()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
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
        self.mint_at(member, crate::clock::system_ms() as u64 / 1000, ttl)
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
