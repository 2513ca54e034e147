//! Finishes what a dead process left in the outbox: staged InMails
//! (delivered if billing confirmed them, given up and released otherwise) and
//! refunds that billing did not take yet. The replicas share the outbox's
//! shards ([`SweepGroup`]); finishing is idempotent, so a shard swept twice
//! while they change hands is harmless.

use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::billing::v1::DebitState;
use inmail_shared::runtime::context::CallContext;
use inmail_shared::state::sweep::{SweepGroup, spawn_shared_sweep};
use inmail_shared::{ApiError, contract::reasons};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::SendFailure;
use crate::send::Messaging;
use crate::store::{MessageState, OUTBOX_SHARDS, OutboxItem};

const BATCH: usize = 100;

/// The Redis key of the outbox sweepers' group.
pub const GROUP_KEY: &str = "messaging:sweepers";

pub fn spawn_outbox_sweeper(
    messaging: Messaging,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let group = SweepGroup::new(messaging.store().redis().clone(), GROUP_KEY, interval);
    spawn_shared_sweep(
        "outbox sweeper",
        group,
        OUTBOX_SHARDS,
        interval,
        stop,
        move |shards| {
            let messaging = messaging.clone();
            async move { sweep_shards(&messaging, &shards).await }
        },
    )
}

/// One pass over `shards` of the outbox; answers how many items it finished.
///
/// Delivered sends are not taken out of the outbox when they are delivered
/// (that would cost every InMail one more write); they leave it here, in
/// batches: one round trip reads their states, one script drops the
/// finished (each only if a retry did not add it again meanwhile).
async fn sweep_shards(messaging: &Messaging, shards: &[u32]) -> Result<usize, ApiError> {
    let now = messaging.clock().now_ms().await?;
    let store = messaging.store();
    let mut finished = 0;
    for &shard in shards {
        loop {
            let due = store.outbox_due(shard, now, BATCH).await?;
            if due.is_empty() {
                break;
            }
            let items: Vec<OutboxItem> = due.iter().map(|(item, _)| item.clone()).collect();
            let states = store.outbox_states(&items).await?;
            let mut done = Vec::with_capacity(due.len());
            for ((item, due_at), state) in due.iter().zip(states) {
                let ctx = CallContext::background(Duration::from_secs(5));
                let finished_now = match item {
                    OutboxItem::Send {
                        conv,
                        message_id,
                        sender,
                    } => {
                        state != Some(MessageState::Staged)
                            || match messaging.recover_send(&ctx, conv, message_id, sender).await {
                                Ok(()) => true,
                                Err(err) => {
                                    tracing::warn!(%message_id, error = %err, "cannot finish a send yet");
                                    false
                                }
                            }
                    }
                    // Owed events of a message its process delivered
                    // and died: appended (at least once); of one not
                    // delivered: nothing to append.
                    // Owed events of a message archived since (its hash is
                    // gone from Redis): read from the history store.
                    OutboxItem::Events {
                        conv, message_id, ..
                    } => match state {
                        Some(MessageState::Delivered) | None => {
                            match messaging.message(conv, message_id).await {
                                Ok(Some(message)) if message.state == MessageState::Delivered => {
                                    messaging.publish_message(conv, &message).await;
                                    true
                                }
                                Ok(_) => true,
                                // The history store is down: kept for a
                                // later pass; the rest of the outbox goes on.
                                Err(err) => {
                                    tracing::warn!(%message_id, error = %err, "cannot read an archived message yet");
                                    false
                                }
                            }
                        }
                        Some(_) => true,
                    },
                    // A response's refund and events, owed from before it
                    // was recorded.
                    OutboxItem::Refund {
                        conv,
                        inmail_id,
                        sender,
                    } => {
                        messaging
                            .finish_owed_response(&ctx, conv, inmail_id, sender)
                            .await?
                    }
                };
                if finished_now {
                    done.push((item.clone(), *due_at));
                } else {
                    let retry_at = now + messaging.config.refund_retry.as_millis() as i64;
                    store.outbox_add(item, retry_at).await?;
                }
            }
            finished += done.len();
            store.outbox_remove_many(shard, &done).await?;
            if due.len() < BATCH || done.is_empty() {
                break;
            }
        }
    }
    Ok(finished)
}

impl Messaging {
    /// The sweeper's view of a send whose process may have died: finish it by
    /// the state billing holds for its debit.
    async fn recover_send(
        &self,
        ctx: &CallContext,
        conv: &str,
        message_id: &str,
        sender: &str,
    ) -> Result<(), ApiError> {
        let Some(message) = self.message(conv, message_id).await? else {
            return Ok(());
        };
        if message.state != MessageState::Staged {
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
            Some(DebitState::Released) => {
                self.give_up(conv, &message, SendFailure::DebitReleased)
                    .await
            }
            // Never debited, or held by a send that died: give it up (a
            // release of an unknown id blocks a late debit of it).
            _ => match self
                .billing
                .release(ctx, sender, message_id, billing::ReleaseReason::Abandoned)
                .await
            {
                Ok(released) => {
                    // A release of an id billing never debited carries no
                    // debit time: no credit was taken.
                    let charged = released
                        .debit
                        .as_ref()
                        .is_some_and(|d| d.debited_at.is_some());
                    tracing::info!(%message_id, charged, "recovering an unfinished send: released and given up");
                    let failure = if charged {
                        SendFailure::Abandoned
                    } else {
                        SendFailure::AbandonedUncharged
                    };
                    self.give_up(conv, &message, failure).await
                }
                Err(ApiError::FailedPrecondition {
                    reason: reasons::DEBIT_CONFIRMED,
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
