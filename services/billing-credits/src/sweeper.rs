//! Releases held debits that were not confirmed in time, so a credit never
//! stays charged for a message that was not stored (README.md, "Money guarantees"). The
//! replicas share the shards of the hold index ([`SweepGroup`]); releasing
//! is idempotent, so a shard swept twice while they change hands is harmless.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::runtime::context::CallContext;
use inmail_shared::state::sweep::{SweepGroup, spawn_shared_sweep};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::credits::{Credits, Op};
use crate::store::{DebitState, HOLD_SHARDS, ReleaseCause};

/// Expired holds handled per shard per round.
const BATCH: usize = 200;

/// The Redis key of the hold sweepers' group.
pub const GROUP_KEY: &str = "billing:sweepers";

pub fn spawn_hold_sweeper(
    credits: Credits,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let group = SweepGroup::new(credits.store().redis().clone(), GROUP_KEY, interval);
    spawn_shared_sweep(
        "hold sweeper",
        group,
        HOLD_SHARDS,
        interval,
        stop,
        move |shards| {
            let credits = credits.clone();
            async move { sweep_shards(&credits, &shards).await }
        },
    )
}

/// One pass over `shards`; answers how many holds it released.
///
/// Confirmed debits are not taken out of the index when they are confirmed
/// (that would cost every debit one more write); they leave it here, in
/// batches: one round trip reads the states, one script drops the settled
/// (each only if a retry did not index it again meanwhile).
async fn sweep_shards(credits: &Credits, shards: &[u32]) -> Result<usize, ApiError> {
    let now = credits.clock().now_ms().await?;
    let store = credits.store();
    let mut released = 0;
    for &shard in shards {
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
                let entry = (member.clone(), message_id.clone(), *expiry);
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
                        reason: inmail_shared::contract::reasons::DEBIT_CONFIRMED,
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
