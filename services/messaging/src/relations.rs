//! Connections, blocks and InMail preferences: who may reach whom before any
//! message is sent (README.md, "How it behaves").

use inmail_shared::ApiError;

use crate::domain;
use crate::error::SendFailure;
use crate::send::Messaging;
use crate::store::{Connected, keys};

/// A page of one member's list, newest first.
pub struct Page {
    /// (other member, since ms).
    pub rows: Vec<(String, i64)>,
    /// The cursor `(score, member)` of the last row when there is more.
    pub next: Option<(i64, String)>,
}

/// Which of a member's lists to read.
#[derive(Debug, Clone, Copy)]
pub enum MemberList {
    Connections,
    Blocked,
    Inbox,
}

impl Messaging {
    /// Connects two members; answers since when they are connected.
    pub async fn connect(&self, me: &str, other: &str) -> Result<i64, ApiError> {
        let conv = domain::conversation_id(me, other);
        let (a, b) = domain::sorted(me, other);
        let now = self.clock().now_ms().await?;
        let since = match self.store().connect(&conv, a, b, now).await? {
            Connected::Ok { since } => since,
            Connected::Refused { reason } => return Err(SendFailure::from(reason).error()),
        };
        self.store().index_connection(me, other, since).await?;
        Ok(since)
    }

    /// Disconnects two members; answers whether they were connected.
    pub async fn disconnect(&self, me: &str, other: &str) -> Result<bool, ApiError> {
        let conv = domain::conversation_id(me, other);
        self.store().disconnect(&conv, me, other).await
    }

    /// `me` blocks `other` (which also disconnects them); answers since when.
    pub async fn block(&self, me: &str, other: &str) -> Result<i64, ApiError> {
        let conv = domain::conversation_id(me, other);
        let (a, b) = domain::sorted(me, other);
        let now = self.clock().now_ms().await?;
        self.store().block(&conv, a, b, me, other, now).await
    }

    /// Lifts `me`'s block of `other`; answers whether there was one.
    pub async fn unblock(&self, me: &str, other: &str) -> Result<bool, ApiError> {
        let conv = domain::conversation_id(me, other);
        let (a, _) = domain::sorted(me, other);
        self.store().unblock(&conv, a, me, other).await
    }

    pub async fn set_accepts_inmail(&self, member: &str, accept: bool) -> Result<(), ApiError> {
        self.store().set_accepts_inmail(member, accept).await
    }

    pub async fn accepts_inmail(&self, member: &str) -> Result<bool, ApiError> {
        self.store().accepts_inmail(member).await
    }

    /// A page of one of `member`'s lists after `after` (a cursor of a page
    /// before).
    pub async fn member_list(
        &self,
        member: &str,
        list: MemberList,
        after: Option<(i64, &str)>,
        size: usize,
    ) -> Result<Page, ApiError> {
        let key = match list {
            MemberList::Connections => keys::connections(member),
            MemberList::Blocked => keys::blocked(member),
            MemberList::Inbox => keys::inbox(member),
        };
        let mut rows = self.store().index_page(&key, after, size).await?;
        let next = if rows.len() > size {
            rows.truncate(size);
            rows.last().map(|(m, score)| (*score, m.clone()))
        } else {
            None
        };
        Ok(Page { rows, next })
    }
}
