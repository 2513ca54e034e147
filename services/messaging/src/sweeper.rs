//! Finishes what a dead process left in the outbox: staged InMails
//! (delivered if billing confirmed them, given up and released otherwise) and
//! refunds that billing did not take yet. Idempotent, so any number of
//! replicas may sweep at once.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::context::CallContext;
use tokio_util::sync::CancellationToken;

use crate::domain::Pair;
use crate::send::{Messaging, Refund};
use crate::store::{OUTBOX_SHARDS, OutboxItem};

const BATCH: usize = 100;

pub fn spawn_outbox_sweeper(messaging: Messaging, interval: Duration, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            if let Err(err) = sweep_once(&messaging).await {
                tracing::warn!(error = %err, "outbox sweep failed; retrying next round");
            }
        }
    });
}

/// One pass over the outbox; answers how many items it finished.
///
/// Delivered sends are not taken out of the outbox when they are delivered
/// (that would cost every InMail one more write); they leave it here, in
/// batches: one round trip reads their states, one ZREM drops the finished.
pub async fn sweep_once(messaging: &Messaging) -> Result<usize, ApiError> {
    let now = messaging.clock.now_ms().await?;
    let store = messaging.store();
    let mut finished = 0;
    for shard in 0..OUTBOX_SHARDS {
        loop {
            let due = store.outbox_due(shard, now, BATCH).await?;
            if due.is_empty() {
                break;
            }
            let states = store.outbox_states(&due).await?;
            let mut done = Vec::with_capacity(due.len());
            for (item, state) in due.iter().zip(states) {
                let ctx = CallContext::background(Duration::from_secs(5));
                let finished_now = match item {
                    OutboxItem::Send {
                        conv,
                        message_id,
                        sender,
                    } => {
                        state.as_deref() != Some("staged")
                            || match messaging.recover_send(&ctx, conv, message_id, sender).await {
                                Ok(()) => true,
                                Err(err) => {
                                    tracing::warn!(%message_id, error = %err, "cannot finish a send yet");
                                    false
                                }
                            }
                    }
                    OutboxItem::Refund {
                        conv,
                        inmail_id,
                        sender,
                    } => {
                        let pair = Pair::from_fields(&store.conversation(conv).await?);
                        let due = pair
                            .inmail
                            .is_some_and(|i| &i.message_id == inmail_id && i.refund == "due");
                        !due || messaging.refund_inmail(&ctx, conv, inmail_id, sender).await
                            != Refund::Pending
                    }
                };
                if finished_now {
                    done.push(item.clone());
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
