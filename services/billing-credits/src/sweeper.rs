//! Releases held debits that were not confirmed in time, so a credit never
//! stays charged for a message that was not stored (README.md, "Money guarantees"). Any
//! number of replicas may sweep at once: releasing is idempotent.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::context::CallContext;
use inmail_shared::sweep::spawn_periodic;
use tokio_util::sync::CancellationToken;

use crate::credits::{Credits, Op};
use crate::store::{DebitState, HOLD_SHARDS, ReleaseCause};

/// Expired holds handled per shard per round.
const BATCH: usize = 200;

pub fn spawn_hold_sweeper(credits: Credits, interval: Duration, stop: CancellationToken) {
    spawn_periodic("hold sweeper", interval, stop, move || {
        let credits = credits.clone();
        async move { sweep_once(&credits).await }
    });
}

/// One pass over every shard; answers how many holds it released.
///
/// Confirmed debits are not taken out of the index when they are confirmed
/// (that would cost every debit one more write); they leave it here, in
/// batches: one round trip reads the states, one ZREM drops the settled.
pub async fn sweep_once(credits: &Credits) -> Result<usize, ApiError> {
    let now = credits.clock().now_ms().await?;
    let store = credits.store();
    let mut released = 0;
    for shard in 0..HOLD_SHARDS {
        loop {
            let due = store.expired_holds(shard, now, BATCH).await?;
            if due.is_empty() {
                break;
            }
            let ids: Vec<(String, String)> = due
                .iter()
                .map(|(m, id, _)| (m.clone(), id.clone()))
                .collect();
            let states = store.debit_states(&ids).await?;
            let grace_ms = credits.orphan_grace().as_millis() as i64;
            let mut settled = Vec::with_capacity(due.len());
            for ((member, message_id, expiry), state) in due.iter().zip(states) {
                let entry = (member.clone(), message_id.clone());
                match state {
                    Some(DebitState::Held) => {}
                    // No debit behind the entry yet: its debit script may
                    // still run (it refuses once the entry's time is up);
                    // drop the entry only when that cannot be.
                    None if now < expiry + grace_ms => continue,
                    _ => {
                        settled.push(entry);
                        continue;
                    }
                }
                let ctx = CallContext::background(Duration::from_secs(5));
                let op = Op::Release {
                    message_id,
                    cause: ReleaseCause::HoldExpired,
                    only_if_expired: true,
                };
                match credits.run(&ctx, member, "", "", op).await {
                    Ok(reply) => {
                        if reply.released_now == Some(true) {
                            released += 1;
                            tracing::info!(%member, %message_id, "hold expired: credit released");
                        }
                        if reply.debit.is_none_or(|d| d.state != DebitState::Held) {
                            settled.push(entry);
                        }
                    }
                    // Confirmed meanwhile: nothing to release, ever.
                    Err(ApiError::FailedPrecondition {
                        reason: inmail_shared::reasons::DEBIT_CONFIRMED,
                        ..
                    }) => settled.push(entry),
                    Err(err) => {
                        tracing::warn!(%member, %message_id, error = %err, "cannot release an expired hold yet");
                    }
                }
            }
            let progressed = !settled.is_empty();
            store.forget_holds(shard, &settled).await?;
            if due.len() < BATCH || !progressed {
                break;
            }
        }
    }
    Ok(released)
}
