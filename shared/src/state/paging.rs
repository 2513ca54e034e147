//! AIP-158 pagination: `page_size` (0 means the default) and opaque page
//! tokens bound to the request they came from.
//!
//! A token is the cursor and an HMAC-SHA256 over the list's name, the scope
//! of the request (the member, the conversation: whatever selects the list)
//! and the cursor. A token of another list, another member or another
//! conversation, or one not made by the service, does not verify and is
//! refused with INVALID_ARGUMENT naming `page_token`. The key is made once per
//! service and kept in its Redis (`<prefix>:paging-key`), so every replica
//! verifies every other's tokens.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::OnceCell;

use crate::contract::error::ApiError;
use crate::contract::validate::Checks;
use crate::state::storage::Redis;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 500;

/// Bytes of the MAC a token carries.
const MAC_LEN: usize = 16;

/// Reads `page_size`: 0 means `default`, negative is refused, larger than
/// `max` is clamped to `max` (AIP-158).
pub fn page_size(checks: &mut Checks, value: i32, default: usize, max: usize) -> usize {
    if value < 0 {
        checks.add("page_size", "must not be negative");
        return default;
    }
    match value as usize {
        0 => default,
        n => n.min(max),
    }
}

/// The page tokens of one service.
#[derive(Clone)]
pub struct PageTokens {
    redis: Redis,
    key_name: String,
    key: Arc<OnceCell<Vec<u8>>>,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTokens")
            .field("key_name", &self.key_name)
            .finish()
    }
}

impl PageTokens {
    /// `prefix`: the service's key prefix (e.g. "billing").
    pub fn new(redis: Redis, prefix: &str) -> Self {
        Self {
            redis,
            key_name: format!("{prefix}:paging-key"),
            key: Arc::new(OnceCell::new()),
        }
    }

    /// The service's MAC key, made by the first replica that issues a token
    /// (`create`); reading a token never writes (`None`: no token was ever
    /// issued, so none verifies).
    async fn key(&self, create: bool) -> Result<Option<&[u8]>, ApiError> {
        if let Some(key) = self.key.get() {
            return Ok(Some(key));
        }
        let stored: Option<String> = if create {
            let fresh = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            let previous: Option<String> = redis::cmd("SET")
                .arg(&self.key_name)
                .arg(&fresh)
                .arg("NX")
                .arg("GET")
                .query_async(&mut self.redis.conn())
                .await?;
            Some(previous.unwrap_or(fresh))
        } else {
            redis::cmd("GET")
                .arg(&self.key_name)
                .query_async(&mut self.redis.conn())
                .await?
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        let key = hex::decode(stored)
            .map_err(|e| ApiError::internal(format!("the page token key is unreadable: {e}")))?;
        Ok(Some(self.key.get_or_init(|| async { key }).await))
    }

    /// The MAC of the parts, each length-prefixed, not yet finalized.
    fn mac_of(key: &[u8], list: &str, scope: &[&str], cursor: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for part in [&["v1", list][..], scope, &[cursor]].concat() {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    fn mac(key: &[u8], list: &str, scope: &[&str], cursor: &str) -> Vec<u8> {
        Self::mac_of(key, list, scope, cursor)
            .finalize()
            .into_bytes()[..MAC_LEN]
            .to_vec()
    }

    /// The token for the page after `cursor` of `list`, for the request
    /// selected by `scope`.
    pub async fn encode(
        &self,
        list: &str,
        scope: &[&str],
        cursor: &str,
    ) -> Result<String, ApiError> {
        let key = self
            .key(true)
            .await?
            .ok_or_else(|| ApiError::internal("no page token key"))?;
        let mac = Self::mac(key, list, scope, cursor);
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(cursor),
            URL_SAFE_NO_PAD.encode(mac)
        ))
    }

    /// The cursor of `token` for `list` and `scope`; `None` for the first page
    /// (an empty token) or a token that does not verify (added to `checks`).
    pub async fn decode(
        &self,
        checks: &mut Checks,
        list: &str,
        scope: &[&str],
        token: &str,
    ) -> Result<Option<String>, ApiError> {
        if token.is_empty() {
            return Ok(None);
        }
        let key = self.key(false).await?;
        let verified = token
            .split_once('.')
            .zip(key)
            .and_then(|((cursor, mac), key)| {
                let cursor = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
                let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
                (mac.len() == MAC_LEN && !cursor.is_empty())
                    .then_some(())
                    .and_then(|()| {
                        Self::mac_of(key, list, scope, &cursor)
                            .verify_truncated_left(&mac)
                            .ok()
                    })
                    .map(|()| cursor)
            });
        if verified.is_none() {
            checks.add(
                "page_token",
                "is not a token returned by this list for this request (use next_page_token as-is, with the same member and filters)",
            );
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_binds_list_scope_and_cursor() {
        let key = b"k";
        let base = PageTokens::mac(key, "ledger", &["rae"], "17-0");
        assert_eq!(base, PageTokens::mac(key, "ledger", &["rae"], "17-0"));
        assert_ne!(base, PageTokens::mac(key, "ledger", &["sid"], "17-0"));
        assert_ne!(base, PageTokens::mac(key, "inbox", &["rae"], "17-0"));
        assert_ne!(base, PageTokens::mac(key, "ledger", &["rae"], "17-1"));
        assert_ne!(base, PageTokens::mac(b"other", "ledger", &["rae"], "17-0"));
        assert_ne!(
            PageTokens::mac(key, "l", &["ab", "c"], "x"),
            PageTokens::mac(key, "l", &["a", "bc"], "x")
        );
    }

    #[test]
    fn page_size_defaults_clamps_and_refuses_negative() {
        let mut checks = Checks::new();
        assert_eq!(page_size(&mut checks, 0, 50, 500), 50);
        assert_eq!(page_size(&mut checks, 7, 50, 500), 7);
        assert_eq!(page_size(&mut checks, 10_000, 50, 500), 500);
        assert!(checks.is_empty());
        page_size(&mut checks, -1, 50, 500);
        assert!(checks.finish().is_err());
    }
}
