//! subscription-plan over real gRPC and a real Redis.

use std::collections::HashSet;

use inmail_shared::contract::proto::plans::v1 as pb;
use inmail_tests::{As, Stack, race, rid};
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_the_design_defaults_and_pages() {
    let stack = Stack::start().await;
    let mut plans = stack.plans_as("reader");
    let all = plans
        .list_plans(pb::ListPlansRequest::default())
        .await
        .unwrap()
        .into_inner();
    let summary: Vec<_> = all
        .plans
        .iter()
        .map(|p| {
            (
                p.plan_id.as_str(),
                p.monthly_credits,
                p.rollover_cap,
                p.paid,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("free", 0, 0, false),
            ("premium-career", 5, 15, true),
            ("premium-business", 15, 45, true),
            ("recruiter-lite", 30, 120, true),
            ("sales-navigator-core", 50, 150, true),
        ]
    );
    let sales = &all.plans[4];
    assert_eq!(sales.cycle_kind, pb::CycleKind::CalendarMonth as i32);

    let first = plans
        .list_plans(pb::ListPlansRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.plans.len(), 2);
    let second = plans
        .list_plans(pb::ListPlansRequest {
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.plans[0].plan_id, "premium-business");

    let missing = plans
        .get_plan(pb::GetPlanRequest {
            plan_id: "platinum".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(reason(&missing), "PLAN_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anniversary_cycles_clamp_to_month_end_through_the_test_clock() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 1, 31, 10)).await;
    let s = subscribe(&stack, "carol", "premium-career").await;
    assert_eq!(s.version, 1);
    assert_eq!(s.cycle_index, 1);
    assert_near(ts(&s.cycle_end), utc(2027, 2, 28, 10));

    stack.set_time(utc(2027, 2, 28, 11)).await;
    let s = subscription(&stack, "carol").await;
    assert_eq!(s.cycle_index, 2);
    assert_near(ts(&s.cycle_start), utc(2027, 2, 28, 10));
    assert_near(ts(&s.cycle_end), utc(2027, 3, 31, 10));

    stack.set_time(utc(2027, 4, 1, 0)).await;
    let s = subscription(&stack, "carol").await;
    assert_eq!(s.cycle_index, 3);
    assert_near(ts(&s.cycle_start), utc(2027, 3, 31, 10));
    assert_near(ts(&s.cycle_end), utc(2027, 4, 30, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_month_cycles_renew_on_the_first() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 12, 17, 15)).await;
    let s = subscribe(&stack, "sally", "sales-navigator-core").await;
    assert_near(ts(&s.cycle_start), utc(2027, 12, 17, 15));
    assert_near(ts(&s.cycle_end), utc(2028, 1, 1, 0));
    stack.set_time(utc(2028, 2, 29, 12)).await;
    let s = subscription(&stack, "sally").await;
    assert_eq!(s.cycle_index, 3);
    assert_near(ts(&s.cycle_start), utc(2028, 2, 1, 0));
    assert_near(ts(&s.cycle_end), utc(2028, 3, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_change_takes_effect_at_cycle_end() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 5, 10, 8)).await;
    subscribe(&stack, "dave", "premium-career").await;
    let s = stack
        .plans_as("dave")
        .change_plan(pb::ChangePlanRequest {
            request_id: rid(),
            member_id: "dave".into(),
            plan_id: "recruiter-lite".into(),
            timing: pb::ChangeTiming::EndOfCycle as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!(s.plan_id, "premium-career");
    let scheduled = s.scheduled_change.unwrap();
    assert_eq!(scheduled.plan_id, "recruiter-lite");
    assert_near(ts(&scheduled.effective_at), utc(2027, 6, 10, 8));

    stack.set_time(utc(2027, 6, 10, 7)).await;
    assert_eq!(subscription(&stack, "dave").await.plan_id, "premium-career");

    stack.set_time(utc(2027, 6, 10, 9)).await;
    let s = subscription(&stack, "dave").await;
    assert_eq!(s.plan_id, "recruiter-lite");
    assert_eq!(s.version, 2);
    assert!(s.scheduled_change.is_none());
    assert_near(ts(&s.period_started_at), utc(2027, 6, 10, 8));

    let entitlement = stack
        .plans_with(&As::Operator)
        .get_entitlement(pb::GetEntitlementRequest {
            member_id: "dave".into(),
            after_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let ended = &entitlement.ended_periods;
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].plan_id, "premium-career");
    assert_eq!(ended[0].cycles_started, 1);
    assert_eq!(ended[0].end_reason, pb::PeriodEndReason::PlanChanged as i32);
    let current = entitlement.current_period.unwrap();
    assert_eq!(
        (
            current.plan_id.as_str(),
            current.monthly_credits,
            current.cycles_started
        ),
        ("recruiter-lite", 30, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_the_plan_until_cycle_end_then_free_and_open_profile_off() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 3, 5, 12)).await;
    subscribe(&stack, "erin", "premium-business").await;
    assert!(
        set_open_profile(&stack, "erin", true)
            .await
            .unwrap()
            .open_profile
    );
    let s = stack
        .plans_as("erin")
        .cancel_subscription(pb::CancelSubscriptionRequest {
            request_id: rid(),
            member_id: "erin".into(),
            timing: pb::ChangeTiming::Unspecified as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!(s.plan_id, "premium-business");
    assert!(s.scheduled_change.as_ref().unwrap().cancellation);

    stack.set_time(utc(2027, 4, 5, 13)).await;
    let s = subscription(&stack, "erin").await;
    assert_eq!(s.plan_id, "free");
    assert!(!s.paid);
    assert!(
        !s.open_profile,
        "Open Profile turns off when leaving paid plans"
    );

    let refused = set_open_profile(&stack, "erin", true).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "PAID_PLAN_REQUIRED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_now_and_clear_a_scheduled_change() {
    let stack = Stack::start().await;
    subscribe(&stack, "finn", "premium-career").await;
    let mut plans = stack.plans_as("finn");
    plans
        .change_plan(pb::ChangePlanRequest {
            request_id: rid(),
            member_id: "finn".into(),
            plan_id: "premium-business".into(),
            timing: pb::ChangeTiming::EndOfCycle as i32,
        })
        .await
        .unwrap();
    let cleared = plans
        .clear_scheduled_change(pb::ClearScheduledChangeRequest {
            request_id: rid(),
            member_id: "finn".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert!(cleared.scheduled_change.is_none());
    let again = plans
        .clear_scheduled_change(pb::ClearScheduledChangeRequest {
            request_id: rid(),
            member_id: "finn".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&again), "NO_SCHEDULED_CHANGE");

    let s = plans
        .cancel_subscription(pb::CancelSubscriptionRequest {
            request_id: rid(),
            member_id: "finn".into(),
            timing: pb::ChangeTiming::Immediately as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    assert_eq!((s.plan_id.as_str(), s.version), ("free", 2));
    let not = plans
        .cancel_subscription(pb::CancelSubscriptionRequest {
            request_id: rid(),
            member_id: "finn".into(),
            timing: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&not), "NOT_SUBSCRIBED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_retry_returns_the_first_answer_and_reuse_is_refused() {
    let stack = Stack::start().await;
    let mut plans = stack.plans_as("gail");
    let request = pb::SubscribeRequest {
        request_id: "sub-1".into(),
        member_id: "gail".into(),
        plan_id: "premium-career".into(),
    };
    let first = plans.subscribe(request.clone()).await.unwrap().into_inner();
    stack.advance(std::time::Duration::from_secs(5)).await;
    let retry = plans.subscribe(request.clone()).await.unwrap().into_inner();
    assert_eq!(first, retry, "a retry answers the first outcome");
    assert_eq!(
        subscription(&stack, "gail").await.version,
        1,
        "nothing happened twice"
    );

    let reused = plans
        .subscribe(pb::SubscribeRequest {
            plan_id: "recruiter-lite".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert_eq!(reason(&reused), "REQUEST_ID_REUSED");
    assert_eq!(bad_fields(&reused), ["request_id"]);

    // A refusal is a first outcome too.
    let refused = pb::SubscribeRequest {
        request_id: "sub-2".into(),
        member_id: "gail".into(),
        plan_id: "recruiter-lite".into(),
    };
    let one = plans.subscribe(refused.clone()).await.unwrap_err();
    let two = plans.subscribe(refused).await.unwrap_err();
    assert_eq!(reason(&one), "ALREADY_SUBSCRIBED");
    assert_eq!(reason(&two), "ALREADY_SUBSCRIBED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_changes_nothing() {
    let stack = Stack::start().await;
    subscribe(&stack, "hank", "premium-career").await;
    let mut plans = stack.plans_as("hank");
    let before = stack.redis.digest().await;

    let cases: Vec<(&str, tonic::Status)> = vec![
        (
            "member_id",
            plans
                .subscribe(pb::SubscribeRequest {
                    request_id: rid(),
                    member_id: "not valid!".into(),
                    plan_id: "premium-career".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "request_id",
            plans
                .subscribe(pb::SubscribeRequest {
                    request_id: String::new(),
                    member_id: "ivy".into(),
                    plan_id: "premium-career".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "plan_id",
            plans
                .subscribe(pb::SubscribeRequest {
                    request_id: rid(),
                    member_id: "ivy".into(),
                    plan_id: String::new(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "timing",
            plans
                .change_plan(pb::ChangePlanRequest {
                    request_id: rid(),
                    member_id: "hank".into(),
                    plan_id: "premium-business".into(),
                    timing: 42,
                })
                .await
                .unwrap_err(),
        ),
        (
            "timing",
            plans
                .cancel_subscription(pb::CancelSubscriptionRequest {
                    request_id: rid(),
                    member_id: "hank".into(),
                    timing: -3,
                })
                .await
                .unwrap_err(),
        ),
        (
            "member_id",
            plans
                .set_open_profile(pb::SetOpenProfileRequest {
                    request_id: rid(),
                    member_id: String::new(),
                    enabled: true,
                })
                .await
                .unwrap_err(),
        ),
        (
            "member_id",
            plans
                .get_subscription(pb::GetSubscriptionRequest {
                    member_id: "x".repeat(65),
                })
                .await
                .unwrap_err(),
        ),
        (
            "member_id",
            stack
                .plans_with(&As::Operator)
                .get_entitlement(pb::GetEntitlementRequest {
                    member_id: "{hank}".into(),
                    after_version: 0,
                })
                .await
                .unwrap_err(),
        ),
        (
            "page_size",
            plans
                .list_plans(pb::ListPlansRequest {
                    page_size: -1,
                    page_token: String::new(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "page_token",
            plans
                .list_plans(pb::ListPlansRequest {
                    page_size: 0,
                    page_token: "garbage".into(),
                })
                .await
                .unwrap_err(),
        ),
    ];
    for (field, status) in cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            bad_fields(&status).contains(&field.to_string()),
            "{field}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    let unknown = plans
        .change_plan(pb::ChangePlanRequest {
            request_id: rid(),
            member_id: "hank".into(),
            plan_id: "gold".into(),
            timing: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        stack.redis.digest().await,
        before,
        "bad input changed Redis"
    );
}

/// Subscribe, change and cancel racing for one member (started together,
/// checked to overlap) apply one at a time:
/// every success moved the version by exactly one, and the final state is
/// the one the last success described.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_of_one_member_apply_one_at_a_time() {
    let stack = Stack::start().await;
    let mut calls = Vec::new();
    for i in 0..60 {
        let mut plans = stack.plans_as("race");
        calls.push(async move {
            match i % 4 {
                0 => plans
                    .subscribe(pb::SubscribeRequest {
                        request_id: rid(),
                        member_id: "race".into(),
                        plan_id: "premium-career".into(),
                    })
                    .await
                    .map(|r| r.into_inner().subscription),
                1 => plans
                    .change_plan(pb::ChangePlanRequest {
                        request_id: rid(),
                        member_id: "race".into(),
                        plan_id: "premium-business".into(),
                        timing: pb::ChangeTiming::Immediately as i32,
                    })
                    .await
                    .map(|r| r.into_inner().subscription),
                2 => plans
                    .change_plan(pb::ChangePlanRequest {
                        request_id: rid(),
                        member_id: "race".into(),
                        plan_id: "recruiter-lite".into(),
                        timing: pb::ChangeTiming::Immediately as i32,
                    })
                    .await
                    .map(|r| r.into_inner().subscription),
                _ => plans
                    .cancel_subscription(pb::CancelSubscriptionRequest {
                        request_id: rid(),
                        member_id: "race".into(),
                        timing: pb::ChangeTiming::Immediately as i32,
                    })
                    .await
                    .map(|r| r.into_inner().subscription),
            }
        });
    }
    let mut successes = Vec::new();
    // Started together; at least ten in flight at once, or the test did not
    // race anything.
    for answer in race(calls, 10).await {
        match answer {
            Ok(Some(s)) => successes.push(s),
            Ok(None) => panic!("no subscription in answer"),
            Err(status) => assert!(
                matches!(status.code(), Code::FailedPrecondition | Code::Aborted),
                "unexpected {status:?}"
            ),
        }
    }
    assert!(!successes.is_empty());
    let versions: HashSet<u64> = successes.iter().map(|s| s.version).collect();
    assert_eq!(
        versions.len(),
        successes.len(),
        "two changes claimed one version"
    );
    let max = *versions.iter().max().unwrap();
    assert_eq!(
        max as usize,
        successes.len(),
        "versions 1..=n, one per success"
    );
    let last = successes.iter().find(|s| s.version == max).unwrap();
    let now = subscription(&stack, "race").await;
    assert_eq!(
        (now.version, now.plan_id.as_str()),
        (max, last.plan_id.as_str())
    );
    // Each success's plan fits the one before it: paid plans follow a
    // subscribe or change, free follows a cancel.
    let entitlement = stack
        .plans_with(&As::Operator)
        .get_entitlement(pb::GetEntitlementRequest {
            member_id: "race".into(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entitlement.ended_periods.len() as u64, max);
    for pair in entitlement.ended_periods.windows(2) {
        assert_eq!(pair[0].version + 1, pair[1].version);
        assert_eq!(pair[0].ended_at, pair[1].started_at);
        assert!(pair[0].paid || pair[1].paid, "free never follows free");
    }
}
