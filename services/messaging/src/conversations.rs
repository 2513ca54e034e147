//! Reading conversations: a member's inbox, one conversation, its messages.

use inmail_shared::ApiError;

use crate::send::Messaging;
use inmail_shared::state::history::History;

use crate::store::{ConversationRecord, StoredMessage, Tail};

/// A conversation as shown: its record and its last message.
pub type Shown = (ConversationRecord, Option<StoredMessage>);

impl Messaging {
    /// The conversations named, in order, leaving out pairs with no
    /// delivered message (only a connection, a block or a staged InMail: not
    /// a conversation yet; also an inbox entry written just before a
    /// delivery that did not happen).
    pub async fn conversations(&self, convs: &[String]) -> Result<Vec<(String, Shown)>, ApiError> {
        let mut details = self.store().conversations_with_last(convs).await?;
        // Last messages archived since: from the history store, in one query.
        let missing: Vec<(&str, &str)> = convs
            .iter()
            .zip(&details)
            .filter_map(
                |(conv, (record, last))| match (&record.last_message_id, last) {
                    (Some(id), None) => Some((conv.as_str(), id.as_str())),
                    _ => None,
                },
            )
            .collect();
        if !missing.is_empty()
            && let Some(history) = &self.history
        {
            let mut found = history.messages(&missing).await?;
            for (conv, (record, last)) in convs.iter().zip(details.iter_mut()) {
                if last.is_none()
                    && let Some(id) = &record.last_message_id
                {
                    *last = found.remove(&(conv.clone(), id.clone()));
                }
            }
        }
        Ok(convs
            .iter()
            .cloned()
            .zip(details)
            .filter(|(_, (record, _))| record.last_message_id.is_some())
            .collect())
    }

    /// One conversation, if it has a delivered message.
    pub async fn conversation(&self, conv: &str) -> Result<Option<Shown>, ApiError> {
        Ok(self
            .conversations(&[conv.to_string()])
            .await?
            .pop()
            .map(|(_, shown)| shown))
    }

    /// One message, wherever it now lives: Redis, or the history store once
    /// archived.
    pub async fn message(
        &self,
        conv: &str,
        message_id: &str,
    ) -> Result<Option<StoredMessage>, ApiError> {
        if let Some(message) = self.store().message(conv, message_id).await? {
            return Ok(Some(message));
        }
        let Some(history) = &self.history else {
            return Ok(None);
        };
        Ok(history
            .messages(&[(conv, message_id)])
            .await?
            .remove(&(conv.to_string(), message_id.to_string())))
    }

    /// Delivered messages newest first, before `before_seq`: at most
    /// `size`, within the page byte budget; and whether more follow. Redis
    /// first, then the history store before the oldest seq Redis holds.
    /// While the history store is down, a page Redis began ends where Redis
    /// does (its token leads on into the archive); one that needs the
    /// archive alone answers `UNAVAILABLE` (`HISTORY_UNAVAILABLE`).
    pub async fn messages(
        &self,
        conv: &str,
        before_seq: Option<u64>,
        size: usize,
    ) -> Result<(Vec<(u64, StoredMessage)>, bool), ApiError> {
        let budget = self.config.page_bytes;
        let (mut page, tail) = self
            .store()
            .messages_page(conv, before_seq, size, budget)
            .await?;
        let before_seq = match tail {
            Tail::End => return Ok((page, false)),
            Tail::More => return Ok((page, true)),
            Tail::Archived { before_seq } => before_seq,
        };
        let Some(history) = &self.history else {
            return Ok((page, false));
        };
        if page.len() >= size {
            return Ok((page, true));
        }
        let used: usize = page.iter().map(|(_, m)| m.wire_size()).sum();
        match history
            .page(conv, Some(before_seq), size - page.len(), (used, budget))
            .await
        {
            Ok((older, more)) => {
                page.extend(older);
                Ok((page, more))
            }
            Err(e) if History::is_unavailable(&e) && !page.is_empty() => Ok((page, true)),
            Err(e) => Err(e),
        }
    }
}
