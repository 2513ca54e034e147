//! billing-credits' error table: each refusal reason of the scripts and the
//! gRPC code it becomes.

use inmail_shared::ApiError;

use crate::store::Reply;

/// `ErrorInfo.domain` of this service's errors.
pub const DOMAIN: &str = "billing.inmail";

/// The error for a script's refusal.
pub fn refusal(reply: &Reply, member: &str, message_id: &str) -> ApiError {
    let available = reply.balance.as_ref().map(|b| b.available);
    match reply.reason.as_str() {
        "INSUFFICIENT_CREDITS" => ApiError::failed_precondition(
            "INSUFFICIENT_CREDITS",
            format!(
                "member {member} has {} InMail credit(s) left",
                available.unwrap_or(0)
            ),
        ),
        "PAID_PLAN_REQUIRED" => ApiError::failed_precondition(
            "PAID_PLAN_REQUIRED",
            format!("member {member} is not on a paid plan; InMail needs one"),
        ),
        // The id exists; what the caller asks contradicts it.
        "MESSAGE_ID_CONFLICT" => ApiError::failed_precondition(
            "MESSAGE_ID_CONFLICT",
            format!("message {message_id} was already debited with another member or amount"),
        ),
        "DEBIT_RELEASED" => ApiError::failed_precondition(
            "DEBIT_RELEASED",
            format!(
                "the debit of message {message_id} was released (its hold ran out or the send was given up)"
            ),
        ),
        "DEBIT_NOT_FOUND" => ApiError::not_found(
            "DEBIT_NOT_FOUND",
            format!("no debit of message {message_id} for member {member}"),
        ),
        "DEBIT_CONFIRMED" => ApiError::failed_precondition(
            "DEBIT_CONFIRMED",
            format!("the debit of message {message_id} is confirmed; only a refund gives it back"),
        ),
        "DEBIT_NOT_CONFIRMED" => ApiError::failed_precondition(
            "DEBIT_NOT_CONFIRMED",
            format!("the debit of message {message_id} is not confirmed; nothing to refund yet"),
        ),
        "REFUND_WINDOW_CLOSED" => ApiError::failed_precondition(
            "REFUND_WINDOW_CLOSED",
            format!("the refund window of message {message_id} has closed"),
        ),
        other => ApiError::internal(format!("unknown refusal reason {other:?}")),
    }
}
