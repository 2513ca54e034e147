//! The archived ledger in the history store (PostgreSQL; the table is
//! `migrations/V1__ledger_entries.sql`): what the archiver inserts and what
//! ListLedgerEntries reads past Redis's hot window.

use inmail_shared::ApiError;
use inmail_shared::state::history::{History, ensure_month_partitions, unavailable};

use crate::store::{EntryKind, StoredEntry};

refinery::embed_migrations!("migrations");

/// The migrations of billing-credits' history database.
pub fn migrations() -> refinery::Runner {
    migrations::runner()
}

/// A streamed read's caller went away: the read stops.
pub fn caller_gone() -> ApiError {
    ApiError::unavailable(
        inmail_shared::contract::reasons::SHUTTING_DOWN,
        "the caller went away",
    )
}

/// billing-credits' view of the history store.
#[derive(Debug, Clone)]
pub struct LedgerHistory {
    db: History,
}

/// A stream id `<ms>-<seq>` as its two numbers.
pub fn split_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

pub fn kind_name(kind: Option<EntryKind>) -> &'static str {
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

const COLUMNS: &str = "entry_ms, entry_seq, at_ms, kind, amount, balance_after, message_id, \
                       request_id, plan_id, plan_version, cycle_index, note";

fn entry_of(row: &tokio_postgres::Row) -> StoredEntry {
    let ms: i64 = row.get(0);
    let seq: i64 = row.get(1);
    StoredEntry {
        id: format!("{ms}-{seq}"),
        at_ms: row.get(2),
        kind: EntryKind::parse(row.get(3)),
        amount: row.get(4),
        balance_after: row.get(5),
        message_id: row.get(6),
        request_id: row.get(7),
        plan_id: row.get(8),
        plan_version: row.get::<_, i64>(9) as u64,
        cycle_index: row.get::<_, i32>(10) as u32,
        note: row.get(11),
    }
}

impl LedgerHistory {
    pub fn new(db: History) -> Self {
        Self { db }
    }

    /// Inserts `entries` of `member` in one transaction, skipping those
    /// already there (a crash between this commit and the trim in Redis
    /// archives them again); answers how many were new.
    pub async fn insert(&self, member: &str, entries: &[StoredEntry]) -> Result<u64, ApiError> {
        let mut rows = Vec::with_capacity(entries.len());
        for e in entries {
            let (ms, seq) = split_id(&e.id)
                .ok_or_else(|| ApiError::internal(format!("ledger entry id {:?}", e.id)))?;
            rows.push((ms, seq, e));
        }
        let mut conn = self.db.connection().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        // Each month's partition exists before its first row.
        ensure_month_partitions(&tx, "ledger_entries", rows.iter().map(|(ms, _, _)| *ms)).await?;
        let col = |f: &dyn Fn(&(i64, i64, &StoredEntry)) -> i64| -> Vec<i64> {
            rows.iter().map(f).collect()
        };
        let text = |f: &dyn Fn(&StoredEntry) -> String| -> Vec<String> {
            rows.iter().map(|(_, _, e)| f(e)).collect()
        };
        let ms = col(&|r| r.0);
        let seq = col(&|r| r.1);
        let at = col(&|r| r.2.at_ms);
        let amount = col(&|r| r.2.amount);
        let balance = col(&|r| r.2.balance_after);
        let version = col(&|r| r.2.plan_version as i64);
        let cycle: Vec<i32> = rows.iter().map(|r| r.2.cycle_index as i32).collect();
        let kind = text(&|e| kind_name(e.kind).to_string());
        let message = text(&|e| e.message_id.clone());
        let request = text(&|e| e.request_id.clone());
        let plan = text(&|e| e.plan_id.clone());
        let note = text(&|e| e.note.clone());
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO ledger_entries (member_id, {COLUMNS}) \
                     SELECT $1, * FROM UNNEST($2::int8[], $3::int8[], $4::int8[], $5::text[], \
                     $6::int8[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::int8[], \
                     $12::int4[], $13::text[]) \
                     ON CONFLICT DO NOTHING"
                ),
                &[
                    &member, &ms, &seq, &at, &kind, &amount, &balance, &message, &request, &plan,
                    &version, &cycle, &note,
                ],
            )
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(inserted)
    }

    /// A member's archived entries newest first, strictly before the stream
    /// id `before` when given; at most `limit`.
    pub async fn page(
        &self,
        member: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, ApiError> {
        let (ms, seq) = match before {
            Some(id) => {
                split_id(id).ok_or_else(|| ApiError::internal(format!("ledger cursor {id:?}")))?
            }
            None => (i64::MAX, i64::MAX),
        };
        let conn = self.db.connection().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM ledger_entries \
                     WHERE member_id = $1 AND (entry_ms, entry_seq) < ($2, $3) \
                     ORDER BY entry_ms DESC, entry_seq DESC LIMIT $4"
                ),
                &[&member, &ms, &seq, &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(entry_of).collect())
    }
}

impl LedgerHistory {
    /// A member's archived entries whose time is in `[start_ms, end_ms)`,
    /// oldest first, after the stream id `after` and before `before` when
    /// given; at most `limit`.
    pub async fn range(
        &self,
        member: &str,
        after: Option<&str>,
        before: Option<&str>,
        (start_ms, end_ms): (i64, i64),
        limit: usize,
    ) -> Result<Vec<StoredEntry>, ApiError> {
        let cursor = |id: Option<&str>, none: (i64, i64)| match id {
            Some(id) => {
                split_id(id).ok_or_else(|| ApiError::internal(format!("ledger cursor {id:?}")))
            }
            None => Ok(none),
        };
        let (after_ms, after_seq) = cursor(after, (-1, -1))?;
        let (before_ms, before_seq) = cursor(before, (i64::MAX, i64::MAX))?;
        let conn = self.db.connection().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM ledger_entries \
                     WHERE member_id = $1 AND at_ms >= $2 AND at_ms < $3 \
                     AND (entry_ms, entry_seq) > ($4, $5) AND (entry_ms, entry_seq) < ($6, $7) \
                     ORDER BY entry_ms, entry_seq LIMIT $8"
                ),
                &[
                    &member,
                    &start_ms,
                    &end_ms,
                    &after_ms,
                    &after_seq,
                    &before_ms,
                    &before_seq,
                    &(limit as i64),
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(entry_of).collect())
    }

    /// Every archived entry whose time is in `[start_ms, end_ms)` (of
    /// `member` only, when given) that `skip` does not name, sent to `out`
    /// as (member, entry) in member and ledger order, streamed from
    /// PostgreSQL without holding them in memory; answers how many.
    pub async fn export(
        &self,
        member: Option<&str>,
        (start_ms, end_ms): (i64, i64),
        skip: impl Fn(&str, &StoredEntry) -> bool,
        out: &tokio::sync::mpsc::Sender<(String, StoredEntry)>,
    ) -> Result<u64, ApiError> {
        use tonic::codegen::tokio_stream::StreamExt;
        let conn = self.db.connection().await?;
        // One long streamed query: DATABASE_TIMEOUT bounds the service's
        // statements, not an audit export. The setting is the session's:
        // the connection is not returned to the pool with it.
        conn.batch_execute("SET statement_timeout = 0")
            .await
            .map_err(unavailable)?;
        let conn = deadpool_postgres::Object::take(conn);
        let member = member.map(str::to_string);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&member, &start_ms, &end_ms];
        let rows = conn
            .query_raw(
                &format!(
                    "SELECT {COLUMNS}, member_id FROM ledger_entries \
                     WHERE ($1::text IS NULL OR member_id = $1) AND at_ms >= $2 AND at_ms < $3 \
                     ORDER BY member_id, entry_ms, entry_seq"
                ),
                params,
            )
            .await
            .map_err(unavailable)?;
        let mut rows = std::pin::pin!(rows);
        let mut count = 0;
        while let Some(row) = rows.next().await {
            let row = row.map_err(unavailable)?;
            let member: String = row.get(12);
            let entry = entry_of(&row);
            if skip(&member, &entry) {
                continue;
            }
            out.send((member, entry)).await.map_err(|_| caller_gone())?;
            count += 1;
        }
        Ok(count)
    }

    /// One archived entry of a member by its id.
    pub async fn entry(&self, member: &str, id: &str) -> Result<Option<StoredEntry>, ApiError> {
        let (ms, seq) =
            split_id(id).ok_or_else(|| ApiError::internal(format!("ledger entry id {id:?}")))?;
        let conn = self.db.connection().await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM ledger_entries \
                     WHERE member_id = $1 AND entry_ms = $2 AND entry_seq = $3"
                ),
                &[&member, &ms, &seq],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(entry_of))
    }

    /// A member's newest archived entry whose time is before `before_ms`.
    pub async fn last_before(
        &self,
        member: &str,
        before_ms: i64,
    ) -> Result<Option<StoredEntry>, ApiError> {
        let conn = self.db.connection().await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM ledger_entries WHERE member_id = $1 AND at_ms < $2 \
                     ORDER BY at_ms DESC, entry_ms DESC, entry_seq DESC LIMIT 1"
                ),
                &[&member, &before_ms],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(entry_of))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_split_in_two() {
        assert_eq!(split_id("17-3"), Some((17, 3)));
        assert_eq!(split_id("17"), None);
    }
}
