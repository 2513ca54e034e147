//! Background rounds (the hold sweeper, the outbox sweeper): one round every
//! interval until the service stops, errors logged and retried next round.
//!
//! The sweepers' shards are shared among a service's replicas
//! ([`SweepGroup`]): each replica registers in Redis every round and sweeps
//! the shards that fall to it, so the sweeping done per interval stays the
//! same whatever the number of replicas. A replica that dies keeps its
//! shards until its registration runs out (three intervals); then the others
//! take them over. Sweeping is idempotent, so the moments where two replicas
//! disagree about who sweeps a shard (one joined or left this round) cost
//! at most a repeated scan, never a lost or doubled effect.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::contract::error::ApiError;
use crate::state::storage::{Batch, Redis};

const FORGET_UNCHANGED: &str = include_str!("lua/forget_unchanged.lua");

/// The sweepers' shared scripts by name, as sent to Redis (inmail-bench's
/// per-script Redis time).
pub const SCRIPTS: [(&str, &str); 1] = [("forget_unchanged", FORGET_UNCHANGED)];

/// Drops `entries` (member, score as read) of the index `key` that a sweep
/// found finished, each only while it still has the score it was read with
/// (one script: atomic). A retry that re-added an entry meanwhile, with a new
/// score, keeps it; an unconditional ZREM would drop work nobody then
/// finishes. Answers how many were dropped.
pub async fn forget_unchanged(
    redis: &Redis,
    key: &str,
    entries: &[(String, i64)],
) -> Result<usize, ApiError> {
    if entries.is_empty() {
        return Ok(0);
    }
    static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FORGET_UNCHANGED));
    let mut invocation = SCRIPT.key(key);
    for (member, score) in entries {
        invocation.arg(member).arg(*score);
    }
    let dropped: usize = invocation.invoke_async(&mut redis.conn()).await?;
    Ok(dropped)
}

/// How long a stopping service waits for its sweepers to leave their groups.
pub const LEAVE_WAIT: Duration = Duration::from_secs(2);

/// Registrations last this many sweep intervals.
const TERMS_PER_REGISTRATION: u32 = 3;

/// Every this many rounds a replica also drops the registrations that ran
/// out (the dead replicas' ids) from the group.
const CLEANUP_EVERY: u32 = 16;

/// The replicas of one service that share a sweep, registered under one
/// Redis key: a sorted set of replica ids, each scored by when its
/// registration runs out (epoch ms, by the registering host's clock: a
/// clock off by `d` delays a takeover, or makes two replicas sweep a shard,
/// for `d`; both harmless, sweeping being idempotent).
#[derive(Clone)]
pub struct SweepGroup {
    redis: Redis,
    key: String,
    me: String,
    term: Duration,
    rounds: Arc<AtomicU32>,
}

impl SweepGroup {
    /// This replica's place in the group `key` (a key under the service's
    /// prefix), sweeping every `interval`.
    pub fn new(redis: Redis, key: impl Into<String>, interval: Duration) -> Self {
        Self {
            redis,
            key: key.into(),
            me: uuid::Uuid::new_v4().simple().to_string(),
            term: interval * TERMS_PER_REGISTRATION,
            rounds: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Registers this replica for another term and answers the shards, of
    /// `0..shards`, it sweeps this round: one round trip of two commands
    /// (three every [`CLEANUP_EVERY`] rounds).
    pub async fn shards(&self, shards: u32) -> Result<Vec<u32>, ApiError> {
        let now = crate::state::clock::system_ms();
        let mut batch = Batch::new();
        if self
            .rounds
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CLEANUP_EVERY)
        {
            let mut cleanup = redis::cmd("ZREMRANGEBYSCORE");
            cleanup.arg(&self.key).arg("-inf").arg(now);
            batch.add_ignored(cleanup);
        }
        let mut register = redis::cmd("ZADD");
        register
            .arg(&self.key)
            .arg(now + self.term.as_millis() as i64)
            .arg(&self.me);
        batch.add_ignored(register);
        let mut live = redis::cmd("ZRANGE");
        live.arg(&self.key).arg(now).arg("+inf").arg("BYSCORE");
        batch.add(live);
        let (members,): (Vec<String>,) = self.redis.run(&batch).await?;
        Ok(shares(&members, &self.me, shards))
    }

    /// Leaves the group (on shutdown), so the others take this replica's
    /// shards at their next round.
    pub async fn leave(&self) {
        let left: Result<(), _> = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(&self.me)
            .query_async(&mut self.redis.conn())
            .await;
        if let Err(err) = left {
            tracing::warn!(error = %err, "cannot leave the sweep group; the others take over when the registration runs out");
        }
    }
}

/// The shards of `me` among `members`: the members in id order, shard `s`
/// to the member at `s % members`.
fn shares(members: &[String], me: &str, shards: u32) -> Vec<u32> {
    let mut ids: Vec<&str> = members.iter().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    let Some(rank) = ids.iter().position(|id| *id == me) else {
        // Not registered (cannot be, the script just did): sweep everything.
        return (0..shards).collect();
    };
    let count = ids.len() as u32;
    (0..shards).filter(|s| s % count == rank as u32).collect()
}

/// Runs `round` every `interval` on the shards (of `0..shards`) that fall to
/// this replica in `group`, until `stop` is cancelled; then leaves the group.
/// The handle ends once it left: a service awaits it (bounded) before it
/// exits, so its shards pass to the others at once.
pub fn spawn_shared_sweep<F, Fut>(
    what: &'static str,
    group: SweepGroup,
    shards: u32,
    interval: Duration,
    stop: CancellationToken,
    mut round: F,
) -> JoinHandle<()>
where
    F: FnMut(Vec<u32>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<usize, ApiError>> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => {
                    group.leave().await;
                    return;
                }
            }
            let outcome = match group.shards(shards).await {
                Ok(mine) => round(mine).await,
                Err(err) => Err(err),
            };
            log_round(what, outcome);
        }
    })
}

/// Waits (at most `within`) for a sweep spawned by [`spawn_shared_sweep`]
/// to leave its group after the service's stop.
pub async fn await_leave(sweep: JoinHandle<()>, within: Duration) {
    if tokio::time::timeout(within, sweep).await.is_err() {
        tracing::warn!(
            "a sweeper did not leave its group in time; the others take over when its registration runs out"
        );
    }
}

/// Runs `round` every `interval` until `stop` is cancelled. A round answers
/// how much work it finished (logged when non-zero).
pub fn spawn_periodic<F, Fut>(
    what: &'static str,
    interval: Duration,
    stop: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<usize, ApiError>> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            log_round(what, round().await);
        }
    });
}

fn log_round(what: &str, outcome: Result<usize, ApiError>) {
    match outcome {
        Ok(0) => {}
        Ok(done) => tracing::info!(done, "{what}: round finished work"),
        Err(err) => tracing::warn!(error = %err, "{what}: round failed; retrying next round"),
    }
}

/// The shard of `key` among `shards` (FNV-1a: stable across builds and
/// hosts, so every replica agrees).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("alice", 16), shard_of("alice", 16));
        let used: std::collections::HashSet<_> = (0..200)
            .map(|i| shard_of(&format!("member-{i}"), 16))
            .collect();
        assert_eq!(used.len(), 16);
    }

    #[test]
    fn every_shard_falls_to_exactly_one_member() {
        let members: Vec<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        let mut all: Vec<u32> = members
            .iter()
            .flat_map(|me| shares(&members, me, 16))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        // Members in id order: "a" has shards 0, 3, 6, ...
        assert_eq!(shares(&members, "a", 7), vec![0, 3, 6]);
        assert_eq!(shares(&members[..1], "c", 4), vec![0, 1, 2, 3]);
    }
}
