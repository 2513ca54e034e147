//! AIP-158 pagination: `page_size` (0 means the default) and opaque page tokens.
//! A token names the list it belongs to, so a token of one list is refused by
//! another instead of silently returning the wrong page.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::validate::Checks;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 500;

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

/// Makes the token for the page after `cursor` of list `kind`.
pub fn encode_token(kind: &str, cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}|{cursor}"))
}

/// Reads `page_token` of list `kind`; `None` for the first page.
pub fn decode_token(checks: &mut Checks, kind: &str, token: &str) -> Option<String> {
    if token.is_empty() {
        return None;
    }
    let decoded = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    match decoded
        .as_deref()
        .and_then(|text| text.split_once('|'))
        .filter(|(k, cursor)| *k == kind && !cursor.is_empty())
    {
        Some((_, cursor)) => Some(cursor.to_string()),
        None => {
            checks.add(
                "page_token",
                "is not a token returned by this list (use next_page_token as-is)",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_within_its_list_only() {
        let token = encode_token("ledger", "1700000000000-3");
        let mut checks = Checks::new();
        assert_eq!(
            decode_token(&mut checks, "ledger", &token).as_deref(),
            Some("1700000000000-3")
        );
        assert!(checks.is_empty());
        assert_eq!(decode_token(&mut checks, "inbox", &token), None);
        assert!(!checks.is_empty());
    }

    #[test]
    fn garbage_token_is_refused() {
        let mut checks = Checks::new();
        decode_token(&mut checks, "ledger", "%%%not-base64");
        assert!(checks.finish().is_err());
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
