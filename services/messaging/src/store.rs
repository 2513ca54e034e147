//! messaging's Redis keys and Lua scripts, in one place.
//!
//! A conversation's keys share the conversation's hash tag `{a~b}`; a member's
//! keys share the member's `{M}`. Each script touches one of those slots only
//! (atomic, and valid on Redis Cluster). Indexes that live in another slot
//! (inboxes, connection lists, the outbox) are written in an order that makes
//! a crash between the steps harmless, and are repaired by retries.
//!
//! Keys (prefix `messaging:`):
//! - `messaging:{a~b}:conv` hash — the pair: `a`, `b`; `conn`, `conn_at`;
//!   `blk_a` / `blk_b` (when a blocked b / b blocked a); `w_a`, `w_b`
//!   (messages delivered from each); `open` (someone responded to an InMail);
//!   `seq`, `count`, `last`, `last_msg`; the conversation's InMail `im_id`,
//!   `im_from`, `im_at` (sent), `im_state` (staged, awaiting, replied,
//!   accepted, declined), `im_resp_at`, `im_refund` ("", due, refunded, closed).
//! - `messaging:{a~b}:msg:<id>` hash — one message: `from`, `to`, `kind`,
//!   `subject`, `body`, `credits`, `at`, `state` (staged, delivered, failed),
//!   `seq`, `reason` (why it failed), `bal_after`.
//! - `messaging:{a~b}:timeline` sorted set — delivered message ids by `seq`.
//! - `messaging:{M}:prefs` hash — `inmail` ("0" when InMail is turned off).
//! - `messaging:{M}:connections`, `messaging:{M}:blocked`, `messaging:{M}:inbox`
//!   sorted sets — other member (or conversation) by time, for listing.
//! - `messaging:{M}:request:<request_id>` hash — request records.
//! - `messaging:{M}:ratelimit` hash — the InMail token bucket.
//! - `messaging:{M}:openprofile:<YYYYMM>` string — Open Profile messages sent
//!   this calendar month.
//! - `messaging:outbox:{o<N>}` sorted sets (16 shards) — sends and refunds to
//!   finish if their process died, by when to look at them.

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::storage::{Batch, Redis, args};
use redis::Script;

pub const OUTBOX_SHARDS: u32 = 16;

/// Claims a send's request id and spends the sender's allowance for its kind.
/// KEYS[1] request record, KEYS[2] token bucket, KEYS[3] Open Profile month
/// counter. ARGV[1] fingerprint, ARGV[2] message id, ARGV[3] conversation,
/// ARGV[4] kind, ARGV[5] now ms, ARGV[6] burst, ARGV[7] tokens per ms,
/// ARGV[8] Open Profile monthly limit, ARGV[9] counter ttl ms, ARGV[10]
/// request retention ms.
/// Checks before any write: request id reuse; for an INMAIL a token (else
/// {"rate_limited", ms until one}); for OPEN_PROFILE the monthly limit.
/// Returns {"new"} | {"exists", msg, conv} | {"mismatch"} | {"rate_limited", ms}
/// | {"open_profile_limited"}.
const BEGIN_SEND: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'fp', 'msg', 'conv')
if rec[1] then
  if rec[1] ~= ARGV[1] then return {'mismatch'} end
  return {'exists', rec[2], rec[3]}
end
local now = tonumber(ARGV[5])
if ARGV[4] == 'INMAIL' then
  local burst, rate = tonumber(ARGV[6]), tonumber(ARGV[7])
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens, ts = tonumber(b[1] or burst), tonumber(b[2] or now)
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate) end
  if tokens < 1 then return {'rate_limited', tostring(math.ceil((1 - tokens) / rate))} end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', math.max(now, ts))
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate) + 60000)
elseif ARGV[4] == 'OPEN_PROFILE' then
  if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[8]) then
    return {'open_profile_limited'}
  end
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[9])
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'msg', ARGV[2], 'conv', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[10])
return {'new'}
"#;

/// Reserves the conversation's InMail slot and stores the InMail, not yet
/// visible. KEYS[1] conversation, KEYS[2] message. ARGV[1] a, ARGV[2] b,
/// ARGV[3] message id, ARGV[4] sender, ARGV[5] recipient, ARGV[6] subject,
/// ARGV[7] body, ARGV[8] now ms, ARGV[9] the request's fingerprint.
/// Checks before any write: the message is new (else {"exists", state,
/// fingerprint of the request that staged it}); no
/// block; the pair is still strangers with no pending InMail (else
/// AWAITING_RESPONSE for the sender's own, or {"retry"} when the kind would
/// now differ).
const STAGE_INMAIL: &str = r#"
local C, M = KEYS[1], KEYS[2]
local mine = redis.call('HMGET', M, 'state', 'fp')
if mine[1] then return {'exists', mine[1], mine[2] or ''} end
local f = redis.call('HMGET', C, 'blk_a', 'blk_b', 'conn', 'im_state', 'im_from', 'w_a', 'w_b', 'open', 'a')
if f[1] or f[2] then return {'refused', 'BLOCKED'} end
if f[3] == '1' or f[8] == '1' then return {'retry'} end
if f[4] == 'staged' or f[4] == 'awaiting' then
  if f[5] == ARGV[4] then return {'refused', 'AWAITING_RESPONSE'} end
  return {'retry'}
end
local recipient_side = (ARGV[5] == ARGV[1]) and 6 or 7
if tonumber(f[recipient_side] or '0') > 0 then return {'retry'} end
if not f[9] then redis.call('HSET', C, 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[8]) end
redis.call('HSET', M, 'from', ARGV[4], 'to', ARGV[5], 'kind', 'INMAIL', 'subject', ARGV[6],
  'body', ARGV[7], 'credits', 1, 'at', ARGV[8], 'state', 'staged', 'fp', ARGV[9])
redis.call('HSET', C, 'im_id', ARGV[3], 'im_from', ARGV[4], 'im_at', ARGV[8], 'im_state', 'staged',
  'im_refund', '')
redis.call('HDEL', C, 'im_resp_at')
return {'ok'}
"#;

/// Delivers a message: a staged InMail once its debit is confirmed, or a new
/// free message. KEYS[1] conversation, KEYS[2] message, KEYS[3] timeline.
/// ARGV[1] mode ("staged" | "new"), ARGV[2] message id, ARGV[3] sender,
/// ARGV[4] recipient, ARGV[5] kind, ARGV[6] subject, ARGV[7] body, ARGV[8]
/// credits, ARGV[9] now ms, ARGV[10] a, ARGV[11] b, ARGV[12] refund window
/// ms, ARGV[13] the sender's balance after (or ""), ARGV[14] the request's
/// fingerprint (new messages).
/// Checks before any write: a staged message is still staged / a new one does
/// not exist yet (else {"state", state}); for a new one, no block and the
/// kind's condition still holds (else {"refused", reason} or {"retry"}).
/// When the sender is answering the recipient's InMail, the InMail is marked
/// replied, and its refund "due" within the window ("closed" after).
/// Returns {"ok", seq, sent_at, refund, inmail id, inmail sender}.
const DELIVER: &str = r#"
local C, M, T = KEYS[1], KEYS[2], KEYS[3]
local mode, id, sender, recipient, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = tonumber(ARGV[9])
local st, fp = unpack(redis.call('HMGET', M, 'state', 'fp'))
local conv = {}
do
  local flat = redis.call('HGETALL', C)
  for i = 1, #flat, 2 do conv[flat[i]] = flat[i + 1] end
end
local function side(member) if member == ARGV[10] then return 'a' else return 'b' end end
local sent_at = now
if mode == 'staged' then
  if st ~= 'staged' then return {'state', st or '', fp or ''} end
  sent_at = tonumber(redis.call('HGET', M, 'at'))
else
  if st then return {'state', st, fp or ''} end
  if conv.blk_a or conv.blk_b then return {'refused', 'BLOCKED'} end
  local pending_own = (conv.im_state == 'staged' or conv.im_state == 'awaiting') and conv.im_from == sender
  if kind == 'CONNECTION' then
    if conv.conn ~= '1' then return {'retry'} end
  elseif kind == 'FOLLOW_UP' then
    if not pending_own then return {'retry'} end
  else
    if pending_own then return {'refused', 'AWAITING_RESPONSE'} end
    if kind == 'REPLY' then
      local answering = conv.im_state == 'awaiting' and conv.im_from == recipient
      if not (answering or conv.open == '1' or tonumber(conv['w_' .. side(recipient)] or '0') > 0) then
        return {'retry'}
      end
    end
  end
  if not conv.a then redis.call('HSET', C, 'a', ARGV[10], 'b', ARGV[11], 'created', now) end
  redis.call('HSET', M, 'from', sender, 'to', recipient, 'kind', kind, 'subject', ARGV[6],
    'body', ARGV[7], 'credits', ARGV[8], 'at', now, 'fp', ARGV[14])
end
local seq = redis.call('HINCRBY', C, 'seq', 1)
redis.call('HSET', M, 'state', 'delivered', 'seq', seq, 'bal_after', ARGV[13])
redis.call('ZADD', T, seq, id)
redis.call('HINCRBY', C, 'count', 1)
redis.call('HINCRBY', C, 'w_' .. side(sender), 1)
redis.call('HSET', C, 'last', now, 'last_msg', id)
local refund = ''
if mode == 'staged' then
  redis.call('HSET', C, 'im_state', 'awaiting')
elseif conv.im_state == 'awaiting' and conv.im_from == recipient then
  refund = (now <= tonumber(conv.im_at) + tonumber(ARGV[12])) and 'due' or 'closed'
  redis.call('HSET', C, 'im_state', 'replied', 'im_resp_at', now, 'open', 1, 'im_refund', refund)
end
return {'ok', tostring(seq), tostring(sent_at), refund, conv.im_id or '', conv.im_from or ''}
"#;

/// Gives up a staged message (its debit was refused or released): it is
/// kept as failed, so a retry of its request answers the failure — or, with
/// reason "" (a send refused before any credit could move), forgotten, so a
/// retry sends it. KEYS[1] conversation, KEYS[2] message. ARGV[1] message
/// id, ARGV[2] reason, ARGV[3] how long the failed message is kept (ms),
/// ARGV[4] (forgetting) the fingerprint of the request that staged it.
/// Checks before any write: the message is still staged (else {"state", s}),
/// and a forgotten one was staged by that request.
/// Frees the conversation's InMail slot when this was its InMail.
const FAIL_STAGED: &str = r#"
local C, M = KEYS[1], KEYS[2]
local st, fp = unpack(redis.call('HMGET', M, 'state', 'fp'))
if st ~= 'staged' then return {'state', st or '', fp or ''} end
if ARGV[2] == '' then
  if fp ~= ARGV[4] then return {'state', st, fp or ''} end
  redis.call('DEL', M)
else
  redis.call('HSET', M, 'state', 'failed', 'reason', ARGV[2])
  redis.call('PEXPIRE', M, ARGV[3])
end
local im = redis.call('HMGET', C, 'im_id', 'im_state')
if im[1] == ARGV[1] and im[2] == 'staged' then
  redis.call('HDEL', C, 'im_id', 'im_from', 'im_at', 'im_state', 'im_refund', 'im_resp_at')
end
return {'ok'}
"#;

/// Accept or decline an InMail. KEYS[1] conversation. ARGV[1] responder,
/// ARGV[2] "accepted" | "declined", ARGV[3] now ms, ARGV[4] refund window ms.
/// Checks before any write: the responder is in the conversation (else
/// {"not_found"}) and an InMail from the other member awaits a response.
/// Returns {"ok", refund, inmail id, inmail sender}.
const RESPOND: &str = r#"
local C = KEYS[1]
local f = redis.call('HMGET', C, 'a', 'b', 'im_state', 'im_from', 'im_at', 'im_id')
if ARGV[1] ~= f[1] and ARGV[1] ~= f[2] then return {'not_found'} end
if f[3] ~= 'awaiting' or f[4] == ARGV[1] then return {'refused', 'NO_INMAIL_AWAITING_RESPONSE'} end
local now = tonumber(ARGV[3])
local refund = (now <= tonumber(f[5]) + tonumber(ARGV[4])) and 'due' or 'closed'
redis.call('HSET', C, 'im_state', ARGV[2], 'im_resp_at', now, 'open', 1, 'im_refund', refund, 'last', now)
return {'ok', refund, f[6], f[4]}
"#;

/// Records what became of an InMail's refund. KEYS[1] conversation. ARGV[1]
/// InMail id, ARGV[2] "refunded" | "closed". Checks: the refund is still due.
const SETTLE_REFUND: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'im_id', 'im_refund')
if f[1] == ARGV[1] and f[2] == 'due' then
  redis.call('HSET', KEYS[1], 'im_refund', ARGV[2])
  return 1
end
return 0
"#;

/// Connects a pair. KEYS[1] conversation. ARGV[1] a, ARGV[2] b, ARGV[3] now.
/// Checks before any write: no block. Answers when they connected.
const CONNECT: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'blk_a', 'blk_b', 'conn', 'conn_at', 'a')
if f[1] or f[2] then return {'refused', 'BLOCKED'} end
if f[3] == '1' then return {'ok', f[4]} end
if not f[5] then redis.call('HSET', KEYS[1], 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[3]) end
redis.call('HSET', KEYS[1], 'conn', 1, 'conn_at', ARGV[3])
return {'ok', ARGV[3]}
"#;

/// Disconnects a pair. KEYS[1] conversation. Answers 1 when they were connected.
const DISCONNECT: &str = r#"
if redis.call('HGET', KEYS[1], 'conn') == '1' then
  redis.call('HSET', KEYS[1], 'conn', 0)
  redis.call('HDEL', KEYS[1], 'conn_at')
  return 1
end
return 0
"#;

/// One member blocks the other (and so disconnects them). KEYS[1]
/// conversation. ARGV[1] a, ARGV[2] b, ARGV[3] side of the blocker ("a"|"b"),
/// ARGV[4] now. Answers when the block started.
const BLOCK: &str = r#"
if not redis.call('HGET', KEYS[1], 'a') then
  redis.call('HSET', KEYS[1], 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[4])
end
redis.call('HSETNX', KEYS[1], 'blk_' .. ARGV[3], ARGV[4])
redis.call('HSET', KEYS[1], 'conn', 0)
redis.call('HDEL', KEYS[1], 'conn_at')
return redis.call('HGET', KEYS[1], 'blk_' .. ARGV[3])
"#;

pub fn conv_key(conv: &str) -> String {
    format!("messaging:{{{conv}}}:conv")
}

pub fn msg_key(conv: &str, message_id: &str) -> String {
    format!("messaging:{{{conv}}}:msg:{message_id}")
}

fn timeline_key(conv: &str) -> String {
    format!("messaging:{{{conv}}}:timeline")
}

fn prefs_key(member: &str) -> String {
    format!("messaging:{{{member}}}:prefs")
}

pub fn connections_key(member: &str) -> String {
    format!("messaging:{{{member}}}:connections")
}

pub fn blocked_key(member: &str) -> String {
    format!("messaging:{{{member}}}:blocked")
}

pub fn inbox_key(member: &str) -> String {
    format!("messaging:{{{member}}}:inbox")
}

pub fn request_key(member: &str, request_id: &str) -> String {
    format!("messaging:{{{member}}}:request:{request_id}")
}

fn ratelimit_key(member: &str) -> String {
    format!("messaging:{{{member}}}:ratelimit")
}

fn open_profile_key(member: &str, month: &str) -> String {
    format!("messaging:{{{member}}}:openprofile:{month}")
}

fn outbox_key(shard: u32) -> String {
    format!("messaging:outbox:{{o{shard}}}")
}

/// The outbox shard of a conversation (FNV-1a).
pub fn outbox_shard(conv: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in conv.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % OUTBOX_SHARDS
}

/// Work the sweeper finishes if the process handling it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxItem {
    /// A staged InMail: deliver it or give it up, by its debit's state.
    Send {
        conv: String,
        message_id: String,
        sender: String,
    },
    /// An InMail's refund that is due.
    Refund {
        conv: String,
        inmail_id: String,
        sender: String,
    },
}

impl OutboxItem {
    fn encode(&self) -> String {
        match self {
            Self::Send {
                conv,
                message_id,
                sender,
            } => format!("send|{conv}|{message_id}|{sender}"),
            Self::Refund {
                conv,
                inmail_id,
                sender,
            } => format!("refund|{conv}|{inmail_id}|{sender}"),
        }
    }

    fn decode(value: &str) -> Option<Self> {
        let mut parts = value.split('|');
        let (kind, conv, id, sender) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let (conv, id, sender) = (conv.to_string(), id.to_string(), sender.to_string());
        match kind {
            "send" => Some(Self::Send {
                conv,
                message_id: id,
                sender,
            }),
            "refund" => Some(Self::Refund {
                conv,
                inmail_id: id,
                sender,
            }),
            _ => None,
        }
    }

    fn conv(&self) -> &str {
        match self {
            Self::Send { conv, .. } | Self::Refund { conv, .. } => conv,
        }
    }
}

/// What the begin-send script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    New,
    Exists { message_id: String, conv: String },
    Mismatch,
    RateLimited { retry_after_ms: u64 },
    OpenProfileLimited,
}

/// What a pair script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairReply {
    Ok(Vec<String>),
    /// The message already exists, in this state, staged or sent by the
    /// request with this fingerprint.
    State {
        state: String,
        fingerprint: String,
    },
    Refused(String),
    /// The pair changed since the kind was decided; decide again.
    Retry,
    NotFound,
}

fn parse_begun(reply: Vec<String>) -> Result<Begun, ApiError> {
    Ok(match reply.first().map(String::as_str) {
        Some("new") => Begun::New,
        Some("exists") => Begun::Exists {
            message_id: reply.get(1).cloned().unwrap_or_default(),
            conv: reply.get(2).cloned().unwrap_or_default(),
        },
        Some("mismatch") => Begun::Mismatch,
        Some("rate_limited") => Begun::RateLimited {
            retry_after_ms: reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(1000),
        },
        Some("open_profile_limited") => Begun::OpenProfileLimited,
        _ => {
            return Err(ApiError::internal(
                "unexpected reply from the begin-send script",
            ));
        }
    })
}

fn pair_reply(mut reply: Vec<String>) -> Result<PairReply, ApiError> {
    if reply.is_empty() {
        return Err(ApiError::internal("empty reply from a pair script"));
    }
    let status = reply.remove(0);
    Ok(match status.as_str() {
        "ok" => PairReply::Ok(reply),
        "exists" | "state" => {
            let mut fields = reply.into_iter();
            PairReply::State {
                state: fields.next().unwrap_or_default(),
                fingerprint: fields.next().unwrap_or_default(),
            }
        }
        "refused" => PairReply::Refused(reply.into_iter().next().unwrap_or_default()),
        "retry" => PairReply::Retry,
        "not_found" => PairReply::NotFound,
        other => {
            return Err(ApiError::internal(format!(
                "unexpected pair script status {other:?}"
            )));
        }
    })
}

/// The claim of a send's request id (BEGIN_SEND).
#[derive(Debug, Clone)]
pub struct Begin<'a> {
    pub sender: &'a str,
    pub request_id: &'a str,
    pub fingerprint: &'a str,
    pub message_id: &'a str,
    pub conv: &'a str,
    pub kind: &'a str,
    pub now_ms: i64,
    /// The calendar month (YYYYMM) of `now_ms`.
    pub month: &'a str,
}

/// An InMail to stage (STAGE_INMAIL).
#[derive(Debug, Clone)]
pub struct Stage<'a> {
    pub conv: &'a str,
    pub a: &'a str,
    pub b: &'a str,
    pub message_id: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub now_ms: i64,
    /// When the outbox sweeper should look at the send if it did not finish.
    pub look_again_at_ms: i64,
    /// The fingerprint of the request.
    pub fingerprint: &'a str,
}

/// A message to deliver.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    pub staged: bool,
    pub conv: &'a str,
    pub a: &'a str,
    pub b: &'a str,
    pub message_id: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub kind: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub credits: i32,
    pub now_ms: i64,
    pub refund_window_ms: i64,
    pub balance_after: Option<i64>,
    /// The fingerprint of the request (kept with a new message).
    pub fingerprint: &'a str,
}

/// A stored message.
#[derive(Debug, Clone, Default)]
pub struct StoredMessage {
    pub id: String,
    pub from: String,
    pub to: String,
    pub kind: String,
    pub subject: String,
    pub body: String,
    pub credits: i32,
    pub at_ms: i64,
    pub state: String,
    pub reason: String,
    pub balance_after: Option<i64>,
    /// Fingerprint of the request that sent it.
    pub fingerprint: String,
}

impl StoredMessage {
    fn from_fields(id: &str, fields: HashMap<String, String>) -> Option<Self> {
        if fields.is_empty() {
            return None;
        }
        let get = |name: &str| fields.get(name).cloned().unwrap_or_default();
        Some(Self {
            id: id.to_string(),
            from: get("from"),
            to: get("to"),
            kind: get("kind"),
            subject: get("subject"),
            body: get("body"),
            credits: get("credits").parse().unwrap_or(0),
            at_ms: get("at").parse().unwrap_or(0),
            state: get("state"),
            reason: get("reason"),
            balance_after: fields.get("bal_after").and_then(|v| v.parse().ok()),
            fingerprint: get("fp"),
        })
    }
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
            begin_send: Script::new(BEGIN_SEND),
            stage_inmail: Script::new(STAGE_INMAIL),
            deliver: Script::new(DELIVER),
            fail_staged: Script::new(FAIL_STAGED),
            respond: Script::new(RESPOND),
            settle_refund: Script::new(SETTLE_REFUND),
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            block: Script::new(BLOCK),
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
    ) -> Result<(HashMap<String, String>, HashMap<String, String>, bool), ApiError> {
        let mut batch = Batch::new();
        batch
            .add(
                redis::cmd("HGETALL")
                    .arg(request_key(sender, request_id))
                    .clone(),
            )
            .add(redis::cmd("HGETALL").arg(conv_key(conv)).clone())
            .add(
                redis::cmd("HGET")
                    .arg(prefs_key(recipient))
                    .arg("inmail")
                    .clone(),
            );
        let (record, pair, accepts): (
            HashMap<String, String>,
            HashMap<String, String>,
            Option<String>,
        ) = self.redis.run(&batch).await?;
        Ok((record, pair, accepts.as_deref() != Some("0")))
    }

    fn push_begin<'s>(
        batch: &mut Batch<'s>,
        script: &'s Script,
        begin: &Begin<'_>,
        limits: &SendLimits,
    ) {
        let keys = [
            request_key(begin.sender, begin.request_id),
            ratelimit_key(begin.sender),
            open_profile_key(begin.sender, begin.month),
        ];
        let mut a = args();
        a.arg(begin.fingerprint)
            .arg(begin.message_id)
            .arg(begin.conv)
            .arg(begin.kind)
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
        begin: &Begin<'_>,
        limits: &SendLimits,
    ) -> Result<Begun, ApiError> {
        let mut batch = Batch::new();
        Self::push_begin(&mut batch, &self.begin_send, begin, limits);
        let (reply,): (Vec<String>,) = self.redis.run(&batch).await?;
        parse_begun(reply)
    }

    /// An InMail's first step, in one round trip: claim the request and
    /// spend a token (BEGIN_SEND), index the send in the outbox, and stage the
    /// message (STAGE_INMAIL). The stage runs whatever BEGIN_SEND answers; the
    /// caller gives the staged message up when BEGIN_SEND refused. No credit
    /// has moved at this point either way.
    pub async fn begin_and_stage(
        &self,
        begin: &Begin<'_>,
        limits: &SendLimits,
        stage: &Stage<'_>,
    ) -> Result<(Begun, PairReply), ApiError> {
        let mut batch = Batch::new();
        Self::push_begin(&mut batch, &self.begin_send, begin, limits);
        let item = OutboxItem::Send {
            conv: stage.conv.to_string(),
            message_id: stage.message_id.to_string(),
            sender: stage.sender.to_string(),
        };
        batch.add_ignored(
            redis::cmd("ZADD")
                .arg(outbox_key(outbox_shard(stage.conv)))
                .arg(stage.look_again_at_ms)
                .arg(item.encode())
                .clone(),
        );
        let mut a = args();
        a.arg(stage.a)
            .arg(stage.b)
            .arg(stage.message_id)
            .arg(stage.sender)
            .arg(stage.recipient)
            .arg(stage.subject)
            .arg(stage.body)
            .arg(stage.now_ms)
            .arg(stage.fingerprint);
        batch.script(
            &self.stage_inmail,
            &[conv_key(stage.conv), msg_key(stage.conv, stage.message_id)],
            a,
        );
        let (begun, staged): (Vec<String>, Vec<String>) = self.redis.run(&batch).await?;
        Ok((parse_begun(begun)?, pair_reply(staged)?))
    }

    /// Delivers a message, writing both inboxes first in the same round trip
    /// (so a crash cannot leave the conversation out of an inbox; an inbox
    /// entry without a delivered message is not listed). Inbox scores only
    /// move forward (GT), so a retry never pushes a conversation down.
    pub async fn deliver(&self, d: &Delivery<'_>) -> Result<PairReply, ApiError> {
        let mut batch = Batch::new();
        for member in [d.a, d.b] {
            batch.add_ignored(
                redis::cmd("ZADD")
                    .arg(inbox_key(member))
                    .arg("GT")
                    .arg(d.now_ms)
                    .arg(d.conv)
                    .clone(),
            );
        }
        let mut a = args();
        a.arg(if d.staged { "staged" } else { "new" })
            .arg(d.message_id)
            .arg(d.sender)
            .arg(d.recipient)
            .arg(d.kind)
            .arg(d.subject)
            .arg(d.body)
            .arg(d.credits)
            .arg(d.now_ms)
            .arg(d.a)
            .arg(d.b)
            .arg(d.refund_window_ms)
            .arg(d.balance_after.map(|b| b.to_string()).unwrap_or_default())
            .arg(d.fingerprint);
        batch.script(
            &self.deliver,
            &[
                conv_key(d.conv),
                msg_key(d.conv, d.message_id),
                timeline_key(d.conv),
            ],
            a,
        );
        let (reply,): (Vec<String>,) = self.redis.run(&batch).await?;
        pair_reply(reply)
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
                    .arg(inbox_key(member))
                    .arg("GT")
                    .arg(at_ms)
                    .arg(conv)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    pub async fn fail_staged(
        &self,
        conv: &str,
        message_id: &str,
        reason: &str,
        keep_ms: i64,
    ) -> Result<PairReply, ApiError> {
        let reply: Vec<String> = self
            .fail_staged
            .key(conv_key(conv))
            .key(msg_key(conv, message_id))
            .arg(message_id)
            .arg(reason)
            .arg(keep_ms)
            .arg("")
            .invoke_async(&mut self.redis.conn())
            .await?;
        pair_reply(reply)
    }

    /// Undoes a stage that must not count (see FAIL_STAGED): only the one
    /// the request with `fingerprint` made.
    pub async fn forget_staged(
        &self,
        conv: &str,
        message_id: &str,
        fingerprint: &str,
    ) -> Result<(), ApiError> {
        let _: Vec<String> = self
            .fail_staged
            .key(conv_key(conv))
            .key(msg_key(conv, message_id))
            .arg(message_id)
            .arg("")
            .arg(0)
            .arg(fingerprint)
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Records that a claimed send was refused, so a retry of its request
    /// answers the same refusal.
    pub async fn record_refusal(
        &self,
        sender: &str,
        request_id: &str,
        reason: &str,
    ) -> Result<(), ApiError> {
        let _: i64 = redis::cmd("HSET")
            .arg(request_key(sender, request_id))
            .arg("refused")
            .arg(reason)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn respond(
        &self,
        conv: &str,
        responder: &str,
        response: &str,
        now_ms: i64,
        refund_window_ms: i64,
    ) -> Result<PairReply, ApiError> {
        let reply: Vec<String> = self
            .respond
            .key(conv_key(conv))
            .arg(responder)
            .arg(response)
            .arg(now_ms)
            .arg(refund_window_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        pair_reply(reply)
    }

    pub async fn settle_refund(
        &self,
        conv: &str,
        inmail_id: &str,
        outcome: &str,
    ) -> Result<(), ApiError> {
        let _: i64 = self
            .settle_refund
            .key(conv_key(conv))
            .arg(inmail_id)
            .arg(outcome)
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn connect(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<PairReply, ApiError> {
        let reply: Vec<String> = self
            .connect
            .key(conv_key(conv))
            .arg(a)
            .arg(b)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        pair_reply(reply)
    }

    pub async fn index_connection(
        &self,
        one: &str,
        other: &str,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        batch
            .add_ignored(
                redis::cmd("ZADD")
                    .arg(connections_key(one))
                    .arg(at_ms)
                    .arg(other)
                    .clone(),
            )
            .add_ignored(
                redis::cmd("ZADD")
                    .arg(connections_key(other))
                    .arg(at_ms)
                    .arg(one)
                    .clone(),
            );
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// Disconnects the pair; answers whether they were connected.
    pub async fn disconnect(&self, conv: &str, one: &str, other: &str) -> Result<bool, ApiError> {
        let was: i64 = self
            .disconnect
            .key(conv_key(conv))
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(one, other).await?;
        Ok(was == 1)
    }

    async fn unindex_connection(&self, one: &str, other: &str) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        batch
            .add_ignored(
                redis::cmd("ZREM")
                    .arg(connections_key(one))
                    .arg(other)
                    .clone(),
            )
            .add_ignored(
                redis::cmd("ZREM")
                    .arg(connections_key(other))
                    .arg(one)
                    .clone(),
            );
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
        let since: String = self
            .block
            .key(conv_key(conv))
            .arg(a)
            .arg(b)
            .arg(side)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        let since: i64 = since.parse().unwrap_or(now_ms);
        self.unindex_connection(blocker, blocked).await?;
        let _: () = redis::cmd("ZADD")
            .arg(blocked_key(blocker))
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
            .add(redis::cmd("HDEL").arg(conv_key(conv)).arg(field).clone())
            .add_ignored(
                redis::cmd("ZREM")
                    .arg(blocked_key(blocker))
                    .arg(blocked)
                    .clone(),
            );
        let (removed,): (i64,) = self.redis.run(&batch).await?;
        Ok(removed == 1)
    }

    pub async fn set_accepts_inmail(&self, member: &str, accepts: bool) -> Result<(), ApiError> {
        let _: () = redis::cmd("HSET")
            .arg(prefs_key(member))
            .arg("inmail")
            .arg(if accepts { "1" } else { "0" })
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn accepts_inmail(&self, member: &str) -> Result<bool, ApiError> {
        let value: Option<String> = redis::cmd("HGET")
            .arg(prefs_key(member))
            .arg("inmail")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(value.as_deref() != Some("0"))
    }

    pub async fn conversation(&self, conv: &str) -> Result<HashMap<String, String>, ApiError> {
        Ok(redis::cmd("HGETALL")
            .arg(conv_key(conv))
            .query_async(&mut self.redis.conn())
            .await?)
    }

    pub async fn message(
        &self,
        conv: &str,
        message_id: &str,
    ) -> Result<Option<StoredMessage>, ApiError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(msg_key(conv, message_id))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(StoredMessage::from_fields(message_id, fields))
    }

    /// Conversations with their last messages, in two round trips.
    pub async fn conversations_with_last(
        &self,
        convs: &[String],
    ) -> Result<Vec<(HashMap<String, String>, Option<StoredMessage>)>, ApiError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(redis::cmd("HGETALL").arg(conv_key(conv)).clone());
        }
        let pairs: Vec<HashMap<String, String>> = self.redis.run(&batch).await?;
        let mut batch = Batch::new();
        for (conv, pair) in convs.iter().zip(&pairs) {
            let last = pair.get("last_msg").map(String::as_str).unwrap_or("-");
            batch.add(redis::cmd("HGETALL").arg(msg_key(conv, last)).clone());
        }
        let lasts: Vec<HashMap<String, String>> = self.redis.run(&batch).await?;
        Ok(pairs
            .into_iter()
            .zip(convs.iter().zip(lasts))
            .map(|(pair, (_, last))| {
                let id = pair.get("last_msg").cloned().unwrap_or_default();
                (pair, StoredMessage::from_fields(&id, last))
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
            .arg(timeline_key(conv))
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
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.hgetall(msg_key(conv, id));
        }
        let bodies: Vec<HashMap<String, String>> = pipe.query_async(&mut self.redis.conn()).await?;
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
            .arg(outbox_key(outbox_shard(item.conv())))
            .arg(at_ms)
            .arg(item.encode())
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn outbox_remove(&self, item: &OutboxItem) -> Result<(), ApiError> {
        let _: () = redis::cmd("ZREM")
            .arg(outbox_key(outbox_shard(item.conv())))
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
        cmd.arg(outbox_key(shard));
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
    ) -> Result<Vec<Option<String>>, ApiError> {
        let mut batch = Batch::new();
        for item in items {
            let cmd = match item {
                OutboxItem::Send {
                    conv, message_id, ..
                } => redis::cmd("HGET")
                    .arg(msg_key(conv, message_id))
                    .arg("state")
                    .clone(),
                OutboxItem::Refund { conv, .. } => {
                    redis::cmd("HGET").arg(conv_key(conv)).arg("-").clone()
                }
            };
            batch.add(cmd);
        }
        self.redis.run(&batch).await
    }

    /// Outbox items due at `now_ms`.
    pub async fn outbox_due(
        &self,
        shard: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, ApiError> {
        let raw: Vec<String> = redis::cmd("ZRANGE")
            .arg(outbox_key(shard))
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

/// The sender allowances BEGIN_SEND enforces.
#[derive(Debug, Clone)]
pub struct SendLimits {
    pub burst: u32,
    pub tokens_per_ms: f64,
    pub open_profile_monthly: u32,
    pub open_profile_counter_ttl_ms: i64,
    pub request_retention_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_items_round_trip() {
        for item in [
            OutboxItem::Send {
                conv: "a~b".into(),
                message_id: "m-1".into(),
                sender: "a".into(),
            },
            OutboxItem::Refund {
                conv: "a~b".into(),
                inmail_id: "m-2".into(),
                sender: "b".into(),
            },
        ] {
            assert_eq!(OutboxItem::decode(&item.encode()), Some(item));
        }
        assert_eq!(OutboxItem::decode("bogus|x"), None);
    }

    #[test]
    fn conversation_keys_share_the_conversation_tag() {
        for key in [conv_key("a~b"), msg_key("a~b", "m"), timeline_key("a~b")] {
            assert!(key.contains("{a~b}"), "{key}");
        }
    }
}
