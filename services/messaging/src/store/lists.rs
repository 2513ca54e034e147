//! Reading conversations, messages and members' lists.

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::state::storage::Batch;

use super::{ConversationRecord, MessagingStore, StoredMessage, keys};

/// What follows a page of messages read from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Nothing: the conversation's first message is on the page (or it has
    /// none).
    End,
    /// More messages in Redis.
    More,
    /// Older messages, if any, are in the history store, before this seq.
    Archived { before_seq: u64 },
}

impl MessagingStore {
    pub async fn conversation(&self, conv: &str) -> Result<ConversationRecord, ApiError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::conv(conv))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(ConversationRecord::from_fields(&fields))
    }

    pub async fn message(
        &self,
        conv: &str,
        message_id: &str,
    ) -> Result<Option<StoredMessage>, ApiError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::msg(conv, message_id))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(StoredMessage::from_fields(message_id, fields))
    }

    /// Conversations with their last messages, in two round trips.
    pub async fn conversations_with_last(
        &self,
        convs: &[String],
    ) -> Result<Vec<(ConversationRecord, Option<StoredMessage>)>, ApiError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(redis::cmd("HGETALL").arg(keys::conv(conv)).clone());
        }
        let pairs: Vec<HashMap<String, String>> = self.redis.read_bulk(&batch).await?;
        let records: Vec<ConversationRecord> =
            pairs.iter().map(ConversationRecord::from_fields).collect();
        let mut batch = Batch::new();
        for (conv, record) in convs.iter().zip(&records) {
            let last = record.last_message_id.as_deref().unwrap_or("-");
            batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, last)).clone());
        }
        let lasts: Vec<HashMap<String, String>> = self.redis.read_bulk(&batch).await?;
        Ok(records
            .into_iter()
            .zip(lasts)
            .map(|(record, last)| {
                let id = record.last_message_id.clone().unwrap_or_default();
                (record, StoredMessage::from_fields(&id, last))
            })
            .collect())
    }

    /// Delivered messages in Redis newest first, before `before_seq` when
    /// given: at most `limit`, and no more than `byte_budget` bytes of them
    /// (at least one); and what follows them ([`Tail`]). Bodies are read a
    /// few at a time, so a page of large messages never reads more than it
    /// answers.
    pub async fn messages_page(
        &self,
        conv: &str,
        before_seq: Option<u64>,
        limit: usize,
        byte_budget: usize,
    ) -> Result<(Vec<(u64, StoredMessage)>, Tail), ApiError> {
        const CHUNK: usize = 16;
        let max = before_seq.map_or("+inf".to_string(), |s| format!("({s}"));
        let ids: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(keys::timeline(conv))
            .arg(max)
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .arg("WITHSCORES")
            .query_async(&mut self.redis.bulk())
            .await?;
        let mut page = Vec::new();
        let mut bytes = 0;
        for chunk in ids[..ids.len().min(limit)].chunks(CHUNK) {
            let mut batch = Batch::new();
            for (id, _) in chunk {
                batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, id)).clone());
            }
            let bodies: Vec<HashMap<String, String>> = self.redis.read_bulk(&batch).await?;
            for ((id, seq), fields) in chunk.iter().zip(bodies) {
                let Some(message) = StoredMessage::from_fields(id, fields) else {
                    // Archived since the timeline was read: this message and
                    // every older one are in the history store.
                    return Ok((
                        page,
                        Tail::Archived {
                            before_seq: seq + 1,
                        },
                    ));
                };
                let size = message.wire_size();
                if !page.is_empty() && bytes + size > byte_budget {
                    return Ok((page, Tail::More));
                }
                bytes += size;
                page.push((*seq, message));
            }
        }
        if ids.len() > limit {
            return Ok((page, Tail::More));
        }
        // Redis's timeline ends here. Seqs run 1, 2, … without a gap, and
        // the archive takes the oldest first: below the oldest seq Redis
        // holds, every message is archived.
        let oldest = page.last().map(|(seq, _)| *seq).or(before_seq);
        Ok(match oldest {
            Some(seq) if seq <= 1 => (page, Tail::End),
            _ => {
                let before_seq = oldest.unwrap_or(u64::MAX);
                (page, Tail::Archived { before_seq })
            }
        })
    }

    /// A page of a member's sorted set (inbox, connections, blocks), newest
    /// first, after the cursor `(score, member)` when given. Ties on the
    /// score come in reverse member order, as Redis sorts them.
    pub async fn index_page(
        &self,
        key: &str,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, ApiError> {
        let max = after.map_or("+inf".to_string(), |(score, _)| score.to_string());
        let mut out = Vec::with_capacity(limit + 1);
        let mut skip = 0;
        loop {
            let batch: Vec<(String, i64)> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(&max)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(skip)
                .arg(limit + 1)
                .arg("WITHSCORES")
                .query_async(&mut self.redis.bulk())
                .await?;
            let fetched = batch.len();
            for (member, score) in batch {
                let seen = after.is_some_and(|(s, m)| score == s && member.as_str() >= m);
                if !seen {
                    out.push((member, score));
                }
            }
            if out.len() > limit || fetched < limit + 1 {
                out.truncate(limit + 1);
                return Ok(out);
            }
            skip += fetched;
        }
    }
}
