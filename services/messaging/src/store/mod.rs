//! messaging's Redis store: keys ([`keys`]), the Lua scripts (`lua/`, one
//! header each), script replies and stored hashes parsed into types
//! ([`reply`]), and the outbox ([`outbox`]).
//!
//! Each script touches one slot (a conversation's `{a~b}` or a member's
//! `{M}`): atomic, and valid on Redis Cluster. Indexes that live in another
//! slot (inboxes, connection lists, the outbox) are written in an order that
//! makes a crash between the steps harmless, and are repaired by retries.

mod archive;
pub mod keys;
mod lists;
pub mod outbox;
mod relations;
pub mod reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use inmail_shared::ApiError;
use inmail_shared::state::idempotency::Quota;
use inmail_shared::state::published::{self, OpenProfile};
use inmail_shared::state::storage::{Batch, Redis, args};
use redis::Script;

use crate::domain::{Kind, RefundState, SendFailure};

pub use self::archive::Oldest;
pub use self::keys::OUTBOX_SHARDS;
pub use self::lists::Tail;
pub use self::outbox::OutboxItem;
pub use self::relations::{InvitationAnswer, InvitationLimits, PendingInvitation};
use self::reply::parse;
pub use self::reply::{
    Answered, Begun, Connected, ConversationRecord, Delivered, Delivery, Existing, GivenUp,
    InvitationRefusal, Invited, MessageState, Recorded, Refusal, Reserved, Responded, Response,
    Staged, StoredMessage,
};

const BEGIN_SEND: &str = concat!(
    include_str!("../../../../shared/src/state/lua/bucket.lua"),
    include_str!("lua/begin_send.lua")
);
const STAGE_INMAIL: &str = include_str!("lua/stage_inmail.lua");
const DELIVER: &str = include_str!("lua/deliver.lua");
const FAIL_STAGED: &str = include_str!("lua/fail_staged.lua");
const RESPOND: &str = include_str!("lua/respond.lua");
const SETTLE_REFUND: &str = include_str!("lua/settle_refund.lua");
const CONNECT: &str = include_str!("lua/connect.lua");
const DISCONNECT: &str = include_str!("lua/disconnect.lua");
const BLOCK: &str = include_str!("lua/block.lua");
const INVITE: &str = include_str!("lua/invite.lua");
const ANSWER_INVITATION: &str = include_str!("lua/answer_invitation.lua");
const APPEND_EVENT: &str = include_str!("lua/append_event.lua");
const ARCHIVE_TRIM: &str = include_str!("lua/archive_trim.lua");
const RESERVE_INVITATION: &str = concat!(
    include_str!("../../../../shared/src/state/lua/bucket.lua"),
    include_str!("lua/reserve_invitation.lua")
);

/// Every script by name, as sent to Redis: what a profile labels a script
/// hash (EVALSHA) with (inmail-bench's per-script Redis time).
pub const SCRIPTS: [(&str, &str); 14] = [
    ("begin_send", BEGIN_SEND),
    ("stage_inmail", STAGE_INMAIL),
    ("deliver", DELIVER),
    ("fail_staged", FAIL_STAGED),
    ("respond", RESPOND),
    ("settle_refund", SETTLE_REFUND),
    ("connect", CONNECT),
    ("disconnect", DISCONNECT),
    ("block", BLOCK),
    ("invite", INVITE),
    ("answer_invitation", ANSWER_INVITATION),
    ("reserve_invitation", RESERVE_INVITATION),
    ("append_event", APPEND_EVENT),
    ("archive_trim", ARCHIVE_TRIM),
];

/// The sender allowances BEGIN_SEND enforces.
#[derive(Debug, Clone)]
pub struct SendLimits {
    pub burst: u32,
    pub tokens_per_ms: f64,
    /// The free-send bucket (every kind but INMAIL).
    pub free_burst: u32,
    pub free_tokens_per_ms: f64,
    pub open_profile_monthly: u32,
    pub open_profile_counter_ttl_ms: i64,
    pub request_retention_ms: i64,
    /// Every member's quota of changes (a send is one).
    pub quota: Quota,
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

    /// The outbox entry that owes this message's inbox events.
    pub fn events_item(&self) -> OutboxItem {
        OutboxItem::Events {
            conv: self.conv.to_string(),
            message_id: self.message_id.to_string(),
            sender: self.sender.to_string(),
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
    /// The recipient's one response to the sender's InMail (RespondToInmail
    /// REPLY): refused or answered by the recorded response unless the
    /// InMail awaits it.
    pub answering: bool,
    /// When the sweeper appends the message's inbox events if this call
    /// does not (its process died after delivering).
    pub events_due_ms: i64,
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
    invite: Script,
    answer_invitation: Script,
    reserve_invitation: Script,
    append_event: Script,
    archive_trim: Script,
    /// Whether subscription-plan has published every subscription (then
    /// never unset, so no longer read).
    all_published: Arc<AtomicBool>,
}

impl MessagingStore {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            begin_send: Script::new(BEGIN_SEND),
            stage_inmail: Script::new(STAGE_INMAIL),
            deliver: Script::new(DELIVER),
            fail_staged: Script::new(FAIL_STAGED),
            respond: Script::new(RESPOND),
            settle_refund: Script::new(SETTLE_REFUND),
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            block: Script::new(BLOCK),
            invite: Script::new(INVITE),
            answer_invitation: Script::new(ANSWER_INVITATION),
            reserve_invitation: Script::new(RESERVE_INVITATION),
            append_event: Script::new(APPEND_EVENT),
            archive_trim: Script::new(ARCHIVE_TRIM),
            all_published: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// What a send needs to decide its kind, in one round trip: the
    /// sender's request record, the pair, whether the recipient accepts
    /// InMail, and the recipient's Open Profile as subscription-plan
    /// publishes it (`None`: not published, or not for the current
    /// revision: ask subscription-plan).
    pub async fn read_for_send(
        &self,
        sender: &str,
        request_id: &str,
        conv: &str,
        recipient: &str,
    ) -> Result<(SendRecord, ConversationRecord, bool, Option<OpenProfile>), ApiError> {
        // Whether every subscription is published is read before the
        // published keys: once it is, a key missing at the later read was
        // never written (the backfill publishes, then sets it).
        let mut all_published = self.all_published.load(Ordering::Relaxed);
        let mut batch = Batch::new();
        if !all_published {
            batch.add(
                redis::cmd("EXISTS")
                    .arg(published::ALL_PUBLISHED_KEY)
                    .clone(),
            );
        }
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
            )
            .add(
                redis::cmd("MGET")
                    .arg(published::revision_key(recipient))
                    .arg(published::open_profile_key(recipient))
                    .clone(),
            );
        let mut replies: Vec<redis::Value> = self.redis.run(&batch).await?;
        let marker = if all_published || replies.is_empty() {
            false
        } else {
            redis::from_redis_value(replies.remove(0))
                .map_err(|e| ApiError::internal(format!("unreadable EXISTS reply: {e}")))?
        };
        type Read = (
            (Option<String>, Option<String>),
            HashMap<String, String>,
            Option<String>,
            (Option<String>, Option<String>),
        );
        let ((fingerprint, refused), pair, accepts, (revision, open)): Read =
            redis::from_redis_value(redis::Value::Array(replies))
                .map_err(|e| ApiError::internal(format!("unreadable send state: {e}")))?;
        if marker {
            all_published = true;
            self.all_published.store(true, Ordering::Relaxed);
        }
        Ok((
            SendRecord {
                fingerprint,
                refused: refused.as_deref().and_then(SendFailure::parse),
            },
            ConversationRecord::from_fields(&pair),
            accepts.as_deref() != Some("0"),
            OpenProfile::trusted(open.as_deref(), revision.as_deref(), all_published),
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
            keys::send_rate(envelope.sender),
            keys::quota(envelope.sender),
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
            .arg(limits.request_retention_ms)
            .arg(limits.free_burst)
            .arg(format!("{:.12e}", limits.free_tokens_per_ms))
            .arg(limits.quota.burst)
            .arg(limits.quota.rate_arg());
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
        self.redis
            .acknowledge(&[&keys::request(envelope.sender, request_id)])
            .await?;
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
        self.redis
            .acknowledge(&[
                &keys::request(envelope.sender, request_id),
                &keys::outbox(keys::outbox_shard_of(envelope.conv)),
                &keys::conv(envelope.conv),
            ])
            .await?;
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
        // Before the message: its events are owed until appended (see
        // OutboxItem::Events).
        let events_item = envelope.events_item();
        batch.add_ignored(
            redis::cmd("ZADD")
                .arg(keys::outbox(keys::outbox_shard_of(envelope.conv)))
                .arg(how.events_due_ms)
                .arg(events_item.encode())
                .clone(),
        );
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
            .arg(envelope.fingerprint)
            .arg(if how.answering { "1" } else { "0" });
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
        self.redis
            .acknowledge(&[&keys::conv(envelope.conv)])
            .await?;
        let delivery = parse("deliver", &reply)?;
        if !matches!(delivery, Delivery::Ok(_)) {
            // Nothing new was delivered by this call: no events owed.
            self.outbox_remove(&events_item).await?;
        }
        Ok(delivery)
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
        self.redis.acknowledge(&[&keys::conv(conv)]).await?;
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
        self.redis
            .acknowledge(&[&keys::request(sender, request_id)])
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
        self.redis.acknowledge(&[&keys::conv(conv)]).await?;
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
        self.redis.acknowledge(&[&keys::conv(conv)]).await?;
        Ok(settled == 1)
    }

    /// Appends `event` to each member's event stream, then announces the
    /// appends to the watchers' dispatcher (one round trip). `keep`: the
    /// most events kept per member; `retention_ms`: how long.
    /// `owed`: the outbox entry that owed the event, dropped once it is
    /// appended (same round trip).
    pub async fn append_event(
        &self,
        members: &[&str],
        event: &[u8],
        keep: usize,
        retention_ms: i64,
        owed: Option<&OutboxItem>,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for member in members {
            let mut a = args();
            a.arg(event).arg(keep).arg(retention_ms);
            batch.script(&self.append_event, &[keys::events(member)], a);
        }
        for member in members {
            batch.add_ignored(inmail_shared::state::events::notify_cmd(
                "messaging",
                &keys::events(member),
            ));
        }
        if let Some(item) = owed {
            batch.add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::outbox(keys::outbox_shard_of(item.conv())))
                    .arg(item.encode())
                    .clone(),
            );
        }
        let _: Vec<String> = self.redis.run(&batch).await?;
        Ok(())
    }
}
