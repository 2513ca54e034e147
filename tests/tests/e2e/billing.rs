//! billing-credits over real gRPC, with the real subscription-plan and a real
//! Redis: the money guarantees of README.md, "Money guarantees".

use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::contract::proto::billing::v1::LedgerEntryKind as Kind;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::{NOT_SERVING, SERVING, Stack, health, race, rid};
use tonic::Code;

use crate::common::*;

fn debit_request(member: &str, message_id: &str) -> pb::DebitForMessageRequest {
    pb::DebitForMessageRequest {
        request_id: rid(),
        member_id: member.into(),
        message_id: message_id.into(),
        amount: 1,
    }
}

async fn debit(
    stack: &Stack,
    member: &str,
    message_id: &str,
) -> Result<pb::DebitForMessageResponse, tonic::Status> {
    stack
        .billing_as_messaging()
        .debit_for_message(debit_request(member, message_id))
        .await
        .map(tonic::Response::into_inner)
}

async fn confirm(
    stack: &Stack,
    member: &str,
    message_id: &str,
) -> Result<pb::Debit, tonic::Status> {
    stack
        .billing_as_messaging()
        .confirm_debit(pb::ConfirmDebitRequest {
            request_id: rid(),
            member_id: member.into(),
            message_id: message_id.into(),
        })
        .await
        .map(|r| r.into_inner().debit.unwrap())
}

async fn refund(
    stack: &Stack,
    member: &str,
    message_id: &str,
) -> Result<pb::RefundMessageResponse, tonic::Status> {
    stack
        .billing_as_messaging()
        .refund_message(pb::RefundMessageRequest {
            request_id: rid(),
            member_id: member.into(),
            message_id: message_id.into(),
            responded_at: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_debits_race_for_five_credits_exactly_five_win() {
    let stack = Stack::start().await;
    subscribe(&stack, "ann", "premium-career").await;
    assert_eq!(available(&stack, "ann").await, 5);
    let calls = (0..200)
        .map(|i| {
            let mut billing = stack.billing_as_messaging();
            async move {
                billing
                    .debit_for_message(debit_request("ann", &format!("msg-{i}")))
                    .await
            }
        })
        .collect();
    let mut won = 0;
    for answer in race(calls, 10).await {
        match answer {
            Ok(_) => won += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(reason(&status), "INSUFFICIENT_CREDITS");
            }
        }
    }
    assert_eq!(won, 5);
    assert_eq!(available(&stack, "ann").await, 0);
    let entries = ledger(&stack, "ann").await;
    assert_eq!(count_kind(&entries, Kind::Debit), 5);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_debits_of_one_message_debit_once_with_identical_answers() {
    let stack = Stack::start().await;
    subscribe(&stack, "bo", "premium-business").await;
    let request = debit_request("bo", "the-one");
    let calls = (0..50)
        .map(|_| {
            let mut billing = stack.billing_as_messaging();
            let request = request.clone();
            async move { billing.debit_for_message(request).await }
        })
        .collect();
    let answers: Vec<_> = race(calls, 5)
        .await
        .into_iter()
        .map(|answer| answer.expect("debit").into_inner())
        .collect();
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "answers differ");
    assert_eq!(answers[0].balance_after, 14);
    assert_eq!(available(&stack, "bo").await, 14);
    assert_eq!(count_kind(&ledger(&stack, "bo").await, Kind::Debit), 1);

    // Another request id for the same message is the same debit, not a new one.
    let again = debit(&stack, "bo", "the-one").await.unwrap();
    assert_eq!(again.balance_after, 14);
    assert_eq!(again.debit, answers[0].debit);
    assert_eq!(available(&stack, "bo").await, 14);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_refunds_give_the_credit_back_exactly_once() {
    let stack = Stack::start().await;
    subscribe(&stack, "cy", "premium-career").await;
    debit(&stack, "cy", "m1").await.unwrap();
    confirm(&stack, "cy", "m1").await.unwrap();
    assert_eq!(available(&stack, "cy").await, 4);
    let calls = (0..50)
        .map(|_| {
            let mut billing = stack.billing_as_messaging();
            async move {
                billing
                    .refund_message(pb::RefundMessageRequest {
                        request_id: rid(),
                        member_id: "cy".into(),
                        message_id: "m1".into(),
                        responded_at: None,
                    })
                    .await
            }
        })
        .collect();
    let mut refunded_now = 0;
    for answer in race(calls, 5).await {
        if answer.expect("refund").into_inner().refunded_now {
            refunded_now += 1;
        }
    }
    assert_eq!(refunded_now, 1);
    assert_eq!(available(&stack, "cy").await, 5);
    assert_eq!(count_kind(&ledger(&stack, "cy").await, Kind::Refund), 1);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_first_touches_of_a_new_cycle_renew_once() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 1, 10, 9)).await;
    subscribe(&stack, "di", "premium-career").await;
    assert_eq!(available(&stack, "di").await, 5);
    stack.set_time(utc(2027, 2, 10, 10)).await;
    let calls = (0..50)
        .map(|i| {
            let mut billing = stack.billing_as_messaging();
            let mut operator = stack.billing_operator();
            async move {
                if i % 2 == 0 {
                    billing
                        .get_balance(pb::GetBalanceRequest {
                            member_id: "di".into(),
                        })
                        .await
                        .map(|r| r.into_inner().balance.unwrap().available)
                } else {
                    operator
                        .grant_credits(pb::GrantCreditsRequest {
                            request_id: rid(),
                            member_id: "di".into(),
                            amount: 1,
                            reason: "race".into(),
                        })
                        .await
                        .map(|r| r.into_inner().balance_after)
                }
            }
        })
        .collect();
    for answer in race(calls, 5).await {
        answer.expect("touch");
    }
    let entries = ledger(&stack, "di").await;
    assert_eq!(
        count_kind(&entries, Kind::Renewal),
        2,
        "cycle 1 and cycle 2, once each"
    );
    // 5 + renewal 5 = 10, then 25 grants of 1.
    assert_eq!(available(&stack, "di").await, 10 + 25);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_cycles_each_renew_once_up_to_the_rollover_cap() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 1, 31, 10)).await;
    subscribe(&stack, "eve", "premium-career").await;
    assert_eq!(available(&stack, "eve").await, 5);
    // Two idle cycles (Feb 28, Mar 31): 5 → 10 → 15.
    stack.set_time(utc(2027, 4, 2, 0)).await;
    let b = balance(&stack, "eve").await;
    assert_eq!(b.available, 15);
    assert_near(ts(&b.cycle_start), utc(2027, 3, 31, 10));
    // Idle for a year more: capped at 15, one renewal entry per cycle.
    stack.set_time(utc(2028, 4, 2, 0)).await;
    assert_eq!(available(&stack, "eve").await, 15);
    let renewals: Vec<_> = ledger(&stack, "eve")
        .await
        .into_iter()
        .filter(|e| e.kind == Kind::Renewal as i32)
        .collect();
    assert_eq!(renewals.len(), 3 + 12);
    let amounts: Vec<i64> = renewals.iter().rev().map(|e| e.amount).take(4).collect();
    assert_eq!(amounts, [5, 5, 5, 0]);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_adds_monthly_credits_to_unused_up_to_the_cap() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 6, 1, 0)).await;
    subscribe(&stack, "flo", "premium-career").await;
    debit(&stack, "flo", "x1").await.unwrap();
    confirm(&stack, "flo", "x1").await.unwrap();
    assert_eq!(available(&stack, "flo").await, 4);
    stack.set_time(utc(2027, 7, 1, 1)).await;
    assert_eq!(available(&stack, "flo").await, 9, "4 unused + 5");
    grant(&stack, "flo", 20).await;
    assert_eq!(available(&stack, "flo").await, 29);
    stack.set_time(utc(2027, 8, 1, 1)).await;
    assert_eq!(available(&stack, "flo").await, 15, "min(29 + 5, 15)");
    let b = balance(&stack, "flo").await;
    assert_eq!(
        (b.monthly_credits, b.rollover_cap, b.debited_this_cycle),
        (5, 15, 0)
    );
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_writes_off_old_credits_and_tops_up_to_the_new_plan() {
    let stack = Stack::start().await;
    subscribe(&stack, "gus", "premium-career").await;
    debit(&stack, "gus", "g1").await.unwrap();
    assert_eq!(available(&stack, "gus").await, 4);
    stack
        .plans_as("gus")
        .change_plan(plans::ChangePlanRequest {
            request_id: rid(),
            member_id: "gus".into(),
            plan_id: "recruiter-lite".into(),
            timing: plans::ChangeTiming::Immediately as i32,
        })
        .await
        .unwrap();
    stack.advance(ENTITLEMENT_STALENESS).await;
    let b = balance(&stack, "gus").await;
    // What holding Recruiter Lite since the cycle began would have left:
    // 30 less the 1 used (issue 19; it was 25, 30 less Career's 5).
    assert_eq!(
        (b.available, b.plan_id.as_str(), b.plan_version),
        (29, "recruiter-lite", 2)
    );
    let entries = ledger(&stack, "gus").await;
    let write_off = entries
        .iter()
        .find(|e| e.kind == Kind::WriteOff as i32)
        .expect("write-off entry");
    assert_eq!((write_off.amount, write_off.balance_after), (-4, 0));
    assert_eq!(write_off.plan_id, "premium-career");
    assert_eq!(entries[0].kind, Kind::PlanChange as i32);
    assert_eq!(
        (entries[0].amount, entries[0].plan_id.as_str()),
        (29, "recruiter-lite")
    );
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_at_cycle_end_keeps_credits_until_then_then_writes_them_off() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 9, 15, 12)).await;
    subscribe(&stack, "hal", "premium-business").await;
    assert_eq!(available(&stack, "hal").await, 15);
    stack
        .plans_as("hal")
        .cancel_subscription(plans::CancelSubscriptionRequest {
            request_id: rid(),
            member_id: "hal".into(),
            timing: plans::ChangeTiming::EndOfCycle as i32,
        })
        .await
        .unwrap();
    stack.set_time(utc(2027, 10, 15, 11)).await;
    assert_eq!(
        available(&stack, "hal").await,
        15,
        "usable until the cycle ends"
    );
    debit(&stack, "hal", "h1").await.unwrap();
    confirm(&stack, "hal", "h1").await.unwrap();
    stack.set_time(utc(2027, 10, 15, 13)).await;
    let b = balance(&stack, "hal").await;
    assert_eq!((b.available, b.plan_id.as_str()), (0, "free"));
    let entries = ledger(&stack, "hal").await;
    assert_eq!(entries[0].kind, Kind::WriteOff as i32);
    assert_eq!(entries[0].amount, -14);
    let refused = debit(&stack, "hal", "h2").await.unwrap_err();
    assert_eq!(reason(&refused), "PAID_PLAN_REQUIRED");
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_goes_to_the_current_cycle_also_across_a_boundary() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 2, 20, 0)).await;
    subscribe(&stack, "ida", "premium-career").await;
    debit(&stack, "ida", "i1").await.unwrap();
    confirm(&stack, "ida", "i1").await.unwrap();
    stack.set_time(utc(2027, 3, 25, 0)).await;
    assert_eq!(available(&stack, "ida").await, 9);
    let r = refund(&stack, "ida", "i1").await.unwrap();
    assert!(r.refunded_now);
    assert_eq!(r.balance_after, 10);
    let b = balance(&stack, "ida").await;
    assert_eq!((b.available, b.refunded_this_cycle), (10, 1));
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_rules_unknown_unconfirmed_released_and_after_the_window() {
    let stack = Stack::start().await;
    subscribe(&stack, "jo", "premium-business").await;
    let unknown = refund(&stack, "jo", "nope").await.unwrap_err();
    assert_eq!(
        (unknown.code(), reason(&unknown).as_str()),
        (Code::NotFound, "DEBIT_NOT_FOUND")
    );
    debit(&stack, "jo", "held").await.unwrap();
    let held = refund(&stack, "jo", "held").await.unwrap_err();
    assert_eq!(reason(&held), "DEBIT_NOT_CONFIRMED");
    debit(&stack, "jo", "late").await.unwrap();
    confirm(&stack, "jo", "late").await.unwrap();
    stack.advance(DAY * 91).await;
    let closed = refund(&stack, "jo", "late").await.unwrap_err();
    assert_eq!(reason(&closed), "REFUND_WINDOW_CLOSED");
    // Confirming a held debit after its hold ran out is refused: the credit
    // went back instead.
    let expired = confirm(&stack, "jo", "held").await.unwrap_err();
    assert_eq!(reason(&expired), "DEBIT_RELEASED");
    let again = debit(&stack, "jo", "held").await.unwrap_err();
    assert_eq!(reason(&again), "DEBIT_RELEASED");
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_holds_are_released_by_the_sweeper_within_the_bound() {
    let stack = Stack::start().await;
    subscribe(&stack, "kai", "premium-career").await;
    let d = debit(&stack, "kai", "orphan").await.unwrap();
    assert_eq!(d.balance_after, 4);
    assert_eq!(d.debit.unwrap().state, pb::DebitState::Held as i32);
    // HOLD_TTL is 30s of (test) time; the sweeper runs every second.
    stack.advance(Duration::from_secs(31)).await;
    let released = eventually(Duration::from_secs(5), || async {
        available(&stack, "kai").await == 5
    })
    .await;
    assert!(released, "the hold was not released");
    let state = stack
        .billing_as_messaging()
        .get_debit(pb::GetDebitRequest {
            member_id: "kai".into(),
            message_id: "orphan".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .debit
        .unwrap();
    assert_eq!(state.state, pb::DebitState::Released as i32);
    assert_eq!(state.release_reason, pb::ReleaseReason::HoldExpired as i32);
    assert_eq!(count_kind(&ledger(&stack, "kai").await, Kind::Release), 1);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_of_an_unknown_id_blocks_a_late_debit_of_it() {
    let stack = Stack::start().await;
    subscribe(&stack, "lee", "premium-career").await;
    let released = stack
        .billing_as_messaging()
        .release_debit(pb::ReleaseDebitRequest {
            request_id: rid(),
            member_id: "lee".into(),
            message_id: "never".into(),
            reason: pb::ReleaseReason::Abandoned as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!released.released_now);
    let late = debit(&stack, "lee", "never").await.unwrap_err();
    assert_eq!(reason(&late), "DEBIT_RELEASED");
    assert_eq!(available(&stack, "lee").await, 5);
    // A confirmed debit cannot be released, only refunded.
    debit(&stack, "lee", "ok").await.unwrap();
    confirm(&stack, "lee", "ok").await.unwrap();
    let refused = stack
        .billing_as_messaging()
        .release_debit(pb::ReleaseDebitRequest {
            request_id: rid(),
            member_id: "lee".into(),
            message_id: "ok".into(),
            reason: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "DEBIT_CONFIRMED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_id_cannot_be_charged_to_another_member_or_amount() {
    let stack = Stack::start().await;
    subscribe(&stack, "mo", "premium-career").await;
    subscribe(&stack, "ned", "premium-career").await;
    debit(&stack, "mo", "shared-id").await.unwrap();
    let other_member = debit(&stack, "ned", "shared-id").await.unwrap_err();
    assert_eq!(reason(&other_member), "MESSAGE_ID_CONFLICT");
    let other_amount = stack
        .billing_as_messaging()
        .debit_for_message(pb::DebitForMessageRequest {
            amount: 2,
            ..debit_request("mo", "shared-id")
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&other_amount), "MESSAGE_ID_CONFLICT");
    assert_eq!(available(&stack, "ned").await, 5);
    assert_eq!(available(&stack, "mo").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_reuse_with_other_arguments_is_refused() {
    let stack = Stack::start().await;
    subscribe(&stack, "ola", "premium-career").await;
    let request = debit_request("ola", "o1");
    stack
        .billing_as_messaging()
        .debit_for_message(request.clone())
        .await
        .unwrap();
    let reused = stack
        .billing_as_messaging()
        .debit_for_message(pb::DebitForMessageRequest {
            message_id: "o2".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(
        (reused.code(), reason(&reused).as_str()),
        (Code::InvalidArgument, "REQUEST_ID_REUSED")
    );
    assert_eq!(available(&stack, "ola").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_survive_a_script_cache_flush() {
    let stack = Stack::start().await;
    subscribe(&stack, "pia", "premium-career").await;
    debit(&stack, "pia", "p1").await.unwrap();
    stack
        .redis
        .on_every_node(redis::cmd("SCRIPT").arg("FLUSH"))
        .await;
    debit(&stack, "pia", "p2")
        .await
        .expect("debit after SCRIPT FLUSH");
    assert_eq!(available(&stack, "pia").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_lists_newest_first_in_pages() {
    let stack = Stack::start().await;
    subscribe(&stack, "quin", "recruiter-lite").await;
    for i in 0..7 {
        debit(&stack, "quin", &format!("q{i}")).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = stack
            .billing_operator()
            .list_ledger_entries(pb::ListLedgerEntriesRequest {
                member_id: "quin".into(),
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        seen.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 8);
    let balances: Vec<i64> = seen.iter().map(|e| e.balance_after).collect();
    assert_eq!(balances, [23, 24, 25, 26, 27, 28, 29, 30]);
    assert_eq!(seen.last().unwrap().kind, Kind::Renewal as i32);
    assert_eq!(seen[0].message_id, "q6");
    assert!(!seen[0].request_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_bounded_and_free_members_cannot_debit() {
    let stack = Stack::start().await;
    assert_eq!(grant(&stack, "rex", 3).await, 3);
    let refused = debit(&stack, "rex", "r1").await.unwrap_err();
    assert_eq!(reason(&refused), "PAID_PLAN_REQUIRED");
    let too_much = stack
        .billing_operator()
        .grant_credits(pb::GrantCreditsRequest {
            request_id: rid(),
            member_id: "rex".into(),
            amount: 1001,
            reason: "too much".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&too_much), ["amount"]);
    let entries = ledger(&stack, "rex").await;
    assert_eq!(
        (entries[0].kind, entries[0].note.as_str()),
        (Kind::Grant as i32, "test top-up")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_rpc_names_the_field_and_changes_nothing() {
    let stack = Stack::start().await;
    subscribe(&stack, "sue", "premium-career").await;
    debit(&stack, "sue", "s1").await.unwrap();
    let mut b = stack.billing_as_messaging();
    let mut op = stack.billing_operator();
    let before = stack.redis.digest().await;
    let long = "m".repeat(129);
    let bad_page = "!!".to_string();
    let mut cases: Vec<(&str, tonic::Status)> = Vec::new();
    cases.push((
        "member_id",
        b.get_balance(pb::GetBalanceRequest {
            member_id: "".into(),
        })
        .await
        .unwrap_err(),
    ));
    for (field, request) in [
        (
            "request_id",
            pb::DebitForMessageRequest {
                request_id: "".into(),
                ..debit_request("sue", "s2")
            },
        ),
        (
            "member_id",
            pb::DebitForMessageRequest {
                member_id: "s u e".into(),
                ..debit_request("sue", "s2")
            },
        ),
        (
            "message_id",
            pb::DebitForMessageRequest {
                message_id: "".into(),
                ..debit_request("sue", "s2")
            },
        ),
        (
            "message_id",
            pb::DebitForMessageRequest {
                message_id: long.clone(),
                ..debit_request("sue", "s2")
            },
        ),
        (
            "amount",
            pb::DebitForMessageRequest {
                amount: 0,
                ..debit_request("sue", "s2")
            },
        ),
        (
            "amount",
            pb::DebitForMessageRequest {
                amount: -1,
                ..debit_request("sue", "s2")
            },
        ),
        (
            "amount",
            pb::DebitForMessageRequest {
                amount: 101,
                ..debit_request("sue", "s2")
            },
        ),
    ] {
        cases.push((field, b.debit_for_message(request).await.unwrap_err()));
    }
    cases.push((
        "message_id",
        b.confirm_debit(pb::ConfirmDebitRequest {
            request_id: rid(),
            member_id: "sue".into(),
            message_id: "a|b".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "request_id",
        b.confirm_debit(pb::ConfirmDebitRequest {
            request_id: "has space".into(),
            member_id: "sue".into(),
            message_id: "s1".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "reason",
        b.release_debit(pb::ReleaseDebitRequest {
            request_id: rid(),
            member_id: "sue".into(),
            message_id: "s1".into(),
            reason: 9,
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "member_id",
        b.refund_message(pb::RefundMessageRequest {
            request_id: rid(),
            member_id: "".into(),
            message_id: "s1".into(),
            responded_at: None,
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "message_id",
        b.get_debit(pb::GetDebitRequest {
            member_id: "sue".into(),
            message_id: "".into(),
        })
        .await
        .unwrap_err(),
    ));
    for (field, request) in [
        (
            "amount",
            pb::GrantCreditsRequest {
                request_id: rid(),
                member_id: "sue".into(),
                amount: 0,
                reason: "x".into(),
            },
        ),
        (
            "reason",
            pb::GrantCreditsRequest {
                request_id: rid(),
                member_id: "sue".into(),
                amount: 1,
                reason: "".into(),
            },
        ),
        (
            "reason",
            pb::GrantCreditsRequest {
                request_id: rid(),
                member_id: "sue".into(),
                amount: 1,
                reason: "r".repeat(201),
            },
        ),
        (
            "member_id",
            pb::GrantCreditsRequest {
                request_id: rid(),
                member_id: "x".repeat(65),
                amount: 1,
                reason: "x".into(),
            },
        ),
    ] {
        cases.push((field, op.grant_credits(request).await.unwrap_err()));
    }
    cases.push((
        "page_size",
        op.list_ledger_entries(pb::ListLedgerEntriesRequest {
            member_id: "sue".into(),
            page_size: -5,
            page_token: "".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "page_token",
        op.list_ledger_entries(pb::ListLedgerEntriesRequest {
            member_id: "sue".into(),
            page_size: 0,
            page_token: bad_page.clone(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "page_token",
        op.reconcile_ledgers(pb::ReconcileLedgersRequest {
            page_size: 0,
            page_token: bad_page,
            full: false,
        })
        .await
        .unwrap_err(),
    ));
    for (field, status) in &cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            bad_fields(status).contains(&field.to_string()),
            "{field}: {status:?}"
        );
    }
    assert_eq!(
        stack.redis.digest().await,
        before,
        "bad input changed Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_no_acknowledged_debit_and_service_resumes() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "tia", "recruiter-lite").await;
    let mut acknowledged = 0;
    for i in 0..10 {
        debit(&stack, "tia", &format!("t{i}")).await.unwrap();
        acknowledged += 1;
    }
    stack.redis.kill();
    // Down: calls fail fast with UNAVAILABLE and health says NOT_SERVING.
    let started = std::time::Instant::now();
    let down = debit(&stack, "tia", "while-down").await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let not_serving = eventually(Duration::from_secs(5), || async {
        matches!(health(stack.billing.addr).await, Ok(NOT_SERVING))
    })
    .await;
    assert!(not_serving, "health did not report NOT_SERVING");

    stack.redis.restart().await;
    let serving = eventually(Duration::from_secs(10), || async {
        matches!(health(stack.billing.addr).await, Ok(SERVING))
    })
    .await;
    assert!(serving, "health did not come back to SERVING");
    let b = balance(&stack, "tia").await;
    assert_eq!(
        b.available,
        30 - acknowledged,
        "an acknowledged debit was lost"
    );
    debit(&stack, "tia", "after")
        .await
        .expect("service resumed by itself");
    assert_eq!(count_kind(&ledger(&stack, "tia").await, Kind::Debit), 11);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// An expired hold comes back even while subscription-plan is down: the
/// release settles on the entitlement billing already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_are_released_while_subscription_plan_is_down() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "uri", "premium-career").await;
    debit(&stack, "uri", "orphan").await.unwrap();
    stack.plans.stop().await;
    // Past the hold and past the 1s the entitlement may be trusted.
    stack.advance(Duration::from_secs(31)).await;
    let state = || async {
        stack
            .billing_as_messaging()
            .get_debit(pb::GetDebitRequest {
                member_id: "uri".into(),
                message_id: "orphan".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .debit
            .unwrap()
            .state
    };
    assert!(
        eventually(Duration::from_secs(8), || async {
            state().await == pb::DebitState::Released as i32
        })
        .await,
        "the hold was not released without subscription-plan"
    );
    let entries = ledger(&stack, "uri").await;
    assert_eq!(entries[0].kind, Kind::Release as i32);
    assert_eq!(entries[0].balance_after, 5);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}
