//! subscription-plan's error table: each domain refusal and the gRPC code it
//! becomes.

use inmail_shared::ApiError;
use inmail_shared::contract::reasons;

use crate::domain::PlanError;

/// `ErrorInfo.domain` of this service's errors.
pub const DOMAIN: &str = "plans.inmail";

impl From<PlanError> for ApiError {
    fn from(err: PlanError) -> Self {
        let message = err.to_string();
        match err {
            PlanError::PlanNotFound(_) => ApiError::not_found(reasons::PLAN_NOT_FOUND, message),
            // The plan exists but cannot be chosen this way: the request is
            // well-formed, the catalog says no.
            PlanError::NotSubscribable(_) => {
                ApiError::failed_precondition(reasons::PLAN_NOT_SUBSCRIBABLE, message)
            }
            PlanError::AlreadySubscribed(_) => {
                ApiError::failed_precondition(reasons::ALREADY_SUBSCRIBED, message)
            }
            PlanError::NotSubscribed => {
                ApiError::failed_precondition(reasons::NOT_SUBSCRIBED, message)
            }
            PlanError::SamePlan(_) => ApiError::failed_precondition(reasons::SAME_PLAN, message),
            PlanError::NoScheduledChange => {
                ApiError::failed_precondition(reasons::NO_SCHEDULED_CHANGE, message)
            }
            PlanError::PaidPlanRequired => {
                ApiError::failed_precondition(reasons::PAID_PLAN_REQUIRED, message)
            }
        }
    }
}
