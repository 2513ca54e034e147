//! The message archiver: delivered messages older than
//! HISTORY_HOT_RETENTION leave Redis for the history store (PostgreSQL), so
//! what a conversation holds in RAM stays bounded while every message stays
//! readable (ListMessages pages on into it; README.md, "The history
//! store").
//!
//! A conversation's oldest messages move first, in seq order: they are
//! inserted (idempotently, by conversation and seq) and committed before a
//! script trims exactly them from Redis, and only if nobody trimmed the
//! conversation meanwhile. A crash at any point loses nothing and
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

/// Messages moved per conversation per step (one insert, one trim).
const STEP: usize = 200;

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

    /// Moves one conversation's messages older than the hot retention to
    /// the history store; answers how many moved.
    pub async fn archive_conversation(
        &self,
        messaging: &Messaging,
        conv: &str,
    ) -> Result<usize, ApiError> {
        let cutoff = messaging.clock().now_ms().await? - self.hot.as_millis() as i64;
        let store = messaging.store();
        let mut moved = 0;
        loop {
            let (arch, oldest) = store.oldest_messages(conv, STEP).await?;
            let read = oldest.len();
            // The oldest first, up to the first one still hot (a staged
            // InMail delivered late keeps its send time, so times are not
            // quite in seq order: the prefix stops at it).
            let old: Vec<_> = oldest
                .into_iter()
                .take_while(|(_, m)| m.at_ms < cutoff)
                .collect();
            if old.is_empty() {
                return Ok(moved);
            }
            self.history.insert(conv, &old).await?;
            if !store.trim_archived(conv, &arch, &old).await? {
                // Another replica trimmed meanwhile; the rows it inserted
                // are these same messages (the insert skipped them).
                return Ok(moved);
            }
            moved += old.len();
            if old.len() < read || read < STEP {
                return Ok(moved);
            }
        }
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
        loop {
            let (next, convs) = messaging.store().scan_conversations(&cursor, 200).await?;
            for conv in convs {
                if !shards.contains(&shard_of(&conv, ARCHIVE_SHARDS)) {
                    continue;
                }
                match self.archive_conversation(messaging, &conv).await {
                    Ok(n) => moved += n,
                    // The store cannot answer (or Redis): end the pass, the
                    // next one resumes.
                    Err(e)
                        if History::is_unavailable(&e) || e.code() == tonic::Code::Unavailable =>
                    {
                        return Err(e);
                    }
                    // This conversation's messages were refused: the others
                    // go on; the refusal is logged and counted.
                    Err(e) => {
                        tracing::error!(%conv, error = %e, "cannot archive this conversation");
                        metrics::counter!("inmail_archive_refused_total", "history" => "messages")
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
