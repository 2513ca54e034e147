//! The error every handler returns, and the one table that turns it into a
//! `tonic::Status` with google.rpc details (AIP-193): an English message, an
//! `ErrorInfo` with an UPPER_SNAKE reason, plus `BadRequest` for validation and
//! `RetryInfo` for what may be retried later.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::contract::reasons;

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// What went wrong, in the terms of the gRPC contract. Each service maps its own
/// domain errors onto this in one table of its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; nothing was changed.
    #[error("{message}")]
    InvalidArgument {
        reason: &'static str,
        message: String,
        violations: Vec<Violation>,
    },
    #[error("{message}")]
    NotFound {
        reason: &'static str,
        message: String,
    },
    /// The request is well-formed but the system is not in a state to do it.
    #[error("{message}")]
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },
    /// A quota or the server's capacity: retry after `retry_after`.
    #[error("{message}")]
    ResourceExhausted {
        reason: &'static str,
        message: String,
        retry_after: Duration,
    },
    /// A conflict with a concurrent change; retrying the same request is safe.
    #[error("{message}")]
    Aborted {
        reason: &'static str,
        message: String,
    },
    /// Redis or a service we depend on cannot be reached; retry with backoff.
    #[error("{message}")]
    Unavailable {
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    DeadlineExceeded {
        reason: &'static str,
        message: String,
    },
    /// The caller presented no credentials, or credentials that do not
    /// verify.
    #[error("{message}")]
    Unauthenticated {
        reason: &'static str,
        message: String,
    },
    /// The caller is known but may not do this.
    #[error("{message}")]
    PermissionDenied {
        reason: &'static str,
        message: String,
    },
    /// No such method is served.
    #[error("{message}")]
    Unimplemented { message: String },
    /// A bug or a broken invariant. The message is logged, not leaked.
    #[error("{message}")]
    Internal { message: String },
}

impl ApiError {
    /// A single invalid field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let violation = Violation::new(field, description);
        Self::invalid(vec![violation])
    }

    /// One or more invalid fields; the message names them all.
    pub fn invalid(violations: Vec<Violation>) -> Self {
        let message = violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        Self::InvalidArgument {
            reason: reasons::INVALID_FIELD,
            message: format!("invalid request: {message}"),
            violations,
        }
    }

    /// The same request_id was used before with other arguments (AIP-155).
    pub fn request_id_reused() -> Self {
        Self::InvalidArgument {
            reason: reasons::REQUEST_ID_REUSED,
            message: "request_id was already used for a request with different arguments".into(),
            violations: vec![Violation::new(
                "request_id",
                "already used for a request with different arguments",
            )],
        }
    }

    pub fn not_found(reason: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound {
            reason,
            message: message.into(),
        }
    }

    pub fn failed_precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            reason,
            message: message.into(),
        }
    }

    pub fn resource_exhausted(
        reason: &'static str,
        message: impl Into<String>,
        retry_after: Duration,
    ) -> Self {
        Self::ResourceExhausted {
            reason,
            message: message.into(),
            retry_after,
        }
    }

    pub fn aborted(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Aborted {
            reason,
            message: message.into(),
        }
    }

    pub fn unavailable(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable {
            reason,
            message: message.into(),
        }
    }

    pub fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Unauthenticated {
            reason,
            message: message.into(),
        }
    }

    pub fn permission_denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self::PermissionDenied {
            reason,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal {
            message: message.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::Aborted { .. } => Code::Aborted,
            Self::Unavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::Unauthenticated { .. } => Code::Unauthenticated,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::Unimplemented { .. } => Code::Unimplemented,
            Self::Internal { .. } => Code::Internal,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument { reason, .. }
            | Self::NotFound { reason, .. }
            | Self::FailedPrecondition { reason, .. }
            | Self::ResourceExhausted { reason, .. }
            | Self::Aborted { reason, .. }
            | Self::Unavailable { reason, .. }
            | Self::DeadlineExceeded { reason, .. }
            | Self::Unauthenticated { reason, .. }
            | Self::PermissionDenied { reason, .. } => reason,
            Self::Unimplemented { .. } => reasons::UNIMPLEMENTED,
            Self::Internal { .. } => reasons::INTERNAL,
        }
    }

    /// Whether a client retrying the same request later may see another
    /// outcome; such outcomes are never stored as "the first outcome" of a
    /// request_id.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::ResourceExhausted { .. }
                | Self::Aborted { .. }
                | Self::Unavailable { .. }
                | Self::DeadlineExceeded { .. }
                | Self::Internal { .. }
        )
    }

    /// The status for the wire. `domain` names the service in `ErrorInfo`.
    pub fn into_status(self, domain: &str) -> Status {
        let code = self.code();
        let reason = self.reason();
        let mut details = ErrorDetails::new();
        details.set_error_info(reason, domain, std::collections::HashMap::new());
        let message = match self {
            Self::InvalidArgument {
                message,
                violations,
                ..
            } => {
                details.set_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                message
            }
            Self::ResourceExhausted {
                message,
                retry_after,
                ..
            } => {
                details.set_retry_info(Some(retry_after));
                message
            }
            // Internal details stay in the logs; the caller learns only that
            // it was our fault.
            Self::Internal { message } => {
                tracing::error!(error = %message, "internal error");
                "internal error".to_string()
            }
            Self::NotFound { message, .. }
            | Self::FailedPrecondition { message, .. }
            | Self::Aborted { message, .. }
            | Self::Unavailable { message, .. }
            | Self::DeadlineExceeded { message, .. }
            | Self::Unauthenticated { message, .. }
            | Self::PermissionDenied { message, .. }
            | Self::Unimplemented { message } => message,
        };
        Status::with_error_details(code, message, details)
    }

    /// Rebuilds an error from a downstream service's status, keeping its code,
    /// reason and message, so a caller can pass it on under its own domain.
    pub fn from_status(status: &Status) -> Self {
        let details = status.get_error_details();
        let reason = details
            .error_info()
            .map(|info| info.reason.as_str())
            .unwrap_or(reasons::UPSTREAM_ERROR);
        let mut err = Self::from_parts(status.code(), reason, status.message().to_string());
        match &mut err {
            Self::InvalidArgument { violations, .. } => {
                if let Some(bad_request) = details.bad_request() {
                    *violations = bad_request
                        .field_violations
                        .iter()
                        .map(|v| Violation::new(v.field.clone(), v.description.clone()))
                        .collect();
                }
            }
            Self::ResourceExhausted { retry_after, .. } => {
                if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
                    *retry_after = delay;
                }
            }
            _ => {}
        }
        err
    }

    /// Rebuilds an error from its code, reason and message (a stored outcome or
    /// a downstream status).
    pub fn from_parts(code: Code, reason: &str, message: String) -> Self {
        let reason = intern_reason(reason);
        match code {
            Code::InvalidArgument => Self::InvalidArgument {
                reason,
                message,
                violations: Vec::new(),
            },
            Code::NotFound => Self::NotFound { reason, message },
            Code::FailedPrecondition | Code::AlreadyExists => {
                Self::FailedPrecondition { reason, message }
            }
            Code::PermissionDenied => Self::PermissionDenied { reason, message },
            Code::Unauthenticated => Self::Unauthenticated { reason, message },
            Code::ResourceExhausted => Self::ResourceExhausted {
                reason,
                message,
                retry_after: Duration::from_secs(1),
            },
            Code::Aborted => Self::Aborted { reason, message },
            Code::Unavailable | Code::Cancelled | Code::Unknown => Self::Unavailable {
                reason: if reason == reasons::UPSTREAM_ERROR {
                    reasons::UPSTREAM_UNAVAILABLE
                } else {
                    reason
                },
                message,
            },
            Code::DeadlineExceeded => Self::DeadlineExceeded { reason, message },
            _ => Self::Internal {
                message: format!("upstream answered {code:?} ({reason}): {message}"),
            },
        }
    }

    /// The message as written (for storing an outcome).
    pub fn message(&self) -> &str {
        match self {
            Self::InvalidArgument { message, .. }
            | Self::NotFound { message, .. }
            | Self::FailedPrecondition { message, .. }
            | Self::ResourceExhausted { message, .. }
            | Self::Aborted { message, .. }
            | Self::Unavailable { message, .. }
            | Self::DeadlineExceeded { message, .. }
            | Self::Unauthenticated { message, .. }
            | Self::PermissionDenied { message, .. }
            | Self::Unimplemented { message }
            | Self::Internal { message } => message,
        }
    }
}

/// Reasons are `&'static str` so the tables stay cheap; reasons read from a
/// downstream status are interned once per distinct value.
fn intern_reason(reason: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static INTERNED: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = INTERNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = set.get(reason) {
        return existing;
    }
    // Bounded: reasons are a small fixed vocabulary of our own services.
    if set.len() >= 256 {
        return reasons::UPSTREAM_ERROR;
    }
    let leaked: &'static str = Box::leak(reason.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// When Redis last refused a write for want of memory (ms since the epoch,
/// this machine's clock; 0: never).
static STORAGE_FULL_AT_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// How long after Redis's last out-of-memory refusal writes count as
/// refused (health's `writes` status; README.md, "Abuse bounds").
pub const STORAGE_FULL_HOLD: Duration = Duration::from_secs(5);

/// The RetryInfo of a STORAGE_FULL refusal.
const STORAGE_FULL_RETRY: Duration = Duration::from_secs(5);

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether Redis refused a write for want of memory within
/// [`STORAGE_FULL_HOLD`].
pub fn storage_full() -> bool {
    let at = STORAGE_FULL_AT_MS.load(std::sync::atomic::Ordering::Relaxed);
    at > 0 && epoch_ms() - at < STORAGE_FULL_HOLD.as_millis() as i64
}

/// Notes an out-of-memory refusal: counted, and logged when it starts.
fn note_storage_full(err: &redis::RedisError) {
    let was_full = storage_full();
    STORAGE_FULL_AT_MS.store(epoch_ms(), std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("inmail_storage_full_refusals_total").increment(1);
    if !was_full {
        tracing::error!(
            error = %err,
            "redis is full (maxmemory): writes are refused with STORAGE_FULL, reads go on"
        );
    }
}

/// Redis answered OOM: it is at its maxmemory (with noeviction, as shipped).
/// Every script checks before its first write, and Redis refuses that write
/// (or the whole script), so nothing is half-written.
/// (A pipeline's error carries the OOM of one of its commands only in its
/// text.)
fn is_out_of_memory(err: &redis::RedisError) -> bool {
    err.code() == Some("OOM")
        || err
            .to_string()
            .contains("command not allowed when used memory > 'maxmemory'")
}

/// Redis trouble: unreachable, timing out, loading or failing over is
/// `UNAVAILABLE` (retry later); full is `RESOURCE_EXHAUSTED` `STORAGE_FULL`
/// (retry later, or an operator adds memory); anything else is a bug in our
/// scripts.
impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        if is_out_of_memory(&err) {
            note_storage_full(&err);
            return Self::resource_exhausted(
                reasons::STORAGE_FULL,
                "storage is full: the change was not made; retry later",
                STORAGE_FULL_RETRY,
            );
        }
        let transient = err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_cluster_error()
            || matches!(
                err.kind(),
                ErrorKind::Server(ServerErrorKind::BusyLoading)
                    | ErrorKind::Server(ServerErrorKind::ReadOnly)
                    | ErrorKind::Server(ServerErrorKind::MasterDown)
                    | ErrorKind::ClusterConnectionNotFound
            );
        if transient {
            Self::unavailable(
                reasons::STORAGE_UNAVAILABLE,
                format!("storage unavailable: {err}"),
            )
        } else {
            Self::internal(format!("redis: {err}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_every_field_in_message_and_details() {
        let err = ApiError::invalid(vec![
            Violation::new("member_id", "must be 1-64 characters"),
            Violation::new("amount", "must be positive"),
        ]);
        let status = err.into_status("test.inmail");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("member_id"));
        assert!(status.message().contains("amount"));
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["member_id", "amount"]);
        assert_eq!(details.error_info().unwrap().reason, "INVALID_FIELD");
        assert_eq!(details.error_info().unwrap().domain, "test.inmail");
    }

    #[test]
    fn resource_exhausted_carries_retry_info() {
        let status = ApiError::resource_exhausted("RATE", "slow down", Duration::from_secs(7))
            .into_status("d");
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(7)));
    }

    #[test]
    fn downstream_status_round_trips_code_and_reason() {
        let original = ApiError::failed_precondition("INSUFFICIENT_CREDITS", "no credits left")
            .into_status("billing.inmail");
        let back = ApiError::from_status(&original);
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.reason(), "INSUFFICIENT_CREDITS");
        assert_eq!(back.to_string(), "no credits left");
    }

    #[test]
    fn internal_message_is_not_leaked() {
        let status = ApiError::internal("lua script exploded at line 3").into_status("d");
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
