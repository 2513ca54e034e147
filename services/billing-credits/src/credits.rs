//! The credit operations, between the gRPC edge (and the sweeper) and the
//! scripts: runs a script, and when it says the cached entitlement cannot be
//! trusted, asks subscription-plan and runs it again with the answer.

use std::sync::Arc;
use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::runtime::context::CallContext;
use inmail_shared::state::clock::Clock;

use inmail_shared::contract::reasons;

use crate::entitlement::Entitlements;
use crate::error::refusal;
use crate::store::{BillingStore, Call, Outcome, Refusal, ReleaseCause, Reply, Retention};

/// How far a caller's clock may be off billing's (the services' clocks are
/// synchronised, within this): a `responded_at` may be this far ahead of
/// billing's now, or before the debit.
pub const MAX_CLOCK_SKEW_MS: i64 = 60_000;

/// How billing behaves; every figure is a flag.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long a debit stays held without confirmation before it is released.
    pub hold: Duration,
    /// How long after confirmation a refund is accepted.
    pub refund_window: Duration,
    pub retention: Retention,
}

/// One operation on a member's balance.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    Balance,
    Debit {
        message_id: &'a str,
        amount: i32,
    },
    Confirm {
        message_id: &'a str,
    },
    Release {
        message_id: &'a str,
        cause: ReleaseCause,
        only_if_expired: bool,
    },
    Refund {
        message_id: &'a str,
        /// When the recipient responded (epoch ms; `None`: now).
        responded_at_ms: Option<i64>,
    },
    Grant {
        amount: i32,
        reason: &'a str,
    },
    /// The low-balance threshold (0: off).
    SetAlert {
        threshold: i64,
    },
}

impl Op<'_> {
    fn message_id(&self) -> &str {
        match self {
            Op::Debit { message_id, .. }
            | Op::Confirm { message_id }
            | Op::Release { message_id, .. }
            | Op::Refund { message_id, .. } => message_id,
            Op::Balance | Op::Grant { .. } | Op::SetAlert { .. } => "",
        }
    }
}

#[derive(Clone)]
pub struct Credits {
    store: BillingStore,
    entitlements: Entitlements,
    clock: Clock,
    policy: Arc<Policy>,
}

/// A script answering "need/stale" again and again means the entitlement
/// keeps changing under us; give up after this many rounds.
const SETTLE_ATTEMPTS: usize = 4;

impl Credits {
    pub fn new(
        store: BillingStore,
        entitlements: Entitlements,
        clock: Clock,
        policy: Policy,
    ) -> Self {
        Self {
            store,
            entitlements,
            clock,
            policy: Arc::new(policy),
        }
    }

    pub fn store(&self) -> &BillingStore {
        &self.store
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Runs `op` for `member`. A refusal comes back as the error of the
    /// error table; the reply is returned only for "ok".
    pub async fn run(
        &self,
        ctx: &CallContext,
        member: &str,
        request_id: &str,
        fingerprint: &str,
        op: Op<'_>,
    ) -> Result<Reply, ApiError> {
        // Every script that may write a ledger entry (all but the lean
        // confirmation) is noted in the ledger feed's index first.
        if !matches!(op, Op::Confirm { .. }) {
            match self
                .store
                .index_for_feed(member, inmail_shared::state::events::wall_clock_ms())
                .await
            {
                Ok(()) => {}
                // Reads go on while Redis is full; a balance script that
                // would write (and so make an event) is refused by Redis too.
                Err(err) if matches!(op, Op::Balance) && err.reason() == reasons::STORAGE_FULL => {}
                Err(err) => return Err(err),
            }
        }
        let mut entitlement = String::new();
        let mut valid_until_ms = 0;
        let mut hold_expires_ms = 0;
        for _ in 0..SETTLE_ATTEMPTS {
            // Read for every attempt: asking subscription-plan takes time,
            // and a hold is judged against the time its script runs.
            let now_ms = self.clock.now_ms().await?;
            if let Op::Debit { message_id, .. } = op
                && now_ms >= hold_expires_ms
            {
                hold_expires_ms = now_ms + self.hold_for(ctx).as_millis() as i64;
                self.index_hold(member, message_id, hold_expires_ms).await?;
            }
            let call = Call {
                member,
                now_ms,
                entitlement: &entitlement,
                valid_until_ms,
                request_id,
                fingerprint,
                hold_expires_ms,
            };
            let reply = self.invoke(&call, op).await?;
            self.announce_events(member, op, &reply).await;
            match reply.s {
                Outcome::Need | Outcome::Stale => match self
                    .entitlements
                    .fetch(ctx, member, reply.ver, now_ms)
                    .await
                {
                    Ok(fetched) => {
                        entitlement = fetched.json;
                        valid_until_ms = fetched.valid_until_ms;
                    }
                    // A release gives a credit back: it must not wait for
                    // subscription-plan, so it settles on what billing knows.
                    Err(ApiError::Unavailable { .. } | ApiError::DeadlineExceeded { .. })
                        if matches!(op, Op::Release { .. }) && entitlement != "*" =>
                    {
                        tracing::warn!(%member, "subscription-plan unavailable: releasing on the cached entitlement");
                        entitlement = "*".into();
                    }
                    Err(err) => return Err(err),
                },
                Outcome::Mismatch => return Err(ApiError::request_id_reused()),
                Outcome::Ok => {
                    record_metrics(&reply);
                    return Ok(reply);
                }
                // An unconfirmed hold whose time ran out: release it as the
                // sweeper would, and refuse the confirmation.
                Outcome::Expired => {
                    let Op::Confirm { message_id } = op else {
                        return Err(ApiError::internal(
                            "only a confirmation can find a hold expired",
                        ));
                    };
                    let release = Op::Release {
                        message_id,
                        cause: ReleaseCause::HoldExpired,
                        only_if_expired: true,
                    };
                    Box::pin(self.run(ctx, member, "", "", release)).await?;
                    return Err(refusal(
                        Refusal::DebitReleased,
                        &Reply::default(),
                        member,
                        message_id,
                    ));
                }
                // The wait for subscription-plan outlived the hold's index
                // entry: index a new one and debit again.
                Outcome::Refused if reply.reason == Some(Refusal::HoldWindowMissed) => {
                    hold_expires_ms = 0;
                }
                Outcome::Refused => {
                    record_metrics(&reply);
                    let why = reply
                        .reason
                        .ok_or_else(|| ApiError::internal("a refusal without a reason"))?;
                    return Err(refusal(why, &reply, member, op.message_id()));
                }
            }
        }
        Err(ApiError::aborted(
            reasons::ENTITLEMENT_CHANGING,
            "the member's plan kept changing while the balance was settled; retry",
        ))
    }

    /// Tells the watchers a script wrote balance events (skipped for calls
    /// that moved nothing: the dispatcher's rescan catches the rest).
    async fn announce_events(&self, member: &str, op: Op<'_>, reply: &Reply) {
        if reply.replayed || !matches!(reply.s, Outcome::Ok | Outcome::Refused) {
            return;
        }
        let moved = [
            reply.renewed,
            reply.written_off,
            reply.debited,
            reply.released,
            reply.refunded,
            reply.granted,
        ]
        .iter()
        .any(|n| *n != 0);
        if (moved || matches!(op, Op::SetAlert { .. }))
            && let Err(err) = self.store.notify_events(member).await
        {
            tracing::debug!(error = %err, "balance events not announced; the rescan finds them");
        }
    }

    /// How long a hold made now lives: HOLD_TTL, or longer while the caller
    /// that made it may still confirm it (its remaining deadline), so a slow
    /// caller's confirmation never finds its own hold released.
    fn hold_for(&self, ctx: &CallContext) -> Duration {
        self.policy.hold.max(ctx.remaining())
    }

    /// Binds the message id to the member and indexes the hold's expiry, both
    /// before the debit script runs; refuses an id debited to another member.
    async fn index_hold(
        &self,
        member: &str,
        message_id: &str,
        expires_ms: i64,
    ) -> Result<(), ApiError> {
        let owner = self
            .store
            .prepare_debit(
                member,
                message_id,
                expires_ms,
                self.policy.retention.message_owner,
            )
            .await?;
        if owner != member {
            return Err(ApiError::failed_precondition(
                reasons::MESSAGE_ID_CONFLICT,
                format!("message {message_id} was already debited to another member"),
            ));
        }
        Ok(())
    }

    /// How long a hold index entry with no debit behind it is kept after its
    /// expiry: a debit script may still be about to run for it (its
    /// caller's clock may lag the sweeper's by up to this).
    pub fn orphan_grace(&self) -> Duration {
        self.policy.hold
    }

    async fn invoke(&self, call: &Call<'_>, op: Op<'_>) -> Result<Reply, ApiError> {
        let retention = &self.policy.retention;
        match op {
            Op::Balance => self.store.balance(call, retention.request).await,
            Op::Debit { message_id, amount } => {
                self.store
                    .debit(call, retention.request, message_id, amount)
                    .await
            }
            Op::Confirm { message_id } => {
                self.store
                    .confirm(call, retention, message_id, self.policy.refund_window)
                    .await
            }
            Op::Release {
                message_id,
                cause,
                only_if_expired,
            } => {
                self.store
                    .release(call, retention, message_id, cause, only_if_expired)
                    .await
            }
            Op::Refund {
                message_id,
                responded_at_ms,
            } => {
                let responded = responded_at_ms.unwrap_or(call.now_ms);
                let skew = Duration::from_millis(MAX_CLOCK_SKEW_MS as u64);
                self.store
                    .refund(call, retention.request, message_id, responded, skew)
                    .await
            }
            Op::Grant { amount, reason } => {
                self.store
                    .grant(call, retention.request, amount, reason)
                    .await
            }
            Op::SetAlert { threshold } => {
                self.store
                    .set_alert(call, retention.request, threshold)
                    .await
            }
        }
    }
}

fn record_metrics(reply: &Reply) {
    if reply.replayed {
        return;
    }
    for (name, amount) in [
        ("inmail_credits_debited_total", reply.debited),
        ("inmail_credits_refunded_total", reply.refunded),
        ("inmail_credits_released_total", reply.released),
        ("inmail_credits_renewed_total", reply.renewed),
        ("inmail_credits_written_off_total", reply.written_off),
        ("inmail_credits_granted_total", reply.granted),
    ] {
        if amount > 0 {
            metrics::counter!(name).increment(amount as u64);
        }
    }
}
