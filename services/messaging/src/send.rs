//! Sending a message, and the InMail saga.
//!
//! An InMail goes through four steps, each idempotent by its message id:
//! 1. stage — the message is stored, invisible, and the pair's InMail slot is
//!    reserved (so a second InMail to the same member is refused before any
//!    credit moves); an outbox entry records that the send must be finished;
//! 2. debit — billing takes and holds one credit;
//! 3. confirm — billing makes the debit final: this is the commit point;
//! 4. deliver — the message becomes visible.
//!
//! A failure before the commit gives the credit back: at once when billing can
//! be told (ReleaseDebit), otherwise billing releases the unconfirmed hold by
//! itself after HOLD_TTL. A failure after the commit is rolled forward: the
//! outbox sweeper delivers the message. So no InMail is visible without a
//! final charge, and no credit stays charged for a message that is not stored.

use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::runtime::context::CallContext;
use inmail_shared::{ApiError, contract::reasons};

use crate::domain::SendFailure;
use crate::domain::{
    self, BODY_MAX_CHARS, Decision, INMAIL_BODY_MAX_CHARS, InmailStage, Kind, Pair,
    SUBJECT_MAX_CHARS, decide,
};
use crate::error::{open_profile_limited, rate_limited, send_rate_limited};
pub use crate::service::{AfterDebitHook, Config, Faults, Messaging, Refund, SendInput, Sent};
use crate::store::{
    Begin, Begun, Delivering, Delivery, Envelope, GivenUp, MessageState, OutboxItem, Staged,
    StoredMessage,
};

/// Deciding again after the pair changed under us is bounded.
const DECIDE_ATTEMPTS: usize = 4;

impl Messaging {
    /// Sends (or, for a request id seen before, finishes or answers again)
    /// one message. `precheck` runs on the pair before a new send is claimed.
    pub async fn send(
        &self,
        ctx: &CallContext,
        input: &SendInput<'_>,
        precheck: impl Fn(&Pair) -> Result<(), ApiError>,
    ) -> Result<Sent, ApiError> {
        let conv = domain::conversation_id(input.sender, input.recipient);
        let message_id = domain::message_id(input.sender, input.request_id);
        let (a, b) = domain::sorted(input.sender, input.recipient);
        let envelope = Envelope {
            conv: &conv,
            a,
            b,
            message_id: &message_id,
            sender: input.sender,
            recipient: input.recipient,
            subject: input.subject,
            body: input.body,
            fingerprint: input.fingerprint,
        };
        // The recipient's Open Profile, when the kind depends on it, comes
        // from what subscription-plan publishes in Redis, read with the pair
        // (inmail_shared::state::published); only when that is missing or stale is
        // subscription-plan asked, at most once per send.
        let mut asked: Option<Result<bool, ApiError>> = None;
        for _ in 0..DECIDE_ATTEMPTS {
            let (record, conversation, accepts_inmail, published) = self
                .store
                .read_for_send(input.sender, input.request_id, &conv, input.recipient)
                .await?;
            let claimed = record.fingerprint.is_some();
            if let Some(claimed_with) = &record.fingerprint {
                if claimed_with != input.fingerprint {
                    return Err(ApiError::request_id_reused());
                }
                if let Some(refused) = record.refused {
                    return Err(refused.into());
                }
                if let Some(message) = self.message(&conv, &message_id).await? {
                    if message.fingerprint != input.fingerprint {
                        // Staged by a concurrent request that reused this
                        // request id with other arguments; it is about to
                        // undo its stage.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    return self.resume(ctx, &conv, message).await;
                }
            }
            let pair = conversation.pair;
            if !claimed {
                precheck(&pair)?;
            }
            let now = self.clock.now_ms().await?;
            let known = published
                .map(|open| open.at(now))
                .or_else(|| asked.as_ref().and_then(|r| r.as_ref().ok().copied()));
            let decide = |open_profile: Option<bool>| {
                decide(
                    &pair,
                    input.sender,
                    input.recipient,
                    self.config.policy,
                    open_profile,
                    accepts_inmail,
                )
            };
            let kind = match decide(known)? {
                Decision::Kind(kind) => kind,
                Decision::NeedOpenProfile => {
                    let answer = match &asked {
                        Some(answer) => answer.clone(),
                        None => {
                            let answer = self.plans.open_profile(ctx, input.recipient).await;
                            asked = Some(answer.clone());
                            answer
                        }
                    };
                    match decide(Some(answer?))? {
                        Decision::Kind(kind) => kind,
                        Decision::NeedOpenProfile => {
                            return Err(ApiError::internal("Open Profile known and still needed"));
                        }
                    }
                }
            };
            check_size(kind, input.subject, input.body)?;
            let month = domain::calendar_month(now);
            let begin = Begin {
                kind,
                now_ms: now,
                month: &month,
            };
            let attempt = if kind == Kind::Inmail {
                self.send_inmail(ctx, &envelope, input.request_id, &begin)
                    .await
            } else {
                if !claimed {
                    match self
                        .store
                        .begin_send(&envelope, input.request_id, &begin, &self.config.limits)
                        .await?
                    {
                        Begun::New => {}
                        Begun::Exists { .. } => continue,
                        other => return Err(begin_refused(other, now)),
                    }
                }
                self.send_free(
                    ctx,
                    &envelope,
                    input.request_id,
                    kind,
                    &pair,
                    now,
                    input.answering,
                )
                .await
            };
            match attempt {
                Ok(Some(sent)) => {
                    metrics::counter!("inmail_messages_sent_total", "kind" => kind.as_str())
                        .increment(1);
                    return Ok(sent);
                }
                // The pair changed between reading and writing: decide again.
                Ok(None) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(ApiError::aborted(
            reasons::CONVERSATION_CHANGING,
            "the conversation kept changing while the message was sent; retry the same request",
        ))
    }

    /// A free message: delivered in one step. `None` when the pair changed.
    /// `answering`: the sender's one response to the recipient's InMail.
    #[allow(clippy::too_many_arguments)]
    async fn send_free(
        &self,
        ctx: &CallContext,
        envelope: &Envelope<'_>,
        request_id: &str,
        kind: Kind,
        pair: &Pair,
        now: i64,
        answering: bool,
    ) -> Result<Option<Sent>, ApiError> {
        // Answering the recipient's InMail makes its refund due: note that
        // in the outbox first, so a crash cannot lose the refund.
        let refund_item = pair
            .inmail
            .as_ref()
            .filter(|i| i.sender == envelope.recipient && i.stage == InmailStage::AwaitingResponse)
            .map(|i| OutboxItem::Refund {
                conv: envelope.conv.to_string(),
                inmail_id: i.message_id.clone(),
                sender: i.sender.clone(),
            });
        if let Some(item) = &refund_item {
            // Looked at only after any call that is responding right now is
            // over (REQUEST_TIMEOUT < SEND_RECOVERY_AFTER), so the sweeper
            // never mistakes an in-flight response for no response.
            self.store
                .outbox_add(item, now + self.recovery_after_ms())
                .await?;
        }
        // Free messages do not touch billing; the balance is a courtesy,
        // kept with the message so a retry answers the same.
        let balance_after = self.billing.available(ctx, envelope.sender).await.ok();
        let how = Delivering {
            staged: false,
            kind,
            credits: 0,
            now_ms: now,
            refund_window_ms: self.window_ms(),
            balance_after,
            answering,
            events_due_ms: now + self.recovery_after_ms(),
        };
        let delivered = match self.store.deliver(envelope, &how).await? {
            Delivery::Ok(delivered) => delivered,
            Delivery::Exists(_) | Delivery::Retry => return Ok(None),
            // Another call's reply answered the InMail first: the same reply
            // again answers its outcome; another body was not sent, and is
            // refused (one response per InMail).
            Delivery::Responded(recorded) => {
                let reply = self
                    .message(envelope.conv, &recorded.reply_id)
                    .await?
                    .ok_or_else(|| ApiError::internal("the recorded reply vanished"))?;
                if reply.body != envelope.body {
                    let failure = SendFailure::NoInmailAwaitingResponse;
                    self.store
                        .record_refusal(envelope.sender, request_id, failure)
                        .await?;
                    return Err(failure.into());
                }
                let refund = self
                    .recorded_refund(ctx, envelope.conv, &recorded.response)
                    .await;
                return Ok(Some(Sent {
                    conv: envelope.conv.to_string(),
                    balance_after: reply.balance_after,
                    message: reply,
                    refund,
                }));
            }
            Delivery::Refused { reason } => {
                let failure = SendFailure::from(reason);
                self.store
                    .record_refusal(envelope.sender, request_id, failure)
                    .await?;
                return Err(failure.into());
            }
        };
        if let Some(hook) = &self.config.faults.after_deliver
            && let Some(injected) = hook().await
        {
            // As if the process died here: the events stay owed.
            return Err(injected);
        }
        let refund = self
            .settle_response(ctx, envelope.conv, delivered.response.as_ref())
            .await;
        let message = StoredMessage {
            id: envelope.message_id.to_string(),
            from: envelope.sender.to_string(),
            to: envelope.recipient.to_string(),
            kind,
            subject: envelope.subject.to_string(),
            body: envelope.body.to_string(),
            credits: 0,
            at_ms: now,
            state: MessageState::Delivered,
            reason: None,
            balance_after,
            fingerprint: envelope.fingerprint.to_string(),
        };
        self.publish_message(envelope.conv, &message).await;
        if let Some(response) = &delivered.response {
            self.publish_response(
                envelope.conv,
                [&response.inmail_sender, envelope.sender],
                &response.inmail_id,
                inmail_shared::contract::proto::messaging::v1::InmailState::Replied,
                refund,
                response.responded_at,
            )
            .await;
            self.response_done(refund_item, refund).await;
        }
        Ok(Some(Sent {
            conv: envelope.conv.to_string(),
            message,
            balance_after,
            refund,
        }))
    }

    /// An InMail: claim, token and stage in one round trip, then the commit
    /// steps. `None` when the pair changed.
    async fn send_inmail(
        &self,
        ctx: &CallContext,
        envelope: &Envelope<'_>,
        request_id: &str,
        begin: &Begin<'_>,
    ) -> Result<Option<Sent>, ApiError> {
        let now = begin.now_ms;
        let (begun, staged) = self
            .store
            .begin_and_stage(
                envelope,
                request_id,
                begin,
                &self.config.limits,
                now + self.recovery_after_ms(),
            )
            .await?;
        let item = OutboxItem::Send {
            conv: envelope.conv.to_string(),
            message_id: envelope.message_id.to_string(),
            sender: envelope.sender.to_string(),
        };
        if !matches!(begun, Begun::New | Begun::Exists { .. }) {
            // Refused (rate limit, request id reused): undo what this call
            // staged; a message staged by an earlier attempt stays.
            if staged == Staged::Ok {
                self.store
                    .forget_staged(envelope.conv, envelope.message_id, envelope.fingerprint)
                    .await?;
            }
            if !matches!(staged, Staged::Exists(_)) {
                self.store.outbox_remove(&item).await?;
            }
            return Err(begin_refused(begun, now));
        }
        match staged {
            Staged::Ok => {}
            // Staged before, by this request (resume it) or by a concurrent
            // one with other arguments (which undoes it): read and decide again.
            Staged::Exists(_) => return Ok(None),
            Staged::Refused { reason } => {
                let failure = SendFailure::from(reason);
                self.store.outbox_remove(&item).await?;
                self.store
                    .record_refusal(envelope.sender, request_id, failure)
                    .await?;
                return Err(failure.into());
            }
            Staged::Retry => {
                self.store.outbox_remove(&item).await?;
                return Ok(None);
            }
        }
        let message = StoredMessage {
            id: envelope.message_id.to_string(),
            from: envelope.sender.to_string(),
            to: envelope.recipient.to_string(),
            kind: Kind::Inmail,
            subject: envelope.subject.to_string(),
            body: envelope.body.to_string(),
            credits: Kind::Inmail.credits(),
            at_ms: now,
            state: MessageState::Staged,
            reason: None,
            balance_after: None,
            fingerprint: envelope.fingerprint.to_string(),
        };
        self.commit_inmail(ctx, envelope.conv, message)
            .await
            .map(Some)
    }

    /// Debit, confirm, deliver a staged InMail (idempotent; also used to
    /// finish a send whose request is retried).
    async fn commit_inmail(
        &self,
        ctx: &CallContext,
        conv: &str,
        message: StoredMessage,
    ) -> Result<Sent, ApiError> {
        let debit = match self.billing.debit(ctx, &message.from, &message.id, 1).await {
            Ok(debit) => debit,
            Err(err @ ApiError::FailedPrecondition { reason, .. }) => {
                // Refused before any credit moved (or released long ago).
                let failure = SendFailure::of_billing(reason).ok_or(err)?;
                self.give_up(conv, &message, failure).await?;
                return Err(failure.into());
            }
            // Unknown outcome: the message stays staged; the retry or the
            // sweeper finishes it, billing's hold expiry bounds the charge.
            Err(err) => return Err(err),
        };
        if let Some(hook) = &self.config.faults.after_debit
            && let Some(injected) = hook().await
        {
            return Err(self
                .abort_before_commit(ctx, conv, &message, injected)
                .await);
        }
        match self.billing.confirm(ctx, &message.from, &message.id).await {
            Ok(_) => {}
            Err(err @ ApiError::FailedPrecondition { reason, .. }) => {
                let failure = SendFailure::of_billing(reason).ok_or(err)?;
                self.give_up(conv, &message, failure).await?;
                return Err(failure.into());
            }
            Err(err) => return Err(self.abort_before_commit(ctx, conv, &message, err).await),
        }
        self.deliver_committed(conv, &message, Some(debit.balance_after))
            .await
    }

    /// Something failed after the debit and before the commit: give the
    /// credit back now if billing can be told, and answer `cause`. If billing
    /// says the debit was confirmed after all, deliver instead.
    async fn abort_before_commit(
        &self,
        ctx: &CallContext,
        conv: &str,
        message: &StoredMessage,
        cause: ApiError,
    ) -> ApiError {
        tracing::warn!(message_id = %message.id, error = %cause, "send failed after the debit; releasing the credit");
        match self
            .billing
            .release(
                ctx,
                &message.from,
                &message.id,
                billing::ReleaseReason::MessageNotStored,
            )
            .await
        {
            Ok(_) => {
                if let Err(err) = self.give_up(conv, message, SendFailure::NotStored).await {
                    tracing::warn!(error = %err, "staged message left for the sweeper");
                }
                cause
            }
            Err(ApiError::FailedPrecondition {
                reason: reasons::DEBIT_CONFIRMED,
                ..
            }) => match self.deliver_committed(conv, message, None).await {
                Ok(_) => ApiError::unavailable(
                    reasons::RETRY_TO_SEE_RESULT,
                    "the message was sent; retry the same request to get it",
                ),
                Err(err) => err,
            },
            // Billing cannot be told: its hold expiry gives the credit back.
            Err(_) => cause,
        }
    }

    /// Marks a staged message failed and drops its outbox entry.
    pub(crate) async fn give_up(
        &self,
        conv: &str,
        message: &StoredMessage,
        reason: SendFailure,
    ) -> Result<(), ApiError> {
        let given_up = self
            .store
            .fail_staged(
                conv,
                &message.id,
                reason,
                self.config.failed_keep.as_millis() as i64,
            )
            .await?;
        if let GivenUp::Exists(existing) = given_up {
            tracing::debug!(message_id = %message.id, ?existing, "not staged any more; nothing to give up");
        }
        let item = OutboxItem::Send {
            conv: conv.to_string(),
            message_id: message.id.clone(),
            sender: message.from.clone(),
        };
        self.store.outbox_remove(&item).await
    }

    /// Makes a committed InMail visible (roll forward).
    pub(crate) async fn deliver_committed(
        &self,
        conv: &str,
        message: &StoredMessage,
        balance_after: Option<i64>,
    ) -> Result<Sent, ApiError> {
        let now = self.clock.now_ms().await?;
        let how = Delivering {
            staged: true,
            kind: message.kind,
            credits: message.credits,
            now_ms: now,
            refund_window_ms: self.window_ms(),
            balance_after,
            answering: false,
            events_due_ms: now + self.recovery_after_ms(),
        };
        let delivered = match self
            .store
            .deliver(&Envelope::of(conv, message), &how)
            .await?
        {
            Delivery::Ok(_) => {
                metrics::counter!("inmail_credits_charged_total")
                    .increment(message.credits.max(0) as u64);
                let message = StoredMessage {
                    state: MessageState::Delivered,
                    balance_after,
                    ..message.clone()
                };
                self.publish_message(conv, &message).await;
                message
            }
            Delivery::Exists(existing) if existing.state == Some(MessageState::Delivered) => self
                .message(conv, &message.id)
                .await?
                .ok_or_else(|| ApiError::internal("delivered message vanished"))?,
            other => {
                return Err(ApiError::internal(format!(
                    "a confirmed InMail could not be delivered: {other:?}"
                )));
            }
        };
        // The outbox entry stays: the sweeper drops it in a batch once it is
        // due, which costs less than one more write per InMail.
        Ok(Sent {
            conv: conv.to_string(),
            balance_after: delivered.balance_after.or(balance_after),
            message: delivered,
            refund: Refund::None,
        })
    }

    /// A request seen before: answer its outcome, or finish it.
    async fn resume(
        &self,
        ctx: &CallContext,
        conv: &str,
        message: StoredMessage,
    ) -> Result<Sent, ApiError> {
        match message.state {
            MessageState::Delivered => {
                // The reply that answered an InMail answers with the refund
                // as it stands (a refund still due is asked for again).
                let inmail = self.store.conversation(conv).await?.pair.inmail;
                let refund = match inmail {
                    Some(inmail)
                        if inmail.sender == message.to
                            && inmail.reply_id.as_deref() == Some(message.id.as_str()) =>
                    {
                        self.refund_of(ctx, conv, &inmail).await?
                    }
                    _ => Refund::None,
                };
                // A retry may follow a process that died between storing
                // the message and appending its events: append them again
                // (watchers dedupe by event_id).
                self.publish_message(conv, &message).await;
                Ok(Sent {
                    conv: conv.to_string(),
                    balance_after: message.balance_after,
                    message,
                    refund,
                })
            }
            MessageState::Failed => Err(message
                .reason
                .map(ApiError::from)
                .unwrap_or_else(|| ApiError::internal("a failed message without a reason"))),
            MessageState::Staged => self.commit_inmail(ctx, conv, message).await,
        }
    }
}

/// The error for a request BEGIN_SEND did not let through.
fn begin_refused(begun: Begun, now_ms: i64) -> ApiError {
    match begun {
        Begun::RateLimited { retry_ms } => rate_limited(Duration::from_millis(retry_ms)),
        Begun::SendRateLimited { retry_ms } => send_rate_limited(Duration::from_millis(retry_ms)),
        Begun::OpenProfileLimited => {
            let wait = domain::next_month_start_ms(now_ms) - now_ms;
            open_profile_limited(Duration::from_millis(wait.max(0) as u64))
        }
        Begun::MutationLimited { retry_ms } => {
            inmail_shared::state::idempotency::mutation_rate_limited(Duration::from_millis(
                retry_ms,
            ))
        }
        Begun::Mismatch => ApiError::request_id_reused(),
        Begun::New | Begun::Exists { .. } => {
            ApiError::internal("a claimed request is not a refusal")
        }
    }
}

/// Subject and body limits depend on the kind (README.md, "How it behaves").
fn check_size(kind: Kind, subject: &str, body: &str) -> Result<(), ApiError> {
    let mut checks = inmail_shared::contract::validate::Checks::new();
    if kind == Kind::Inmail {
        checks
            .text("subject", subject, true, SUBJECT_MAX_CHARS)
            .text("body", body, true, INMAIL_BODY_MAX_CHARS);
    } else {
        checks
            .text("subject", subject, false, SUBJECT_MAX_CHARS)
            .text("body", body, true, BODY_MAX_CHARS);
    }
    checks.finish()
}
