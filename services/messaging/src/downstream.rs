//! The services messaging calls: billing-credits (debit, confirm, release,
//! refund) and subscription-plan (the recipient's Open Profile). Every call
//! carries the caller's remaining deadline and trace, is tried again only when
//! it did not reach the service (always with the same request id, derived
//! from the message id), and goes through a circuit breaker per service.

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_shared::runtime::client::Downstream;
use inmail_shared::runtime::context::CallContext;
use tonic::Status;
use tonic::transport::Channel;

type BillingClient = billing::billing_credits_service_client::BillingCreditsServiceClient<Channel>;
type PlansClient = plans::subscription_plan_service_client::SubscriptionPlanServiceClient<Channel>;

fn upstream(service: &'static str, reason: &'static str) -> impl Fn(Status) -> ApiError {
    move |status| match ApiError::from_status(&status) {
        ApiError::Unavailable { .. } | ApiError::DeadlineExceeded { .. } => ApiError::unavailable(
            reason,
            format!("{service} is unavailable: {}", status.message()),
        ),
        other => other,
    }
}

#[derive(Clone)]
pub struct Billing {
    client: BillingClient,
    downstream: Downstream,
}

impl Billing {
    pub fn new(channel: Channel, attempt_timeout: std::time::Duration) -> Self {
        Self {
            client: BillingClient::new(channel),
            downstream: Downstream::new("billing-credits", attempt_timeout),
        }
    }

    /// Takes and holds one credit of `member` for `message_id`.
    pub async fn debit(
        &self,
        ctx: &CallContext,
        member: &str,
        message_id: &str,
        amount: i32,
    ) -> Result<billing::DebitForMessageResponse, ApiError> {
        let request = billing::DebitForMessageRequest {
            request_id: format!("debit:{message_id}"),
            member_id: member.to_string(),
            message_id: message_id.to_string(),
            amount,
        };
        self.downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.debit_for_message(request).await }
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(upstream("billing-credits", "BILLING_UNAVAILABLE"))
    }

    pub async fn confirm(
        &self,
        ctx: &CallContext,
        member: &str,
        message_id: &str,
    ) -> Result<billing::Debit, ApiError> {
        let request = billing::ConfirmDebitRequest {
            request_id: format!("confirm:{message_id}"),
            member_id: member.to_string(),
            message_id: message_id.to_string(),
        };
        self.downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.confirm_debit(request).await }
            })
            .await
            .map(|r| r.into_inner().debit.unwrap_or_default())
            .map_err(upstream("billing-credits", "BILLING_UNAVAILABLE"))
    }

    pub async fn release(
        &self,
        ctx: &CallContext,
        member: &str,
        message_id: &str,
        reason: billing::ReleaseReason,
    ) -> Result<billing::ReleaseDebitResponse, ApiError> {
        let request = billing::ReleaseDebitRequest {
            request_id: format!("release:{message_id}"),
            member_id: member.to_string(),
            message_id: message_id.to_string(),
            reason: reason as i32,
        };
        self.downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.release_debit(request).await }
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(upstream("billing-credits", "BILLING_UNAVAILABLE"))
    }

    /// Refunds an InMail whose recipient responded at `responded_at_ms`.
    pub async fn refund(
        &self,
        ctx: &CallContext,
        member: &str,
        message_id: &str,
        responded_at_ms: i64,
    ) -> Result<billing::RefundMessageResponse, ApiError> {
        let request = billing::RefundMessageRequest {
            request_id: format!("refund:{message_id}"),
            member_id: member.to_string(),
            message_id: message_id.to_string(),
            responded_at: inmail_shared::contract::time::ms_to_timestamp(responded_at_ms),
        };
        self.downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.refund_message(request).await }
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(upstream("billing-credits", "BILLING_UNAVAILABLE"))
    }

    /// The debit of a message, or `None` when billing never saw it.
    pub async fn get_debit(
        &self,
        ctx: &CallContext,
        member: &str,
        message_id: &str,
    ) -> Result<Option<billing::Debit>, ApiError> {
        let request = billing::GetDebitRequest {
            member_id: member.to_string(),
            message_id: message_id.to_string(),
        };
        let result = self
            .downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.get_debit(request).await }
            })
            .await;
        match result {
            Ok(response) => Ok(response.into_inner().debit),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(upstream("billing-credits", "BILLING_UNAVAILABLE")(status)),
        }
    }

    pub async fn available(&self, ctx: &CallContext, member: &str) -> Result<i64, ApiError> {
        let request = billing::GetBalanceRequest {
            member_id: member.to_string(),
        };
        self.downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.get_balance(request).await }
            })
            .await
            .map(|r| r.into_inner().balance.map(|b| b.available).unwrap_or(0))
            .map_err(upstream("billing-credits", "BILLING_UNAVAILABLE"))
    }
}

#[derive(Clone)]
pub struct Plans {
    client: PlansClient,
    downstream: Downstream,
}

impl Plans {
    pub fn new(channel: Channel, attempt_timeout: std::time::Duration) -> Self {
        Self {
            client: PlansClient::new(channel),
            downstream: Downstream::new("subscription-plan", attempt_timeout),
        }
    }

    /// Whether `member` is on a paid plan with Open Profile on.
    pub async fn open_profile(&self, ctx: &CallContext, member: &str) -> Result<bool, ApiError> {
        let request = plans::GetSubscriptionRequest {
            member_id: member.to_string(),
        };
        let subscription = self
            .downstream
            .call(ctx, || {
                let mut client = self.client.clone();
                let request = ctx.outgoing(request.clone());
                async move { client.get_subscription(request).await }
            })
            .await
            .map_err(upstream(
                "subscription-plan",
                "SUBSCRIPTION_PLAN_UNAVAILABLE",
            ))?
            .into_inner()
            .subscription
            .unwrap_or_default();
        Ok(subscription.paid && subscription.open_profile)
    }
}
