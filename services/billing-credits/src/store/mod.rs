//! billing-credits' Redis store: keys ([`keys`]), the Lua scripts (`lua/`,
//! one header each), and their replies parsed into types ([`reply`]).
//!
//! Every change of a member's balance is one script over keys that share the
//! member's hash tag (one slot: atomic, and valid on Redis Cluster), with
//! every check before its first write.

pub mod keys;
pub mod reply;

use std::collections::HashMap;
use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::state::storage::{Batch, Redis};
use inmail_shared::state::sweep::forget_unchanged;
use redis::Script;

pub use self::keys::HOLD_SHARDS;
pub use self::reply::{
    BalanceView, DebitState, DebitView, EntryKind, Outcome, Refusal, ReleaseCause, Reply,
    StoredEntry,
};

/// The balance scripts: account_args + request helpers + account prelude +
/// the script's own body.
macro_rules! balance_script {
    ($body:literal) => {
        concat!(
            include_str!("lua/account_args.lua"),
            include_str!("lua/request.lua"),
            include_str!("lua/account.lua"),
            include_str!($body)
        )
    };
}

const BALANCE: &str = balance_script!("lua/balance.lua");
const DEBIT: &str = balance_script!("lua/debit.lua");
const RELEASE: &str = balance_script!("lua/release.lua");
const REFUND: &str = balance_script!("lua/refund.lua");
const GRANT: &str = balance_script!("lua/grant.lua");
const ALERT: &str = balance_script!("lua/alert.lua");
const CONFIRM: &str = concat!(
    include_str!("lua/confirm_args.lua"),
    include_str!("lua/request.lua"),
    include_str!("lua/confirm.lua")
);
const RECONCILE: &str = include_str!("lua/reconcile.lua");
const COMPACT: &str = include_str!("lua/compact.lua");

/// Every script by name, as sent to Redis: what a profile labels a script
/// hash (EVALSHA) with (inmail-bench's per-script Redis time).
pub const SCRIPTS: [(&str, &str); 9] = [
    ("balance", BALANCE),
    ("debit", DEBIT),
    ("confirm", CONFIRM),
    ("release", RELEASE),
    ("refund", REFUND),
    ("grant", GRANT),
    ("reconcile", RECONCILE),
    ("compact", COMPACT),
    ("alert", ALERT),
];

/// The arguments every balance script shares.
pub struct Call<'a> {
    pub member: &'a str,
    pub now_ms: i64,
    /// The entitlement JSON, "" to rely on the cached one, "*" for the cached
    /// one however old.
    pub entitlement: &'a str,
    pub valid_until_ms: i64,
    pub request_id: &'a str,
    pub fingerprint: &'a str,
    /// A debit's hold expiry, as its index entry has it (epoch ms).
    pub hold_expires_ms: i64,
}

/// One bounded step of a member's reconciliation (see reconcile.lua).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReconcileStep {
    /// The whole ledger is verified; `counter` is the balance Redis holds.
    Done {
        counter: i64,
        sum: i64,
        verified: u64,
        replayed: u64,
    },
    /// More entries follow.
    More {
        sum: i64,
        verified: u64,
        replayed: u64,
    },
    /// This entry does not carry the running balance.
    Bad {
        entry_id: String,
        sum: i64,
        verified: u64,
        replayed: u64,
    },
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
    compact: Script,
    alert: Script,
    /// The most balance events kept per member, and how long (ms).
    events_keep: usize,
    events_retention_ms: u64,
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
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
            alert: Script::new(ALERT),
            events_keep: 1000,
            events_retention_ms: 24 * 3600 * 1000,
            compact: Script::new(COMPACT),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Keeps at most `keep` balance events per member, for `retention`.
    pub fn with_event_retention(mut self, keep: usize, retention: Duration) -> Self {
        self.events_keep = keep.max(1);
        self.events_retention_ms = millis(retention).max(1);
        self
    }

    /// A balance script's keys (and the debit record's) and shared arguments.
    fn invocation<'s>(
        script: &'s Script,
        call: &Call<'_>,
        retention: Duration,
        debit_of: Option<&str>,
    ) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(keys::account(call.member))
            .key(keys::ledger(call.member))
            .key(keys::request(call.member, call.request_id));
        if let Some(message_id) = debit_of {
            inv.key(keys::debit(call.member, message_id));
        }
        // Always the last two keys (account_args.lua).
        inv.key(keys::events(call.member));
        inv.key(keys::plans_revision(call.member));
        inv.arg(call.now_ms)
            .arg(call.entitlement)
            .arg(call.valid_until_ms)
            .arg(call.request_id)
            .arg(call.fingerprint)
            .arg(millis(retention));
        inv
    }

    /// Runs a script of `member`'s and reads its reply; with replicas
    /// configured, answers only once they have its writes.
    async fn run(
        &self,
        member: &str,
        mut inv: redis::ScriptInvocation<'_>,
    ) -> Result<Reply, ApiError> {
        // Always the last two arguments (account_args.lua).
        inv.arg(self.events_keep).arg(self.events_retention_ms);
        let json: String = inv.invoke_async(&mut self.redis.conn()).await?;
        self.redis.acknowledge(&[&keys::account(member)]).await?;
        serde_json::from_str(&json)
            .map_err(|e| ApiError::internal(format!("unreadable script reply {json:?}: {e}")))
    }

    pub async fn balance(&self, call: &Call<'_>, retention: Duration) -> Result<Reply, ApiError> {
        self.run(
            call.member,
            Self::invocation(&self.balance, call, retention, None),
        )
        .await
    }

    /// Binds the message id to the member and indexes the hold's expiry, both
    /// before the debit itself (see [`keys`]). Answers the member the id was
    /// first debited to.
    pub async fn prepare_debit(
        &self,
        member: &str,
        message_id: &str,
        hold_expires_ms: i64,
        owner_retention: Duration,
    ) -> Result<String, ApiError> {
        let mut claim = redis::cmd("SET");
        claim
            .arg(keys::message_owner(message_id))
            .arg(member)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(owner_retention));
        let mut index = redis::cmd("ZADD");
        index
            .arg(keys::hold_shard(keys::hold_shard_of(member)))
            .arg(hold_expires_ms)
            .arg(keys::hold_entry(member, message_id));
        let mut batch = Batch::new();
        batch.add(claim).add_ignored(index);
        let (previous,): (Option<String>,) = self.redis.run(&batch).await?;
        self.redis
            .acknowledge(&[
                &keys::message_owner(message_id),
                &keys::hold_shard(keys::hold_shard_of(member)),
            ])
            .await?;
        Ok(previous.unwrap_or_else(|| member.to_string()))
    }

    pub async fn debit(
        &self,
        call: &Call<'_>,
        retention: Duration,
        message_id: &str,
        amount: i32,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.debit, call, retention, Some(message_id));
        inv.arg(message_id).arg(amount).arg(call.hold_expires_ms);
        self.run(call.member, inv).await
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
        inv.key(keys::debit(call.member, message_id))
            .key(keys::account(call.member))
            .key(keys::request(call.member, call.request_id))
            .arg(call.now_ms)
            .arg("")
            .arg(0)
            .arg(call.request_id)
            .arg(call.fingerprint)
            .arg(millis(retention.request))
            .arg(millis(refund_window))
            .arg(millis(retention.confirmed_margin));
        self.run(call.member, inv).await
    }

    pub async fn release(
        &self,
        call: &Call<'_>,
        retention: &Retention,
        message_id: &str,
        cause: ReleaseCause,
        only_if_expired: bool,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.release, call, retention.request, Some(message_id));
        inv.arg(message_id)
            .arg(cause.as_str())
            .arg(millis(retention.tombstone))
            .arg(if only_if_expired { "1" } else { "0" });
        self.run(call.member, inv).await
    }

    /// Refunds a confirmed debit; `clock_skew`: how far before the debit
    /// (by billing's clock) a caller's `responded_at_ms` may still be.
    pub async fn refund(
        &self,
        call: &Call<'_>,
        retention: Duration,
        message_id: &str,
        responded_at_ms: i64,
        clock_skew: Duration,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.refund, call, retention, Some(message_id));
        inv.arg(message_id)
            .arg(responded_at_ms)
            .arg(millis(clock_skew));
        self.run(call.member, inv).await
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
        self.run(call.member, inv).await
    }

    /// Sets the member's low-balance threshold (0: off).
    pub async fn set_alert(
        &self,
        call: &Call<'_>,
        retention: Duration,
        threshold: i64,
    ) -> Result<Reply, ApiError> {
        let mut inv = Self::invocation(&self.alert, call, retention, None);
        inv.arg(threshold);
        self.run(call.member, inv).await
    }

    /// Notes in the ledger feed's index that a balance script is about to
    /// run for `member` (before it runs: the feed never misses its events).
    pub async fn index_for_feed(&self, member: &str, at_ms: i64) -> Result<(), ApiError> {
        let _: i64 = redis::cmd("ZADD")
            .arg(keys::cdc_index(keys::cdc_partition_of(member)))
            .arg("GT")
            .arg(at_ms)
            .arg(member)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// The members of a feed partition touched at or after `since_ms`, and
    /// drops those untouched since before `forget_before_ms`.
    pub async fn feed_members(
        &self,
        partition: u32,
        since_ms: i64,
        forget_before_ms: i64,
    ) -> Result<Vec<String>, ApiError> {
        let key = keys::cdc_index(partition);
        let mut batch = Batch::new();
        batch
            .add_ignored(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(format!("({forget_before_ms}"))
                    .clone(),
            )
            .add(
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(since_ms)
                    .arg("+inf")
                    .arg("BYSCORE")
                    .clone(),
            );
        let (members,): (Vec<String>,) = self.redis.run_bulk(&batch).await?;
        Ok(members)
    }

    /// The balance events of each of `members` from `from` (inclusive) to
    /// `to` (inclusive), as (member, event).
    pub async fn events_between(
        &self,
        members: &[String],
        from: inmail_shared::state::events::StreamId,
        to: inmail_shared::state::events::StreamId,
    ) -> Result<Vec<(String, inmail_shared::state::events::Entry)>, ApiError> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for member in members {
            batch.add(
                redis::cmd("XRANGE")
                    .arg(keys::events(member))
                    .arg(from.to_string())
                    .arg(to.to_string())
                    .clone(),
            );
        }
        let replies: Vec<redis::Value> = self.redis.read_bulk(&batch).await?;
        Ok(members
            .iter()
            .zip(replies)
            .flat_map(|(member, reply)| {
                inmail_shared::state::events::parse_entries(reply)
                    .into_iter()
                    .map(move |entry| (member.clone(), entry))
            })
            .collect())
    }

    /// Redis' clock (ms): the balance events' ids come from it.
    pub async fn redis_time_ms(&self) -> Result<u64, ApiError> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Tells the watchers' dispatcher that `member`'s balance events may
    /// have grown (inmail_shared::state::events).
    pub async fn notify_events(&self, member: &str) -> Result<(), ApiError> {
        let _: String = inmail_shared::state::events::notify_cmd("billing", &keys::events(member))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Drops settled entries (member, message id, expiry as read) of one
    /// shard of the hold index, each only while it still has the expiry it
    /// was read with: a retry that indexed the hold again keeps its entry.
    pub async fn forget_holds(
        &self,
        shard: u32,
        entries: &[(String, String, i64)],
    ) -> Result<(), ApiError> {
        let entries: Vec<(String, i64)> = entries
            .iter()
            .map(|(member, message_id, expiry)| (keys::hold_entry(member, message_id), *expiry))
            .collect();
        forget_unchanged(&self.redis, &keys::hold_shard(shard), &entries).await?;
        Ok(())
    }

    /// The state of each debit (`None`: no record), in one round trip.
    pub async fn debit_states(
        &self,
        debits: &[(String, String)],
    ) -> Result<Vec<Option<DebitState>>, ApiError> {
        let mut batch = Batch::new();
        for (member, message_id) in debits {
            batch.add(
                redis::cmd("HGET")
                    .arg(keys::debit(member, message_id))
                    .arg("state")
                    .clone(),
            );
        }
        let states: Vec<Option<String>> = self.redis.run(&batch).await?;
        Ok(states
            .into_iter()
            .map(|s| s.as_deref().and_then(DebitState::parse))
            .collect())
    }

    /// Holds whose expiry is at or before `now_ms`, oldest first: (member,
    /// message id, expiry ms).
    pub async fn expired_holds(
        &self,
        shard: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String, i64)>, ApiError> {
        let entries: Vec<(String, i64)> = redis::cmd("ZRANGE")
            .arg(keys::hold_shard(shard))
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(entries
            .iter()
            .filter_map(|(e, expiry)| {
                keys::parse_hold_entry(e).map(|(member, message)| (member, message, *expiry))
            })
            .collect())
    }

    pub async fn get_debit(
        &self,
        member: &str,
        message_id: &str,
    ) -> Result<Option<DebitView>, ApiError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::debit(member, message_id))
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
        let state = fields
            .get("state")
            .and_then(|s| DebitState::parse(s))
            .ok_or_else(|| ApiError::internal("debit record without a known state"))?;
        Ok(Some(DebitView {
            state,
            amount: int("amount"),
            debited_at: int("t_debit"),
            expires_at: int("t_expire"),
            confirmed_at: int("t_confirm"),
            refundable_until: int("refundable"),
            returned_at: int("t_return"),
            reason: fields.get("reason").and_then(|r| ReleaseCause::parse(r)),
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
            .arg(keys::ledger(member))
            .arg(end)
            .arg("-")
            .arg("COUNT")
            .arg(limit + 1)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(raw
            .into_iter()
            .map(|(id, fields)| StoredEntry::parse(id, fields))
            .collect())
    }

    pub async fn ledger_entry(
        &self,
        member: &str,
        id: &str,
    ) -> Result<Option<StoredEntry>, ApiError> {
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(keys::ledger(member))
            .arg(id)
            .arg(id)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(raw
            .into_iter()
            .next()
            .map(|(id, fields)| StoredEntry::parse(id, fields)))
    }

    /// Replays at most `chunk` entries of a member's ledger past its
    /// checkpoint (`epoch`: a full re-verification, "" for incremental).
    pub async fn reconcile_step(
        &self,
        member: &str,
        chunk: usize,
        epoch: &str,
    ) -> Result<ReconcileStep, ApiError> {
        let reply: Vec<redis::Value> = self
            .reconcile
            .key(keys::account(member))
            .key(keys::ledger(member))
            .arg(chunk)
            .arg(epoch)
            .invoke_async(&mut self.redis.conn())
            .await?;
        let text = |i: usize| -> Result<String, ApiError> {
            reply
                .get(i)
                .map(|v| redis::FromRedisValue::from_redis_value(v.clone()))
                .transpose()
                .map_err(|e: redis::ParsingError| {
                    ApiError::internal(format!("reconcile step: {e}"))
                })?
                .ok_or_else(|| ApiError::internal("reconcile step answered too little"))
        };
        let int = |i: usize| -> Result<i64, ApiError> {
            text(i)?
                .parse()
                .map_err(|e| ApiError::internal(format!("reconcile step: {e}")))
        };
        Ok(match text(0)?.as_str() {
            "done" => ReconcileStep::Done {
                counter: int(1)?,
                sum: int(2)?,
                verified: int(3)? as u64,
                replayed: int(4)? as u64,
            },
            "more" => ReconcileStep::More {
                sum: int(1)?,
                verified: int(2)? as u64,
                replayed: int(3)? as u64,
            },
            "bad" => ReconcileStep::Bad {
                entry_id: text(1)?,
                sum: int(2)?,
                verified: int(3)? as u64,
                replayed: int(4)? as u64,
            },
            other => {
                return Err(ApiError::internal(format!(
                    "unexpected reconcile step {other:?}"
                )));
            }
        })
    }

    /// Entries after the stream id `after` (from the start when `None`)
    /// whose time is in `[start_ms, end_ms)`, oldest first, at most `limit`:
    /// a walk in batches that stops at the first entry at or past `end_ms`
    /// (entry times follow the ledger's order). Also answers the first id
    /// the walk saw (with no `after`: the oldest entry in Redis then).
    pub async fn ledger_range(
        &self,
        member: &str,
        after: Option<&str>,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<(Option<String>, Vec<StoredEntry>), ApiError> {
        const BATCH: usize = 500;
        let mut from = after.map_or("-".to_string(), |id| format!("({id}"));
        let mut found = Vec::new();
        let mut first = None;
        loop {
            let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(keys::ledger(member))
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut self.redis.conn())
                .await?;
            let full = raw.len() == BATCH;
            for (id, fields) in raw {
                from = format!("({id}");
                first.get_or_insert_with(|| id.clone());
                let entry = StoredEntry::parse(id, fields);
                if entry.at_ms >= end_ms {
                    return Ok((first, found));
                }
                if entry.at_ms >= start_ms {
                    found.push(entry);
                    if found.len() == limit {
                        return Ok((first, found));
                    }
                }
            }
            if !full {
                return Ok((first, found));
            }
        }
    }

    /// The newest entry still in Redis whose time is before `before_ms`.
    pub async fn ledger_last_before(
        &self,
        member: &str,
        before_ms: i64,
    ) -> Result<Option<StoredEntry>, ApiError> {
        const BATCH: usize = 500;
        let mut to = "+".to_string();
        loop {
            let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg(keys::ledger(member))
                .arg(&to)
                .arg("-")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut self.redis.conn())
                .await?;
            let full = raw.len() == BATCH;
            for (id, fields) in raw {
                to = format!("({id}");
                let entry = StoredEntry::parse(id, fields);
                if entry.at_ms < before_ms {
                    return Ok(Some(entry));
                }
            }
            if !full {
                return Ok(None);
            }
        }
    }

    /// The id of the newest entry archived to the history store (and
    /// trimmed from Redis), if any.
    pub async fn archived_through(&self, member: &str) -> Result<Option<String>, ApiError> {
        Ok(redis::cmd("HGET")
            .arg(keys::account(member))
            .arg("arch_id")
            .query_async(&mut self.redis.conn())
            .await?)
    }

    /// A member's archive position (`arch_id`) and up to `limit` verified
    /// entries after it (up to the reconciliation checkpoint), oldest first.
    pub async fn verified_entries(
        &self,
        member: &str,
        limit: usize,
    ) -> Result<(Option<String>, Vec<StoredEntry>), ApiError> {
        let (arch, checkpoint): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(keys::account(member))
            .arg("arch_id")
            .arg("ck_id")
            .query_async(&mut self.redis.conn())
            .await?;
        let Some(checkpoint) = checkpoint else {
            return Ok((arch, Vec::new()));
        };
        let start = arch
            .as_deref()
            .map_or("-".to_string(), |id| format!("({id}"));
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(keys::ledger(member))
            .arg(start)
            .arg(checkpoint)
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.redis.bulk())
            .await?;
        Ok((
            arch,
            raw.into_iter()
                .map(|(id, fields)| StoredEntry::parse(id, fields))
                .collect(),
        ))
    }

    /// Trims a member's ledger up to `last` (archived), if nobody compacted
    /// it since `arch` was read; answers whether it did.
    pub async fn compact(
        &self,
        member: &str,
        arch: Option<&str>,
        last: &StoredEntry,
        count: usize,
    ) -> Result<bool, ApiError> {
        let (ms, seq) = last
            .id
            .split_once('-')
            .and_then(|(ms, seq)| Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?)))
            .ok_or_else(|| ApiError::internal(format!("not a stream id: {}", last.id)))?;
        let done: i64 = self
            .compact
            .key(keys::account(member))
            .key(keys::ledger(member))
            .arg(arch.unwrap_or(""))
            .arg(&last.id)
            .arg(last.balance_after)
            .arg(count)
            .arg(format!("{ms}-{}", seq + 1))
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(done == 1)
    }

    /// One step over every member account (SCAN; on a cluster, node after
    /// node): (next cursor, "0" when done; members).
    pub async fn scan_members(
        &self,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<String>), ApiError> {
        let (next, found) = self
            .redis
            .scan(cursor, keys::ACCOUNT_PATTERN, count)
            .await?;
        let members = found
            .iter()
            .filter_map(|key| keys::member_of_account(key).map(str::to_string))
            .collect();
        Ok((next, members))
    }
}
