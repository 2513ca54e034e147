//! Releases held debits that were not confirmed in time, so a credit never
//! stays charged for a message that was not stored (DESIGN.md §4.3). Any
//! number of replicas may sweep at once: releasing is idempotent.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::context::CallContext;
use tokio_util::sync::CancellationToken;

use crate::credits::{Credits, Op};
use crate::store::HOLD_SHARDS;

/// Expired holds handled per shard per round.
const BATCH: usize = 200;

pub fn spawn_hold_sweeper(credits: Credits, interval: Duration, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            match sweep_once(&credits).await {
                Ok(0) => {}
                Ok(released) => tracing::info!(released, "released expired holds"),
                Err(err) => tracing::warn!(error = %err, "hold sweep failed; retrying next round"),
            }
        }
    });
}

/// One pass over every shard; answers how many holds it released.
pub async fn sweep_once(credits: &Credits) -> Result<usize, ApiError> {
    let now = credits.clock().now_ms().await?;
    let mut released = 0;
    for shard in 0..HOLD_SHARDS {
        for (member, message_id) in credits.store().expired_holds(shard, now, BATCH).await? {
            let ctx = CallContext::background(Duration::from_secs(5));
            let op = Op::Release {
                message_id: &message_id,
                reason: "HOLD_EXPIRED",
                only_if_expired: true,
            };
            let settled = match credits.run(&ctx, &member, "", "", op).await {
                Ok(reply) => {
                    if reply.released_now == Some(true) {
                        released += 1;
                        tracing::info!(%member, %message_id, "hold expired: credit released");
                    }
                    reply.debit.is_none_or(|d| d.state != "held")
                }
                // Confirmed in time: nothing to release, ever.
                Err(ApiError::FailedPrecondition {
                    reason: "DEBIT_CONFIRMED",
                    ..
                }) => true,
                Err(err) => {
                    tracing::warn!(%member, %message_id, error = %err, "cannot release an expired hold yet");
                    false
                }
            };
            if settled {
                credits.store().forget_hold(&member, &message_id).await?;
            }
        }
    }
    Ok(released)
}
