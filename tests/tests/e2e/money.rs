//! Money paths that fault injection and black-box use found losing, minting
//! or stranding credits (issue 9): each test failed on the code before its
//! fix.

use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::billing::v1::LedgerEntryKind as Entry;
use inmail_shared::contract::proto::messaging::v1::{InmailResponse, RefundStatus};
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::processes::ProcessStack;
use inmail_tests::{As, BillingClient, Stack, StackOptions, billing_at, plans_at, rid};

use crate::common::*;

async fn change_plan(stack: &Stack, member: &str, plan: &str) {
    stack
        .plans_as(member)
        .change_plan(plans::ChangePlanRequest {
            request_id: rid(),
            member_id: member.into(),
            plan_id: plan.into(),
            timing: plans::ChangeTiming::Immediately as i32,
        })
        .await
        .unwrap_or_else(|s| panic!("change {member} to {plan}: {s:?}"));
}

/// Credits granted by renewals and plan changes (positive RENEWAL entries).
fn granted(entries: &[billing::LedgerEntry]) -> i64 {
    entries
        .iter()
        .filter(|e| e.kind == Entry::Renewal as i32 && e.amount > 0)
        .map(|e| e.amount)
        .sum()
}

/// A response at day 89 whose refund reaches billing only at day 91
/// (billing down meanwhile) still refunds: the window is judged at the
/// moment of the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_owed_at_day_89_is_made_when_billing_returns_at_day_91() {
    let mut stack = Stack::start().await;
    stack.set_time(utc(2027, 1, 10, 12)).await;
    subscribe(&stack, "sal", "premium-career").await;
    send(&stack, "sal", "tia").await.unwrap();
    stack.advance(89 * DAY).await;
    stack.stop_billing().await;
    let mut accept = tonic::Request::new(
        inmail_shared::contract::proto::messaging::v1::RespondToInmailRequest {
            request_id: rid(),
            member_id: "tia".into(),
            conversation_id: "sal~tia".into(),
            response: InmailResponse::Accept as i32,
            body: String::new(),
        },
    );
    accept.set_timeout(Duration::from_secs(2));
    // Answered PENDING (or cut short by the deadline): the refund is owed.
    let _ = stack.messaging_as("tia").respond_to_inmail(accept).await;
    let c = conversation(&stack, "tia", "sal~tia").await.unwrap();
    assert_eq!(
        c.inmail.unwrap().refund_status,
        RefundStatus::Pending as i32
    );
    stack.advance(2 * DAY).await;
    stack.start_billing_again().await;
    // The outbox sweeper retries once the response is old enough.
    stack.advance(Duration::from_secs(61)).await;
    let refunded = eventually(Duration::from_secs(10), || async {
        let c = conversation(&stack, "sal", "sal~tia").await.unwrap();
        c.inmail.unwrap().refund_status == RefundStatus::Refunded as i32
    })
    .await;
    assert!(
        refunded,
        "the refund owed for a response at day 89 was lost"
    );
    let entries = ledger(&stack, "sal").await;
    assert_eq!(count_kind(&entries, Entry::Refund), 1);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// Alternating ChangePlan IMMEDIATELY between two paid plans while
/// spending: after every change the balance is the new plan's month less
/// what the cycle used, so the credits used and held never exceed one
/// month of the most generous plan held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_plans_back_and_forth_never_mints_credits() {
    let stack = Stack::start_with(StackOptions {
        // Billing asks subscription-plan every time: every switch is seen.
        billing_args: vec!["--entitlement-cache-ttl".into(), "0s".into()],
        ..Default::default()
    })
    .await;
    subscribe(&stack, "zed", "sales-navigator-core").await;
    assert_eq!(available(&stack, "zed").await, 50);
    let mut used = 0;
    for round in 0..10 {
        for _ in 0..3 {
            spend(&stack, "zed", &format!("z{used}")).await.unwrap();
            used += 1;
        }
        change_plan(&stack, "zed", "recruiter-lite").await;
        assert_eq!(
            available(&stack, "zed").await,
            (30 - used).max(0),
            "round {round}"
        );
        change_plan(&stack, "zed", "sales-navigator-core").await;
        assert_eq!(available(&stack, "zed").await, 50 - used, "round {round}");
    }
    assert!(used + available(&stack, "zed").await <= 50);
    let entries = ledger(&stack, "zed").await;
    assert_eq!(granted(&entries), 50, "only the subscription renewed");
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// Issue 19's worked examples: an immediate change leaves what the new plan
/// would have left had the member held it since the cycle began; the
/// renewal date does not move, so a change never opens a cycle to grant
/// from; the next renewal grants the plan's full month.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_immediate_change_leaves_the_new_plans_month_less_what_the_cycle_used() {
    let stack = Stack::start_with(StackOptions {
        billing_args: vec!["--entitlement-cache-ttl".into(), "0s".into()],
        ..Default::default()
    })
    .await;
    stack.set_time(utc(2027, 5, 3, 9)).await;
    // Business with 2 used -> Career 3 -> Recruiter Lite 28 -> Business 13.
    subscribe(&stack, "uma", "premium-business").await;
    spend(&stack, "uma", "u1").await.unwrap();
    spend(&stack, "uma", "u2").await.unwrap();
    change_plan(&stack, "uma", "premium-career").await;
    assert_eq!(available(&stack, "uma").await, 3);
    change_plan(&stack, "uma", "recruiter-lite").await;
    assert_eq!(available(&stack, "uma").await, 28);
    change_plan(&stack, "uma", "premium-business").await;
    assert_eq!(available(&stack, "uma").await, 13);
    let entries = ledger(&stack, "uma").await;
    assert_eq!(count_kind(&entries, Entry::PlanChange), 3);
    // Career with 1 used -> Recruiter Lite 29.
    subscribe(&stack, "ulf", "premium-career").await;
    spend(&stack, "ulf", "l1").await.unwrap();
    change_plan(&stack, "ulf", "recruiter-lite").await;
    assert_eq!(available(&stack, "ulf").await, 29);
    // The renewal date stays May 3: the next cycle renews in full, the
    // unused rolling over (13 + 15; 29 + 30).
    stack.set_time(utc(2027, 6, 3, 10)).await;
    assert_eq!(available(&stack, "uma").await, 28);
    let b = balance(&stack, "ulf").await;
    assert_eq!(b.available, 59);
    assert_near(ts(&b.cycle_start), utc(2027, 6, 3, 9));
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// Issue 19's first example: a member who read their balance while on free
/// subscribed to Premium Business on the 25th, spent all 15, and after the
/// 1st switched to Career and back: the Business cycle still runs from the
/// 25th, so nothing more is spent in it (it was 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_free_month_before_a_subscription_does_not_shape_its_cycle() {
    let stack = Stack::start_with(StackOptions {
        billing_args: vec!["--entitlement-cache-ttl".into(), "0s".into()],
        ..Default::default()
    })
    .await;
    stack.set_time(utc(2027, 4, 10, 9)).await;
    assert_eq!(available(&stack, "vin").await, 0);
    stack.set_time(utc(2027, 4, 25, 9)).await;
    subscribe(&stack, "vin", "premium-business").await;
    let mut spent = 0;
    while spend(&stack, "vin", &format!("v{spent}")).await.is_ok() {
        spent += 1;
    }
    assert_eq!(spent, 15);
    stack.set_time(utc(2027, 5, 2, 9)).await;
    change_plan(&stack, "vin", "premium-career").await;
    assert_eq!(available(&stack, "vin").await, 0);
    change_plan(&stack, "vin", "premium-business").await;
    assert_eq!(available(&stack, "vin").await, 0);
    let refused = spend(&stack, "vin", "v-more").await.unwrap_err();
    assert_eq!(reason(&refused), "INSUFFICIENT_CREDITS");
    // The cycle ends on the 25th, when Business renews in full.
    stack.set_time(utc(2027, 5, 25, 10)).await;
    assert_eq!(available(&stack, "vin").await, 15);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// Billing trusts a cached entitlement only while the member's subscription
/// is at the revision it came from: with ENTITLEMENT_CACHE_TTL at an hour,
/// every plan change is still seen by the very next balance call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_change_reaches_billing_at_once_whatever_the_cache_ttl() {
    let stack = Stack::start_with(StackOptions {
        billing_args: vec!["--entitlement-cache-ttl".into(), "1h".into()],
        ..Default::default()
    })
    .await;
    subscribe(&stack, "una", "premium-career").await;
    assert_eq!(available(&stack, "una").await, 5);
    // Cached now; unchanged, it is answered without asking again.
    assert_eq!(available(&stack, "una").await, 5);
    change_plan(&stack, "una", "recruiter-lite").await;
    assert_eq!(
        available(&stack, "una").await,
        30,
        "the upgrade was not seen"
    );
    change_plan(&stack, "una", "premium-business").await;
    assert_eq!(
        available(&stack, "una").await,
        15,
        "the downgrade was not seen"
    );
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// subscription-plan stalls for longer than HOLD_TTL while billing serves a
/// direct DebitForMessage: no hold may escape the sweeper; the credit is
/// back within max(HOLD_TTL, the call's deadline) + SWEEP_INTERVAL of the
/// call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_made_while_subscription_plan_stalls_is_still_released() {
    let stack = ProcessStack::start(|name| match name {
        "billing-credits" => vec![
            ("HOLD_TTL".into(), "1s".into()),
            ("SWEEP_INTERVAL".into(), "100ms".into()),
            ("ENTITLEMENT_CACHE_TTL".into(), "0s".into()),
        ],
        _ => Vec::new(),
    })
    .await;
    let mut plans = plans_at(stack.plans.addr, &As::member("vic"));
    let billing = billing_at(stack.billing.addr, &As::Service("messaging"));
    plans
        .subscribe(plans::SubscribeRequest {
            request_id: rid(),
            member_id: "vic".into(),
            plan_id: "premium-career".into(),
        })
        .await
        .unwrap();
    let balance = |mut billing: BillingClient| async move {
        billing
            .get_balance(billing::GetBalanceRequest {
                member_id: "vic".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
            .unwrap()
            .available
    };
    assert_eq!(balance(billing.clone()).await, 5);

    signal(stack.plans.pid(), "-STOP");
    let debit = tokio::spawn({
        let mut billing = billing.clone();
        async move {
            let mut request = tonic::Request::new(billing::DebitForMessageRequest {
                request_id: rid(),
                member_id: "vic".into(),
                message_id: "stalled-1".into(),
                amount: 1,
            });
            // A hold lives HOLD_TTL, or as long as its caller may still
            // confirm it: the call's deadline.
            request.set_timeout(Duration::from_secs(4));
            billing.debit_for_message(request).await
        }
    });
    // Longer than HOLD_TTL plus a few sweeps.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    signal(stack.plans.pid(), "-CONT");
    let answered = debit.await.unwrap();
    // Whatever the answer, no credit may stay held.
    let released = eventually(Duration::from_secs(3), || async {
        let state = billing
            .clone()
            .get_debit(billing::GetDebitRequest {
                member_id: "vic".into(),
                message_id: "stalled-1".into(),
            })
            .await
            .map(|r| r.into_inner().debit.unwrap().state);
        !matches!(state, Ok(s) if s == billing::DebitState::Held as i32)
    })
    .await;
    assert!(
        released,
        "the hold escaped the sweeper (debit answered {answered:?})"
    );
    assert_eq!(balance(billing.clone()).await, 5, "the credit came back");
    assert_ledgers_reconcile(&mut billing_at(stack.billing.addr, &As::Operator)).await;
}

/// Timing settings that contradict each other are refused at start, naming
/// the variables: the outbox sweeper must not take over sends and responses
/// still in flight.
#[test]
fn contradicting_timing_settings_are_refused_at_start() {
    let listen = format!("127.0.0.1:{}", inmail_tests::redis_server::free_port());
    for (env, names) in [
        (
            vec![("SEND_RECOVERY_AFTER", "5s"), ("REQUEST_TIMEOUT", "10s")],
            ["SEND_RECOVERY_AFTER", "REQUEST_TIMEOUT"],
        ),
        (
            vec![("REFUND_RETRY", "0s"), ("REQUEST_TIMEOUT", "10s")],
            ["REFUND_RETRY", "REFUND_RETRY"],
        ),
    ] {
        let mut env = env;
        env.push(("LISTEN_ADDR", listen.as_str()));
        let (code, stderr) = crate::processes::run("messaging", &env, &[]);
        assert!(
            matches!(code, Some(c) if c != 0),
            "messaging {env:?} started (exit {code:?}): {stderr}"
        );
        for name in names {
            assert!(
                stderr.contains(name),
                "the message does not name {name}: {stderr}"
            );
        }
    }
}

/// A hold lives as long as the call that made it may still confirm it,
/// whatever HOLD_TTL says: a send slower than HOLD_TTL is delivered and
/// charged once, not released under its feet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_slower_than_hold_ttl_is_delivered_and_charged_once() {
    use messaging::send::{AfterDebitHook, Faults};
    use std::sync::Arc;
    let hook: AfterDebitHook = Arc::new(|| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            None
        })
    });
    let stack = Stack::start_with(StackOptions {
        billing_args: vec![
            "--hold-ttl".into(),
            "1s".into(),
            "--sweep-interval".into(),
            "100ms".into(),
        ],
        faults: Faults {
            after_debit: Some(hook),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    subscribe(&stack, "wes", "premium-career").await;
    let sent = send(&stack, "wes", "xia")
        .await
        .expect("the slow send is delivered");
    assert_eq!(sent.credits_charged, 1);
    assert_eq!(available(&stack, "wes").await, 4);
    let entries = ledger(&stack, "wes").await;
    assert_eq!(
        (
            count_kind(&entries, Entry::Debit),
            count_kind(&entries, Entry::Release)
        ),
        (1, 0)
    );
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// With a replica configured (REDIS_MIN_REPLICAS=1), a money write is
/// acknowledged only once the replica has it: with the replica stalled, a
/// debit is answered UNAVAILABLE (and its retry, once the replica is back,
/// gets the first outcome); every acknowledged debit is on the replica when
/// the primary dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_writes_wait_for_a_replica_when_one_is_configured() {
    use inmail_tests::RedisServer;
    // A single primary with a replica; the cluster run has no replicas.
    inmail_tests::redis_server::single_redis_only();
    let primary = RedisServer::start_single().await;
    let replica = primary.start_replica().await;
    let wait = vec![
        "--redis-min-replicas".to_string(),
        "1".into(),
        "--redis-replica-timeout".into(),
        "300ms".into(),
    ];
    let mut stack = Stack::start_on(
        primary,
        StackOptions {
            plans_args: wait.clone(),
            billing_args: wait.clone(),
            messaging_args: wait,
            ..Default::default()
        },
    )
    .await;
    // Set-up, as a client does it: a write the replica did not confirm in
    // time (a loaded machine) is retried with the same request id.
    let subscribe_yan = plans::SubscribeRequest {
        request_id: rid(),
        member_id: "yan".into(),
        plan_id: "premium-career".into(),
    };
    let mut subscribed = Err(tonic::Status::unknown("not tried"));
    for _ in 0..20 {
        subscribed = stack.plans_as("yan").subscribe(subscribe_yan.clone()).await;
        match &subscribed {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => break,
        }
    }
    subscribed.expect("subscribe yan");
    let debit = |id: &str| billing::DebitForMessageRequest {
        request_id: format!("req-{id}"),
        member_id: "yan".into(),
        message_id: id.into(),
        amount: 1,
    };
    stack
        .billing_as_messaging()
        .debit_for_message(debit("y1"))
        .await
        .unwrap();

    signal(replica.pid(), "-STOP");
    let stalled = stack
        .billing_as_messaging()
        .debit_for_message(debit("y2"))
        .await
        .unwrap_err();
    assert_eq!(stalled.code(), tonic::Code::Unavailable, "{stalled:?}");
    assert_eq!(reason(&stalled), "NOT_REPLICATED");
    signal(replica.pid(), "-CONT");
    let retried = stack
        .billing_as_messaging()
        .debit_for_message(debit("y2"))
        .await
        .expect("the retry gets the first outcome")
        .into_inner();
    assert_eq!(retried.balance_after, 3);

    // The primary dies: the replica has every acknowledged write.
    stack.redis.kill();
    let client = redis::Client::open(replica.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let balance: i64 = redis::cmd("HGET")
        .arg("billing:{yan}:account")
        .arg("balance")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(balance, 3);
    let debits: u64 = redis::cmd("EXISTS")
        .arg("billing:{yan}:debit:y1")
        .arg("billing:{yan}:debit:y2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(debits, 2);
}

async fn get_debit(stack: &Stack, member: &str, message_id: &str) -> billing::Debit {
    stack
        .billing_as_messaging()
        .get_debit(billing::GetDebitRequest {
            member_id: member.into(),
            message_id: message_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .debit
        .unwrap()
}

/// RefundMessage with a responded_at before the debit was made (0, or an
/// hour before it) is INVALID_ARGUMENT naming responded_at and changes
/// nothing; the same debit refunds with a true time afterwards (issue 19.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_answering_before_the_debit_is_refused_and_changes_nothing() {
    let stack = Stack::start().await;
    subscribe(&stack, "uma", "premium-career").await;
    let sent = send(&stack, "uma", "vic").await.unwrap();
    let message_id = sent.message.unwrap().message_id;
    let debit = get_debit(&stack, "uma", &message_id).await;
    assert_eq!(debit.state, billing::DebitState::Confirmed as i32);
    let debited_at = debit.debited_at.unwrap();
    let refund = |responded_at: prost_types::Timestamp| billing::RefundMessageRequest {
        request_id: rid(),
        member_id: "uma".into(),
        message_id: message_id.clone(),
        responded_at: Some(responded_at),
    };
    let an_hour_before = prost_types::Timestamp {
        seconds: debited_at.seconds - 3600,
        nanos: debited_at.nanos,
    };
    for responded_at in [prost_types::Timestamp::default(), an_hour_before] {
        let refused = stack
            .billing_as_messaging()
            .refund_message(refund(responded_at))
            .await
            .expect_err("a response before the debit must not refund it");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert_eq!(bad_fields(&refused), vec!["responded_at".to_string()]);
    }
    assert_eq!(available(&stack, "uma").await, 4, "nothing refunded");
    assert_eq!(count_kind(&ledger(&stack, "uma").await, Entry::Refund), 0);
    assert_eq!(
        get_debit(&stack, "uma", &message_id).await.state,
        billing::DebitState::Confirmed as i32
    );
    // The debit was refundable all along: a true response time refunds it.
    let now = stack.now().await;
    let refunded = stack
        .billing_as_messaging()
        .refund_message(refund(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(refunded.refunded_now);
    assert_eq!(available(&stack, "uma").await, 5);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// A refund owed whose recorded response time cannot be read is not sent
/// with a guessed time (it was sent as 0, which refunded any debit): it
/// stays owed, and billing refunds nothing (issue 19.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_whose_response_time_cannot_be_read_is_not_sent() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "wes", "premium-career").await;
    send(&stack, "wes", "xia").await.unwrap();
    stack.stop_billing().await;
    let mut accept = tonic::Request::new(
        inmail_shared::contract::proto::messaging::v1::RespondToInmailRequest {
            request_id: rid(),
            member_id: "xia".into(),
            conversation_id: "wes~xia".into(),
            response: InmailResponse::Accept as i32,
            body: String::new(),
        },
    );
    accept.set_timeout(Duration::from_secs(2));
    let _ = stack.messaging_as("xia").respond_to_inmail(accept).await;
    let c = conversation(&stack, "xia", "wes~xia").await.unwrap();
    assert_eq!(
        c.inmail.unwrap().refund_status,
        RefundStatus::Pending as i32
    );
    let mut redis = stack.redis.conn().await;
    let _: () = redis::cmd("HSET")
        .arg("messaging:{wes~xia}:conv")
        .arg("im_resp_at")
        .arg("not-a-time")
        .query_async(&mut redis)
        .await
        .unwrap();
    stack.start_billing_again().await;
    // The outbox sweeper looks at the refund once the response is old enough.
    stack.advance(Duration::from_secs(61)).await;
    let refunded = eventually(Duration::from_secs(4), || async {
        count_kind(&ledger(&stack, "wes").await, Entry::Refund) > 0
    })
    .await;
    assert!(
        !refunded,
        "a refund was made with a response time messaging could not read"
    );
    assert_eq!(available(&stack, "wes").await, 4);
    let c = conversation(&stack, "wes", "wes~xia").await.unwrap();
    assert_eq!(
        c.inmail.unwrap().refund_status,
        RefundStatus::Pending as i32
    );
}
