//! messaging's Redis store: keys ([`keys`]), the Lua scripts (`lua/`, one
//! header each), script replies and stored hashes parsed into types
//! ([`reply`]), and the outbox ([`outbox`]).
//!
//! Each script touches one slot (a conversation's `{a~b}` or a member's
//! `{M}`): atomic, and valid on Redis Cluster. Indexes that live in another
//! slot (inboxes, connection lists, the outbox) are written in an order that
//! makes a crash between the steps harmless, and are repaired by retries.

pub mod keys;
pub mod outbox;
pub mod reply;

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::storage::{Batch, Redis, args};
use redis::Script;

use crate::domain::{Kind, RefundState};
use crate::error::SendFailure;

pub use self::keys::OUTBOX_SHARDS;
pub use self::outbox::OutboxItem;
use self::reply::parse;
pub use self::reply::{
    Begun, Connected, ConversationRecord, Delivered, Delivery, Existing, GivenUp, MessageState,
    Refusal, Responded, Response, Staged, StoredMessage,
};

/// The sender allowances BEGIN_SEND enforces.
#[derive(Debug, Clone)]
pub struct SendLimits {
    pub burst: u32,
    pub tokens_per_ms: f64,
    pub open_profile_monthly: u32,
    pub open_profile_counter_ttl_ms: i64,
    pub request_retention_ms: i64,
}

/// A message on its way, built once per send: who, where, what.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub conv: &'a str,
    /// The conversation's members, sorted.
    pub a: &'a str,
    pub b: &'a str,
    pub message_id: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    /// The fingerprint of the request that sends it.
    pub fingerprint: &'a str,
}

impl<'a> Envelope<'a> {
    /// The envelope of a stored message.
    pub fn of(conv: &'a str, message: &'a StoredMessage) -> Self {
        let (a, b) = crate::domain::sorted(&message.from, &message.to);
        Self {
            conv,
            a,
            b,
            message_id: &message.id,
            sender: &message.from,
            recipient: &message.to,
            subject: &message.subject,
            body: &message.body,
            fingerprint: &message.fingerprint,
        }
    }

    fn outbox_item(&self) -> OutboxItem {
        OutboxItem::Send {
            conv: self.conv.to_string(),
            message_id: self.message_id.to_string(),
            sender: self.sender.to_string(),
        }
    }
}

/// The claim of a send's request id (BEGIN_SEND).
#[derive(Debug, Clone, Copy)]
pub struct Begin<'a> {
    pub kind: Kind,
    pub now_ms: i64,
    /// The calendar month (YYYYMM) of `now_ms`.
    pub month: &'a str,
}

/// How a message is delivered (DELIVER).
#[derive(Debug, Clone, Copy)]
pub struct Delivering {
    /// A staged InMail (true) or a new free message.
    pub staged: bool,
    pub kind: Kind,
    pub credits: i32,
    pub now_ms: i64,
    pub refund_window_ms: i64,
    pub balance_after: Option<i64>,
}

/// A sender's request record as read before a send.
#[derive(Debug, Clone, Default)]
pub struct SendRecord {
    /// The fingerprint the request id was claimed with (`None`: unclaimed).
    pub fingerprint: Option<String>,
    /// The refusal a claimed send ended with.
    pub refused: Option<SendFailure>,
}

#[derive(Clone)]
pub struct MessagingStore {
    redis: Redis,
    begin_send: Script,
    stage_inmail: Script,
    deliver: Script,
    fail_staged: Script,
    respond: Script,
    settle_refund: Script,
    connect: Script,
    disconnect: Script,
    block: Script,
}

impl MessagingStore {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            begin_send: Script::new(include_str!("lua/begin_send.lua")),
            stage_inmail: Script::new(include_str!("lua/stage_inmail.lua")),
            deliver: Script::new(include_str!("lua/deliver.lua")),
            fail_staged: Script::new(include_str!("lua/fail_staged.lua")),
            respond: Script::new(include_str!("lua/respond.lua")),
            settle_refund: Script::new(include_str!("lua/settle_refund.lua")),
            connect: Script::new(include_str!("lua/connect.lua")),
            disconnect: Script::new(include_str!("lua/disconnect.lua")),
            block: Script::new(include_str!("lua/block.lua")),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// What a send needs to decide its kind, in one round trip: the
    /// sender's request record, the pair, and whether the recipient accepts
    /// InMail.
    pub async fn read_for_send(
        &self,
        sender: &str,
        request_id: &str,
        conv: &str,
        recipient: &str,
    ) -> Result<(SendRecord, ConversationRecord, bool), ApiError> {
        let mut batch = Batch::new();
        batch
            .add(
                redis::cmd("HMGET")
                    .arg(keys::request(sender, request_id))
                    .arg("fp")
                    .arg("refused")
                    .clone(),
            )
            .add(redis::cmd("HGETALL").arg(keys::conv(conv)).clone())
            .add(
                redis::cmd("HGET")
                    .arg(keys::prefs(recipient))
                    .arg("inmail")
                    .clone(),
            );
        type Read = (
            (Option<String>, Option<String>),
            HashMap<String, String>,
            Option<String>,
        );
        let ((fingerprint, refused), pair, accepts): Read = self.redis.run(&batch).await?;
        Ok((
            SendRecord {
                fingerprint,
                refused: refused.as_deref().and_then(SendFailure::parse),
            },
            ConversationRecord::from_fields(&pair),
            accepts.as_deref() != Some("0"),
        ))
    }

    fn push_begin<'s>(
        batch: &mut Batch<'s>,
        script: &'s Script,
        envelope: &Envelope<'_>,
        request_id: &str,
        begin: &Begin<'_>,
        limits: &SendLimits,
    ) {
        let keys = [
            keys::request(envelope.sender, request_id),
            keys::ratelimit(envelope.sender),
            keys::open_profile(envelope.sender, begin.month),
        ];
        let mut a = args();
        a.arg(envelope.fingerprint)
            .arg(envelope.message_id)
            .arg(envelope.conv)
            .arg(begin.kind.as_str())
            .arg(begin.now_ms)
            .arg(limits.burst)
            .arg(format!("{:.12e}", limits.tokens_per_ms))
            .arg(limits.open_profile_monthly)
            .arg(limits.open_profile_counter_ttl_ms)
            .arg(limits.request_retention_ms);
        batch.script(script, &keys, a);
    }

    /// Claims a free message's request id (and counts an Open Profile message).
    pub async fn begin_send(
        &self,
        envelope: &Envelope<'_>,
        request_id: &str,
        begin: &Begin<'_>,
        limits: &SendLimits,
    ) -> Result<Begun, ApiError> {
        let mut batch = Batch::new();
        Self::push_begin(
            &mut batch,
            &self.begin_send,
            envelope,
            request_id,
            begin,
            limits,
        );
        let (reply,): (String,) = self.redis.run(&batch).await?;
        parse("begin-send", &reply)
    }

    /// An InMail's first step, in one round trip: claim the request and
    /// spend a token (BEGIN_SEND), index the send in the outbox, and stage the
    /// message (STAGE_INMAIL). The stage runs whatever BEGIN_SEND answers; the
    /// caller gives the staged message up when BEGIN_SEND refused. No credit
    /// has moved at this point either way.
    pub async fn begin_and_stage(
        &self,
        envelope: &Envelope<'_>,
        request_id: &str,
        begin: &Begin<'_>,
        limits: &SendLimits,
        look_again_at_ms: i64,
    ) -> Result<(Begun, Staged), ApiError> {
        let mut batch = Batch::new();
        Self::push_begin(
            &mut batch,
            &self.begin_send,
            envelope,
            request_id,
            begin,
            limits,
        );
        batch.add_ignored(
            redis::cmd("ZADD")
                .arg(keys::outbox(keys::outbox_shard_of(envelope.conv)))
                .arg(look_again_at_ms)
                .arg(envelope.outbox_item().encode())
                .clone(),
        );
        let mut a = args();
        a.arg(envelope.a)
            .arg(envelope.b)
            .arg(envelope.message_id)
            .arg(envelope.sender)
            .arg(envelope.recipient)
            .arg(envelope.subject)
            .arg(envelope.body)
            .arg(begin.now_ms)
            .arg(envelope.fingerprint);
        batch.script(
            &self.stage_inmail,
            &[
                keys::conv(envelope.conv),
                keys::msg(envelope.conv, envelope.message_id),
            ],
            a,
        );
        let (begun, staged): (String, String) = self.redis.run(&batch).await?;
        Ok((parse("begin-send", &begun)?, parse("stage", &staged)?))
    }

    /// Delivers a message, writing both inboxes first in the same round trip
    /// (so a crash cannot leave the conversation out of an inbox; an inbox
    /// entry without a delivered message is not listed). Inbox scores only
    /// move forward (GT), so a retry never pushes a conversation down.
    pub async fn deliver(
        &self,
        envelope: &Envelope<'_>,
        how: &Delivering,
    ) -> Result<Delivery, ApiError> {
        let mut batch = Batch::new();
        for member in [envelope.a, envelope.b] {
            batch.add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::inbox(member))
                    .arg("GT")
                    .arg(how.now_ms)
                    .arg(envelope.conv)
                    .clone(),
            );
        }
        let mut a = args();
        a.arg(if how.staged { "staged" } else { "new" })
            .arg(envelope.message_id)
            .arg(envelope.sender)
            .arg(envelope.recipient)
            .arg(how.kind.as_str())
            .arg(envelope.subject)
            .arg(envelope.body)
            .arg(how.credits)
            .arg(how.now_ms)
            .arg(envelope.a)
            .arg(envelope.b)
            .arg(how.refund_window_ms)
            .arg(how.balance_after.map(|b| b.to_string()).unwrap_or_default())
            .arg(envelope.fingerprint);
        batch.script(
            &self.deliver,
            &[
                keys::conv(envelope.conv),
                keys::msg(envelope.conv, envelope.message_id),
                keys::timeline(envelope.conv),
            ],
            a,
        );
        let (reply,): (String,) = self.redis.run(&batch).await?;
        parse("deliver", &reply)
    }

    /// Both inboxes show the conversation's activity at `at_ms` (GT: only
    /// forward).
    pub async fn touch_inboxes(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for member in [a, b] {
            batch.add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::inbox(member))
                    .arg("GT")
                    .arg(at_ms)
                    .arg(conv)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// Marks a staged message failed with `reason` (see fail_staged.lua).
    pub async fn fail_staged(
        &self,
        conv: &str,
        message_id: &str,
        reason: SendFailure,
        keep_ms: i64,
    ) -> Result<GivenUp, ApiError> {
        let reply: String = self
            .fail_staged
            .key(keys::conv(conv))
            .key(keys::msg(conv, message_id))
            .arg(message_id)
            .arg(reason.as_str())
            .arg(keep_ms)
            .arg("")
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse("fail-staged", &reply)
    }

    /// Undoes a stage that must not count (see fail_staged.lua): only the one
    /// the request with `fingerprint` made.
    pub async fn forget_staged(
        &self,
        conv: &str,
        message_id: &str,
        fingerprint: &str,
    ) -> Result<(), ApiError> {
        let reply: String = self
            .fail_staged
            .key(keys::conv(conv))
            .key(keys::msg(conv, message_id))
            .arg(message_id)
            .arg("")
            .arg(0)
            .arg(fingerprint)
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse::<GivenUp>("fail-staged", &reply).map(|_| ())
    }

    /// Records that a claimed send was refused, so a retry of its request
    /// answers the same refusal.
    pub async fn record_refusal(
        &self,
        sender: &str,
        request_id: &str,
        reason: SendFailure,
    ) -> Result<(), ApiError> {
        let _: i64 = redis::cmd("HSET")
            .arg(keys::request(sender, request_id))
            .arg("refused")
            .arg(reason.as_str())
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Accepts or declines the InMail awaiting `responder`'s response.
    pub async fn respond(
        &self,
        conv: &str,
        responder: &str,
        accept: bool,
        now_ms: i64,
        refund_window_ms: i64,
    ) -> Result<Response, ApiError> {
        let reply: String = self
            .respond
            .key(keys::conv(conv))
            .arg(responder)
            .arg(if accept { "accepted" } else { "declined" })
            .arg(now_ms)
            .arg(refund_window_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse("respond", &reply)
    }

    /// Records what became of a due refund; answers whether it was due.
    pub async fn settle_refund(
        &self,
        conv: &str,
        inmail_id: &str,
        outcome: RefundState,
    ) -> Result<bool, ApiError> {
        let settled: i64 = self
            .settle_refund
            .key(keys::conv(conv))
            .arg(inmail_id)
            .arg(outcome.as_str())
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(settled == 1)
    }

    pub async fn connect(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<Connected, ApiError> {
        let reply: String = self
            .connect
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse("connect", &reply)
    }

    /// Both members' connection lists show the other since `at_ms`.
    pub async fn index_connection(
        &self,
        one: &str,
        other: &str,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (list, member) in [(one, other), (other, one)] {
            batch.add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::connections(list))
                    .arg(at_ms)
                    .arg(member)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// Disconnects the pair; answers whether they were connected.
    pub async fn disconnect(&self, conv: &str, one: &str, other: &str) -> Result<bool, ApiError> {
        let was: i64 = self
            .disconnect
            .key(keys::conv(conv))
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(one, other).await?;
        Ok(was == 1)
    }

    async fn unindex_connection(&self, one: &str, other: &str) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (list, member) in [(one, other), (other, one)] {
            batch.add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::connections(list))
                    .arg(member)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// `blocker` blocks `blocked`; answers when the block started.
    pub async fn block(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        blocker: &str,
        blocked: &str,
        now_ms: i64,
    ) -> Result<i64, ApiError> {
        let side = if blocker == a { "a" } else { "b" };
        let since: i64 = self
            .block
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(side)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(blocker, blocked).await?;
        let _: () = redis::cmd("ZADD")
            .arg(keys::blocked(blocker))
            .arg(since)
            .arg(blocked)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(since)
    }

    /// Lifts `blocker`'s block of `blocked`; answers whether there was one.
    pub async fn unblock(
        &self,
        conv: &str,
        a: &str,
        blocker: &str,
        blocked: &str,
    ) -> Result<bool, ApiError> {
        let field = if blocker == a { "blk_a" } else { "blk_b" };
        let mut batch = Batch::new();
        batch
            .add(redis::cmd("HDEL").arg(keys::conv(conv)).arg(field).clone())
            .add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::blocked(blocker))
                    .arg(blocked)
                    .clone(),
            );
        let (removed,): (i64,) = self.redis.run(&batch).await?;
        Ok(removed == 1)
    }

    pub async fn set_accepts_inmail(&self, member: &str, accepts: bool) -> Result<(), ApiError> {
        let _: () = redis::cmd("HSET")
            .arg(keys::prefs(member))
            .arg("inmail")
            .arg(if accepts { "1" } else { "0" })
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn accepts_inmail(&self, member: &str) -> Result<bool, ApiError> {
        let value: Option<String> = redis::cmd("HGET")
            .arg(keys::prefs(member))
            .arg("inmail")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(value.as_deref() != Some("0"))
    }

    pub async fn conversation(&self, conv: &str) -> Result<ConversationRecord, ApiError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::conv(conv))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(ConversationRecord::from_fields(&fields))
    }

    pub async fn message(
        &self,
        conv: &str,
        message_id: &str,
    ) -> Result<Option<StoredMessage>, ApiError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::msg(conv, message_id))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(StoredMessage::from_fields(message_id, fields))
    }

    /// Conversations with their last messages, in two round trips.
    pub async fn conversations_with_last(
        &self,
        convs: &[String],
    ) -> Result<Vec<(ConversationRecord, Option<StoredMessage>)>, ApiError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(redis::cmd("HGETALL").arg(keys::conv(conv)).clone());
        }
        let pairs: Vec<HashMap<String, String>> = self.redis.run(&batch).await?;
        let records: Vec<ConversationRecord> =
            pairs.iter().map(ConversationRecord::from_fields).collect();
        let mut batch = Batch::new();
        for (conv, record) in convs.iter().zip(&records) {
            let last = record.last_message_id.as_deref().unwrap_or("-");
            batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, last)).clone());
        }
        let lasts: Vec<HashMap<String, String>> = self.redis.run(&batch).await?;
        Ok(records
            .into_iter()
            .zip(lasts)
            .map(|(record, last)| {
                let id = record.last_message_id.clone().unwrap_or_default();
                (record, StoredMessage::from_fields(&id, last))
            })
            .collect())
    }

    /// Delivered messages newest first, before `before_seq` when given; one
    /// more than `limit` when there is more.
    pub async fn messages_page(
        &self,
        conv: &str,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, StoredMessage)>, ApiError> {
        let max = before_seq.map_or("+inf".to_string(), |s| format!("({s}"));
        let ids: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(keys::timeline(conv))
            .arg(max)
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .arg("WITHSCORES")
            .query_async(&mut self.redis.conn())
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for (id, _) in &ids {
            batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, id)).clone());
        }
        let bodies: Vec<HashMap<String, String>> = self.redis.run(&batch).await?;
        Ok(ids
            .into_iter()
            .zip(bodies)
            .filter_map(|((id, seq), fields)| {
                StoredMessage::from_fields(&id, fields).map(|m| (seq, m))
            })
            .collect())
    }

    /// A page of a member's sorted set (inbox, connections, blocks), newest
    /// first, after the cursor `(score, member)` when given. Ties on the
    /// score come in reverse member order, as Redis sorts them.
    pub async fn index_page(
        &self,
        key: &str,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, ApiError> {
        let max = after.map_or("+inf".to_string(), |(score, _)| score.to_string());
        let mut out = Vec::with_capacity(limit + 1);
        let mut skip = 0;
        loop {
            let batch: Vec<(String, i64)> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(&max)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(skip)
                .arg(limit + 1)
                .arg("WITHSCORES")
                .query_async(&mut self.redis.conn())
                .await?;
            let fetched = batch.len();
            for (member, score) in batch {
                let seen = after.is_some_and(|(s, m)| score == s && member.as_str() >= m);
                if !seen {
                    out.push((member, score));
                }
            }
            if out.len() > limit || fetched < limit + 1 {
                out.truncate(limit + 1);
                return Ok(out);
            }
            skip += fetched;
        }
    }

    pub async fn outbox_add(&self, item: &OutboxItem, at_ms: i64) -> Result<(), ApiError> {
        let _: () = redis::cmd("ZADD")
            .arg(keys::outbox(keys::outbox_shard_of(item.conv())))
            .arg(at_ms)
            .arg(item.encode())
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn outbox_remove(&self, item: &OutboxItem) -> Result<(), ApiError> {
        let _: () = redis::cmd("ZREM")
            .arg(keys::outbox(keys::outbox_shard_of(item.conv())))
            .arg(item.encode())
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Drops finished items of one outbox shard.
    pub async fn outbox_remove_many(
        &self,
        shard: u32,
        items: &[OutboxItem],
    ) -> Result<(), ApiError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(keys::outbox(shard));
        for item in items {
            cmd.arg(item.encode());
        }
        let _: i64 = cmd.query_async(&mut self.redis.conn()).await?;
        Ok(())
    }

    /// For each item, the state of the message a send item names (refund
    /// items: `None`), in one round trip.
    pub async fn outbox_states(
        &self,
        items: &[OutboxItem],
    ) -> Result<Vec<Option<MessageState>>, ApiError> {
        let mut batch = Batch::new();
        for item in items {
            let cmd = match item {
                OutboxItem::Send {
                    conv, message_id, ..
                } => redis::cmd("HGET")
                    .arg(keys::msg(conv, message_id))
                    .arg("state")
                    .clone(),
                OutboxItem::Refund { conv, .. } => {
                    redis::cmd("HGET").arg(keys::conv(conv)).arg("-").clone()
                }
            };
            batch.add(cmd);
        }
        let states: Vec<Option<String>> = self.redis.run(&batch).await?;
        Ok(states
            .into_iter()
            .map(|s| s.as_deref().and_then(MessageState::parse))
            .collect())
    }

    /// Outbox items due at `now_ms`.
    pub async fn outbox_due(
        &self,
        shard: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, ApiError> {
        let raw: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys::outbox(shard))
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(raw.iter().filter_map(|v| OutboxItem::decode(v)).collect())
    }
}
