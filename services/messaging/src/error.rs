//! messaging's error table: each refusal and the gRPC code it becomes.

use std::time::Duration;

use inmail_shared::{ApiError, contract::reasons};

use crate::domain::SendFailure;
use crate::domain::SendRefusal;
use crate::store::InvitationRefusal;

/// `ErrorInfo.domain` of this service's errors.
pub const DOMAIN: &str = "messaging.inmail";

impl From<SendRefusal> for ApiError {
    fn from(refusal: SendRefusal) -> Self {
        let message = refusal.to_string();
        match refusal {
            SendRefusal::Blocked => ApiError::failed_precondition(reasons::BLOCKED, message),
            SendRefusal::AwaitingResponse => {
                ApiError::failed_precondition(reasons::AWAITING_RESPONSE, message)
            }
            SendRefusal::InmailNotAccepted => {
                ApiError::failed_precondition(reasons::INMAIL_NOT_ACCEPTED, message)
            }
            // Another send of this pair is in flight; the same request may be
            // retried as soon as it settles.
            SendRefusal::ConcurrentInmail => ApiError::aborted(reasons::CONCURRENT_INMAIL, message),
        }
    }
}

impl From<SendFailure> for ApiError {
    fn from(failure: SendFailure) -> Self {
        match failure {
            SendFailure::Blocked => SendRefusal::Blocked.into(),
            SendFailure::AwaitingResponse => SendRefusal::AwaitingResponse.into(),
            SendFailure::NoInmailAwaitingResponse => no_inmail_awaiting_response(),
            SendFailure::InsufficientCredits => ApiError::failed_precondition(
                reasons::INSUFFICIENT_CREDITS,
                "the sender has no InMail credit left",
            ),
            SendFailure::PaidPlanRequired => ApiError::failed_precondition(
                reasons::PAID_PLAN_REQUIRED,
                "InMail needs a paid plan; free members can message connections and Open Profiles",
            ),
            // The send was given up (README.md, "Money guarantees"); the
            // message says truthfully whether a credit moved. A new request
            // id sends again.
            SendFailure::DebitReleased | SendFailure::Abandoned | SendFailure::NotStored => {
                ApiError::failed_precondition(
                    reasons::SEND_ABANDONED,
                    "the message was not delivered; the credit taken for it was returned; send it again with a new request_id",
                )
            }
            SendFailure::AbandonedUncharged | SendFailure::MessageIdConflict => {
                ApiError::failed_precondition(
                    reasons::SEND_ABANDONED,
                    "the message was not delivered and no credit was taken for it; send it again with a new request_id",
                )
            }
        }
    }
}

pub fn no_inmail_awaiting_response() -> ApiError {
    ApiError::failed_precondition(
        reasons::NO_INMAIL_AWAITING_RESPONSE,
        "no InMail from the other member awaits this member's response",
    )
}

pub fn rate_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        reasons::INMAIL_RATE_LIMITED,
        format!(
            "too many InMails from this sender; the next one is allowed in {}s",
            retry_after.as_secs().max(1)
        ),
        retry_after,
    )
}

pub fn send_rate_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        reasons::SEND_RATE_LIMITED,
        format!(
            "too many messages from this sender; the next one is allowed in {}s",
            retry_after.as_secs().max(1)
        ),
        retry_after,
    )
}

pub fn open_profile_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        reasons::OPEN_PROFILE_MONTHLY_LIMIT,
        "this sender reached the monthly limit of Open Profile messages",
        retry_after,
    )
}

pub fn conversation_not_found() -> ApiError {
    ApiError::not_found(
        reasons::CONVERSATION_NOT_FOUND,
        "no such conversation for this member",
    )
}

impl From<InvitationRefusal> for ApiError {
    fn from(refusal: InvitationRefusal) -> Self {
        match refusal {
            InvitationRefusal::Blocked => ApiError::failed_precondition(
                reasons::BLOCKED,
                "one of the two members blocked the other",
            ),
            InvitationRefusal::AlreadyConnected => ApiError::failed_precondition(
                reasons::ALREADY_CONNECTED,
                "the two members are connected already",
            ),
            InvitationRefusal::InvitationPending => ApiError::failed_precondition(
                reasons::INVITATION_PENDING,
                "this member's invitation to the other is pending already",
            ),
        }
    }
}

pub fn invitation_not_found() -> ApiError {
    ApiError::not_found(
        reasons::INVITATION_NOT_FOUND,
        "no pending invitation between these members in that direction",
    )
}

/// A rule of the pair, not a rate: so FAILED_PRECONDITION, with the instant
/// it ends.
pub fn invitation_cooling_off(ends_ms: i64) -> ApiError {
    let ends = chrono::DateTime::from_timestamp_millis(ends_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    ApiError::failed_precondition(
        reasons::INVITATION_COOLING_OFF,
        format!(
            "an invitation to this member was withdrawn or ignored; it can be sent again from {ends}"
        ),
    )
}

pub fn invitation_rate_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        reasons::INVITATION_RATE_LIMITED,
        format!(
            "this member has used the week's invitations; the next one is allowed in {}s",
            retry_after.as_secs().max(1)
        ),
        retry_after,
    )
}

/// Waiting does not help (only a withdrawal or an answer frees a place):
/// FAILED_PRECONDITION, not RESOURCE_EXHAUSTED.
pub fn too_many_pending_invitations(max: u32) -> ApiError {
    ApiError::failed_precondition(
        reasons::TOO_MANY_PENDING_INVITATIONS,
        format!("this member has {max} pending invitations, the most allowed; withdraw some first"),
    )
}

pub fn block_limit_reached(max: u32) -> ApiError {
    ApiError::failed_precondition(
        reasons::BLOCK_LIMIT_REACHED,
        format!("this member has blocked {max} members, the most allowed; unblock some first"),
    )
}

pub fn connection_limit_reached(whose: &str, max: u32) -> ApiError {
    ApiError::failed_precondition(
        reasons::CONNECTION_LIMIT_REACHED,
        format!("{whose} has {max} connections, the most allowed"),
    )
}
