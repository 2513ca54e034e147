//! Responses to InMails and the refunds they make due (README.md, "How it behaves": the
//! first response within the window refunds the sender's credit, exactly
//! once).

use inmail_shared::ApiError;
use inmail_shared::runtime::context::CallContext;

use crate::domain::SendFailure;
use crate::domain::{self, InmailInfo, InmailStage, RefundState};
use crate::error::conversation_not_found;
use crate::send::{Messaging, Refund};
use inmail_shared::contract::proto::messaging::v1 as pb;

use crate::store::{OutboxItem, Responded, Response};

impl Messaging {
    /// After a response: asks billing for the refund when one is due.
    pub(crate) async fn settle_response(
        &self,
        ctx: &CallContext,
        conv: &str,
        response: Option<&Responded>,
    ) -> Refund {
        let Some(response) = response else {
            return Refund::None;
        };
        match response.refund {
            RefundState::Due => {
                self.refund_inmail(
                    ctx,
                    conv,
                    &response.inmail_id,
                    &response.inmail_sender,
                    response.responded_at,
                )
                .await
            }
            RefundState::Closed => Refund::WindowClosed,
            RefundState::Refunded => Refund::Refunded,
        }
    }

    /// After a response's events were appended: drops the outbox entry that
    /// owed its refund and events (`outbox`: the entry this call wrote
    /// before responding, only when its script made the response: other
    /// calls answering the same InMail share it). A refund still pending
    /// leaves it for the sweeper, which settles the refund and appends the
    /// events again (at least once; their ids are the same).
    pub(crate) async fn response_done(&self, outbox: Option<OutboxItem>, refund: Refund) {
        if refund != Refund::Pending
            && let Some(item) = outbox
            && let Err(err) = self.store.outbox_remove(&item).await
        {
            tracing::debug!(error = %err, "outbox entry left for the sweeper");
        }
    }

    /// What a response owed in the outbox (`item`) still needs, for the
    /// sweeper: the refund asked for when due, then the response's and the
    /// refund's events appended again (a process that died after the
    /// response recorded them perhaps not; at least once, the same ids).
    /// Answers whether the entry is finished.
    pub(crate) async fn finish_owed_response(
        &self,
        ctx: &CallContext,
        conv: &str,
        inmail_id: &str,
        sender: &str,
    ) -> Result<bool, ApiError> {
        let pair = self.store.conversation(conv).await?.pair;
        // Another InMail since, or none answered: nothing owed.
        let Some(inmail) = pair.inmail.filter(|i| i.message_id == inmail_id) else {
            return Ok(true);
        };
        let state = match inmail.stage {
            InmailStage::Accepted => pb::InmailState::Accepted,
            InmailStage::Declined => pb::InmailState::Declined,
            InmailStage::Replied => pb::InmailState::Replied,
            _ => return Ok(true),
        };
        let at = match responded_at(&inmail) {
            Ok(at) => at,
            // Left owed, never sent with a guessed time.
            Err(err) => {
                tracing::error!(%inmail_id, error = %err, "refund owed but not asked for");
                return Ok(false);
            }
        };
        let refund = match inmail.refund {
            Some(RefundState::Due) => self.refund_inmail(ctx, conv, inmail_id, sender, at).await,
            other => Refund::of(other),
        };
        if refund == Refund::Pending {
            return Ok(false);
        }
        let (a, b) = domain::conversation_members(conv)
            .ok_or_else(|| ApiError::internal("bad conversation id"))?;
        let responder = if a == sender { b } else { a };
        self.publish_response(conv, [sender, responder], inmail_id, state, refund, at)
            .await;
        if matches!(refund, Refund::Refunded | Refund::WindowClosed) {
            self.publish_refund(conv, sender, inmail_id, refund).await;
        }
        Ok(true)
    }

    /// The recipient accepts or declines the InMail awaiting their response.
    pub async fn accept_or_decline(
        &self,
        ctx: &CallContext,
        conv: &str,
        responder: &str,
        accept: bool,
    ) -> Result<Refund, ApiError> {
        let pair = self.store.conversation(conv).await?.pair;
        let wanted = if accept {
            InmailStage::Accepted
        } else {
            InmailStage::Declined
        };
        // One response per InMail: the same response again (a retry with a
        // new request id, a concurrent duplicate) answers the recorded one.
        if let Some(done) = pair
            .inmail
            .as_ref()
            .filter(|i| i.stage == wanted && i.sender != responder)
        {
            return self.refund_of(ctx, conv, done).await;
        }
        let Some(inmail) = pair
            .inmail
            .filter(|i| i.stage == InmailStage::AwaitingResponse && i.sender != responder)
        else {
            return Err(SendFailure::NoInmailAwaitingResponse.into());
        };
        let now = self.clock.now_ms().await?;
        let item = OutboxItem::Refund {
            conv: conv.to_string(),
            inmail_id: inmail.message_id.clone(),
            sender: inmail.sender.clone(),
        };
        self.store
            .outbox_add(&item, now + self.recovery_after_ms())
            .await?;
        let (a, b) = domain::conversation_members(conv)
            .ok_or_else(|| ApiError::internal("bad conversation id"))?;
        self.store.touch_inboxes(conv, a, b, now).await?;
        let responded = match self
            .store
            .respond(conv, responder, accept, now, self.window_ms())
            .await?
        {
            Response::Ok(responded) => responded,
            // Another call recorded the same response first: its outcome.
            Response::Responded(recorded) => {
                return Ok(self.recorded_refund(ctx, conv, &recorded).await);
            }
            Response::NotFound => return Err(conversation_not_found()),
            // The entry may be another response's: the sweeper drops it when
            // no refund is due.
            Response::Refused { reason } => return Err(SendFailure::from(reason).into()),
        };
        if let Some(hook) = &self.config.faults.after_respond
            && let Some(injected) = hook().await
        {
            // As if the process died here: the refund and events stay owed.
            return Err(injected);
        }
        let refund = self.settle_response(ctx, conv, Some(&responded)).await;
        let state = if accept {
            inmail_shared::contract::proto::messaging::v1::InmailState::Accepted
        } else {
            inmail_shared::contract::proto::messaging::v1::InmailState::Declined
        };
        self.publish_response(
            conv,
            [&responded.inmail_sender, responder],
            &responded.inmail_id,
            state,
            refund,
            responded.responded_at,
        )
        .await;
        self.response_done(Some(item), refund).await;
        Ok(refund)
    }

    /// The refund status of a response recorded before; a refund still due
    /// is asked for again (billing refunds a message once).
    pub(crate) async fn recorded_refund(
        &self,
        ctx: &CallContext,
        conv: &str,
        response: &Responded,
    ) -> Refund {
        match response.refund {
            RefundState::Due => {
                self.refund_inmail(
                    ctx,
                    conv,
                    &response.inmail_id,
                    &response.inmail_sender,
                    response.responded_at,
                )
                .await
            }
            other => Refund::of(Some(other)),
        }
    }

    /// The refund status of a responded InMail as it stands (a refund still
    /// due is asked for again). An error when the refund is due and the
    /// time of the response cannot be read: billing judges the refund at
    /// that time, so it is never guessed.
    pub(crate) async fn refund_of(
        &self,
        ctx: &CallContext,
        conv: &str,
        inmail: &InmailInfo,
    ) -> Result<Refund, ApiError> {
        match inmail.refund {
            Some(RefundState::Due) => {
                let responded_at = responded_at(inmail)?;
                Ok(self
                    .refund_inmail(ctx, conv, &inmail.message_id, &inmail.sender, responded_at)
                    .await)
            }
            other => Ok(Refund::of(other)),
        }
    }

    /// Asks billing to refund an InMail whose refund is due, and records the
    /// answer. Exactly once: billing refunds a message at most once, and the
    /// conversation records the refund only while it is due.
    pub(crate) async fn refund_inmail(
        &self,
        ctx: &CallContext,
        conv: &str,
        inmail_id: &str,
        inmail_sender: &str,
        responded_at_ms: i64,
    ) -> Refund {
        match self
            .billing
            .refund(ctx, inmail_sender, inmail_id, responded_at_ms)
            .await
        {
            Ok(_) => match self
                .store
                .settle_refund(conv, inmail_id, RefundState::Refunded)
                .await
            {
                Ok(settled) => {
                    metrics::counter!("inmail_refunds_total").increment(1);
                    if settled {
                        self.publish_refund(conv, inmail_sender, inmail_id, Refund::Refunded)
                            .await;
                    }
                    Refund::Refunded
                }
                Err(_) => Refund::Pending,
            },
            Err(ApiError::FailedPrecondition {
                reason: inmail_shared::contract::reasons::REFUND_WINDOW_CLOSED,
                ..
            }) => match self
                .store
                .settle_refund(conv, inmail_id, RefundState::Closed)
                .await
            {
                Ok(settled) => {
                    if settled {
                        self.publish_refund(conv, inmail_sender, inmail_id, Refund::WindowClosed)
                            .await;
                    }
                    Refund::WindowClosed
                }
                Err(_) => Refund::Pending,
            },
            Err(err) => {
                tracing::warn!(%inmail_id, error = %err, "refund not taken yet; the sweeper will retry");
                Refund::Pending
            }
        }
    }
}

/// When `inmail` was responded to, as recorded; an error when the record
/// cannot be read.
pub(crate) fn responded_at(inmail: &InmailInfo) -> Result<i64, ApiError> {
    inmail.responded_at_ms.ok_or_else(|| {
        ApiError::internal(format!(
            "the response time of InMail {} cannot be read",
            inmail.message_id
        ))
    })
}
