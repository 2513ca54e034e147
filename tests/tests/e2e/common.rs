//! Helpers shared by the end-to-end tests.

use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::messaging::v1 as messaging;
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::{Stack, rid};

pub use inmail_tests::{assert_ledgers_reconcile, bad_fields, reason};

/// How long billing may trust an entitlement (ENTITLEMENT_CACHE_TTL default):
/// plan changes reach billing within it.
pub const ENTITLEMENT_STALENESS: Duration = Duration::from_millis(1100);

pub async fn subscribe(stack: &Stack, member: &str, plan: &str) -> plans::Subscription {
    stack
        .plans_as(member)
        .subscribe(plans::SubscribeRequest {
            request_id: rid(),
            member_id: member.into(),
            plan_id: plan.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("subscribe {member} to {plan}: {s:?}"))
        .into_inner()
        .subscription
        .unwrap()
}

pub async fn subscription(stack: &Stack, member: &str) -> plans::Subscription {
    stack
        .plans_as(member)
        .get_subscription(plans::GetSubscriptionRequest {
            member_id: member.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap()
}

pub async fn balance(stack: &Stack, member: &str) -> billing::Balance {
    stack
        .billing_as(member)
        .get_balance(billing::GetBalanceRequest {
            member_id: member.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("balance of {member}: {s:?}"))
        .into_inner()
        .balance
        .unwrap()
}

pub async fn available(stack: &Stack, member: &str) -> i64 {
    balance(stack, member).await.available
}

pub async fn grant(stack: &Stack, member: &str, amount: i32) -> i64 {
    stack
        .billing_operator()
        .grant_credits(billing::GrantCreditsRequest {
            request_id: rid(),
            member_id: member.into(),
            amount,
            reason: "test top-up".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .balance_after
}

pub async fn ledger(stack: &Stack, member: &str) -> Vec<billing::LedgerEntry> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = stack
            .billing_as(member)
            .list_ledger_entries(billing::ListLedgerEntriesRequest {
                member_id: member.into(),
                page_size: 500,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return entries;
        }
        token = page.next_page_token;
    }
}

/// Takes one credit for `message_id` as messaging does (debit, confirm);
/// answers the balance after.
pub async fn spend(stack: &Stack, member: &str, message_id: &str) -> Result<i64, tonic::Status> {
    let mut billing = stack.billing_as_messaging();
    let debited = billing
        .debit_for_message(billing::DebitForMessageRequest {
            request_id: rid(),
            member_id: member.into(),
            message_id: message_id.into(),
            amount: 1,
        })
        .await?
        .into_inner();
    billing
        .confirm_debit(billing::ConfirmDebitRequest {
            request_id: rid(),
            member_id: member.into(),
            message_id: message_id.into(),
        })
        .await?;
    Ok(debited.balance_after)
}

pub fn count_kind(entries: &[billing::LedgerEntry], kind: billing::LedgerEntryKind) -> usize {
    entries.iter().filter(|e| e.kind == kind as i32).count()
}

pub fn send_request(
    sender: &str,
    recipient: &str,
    subject: &str,
    body: &str,
) -> messaging::SendMessageRequest {
    messaging::SendMessageRequest {
        request_id: rid(),
        sender_id: sender.into(),
        recipient_id: recipient.into(),
        subject: subject.into(),
        body: body.into(),
    }
}

pub async fn send(
    stack: &Stack,
    sender: &str,
    recipient: &str,
) -> Result<messaging::SendMessageResponse, tonic::Status> {
    stack
        .messaging_as(sender)
        .send_message(send_request(
            sender,
            recipient,
            "Hello",
            &format!("Hi {recipient}, from {sender}"),
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// `one` invites `other` (no note), answering the call's outcome.
pub async fn invite(
    stack: &Stack,
    one: &str,
    other: &str,
) -> Result<messaging::SendInvitationResponse, tonic::Status> {
    stack
        .messaging_as(one)
        .send_invitation(messaging::SendInvitationRequest {
            request_id: rid(),
            member_id: one.into(),
            invitee_id: other.into(),
            note: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `member` accepts `inviter`'s invitation.
pub async fn accept(
    stack: &Stack,
    member: &str,
    inviter: &str,
) -> Result<messaging::AcceptInvitationResponse, tonic::Status> {
    stack
        .messaging_as(member)
        .accept_invitation(messaging::AcceptInvitationRequest {
            request_id: rid(),
            member_id: member.into(),
            inviter_id: inviter.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Connects two members the only way members can: one invites, the other
/// accepts.
pub async fn connect(stack: &Stack, one: &str, other: &str) {
    invite(stack, one, other)
        .await
        .unwrap_or_else(|s| panic!("{one} invites {other}: {s:?}"));
    accept(stack, other, one)
        .await
        .unwrap_or_else(|s| panic!("{other} accepts {one}: {s:?}"));
}

pub async fn respond(
    stack: &Stack,
    member: &str,
    conversation_id: &str,
    response: messaging::InmailResponse,
    body: &str,
) -> Result<messaging::RespondToInmailResponse, tonic::Status> {
    stack
        .messaging_as(member)
        .respond_to_inmail(messaging::RespondToInmailRequest {
            request_id: rid(),
            member_id: member.into(),
            conversation_id: conversation_id.into(),
            response: response as i32,
            body: body.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn set_open_profile(
    stack: &Stack,
    member: &str,
    enabled: bool,
) -> Result<plans::Subscription, tonic::Status> {
    stack
        .plans_as(member)
        .set_open_profile(plans::SetOpenProfileRequest {
            request_id: rid(),
            member_id: member.into(),
            enabled,
        })
        .await
        .map(|r| r.into_inner().subscription.unwrap())
}

pub fn ts(t: &Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    inmail_shared::contract::time::from_timestamp(t.as_ref().expect("timestamp set")).unwrap()
}

pub fn utc(y: i32, m: u32, d: u32, h: u32) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    chrono::Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Instants set through the test clock drift by the milliseconds the test
/// takes; cycle arithmetic is checked to the second.
#[track_caller]
pub fn assert_near(actual: chrono::DateTime<chrono::Utc>, expected: chrono::DateTime<chrono::Utc>) {
    let drift = (actual - expected).num_milliseconds().abs();
    assert!(drift < 2_000, "{actual} is not {expected}");
}

/// A conversation as `member` sees it.
pub async fn conversation(
    stack: &Stack,
    member: &str,
    id: &str,
) -> Result<pb::Conversation, tonic::Status> {
    stack
        .messaging_as(member)
        .get_conversation(pb::GetConversationRequest {
            member_id: member.into(),
            conversation_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().conversation.unwrap())
}
