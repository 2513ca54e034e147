//! The gRPC edge: decode, validate, call the domain, map the result.

use std::sync::Arc;

use inmail_shared::ApiError;
use inmail_shared::contract::proto::plans::v1 as pb;
use inmail_shared::contract::reasons;
use inmail_shared::contract::rpc::handle;
use inmail_shared::contract::time::{ms_to_timestamp, to_timestamp};
use inmail_shared::contract::validate::Checks;
use inmail_shared::runtime::auth::access::{Table, Who};
use inmail_shared::runtime::context::{CallContext, record_identity};
use inmail_shared::state::clock::Clock;
use inmail_shared::state::idempotency::{Mutation, Outcome, mutation_rate_limited};
use inmail_shared::state::paging::{self, PageTokens};
use tonic::{Request, Response, Status};

use crate::catalog::{Catalog, Plan};
use crate::cycles::CycleKind;
use crate::domain::{EndReason, PeriodView, PlanError, SubscriptionState, Timing};
use crate::error::DOMAIN;
use crate::store::{Committed, PlanStore, RequestSeen};

/// Who may call each method (README.md, "Who may call what"): members manage and read their
/// own subscription; billing and messaging ask for entitlements and Open
/// Profile; operators read.
pub const ACCESS: Table = &[
    // The catalog is public: prospective members read it too.
    (
        "/inmail.plans.v1.SubscriptionPlanService/ListPlans",
        &[Who::Anyone],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/GetPlan",
        &[Who::Anyone],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/GetSubscription",
        &[Who::Member, Who::Service("messaging"), Who::Operator],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/Subscribe",
        &[Who::Member],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/ChangePlan",
        &[Who::Member],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/CancelSubscription",
        &[Who::Member],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/ClearScheduledChange",
        &[Who::Member],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/SetOpenProfile",
        &[Who::Member],
    ),
    (
        "/inmail.plans.v1.SubscriptionPlanService/GetEntitlement",
        &[
            Who::Service("billing-credits"),
            Who::Service("messaging"),
            Who::Operator,
        ],
    ),
];

/// Optimistic writes retry this often before answering ABORTED.
const COMMIT_ATTEMPTS: usize = 8;

#[derive(Clone)]
pub struct PlansApi {
    catalog: Arc<Catalog>,
    store: PlanStore,
    clock: Clock,
    tokens: PageTokens,
}

type Reply<T> = Result<Response<T>, Status>;

impl PlansApi {
    pub fn new(catalog: Arc<Catalog>, store: PlanStore, clock: Clock) -> Self {
        let tokens = PageTokens::new(store.redis().clone(), "plans");
        Self {
            catalog,
            store,
            clock,
            tokens,
        }
    }

    pub fn into_server(
        self,
    ) -> pb::subscription_plan_service_server::SubscriptionPlanServiceServer<Self> {
        pb::subscription_plan_service_server::SubscriptionPlanServiceServer::new(self)
            .max_decoding_message_size(inmail_shared::runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(inmail_shared::runtime::server::MAX_RESPONSE_BYTES)
    }

    /// The member's state as of now (scheduled changes applied), and now.
    async fn current(&self, member: &str) -> Result<(SubscriptionState, i64), ApiError> {
        self.current_with_revision(member)
            .await
            .map(|(state, now, _)| (state, now))
    }

    /// [`Self::current`] and the revision of the stored state it comes from.
    async fn current_with_revision(
        &self,
        member: &str,
    ) -> Result<(SubscriptionState, i64, u64), ApiError> {
        let loaded = self.store.load(member, None).await?;
        let now = self.clock.now_ms().await?;
        let state = loaded
            .state
            .unwrap_or_else(|| SubscriptionState::never_subscribed(&self.catalog))
            .at(now);
        Ok((state, now, loaded.published))
    }

    /// Applies `change` to the member's state, one writer at a time
    /// (optimistic: re-read and retry on a concurrent write), and records the
    /// outcome under the request id.
    async fn mutate<R>(
        &self,
        member: &str,
        request_id: &str,
        fingerprint: &str,
        wrap: fn(pb::Subscription) -> R,
        change: impl Fn(SubscriptionState, i64) -> Result<SubscriptionState, PlanError>,
    ) -> Result<R, ApiError>
    where
        R: prost::Message + Default,
    {
        for _ in 0..COMMIT_ATTEMPTS {
            let loaded = self
                .store
                .load(member, Some((request_id, fingerprint)))
                .await?;
            match loaded.request {
                RequestSeen::Done(outcome) => return outcome.into_result(),
                RequestSeen::Mismatch => return Err(ApiError::request_id_reused()),
                RequestSeen::New => {}
            }
            let now = self.clock.now_ms().await?;
            let state = loaded
                .state
                .unwrap_or_else(|| SubscriptionState::never_subscribed(&self.catalog))
                .at(now);
            let (new_state, result) = match change(state, now) {
                Ok(new_state) => {
                    let response = wrap(subscription_view(member, &new_state, now));
                    (Some(new_state), Ok(response))
                }
                Err(refusal) => (None, Err(ApiError::from(refusal))),
            };
            let outcome = Outcome::of(&result).expect("refusals of the domain are final");
            match self
                .store
                .commit(
                    member,
                    request_id,
                    fingerprint,
                    loaded.rev,
                    new_state.as_ref(),
                    &outcome,
                )
                .await?
            {
                Committed::Ok => {
                    if let Some(state) = &new_state {
                        tracing::info!(
                            plan = %state.current.terms.plan_id,
                            version = state.current.version,
                            scheduled = state.scheduled.as_ref().map(|s| s.terms.plan_id.as_str()),
                            "subscription changed"
                        );
                    }
                    return result;
                }
                Committed::Done(outcome) => return outcome.into_result(),
                Committed::Mismatch => return Err(ApiError::request_id_reused()),
                Committed::Limited(retry_after) => {
                    return Err(mutation_rate_limited(retry_after));
                }
                Committed::Conflict => continue,
            }
        }
        Err(ApiError::aborted(
            reasons::CONCURRENT_MODIFICATION,
            "the subscription kept changing concurrently; retry the same request",
        ))
    }

    fn paid_plan(&self, checks: &mut Checks, plan_id: &str) -> Option<&Plan> {
        if plan_id.is_empty() {
            checks.add("plan_id", "is required");
            return None;
        }
        self.catalog.get(plan_id)
    }
}

fn timing(value: i32, default: Timing) -> Timing {
    match pb::ChangeTiming::try_from(value) {
        Ok(pb::ChangeTiming::Immediately) => Timing::Immediately,
        Ok(pb::ChangeTiming::EndOfCycle) => Timing::EndOfCycle,
        _ => default,
    }
}

fn plan_not_found(plan_id: &str) -> ApiError {
    ApiError::from(PlanError::PlanNotFound(plan_id.to_string()))
}

#[tonic::async_trait]
impl pb::subscription_plan_service_server::SubscriptionPlanService for PlansApi {
    async fn list_plans(
        &self,
        request: Request<pb::ListPlansRequest>,
    ) -> Reply<pb::ListPlansResponse> {
        let request = request.into_inner();
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            let size = paging::page_size(
                &mut checks,
                request.page_size,
                paging::DEFAULT_PAGE_SIZE,
                paging::MAX_PAGE_SIZE,
            );
            let start = self
                .tokens
                .decode(&mut checks, "plans", &[], &request.page_token)
                .await?
                .map(|cursor| cursor.parse::<usize>())
                .transpose()
                .unwrap_or_else(|_| {
                    checks.add("page_token", "is not a token returned by this list");
                    None
                })
                .unwrap_or(0);
            checks.finish()?;
            let all = self.catalog.plans();
            let end = (start + size).min(all.len());
            let plans = all
                .get(start..end)
                .unwrap_or_default()
                .iter()
                .map(plan_view)
                .collect();
            let next_page_token = if end < all.len() {
                self.tokens.encode("plans", &[], &end.to_string()).await?
            } else {
                String::new()
            };
            Ok(pb::ListPlansResponse {
                plans,
                next_page_token,
            })
        })
        .await
    }

    async fn get_plan(&self, request: Request<pb::GetPlanRequest>) -> Reply<pb::GetPlanResponse> {
        let request = request.into_inner();
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            let plan = self.paid_plan(&mut checks, &request.plan_id);
            checks.finish()?;
            let plan = plan.ok_or_else(|| plan_not_found(&request.plan_id))?;
            Ok(pb::GetPlanResponse {
                plan: Some(plan_view(plan)),
            })
        })
        .await
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Reply<pb::GetSubscriptionResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            Checks::new()
                .member_id("member_id", &request.member_id)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let (state, now) = self.current(&request.member_id).await?;
            Ok(pb::GetSubscriptionResponse {
                subscription: Some(subscription_view(&request.member_id, &state, now)),
            })
        })
        .await
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Reply<pb::SubscribeResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id);
            let plan = self.paid_plan(&mut checks, &request.plan_id);
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let plan = plan.ok_or_else(|| plan_not_found(&request.plan_id))?;
            let fp = request.fingerprint();
            self.mutate(
                &request.member_id,
                &request.request_id,
                &fp,
                |s| pb::SubscribeResponse {
                    subscription: Some(s),
                },
                |state, now| state.subscribe(plan, now),
            )
            .await
        })
        .await
    }

    async fn change_plan(
        &self,
        request: Request<pb::ChangePlanRequest>,
    ) -> Reply<pb::ChangePlanResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .known_enum::<pb::ChangeTiming>("timing", request.timing);
            let plan = self.paid_plan(&mut checks, &request.plan_id);
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let plan = plan.ok_or_else(|| plan_not_found(&request.plan_id))?;
            let when = timing(request.timing, Timing::Immediately);
            let fp = request.fingerprint();
            self.mutate(
                &request.member_id,
                &request.request_id,
                &fp,
                |s| pb::ChangePlanResponse {
                    subscription: Some(s),
                },
                |state, now| state.change_plan(plan, when, now),
            )
            .await
        })
        .await
    }

    async fn cancel_subscription(
        &self,
        request: Request<pb::CancelSubscriptionRequest>,
    ) -> Reply<pb::CancelSubscriptionResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            Checks::new()
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .known_enum::<pb::ChangeTiming>("timing", request.timing)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let when = timing(request.timing, Timing::EndOfCycle);
            let free = self.catalog.free();
            let fp = request.fingerprint();
            self.mutate(
                &request.member_id,
                &request.request_id,
                &fp,
                |s| pb::CancelSubscriptionResponse {
                    subscription: Some(s),
                },
                |state, now| state.cancel(free, when, now),
            )
            .await
        })
        .await
    }

    async fn clear_scheduled_change(
        &self,
        request: Request<pb::ClearScheduledChangeRequest>,
    ) -> Reply<pb::ClearScheduledChangeResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            Checks::new()
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let fp = request.fingerprint();
            self.mutate(
                &request.member_id,
                &request.request_id,
                &fp,
                |s| pb::ClearScheduledChangeResponse {
                    subscription: Some(s),
                },
                |state, _| state.clear_scheduled(),
            )
            .await
        })
        .await
    }

    async fn set_open_profile(
        &self,
        request: Request<pb::SetOpenProfileRequest>,
    ) -> Reply<pb::SetOpenProfileResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            Checks::new()
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let fp = request.fingerprint();
            let enabled = request.enabled;
            self.mutate(
                &request.member_id,
                &request.request_id,
                &fp,
                |s| pb::SetOpenProfileResponse {
                    subscription: Some(s),
                },
                |state, _| state.set_open_profile(enabled),
            )
            .await
        })
        .await
    }

    async fn get_entitlement(
        &self,
        request: Request<pb::GetEntitlementRequest>,
    ) -> Reply<pb::GetEntitlementResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            Checks::new()
                .member_id("member_id", &request.member_id)
                .finish()?;
            let (state, now, revision) = self.current_with_revision(&request.member_id).await?;
            let (current, ended) = state.entitlement(request.after_version, now);
            Ok(pb::GetEntitlementResponse {
                member_id: request.member_id.clone(),
                current_period: Some(period_view(&current)),
                ended_periods: ended.iter().map(period_view).collect(),
                as_of: ms_to_timestamp(now),
                revision,
            })
        })
        .await
    }
}

fn cycle_kind(kind: CycleKind) -> pb::CycleKind {
    match kind {
        CycleKind::Anniversary => pb::CycleKind::Anniversary,
        CycleKind::CalendarMonth => pb::CycleKind::CalendarMonth,
    }
}

fn plan_view(plan: &Plan) -> pb::Plan {
    pb::Plan {
        plan_id: plan.id.clone(),
        display_name: plan.name.clone(),
        monthly_credits: plan.monthly_credits as i32,
        rollover_cap: plan.rollover_cap as i32,
        cycle_kind: cycle_kind(plan.cycle) as i32,
        paid: plan.paid,
    }
}

fn subscription_view(member: &str, state: &SubscriptionState, now_ms: i64) -> pb::Subscription {
    let cycle = state.cycle(now_ms);
    pb::Subscription {
        member_id: member.to_string(),
        plan_id: state.current.terms.plan_id.clone(),
        paid: state.current.terms.paid,
        period_started_at: ms_to_timestamp(state.current.started_ms),
        cycle_start: Some(to_timestamp(cycle.start)),
        cycle_end: Some(to_timestamp(cycle.end)),
        cycle_index: state.cycle_number(now_ms),
        scheduled_change: state.scheduled.as_ref().map(|s| pb::ScheduledChange {
            plan_id: s.terms.plan_id.clone(),
            cancellation: s.cancellation,
            effective_at: ms_to_timestamp(s.effective_ms),
        }),
        open_profile: state.open_profile,
        version: state.current.version,
        as_of: ms_to_timestamp(now_ms),
    }
}

fn period_view(view: &PeriodView) -> pb::PlanPeriod {
    let period = &view.period;
    pb::PlanPeriod {
        version: period.version,
        plan_id: period.terms.plan_id.clone(),
        monthly_credits: period.terms.monthly_credits as i32,
        rollover_cap: period.terms.rollover_cap as i32,
        paid: period.terms.paid,
        started_at: Some(to_timestamp(view.started_at())),
        ended_at: period.ended_ms.and_then(ms_to_timestamp),
        end_reason: match period.end_reason {
            None => pb::PeriodEndReason::Unspecified,
            Some(EndReason::PlanChanged) => pb::PeriodEndReason::PlanChanged,
            Some(EndReason::Cancelled) => pb::PeriodEndReason::Cancelled,
        } as i32,
        cycles_started: view.cycles_started,
        cycle_start: Some(to_timestamp(view.cycle.start)),
        cycle_end: Some(to_timestamp(view.cycle.end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_table_lists_every_method() {
        assert_eq!(
            inmail_shared::runtime::auth::access::unlisted(
                ACCESS,
                "inmail.plans.v1.SubscriptionPlanService"
            ),
            Vec::<String>::new()
        );
    }
}
