//! billing-credits' error table: each refusal of the scripts and the gRPC
//! code it becomes.

use inmail_shared::ApiError;

use crate::store::{Refusal, Reply};

/// `ErrorInfo.domain` of this service's errors.
pub const DOMAIN: &str = "billing.inmail";

/// The error for a script's refusal.
pub fn refusal(refusal: Refusal, reply: &Reply, member: &str, message_id: &str) -> ApiError {
    let reason = refusal.reason();
    match refusal {
        Refusal::InsufficientCredits => ApiError::failed_precondition(
            reason,
            format!(
                "member {member} has {} InMail credit(s) left",
                reply.balance.as_ref().map_or(0, |b| b.available)
            ),
        ),
        Refusal::PaidPlanRequired => ApiError::failed_precondition(
            reason,
            format!("member {member} is not on a paid plan; InMail needs one"),
        ),
        // The id exists; what the caller asks contradicts it.
        Refusal::MessageIdConflict => ApiError::failed_precondition(
            reason,
            format!("message {message_id} was already debited with another member or amount"),
        ),
        Refusal::DebitReleased => ApiError::failed_precondition(
            reason,
            format!(
                "the debit of message {message_id} was released (its hold ran out or the send was given up)"
            ),
        ),
        Refusal::DebitNotFound => ApiError::not_found(
            reason,
            format!("no debit of message {message_id} for member {member}"),
        ),
        Refusal::DebitConfirmed => ApiError::failed_precondition(
            reason,
            format!("the debit of message {message_id} is confirmed; only a refund gives it back"),
        ),
        Refusal::DebitNotConfirmed => ApiError::failed_precondition(
            reason,
            format!("the debit of message {message_id} is not confirmed; nothing to refund yet"),
        ),
        Refusal::RefundWindowClosed => ApiError::failed_precondition(
            reason,
            format!("the refund window of message {message_id} has closed"),
        ),
        // Transient: the hold's index entry ran out while billing waited for
        // subscription-plan; the same request may be retried at once.
        Refusal::HoldWindowMissed => ApiError::aborted(
            reason,
            format!("the debit of message {message_id} took longer than its hold; retry"),
        ),
        // Bad input that only the debit record can tell: no response can
        // come before the InMail was paid for.
        Refusal::RespondedBeforeDebit => ApiError::invalid_field(
            "responded_at",
            format!("is before the debit of message {message_id} was made"),
        ),
    }
}
