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
//! again. Replicas share the work like the sweepers do: any may run a pass;
//! the trim's check makes a second one a no-op.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::state::sweep::spawn_periodic;
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

    /// One pass over every member.
    pub async fn compact_once(&self, credits: &Credits) -> Result<usize, ApiError> {
        let mut cursor = "0".to_string();
        let mut moved = 0;
        loop {
            let (next, members) = credits.store().scan_members(&cursor, 200).await?;
            for member in members {
                moved += self.compact_member(credits, &member).await?;
            }
            if next == "0" {
                return Ok(moved);
            }
            cursor = next;
        }
    }
}

/// Compacts every `interval` until `stop`.
pub fn spawn_compactor(
    archive: Archive,
    credits: Credits,
    interval: Duration,
    stop: CancellationToken,
) {
    spawn_periodic("ledger archive", interval, stop, move || {
        let (archive, credits) = (archive.clone(), credits.clone());
        async move {
            // The lag is visible: a pass that fails (PostgreSQL down) leaves
            // the last success behind and counts a failure; the next passes
            // drain what piled up.
            match archive.compact_once(&credits).await {
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
    });
}
