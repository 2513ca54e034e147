//! What one member can make the platform store (issue 17): every change a
//! member makes with a new request id spends from the member's quota, so a
//! flood of cheap mutations is refused long before Redis fills, the refusal
//! stores nothing, and other members keep working.

use std::time::Duration;

use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::{Stack, StackOptions, rid};
use tonic::Code;

use crate::common::*;

const QUOTA: usize = 20;

fn quota_args() -> Vec<String> {
    vec![
        "--mutation-burst".into(),
        QUOTA.to_string(),
        "--mutations-per-day".into(),
        QUOTA.to_string(),
    ]
}

async fn keys(stack: &Stack, pattern: &str) -> usize {
    let mut redis = stack.redis.conn().await;
    let found: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut redis)
        .await
        .unwrap();
    found.len()
}

fn assert_limited(status: &tonic::Status) {
    assert_eq!(
        (status.code(), reason(status).as_str()),
        (Code::ResourceExhausted, "MUTATION_RATE_LIMITED"),
        "{status:?}"
    );
    let retry = tonic_types::StatusExt::get_details_retry_info(status)
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(retry > Duration::ZERO);
}

async fn set_preference(
    stack: &Stack,
    member: &str,
    request_id: &str,
) -> Result<pb::SetInmailPreferenceResponse, tonic::Status> {
    stack
        .messaging_as(member)
        .set_inmail_preference(pb::SetInmailPreferenceRequest {
            request_id: request_id.into(),
            member_id: member.into(),
            accept_inmail: true,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The red-team finding: SetInmailPreference with a fresh request id kept a
/// request record for 7 days, at thousands of calls a second, until Redis
/// was full for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_changes_is_refused_at_the_members_quota_and_stores_nothing_more() {
    let stack = Stack::start_with(StackOptions {
        messaging_args: quota_args(),
        plans_args: quota_args(),
        ..Default::default()
    })
    .await;
    connect(&stack, "mal", "pal").await;
    // connect: mal's invitation (pal's accept is pal's).
    let mut accepted = 1;
    for n in 0..(QUOTA * 3) {
        match set_preference(&stack, "mal", &format!("flood-{n}")).await {
            Ok(_) => accepted += 1,
            Err(status) => assert_limited(&status),
        }
    }
    assert_eq!(accepted, QUOTA, "changes accepted past the quota");
    let stored = keys(&stack, "messaging:{mal}:request:*").await;
    assert!(
        stored <= QUOTA,
        "{stored} request records kept for {QUOTA} changes"
    );
    // A retry of a request already answered costs nothing and answers.
    set_preference(&stack, "mal", "flood-0").await.unwrap();
    // Sends are changes too.
    let send = send(&stack, "mal", "pal").await.unwrap_err();
    assert_limited(&send);
    // Other members are not touched by mal's quota.
    set_preference(&stack, "pal", &rid()).await.unwrap();
    send_free(&stack, "pal", "mal").await;
}

async fn send_free(stack: &Stack, from: &str, to: &str) {
    let sent = send(stack, from, to).await.unwrap();
    assert_eq!(
        sent.message.unwrap().kind,
        pb::MessageKind::Connection as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_changes_spend_the_same_quota() {
    let stack = Stack::start_with(StackOptions {
        plans_args: quota_args(),
        ..Default::default()
    })
    .await;
    subscribe(&stack, "sid", "premium-career").await;
    let mut accepted = 1;
    let mut limited = 0;
    for n in 0..(QUOTA * 2) {
        let toggled = stack
            .plans_as("sid")
            .set_open_profile(plans::SetOpenProfileRequest {
                request_id: rid(),
                member_id: "sid".into(),
                enabled: n % 2 == 0,
            })
            .await;
        match toggled {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_limited(&status);
                limited += 1;
            }
        }
    }
    assert_eq!((accepted, limited), (QUOTA, QUOTA + 1));
    let stored = keys(&stack, "plans:{sid}:request:*").await;
    assert_eq!(stored, QUOTA);
    // Another member subscribes as usual.
    subscribe(&stack, "sue", "premium-career").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_are_capped_per_member() {
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--max-blocks".into(), "3".into()],
        ..Default::default()
    })
    .await;
    let block = |who: &'static str| {
        let mut client = stack.messaging_as("bea");
        async move {
            client
                .block_member(pb::BlockMemberRequest {
                    request_id: rid(),
                    member_id: "bea".into(),
                    blocked_member_id: who.into(),
                })
                .await
        }
    };
    for who in ["b1", "b2", "b3"] {
        block(who).await.unwrap();
    }
    let capped = block("b4").await.unwrap_err();
    assert_eq!(
        (capped.code(), reason(&capped).as_str()),
        (Code::FailedPrecondition, "BLOCK_LIMIT_REACHED")
    );
    // Blocking one already blocked stays idempotent.
    block("b2").await.unwrap();
    assert_eq!(keys(&stack, "messaging:{bea}:blocked").await, 1);
}

async fn health_of(addr: std::net::SocketAddr, service: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(inmail_tests::channel(addr))
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

fn assert_storage_full(call: &str, status: &tonic::Status) {
    assert_eq!(
        (status.code(), reason(status).as_str()),
        (Code::ResourceExhausted, "STORAGE_FULL"),
        "{call}: {status:?}"
    );
    assert!(
        tonic_types::StatusExt::get_details_retry_info(status).is_some(),
        "{call}: no RetryInfo"
    );
}

/// Redis at its maxmemory (noeviction, as shipped) used to turn every write
/// of every member and operator into INTERNAL "internal error". Now a write
/// is RESOURCE_EXHAUSTED STORAGE_FULL and changes nothing, reads go on, the
/// service stays SERVING while its `writes` health turns NOT_SERVING, and
/// everything works again once Redis has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_writes_with_storage_full_and_reads_go_on() {
    let stack = Stack::start().await;
    subscribe(&stack, "ana", "premium-career").await;
    connect(&stack, "ana", "ben").await;
    send(&stack, "ana", "ben").await.unwrap();
    assert_eq!(available(&stack, "ana").await, 5);
    let maxmemory = |bytes: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .arg("maxmemory-policy")
            .arg("noeviction")
            .clone()
    };
    // Whatever Redis holds now is more than it may hold.
    stack.redis.on_every_node(&maxmemory("1")).await;
    let before = stack.redis.digest().await;

    let refused = set_preference(&stack, "ana", "full-1").await.unwrap_err();
    assert_storage_full("SetInmailPreference", &refused);
    let refused = send(&stack, "ana", "ben").await.unwrap_err();
    assert_storage_full("SendMessage", &refused);
    let refused = invite(&stack, "ana", "cy").await.unwrap_err();
    assert_storage_full("SendInvitation", &refused);
    let refused = stack
        .plans_as("dov")
        .subscribe(plans::SubscribeRequest {
            request_id: rid(),
            member_id: "dov".into(),
            plan_id: "premium-career".into(),
        })
        .await
        .unwrap_err();
    assert_storage_full("Subscribe", &refused);
    let refused = stack
        .billing_operator()
        .grant_credits(
            inmail_shared::contract::proto::billing::v1::GrantCreditsRequest {
                request_id: rid(),
                member_id: "ana".into(),
                amount: 1,
                reason: "support".into(),
            },
        )
        .await
        .unwrap_err();
    assert_storage_full("GrantCredits", &refused);
    assert_eq!(
        stack.redis.digest().await,
        before,
        "a refused write changed Redis"
    );

    // Reads go on.
    assert_eq!(available(&stack, "ana").await, 5);
    let inbox = stack
        .messaging_as("ana")
        .list_conversations(pb::ListConversationsRequest {
            member_id: "ana".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.conversations.len(), 1);
    assert_eq!(subscription(&stack, "ana").await.plan_id, "premium-career");
    // Health: the services serve (reads work); their writes do not.
    for addr in [stack.plans.addr, stack.billing.addr, stack.messaging.addr] {
        assert_eq!(health_of(addr, "").await, SERVING, "{addr}");
    }
    for addr in [stack.plans.addr, stack.billing.addr, stack.messaging.addr] {
        let reported = eventually(Duration::from_secs(5), || async {
            health_of(addr, "writes").await == NOT_SERVING
        })
        .await;
        assert!(
            reported,
            "{addr}: writes health did not report the full Redis"
        );
    }

    // Room again: the refused request goes through as if never tried.
    stack.redis.on_every_node(&maxmemory("0")).await;
    set_preference(&stack, "ana", "full-1").await.unwrap();
    send(&stack, "ana", "ben").await.unwrap();
    let back = eventually(Duration::from_secs(10), || async {
        health_of(stack.messaging.addr, "writes").await == SERVING
    })
    .await;
    assert!(back, "writes health did not recover");
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}
