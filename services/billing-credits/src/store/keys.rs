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
//! - `billing:{M}:events` stream: the member's balance events (WatchBalance):
//!   a copy of every ledger entry (field `l`: its ledger id) and the
//!   low-balance alerts (`LOW_BALANCE`, `BALANCE_RECOVERED`, field `h`: the
//!   threshold), written by the same script; trimmed to EVENTS_MAX_PER_MEMBER
//!   and EVENTS_RETENTION. The account hash holds the alert: `alert` (the
//!   threshold), `alow` ("1" while at or below it).
//! - `billing:cdc:{p<N>}` sorted sets ([`CDC_PARTITIONS`]): the operators'
//!   ledger feed's member index, each member by when a balance script last
//!   started for it; written before the script, so the feed never misses a
//!   member whose events changed.
//! - `billing:eventnotify:{n<N>}` streams: which event streams grew, for the
//!   watchers' dispatcher.
//! - `billing:{M}:alertreq:<request_id>` hash, `billing:{M}:quota` hash:
//!   SetLowBalanceAlert's request records and the member's mutation quota
//!   (`inmail_shared::state::idempotency`).
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

/// Partitions of the operators' ledger feed (WatchLedger).
pub const CDC_PARTITIONS: u32 = 8;

/// Shards of the hold-expiry index (spread over cluster nodes).
pub const HOLD_SHARDS: u32 = 16;

pub fn account(member: &str) -> String {
    format!("billing:{{{member}}}:account")
}

pub fn ledger(member: &str) -> String {
    format!("billing:{{{member}}}:ledger")
}

/// SetLowBalanceAlert's request records (the request log's, apart from the
/// balance scripts' own `request:` records).
pub fn alert_request(member: &str, request_id: &str) -> String {
    format!("billing:{{{member}}}:alertreq:{request_id}")
}

/// The member's mutation quota (a token bucket every new request id of the
/// member's own calls spends from).
pub fn quota(member: &str) -> String {
    format!("billing:{{{member}}}:quota")
}

/// The members of one partition of the ledger feed by when a balance
/// script last started for them (wall clock ms); written before the script.
pub fn cdc_index(partition: u32) -> String {
    format!("billing:cdc:{{p{partition}}}")
}

pub fn cdc_partition_of(member: &str) -> u32 {
    shard_of(member, CDC_PARTITIONS)
}

pub fn events(member: &str) -> String {
    format!("billing:{{{member}}}:events")
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
