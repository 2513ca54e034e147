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

use std::sync::Arc;
use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::clock::Clock;
use inmail_shared::context::CallContext;
use inmail_shared::proto::billing::v1 as billing;
use inmail_shared::proto::billing::v1::DebitState;

use crate::domain::{
    self, BODY_MAX_CHARS, Decision, INMAIL_BODY_MAX_CHARS, Kind, Pair, PendingInmailPolicy,
    SUBJECT_MAX_CHARS, decide,
};
use crate::downstream::{Billing, Plans};
use crate::error::{open_profile_limited, rate_limited, refusal};
use crate::store::{
    Begin, Begun, Delivery, MessagingStore, OutboxItem, PairReply, SendLimits, Stage, StoredMessage,
};

/// A hook tests use to break the saga right after the debit (a store
/// failure, or stopping billing): it answers the error to inject, if any.
/// Not reachable from configuration.
pub type AfterDebitHook = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<ApiError>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Default)]
pub struct Faults {
    pub after_debit: Option<AfterDebitHook>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("after_debit", &self.after_debit.is_some())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: PendingInmailPolicy,
    pub limits: SendLimits,
    /// A response within this long after sending refunds the InMail.
    pub refund_window: Duration,
    /// When the sweeper looks at a send that has not finished.
    pub recovery_after: Duration,
    /// When the sweeper retries a refund billing did not take.
    pub refund_retry: Duration,
    /// How long a failed message is kept (for replays of its request).
    pub failed_keep: Duration,
    pub faults: Faults,
}

/// Whether a response brought the sender's credit back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refund {
    None,
    Refunded,
    Pending,
    WindowClosed,
}

/// A delivered message and what it cost.
#[derive(Debug, Clone)]
pub struct Sent {
    pub conv: String,
    pub message: StoredMessage,
    pub balance_after: Option<i64>,
    pub refund: Refund,
}

/// One send request.
#[derive(Debug, Clone)]
pub struct SendInput<'a> {
    pub request_id: &'a str,
    pub fingerprint: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
}

#[derive(Clone)]
pub struct Messaging {
    pub(crate) store: MessagingStore,
    pub(crate) billing: Billing,
    pub(crate) plans: Plans,
    pub(crate) clock: Clock,
    pub(crate) config: Arc<Config>,
}

/// Deciding again after the pair changed under us is bounded.
const DECIDE_ATTEMPTS: usize = 4;

impl Messaging {
    pub fn new(
        store: MessagingStore,
        billing: Billing,
        plans: Plans,
        clock: Clock,
        config: Config,
    ) -> Self {
        Self {
            store,
            billing,
            plans,
            clock,
            config: Arc::new(config),
        }
    }

    pub fn store(&self) -> &MessagingStore {
        &self.store
    }

    fn window_ms(&self) -> i64 {
        self.config.refund_window.as_millis() as i64
    }

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
        // The recipient's Open Profile is asked for while the pair is read:
        // an InMail needs both, and waiting for one before the other would
        // add a round trip to every InMail. A free message ignores it.
        let mut open_profile: Option<Result<bool, ApiError>> = None;
        for _ in 0..DECIDE_ATTEMPTS {
            let read =
                self.store
                    .read_for_send(input.sender, input.request_id, &conv, input.recipient);
            let (record, pair_fields, accepts_inmail) = match open_profile {
                Some(_) => read.await?,
                None => {
                    let (read, open) =
                        tokio::join!(read, self.plans.open_profile(ctx, input.recipient));
                    open_profile = Some(open);
                    read?
                }
            };
            let claimed = !record.is_empty();
            if claimed {
                if record.get("fp").map(String::as_str) != Some(input.fingerprint) {
                    return Err(ApiError::request_id_reused());
                }
                if let Some(reason) = record.get("refused") {
                    return Err(refusal(reason));
                }
                if let Some(message) = self.store.message(&conv, &message_id).await? {
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
            let pair = Pair::from_fields(&pair_fields);
            if !claimed {
                precheck(&pair)?;
            }
            let kind = self.decide_kind(
                &pair,
                input.sender,
                input.recipient,
                open_profile.as_ref(),
                accepts_inmail,
            )?;
            check_size(kind, input.subject, input.body)?;
            let now = self.clock.now_ms().await?;
            let month = domain::calendar_month(now);
            let begin = Begin {
                sender: input.sender,
                request_id: input.request_id,
                fingerprint: input.fingerprint,
                message_id: &message_id,
                conv: &conv,
                kind: kind.as_str(),
                now_ms: now,
                month: &month,
            };
            let attempt = if kind == Kind::Inmail {
                self.send_inmail(ctx, input, &begin).await
            } else {
                if !claimed {
                    match self.store.begin_send(&begin, &self.config.limits).await? {
                        Begun::New => {}
                        Begun::Exists { .. } => continue,
                        other => return Err(begin_refused(other, now)),
                    }
                }
                self.send_free(ctx, input, &conv, &message_id, kind, &pair, now)
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
            "CONVERSATION_CHANGING",
            "the conversation kept changing while the message was sent; retry the same request",
        ))
    }

    fn decide_kind(
        &self,
        pair: &Pair,
        sender: &str,
        recipient: &str,
        open_profile: Option<&Result<bool, ApiError>>,
        accepts_inmail: bool,
    ) -> Result<Kind, ApiError> {
        let known = open_profile.and_then(|r| r.as_ref().ok().copied());
        match decide(
            pair,
            sender,
            recipient,
            self.config.policy,
            known,
            accepts_inmail,
        )? {
            Decision::Kind(kind) => Ok(kind),
            // Needed, but subscription-plan could not say.
            Decision::NeedOpenProfile => Err(match open_profile {
                Some(Err(err)) => err.clone(),
                _ => ApiError::internal("the recipient's Open Profile was not asked for"),
            }),
        }
    }

    /// A free message: delivered in one step. `None` when the pair changed.
    #[allow(clippy::too_many_arguments)]
    async fn send_free(
        &self,
        ctx: &CallContext,
        input: &SendInput<'_>,
        conv: &str,
        message_id: &str,
        kind: Kind,
        pair: &Pair,
        now: i64,
    ) -> Result<Option<Sent>, ApiError> {
        let (a, b) = domain::sorted(input.sender, input.recipient);
        // Answering the recipient's InMail makes its refund due: note that
        // in the outbox first, so a crash cannot lose the refund.
        let answering = pair
            .inmail
            .as_ref()
            .filter(|i| {
                i.sender == input.recipient && i.stage == domain::InmailStage::AwaitingResponse
            })
            .map(|i| OutboxItem::Refund {
                conv: conv.to_string(),
                inmail_id: i.message_id.clone(),
                sender: i.sender.clone(),
            });
        if let Some(item) = &answering {
            // Looked at only after any call that is responding right now is
            // over (REQUEST_TIMEOUT < SEND_RECOVERY_AFTER), so the sweeper
            // never mistakes an in-flight response for no response.
            let retry_at = now + self.config.recovery_after.as_millis() as i64;
            self.store.outbox_add(item, retry_at).await?;
        }
        let delivery = Delivery {
            staged: false,
            conv,
            a,
            b,
            message_id,
            sender: input.sender,
            recipient: input.recipient,
            kind: kind.as_str(),
            subject: input.subject,
            body: input.body,
            credits: 0,
            now_ms: now,
            refund_window_ms: self.window_ms(),
            balance_after: None,
            fingerprint: input.fingerprint,
        };
        let reply = self.store.deliver(&delivery).await?;
        let fields = match reply {
            PairReply::Ok(fields) => fields,
            PairReply::State { .. } => return Ok(None),
            PairReply::Refused(reason) => {
                self.store
                    .record_refusal(input.sender, input.request_id, &reason)
                    .await?;
                return Err(refusal(&reason));
            }
            PairReply::Retry | PairReply::NotFound => return Ok(None),
        };
        let refund = self
            .settle_response(
                ctx,
                conv,
                fields.get(2).map(String::as_str).unwrap_or(""),
                &fields,
                answering,
            )
            .await;
        let message = StoredMessage {
            id: message_id.to_string(),
            from: input.sender.to_string(),
            to: input.recipient.to_string(),
            kind: kind.as_str().to_string(),
            subject: input.subject.to_string(),
            body: input.body.to_string(),
            credits: 0,
            at_ms: now,
            state: "delivered".into(),
            reason: String::new(),
            balance_after: None,
            fingerprint: input.fingerprint.to_string(),
        };
        // Free messages do not touch billing; the balance is a courtesy.
        let balance_after = self.billing.available(ctx, input.sender).await.ok();
        Ok(Some(Sent {
            conv: conv.to_string(),
            message,
            balance_after,
            refund,
        }))
    }

    /// After a response: asks billing for the refund when one is due.
    /// `fields` is the pair script's answer: [.., .., refund, inmail id,
    /// inmail sender] (deliver) or [refund, inmail id, inmail sender]
    /// (respond); `refund` is passed separately.
    async fn settle_response(
        &self,
        ctx: &CallContext,
        conv: &str,
        refund: &str,
        fields: &[String],
        outbox: Option<OutboxItem>,
    ) -> Refund {
        let result = match refund {
            "due" => {
                let (inmail_id, inmail_sender) =
                    (&fields[fields.len() - 2], &fields[fields.len() - 1]);
                self.refund_inmail(ctx, conv, inmail_id, inmail_sender)
                    .await
            }
            "closed" => Refund::WindowClosed,
            _ => Refund::None,
        };
        // Only the call whose script made the refund due (or closed) may drop
        // the entry: other calls answering the same InMail share it.
        if matches!(refund, "due" | "closed")
            && result != Refund::Pending
            && let Some(item) = outbox
            && let Err(err) = self.store.outbox_remove(&item).await
        {
            tracing::debug!(error = %err, "outbox entry left for the sweeper");
        }
        result
    }

    /// The recipient accepts or declines the InMail awaiting their response.
    pub async fn accept_or_decline(
        &self,
        ctx: &CallContext,
        conv: &str,
        responder: &str,
        accept: bool,
    ) -> Result<Refund, ApiError> {
        let pair = Pair::from_fields(&self.store.conversation(conv).await?);
        let wanted = if accept {
            domain::InmailStage::Accepted
        } else {
            domain::InmailStage::Declined
        };
        // Accepting (or declining) twice answers the same: a retry whose
        // first attempt was cut short after the response was recorded gets
        // that response, not a refusal.
        if let Some(done) = pair
            .inmail
            .as_ref()
            .filter(|i| i.stage == wanted && i.sender != responder)
        {
            return Ok(match done.refund.as_str() {
                "refunded" => Refund::Refunded,
                "due" => Refund::Pending,
                "closed" => Refund::WindowClosed,
                _ => Refund::None,
            });
        }
        let Some(inmail) = pair
            .inmail
            .filter(|i| i.stage == domain::InmailStage::AwaitingResponse && i.sender != responder)
        else {
            return Err(refusal("NO_INMAIL_AWAITING_RESPONSE"));
        };
        let now = self.clock.now_ms().await?;
        let item = OutboxItem::Refund {
            conv: conv.to_string(),
            inmail_id: inmail.message_id.clone(),
            sender: inmail.sender.clone(),
        };
        self.store
            .outbox_add(&item, now + self.config.recovery_after.as_millis() as i64)
            .await?;
        let (a, b) = domain::conversation_members(conv)
            .ok_or_else(|| ApiError::internal("bad conversation id"))?;
        self.store.touch_inboxes(conv, a, b, now).await?;
        let state = if accept { "accepted" } else { "declined" };
        let fields = match self
            .store
            .respond(conv, responder, state, now, self.window_ms())
            .await?
        {
            PairReply::Ok(fields) => fields,
            PairReply::NotFound => return Err(crate::error::conversation_not_found()),
            // The entry may be another response's: the sweeper drops it when
            // no refund is due.
            PairReply::Refused(reason) => return Err(refusal(&reason)),
            other => return Err(ApiError::internal(format!("respond answered {other:?}"))),
        };
        let refund = fields.first().cloned().unwrap_or_default();
        Ok(self
            .settle_response(ctx, conv, &refund, &fields, Some(item))
            .await)
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
    ) -> Refund {
        match self.billing.refund(ctx, inmail_sender, inmail_id).await {
            Ok(_) => match self.store.settle_refund(conv, inmail_id, "refunded").await {
                Ok(()) => {
                    metrics::counter!("inmail_refunds_total").increment(1);
                    Refund::Refunded
                }
                Err(_) => Refund::Pending,
            },
            Err(ApiError::FailedPrecondition {
                reason: "REFUND_WINDOW_CLOSED",
                ..
            }) => match self.store.settle_refund(conv, inmail_id, "closed").await {
                Ok(()) => Refund::WindowClosed,
                Err(_) => Refund::Pending,
            },
            Err(err) => {
                tracing::warn!(%inmail_id, error = %err, "refund not taken yet; the sweeper will retry");
                Refund::Pending
            }
        }
    }

    /// An InMail: claim, token and stage in one round trip, then the commit
    /// steps. `None` when the pair changed.
    async fn send_inmail(
        &self,
        ctx: &CallContext,
        input: &SendInput<'_>,
        begin: &Begin<'_>,
    ) -> Result<Option<Sent>, ApiError> {
        let (conv, message_id, now) = (begin.conv, begin.message_id, begin.now_ms);
        let (a, b) = domain::sorted(input.sender, input.recipient);
        let stage = Stage {
            conv,
            a,
            b,
            message_id,
            sender: input.sender,
            recipient: input.recipient,
            subject: input.subject,
            body: input.body,
            now_ms: now,
            look_again_at_ms: now + self.config.recovery_after.as_millis() as i64,
            fingerprint: input.fingerprint,
        };
        let (begun, staged) = self
            .store
            .begin_and_stage(begin, &self.config.limits, &stage)
            .await?;
        let item = OutboxItem::Send {
            conv: conv.to_string(),
            message_id: message_id.to_string(),
            sender: input.sender.to_string(),
        };
        if !matches!(begun, Begun::New | Begun::Exists { .. }) {
            // Refused (rate limit, request id reused): undo what this call
            // staged; a message staged by an earlier attempt stays.
            if matches!(staged, PairReply::Ok(_)) {
                self.store
                    .forget_staged(conv, message_id, input.fingerprint)
                    .await?;
            }
            if !matches!(staged, PairReply::State { .. }) {
                self.store.outbox_remove(&item).await?;
            }
            return Err(begin_refused(begun, now));
        }
        match staged {
            PairReply::Ok(_) => {}
            // Staged before, by this request (resume it) or by a concurrent
            // one with other arguments (which undoes it): read and decide again.
            PairReply::State { .. } => return Ok(None),
            PairReply::Refused(reason) => {
                self.store.outbox_remove(&item).await?;
                self.store
                    .record_refusal(input.sender, input.request_id, &reason)
                    .await?;
                return Err(refusal(&reason));
            }
            PairReply::Retry | PairReply::NotFound => {
                self.store.outbox_remove(&item).await?;
                return Ok(None);
            }
        }
        let message = StoredMessage {
            id: message_id.to_string(),
            from: input.sender.to_string(),
            to: input.recipient.to_string(),
            kind: Kind::Inmail.as_str().to_string(),
            subject: input.subject.to_string(),
            body: input.body.to_string(),
            credits: Kind::Inmail.credits(),
            at_ms: now,
            state: "staged".into(),
            reason: String::new(),
            balance_after: None,
            fingerprint: input.fingerprint.to_string(),
        };
        self.commit_inmail(ctx, conv, message).await.map(Some)
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
                self.give_up(conv, &message, reason).await?;
                return Err(match reason {
                    "INSUFFICIENT_CREDITS" | "PAID_PLAN_REQUIRED" => err,
                    other => refusal(other),
                });
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
            Err(ApiError::FailedPrecondition { reason, .. }) => {
                self.give_up(conv, &message, reason).await?;
                return Err(refusal(reason));
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
                if let Err(err) = self.give_up(conv, message, "NOT_STORED").await {
                    tracing::warn!(error = %err, "staged message left for the sweeper");
                }
                cause
            }
            Err(ApiError::FailedPrecondition {
                reason: "DEBIT_CONFIRMED",
                ..
            }) => match self.deliver_committed(conv, message, None).await {
                Ok(_) => ApiError::unavailable(
                    "RETRY_TO_SEE_RESULT",
                    "the message was sent; retry the same request to get it",
                ),
                Err(err) => err,
            },
            // Billing cannot be told: its hold expiry gives the credit back.
            Err(_) => cause,
        }
    }

    /// Marks a staged message failed and drops its outbox entry.
    async fn give_up(
        &self,
        conv: &str,
        message: &StoredMessage,
        reason: &str,
    ) -> Result<(), ApiError> {
        self.store
            .fail_staged(
                conv,
                &message.id,
                reason,
                self.config.failed_keep.as_millis() as i64,
            )
            .await?;
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
        let (a, b) = domain::sorted(&message.from, &message.to);
        let now = self.clock.now_ms().await?;
        let delivery = Delivery {
            staged: true,
            conv,
            a,
            b,
            message_id: &message.id,
            sender: &message.from,
            recipient: &message.to,
            kind: &message.kind,
            subject: &message.subject,
            body: &message.body,
            credits: message.credits,
            now_ms: now,
            refund_window_ms: self.window_ms(),
            balance_after,
            fingerprint: &message.fingerprint,
        };
        let delivered = match self.store.deliver(&delivery).await? {
            PairReply::Ok(_) => {
                metrics::counter!("inmail_credits_charged_total")
                    .increment(message.credits.max(0) as u64);
                StoredMessage {
                    state: "delivered".into(),
                    balance_after,
                    ..message.clone()
                }
            }
            PairReply::State { state, .. } if state == "delivered" => self
                .store
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
        match message.state.as_str() {
            "delivered" => {
                let refund = if message.kind == Kind::Reply.as_str() {
                    let pair = Pair::from_fields(&self.store.conversation(conv).await?);
                    match pair.inmail {
                        Some(inmail)
                            if inmail.sender == message.to
                                && inmail.responded_at_ms == message.at_ms =>
                        {
                            match inmail.refund.as_str() {
                                "refunded" => Refund::Refunded,
                                "due" => Refund::Pending,
                                "closed" => Refund::WindowClosed,
                                _ => Refund::None,
                            }
                        }
                        _ => Refund::None,
                    }
                } else {
                    Refund::None
                };
                let balance_after = match message.balance_after {
                    Some(balance) => Some(balance),
                    None => self.billing.available(ctx, &message.from).await.ok(),
                };
                Ok(Sent {
                    conv: conv.to_string(),
                    message,
                    balance_after,
                    refund,
                })
            }
            "failed" => Err(refusal(&message.reason)),
            "staged" => self.commit_inmail(ctx, conv, message).await,
            other => Err(ApiError::internal(format!(
                "message in unknown state {other:?}"
            ))),
        }
    }

    /// The sweeper's view of a send whose process may have died: finish it by
    /// the state billing holds for its debit.
    pub(crate) async fn recover_send(
        &self,
        ctx: &CallContext,
        conv: &str,
        message_id: &str,
        sender: &str,
    ) -> Result<(), ApiError> {
        let Some(message) = self.store.message(conv, message_id).await? else {
            return Ok(());
        };
        if message.state != "staged" {
            return Ok(());
        }
        let state = self
            .billing
            .get_debit(ctx, sender, message_id)
            .await?
            .map(|d| DebitState::try_from(d.state).unwrap_or(DebitState::Unspecified));
        match state {
            Some(DebitState::Confirmed | DebitState::Refunded) => {
                tracing::info!(%message_id, "recovering a committed send: delivering");
                self.deliver_committed(conv, &message, None)
                    .await
                    .map(|_| ())
            }
            Some(DebitState::Released) => self.give_up(conv, &message, "DEBIT_RELEASED").await,
            // Never debited, or held by a send that died: give it up (a
            // release of an unknown id blocks a late debit of it).
            _ => match self
                .billing
                .release(ctx, sender, message_id, billing::ReleaseReason::Abandoned)
                .await
            {
                Ok(_) => {
                    tracing::info!(%message_id, "recovering an unfinished send: released and given up");
                    self.give_up(conv, &message, "ABANDONED").await
                }
                Err(ApiError::FailedPrecondition {
                    reason: "DEBIT_CONFIRMED",
                    ..
                }) => self
                    .deliver_committed(conv, &message, None)
                    .await
                    .map(|_| ()),
                Err(err) => Err(err),
            },
        }
    }
}

/// The error for a request BEGIN_SEND did not let through.
fn begin_refused(begun: Begun, now_ms: i64) -> ApiError {
    match begun {
        Begun::RateLimited { retry_after_ms } => {
            rate_limited(Duration::from_millis(retry_after_ms))
        }
        Begun::OpenProfileLimited => {
            let wait = domain::next_month_start_ms(now_ms) - now_ms;
            open_profile_limited(Duration::from_millis(wait.max(0) as u64))
        }
        Begun::Mismatch => ApiError::request_id_reused(),
        Begun::New | Begun::Exists { .. } => {
            ApiError::internal("a claimed request is not a refusal")
        }
    }
}

/// Subject and body limits depend on the kind (DESIGN.md §3).
fn check_size(kind: Kind, subject: &str, body: &str) -> Result<(), ApiError> {
    let mut checks = inmail_shared::validate::Checks::new();
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
