//! What a server already verified, so a connection's certificate is parsed
//! once and a member's token is checked once, not on every call.
//!
//! Entries are keyed by the exact bytes verified (a certificate the TLS
//! handshake already checked against our CA; a token whose signature,
//! issuer, audience and subject checked out), so an entry can only answer
//! for those same bytes. A token entry keeps its expiry and is dropped once
//! it has passed (with the verifier's leeway). The cache is bounded: when
//! full it is emptied and refills with what is in use.

use std::collections::HashMap;
use std::sync::Mutex;

/// Most entries kept.
const CAPACITY: usize = 4096;

/// A value and when it stops being valid (epoch seconds; `None`: never).
type Entry<V> = (V, Option<u64>);

pub struct Seen<V> {
    entries: Mutex<HashMap<Box<[u8]>, Entry<V>>>,
}

impl<V: Clone> Default for Seen<V> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> Seen<V> {
    /// The value verified for `key`, unless it expired (`now_s` past its
    /// expiry).
    pub fn get(&self, key: &[u8], now_s: u64) -> Option<V> {
        let mut entries = self.entries.lock().unwrap();
        match entries.get(key) {
            Some((value, expires)) if expires.is_none_or(|e| now_s <= e) => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `value` for `key` until `expires_s` (never, if `None`).
    pub fn put(&self, key: &[u8], value: V, expires_s: Option<u64>) {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(key.into(), (value, expires_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_the_same_bytes_and_only_until_expiry() {
        let seen = Seen::default();
        seen.put(b"token-a", "sam".to_string(), Some(100));
        assert_eq!(seen.get(b"token-a", 100).as_deref(), Some("sam"));
        assert_eq!(seen.get(b"token-b", 100), None);
        assert_eq!(seen.get(b"token-a", 101), None);
        assert_eq!(
            seen.get(b"token-a", 50),
            None,
            "an expired entry is dropped"
        );
    }

    #[test]
    fn stays_bounded() {
        let seen = Seen::default();
        for i in 0..(CAPACITY + 10) {
            seen.put(i.to_string().as_bytes(), i, None);
        }
        assert!(seen.entries.lock().unwrap().len() <= CAPACITY);
    }
}
