//! The ledger archive: verified entries older than the hot retention leave
//! Redis for append-only JSON Lines files, so a member's ledger in RAM stays
//! bounded while every entry stays on record (README.md, "Money guarantees").
//!
//! An entry is written to the archive (and fsynced) before it is trimmed
//! from Redis; a crash in between archives it twice, never loses it (readers
//! keep one line per member and entry id). Only entries the reconciliation
//! has verified move, and the account keeps their summary (`arch_id`,
//! `arch_bal`, `arch_n`), so reconciliation never needs them again.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::state::sweep::spawn_periodic;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::credits::Credits;
use crate::store::{EntryKind, StoredEntry};

/// Entries moved per member per step.
const STEP: usize = 1000;

/// One archived entry, as a line of JSON.
#[derive(Debug, Serialize)]
struct Line<'a> {
    member_id: &'a str,
    entry_id: &'a str,
    kind: &'a str,
    amount: i64,
    balance_after: i64,
    at_ms: i64,
    message_id: &'a str,
    request_id: &'a str,
    plan_id: &'a str,
    plan_version: u64,
    cycle_index: u32,
    note: &'a str,
}

fn kind_name(kind: Option<EntryKind>) -> &'static str {
    match kind {
        Some(EntryKind::Renewal) => "RENEWAL",
        Some(EntryKind::Debit) => "DEBIT",
        Some(EntryKind::Release) => "RELEASE",
        Some(EntryKind::Refund) => "REFUND",
        Some(EntryKind::Grant) => "GRANT",
        Some(EntryKind::WriteOff) => "WRITE_OFF",
        Some(EntryKind::PlanChange) => "PLAN_CHANGE",
        None => "UNKNOWN",
    }
}

#[derive(Debug, Clone)]
pub struct Archive {
    dir: PathBuf,
    /// Entries older than this (by their time) leave Redis.
    hot: Duration,
    /// This process's files: one per day, named apart from other replicas'.
    writer: String,
}

impl Archive {
    pub fn new(dir: PathBuf, hot: Duration) -> Self {
        Self {
            dir,
            hot,
            writer: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        }
    }

    /// Appends the entries of `member` as lines of the day's file, durably.
    async fn append(&self, member: &str, entries: &[StoredEntry]) -> Result<(), ApiError> {
        let mut text = Vec::new();
        for e in entries {
            let line = Line {
                member_id: member,
                entry_id: &e.id,
                kind: kind_name(e.kind),
                amount: e.amount,
                balance_after: e.balance_after,
                at_ms: e.at_ms,
                message_id: &e.message_id,
                request_id: &e.request_id,
                plan_id: &e.plan_id,
                plan_version: e.plan_version,
                cycle_index: e.cycle_index,
                note: &e.note,
            };
            serde_json::to_writer(&mut text, &line)
                .map_err(|e| ApiError::internal(format!("cannot encode an archive line: {e}")))?;
            text.push(b'\n');
        }
        let day = chrono::Utc::now().format("%Y%m%d");
        let path = self.dir.join(format!("ledger-{day}-{}.jsonl", self.writer));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(&text)?;
            file.sync_data()
        })
        .await
        .map_err(|e| ApiError::internal(format!("archive writer: {e}")))?
        .map_err(|e| {
            ApiError::unavailable(
                "ARCHIVE_UNAVAILABLE",
                format!("cannot write the ledger archive: {e}"),
            )
        })
    }

    /// Moves one member's verified entries older than the hot retention to
    /// the archive; answers how many moved.
    pub async fn compact_member(&self, credits: &Credits, member: &str) -> Result<usize, ApiError> {
        let cutoff = credits.clock().now_ms().await? - self.hot.as_millis() as i64;
        let store = credits.store();
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
            self.append(member, &old).await?;
            if !store
                .compact(member, arch.as_deref(), last, old.len())
                .await?
            {
                // Another replica compacted meanwhile; its lines stand.
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
        async move { archive.compact_once(&credits).await }
    });
}
