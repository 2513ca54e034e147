//! The Redis connection every service uses: one multiplexed connection
//! (ConnectionManager; PERF-NOTES.md: a pool does not add throughput) that
//! reconnects by itself, with short timeouts so calls fail fast with
//! UNAVAILABLE while Redis is down.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::ApiError;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on any single command or script.
    pub response_timeout: Duration,
}

impl RedisSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(2),
        }
    }
}

/// A cheap-to-clone handle on the service's Redis.
#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
    url: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("url", &self.url).finish()
    }
}

impl Redis {
    /// Validates the URL and prepares the connection without dialing: a
    /// service starts (and reports NOT_SERVING) even while Redis is down.
    pub fn open(settings: &RedisSettings) -> Result<Self, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("REDIS_URL {:?} is not a valid Redis URL: {e}", settings.url))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout))
            // Few, quick reconnection attempts: a caller waits on them, and
            // the next call starts a fresh attempt anyway.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot prepare the Redis connection: {e}"))?;
        Ok(Self {
            conn,
            url: redacted(&settings.url),
        })
    }

    /// A handle to run commands on; clones share one connection.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The URL without its password, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs a pipeline holding EVALSHA calls of `scripts` (see [`evalsha`]).
    /// When Redis answers NOSCRIPT (its script cache was flushed, or it
    /// restarted), loads the scripts and runs the pipeline once more, so every
    /// command of such a pipeline must be safe to run twice.
    ///
    /// The commands of one pipeline reach Redis in order on one connection,
    /// so an index written before a script is there when the script runs.
    pub async fn query_with_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        scripts: &[&redis::Script],
    ) -> Result<T, ApiError> {
        let mut conn = self.conn();
        match pipe.query_async(&mut conn).await {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                for script in scripts {
                    script.load_async(&mut conn).await?;
                }
                Ok(pipe.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }

    pub async fn ping(&self) -> Result<(), ApiError> {
        let mut conn = self.conn();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(ApiError::from)
    }
}

/// Appends `EVALSHA <script> <keys>` to a pipeline; chain `.arg()` for the
/// script's arguments and run it with [`Redis::query_with_scripts`].
pub fn evalsha<'p>(
    pipe: &'p mut redis::Pipeline,
    script: &redis::Script,
    keys: &[String],
) -> &'p mut redis::Pipeline {
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
}

fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_redacted() {
        assert_eq!(
            redacted("redis://user:secret@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[tokio::test]
    async fn malformed_url_is_refused_with_a_clear_message() {
        let err = Redis::open(&RedisSettings::new("http://nope")).unwrap_err();
        assert!(err.contains("REDIS_URL"), "{err}");
    }
}
