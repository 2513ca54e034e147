//! What a member is entitled to, asked of subscription-plan over gRPC and
//! handed to the balance scripts as JSON.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_shared::contract::time::from_timestamp;
use inmail_shared::runtime::client::Downstream;
use inmail_shared::runtime::context::CallContext;
use serde::Serialize;
use tonic::transport::Channel;

type PlansClient = plans::subscription_plan_service_client::SubscriptionPlanServiceClient<Channel>;

/// One plan period as the scripts read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeriodArg {
    /// Period version.
    pub v: u64,
    /// Plan id.
    pub p: String,
    /// Monthly credits.
    pub m: i64,
    /// Rollover cap.
    pub c: i64,
    /// 1 when paid.
    pub paid: u8,
    /// Cycles begun in the period.
    pub n: u32,
    /// When the period started, epoch ms.
    pub st: i64,
    /// Latest cycle start and end, epoch ms.
    pub cs: i64,
    pub ce: i64,
}

#[derive(Debug, Clone, Serialize)]
struct EntitlementArg {
    /// The revision of the subscription it comes from: the scripts trust
    /// the cached entitlement only while the stored subscription still has
    /// it.
    rev: u64,
    /// Ended periods oldest first, then the current one.
    periods: Vec<PeriodArg>,
}

/// The scripts' entitlement argument and until when it may be trusted.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub json: String,
    pub valid_until_ms: i64,
}

#[derive(Clone)]
pub struct Entitlements {
    client: PlansClient,
    downstream: Downstream,
    /// How long an entitlement is trusted without asking again, while the
    /// subscription's revision is unchanged (never past the end of its
    /// cycle).
    cache_ttl: Duration,
}

impl Entitlements {
    pub fn new(channel: Channel, cache_ttl: Duration, attempt_timeout: Duration) -> Self {
        Self {
            client: PlansClient::new(channel),
            downstream: Downstream::new("subscription-plan", attempt_timeout),
            cache_ttl,
        }
    }

    /// Asks subscription-plan for the periods since `after_version`, within
    /// the caller's deadline (retrying only UNAVAILABLE: a read).
    pub async fn fetch(
        &self,
        ctx: &CallContext,
        member: &str,
        after_version: u64,
        now_ms: i64,
    ) -> Result<Fetched, ApiError> {
        let request = plans::GetEntitlementRequest {
            member_id: member.to_string(),
            after_version,
        };
        let response = self
            .downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.get_entitlement(request).await }
            })
            .await
            .map_err(|status| {
                let err = ApiError::from_status(&status);
                match err {
                    ApiError::Unavailable { .. } | ApiError::DeadlineExceeded { .. } => {
                        ApiError::unavailable(
                            "SUBSCRIPTION_PLAN_UNAVAILABLE",
                            format!(
                                "subscription-plan could not be asked for the entitlement: {}",
                                status.message()
                            ),
                        )
                    }
                    other => other,
                }
            })?
            .into_inner();
        let (json, cycle_end_ms) = entitlement_arg(&response)?;
        let ttl_ms = self.cache_ttl.as_millis() as i64;
        Ok(Fetched {
            json,
            valid_until_ms: cycle_end_ms.min(now_ms.saturating_add(ttl_ms)),
        })
    }
}

fn ms(ts: &Option<prost_types::Timestamp>) -> i64 {
    ts.as_ref()
        .and_then(from_timestamp)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

fn period_arg(period: &plans::PlanPeriod) -> PeriodArg {
    PeriodArg {
        v: period.version,
        p: period.plan_id.clone(),
        m: i64::from(period.monthly_credits),
        c: i64::from(period.rollover_cap),
        paid: u8::from(period.paid),
        n: period.cycles_started,
        st: ms(&period.started_at),
        cs: ms(&period.cycle_start),
        ce: ms(&period.cycle_end),
    }
}

/// The scripts' JSON and the end of the current cycle.
pub fn entitlement_arg(
    response: &plans::GetEntitlementResponse,
) -> Result<(String, i64), ApiError> {
    let current = response
        .current_period
        .as_ref()
        .ok_or_else(|| ApiError::internal("subscription-plan answered no current period"))?;
    let mut periods: Vec<PeriodArg> = response.ended_periods.iter().map(period_arg).collect();
    periods.sort_by_key(|p| p.v);
    periods.push(period_arg(current));
    let json = serde_json::to_string(&EntitlementArg {
        rev: response.revision,
        periods,
    })
    .map_err(|e| ApiError::internal(format!("cannot encode entitlement: {e}")))?;
    Ok((json, ms(&current.cycle_end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn ended_periods_come_first_in_version_order_then_the_current() {
        let period = |version, plan: &str| plans::PlanPeriod {
            version,
            plan_id: plan.into(),
            monthly_credits: 5,
            rollover_cap: 15,
            paid: true,
            cycles_started: 2,
            cycle_start: ts(100),
            cycle_end: ts(200),
            ..Default::default()
        };
        let response = plans::GetEntitlementResponse {
            member_id: "m".into(),
            current_period: Some(period(3, "recruiter-lite")),
            ended_periods: vec![period(2, "premium-business"), period(1, "premium-career")],
            as_of: ts(150),
            revision: 7,
        };
        let (json, end) = entitlement_arg(&response).unwrap();
        assert_eq!(end, 200_000);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let versions: Vec<u64> = value["periods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["v"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(value["periods"][2]["cs"], 100_000);
        assert_eq!(value["periods"][2]["paid"], 1);
        assert_eq!(value["rev"], 7);
    }
}
