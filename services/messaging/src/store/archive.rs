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
    /// Oldest first, with their seq: those sent before the cutoff.
    pub messages: Vec<(u64, StoredMessage)>,
    /// Whether older-than-cutoff messages may follow these (a full step).
    pub more: bool,
}

/// (conversation, message id) of every id read, in order.
fn flatten(convs: &[String], ids: &[Vec<(String, u64)>]) -> Vec<(String, String)> {
    convs
        .iter()
        .zip(ids)
        .flat_map(|(conv, ids)| ids.iter().map(|(id, _)| (conv.clone(), id.clone())))
        .collect()
}

impl MessagingStore {
    /// For each conversation whose oldest message in Redis was sent before
    /// `cutoff_ms`: its archive position and its oldest delivered messages
    /// sent before the cutoff, with their seq (at most `limit` of one
    /// conversation and `budget` in all, a prefix in seq order: it stops at
    /// the first younger one). Pipelined on the bulk
    /// connection; a conversation with nothing to archive costs three cheap
    /// commands (its position, its oldest id, that message's time), and only
    /// the messages that move are read whole.
    pub async fn oldest_messages(
        &self,
        convs: &[String],
        (limit, budget): (usize, usize),
        cutoff_ms: i64,
    ) -> Result<Vec<Oldest>, ApiError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        // The position first: a trim between it and the reads below then
        // fails its check (harmless) instead of trimming what this pass did
        // not read.
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(
                redis::cmd("HGET")
                    .arg(keys::conv(conv))
                    .arg("arch_seq")
                    .clone(),
            );
        }
        let archs: Vec<Option<String>> = self.redis.read_bulk(&batch).await?;
        let oldest_ids = self.timeline_heads(convs, 1).await?;
        let times = self.sent_times(&flatten(convs, &oldest_ids)).await?;
        let mut times = times.into_iter();
        let mut due = Vec::new();
        for ((conv, arch), ids) in convs.iter().zip(archs).zip(&oldest_ids) {
            if ids.is_empty() {
                continue;
            }
            if times.next().flatten().is_some_and(|at| at < cutoff_ms) {
                due.push((conv.clone(), arch.unwrap_or_default()));
            }
        }
        if due.is_empty() {
            return Ok(Vec::new());
        }
        // At most `budget` messages read in all (a step's pipelines stay
        // small: other calls share the bulk connection), and as many from
        // each conversation.
        let limit = (budget / due.len()).clamp(1, limit.max(1));
        let due_convs: Vec<String> = due.iter().map(|(c, _)| c.clone()).collect();
        let heads = self.timeline_heads(&due_convs, limit).await?;
        let times = self.sent_times(&flatten(&due_convs, &heads)).await?;
        // Each conversation's prefix sent before the cutoff.
        let mut times = times.into_iter();
        let mut prefixes = Vec::with_capacity(heads.len());
        for ids in heads {
            let read = ids.len();
            let mut prefix = Vec::new();
            let mut open = true;
            for (id, seq) in ids {
                let at = times.next().flatten();
                if open && at.is_some_and(|at| at < cutoff_ms) {
                    prefix.push((id, seq));
                } else {
                    open = false;
                }
            }
            let more = prefix.len() == read && read == limit;
            prefixes.push((prefix, more));
        }
        let mut batch = Batch::new();
        for (conv, (prefix, _)) in due_convs.iter().zip(&prefixes) {
            for (id, _) in prefix {
                batch.add(redis::cmd("HGETALL").arg(keys::msg(conv, id)).clone());
            }
        }
        let mut bodies = if prefixes.iter().all(|(p, _)| p.is_empty()) {
            Vec::new().into_iter()
        } else {
            self.redis
                .read_bulk::<Vec<HashMap<String, String>>>(&batch)
                .await?
                .into_iter()
        };
        let mut out = Vec::with_capacity(due.len());
        for ((conv, arch), (prefix, more)) in due.into_iter().zip(prefixes) {
            let mut messages = Vec::with_capacity(prefix.len());
            let mut whole = true;
            for (id, seq) in prefix {
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
            if !messages.is_empty() {
                out.push(Oldest {
                    conv,
                    arch,
                    messages,
                    more: more && whole,
                });
            }
        }
        Ok(out)
    }

    /// The first `count` ids of each conversation's timeline, with their seq.
    async fn timeline_heads(
        &self,
        convs: &[String],
        count: usize,
    ) -> Result<Vec<Vec<(String, u64)>>, ApiError> {
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(
                redis::cmd("ZRANGE")
                    .arg(keys::timeline(conv))
                    .arg(0)
                    .arg(count.max(1) as i64 - 1)
                    .arg("WITHSCORES")
                    .clone(),
            );
        }
        self.redis.read_bulk(&batch).await
    }

    /// When each (conversation, message id) was sent (`None`: gone).
    async fn sent_times(
        &self,
        messages: &[(String, String)],
    ) -> Result<Vec<Option<i64>>, ApiError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for (conv, id) in messages {
            batch.add(
                redis::cmd("HGET")
                    .arg(keys::msg(conv, id))
                    .arg("at")
                    .clone(),
            );
        }
        self.redis.read_bulk(&batch).await
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
