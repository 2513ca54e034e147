//! The stack's clock. Off by default it is the system clock. With the test
//! clock on (`--test-clock`), now = system time + an offset kept in Redis, so
//! one AdvanceTime call moves all three services at once and tests cross
//! cycle ends and the 90-day window without waiting. The offset only grows.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, TimeZone, Utc};
use redis::Script;

use crate::contract::error::ApiError;
use crate::contract::reasons;
use crate::state::idempotency::{REQUEST_RETENTION, digest};
use crate::state::storage::Redis;

/// One slot for the offset and the request records of the clock (Redis
/// Cluster: the scripts below touch both).
const OFFSET_KEY: &str = "testclock:{clock}:offset_ms";
const REQUEST_KEY_PREFIX: &str = "testclock:{clock}:request:";

/// Moves the clock; see the script's header.
const MOVE_SCRIPT: &str = include_str!("lua/clock_move.lua");

#[derive(Clone)]
pub struct Clock {
    test: Option<Arc<TestClock>>,
}

struct TestClock {
    redis: Redis,
    move_script: Script,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("test", &self.test.is_some())
            .finish()
    }
}

impl Clock {
    pub fn system() -> Self {
        Self { test: None }
    }

    /// The shared test clock, stored in `redis`.
    pub fn test(redis: Redis) -> Self {
        Self {
            test: Some(Arc::new(TestClock {
                redis,
                move_script: Script::new(MOVE_SCRIPT),
            })),
        }
    }

    pub fn is_test(&self) -> bool {
        self.test.is_some()
    }

    pub async fn now(&self) -> Result<DateTime<Utc>, ApiError> {
        Ok(millis_to_datetime(self.now_ms().await?))
    }

    /// Milliseconds since the Unix epoch.
    pub async fn now_ms(&self) -> Result<i64, ApiError> {
        let system = system_ms();
        match &self.test {
            None => Ok(system),
            Some(test) => {
                let offset: Option<i64> = redis::cmd("GET")
                    .arg(OFFSET_KEY)
                    .query_async(&mut test.redis.conn())
                    .await?;
                Ok(system + offset.unwrap_or(0))
            }
        }
    }

    /// Moves the test clock `by` an amount or `to` a time (`mode`), once
    /// per `request_id`.
    pub async fn move_clock(
        &self,
        request_id: &str,
        mode: &str,
        amount_ms: i64,
    ) -> Result<DateTime<Utc>, ApiError> {
        let Some(test) = &self.test else {
            return Err(ApiError::failed_precondition(
                reasons::TEST_CLOCK_DISABLED,
                "the test clock is off; start the services with --test-clock (TEST_CLOCK=true) to move time",
            ));
        };
        let fp = digest(&[mode.as_bytes(), &amount_ms.to_be_bytes()]);
        let reply: Vec<String> = test
            .move_script
            .key(OFFSET_KEY)
            .key(format!("{REQUEST_KEY_PREFIX}{request_id}"))
            .arg(fp)
            .arg(mode)
            .arg(amount_ms)
            .arg(system_ms())
            .arg(REQUEST_RETENTION.as_millis() as u64)
            .invoke_async(&mut test.redis.conn())
            .await?;
        let now = |i: usize| -> Result<DateTime<Utc>, ApiError> {
            reply
                .get(i)
                .and_then(|s| s.parse::<i64>().ok())
                .map(millis_to_datetime)
                .ok_or_else(|| ApiError::internal("clock script answered no time"))
        };
        match reply.first().map(String::as_str) {
            Some("ok") => now(1),
            Some("mismatch") => Err(ApiError::request_id_reused()),
            Some("back") => Err(ApiError::failed_precondition(
                reasons::CLOCK_WOULD_GO_BACK,
                format!(
                    "the clock is already at {}; it only moves forward",
                    now(1)?.to_rfc3339()
                ),
            )),
            _ => Err(ApiError::internal("unexpected reply from the clock script")),
        }
    }
}

pub fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn millis_to_datetime(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}
