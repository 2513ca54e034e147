//! The message archiver: delivered messages older than
//! HISTORY_HOT_RETENTION leave Redis for the history store (PostgreSQL), so
//! what a conversation holds in RAM stays bounded while every message stays
//! readable (ListMessages pages on into it; README.md, "The history
//! store").
//!
//! A conversation's oldest messages move first, in seq order: they are
//! inserted (idempotently, by conversation and seq) and committed before a
//! script trims exactly them from Redis, and only if nobody trimmed the
//! conversation meanwhile. Conversations go in batches (one InMail is
//! usually a conversation of its own): one read of Redis, one transaction,
//! one pipeline of trims for a batch. A crash at any point loses nothing and
//! duplicates nothing. Everything below a conversation's oldest seq in
//! Redis is archived, so a page reads Redis, then PostgreSQL before that
//! seq: no gap and no duplicate at the boundary. Replicas share the
//! conversations the way the sweepers share their shards.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::state::history::History;
use inmail_shared::state::sweep::{SweepGroup, shard_of, spawn_shared_sweep};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::history::MessageHistory;
use crate::send::Messaging;
use crate::store::Oldest;

/// Messages moved per conversation per step.
const STEP: usize = 200;

/// Messages moved per step at most, over all its conversations: the
/// step's pipelines share the bulk connection with other calls' reads, so
/// they stay small.
const BUDGET: usize = 1000;

/// Conversations read, inserted (one transaction) and trimmed (one
/// pipeline) together.
const BATCH: usize = 200;

/// Conversations are archived in this many shards, shared among the
/// replicas.
pub const ARCHIVE_SHARDS: u32 = 16;

/// The Redis key of the archivers' group.
pub const GROUP_KEY: &str = "messaging:archivers";

#[derive(Debug, Clone)]
pub struct Archive {
    history: MessageHistory,
    /// Messages sent longer ago than this leave Redis.
    hot: Duration,
}

impl Archive {
    pub fn new(history: MessageHistory, hot: Duration) -> Self {
        Self { history, hot }
    }

    /// Moves the messages older than the hot retention of `convs` to the
    /// history store, a batch of conversations at a time (one read of
    /// Redis, one transaction, one pipeline of trims); answers how many
    /// moved. Conversations PostgreSQL refuses are logged and counted, and
    /// the others go on.
    pub async fn archive_conversations(
        &self,
        messaging: &Messaging,
        convs: &[String],
    ) -> Result<usize, ApiError> {
        let cutoff = messaging.clock().now_ms().await? - self.hot.as_millis() as i64;
        let store = messaging.store();
        let mut moved = 0;
        let mut pending: Vec<String> = convs.to_vec();
        while !pending.is_empty() {
            let old = store
                .oldest_messages(&pending, (STEP, BUDGET), cutoff)
                .await?;
            if old.is_empty() {
                break;
            }
            let more: Vec<String> = old
                .iter()
                .filter(|o| o.more)
                .map(|o| o.conv.clone())
                .collect();
            let batch = match self.history.insert(&old).await {
                Ok(_) => old,
                Err(e) if History::is_unavailable(&e) => return Err(e),
                // Refused: one conversation at a time, to set the refused
                // aside and archive the others.
                Err(_) => self.insert_one_by_one(old).await?,
            };
            let trimmed = store.trim_archived(&batch).await?;
            pending.clear();
            for (item, done) in batch.iter().zip(trimmed) {
                // Not trimmed: another replica trimmed meanwhile; the rows
                // it inserted are these same messages (the insert skipped
                // them).
                if !done {
                    continue;
                }
                moved += item.messages.len();
                if more.contains(&item.conv) {
                    pending.push(item.conv.clone());
                }
            }
        }
        Ok(moved)
    }

    /// Inserts each conversation of `batch` alone; answers those inserted.
    async fn insert_one_by_one(&self, batch: Vec<Oldest>) -> Result<Vec<Oldest>, ApiError> {
        let mut inserted = Vec::with_capacity(batch.len());
        for item in batch {
            match self.history.insert(std::slice::from_ref(&item)).await {
                Ok(_) => inserted.push(item),
                Err(e) if History::is_unavailable(&e) => return Err(e),
                Err(e) => {
                    tracing::error!(conv = %item.conv, error = %e, "cannot archive this conversation");
                    metrics::counter!("inmail_archive_refused_total", "history" => "messages")
                        .increment(1);
                }
            }
        }
        Ok(inserted)
    }

    /// One pass over the conversations whose shard (of [`ARCHIVE_SHARDS`])
    /// is in `shards`.
    pub async fn archive_once(
        &self,
        messaging: &Messaging,
        shards: &[u32],
    ) -> Result<usize, ApiError> {
        let mut cursor = "0".to_string();
        let mut moved = 0;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let (next, convs) = messaging.store().scan_conversations(&cursor, 1000).await?;
            for conv in convs {
                if shards.contains(&shard_of(&conv, ARCHIVE_SHARDS)) && !batch.contains(&conv) {
                    batch.push(conv);
                }
                if batch.len() >= BATCH {
                    moved += self.archive_conversations(messaging, &batch).await?;
                    batch.clear();
                }
            }
            if next == "0" {
                moved += self.archive_conversations(messaging, &batch).await?;
                return Ok(moved);
            }
            cursor = next;
        }
    }
}

/// Archives every `interval` until `stop`, the conversations' shards shared
/// among the replicas: each conversation is archived by one replica at a
/// time (two, for a round, while a replica joins or leaves; harmless: the
/// trim's check makes the second a no-op).
pub fn spawn_archiver(
    archive: Archive,
    messaging: Messaging,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let group = SweepGroup::new(messaging.store().redis().clone(), GROUP_KEY, interval);
    spawn_shared_sweep(
        "message archive",
        group,
        ARCHIVE_SHARDS,
        interval,
        stop,
        move |shards| {
            let (archive, messaging) = (archive.clone(), messaging.clone());
            async move {
                // The lag is visible: a pass that fails (PostgreSQL down)
                // leaves the last success behind and counts a failure; the
                // next passes drain what piled up.
                match archive.archive_once(&messaging, &shards).await {
                    Ok(moved) => {
                        metrics::counter!("inmail_archive_moved_total", "history" => "messages")
                            .increment(moved as u64);
                        metrics::gauge!("inmail_archive_last_success_seconds", "history" => "messages")
                            .set(inmail_shared::state::clock::system_ms() as f64 / 1000.0);
                        Ok(moved)
                    }
                    Err(e) => {
                        metrics::counter!("inmail_archive_failures_total", "history" => "messages")
                            .increment(1);
                        Err(e)
                    }
                }
            }
        },
    )
}
