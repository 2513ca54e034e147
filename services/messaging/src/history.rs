//! Archived messages in the history store (PostgreSQL; the table is
//! `migrations/V1__messages.sql`): what the archiver inserts, and what
//! ListMessages, a conversation's last message and a retried send read
//! once a message has left Redis.

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::state::history::{History, ensure_month_partitions, unavailable};

use crate::domain::Kind;
use crate::store::{MessageState, Oldest, StoredMessage};

refinery::embed_migrations!("migrations");

/// The migrations of messaging's history database.
pub fn migrations() -> refinery::Runner {
    migrations::runner()
}

/// messaging's view of the history store.
#[derive(Debug, Clone)]
pub struct MessageHistory {
    db: History,
}

const COLUMNS: &str = "seq, message_id, sender_id, recipient_id, kind, subject, body, credits, \
                       sent_at_ms, balance_after, fingerprint";

fn message_of(row: &tokio_postgres::Row) -> Result<(u64, StoredMessage), ApiError> {
    let kind: &str = row.get(4);
    let message = StoredMessage {
        id: row.get(1),
        from: row.get(2),
        to: row.get(3),
        kind: Kind::parse(kind)
            .ok_or_else(|| ApiError::internal(format!("archived message of kind {kind:?}")))?,
        subject: row.get(5),
        body: row.get(6),
        credits: row.get(7),
        at_ms: row.get(8),
        state: MessageState::Delivered,
        reason: None,
        balance_after: row.get(9),
        fingerprint: row.get(10),
    };
    Ok((row.get::<_, i64>(0) as u64, message))
}

impl MessageHistory {
    pub fn new(db: History) -> Self {
        Self { db }
    }

    /// Inserts the delivered messages (with their seq) of every
    /// conversation in `batch` in one transaction, skipping those already
    /// there (a crash between this commit and the trim in Redis archives
    /// them again); answers how many were new.
    pub async fn insert(&self, batch: &[Oldest]) -> Result<u64, ApiError> {
        let rows: Vec<(&str, u64, &StoredMessage)> = batch
            .iter()
            .flat_map(|o| o.messages.iter().map(|(seq, m)| (o.conv.as_str(), *seq, m)))
            .collect();
        if rows.is_empty() {
            return Ok(0);
        }
        let mut conn = self.db.connection().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        ensure_month_partitions(&tx, "messages", rows.iter().map(|(_, _, m)| m.at_ms)).await?;
        let text = |f: &dyn Fn(&StoredMessage) -> &str| -> Vec<&str> {
            rows.iter().map(|(_, _, m)| f(m)).collect()
        };
        let conv: Vec<&str> = rows.iter().map(|(c, _, _)| *c).collect();
        let seq: Vec<i64> = rows.iter().map(|(_, s, _)| *s as i64).collect();
        let at: Vec<i64> = rows.iter().map(|(_, _, m)| m.at_ms).collect();
        let credits: Vec<i32> = rows.iter().map(|(_, _, m)| m.credits).collect();
        let balance: Vec<Option<i64>> = rows.iter().map(|(_, _, m)| m.balance_after).collect();
        let (id, from, to) = (text(&|m| &m.id), text(&|m| &m.from), text(&|m| &m.to));
        let kind = text(&|m| m.kind.as_str());
        let (subject, body) = (text(&|m| &m.subject), text(&|m| &m.body));
        let fingerprint = text(&|m| &m.fingerprint);
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO messages (conversation_id, {COLUMNS}) \
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], \
                     $5::text[], $6::text[], $7::text[], $8::text[], $9::int4[], $10::int8[], \
                     $11::int8[], $12::text[]) \
                     ON CONFLICT DO NOTHING"
                ),
                &[
                    &conv,
                    &seq,
                    &id,
                    &from,
                    &to,
                    &kind,
                    &subject,
                    &body,
                    &credits,
                    &at,
                    &balance,
                    &fingerprint,
                ],
            )
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(inserted)
    }

    /// A conversation's archived messages newest first, before `before_seq`
    /// when given: at most `limit`, and no more than `byte_budget` bytes of
    /// them (at least one; `budget_used` already spent by the page).
    /// Answers whether more follow.
    pub async fn page(
        &self,
        conv: &str,
        before_seq: Option<u64>,
        limit: usize,
        (budget_used, byte_budget): (usize, usize),
    ) -> Result<(Vec<(u64, StoredMessage)>, bool), ApiError> {
        let before = before_seq.map_or(i64::MAX, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let conn = self.db.connection().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM messages WHERE conversation_id = $1 AND seq < $2 \
                     ORDER BY seq DESC LIMIT $3"
                ),
                &[&conv, &before, &(limit as i64 + 1)],
            )
            .await
            .map_err(unavailable)?;
        let mut page = Vec::new();
        let mut bytes = budget_used;
        for row in rows.iter().take(limit) {
            let (seq, message) = message_of(row)?;
            let size = message.wire_size();
            if (budget_used > 0 || !page.is_empty()) && bytes + size > byte_budget {
                return Ok((page, true));
            }
            bytes += size;
            page.push((seq, message));
        }
        Ok((page, rows.len() > limit))
    }

    /// Archived messages by (conversation, message id); those not archived
    /// are absent from the answer.
    pub async fn messages(
        &self,
        wanted: &[(&str, &str)],
    ) -> Result<HashMap<(String, String), StoredMessage>, ApiError> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let convs: Vec<&str> = wanted.iter().map(|(c, _)| *c).collect();
        let ids: Vec<&str> = wanted.iter().map(|(_, id)| *id).collect();
        let conn = self.db.connection().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS}, conversation_id FROM messages \
                     WHERE (conversation_id, message_id) IN \
                     (SELECT * FROM UNNEST($1::text[], $2::text[]))"
                ),
                &[&convs, &ids],
            )
            .await
            .map_err(unavailable)?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in &rows {
            let (_, message) = message_of(row)?;
            let conv: String = row.get(11);
            found.insert((conv, message.id.clone()), message);
        }
        Ok(found)
    }
}
