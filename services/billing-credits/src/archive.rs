//! The ledger archiver: verified entries older than the hot retention leave
//! Redis for the history store (PostgreSQL), so a member's ledger in RAM
//! stays bounded while every entry stays on record and readable
//! (ListLedgerEntries pages on into it; README.md, "Money guarantees").
//!
//! An entry is inserted (idempotently, by member and id) and committed
//! before a script trims it from Redis, and that script trims exactly what
//! was read, only if nobody compacted the member meanwhile: a crash at any
//! point loses nothing and duplicates nothing. Only entries the
//! reconciliation has verified move, and the account keeps their summary
//! (`arch_id`, `arch_bal`, `arch_n`), so reconciliation never needs them
//! again. Replicas share the members like the sweepers share their shards
//! ([`spawn_compactor`]); the trim's check makes a second pass a no-op.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::state::history::History;
use inmail_shared::state::sweep::{SweepGroup, shard_of, spawn_shared_sweep};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::credits::Credits;
use crate::history::LedgerHistory;
use crate::reconcile::CHUNK;
use crate::store::{ReconcileStep, StoredEntry};

/// Entries moved per member per step (one insert, one trim).
const STEP: usize = 1000;

#[derive(Debug, Clone)]
pub struct Archive {
    history: LedgerHistory,
    /// Entries older than this (by their time) leave Redis.
    hot: Duration,
}

impl Archive {
    pub fn new(history: LedgerHistory, hot: Duration) -> Self {
        Self { history, hot }
    }

    /// Moves one member's verified entries older than the hot retention to
    /// the archive; answers how many moved.
    pub async fn compact_member(&self, credits: &Credits, member: &str) -> Result<usize, ApiError> {
        let cutoff = credits.clock().now_ms().await? - self.hot.as_millis() as i64;
        let store = credits.store();
        // Only verified entries leave Redis: the incremental reconciliation
        // first checks what was added since its checkpoint. A ledger that
        // does not add up stays whole in Redis for the operator (the
        // reconciliation reports it).
        loop {
            match store.reconcile_step(member, CHUNK, "").await? {
                ReconcileStep::More { .. } => continue,
                ReconcileStep::Done { counter, sum, .. } if counter == sum => break,
                _ => {
                    tracing::error!(%member, "the ledger does not add up; not archived");
                    return Ok(0);
                }
            }
        }
        let mut moved = 0;
        loop {
            let (arch, entries) = store.verified_entries(member, STEP).await?;
            let old: Vec<StoredEntry> = entries
                .iter()
                .take_while(|e| e.at_ms < cutoff)
                .cloned()
                .collect();
            let Some(last) = old.last() else {
                return Ok(moved);
            };
            self.history.insert(member, &old).await?;
            if !store
                .compact(member, arch.as_deref(), last, old.len())
                .await?
            {
                // Another replica compacted meanwhile; the rows it inserted
                // are these same entries (the insert skipped them).
                return Ok(moved);
            }
            moved += old.len();
            if old.len() < entries.len() || entries.len() < STEP {
                return Ok(moved);
            }
        }
    }

    /// One pass over the members whose shard (of [`ARCHIVE_SHARDS`]) is in
    /// `shards`.
    pub async fn compact_once(&self, credits: &Credits, shards: &[u32]) -> Result<usize, ApiError> {
        let mut cursor = "0".to_string();
        let mut moved = 0;
        loop {
            let (next, members) = credits.store().scan_members(&cursor, 200).await?;
            for member in members {
                if !shards.contains(&shard_of(&member, ARCHIVE_SHARDS)) {
                    continue;
                }
                match self.compact_member(credits, &member).await {
                    Ok(n) => moved += n,
                    // The store cannot answer (or Redis): end the pass, the
                    // next one resumes.
                    Err(e)
                        if History::is_unavailable(&e) || e.code() == tonic::Code::Unavailable =>
                    {
                        return Err(e);
                    }
                    // This member's entries were refused: the others go on;
                    // the refusal is logged and counted.
                    Err(e) => {
                        tracing::error!(%member, error = %e, "cannot archive this member's ledger");
                        metrics::counter!("inmail_archive_refused_total", "history" => "ledger")
                            .increment(1);
                    }
                }
            }
            if next == "0" {
                return Ok(moved);
            }
            cursor = next;
        }
    }
}

/// Members are archived in this many shards, shared among the replicas.
pub const ARCHIVE_SHARDS: u32 = 16;

/// The Redis key of the archivers' group.
pub const GROUP_KEY: &str = "billing:archivers";

/// Archives every `interval` until `stop`, the members' shards shared among
/// the replicas the way the sweepers share theirs: each member is archived
/// by one replica at a time (two, for a round, while a replica joins or
/// leaves; harmless: the trim's check makes the second a no-op).
pub fn spawn_compactor(
    archive: Archive,
    credits: Credits,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let group = SweepGroup::new(credits.store().redis().clone(), GROUP_KEY, interval);
    spawn_shared_sweep(
        "ledger archive",
        group,
        ARCHIVE_SHARDS,
        interval,
        stop,
        move |shards| {
            let (archive, credits) = (archive.clone(), credits.clone());
            async move {
                // The lag is visible: a pass that fails (PostgreSQL down)
                // leaves the last success behind and counts a failure; the
                // next passes drain what piled up.
                match archive.compact_once(&credits, &shards).await {
                    Ok(moved) => {
                        metrics::counter!("inmail_archive_moved_total", "history" => "ledger")
                            .increment(moved as u64);
                        metrics::gauge!("inmail_archive_last_success_seconds", "history" => "ledger")
                            .set(inmail_shared::state::clock::system_ms() as f64 / 1000.0);
                        Ok(moved)
                    }
                    Err(e) => {
                        metrics::counter!("inmail_archive_failures_total", "history" => "ledger")
                            .increment(1);
                        Err(e)
                    }
                }
            }
        },
    )
}
