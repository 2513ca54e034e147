//! Background rounds (the hold sweeper, the outbox sweeper): one round every
//! interval until the service stops, errors logged and retried next round.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Runs `round` every `interval` until `stop` is cancelled. A round answers
/// how much work it finished (logged when non-zero).
pub fn spawn_periodic<F, Fut>(
    what: &'static str,
    interval: Duration,
    stop: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<usize, ApiError>> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            match round().await {
                Ok(0) => {}
                Ok(done) => tracing::info!(done, "{what}: round finished work"),
                Err(err) => {
                    tracing::warn!(error = %err, "{what}: round failed; retrying next round")
                }
            }
        }
    });
}

/// The shard of `key` among `shards` (FNV-1a: stable across builds and
/// hosts, so every replica agrees).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("alice", 16), shard_of("alice", 16));
        let used: std::collections::HashSet<_> = (0..200)
            .map(|i| shard_of(&format!("member-{i}"), 16))
            .collect();
        assert_eq!(used.len(), 16);
    }
}
