//! What the message archiver reads and trims in Redis (archive.rs of the
//! crate moves them): a conversation's oldest delivered messages, and the
//! conditional trim of exactly those once PostgreSQL has them.

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::state::storage::Batch;

use super::{MessagingStore, StoredMessage, keys};

/// One conversation's oldest delivered messages as the archiver read them.
#[derive(Debug, Clone)]
pub struct Oldest {
    pub conv: String,
    /// The archive position read first (`arch_seq`, "" for none).
    pub arch: String,
    /// Oldest first, with their seq.
    pub messages: Vec<(u64, StoredMessage)>,
}

impl MessagingStore {
    /// For each conversation, its archive position and its oldest delivered
    /// messages in Redis with their seq (at most `limit`), in three
    /// pipelined round trips on the bulk connection whatever the number of
    /// conversations.
    pub async fn oldest_messages(
        &self,
        convs: &[String],
        limit: usize,
    ) -> Result<Vec<Oldest>, ApiError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        // The position first: a trim between the two reads then fails its
        // check (harmless) instead of trimming what this pass did not read.
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(
                redis::cmd("HGET")
                    .arg(keys::conv(conv))
                    .arg("arch_seq")
                    .clone(),
            );
        }
        let archs: Vec<Option<String>> = self.redis.run_bulk(&batch).await?;
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(
                redis::cmd("ZRANGE")
                    .arg(keys::timeline(conv))
                    .arg(0)
                    .arg(limit.max(1) as i64 - 1)
                    .arg("WITHSCORES")
                    .clone(),
            );
        }
        let timelines: Vec<Vec<(String, u64)>> = self.redis.run_bulk(&batch).await?;
        let mut batch = Batch::new();
        for (conv, ids) in convs.iter().zip(&timelines) {
            for (id, _) in ids {
                batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, id)).clone());
            }
        }
        let mut bodies: std::vec::IntoIter<HashMap<String, String>> =
            if timelines.iter().all(Vec::is_empty) {
                Vec::new().into_iter()
            } else {
                self.redis
                    .run_bulk::<Vec<HashMap<String, String>>>(&batch)
                    .await?
                    .into_iter()
            };
        let mut out = Vec::with_capacity(convs.len());
        for ((conv, arch), ids) in convs.iter().zip(archs).zip(timelines) {
            let mut messages = Vec::with_capacity(ids.len());
            let mut whole = true;
            for (id, seq) in ids {
                let fields = bodies.next().unwrap_or_default();
                // Trimmed meanwhile by another archiver: what follows is
                // left to the next pass.
                if !whole {
                    continue;
                }
                match StoredMessage::from_fields(&id, fields) {
                    Some(message) => messages.push((seq, message)),
                    None => whole = false,
                }
            }
            out.push(Oldest {
                conv: conv.clone(),
                arch: arch.unwrap_or_default(),
                messages,
            });
        }
        Ok(out)
    }

    /// Removes each conversation's archived messages (oldest first,
    /// committed to the history store) from Redis, only if its archive
    /// position is still the one read (nobody trimmed it meanwhile); in one
    /// pipelined round trip. Answers, per conversation, whether it did.
    pub async fn trim_archived(&self, archived: &[Oldest]) -> Result<Vec<bool>, ApiError> {
        if archived.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for item in archived {
            let mut keys = vec![keys::conv(&item.conv), keys::timeline(&item.conv)];
            keys.extend(
                item.messages
                    .iter()
                    .map(|(_, m)| keys::msg(&item.conv, &m.id)),
            );
            let mut args = inmail_shared::state::storage::args();
            args.arg(&item.arch);
            for (seq, message) in &item.messages {
                args.arg(&message.id).arg(*seq);
            }
            batch.script(&self.archive_trim, &keys, args);
        }
        let done: Vec<i64> = self.redis.run_bulk(&batch).await?;
        Ok(done.into_iter().map(|d| d == 1).collect())
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
