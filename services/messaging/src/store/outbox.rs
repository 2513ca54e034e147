//! The outbox: sends and refunds a process must finish, indexed in
//! [`keys::OUTBOX_SHARDS`](super::keys::OUTBOX_SHARDS) sorted sets by when to
//! look at them, so the sweeper finishes them if that process dies.

use inmail_shared::ApiError;
use inmail_shared::state::storage::Batch;
use inmail_shared::state::sweep::forget_unchanged;

use super::{MessageState, MessagingStore, keys};

/// Work the sweeper finishes if the process handling it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxItem {
    /// A staged InMail: deliver it or give it up, by its debit's state.
    Send {
        conv: String,
        message_id: String,
        sender: String,
    },
    /// An InMail's refund that is due.
    Refund {
        conv: String,
        inmail_id: String,
        sender: String,
    },
    /// A message being delivered whose inbox events are not appended yet:
    /// appended by the sweeper if the message was delivered (the process
    /// died between the two steps), dropped otherwise.
    Events {
        conv: String,
        message_id: String,
        sender: String,
    },
}

impl OutboxItem {
    /// As stored: `send|conv|id|sender`, `refund|conv|id|sender` or
    /// `events|conv|id|sender` (ids and member ids contain no '|').
    pub fn encode(&self) -> String {
        match self {
            Self::Send {
                conv,
                message_id,
                sender,
            } => format!("send|{conv}|{message_id}|{sender}"),
            Self::Refund {
                conv,
                inmail_id,
                sender,
            } => format!("refund|{conv}|{inmail_id}|{sender}"),
            Self::Events {
                conv,
                message_id,
                sender,
            } => format!("events|{conv}|{message_id}|{sender}"),
        }
    }

    pub fn decode(value: &str) -> Option<Self> {
        let mut parts = value.split('|');
        let (kind, conv, id, sender) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let (conv, id, sender) = (conv.to_string(), id.to_string(), sender.to_string());
        match kind {
            "send" => Some(Self::Send {
                conv,
                message_id: id,
                sender,
            }),
            "refund" => Some(Self::Refund {
                conv,
                inmail_id: id,
                sender,
            }),
            "events" => Some(Self::Events {
                conv,
                message_id: id,
                sender,
            }),
            _ => None,
        }
    }

    pub fn conv(&self) -> &str {
        match self {
            Self::Send { conv, .. } | Self::Refund { conv, .. } | Self::Events { conv, .. } => conv,
        }
    }
}

impl MessagingStore {
    pub async fn outbox_add(&self, item: &OutboxItem, at_ms: i64) -> Result<(), ApiError> {
        let shard = keys::outbox(keys::outbox_shard_of(item.conv()));
        let _: () = redis::cmd("ZADD")
            .arg(&shard)
            .arg(at_ms)
            .arg(item.encode())
            .query_async(&mut self.redis.conn())
            .await?;
        self.redis.acknowledge(&[&shard]).await
    }

    pub async fn outbox_remove(&self, item: &OutboxItem) -> Result<(), ApiError> {
        let _: () = redis::cmd("ZREM")
            .arg(keys::outbox(keys::outbox_shard_of(item.conv())))
            .arg(item.encode())
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Drops finished items (with the time they were due, as read) of one
    /// outbox shard, each only while it is still due then: an item a retry
    /// added again meanwhile stays.
    pub async fn outbox_remove_many(
        &self,
        shard: u32,
        items: &[(OutboxItem, i64)],
    ) -> Result<(), ApiError> {
        let entries: Vec<(String, i64)> = items
            .iter()
            .map(|(item, due)| (item.encode(), *due))
            .collect();
        forget_unchanged(&self.redis, &keys::outbox(shard), &entries).await?;
        Ok(())
    }

    /// For each item, the state of the message a send item names (refund
    /// items: `None`), in one round trip.
    pub async fn outbox_states(
        &self,
        items: &[OutboxItem],
    ) -> Result<Vec<Option<MessageState>>, ApiError> {
        let mut batch = Batch::new();
        for item in items {
            let cmd = match item {
                OutboxItem::Send {
                    conv, message_id, ..
                }
                | OutboxItem::Events {
                    conv, message_id, ..
                } => redis::cmd("HGET")
                    .arg(keys::msg(conv, message_id))
                    .arg("state")
                    .clone(),
                OutboxItem::Refund { conv, .. } => {
                    redis::cmd("HGET").arg(keys::conv(conv)).arg("-").clone()
                }
            };
            batch.add(cmd);
        }
        let states: Vec<Option<String>> = self.redis.run(&batch).await?;
        Ok(states
            .into_iter()
            .map(|s| s.as_deref().and_then(MessageState::parse))
            .collect())
    }

    /// Outbox items due at `now_ms`, with when each was due.
    pub async fn outbox_due(
        &self,
        shard: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(OutboxItem, i64)>, ApiError> {
        let raw: Vec<(String, i64)> = redis::cmd("ZRANGE")
            .arg(keys::outbox(shard))
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(raw
            .iter()
            .filter_map(|(v, due)| OutboxItem::decode(v).map(|item| (item, *due)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_items_round_trip() {
        for item in [
            OutboxItem::Send {
                conv: "a~b".into(),
                message_id: "m-1".into(),
                sender: "a".into(),
            },
            OutboxItem::Refund {
                conv: "a~b".into(),
                inmail_id: "m-2".into(),
                sender: "b".into(),
            },
            OutboxItem::Events {
                conv: "a~b".into(),
                message_id: "m-3".into(),
                sender: "a".into(),
            },
        ] {
            assert_eq!(OutboxItem::decode(&item.encode()), Some(item));
        }
        assert_eq!(OutboxItem::decode("bogus|x"), None);
    }
}
