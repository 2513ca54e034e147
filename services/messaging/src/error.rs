//! messaging's error table: each refusal and the gRPC code it becomes.

use std::time::Duration;

use inmail_shared::ApiError;

use crate::domain::SendRefusal;

/// `ErrorInfo.domain` of this service's errors.
pub const DOMAIN: &str = "messaging.inmail";

impl From<SendRefusal> for ApiError {
    fn from(refusal: SendRefusal) -> Self {
        let message = refusal.to_string();
        match refusal {
            SendRefusal::Blocked => ApiError::failed_precondition("BLOCKED", message),
            SendRefusal::AwaitingResponse => {
                ApiError::failed_precondition("AWAITING_RESPONSE", message)
            }
            SendRefusal::InmailNotAccepted => {
                ApiError::failed_precondition("INMAIL_NOT_ACCEPTED", message)
            }
            // Another send of this pair is in flight; the same request may be
            // retried as soon as it settles.
            SendRefusal::ConcurrentInmail => ApiError::aborted("CONCURRENT_INMAIL", message),
        }
    }
}

/// The error for a refusal reason a script or a stored failure names.
pub fn refusal(reason: &str) -> ApiError {
    match reason {
        "BLOCKED" => SendRefusal::Blocked.into(),
        "AWAITING_RESPONSE" => SendRefusal::AwaitingResponse.into(),
        "INMAIL_NOT_ACCEPTED" => SendRefusal::InmailNotAccepted.into(),
        "INSUFFICIENT_CREDITS" => ApiError::failed_precondition(
            "INSUFFICIENT_CREDITS",
            "the sender has no InMail credit left",
        ),
        "PAID_PLAN_REQUIRED" => ApiError::failed_precondition(
            "PAID_PLAN_REQUIRED",
            "InMail needs a paid plan; free members can message connections and Open Profiles",
        ),
        "NO_INMAIL_AWAITING_RESPONSE" => ApiError::failed_precondition(
            "NO_INMAIL_AWAITING_RESPONSE",
            "no InMail from the other member awaits this member's response",
        ),
        // The send was given up after its credit was taken; the credit went
        // back. A new request id sends again.
        "DEBIT_RELEASED" | "ABANDONED" | "NOT_STORED" | "MESSAGE_ID_CONFLICT" => {
            ApiError::failed_precondition(
                "SEND_ABANDONED",
                "the message could not be delivered and its credit was returned; send it again with a new request_id",
            )
        }
        other => ApiError::internal(format!("unknown refusal reason {other:?}")),
    }
}

pub fn rate_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        "INMAIL_RATE_LIMITED",
        format!(
            "too many InMails from this sender; the next one is allowed in {}s",
            retry_after.as_secs().max(1)
        ),
        retry_after,
    )
}

pub fn open_profile_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        "OPEN_PROFILE_MONTHLY_LIMIT",
        "this sender reached the monthly limit of Open Profile messages",
        retry_after,
    )
}

pub fn conversation_not_found() -> ApiError {
    ApiError::not_found(
        "CONVERSATION_NOT_FOUND",
        "no such conversation for this member",
    )
}
