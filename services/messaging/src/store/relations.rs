//! Connections, blocks and InMail preferences in Redis.

use inmail_shared::ApiError;
use inmail_shared::state::storage::Batch;

use super::reply::parse;
use super::{Answered, Connected, Invited, MessagingStore, Reserved, keys};

/// A sender's invitation allowances (RESERVE_INVITATION).
#[derive(Debug, Clone)]
pub struct InvitationLimits {
    /// The weekly budget: the bucket's size.
    pub per_week: u32,
    pub tokens_per_ms: f64,
    pub max_pending: u32,
    /// How long after a withdrawn or ignored invitation the inviter may not
    /// invite the same member again.
    pub cooldown_ms: i64,
    /// The most connections one member may have.
    pub max_connections: u32,
    /// The most members one member may block.
    pub max_blocks: u32,
}

/// What an invitation answer does (ANSWER_INVITATION).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvitationAnswer {
    Accept,
    Ignore,
    Withdraw,
}

impl InvitationAnswer {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Ignore => "ignore",
            Self::Withdraw => "withdraw",
        }
    }
}

/// A pending invitation as the pair's hash holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInvitation {
    pub inviter: String,
    pub at_ms: i64,
    pub note: String,
}

impl MessagingStore {
    pub async fn connect(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<Connected, ApiError> {
        let reply: String = self
            .connect
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse("connect", &reply)
    }

    /// Both members' connection lists show the other since `at_ms`.
    pub async fn index_connection(
        &self,
        one: &str,
        other: &str,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (list, member) in [(one, other), (other, one)] {
            batch.add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::connections(list))
                    .arg(at_ms)
                    .arg(member)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// How many connections each of two members has.
    pub async fn connection_counts(&self, one: &str, other: &str) -> Result<(u64, u64), ApiError> {
        let mut batch = Batch::new();
        batch
            .add(redis::cmd("ZCARD").arg(keys::connections(one)).clone())
            .add(redis::cmd("ZCARD").arg(keys::connections(other)).clone());
        self.redis.run(&batch).await
    }

    /// Takes one of `inviter`'s weekly invitations and lists `invitee`
    /// among their pending ones.
    pub async fn reserve_invitation(
        &self,
        inviter: &str,
        invitee: &str,
        now_ms: i64,
        limits: &InvitationLimits,
    ) -> Result<Reserved, ApiError> {
        let reply: String = self
            .reserve_invitation
            .key(keys::invitations_sent(inviter))
            .key(keys::invite_rate(inviter))
            .arg(invitee)
            .arg(now_ms)
            .arg(limits.per_week)
            .arg(format!("{:.12e}", limits.tokens_per_ms))
            .arg(limits.max_pending)
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse("reserve-invitation", &reply)
    }

    /// `inviter` (one of the sorted pair `a`, `b`) invites the other.
    pub async fn invite(
        &self,
        conv: &str,
        (a, b): (&str, &str),
        inviter: &str,
        note: &str,
        now_ms: i64,
        request_id: &str,
    ) -> Result<Invited, ApiError> {
        let reply: String = self
            .invite
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(inviter)
            .arg(note)
            .arg(now_ms)
            .arg(request_id)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.redis.acknowledge(&[&keys::conv(conv)]).await?;
        parse("invite", &reply)
    }

    /// Accepts, ignores or withdraws `inviter`'s pending invitation.
    pub async fn answer_invitation(
        &self,
        conv: &str,
        inviter_side: &str,
        inviter: &str,
        answer: InvitationAnswer,
        now_ms: i64,
        invite_again_at_ms: i64,
    ) -> Result<Answered, ApiError> {
        let reply: String = self
            .answer_invitation
            .key(keys::conv(conv))
            .arg(inviter)
            .arg(answer.as_str())
            .arg(now_ms)
            .arg(inviter_side)
            .arg(invite_again_at_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.redis.acknowledge(&[&keys::conv(conv)]).await?;
        parse("answer-invitation", &reply)
    }

    /// Lists a pending invitation in the inviter's sent and the invitee's
    /// received invitations.
    pub async fn index_invitation(
        &self,
        inviter: &str,
        invitee: &str,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        batch
            .add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::invitations_sent(inviter))
                    .arg(at_ms)
                    .arg(invitee)
                    .clone(),
            )
            .add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::invitations_received(invitee))
                    .arg(at_ms)
                    .arg(inviter)
                    .clone(),
            );
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// Takes invitations between the two, either way, off their lists.
    pub async fn unindex_invitations(&self, one: &str, other: &str) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (inviter, invitee) in [(one, other), (other, one)] {
            batch
                .add_ignored(
                    redis::cmd("ZREM")
                        .arg(keys::invitations_sent(inviter))
                        .arg(invitee)
                        .clone(),
                )
                .add_ignored(
                    redis::cmd("ZREM")
                        .arg(keys::invitations_received(invitee))
                        .arg(inviter)
                        .clone(),
                );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// The pending invitation of each pair (by conversation id), if any.
    pub async fn pending_invitations(
        &self,
        convs: &[String],
    ) -> Result<Vec<Option<PendingInvitation>>, ApiError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::new();
        for conv in convs {
            batch.add(
                redis::cmd("HMGET")
                    .arg(keys::conv(conv))
                    .arg("inv_from")
                    .arg("inv_at")
                    .arg("inv_note")
                    .clone(),
            );
        }
        let rows: Vec<(Option<String>, Option<i64>, Option<String>)> =
            self.redis.run(&batch).await?;
        Ok(rows
            .into_iter()
            .map(|(inviter, at, note)| {
                Some(PendingInvitation {
                    inviter: inviter?,
                    at_ms: at?,
                    note: note.unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Whether `other` is on the list at `key` or the list has room for it
    /// (fewer than `max`).
    pub async fn may_list(&self, key: &str, other: &str, max: u32) -> Result<bool, ApiError> {
        let mut batch = Batch::new();
        batch
            .add(redis::cmd("ZSCORE").arg(key).arg(other).clone())
            .add(redis::cmd("ZCARD").arg(key).clone());
        let (listed, count): (Option<f64>, u64) = self.redis.run(&batch).await?;
        Ok(listed.is_some() || count < u64::from(max))
    }

    /// Drops `others` from a member's sorted-set list (entries found stale).
    pub async fn drop_from_list(&self, key: &str, others: &[String]) -> Result<(), ApiError> {
        if others.is_empty() {
            return Ok(());
        }
        let _: i64 = redis::cmd("ZREM")
            .arg(key)
            .arg(others)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Disconnects the pair; answers whether they were connected.
    pub async fn disconnect(&self, conv: &str, one: &str, other: &str) -> Result<bool, ApiError> {
        let was: i64 = self
            .disconnect
            .key(keys::conv(conv))
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(one, other).await?;
        Ok(was == 1)
    }

    async fn unindex_connection(&self, one: &str, other: &str) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (list, member) in [(one, other), (other, one)] {
            batch.add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::connections(list))
                    .arg(member)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// `blocker` blocks `blocked`; answers when the block started.
    pub async fn block(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        blocker: &str,
        blocked: &str,
        now_ms: i64,
    ) -> Result<i64, ApiError> {
        let side = if blocker == a { "a" } else { "b" };
        let since: i64 = self
            .block
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(side)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(blocker, blocked).await?;
        self.unindex_invitations(blocker, blocked).await?;
        let _: () = redis::cmd("ZADD")
            .arg(keys::blocked(blocker))
            .arg(since)
            .arg(blocked)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(since)
    }

    /// Lifts `blocker`'s block of `blocked`; answers whether there was one.
    pub async fn unblock(
        &self,
        conv: &str,
        a: &str,
        blocker: &str,
        blocked: &str,
    ) -> Result<bool, ApiError> {
        let field = if blocker == a { "blk_a" } else { "blk_b" };
        let mut batch = Batch::new();
        batch
            .add(redis::cmd("HDEL").arg(keys::conv(conv)).arg(field).clone())
            .add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::blocked(blocker))
                    .arg(blocked)
                    .clone(),
            );
        let (removed,): (i64,) = self.redis.run(&batch).await?;
        Ok(removed == 1)
    }

    pub async fn set_accepts_inmail(&self, member: &str, accepts: bool) -> Result<(), ApiError> {
        let _: () = redis::cmd("HSET")
            .arg(keys::prefs(member))
            .arg("inmail")
            .arg(if accepts { "1" } else { "0" })
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn accepts_inmail(&self, member: &str) -> Result<bool, ApiError> {
        let value: Option<String> = redis::cmd("HGET")
            .arg(keys::prefs(member))
            .arg("inmail")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(value.as_deref() != Some("0"))
    }
}
