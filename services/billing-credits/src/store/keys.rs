//! billing-credits' Redis keys (prefix `billing:`). A member's keys carry
//! the member's hash tag `{M}`, so every balance script touches one slot.
//!
//! - `billing:{M}:account` hash: `balance` (the counter), the current cycle
//!   (`ver` plan-period version, `idx` cycles renewed in it, `cstart`,
//!   `cend`) and its counters (`debited`, `refunded`, `released`, `granted`,
//!   reset at each renewal), the entitlement in force (`plan`, `monthly`,
//!   `cap`, `paid`), until when it may be trusted without asking
//!   subscription-plan again (`valid`) and the subscription revision it came
//!   from (`erev`), and the grant window (`wend`,
//!   `wgrant`: see account.lua) that keeps plan changes from minting.
//! - `billing:{M}:ledger` stream: one entry per balance change, never edited.
//! - `billing:{M}:debit:<message_id>` hash: a message's debit (held,
//!   confirmed, released or refunded). Held debits never expire; the others
//!   expire after the refund window plus a margin (confirmed/refunded) or the
//!   tombstone retention (released).
//! - `billing:{M}:request:<request_id>` string: the fingerprint and the first
//!   reply of a request.
//! - `billing:message:{<message_id>}` string: the member a message id was
//!   first debited to, so the same id for another member is refused.
//! - `billing:holds:{h<N>}` sorted sets ([`HOLD_SHARDS`] shards): held debits
//!   by expiry, for the sweeper. Written before the debit, so no hold can
//!   miss it.
//!
//! Read, never written: subscription-plan's `plans:{M}:rev`, the revision
//! of the member's subscription it publishes (in the member's slot too).
//! The balance scripts compare it with the revision their cached
//! entitlement came from (README.md, "How it behaves"); of
//! subscription-plan's keys, billing's Redis user may reach these only.

use inmail_shared::state::sweep::shard_of;

/// Shards of the hold-expiry index (spread over cluster nodes).
pub const HOLD_SHARDS: u32 = 16;

pub fn account(member: &str) -> String {
    format!("billing:{{{member}}}:account")
}

pub fn ledger(member: &str) -> String {
    format!("billing:{{{member}}}:ledger")
}

pub fn debit(member: &str, message_id: &str) -> String {
    format!("billing:{{{member}}}:debit:{message_id}")
}

pub fn request(member: &str, request_id: &str) -> String {
    format!("billing:{{{member}}}:request:{request_id}")
}

/// The revision of the member's subscription subscription-plan publishes
/// (read only).
pub fn plans_revision(member: &str) -> String {
    format!("plans:{{{member}}}:rev")
}

pub fn message_owner(message_id: &str) -> String {
    format!("billing:message:{{{message_id}}}")
}

pub fn hold_shard(shard: u32) -> String {
    format!("billing:holds:{{h{shard}}}")
}

/// The hold shard of a member.
pub fn hold_shard_of(member: &str) -> u32 {
    shard_of(member, HOLD_SHARDS)
}

/// A hold index entry: `<member>|<message_id>` (neither contains '|').
pub fn hold_entry(member: &str, message_id: &str) -> String {
    format!("{member}|{message_id}")
}

pub fn parse_hold_entry(entry: &str) -> Option<(String, String)> {
    entry
        .split_once('|')
        .map(|(member, message)| (member.to_string(), message.to_string()))
}

/// The member of an account key.
pub fn member_of_account(key: &str) -> Option<&str> {
    key.strip_prefix("billing:{")
        .and_then(|rest| rest.strip_suffix("}:account"))
}

/// SCAN pattern of every account.
pub const ACCOUNT_PATTERN: &str = "billing:{*}:account";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_key_carries_the_member_hash_tag() {
        for key in [
            account("m-1"),
            ledger("m-1"),
            debit("m-1", "msg"),
            request("m-1", "req"),
            plans_revision("m-1"),
        ] {
            assert!(key.contains("{m-1}"), "{key}");
        }
        assert_eq!(member_of_account(&account("m-1")), Some("m-1"));
        assert_eq!(
            parse_hold_entry(&hold_entry("m", "x")),
            Some(("m".into(), "x".into()))
        );
    }
}
