//! What the message archiver reads and trims in Redis (archive.rs of the
//! crate moves them): a conversation's oldest delivered messages, and the
//! conditional trim of exactly those once PostgreSQL has them.

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::state::storage::Batch;

use super::{MessagingStore, StoredMessage, keys};

impl MessagingStore {
    /// A conversation's archive position (`arch_seq`, "" for none) and its
    /// oldest delivered messages in Redis with their seq, at most `limit`,
    /// oldest first.
    pub async fn oldest_messages(
        &self,
        conv: &str,
        limit: usize,
    ) -> Result<(String, Vec<(u64, StoredMessage)>), ApiError> {
        let arch: Option<String> = redis::cmd("HGET")
            .arg(keys::conv(conv))
            .arg("arch_seq")
            .query_async(&mut self.redis.conn())
            .await?;
        let ids: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(keys::timeline(conv))
            .arg(0)
            .arg(limit.max(1) as i64 - 1)
            .arg("WITHSCORES")
            .query_async(&mut self.redis.bulk())
            .await?;
        let mut batch = Batch::new();
        for (id, _) in &ids {
            batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, id)).clone());
        }
        let bodies: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            self.redis.run_bulk(&batch).await?
        };
        let mut oldest = Vec::with_capacity(ids.len());
        for ((id, seq), fields) in ids.into_iter().zip(bodies) {
            // Trimmed meanwhile by another archiver: what follows is newer
            // than what this pass may move in one step.
            let Some(message) = StoredMessage::from_fields(&id, fields) else {
                break;
            };
            oldest.push((seq, message));
        }
        Ok((arch.unwrap_or_default(), oldest))
    }

    /// Removes `archived` (oldest first, committed to the history store)
    /// from Redis, only if the conversation's archive position is still
    /// `arch` (nobody trimmed it meanwhile); answers whether it did.
    pub async fn trim_archived(
        &self,
        conv: &str,
        arch: &str,
        archived: &[(u64, StoredMessage)],
    ) -> Result<bool, ApiError> {
        let mut call = self.archive_trim.prepare_invoke();
        call.key(keys::conv(conv)).key(keys::timeline(conv));
        for (_, message) in archived {
            call.key(keys::msg(conv, &message.id));
        }
        call.arg(arch);
        for (seq, message) in archived {
            call.arg(&message.id).arg(*seq);
        }
        let done: i64 = call.invoke_async(&mut self.redis.conn()).await?;
        Ok(done == 1)
    }

    /// One step over every conversation with messages in Redis (SCAN; on a
    /// cluster, node after node): (next cursor, "0" when done;
    /// conversations).
    pub async fn scan_conversations(
        &self,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<String>), ApiError> {
        let (next, found) = self
            .redis
            .scan(cursor, keys::TIMELINE_PATTERN, count)
            .await?;
        let convs = found
            .iter()
            .filter_map(|key| keys::conv_of_timeline(key).map(str::to_string))
            .collect();
        Ok((next, convs))
    }
}
