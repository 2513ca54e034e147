//! messaging's Redis keys (prefix `messaging:`). A conversation's keys share
//! the conversation's hash tag `{a~b}`; a member's keys share the member's
//! `{M}`. Each script touches one of those slots only.
//!
//! - `messaging:{a~b}:conv` hash — the pair: `a`, `b`; `conn`, `conn_at`;
//!   a pending invitation `inv_from`, `inv_at`, `inv_note`, `inv_req` (the
//!   request that sent it); `cool_a` /
//!   `cool_b` (until when a may not invite b again / b may not invite a);
//!   `blk_a` / `blk_b` (when a blocked b / b blocked a); `w_a`, `w_b`
//!   (messages delivered from each); `open` (someone responded to an InMail);
//!   `seq`, `count`, `last`, `last_msg`; `arch_seq`, `arch_n` (the last
//!   seq moved to the history store, and how many moved); the conversation's InMail `im_id`,
//!   `im_from`, `im_at` (sent), `im_state` (staged, awaiting, replied,
//!   accepted, declined), `im_resp_at`, `im_refund` ("", due, refunded,
//!   closed).
//! - `messaging:{a~b}:msg:<id>` hash — one message: `from`, `to`, `kind`,
//!   `subject`, `body`, `credits`, `at`, `state` (staged, delivered, failed),
//!   `seq`, `reason` (why it failed), `bal_after`, `fp` (the request's
//!   fingerprint).
//! - `messaging:{a~b}:timeline` sorted set — delivered message ids by `seq`.
//! - `messaging:{M}:prefs` hash — `inmail` ("0" when InMail is turned off).
//! - `messaging:{M}:connections`, `messaging:{M}:blocked`,
//!   `messaging:{M}:inbox` sorted sets — other member (or conversation) by
//!   time, for listing.
//! - `messaging:{M}:invitations:sent`, `messaging:{M}:invitations:received`
//!   sorted sets — the other member of a pending invitation by when it was
//!   sent (the pair's hash decides; stale entries are dropped when listed).
//! - `messaging:{M}:inviterate` hash — the weekly invitation token bucket.
//! - `messaging:{M}:request:<request_id>` hash — request records.
//! - `messaging:{M}:quota` hash — the member's mutation quota (a token
//!   bucket every new request id spends from).
//! - `messaging:{M}:ratelimit` hash — the InMail token bucket.
//! - `messaging:{M}:sendrate` hash — the free-send token bucket.
//! - `messaging:{M}:openprofile:<YYYYMM>` string — Open Profile messages sent
//!   this calendar month.
//! - `messaging:{M}:events` stream — the member's inbox events (WatchInbox):
//!   field `e`, an encoded `InboxEvent`; trimmed to EVENTS_MAX_PER_MEMBER
//!   and EVENTS_RETENTION.
//! - `messaging:eventnotify:{n<N>}` streams — which event streams were
//!   appended to, for the watchers' dispatcher (`inmail_shared::state::events`).
//! - `messaging:outbox:{o<N>}` sorted sets ([`OUTBOX_SHARDS`] shards) —
//!   sends, refunds and messages' owed inbox events to finish if their
//!   process died, by when to look at them.

use inmail_shared::state::sweep::shard_of;

pub const OUTBOX_SHARDS: u32 = 16;

pub fn conv(conv: &str) -> String {
    format!("messaging:{{{conv}}}:conv")
}

pub fn msg(conv: &str, message_id: &str) -> String {
    format!("messaging:{{{conv}}}:msg:{message_id}")
}

pub fn timeline(conv: &str) -> String {
    format!("messaging:{{{conv}}}:timeline")
}

/// Every conversation's timeline (SCAN's pattern).
pub const TIMELINE_PATTERN: &str = "messaging:{*}:timeline";

/// The conversation of a timeline key.
pub fn conv_of_timeline(key: &str) -> Option<&str> {
    key.strip_prefix("messaging:{")?.strip_suffix("}:timeline")
}

pub fn prefs(member: &str) -> String {
    format!("messaging:{{{member}}}:prefs")
}

pub fn connections(member: &str) -> String {
    format!("messaging:{{{member}}}:connections")
}

pub fn blocked(member: &str) -> String {
    format!("messaging:{{{member}}}:blocked")
}

pub fn inbox(member: &str) -> String {
    format!("messaging:{{{member}}}:inbox")
}

pub fn invitations_sent(member: &str) -> String {
    format!("messaging:{{{member}}}:invitations:sent")
}

pub fn invitations_received(member: &str) -> String {
    format!("messaging:{{{member}}}:invitations:received")
}

pub fn invite_rate(member: &str) -> String {
    format!("messaging:{{{member}}}:inviterate")
}

pub fn request(member: &str, request_id: &str) -> String {
    format!("messaging:{{{member}}}:request:{request_id}")
}

pub fn quota(member: &str) -> String {
    format!("messaging:{{{member}}}:quota")
}

pub fn ratelimit(member: &str) -> String {
    format!("messaging:{{{member}}}:ratelimit")
}

pub fn send_rate(member: &str) -> String {
    format!("messaging:{{{member}}}:sendrate")
}

pub fn open_profile(member: &str, month: &str) -> String {
    format!("messaging:{{{member}}}:openprofile:{month}")
}

pub fn events(member: &str) -> String {
    format!("messaging:{{{member}}}:events")
}

pub fn outbox(shard: u32) -> String {
    format!("messaging:outbox:{{o{shard}}}")
}

/// The outbox shard of a conversation.
pub fn outbox_shard_of(conv: &str) -> u32 {
    shard_of(conv, OUTBOX_SHARDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_keys_share_the_conversation_tag() {
        for key in [conv("a~b"), msg("a~b", "m"), timeline("a~b")] {
            assert!(key.contains("{a~b}"), "{key}");
        }
        assert_eq!(conv_of_timeline(&timeline("a~b")), Some("a~b"));
        assert_eq!(conv_of_timeline(&conv("a~b")), None);
        for key in [
            inbox("m"),
            request("m", "r"),
            ratelimit("m"),
            prefs("m"),
            invitations_sent("m"),
            invitations_received("m"),
            invite_rate("m"),
            quota("m"),
            events("m"),
        ] {
            assert!(key.contains("{m}"), "{key}");
        }
    }
}
