//! Calling another service: lazily connected channels, and retries of what is
//! safe to retry (UNAVAILABLE: the call may not have arrived) within the
//! caller's deadline, always with the same request (same request_id).

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::runtime::auth::Security;
use crate::runtime::context::CallContext;

/// A channel that dials on first use and redials by itself, so a service
/// starts even while the services it calls are down. With `tls`, the URL
/// must be `https://` (mutual TLS with the service's own certificate).
/// `tls`: the client's settings and the verifier of the server's
/// certificate (e.g. [`crate::runtime::auth::tls::SpiffeServerVerifier`]).
pub fn lazy_channel(
    url: &str,
    tls: Option<(ClientTlsConfig, Arc<dyn ServerCertVerifier>)>,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    if endpoint.uri().scheme_str().is_none() || endpoint.uri().host().is_none() {
        return Err(format!(
            "{url:?} is not a valid URL: expected e.g. https://127.0.0.1:50052"
        ));
    }
    let endpoint = match tls {
        Some((tls, verifier)) => endpoint
            .tls_config_with_verifier(tls, verifier)
            .map_err(|e| format!("{url:?}: cannot use TLS: {e}"))?,
        None => endpoint,
    };
    Ok(endpoint
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Tries of one call: the first and two retries.
const ATTEMPTS: usize = 3;

/// Whether a status came from the transport (the call may not have reached
/// the service: safe to try again, the request carries its request id)
/// rather than from the service itself, which always says why in an
/// `ErrorInfo`.
fn not_answered(status: &Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == Code::Unavailable && status.get_details_error_info().is_none()
}

/// Runs `call` again, with the same request, while it fails before reaching
/// the service — at most [`ATTEMPTS`] tries, within the caller's deadline.
/// A service that answers UNAVAILABLE itself (its Redis is down) is not
/// asked again: the caller learns it at once.
pub async fn with_retries<T, F, Fut>(ctx: &CallContext, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut backoff = Duration::from_millis(10);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(status) if not_answered(&status) && attempt < ATTEMPTS => {
                // Leave room for one more attempt after sleeping.
                if ctx.remaining() <= backoff * 2 {
                    return Err(status);
                }
                tracing::debug!(error = %status.message(), ?backoff, "downstream not reached; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 4;
                attempt += 1;
            }
            other => return other,
        }
    }
}

type Breaker = failsafe::StateMachine<
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::Exponential>,
    (),
>;

/// A service this one calls, behind a circuit breaker: after
/// [`Downstream::FAILURES`] failures in a row (unreachable, UNAVAILABLE,
/// or no answer within [`Downstream::attempt_timeout`]; a call ended by the
/// caller's own deadline or a cancellation counts neither way) calls fail at once
/// with UNAVAILABLE for a while (1 s, doubling up to 10 s while it stays
/// down), then calls go through again to see whether it is back. A dead dependency costs milliseconds,
/// not every caller's deadline.
#[derive(Clone)]
pub struct Downstream {
    name: &'static str,
    breaker: Breaker,
    attempt_timeout: Duration,
}

impl std::fmt::Debug for Downstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downstream")
            .field("name", &self.name)
            .finish()
    }
}

impl Downstream {
    pub const FAILURES: u32 = 5;

    /// `attempt_timeout`: the longest one try may take (a healthy call takes
    /// milliseconds; a hung service is given up on after this).
    pub fn new(name: &'static str, attempt_timeout: Duration) -> Self {
        let backoff =
            failsafe::backoff::exponential(Duration::from_secs(1), Duration::from_secs(10));
        let policy = failsafe::failure_policy::consecutive_failures(Self::FAILURES, backoff);
        Self {
            name,
            breaker: failsafe::Config::new().failure_policy(policy).build(),
            attempt_timeout,
        }
    }

    /// Calls the service (see [`with_retries`]) unless the breaker is open.
    pub async fn call<T, F, Fut>(&self, ctx: &CallContext, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        if !self.breaker.is_call_permitted() {
            return Err(Status::unavailable(format!(
                "{} is unavailable (it failed repeatedly; asking again shortly)",
                self.name
            )));
        }
        let limit = self.attempt_timeout;
        let result = with_retries(ctx, || {
            let attempt = call();
            async move {
                match tokio::time::timeout(limit.min(ctx.remaining()), attempt).await {
                    Ok(result) => result,
                    Err(_) => Err(Status::deadline_exceeded("no answer in time")),
                }
            }
        })
        .await;
        match Verdict::of(&result, ctx) {
            Verdict::Answered => self.breaker.on_success(),
            Verdict::Failed => self.breaker.on_error(),
            Verdict::CallersOwn => {}
        }
        result.map_err(|status| self.unreached(status))
    }

    /// A call that never reached the service fails with the transport's
    /// words (TLS errors naming the peer's certificate, socket errors): they
    /// go to the log, the caller learns only that the service could not be
    /// reached. The service's own answers pass unchanged.
    fn unreached(&self, status: Status) -> Status {
        if !not_answered(&status) {
            return status;
        }
        tracing::warn!(downstream = self.name, error = %status.message(), "downstream not reached");
        Status::unavailable(format!("{} could not be reached", self.name))
    }
}

/// What one call says about the downstream, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It answered (a refusal is an answer).
    Answered,
    /// Unreachable, UNAVAILABLE, or no answer within the attempt timeout.
    Failed,
    /// The caller's deadline ran out or the call was cancelled: says
    /// nothing about the downstream, so it counts neither way (a burst of
    /// callers with tiny deadlines must not open the breaker for everyone).
    CallersOwn,
}

impl Verdict {
    fn of<T>(result: &Result<T, Status>, ctx: &CallContext) -> Self {
        let Err(status) = result else {
            return Self::Answered;
        };
        // The caller's budget, not the downstream, ended the call: it is
        // (within a millisecond, the floor of an outgoing deadline) spent.
        let callers_deadline = ctx.remaining() < CALLERS_DEADLINE_SLACK;
        match status.code() {
            // tonic ends a call whose deadline passed with CANCELLED.
            Code::Cancelled => Self::CallersOwn,
            Code::Unavailable | Code::DeadlineExceeded if callers_deadline => Self::CallersOwn,
            Code::Unavailable | Code::DeadlineExceeded => Self::Failed,
            _ => Self::Answered,
        }
    }
}

/// A call failing with less than this left of the caller's deadline failed
/// because of that deadline.
const CALLERS_DEADLINE_SLACK: Duration = Duration::from_millis(1);

/// A lazily connected channel to `service` (mutual TLS unless in
/// plaintext mode; the server must prove it is
/// `spiffe://inmail/<service>`).
pub fn channel(
    security: &Security,
    var: &str,
    url: &str,
    service: &str,
) -> Result<Channel, String> {
    let tls = match security {
        Security::Tls { material, .. } => {
            let (tls, verifier) = material
                .client_config_for(service)
                .map_err(|e| format!("{var}: {e}"))?;
            Some((
                tls,
                verifier as Arc<dyn rustls::client::danger::ServerCertVerifier>,
            ))
        }
        Security::Plaintext => None,
    };
    lazy_channel(url, tls).map_err(|e| format!("{var}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn malformed_urls_are_refused() {
        assert!(lazy_channel("not a url", None).is_err());
        assert!(lazy_channel("127.0.0.1:50051", None).is_err());
        assert!(lazy_channel("http://127.0.0.1:50051", None).is_ok());
    }

    #[tokio::test]
    async fn retries_what_did_not_reach_the_service() {
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
    async fn does_not_retry_an_unavailable_answer() {
        let ctx = CallContext::background(Duration::from_secs(2));
        let mut attempts = 0;
        let answered =
            crate::contract::error::ApiError::unavailable("STORAGE_UNAVAILABLE", "redis down")
                .into_status("d");
        let result: Result<(), Status> = with_retries(&ctx, || {
            attempts += 1;
            let answered = answered.clone();
            async move { Err(answered) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn the_breaker_opens_after_repeated_failures() {
        let downstream = Downstream::new("x", Duration::from_secs(1));
        let ctx = CallContext::background(Duration::from_secs(2));
        let mut calls = 0;
        for _ in 0..Downstream::FAILURES {
            let _ = downstream
                .call(&ctx, || {
                    calls += 1;
                    async { Err::<(), _>(Status::unavailable("down")) }
                })
                .await;
        }
        let before = calls;
        let rejected = downstream
            .call(&ctx, || {
                calls += 1;
                async { Ok::<(), Status>(()) }
            })
            .await;
        assert_eq!(rejected.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls, before, "an open breaker does not call");
    }

    #[tokio::test]
    async fn a_callers_spent_deadline_or_cancellation_does_not_open_the_breaker() {
        let downstream = Downstream::new("x", Duration::from_secs(1));
        for _ in 0..2 * Downstream::FAILURES {
            let spent = CallContext::background(Duration::ZERO);
            let answer = downstream
                .call(&spent, || async {
                    Err::<(), _>(Status::deadline_exceeded("no answer in time"))
                })
                .await;
            assert_eq!(answer.unwrap_err().code(), Code::DeadlineExceeded);
            let ctx = CallContext::background(Duration::from_secs(2));
            let _ = downstream
                .call(&ctx, || async {
                    Err::<(), _>(Status::cancelled("Timeout expired"))
                })
                .await;
        }
        let ctx = CallContext::background(Duration::from_secs(2));
        let answer = downstream.call(&ctx, || async { Ok::<_, Status>(7) }).await;
        assert_eq!(answer.unwrap(), 7, "the breaker stayed closed");
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
