//! billing-credits' Redis keys and Lua scripts, in one place.
//!
//! Every change of a member's balance is one script over keys that share the
//! member's hash tag `{M}` (one slot: atomic, and valid on Redis Cluster).
//!
//! Keys (prefix `billing:`):
//! - `billing:{M}:account` hash: `balance` (the counter), the current cycle
//!   (`ver` plan-period version, `idx` cycles renewed in it, `cstart`, `cend`)
//!   and its counters (`debited`, `refunded`, `released`, `granted`, reset at
//!   each renewal), the entitlement in force (`plan`, `monthly`, `cap`,
//!   `paid`) and until when it may be trusted without asking
//!   subscription-plan again (`valid`).
//! - `billing:{M}:ledger` stream: one entry per balance change, never edited.
//! - `billing:{M}:debit:<message_id>` hash: a message's debit (held,
//!   confirmed, released or refunded). Held debits never expire; the others
//!   expire after the refund window plus a margin (confirmed/refunded) or the
//!   tombstone retention (released).
//! - `billing:{M}:request:<request_id>` hash: `fp` and the first `outcome`.
//! - `billing:message:{<message_id>}` string: the member a message id was
//!   first debited to, so the same id for another member is refused.
//! - `billing:holds:{h<N>}` sorted sets (16 shards): held debits by expiry,
//!   for the sweeper. Written before the debit, so no hold can miss it.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::storage::{Batch, Redis};
use redis::Script;
use serde::Deserialize;

/// Shards of the hold-expiry index (spread over cluster nodes).
pub const HOLD_SHARDS: u32 = 16;

/// Request records, shared by every script that takes a request id.
///
/// The record is one string `<fingerprint>\n<outcome JSON>` under KEYS[3]
/// (`R`), written with the outcome and expiring after the retention.
/// `check_request()` answers a replay (the first outcome, marked `replayed`
/// so nothing is counted twice) or a mismatch before anything is touched.
macro_rules! request_helpers {
    () => {
        r#"
local renewed, written_off = 0, 0

local function check_request()
  if REQ == '' then return nil end
  local rec = redis.call('GET', R)
  if not rec then return nil end
  local sep = string.find(rec, '\n', 1, true)
  if string.sub(rec, 1, sep - 1) ~= FP then return cjson.encode({ s = 'mismatch' }) end
  local first = cjson.decode(string.sub(rec, sep + 1))
  first.replayed, first.renewed, first.written_off = true, 0, 0
  first.released, first.refunded, first.granted, first.debited = 0, 0, 0, 0
  return cjson.encode(first)
end

-- Finishes a call: records the outcome under the request id and answers it.
local function finish(reply)
  reply.renewed, reply.written_off = renewed, written_off
  local out = cjson.encode(reply)
  if REQ ~= '' then redis.call('SET', R, FP .. '\n' .. out, 'PX', RETAIN) end
  return out
end

local function refuse(reason, extra)
  local reply = extra or {}
  reply.s, reply.reason = 'refused', reason
  return finish(reply)
end

local function debit_view(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local d = {}
  for i = 1, #flat, 2 do d[flat[i]] = flat[i + 1] end
  return { state = d.state, amount = tonumber(d.amount), debited_at = tonumber(d.t_debit or '0'),
    expires_at = tonumber(d.t_expire or '0'), confirmed_at = tonumber(d.t_confirm or '0'),
    refundable_until = tonumber(d.refundable or '0'), returned_at = tonumber(d.t_return or '0'),
    reason = d.reason or '', balance_after = tonumber(d.bal_after or '0') }
end
"#
    };
}

/// Shared prelude of every balance script.
///
/// KEYS[1] account, KEYS[2] ledger, KEYS[3] request record.
/// ARGV[1] now ms, ARGV[2] entitlement JSON ("" = the cached one while it
/// may be trusted, "*" = the cached one however old),
/// ARGV[3] until when a fresh entitlement may be trusted (ms),
/// ARGV[4] request_id ("" for reads), ARGV[5] fingerprint, ARGV[6] request
/// retention ms; ARGV[7..] the script's own.
///
/// A replay or a request id reused with other arguments is answered first.
/// Then `settle()` brings the account to the current cycle: it replays the
/// plan periods subscription-plan reported since the version last applied —
/// renewal once per cycle (balance = min(unused + monthly, cap)), a write-off
/// of everything at each plan change — each as a ledger entry. The account
/// hash is written once, by `save()`, and only the fields that changed.
macro_rules! prelude {
    () => {
        concat!(
            r#"
local A, L, R = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local ENT, VALID, REQ, FP, RETAIN = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
"#,
            request_helpers!(),
            r#"
do
  local replay = check_request()
  if replay then return replay end
end

local acct, dirty = {}, {}
do
  local flat = redis.call('HGETALL', A)
  for i = 1, #flat, 2 do acct[flat[i]] = flat[i + 1] end
end
local exists = acct.ver ~= nil
local bal = tonumber(acct.balance or '0')
local bal_before = bal
local function num(field) return tonumber(acct[field] or '0') end
local function set(field, value) acct[field] = value; dirty[field] = true end

local function entry(kind, amount, msg, note)
  return redis.call('XADD', L, '*', 'k', kind, 'a', amount, 'b', bal, 't', now,
    'm', msg or '', 'r', REQ, 'p', acct.plan or '', 'v', acct.ver or '0',
    'c', acct.idx or '0', 'n', note or '')
end

local function reset_cycle_counters()
  for _, field in ipairs({ 'debited', 'refunded', 'released', 'granted' }) do
    if num(field) ~= 0 or not exists then set(field, 0) end
  end
end

local function renew_to(target, monthly, cap)
  local idx = num('idx')
  while idx < target do
    idx = idx + 1
    set('idx', idx)
    if monthly == 0 and bal == 0 then
      -- A free period at zero: nothing to renew in the remaining cycles.
      idx = target
      set('idx', target)
    else
      local new = math.min(bal + monthly, cap)
      local amount = new - bal
      bal = new
      if monthly > 0 or amount ~= 0 then
        entry('RENEWAL', amount, '', 'cycle ' .. idx)
        renewed = renewed + amount
      end
    end
    reset_cycle_counters()
  end
end

local function settle()
  -- '*': the cached entitlement, however old (releasing a hold must not
  -- wait for subscription-plan).
  if ENT == '*' then
    if not exists then return 'need' end
    return 'ok'
  end
  if ENT == '' then
    if not exists or now >= num('valid') then return 'need' end
    return 'ok'
  end
  local ent = cjson.decode(ENT)
  local periods = ent.periods
  local cur = periods[#periods]
  if exists then
    if cur.v < num('ver') or (cur.v == num('ver') and cur.n < num('idx')) then
      return 'stale'
    end
  else
    -- First touch: start from the current period with nothing (credits of
    -- earlier periods would have been written off at their end anyway).
    set('ver', cur.v)
    set('idx', 0)
    set('plan', cur.p)
    reset_cycle_counters()
  end
  for _, p in ipairs(periods) do
    if p.v > num('ver') then
      if bal ~= 0 then
        local amount = -bal
        bal = 0
        entry('WRITE_OFF', amount, '', 'plan period ' .. acct.ver .. ' (' .. (acct.plan or '') .. ') ended')
        written_off = written_off - amount
      end
      set('ver', p.v)
      set('idx', 0)
      set('plan', p.p)
    end
    if p.v == num('ver') then renew_to(p.n, p.m, p.c) end
  end
  for field, value in pairs({ plan = cur.p, monthly = cur.m, cap = cur.c, paid = cur.paid,
      cstart = cur.cs, cend = cur.ce, valid = VALID }) do
    if tostring(acct[field]) ~= tostring(value) then set(field, value) end
  end
  exists = true
  return 'ok'
end

local function save()
  if bal ~= bal_before then set('balance', bal) end
  local args = {}
  for field in pairs(dirty) do
    args[#args + 1] = field
    args[#args + 1] = acct[field]
  end
  if #args > 0 then redis.call('HSET', A, unpack(args)) end
end

local function bump(field, amount) set(field, num(field) + amount) end

local function balance_view()
  return { available = bal, plan = acct.plan, monthly = num('monthly'), cap = num('cap'),
    cstart = num('cstart'), cend = num('cend'), debited = num('debited'),
    refunded = num('refunded'), released = num('released'), granted = num('granted'),
    ver = num('ver') }
end

do
  local st = settle()
  if st ~= 'ok' then return cjson.encode({ s = st, ver = num('ver') }) end
end
"#
        )
    };
}

/// GetBalance: settles (renewing when a new cycle began) and answers the balance.
const BALANCE: &str = concat!(
    prelude!(),
    r#"
save()
return finish({ s = 'ok', balance = balance_view() })
"#
);

/// DebitForMessage. KEYS[4] debit record. ARGV[7] message_id, ARGV[8] amount,
/// ARGV[9] hold ms.
/// Checks before the first write of the debit: an existing debit of this id
/// (same amount: answer it; other amount: MESSAGE_ID_CONFLICT; released:
/// DEBIT_RELEASED), a paid plan, enough credits. Writes: balance and cycle
/// counter, the HELD debit record (no expiry), a DEBIT ledger entry.
const DEBIT: &str = concat!(
    prelude!(),
    r#"
local D, MSG, AMOUNT, HOLD = KEYS[4], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local existing = debit_view(D)
if existing then
  save()
  if existing.state == 'released' then return refuse('DEBIT_RELEASED') end
  if existing.amount ~= AMOUNT then return refuse('MESSAGE_ID_CONFLICT') end
  return finish({ s = 'ok', debit = existing, balance_after = existing.balance_after })
end
if num('paid') ~= 1 then save() return refuse('PAID_PLAN_REQUIRED', { balance = { available = bal } }) end
if bal < AMOUNT then save() return refuse('INSUFFICIENT_CREDITS', { balance = { available = bal } }) end
bal = bal - AMOUNT
bump('debited', AMOUNT)
redis.call('HSET', D, 'state', 'held', 'amount', AMOUNT, 't_debit', now, 't_expire', now + HOLD,
  'bal_after', bal, 'req', REQ)
entry('DEBIT', -AMOUNT, MSG, '')
save()
return finish({ s = 'ok', balance_after = bal, debited = AMOUNT,
  debit = { state = 'held', amount = AMOUNT, debited_at = now, expires_at = now + HOLD,
    confirmed_at = 0, refundable_until = 0, returned_at = 0, reason = '', balance_after = bal } })
"#
);

/// ConfirmDebit: touches only the debit record, never the balance.
/// KEYS[1] debit record, KEYS[3] request record (KEYS[2] unused). ARGV[1] now
/// ms, ARGV[4] request_id, ARGV[5] fingerprint, ARGV[6] request retention ms,
/// ARGV[7] refund window ms, ARGV[8] confirmed-record retention ms.
/// Checks: the debit exists (DEBIT_NOT_FOUND), is not released
/// (DEBIT_RELEASED), and its hold has not run out ({"expired"}, not recorded:
/// the caller releases it). Confirming twice answers the same.
const CONFIRM: &str = concat!(
    r#"
local D, R = KEYS[1], KEYS[3]
local now = tonumber(ARGV[1])
local REQ, FP, RETAIN = ARGV[4], ARGV[5], ARGV[6]
local WINDOW, KEEP = tonumber(ARGV[7]), tonumber(ARGV[8])
"#,
    request_helpers!(),
    r#"
do
  local replay = check_request()
  if replay then return replay end
end
local d = debit_view(D)
if not d then return refuse('DEBIT_NOT_FOUND') end
if d.state == 'released' then return refuse('DEBIT_RELEASED', { debit = d }) end
if d.state == 'held' then
  if now >= d.expires_at then return cjson.encode({ s = 'expired' }) end
  redis.call('HSET', D, 'state', 'confirmed', 't_confirm', now, 'refundable', now + WINDOW)
  redis.call('PEXPIRE', D, WINDOW + KEEP)
  d.state, d.confirmed_at, d.refundable_until = 'confirmed', now, now + WINDOW
end
return finish({ s = 'ok', debit = d })
"#
);

/// ReleaseDebit (and the hold sweeper). KEYS[4] debit record. ARGV[7]
/// message_id, ARGV[8] reason, ARGV[9] tombstone retention ms, ARGV[10] "1"
/// to release only a hold whose time has run out (the sweeper).
/// Checks: a confirmed or refunded debit is never released
/// (DEBIT_CONFIRMED). An unknown id is recorded as released (amount 0), so a
/// late DebitForMessage with it is refused.
const RELEASE: &str = concat!(
    prelude!(),
    r#"
local D, MSG, REASON, KEEP, ONLY_EXPIRED = KEYS[4], ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10] == '1'
local d = debit_view(D)
if not d then
  if ONLY_EXPIRED then save() return finish({ s = 'ok', released_now = false, balance_after = bal }) end
  redis.call('HSET', D, 'state', 'released', 'amount', 0, 't_return', now, 'reason', REASON)
  redis.call('PEXPIRE', D, KEEP)
  save()
  return finish({ s = 'ok', debit = debit_view(D), released_now = false, balance_after = bal })
end
if d.state == 'confirmed' or d.state == 'refunded' then
  save()
  return refuse('DEBIT_CONFIRMED', { debit = d, balance_after = bal })
end
if d.state == 'held' and not (ONLY_EXPIRED and now < d.expires_at) then
  bal = bal + d.amount
  bump('released', d.amount)
  redis.call('HSET', D, 'state', 'released', 't_return', now, 'reason', REASON)
  redis.call('PEXPIRE', D, KEEP)
  entry('RELEASE', d.amount, MSG, REASON)
  save()
  return finish({ s = 'ok', debit = debit_view(D), released_now = true, released = d.amount, balance_after = bal })
end
save()
return finish({ s = 'ok', debit = d, released_now = false, balance_after = bal })
"#
);

/// RefundMessage. KEYS[4] debit record. ARGV[7] message_id.
/// Checks: the debit exists (DEBIT_NOT_FOUND), is confirmed (held:
/// DEBIT_NOT_CONFIRMED; released: DEBIT_RELEASED), and the refund window is
/// open (REFUND_WINDOW_CLOSED). A refunded debit answers refunded_now=false.
/// The credit goes to the current cycle's balance.
const REFUND: &str = concat!(
    prelude!(),
    r#"
local D, MSG = KEYS[4], ARGV[7]
local d = debit_view(D)
if not d then save() return refuse('DEBIT_NOT_FOUND') end
if d.state == 'held' then save() return refuse('DEBIT_NOT_CONFIRMED', { debit = d }) end
if d.state == 'released' then save() return refuse('DEBIT_RELEASED', { debit = d }) end
if d.state == 'refunded' then
  save()
  return finish({ s = 'ok', debit = d, refunded_now = false, balance_after = bal })
end
if now > d.refundable_until then save() return refuse('REFUND_WINDOW_CLOSED', { debit = d }) end
bal = bal + d.amount
bump('refunded', d.amount)
redis.call('HSET', D, 'state', 'refunded', 't_return', now)
entry('REFUND', d.amount, MSG, '')
save()
return finish({ s = 'ok', debit = debit_view(D), refunded_now = true, refunded = d.amount, balance_after = bal })
"#
);

/// GrantCredits. ARGV[7] amount, ARGV[8] reason. No checks beyond the request
/// id: the amount was validated at the edge.
const GRANT: &str = concat!(
    prelude!(),
    r#"
local AMOUNT, REASON = tonumber(ARGV[7]), ARGV[8]
bal = bal + AMOUNT
bump('granted', AMOUNT)
local id = entry('GRANT', AMOUNT, '', REASON)
save()
return finish({ s = 'ok', entry_id = id, balance_after = bal, granted = AMOUNT })
"#
);

/// Reconciliation of one member. KEYS[1] account, KEYS[2] ledger. Reads only:
/// replays the whole ledger in one atomic snapshot and checks that the
/// amounts add up to the counter and each entry's balance_after is the
/// running sum. Returns {counter, sum, entries, first_bad_entry_id or ""}.
const RECONCILE: &str = r#"
local counter = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
local sum, count, bad = 0, 0, ''
local cursor = '-'
while true do
  local batch = redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', 500)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local f = {}
    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
    sum = sum + tonumber(f.a)
    count = count + 1
    if bad == '' and tonumber(f.b) ~= sum then bad = e[1] end
  end
  cursor = '(' .. batch[#batch][1]
end
return { counter, sum, count, bad }
"#;

pub fn account_key(member: &str) -> String {
    format!("billing:{{{member}}}:account")
}

pub fn ledger_key(member: &str) -> String {
    format!("billing:{{{member}}}:ledger")
}

fn debit_key(member: &str, message_id: &str) -> String {
    format!("billing:{{{member}}}:debit:{message_id}")
}

fn request_key(member: &str, request_id: &str) -> String {
    format!("billing:{{{member}}}:request:{request_id}")
}

fn message_owner_key(message_id: &str) -> String {
    format!("billing:message:{{{message_id}}}")
}

pub fn hold_shard_key(shard: u32) -> String {
    format!("billing:holds:{{h{shard}}}")
}

/// The shard of a member's holds (FNV-1a: stable across builds and hosts).
pub fn hold_shard(member: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in member.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % HOLD_SHARDS
}

pub fn hold_entry(member: &str, message_id: &str) -> String {
    format!("{member}|{message_id}")
}

/// What every balance script answers (JSON).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Reply {
    /// "ok", "refused", "need" (no trustworthy entitlement), "stale",
    /// "mismatch" (request id reused with other arguments).
    pub s: String,
    pub reason: String,
    pub ver: u64,
    pub balance: Option<BalanceView>,
    pub debit: Option<DebitView>,
    pub balance_after: Option<i64>,
    pub released_now: Option<bool>,
    pub refunded_now: Option<bool>,
    pub entry_id: Option<String>,
    /// The first outcome of this request id, answered again.
    pub replayed: bool,
    /// Credits moved by this call, for metrics.
    pub renewed: i64,
    pub written_off: i64,
    pub debited: i64,
    pub released: i64,
    pub refunded: i64,
    pub granted: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BalanceView {
    pub available: i64,
    pub plan: String,
    pub monthly: i64,
    pub cap: i64,
    pub cstart: i64,
    pub cend: i64,
    pub debited: i64,
    pub refunded: i64,
    pub released: i64,
    pub granted: i64,
    pub ver: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DebitView {
    pub state: String,
    pub amount: i64,
    pub debited_at: i64,
    pub expires_at: i64,
    pub confirmed_at: i64,
    pub refundable_until: i64,
    pub returned_at: i64,
    pub reason: String,
    pub balance_after: i64,
}

/// The arguments every balance script shares.
pub struct Call<'a> {
    pub member: &'a str,
    pub now_ms: i64,
    /// The entitlement JSON, or "" to rely on the cached one.
    pub entitlement: &'a str,
    pub valid_until_ms: i64,
    pub request_id: &'a str,
    pub fingerprint: &'a str,
}

/// One ledger entry as stored.
#[derive(Debug, Clone, Default)]
pub struct StoredEntry {
    pub id: String,
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub at_ms: i64,
    pub message_id: String,
    pub request_id: String,
    pub plan_id: String,
    pub plan_version: u64,
    pub cycle_index: u32,
    pub note: String,
}

#[derive(Debug, Clone)]
pub struct Reconciled {
    pub counter: i64,
    pub ledger_sum: i64,
    pub entries: u64,
    pub first_bad_entry: String,
}

#[derive(Clone)]
pub struct BillingStore {
    redis: Redis,
    balance: Script,
    debit: Script,
    confirm: Script,
    release: Script,
    refund: Script,
    grant: Script,
    reconcile: Script,
}

/// How long records outlive their purpose.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub request: Duration,
    /// Margin a confirmed debit is kept after its refund window.
    pub confirmed_margin: Duration,
    /// How long a released debit blocks its message id.
    pub tombstone: Duration,
    /// How long a message id stays bound to its member.
    pub message_owner: Duration,
}

impl BillingStore {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            balance: Script::new(BALANCE),
            debit: Script::new(DEBIT),
            confirm: Script::new(CONFIRM),
            release: Script::new(RELEASE),
            refund: Script::new(REFUND),
            grant: Script::new(GRANT),
            reconcile: Script::new(RECONCILE),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn invocation<'s>(
        script: &'s Script,
        call: &Call<'_>,
        retention: Duration,
        debit_of: Option<&str>,
    ) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(account_key(call.member))
            .key(ledger_key(call.member))
            .key(request_key(call.member, call.request_id));
        if let Some(message_id) = debit_of {
            inv.key(debit_key(call.member, message_id));
        }
        inv.arg(call.now_ms)
            .arg(call.entitlement)
            .arg(call.valid_until_ms)
            .arg(call.request_id)
            .arg(call.fingerprint)
            .arg(retention.as_millis() as u64);
        inv
    }

    async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<Reply, ApiError> {
        let json: String = inv.invoke_async(&mut self.redis.conn()).await?;
        serde_json::from_str(&json)
            .map_err(|e| ApiError::internal(format!("unreadable script reply {json:?}: {e}")))
    }

    pub async fn balance(&self, call: &Call<'_>, retention: Duration) -> Result<Reply, ApiError> {
        self.run(Self::invocation(&self.balance, call, retention, None))
            .await
    }

    /// Binds the message id to the member and indexes the hold's expiry, both
    /// before the debit itself (see the module doc). Answers the member the
    /// id was first debited to.
    pub async fn prepare_debit(
        &self,
        member: &str,
        message_id: &str,
        hold_expires_ms: i64,
        owner_retention: Duration,
    ) -> Result<String, ApiError> {
        let mut claim = redis::cmd("SET");
        claim
            .arg(message_owner_key(message_id))
            .arg(member)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(owner_retention.as_millis() as u64);
        let mut index = redis::cmd("ZADD");
        index
            .arg(hold_shard_key(hold_shard(member)))
            .arg(hold_expires_ms)
            .arg(hold_entry(member, message_id));
        let mut batch = Batch::new();
        batch.add(claim).add_ignored(index);
        let (previous,): (Option<String>,) = self.redis.run(&batch).await?;
        Ok(previous.unwrap_or_else(|| member.to_string()))
    }

    pub async fn debit(
        &self,
        call: &Call<'_>,
        retention: Duration,
        message_id: &str,
        amount: i32,
        hold: Duration,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.debit, call, retention, Some(message_id));
        inv.arg(message_id).arg(amount).arg(hold.as_millis() as u64);
        self.run(inv).await
    }

    /// The lean confirm script: the debit record and the request record only.
    pub async fn confirm(
        &self,
        call: &Call<'_>,
        retention: &Retention,
        message_id: &str,
        refund_window: Duration,
    ) -> Result<Reply, ApiError> {
        let mut inv = self.confirm.prepare_invoke();
        inv.key(debit_key(call.member, message_id))
            .key(account_key(call.member))
            .key(request_key(call.member, call.request_id))
            .arg(call.now_ms)
            .arg("")
            .arg(0)
            .arg(call.request_id)
            .arg(call.fingerprint)
            .arg(retention.request.as_millis() as u64)
            .arg(refund_window.as_millis() as u64)
            .arg(retention.confirmed_margin.as_millis() as u64);
        self.run(inv).await
    }

    pub async fn release(
        &self,
        call: &Call<'_>,
        retention: &Retention,
        message_id: &str,
        reason: &str,
        only_if_expired: bool,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.release, call, retention.request, Some(message_id));
        inv.arg(message_id)
            .arg(reason)
            .arg(retention.tombstone.as_millis() as u64)
            .arg(if only_if_expired { "1" } else { "0" });
        self.run(inv).await
    }

    pub async fn refund(
        &self,
        call: &Call<'_>,
        retention: Duration,
        message_id: &str,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.refund, call, retention, Some(message_id));
        inv.arg(message_id);
        self.run(inv).await
    }

    pub async fn grant(
        &self,
        call: &Call<'_>,
        retention: Duration,
        amount: i32,
        reason: &str,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.grant, call, retention, None);
        inv.arg(amount).arg(reason);
        self.run(inv).await
    }

    /// Drops settled entries of one shard of the hold index.
    pub async fn forget_holds(
        &self,
        shard: u32,
        entries: &[(String, String)],
    ) -> Result<(), ApiError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(hold_shard_key(shard));
        for (member, message_id) in entries {
            cmd.arg(hold_entry(member, message_id));
        }
        let _: i64 = cmd.query_async(&mut self.redis.conn()).await?;
        Ok(())
    }

    /// The state of each debit ("held", "confirmed", ...), in one round trip.
    pub async fn debit_states(
        &self,
        debits: &[(String, String)],
    ) -> Result<Vec<Option<String>>, ApiError> {
        let mut batch = Batch::new();
        for (member, message_id) in debits {
            batch.add(
                redis::cmd("HGET")
                    .arg(debit_key(member, message_id))
                    .arg("state")
                    .clone(),
            );
        }
        self.redis.run(&batch).await
    }

    /// Holds whose expiry is at or before `now_ms`, oldest first.
    pub async fn expired_holds(
        &self,
        shard: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let entries: Vec<String> = redis::cmd("ZRANGE")
            .arg(hold_shard_key(shard))
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|e| {
                e.split_once('|')
                    .map(|(member, message)| (member.to_string(), message.to_string()))
            })
            .collect())
    }

    pub async fn get_debit(
        &self,
        member: &str,
        message_id: &str,
    ) -> Result<Option<DebitView>, ApiError> {
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(debit_key(member, message_id))
            .query_async(&mut self.redis.conn())
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let int = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        Ok(Some(DebitView {
            state: fields.get("state").cloned().unwrap_or_default(),
            amount: int("amount"),
            debited_at: int("t_debit"),
            expires_at: int("t_expire"),
            confirmed_at: int("t_confirm"),
            refundable_until: int("refundable"),
            returned_at: int("t_return"),
            reason: fields.get("reason").cloned().unwrap_or_default(),
            balance_after: int("bal_after"),
        }))
    }

    /// Ledger entries newest first, starting strictly before `before` (a
    /// stream id) when given. Answers one more than `limit` when there is more.
    pub async fn ledger_page(
        &self,
        member: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, ApiError> {
        let end = match before {
            Some(id) => format!("({id}"),
            None => "+".to_string(),
        };
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(ledger_key(member))
            .arg(end)
            .arg("-")
            .arg("COUNT")
            .arg(limit + 1)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(raw
            .into_iter()
            .map(|(id, fields)| parse_entry(id, fields))
            .collect())
    }

    pub async fn ledger_entry(
        &self,
        member: &str,
        id: &str,
    ) -> Result<Option<StoredEntry>, ApiError> {
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(ledger_key(member))
            .arg(id)
            .arg(id)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(raw
            .into_iter()
            .next()
            .map(|(id, fields)| parse_entry(id, fields)))
    }

    pub async fn reconcile_member(&self, member: &str) -> Result<Reconciled, ApiError> {
        let (counter, ledger_sum, entries, first_bad_entry): (i64, i64, u64, String) = self
            .reconcile
            .key(account_key(member))
            .key(ledger_key(member))
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(Reconciled {
            counter,
            ledger_sum,
            entries,
            first_bad_entry,
        })
    }

    /// One SCAN step over member accounts: (next cursor, members).
    /// One step over every member account (SCAN; on a cluster, node after
    /// node): (next cursor, "0" when done; members).
    pub async fn scan_members(
        &self,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<String>), ApiError> {
        let (next, keys) = self
            .redis
            .scan(cursor, "billing:{*}:account", count)
            .await?;
        let members = keys
            .into_iter()
            .filter_map(|key| {
                key.strip_prefix("billing:{")
                    .and_then(|rest| rest.strip_suffix("}:account"))
                    .map(str::to_string)
            })
            .collect();
        Ok((next, members))
    }
}

fn parse_entry(id: String, fields: Vec<(String, String)>) -> StoredEntry {
    let mut entry = StoredEntry {
        id,
        ..Default::default()
    };
    for (name, value) in fields {
        match name.as_str() {
            "k" => entry.kind = value,
            "a" => entry.amount = value.parse().unwrap_or(0),
            "b" => entry.balance_after = value.parse().unwrap_or(0),
            "t" => entry.at_ms = value.parse().unwrap_or(0),
            "m" => entry.message_id = value,
            "r" => entry.request_id = value,
            "p" => entry.plan_id = value,
            "v" => entry.plan_version = value.parse().unwrap_or(0),
            "c" => entry.cycle_index = value.parse().unwrap_or(0),
            "n" => entry.note = value,
            _ => {}
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_shards_are_stable_and_spread() {
        assert_eq!(hold_shard("alice"), hold_shard("alice"));
        let used: std::collections::HashSet<_> = (0..200)
            .map(|i| hold_shard(&format!("member-{i}")))
            .collect();
        assert_eq!(used.len(), HOLD_SHARDS as usize);
    }

    #[test]
    fn every_member_key_carries_the_member_hash_tag() {
        for key in [
            account_key("m-1"),
            ledger_key("m-1"),
            debit_key("m-1", "msg"),
            request_key("m-1", "req"),
        ] {
            assert!(key.contains("{m-1}"), "{key}");
        }
    }
}
