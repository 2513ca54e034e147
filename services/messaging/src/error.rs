//! messaging's error table: each refusal and the gRPC code it becomes.

use std::time::Duration;

use inmail_shared::{ApiError, reasons};

use crate::domain::SendRefusal;
use crate::store::{InvitationRefusal, Refusal};

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

/// Why a send ended without a delivery, as stored with its request (a
/// refusal) or its message (a failure), so a retry answers the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    Blocked,
    AwaitingResponse,
    NoInmailAwaitingResponse,
    /// billing refused the debit: no credit left.
    InsufficientCredits,
    /// billing refused the debit: not on a paid plan.
    PaidPlanRequired,
    /// billing released the debit (its hold ran out) before it was confirmed.
    DebitReleased,
    /// The sweeper gave up a send whose process died before the commit,
    /// after billing had taken its credit (given back by the release).
    Abandoned,
    /// The sweeper gave up a send whose process died before billing took
    /// any credit for it.
    AbandonedUncharged,
    /// The send failed after its debit and gave the credit back.
    NotStored,
    /// billing had the message id under another member or amount.
    MessageIdConflict,
}

impl SendFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => reasons::BLOCKED,
            Self::AwaitingResponse => reasons::AWAITING_RESPONSE,
            Self::NoInmailAwaitingResponse => reasons::NO_INMAIL_AWAITING_RESPONSE,
            Self::InsufficientCredits => reasons::INSUFFICIENT_CREDITS,
            Self::PaidPlanRequired => reasons::PAID_PLAN_REQUIRED,
            Self::DebitReleased => reasons::DEBIT_RELEASED,
            Self::Abandoned => "ABANDONED",
            Self::AbandonedUncharged => "ABANDONED_UNCHARGED",
            Self::NotStored => "NOT_STORED",
            Self::MessageIdConflict => reasons::MESSAGE_ID_CONFLICT,
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Blocked,
            Self::AwaitingResponse,
            Self::NoInmailAwaitingResponse,
            Self::InsufficientCredits,
            Self::PaidPlanRequired,
            Self::DebitReleased,
            Self::Abandoned,
            Self::AbandonedUncharged,
            Self::NotStored,
            Self::MessageIdConflict,
        ]
        .into_iter()
        .find(|f| f.as_str() == value)
    }

    /// billing's refusal of a debit or confirmation, as a failure of the send.
    pub fn of_billing(reason: &str) -> Option<Self> {
        match reason {
            reasons::INSUFFICIENT_CREDITS => Some(Self::InsufficientCredits),
            reasons::PAID_PLAN_REQUIRED => Some(Self::PaidPlanRequired),
            reasons::DEBIT_RELEASED => Some(Self::DebitReleased),
            reasons::MESSAGE_ID_CONFLICT => Some(Self::MessageIdConflict),
            _ => None,
        }
    }

    pub fn error(self) -> ApiError {
        match self {
            Self::Blocked => SendRefusal::Blocked.into(),
            Self::AwaitingResponse => SendRefusal::AwaitingResponse.into(),
            Self::NoInmailAwaitingResponse => no_inmail_awaiting_response(),
            Self::InsufficientCredits => ApiError::failed_precondition(
                reasons::INSUFFICIENT_CREDITS,
                "the sender has no InMail credit left",
            ),
            Self::PaidPlanRequired => ApiError::failed_precondition(
                reasons::PAID_PLAN_REQUIRED,
                "InMail needs a paid plan; free members can message connections and Open Profiles",
            ),
            // The send was given up (README.md, "Money guarantees"); the
            // message says truthfully whether a credit moved. A new request
            // id sends again.
            Self::DebitReleased | Self::Abandoned | Self::NotStored => {
                ApiError::failed_precondition(
                    reasons::SEND_ABANDONED,
                    "the message was not delivered; the credit taken for it was returned; send it again with a new request_id",
                )
            }
            Self::AbandonedUncharged | Self::MessageIdConflict => ApiError::failed_precondition(
                reasons::SEND_ABANDONED,
                "the message was not delivered and no credit was taken for it; send it again with a new request_id",
            ),
        }
    }
}

impl From<Refusal> for SendFailure {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Blocked => Self::Blocked,
            Refusal::AwaitingResponse => Self::AwaitingResponse,
            Refusal::NoInmailAwaitingResponse => Self::NoInmailAwaitingResponse,
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
