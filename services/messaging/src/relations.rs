//! Invitations, connections, blocks and InMail preferences: who may reach
//! whom before any message is sent (README.md, "How it behaves").

use std::time::Duration;

use inmail_shared::ApiError;

use crate::domain;
use crate::domain::SendFailure;
use crate::error::{self, connection_limit_reached, invitation_cooling_off, invitation_not_found};
use crate::send::Messaging;
use crate::store::{
    Answered, Connected, InvitationAnswer, InvitationRefusal, Invited, Reserved, keys,
};

/// A page of one member's list, newest first.
pub struct Page {
    /// (other member, since ms).
    pub rows: Vec<(String, i64)>,
    /// The pending invitations of an invitations list (`rows` empty).
    pub invitations: Vec<InvitationRow>,
    /// The cursor `(score, member)` of the last row when there is more.
    pub next: Option<(i64, String)>,
}

/// Which of a member's lists to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberList {
    Connections,
    Blocked,
    Inbox,
    InvitationsReceived,
    InvitationsSent,
}

impl MemberList {
    /// The list's name in its page tokens.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Blocked => "blocked",
            Self::Inbox => "inbox",
            Self::InvitationsReceived => "invitations-received",
            Self::InvitationsSent => "invitations-sent",
        }
    }

    fn key(self, member: &str) -> String {
        match self {
            Self::Connections => keys::connections(member),
            Self::Blocked => keys::blocked(member),
            Self::Inbox => keys::inbox(member),
            Self::InvitationsReceived => keys::invitations_received(member),
            Self::InvitationsSent => keys::invitations_sent(member),
        }
    }
}

/// What SendInvitation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvitationSent {
    /// Pending since then.
    Pending { at: i64 },
    /// The invitee had invited the sender: connected since then.
    Connected { since: i64 },
}

/// A pending invitation as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvitationRow {
    pub inviter: String,
    pub invitee: String,
    pub note: String,
    pub at_ms: i64,
}

impl Messaging {
    /// Refuses when either member has the most connections allowed.
    async fn check_connection_room(&self, me: &str, other: &str) -> Result<(), ApiError> {
        let max = self.config.invitations.max_connections;
        let (mine, theirs) = self.store().connection_counts(me, other).await?;
        if mine >= u64::from(max) {
            return Err(connection_limit_reached("this member", max));
        }
        if theirs >= u64::from(max) {
            return Err(connection_limit_reached("the other member", max));
        }
        Ok(())
    }

    /// `me` invites `other` to connect (README.md, "Invitations").
    pub async fn invite(
        &self,
        me: &str,
        other: &str,
        note: &str,
        request_id: &str,
    ) -> Result<InvitationSent, ApiError> {
        let limits = &self.config.invitations;
        let now = self.clock().now_ms().await?;
        self.check_connection_room(me, other).await?;
        let reserved = self
            .store()
            .reserve_invitation(me, other, now, limits)
            .await?;
        match reserved {
            Reserved::TooManyPending => {
                return Err(error::too_many_pending_invitations(limits.max_pending));
            }
            Reserved::RateLimited { retry_ms } => {
                return Err(error::invitation_rate_limited(Duration::from_millis(
                    retry_ms,
                )));
            }
            Reserved::Reserved | Reserved::Present => {}
        }
        let conv = domain::conversation_id(me, other);
        let pair = domain::sorted(me, other);
        let invited = self
            .store()
            .invite(&conv, pair, me, note, now, request_id)
            .await?;
        let refusal = match invited {
            Invited::Invited { at } => {
                self.store().index_invitation(me, other, at).await?;
                return Ok(InvitationSent::Pending { at });
            }
            Invited::Connected { since } => {
                self.store().unindex_invitations(me, other).await?;
                self.store().index_connection(me, other, since).await?;
                return Ok(InvitationSent::Connected { since });
            }
            Invited::Refused { reason } => ApiError::from(reason),
            Invited::CoolingOff { ends } => invitation_cooling_off(ends),
        };
        // The place reserved for an invitation that was not made goes back
        // (one that is pending keeps its entry: this repairs a lost one).
        let pending = matches!(
            invited,
            Invited::Refused {
                reason: InvitationRefusal::InvitationPending
            }
        );
        if reserved == Reserved::Reserved && !pending {
            self.store()
                .drop_from_list(&keys::invitations_sent(me), &[other.to_string()])
                .await?;
        }
        Err(refusal)
    }

    /// `me` accepts `inviter`'s invitation; answers since when they are
    /// connected.
    pub async fn accept_invitation(&self, me: &str, inviter: &str) -> Result<i64, ApiError> {
        self.check_connection_room(me, inviter).await?;
        match self
            .answer_invitation(inviter, me, InvitationAnswer::Accept)
            .await?
        {
            Answered::Connected { since } => {
                self.store().index_connection(me, inviter, since).await?;
                Ok(since)
            }
            Answered::Done | Answered::None => Err(invitation_not_found()),
        }
    }

    /// `me` ignores `inviter`'s invitation.
    pub async fn ignore_invitation(&self, me: &str, inviter: &str) -> Result<(), ApiError> {
        match self
            .answer_invitation(inviter, me, InvitationAnswer::Ignore)
            .await?
        {
            Answered::Done => Ok(()),
            Answered::Connected { .. } | Answered::None => Err(invitation_not_found()),
        }
    }

    /// `me` withdraws their invitation to `invitee`.
    pub async fn withdraw_invitation(&self, me: &str, invitee: &str) -> Result<(), ApiError> {
        match self
            .answer_invitation(me, invitee, InvitationAnswer::Withdraw)
            .await?
        {
            Answered::Done => Ok(()),
            Answered::Connected { .. } | Answered::None => Err(invitation_not_found()),
        }
    }

    async fn answer_invitation(
        &self,
        inviter: &str,
        invitee: &str,
        answer: InvitationAnswer,
    ) -> Result<Answered, ApiError> {
        let conv = domain::conversation_id(inviter, invitee);
        let (a, _) = domain::sorted(inviter, invitee);
        let side = if inviter == a { "a" } else { "b" };
        let now = self.clock().now_ms().await?;
        let again = now.saturating_add(self.config.invitations.cooldown_ms);
        let answered = self
            .store()
            .answer_invitation(&conv, side, inviter, answer, now, again)
            .await?;
        if answered != Answered::None {
            self.store().unindex_invitations(inviter, invitee).await?;
        }
        Ok(answered)
    }

    /// A page of `member`'s pending invitations, received or sent. Entries
    /// the pair no longer has pending are left out and dropped.
    pub async fn invitations(
        &self,
        member: &str,
        list: MemberList,
        after: Option<(i64, &str)>,
        size: usize,
    ) -> Result<(Vec<InvitationRow>, Option<(i64, String)>), ApiError> {
        let received = list == MemberList::InvitationsReceived;
        let page = self.member_list(member, list, after, size).await?;
        let convs: Vec<String> = page
            .rows
            .iter()
            .map(|(other, _)| domain::conversation_id(member, other))
            .collect();
        let pending = self.store().pending_invitations(&convs).await?;
        let mut rows = Vec::new();
        let mut stale = Vec::new();
        for ((other, _), found) in page.rows.into_iter().zip(pending) {
            let (inviter, invitee) = if received {
                (other.clone(), member.to_string())
            } else {
                (member.to_string(), other.clone())
            };
            match found {
                Some(p) if p.inviter == inviter => rows.push(InvitationRow {
                    inviter,
                    invitee,
                    note: p.note,
                    at_ms: p.at_ms,
                }),
                _ => stale.push(other),
            }
        }
        self.store()
            .drop_from_list(&list.key(member), &stale)
            .await?;
        Ok((rows, page.next))
    }

    /// Connects two members (an operator's import); answers since when they
    /// are connected.
    pub async fn connect(&self, me: &str, other: &str) -> Result<i64, ApiError> {
        let conv = domain::conversation_id(me, other);
        let (a, b) = domain::sorted(me, other);
        self.check_connection_room(me, other).await?;
        let now = self.clock().now_ms().await?;
        let since = match self.store().connect(&conv, a, b, now).await? {
            Connected::Ok { since } => since,
            Connected::Refused { reason } => return Err(SendFailure::from(reason).into()),
        };
        self.store().unindex_invitations(me, other).await?;
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
        let max = self.config.invitations.max_blocks;
        if !self
            .store()
            .may_list(&keys::blocked(me), other, max)
            .await?
        {
            return Err(error::block_limit_reached(max));
        }
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
        let mut rows = self
            .store()
            .index_page(&list.key(member), after, size)
            .await?;
        let next = if rows.len() > size {
            rows.truncate(size);
            rows.last().map(|(m, score)| (*score, m.clone()))
        } else {
            None
        };
        Ok(Page {
            rows,
            invitations: Vec::new(),
            next,
        })
    }
}
