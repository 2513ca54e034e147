//! Calling another service: lazily connected channels, and retries of what is
//! safe to retry (UNAVAILABLE: the call may not have arrived) within the
//! caller's deadline, always with the same request (same request_id).

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::context::CallContext;

/// A channel that dials on first use and redials by itself, so a service
/// starts even while the services it calls are down.
pub fn lazy_channel(url: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    if endpoint.uri().scheme_str().is_none() || endpoint.uri().host().is_none() {
        return Err(format!(
            "{url:?} is not a valid URL: expected e.g. http://127.0.0.1:50052"
        ));
    }
    Ok(endpoint
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Runs `call` until it answers something other than UNAVAILABLE, backing off
/// between tries, while the caller's deadline allows. `call` must send the same
/// request (same request_id) each time.
pub async fn with_retries<T, F, Fut>(ctx: &CallContext, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        match call().await {
            Err(status) if status.code() == Code::Unavailable => {
                // Leave room for one more attempt after sleeping.
                if ctx.remaining() <= backoff * 2 {
                    return Err(status);
                }
                tracing::debug!(error = %status.message(), ?backoff, "downstream unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn malformed_urls_are_refused() {
        assert!(lazy_channel("not a url").is_err());
        assert!(lazy_channel("127.0.0.1:50051").is_err());
        assert!(lazy_channel("http://127.0.0.1:50051").is_ok());
    }

    #[tokio::test]
    async fn retries_unavailable_until_an_answer() {
        let ctx = CallContext::background(Duration::from_secs(2));
        let mut attempts = 0;
        let result: Result<u32, Status> = with_retries(&ctx, || {
            attempts += 1;
            let n = attempts;
            async move {
                if n < 3 {
                    Err(Status::unavailable("down"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[tokio::test]
    async fn does_not_retry_refusals() {
        let ctx = CallContext::background(Duration::from_secs(2));
        let mut attempts = 0;
        let result: Result<(), Status> = with_retries(&ctx, || {
            attempts += 1;
            async { Err(Status::failed_precondition("no")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition);
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn gives_up_when_the_deadline_is_spent() {
        let ctx = CallContext::background(Duration::from_millis(50));
        let result: Result<(), Status> =
            with_retries(&ctx, || async { Err(Status::unavailable("down")) }).await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert!(ctx.expired() || ctx.remaining() < Duration::from_millis(50));
    }
}
