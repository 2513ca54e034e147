//! Reading conversations: a member's inbox, one conversation, its messages.

use inmail_shared::ApiError;

use crate::send::Messaging;
use crate::store::{ConversationRecord, StoredMessage};

/// A conversation as shown: its record and its last message.
pub type Shown = (ConversationRecord, Option<StoredMessage>);

impl Messaging {
    /// The conversations named, in order, leaving out pairs with no
    /// delivered message (only a connection, a block or a staged InMail: not
    /// a conversation yet; also an inbox entry written just before a
    /// delivery that did not happen).
    pub async fn conversations(&self, convs: &[String]) -> Result<Vec<(String, Shown)>, ApiError> {
        let details = self.store().conversations_with_last(convs).await?;
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

    /// Delivered messages newest first, before `before_seq`: at most
    /// `size`, within the page byte budget; and whether more follow.
    pub async fn messages(
        &self,
        conv: &str,
        before_seq: Option<u64>,
        size: usize,
    ) -> Result<(Vec<(u64, StoredMessage)>, bool), ApiError> {
        self.store()
            .messages_page(conv, before_seq, size, self.config.page_bytes)
            .await
    }
}
