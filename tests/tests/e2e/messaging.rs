//! messaging over real gRPC with the real billing-credits and
//! subscription-plan and a real Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1::LedgerEntryKind as Entry;
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::messaging::v1::{InmailResponse, MessageKind, RefundStatus};
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::{As, Stack, StackOptions, messaging_at, rid};
use messaging::send::{AfterDebitHook, Faults};
use tonic::Code;

use crate::common::*;

fn kind(response: &pb::SendMessageResponse) -> MessageKind {
    MessageKind::try_from(response.message.as_ref().unwrap().kind).unwrap()
}

async fn inbox(stack: &Stack, member: &str) -> Vec<pb::Conversation> {
    stack
        .messaging_as(member)
        .list_conversations(pb::ListConversationsRequest {
            member_id: member.into(),
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .conversations
}

/// The seed's story: five InMails spend five credits, the sixth is refused,
/// two replies bring two back, connection and Open Profile messages are
/// free, and a free member cannot send InMail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_story() {
    let stack = Stack::start().await;
    subscribe(&stack, "sam", "premium-career").await;
    for (i, expected) in (1..=5).zip([4, 3, 2, 1, 0]) {
        let sent = send(&stack, "sam", &format!("stranger{i}")).await.unwrap();
        assert_eq!(kind(&sent), MessageKind::Inmail);
        assert_eq!(sent.credits_charged, 1);
        assert_eq!(sent.sender_balance_after, Some(expected));
    }
    let sixth = send(&stack, "sam", "stranger6").await.unwrap_err();
    assert_eq!(sixth.code(), Code::FailedPrecondition);
    assert_eq!(reason(&sixth), "INSUFFICIENT_CREDITS");

    // stranger1 replies through RespondToInmail, stranger2 by simply writing back.
    let reply = respond(
        &stack,
        "stranger1",
        "sam~stranger1",
        InmailResponse::Reply,
        "Happy to talk",
    )
    .await
    .unwrap();
    assert_eq!(reply.refund_status, RefundStatus::Refunded as i32);
    assert_eq!(reply.reply.unwrap().kind, MessageKind::Reply as i32);
    let back = send(&stack, "stranger2", "sam").await.unwrap();
    assert_eq!(kind(&back), MessageKind::Reply);
    assert_eq!(back.credits_charged, 0);
    assert_eq!(back.refund_status, RefundStatus::Refunded as i32);
    assert_eq!(available(&stack, "sam").await, 2);

    // After the reply both write freely.
    let follow = send(&stack, "sam", "stranger1").await.unwrap();
    assert_eq!(
        (kind(&follow), follow.credits_charged),
        (MessageKind::Reply, 0)
    );

    connect(&stack, "sam", "colleague").await;
    let to_connection = send(&stack, "sam", "colleague").await.unwrap();
    assert_eq!(
        (kind(&to_connection), to_connection.credits_charged),
        (MessageKind::Connection, 0)
    );

    subscribe(&stack, "opal", "premium-business").await;
    set_open_profile(&stack, "opal", true).await.unwrap();
    let to_open_profile = send(&stack, "sam", "opal").await.unwrap();
    assert_eq!(
        (kind(&to_open_profile), to_open_profile.credits_charged),
        (MessageKind::OpenProfile, 0)
    );
    assert_eq!(to_open_profile.sender_balance_after, Some(2));
    assert_eq!(available(&stack, "sam").await, 2);

    // A free member may write to an Open Profile, but not send InMail.
    let free_to_open = send(&stack, "fred", "opal").await.unwrap();
    assert_eq!(kind(&free_to_open), MessageKind::OpenProfile);
    let free_inmail = send(&stack, "fred", "stranger9").await.unwrap_err();
    assert_eq!(reason(&free_inmail), "PAID_PLAN_REQUIRED");
    assert!(
        conversation(&stack, "fred", "fred~stranger9")
            .await
            .is_err(),
        "nothing delivered"
    );

    let entries = ledger(&stack, "sam").await;
    assert_eq!(count_kind(&entries, Entry::Debit), 5);
    assert_eq!(count_kind(&entries, Entry::Refund), 2);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_window_and_next_cycle_renewal_through_the_test_clock() {
    let stack = Stack::start().await;
    stack.set_time(utc(2027, 1, 10, 12)).await;
    subscribe(&stack, "uma", "premium-career").await;
    send(&stack, "uma", "vic").await.unwrap();
    send(&stack, "uma", "wes").await.unwrap();
    assert_eq!(available(&stack, "uma").await, 3);

    // Day 89: vic accepts; renewals on Feb 10 and Mar 10 happened meanwhile.
    stack.set_time(utc(2027, 4, 9, 12)).await;
    let accepted = respond(&stack, "vic", "uma~vic", InmailResponse::Accept, "")
        .await
        .unwrap();
    assert_eq!(accepted.refund_status, RefundStatus::Refunded as i32);
    assert_eq!(available(&stack, "uma").await, 3 + 5 + 5 + 1);

    // Day 91: wes replies; the reply is delivered but brings no credit back.
    // The Apr 10 renewal caps the balance at 15.
    stack.set_time(utc(2027, 4, 11, 12)).await;
    let late = send(&stack, "wes", "uma").await.unwrap();
    assert_eq!(kind(&late), MessageKind::Reply);
    assert_eq!(late.refund_status, RefundStatus::WindowClosed as i32);
    assert_eq!(available(&stack, "uma").await, 15);
    let c = conversation(&stack, "uma", "uma~wes").await.unwrap();
    let inmail = c.inmail.unwrap();
    assert_eq!(inmail.state, pb::InmailState::Replied as i32);
    assert_eq!(inmail.refund_status, RefundStatus::WindowClosed as i32);
    let entries = ledger(&stack, "uma").await;
    assert_eq!(count_kind(&entries, Entry::Refund), 1);
    assert_eq!(count_kind(&entries, Entry::Renewal), 4);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_inmails_on_five_credits_deliver_and_charge_exactly_five() {
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--inmail-burst".into(), "1000".into()],
        ..Default::default()
    })
    .await;
    subscribe(&stack, "zed", "premium-career").await;
    let calls = (0..100)
        .map(|i| {
            let mut client = stack.messaging_as("zed");
            async move {
                client
                    .send_message(send_request(
                        "zed",
                        &format!("target{i}"),
                        "Hi",
                        "Let's talk",
                    ))
                    .await
            }
        })
        .collect();
    let mut delivered = 0;
    for answer in inmail_tests::race(calls, 5).await {
        match answer {
            Ok(_) => delivered += 1,
            Err(status) => assert_eq!(reason(&status), "INSUFFICIENT_CREDITS", "{status:?}"),
        }
    }
    assert_eq!(delivered, 5);
    assert_eq!(available(&stack, "zed").await, 0);
    let visible = inbox(&stack, "zed").await;
    assert_eq!(visible.len(), 5, "exactly the charged InMails are visible");
    assert!(
        visible
            .iter()
            .all(|c| c.last_message.as_ref().unwrap().credits_charged == 1)
    );
    let entries = ledger(&stack, "zed").await;
    assert_eq!(count_kind(&entries, Entry::Debit), 5);
    assert_eq!(count_kind(&entries, Entry::Release), 0);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// A store failure right after the debit: the credit comes back at once and
/// nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failure_after_the_debit_returns_the_credit() {
    let armed = Arc::new(AtomicBool::new(true));
    let trigger = armed.clone();
    let hook: AfterDebitHook = Arc::new(move || {
        let fire = trigger.swap(false, Ordering::SeqCst);
        Box::pin(async move {
            fire.then(|| ApiError::unavailable("STORAGE_UNAVAILABLE", "injected store failure"))
        })
    });
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            after_debit: Some(hook),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    subscribe(&stack, "ray", "premium-career").await;
    let request = send_request("ray", "sid", "Hi", "Hello Sid");
    let failed = stack
        .messaging_as("ray")
        .send_message(request.clone())
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable);
    assert!(!armed.load(Ordering::SeqCst));
    assert_eq!(
        available(&stack, "ray").await,
        5,
        "the credit came back at once"
    );
    assert!(
        conversation(&stack, "sid", "ray~sid").await.is_err(),
        "nothing was delivered"
    );
    let entries = ledger(&stack, "ray").await;
    assert_eq!(
        (
            count_kind(&entries, Entry::Debit),
            count_kind(&entries, Entry::Release)
        ),
        (1, 1)
    );
    // The same request again answers its first outcome: not sent.
    let again = stack
        .messaging_as("ray")
        .send_message(request)
        .await
        .unwrap_err();
    assert_eq!(reason(&again), "SEND_ABANDONED");
    // A new request sends and charges normally.
    let sent = send(&stack, "ray", "sid").await.unwrap();
    assert_eq!(sent.sender_balance_after, Some(4));
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// A send whose debit never reached billing is given up by the sweeper; its
/// refusal says no credit was taken (it used to say one was returned), and
/// every retry of the request answers the same (issue 19, item 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_abandoned_before_billing_says_no_credit_was_taken_to_every_retry() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "ada", "premium-career").await;
    assert_eq!(available(&stack, "ada").await, 5);
    let request = send_request("ada", "bo", "Hi", "Hello Bo");
    stack.stop_billing().await;
    let failed = stack
        .messaging_as("ada")
        .send_message(request.clone())
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    stack.start_billing_again().await;
    // messaging's bound: SEND_RECOVERY_AFTER (60s) + one sweep; no retry
    // comes meanwhile (a retry would finish the send itself).
    stack.advance(Duration::from_secs(61)).await;
    let given_up = eventually(Duration::from_secs(5), || async {
        inmail_tests::outbox_len(&stack.redis).await == 0
    })
    .await;
    assert!(given_up, "the staged message was not given up");
    let mut refused = None;
    for _ in 0..3 {
        let answer = stack
            .messaging_as("ada")
            .send_message(request.clone())
            .await
            .unwrap_err();
        let answer = (answer.code(), reason(&answer), answer.message().to_string());
        assert!(answer.2.contains("no credit was taken"), "{answer:?}");
        if let Some(first) = &refused {
            assert_eq!(&answer, first);
        }
        refused = Some(answer);
        stack.advance(2 * DAY).await;
    }
    // The given-up message, which holds that answer, lives as long as the
    // request record does (it expired after a day, and a retry after that
    // staged the message again and was told a credit had been returned).
    let mut redis = stack.redis.conn().await;
    let messages: Vec<String> = redis::cmd("KEYS")
        .arg("messaging:{ada~bo}:msg:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let ttl = |key: String| {
        let mut redis = redis.clone();
        async move {
            let ms: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut redis)
                .await
                .unwrap();
            ms
        }
    };
    let message_ttl = ttl(messages[0].clone()).await;
    let request_ttl = ttl(format!("messaging:{{ada}}:request:{}", request.request_id)).await;
    assert!(
        request_ttl > 0 && message_ttl >= request_ttl,
        "the failed message expires in {message_ttl} ms, its request in {request_ttl} ms"
    );
    assert_eq!(available(&stack, "ada").await, 5);
    let entries = ledger(&stack, "ada").await;
    assert_eq!(count_kind(&entries, Entry::Debit), 0);
    assert!(conversation(&stack, "bo", "ada~bo").await.is_err());
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// billing goes away right after the debit: the send fails, the held credit
/// comes back by hold expiry once billing runs again, and messaging's
/// sweeper gives the staged message up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn billing_down_between_debit_and_confirm_returns_the_credit_within_the_bound() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(1);
    let armed = Arc::new(AtomicBool::new(true));
    let hook: AfterDebitHook = Arc::new(move || {
        let tx = tx.clone();
        let fire = armed.swap(false, Ordering::SeqCst);
        Box::pin(async move {
            if fire {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                tx.send(done_tx).await.unwrap();
                done_rx.await.unwrap();
            }
            None
        })
    });
    let mut stack = Stack::start_with(StackOptions {
        faults: Faults {
            after_debit: Some(hook),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    subscribe(&stack, "tom", "premium-career").await;
    let request = send_request("tom", "una", "Hi", "Hello Una");
    let mut client = stack.messaging_as("tom");
    let sending = tokio::spawn({
        let mut call = tonic::Request::new(request.clone());
        // A short deadline: messaging gives up on billing within it.
        call.set_timeout(Duration::from_secs(2));
        async move { client.send_message(call).await }
    });
    let billing_stopped = rx.recv().await.unwrap();
    stack.stop_billing().await;
    billing_stopped.send(()).unwrap();
    let failed = sending.await.unwrap().unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");

    stack.start_billing_again().await;
    assert_eq!(available(&stack, "tom").await, 4, "held while unconfirmed");
    // Billing's bound: HOLD_TTL (30s) + one sweep.
    stack.advance(Duration::from_secs(31)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            available(&stack, "tom").await == 5
        })
        .await
    );
    // messaging's bound: SEND_RECOVERY_AFTER (60s) + one sweep.
    stack.advance(Duration::from_secs(30)).await;
    let given_up = eventually(Duration::from_secs(5), || async {
        let again = stack
            .messaging_as("tom")
            .send_message(request.clone())
            .await;
        matches!(again, Err(ref s) if reason(s) == "SEND_ABANDONED")
    })
    .await;
    assert!(given_up, "the staged message was not given up");
    assert!(conversation(&stack, "una", "tom~una").await.is_err());
    let entries = ledger(&stack, "tom").await;
    assert_eq!(
        (
            count_kind(&entries, Entry::Debit),
            count_kind(&entries, Entry::Release)
        ),
        (1, 1)
    );
    // The refusal says what happened to the credit, and stays the answer to
    // every retry of the request.
    let answer = |s: tonic::Status| (s.code(), reason(&s), s.message().to_string());
    let refused = answer(
        stack
            .messaging_as("tom")
            .send_message(request.clone())
            .await
            .unwrap_err(),
    );
    assert!(
        refused.2.contains("the credit taken for it was returned"),
        "{refused:?}"
    );
    stack.advance(3 * DAY).await;
    let later = answer(
        stack
            .messaging_as("tom")
            .send_message(request.clone())
            .await
            .unwrap_err(),
    );
    assert_eq!(later, refused);
    assert_eq!(available(&stack, "tom").await, 5);
    assert_eq!(
        inmail_tests::outbox_len(&stack.redis).await,
        0,
        "no work left behind"
    );
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_send_returns_the_same_message_and_never_charges_twice() {
    let stack = Stack::start().await;
    subscribe(&stack, "abe", "premium-career").await;
    let request = send_request("abe", "bea", "Hi", "Hello");
    let first = stack
        .messaging_as("abe")
        .send_message(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = stack
        .messaging_as("abe")
        .send_message(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(available(&stack, "abe").await, 4);
    let reused = stack
        .messaging_as("abe")
        .send_message(pb::SendMessageRequest {
            body: "other".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(
        (reused.code(), reason(&reused).as_str()),
        (Code::InvalidArgument, "REQUEST_ID_REUSED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pending_inmail_per_pair_is_the_default_policy() {
    let stack = Stack::start().await;
    subscribe(&stack, "cal", "premium-business").await;
    send(&stack, "cal", "dee").await.unwrap();
    let again = send(&stack, "cal", "dee").await.unwrap_err();
    assert_eq!(
        (again.code(), reason(&again).as_str()),
        (Code::FailedPrecondition, "AWAITING_RESPONSE")
    );
    assert_eq!(
        available(&stack, "cal").await,
        14,
        "no credit moved for the refused one"
    );
    respond(&stack, "dee", "cal~dee", InmailResponse::Decline, "")
        .await
        .unwrap();
    let after = send(&stack, "cal", "dee").await.unwrap();
    assert_eq!(
        (kind(&after), after.credits_charged),
        (MessageKind::Reply, 0)
    );
    assert_eq!(available(&stack, "cal").await, 15, "declining refunds too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_follow_ups_policy_sends_them_free() {
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--pending-inmail-policy".into(), "allow-follow-ups".into()],
        ..Default::default()
    })
    .await;
    subscribe(&stack, "eli", "premium-career").await;
    send(&stack, "eli", "fay").await.unwrap();
    let follow = send(&stack, "eli", "fay").await.unwrap();
    assert_eq!(
        (kind(&follow), follow.credits_charged),
        (MessageKind::FollowUp, 0)
    );
    assert_eq!(available(&stack, "eli").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inmail_rate_limit_refuses_before_any_credit_moves() {
    let stack = Stack::start().await;
    subscribe(&stack, "gil", "recruiter-lite").await;
    for i in 0..10 {
        send(&stack, "gil", &format!("lead{i}")).await.unwrap();
    }
    let limited = send(&stack, "gil", "lead10").await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert_eq!(reason(&limited), "INMAIL_RATE_LIMITED");
    use tonic_types::StatusExt;
    let retry = limited
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        retry > Duration::from_secs(800) && retry <= Duration::from_secs(865),
        "{retry:?}"
    );
    assert_eq!(
        available(&stack, "gil").await,
        20,
        "the limit is checked before any credit moves"
    );
    // Connection messages are not InMail: not limited.
    connect(&stack, "gil", "pal").await;
    send(&stack, "gil", "pal").await.unwrap();
    stack.advance(Duration::from_secs(865)).await;
    send(&stack, "gil", "lead10")
        .await
        .expect("a token came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_profile_messages_are_capped_per_calendar_month() {
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--open-profile-monthly-limit".into(), "2".into()],
        ..Default::default()
    })
    .await;
    stack.set_time(utc(2027, 5, 20, 0)).await;
    for member in ["op1", "op2", "op3"] {
        subscribe(&stack, member, "premium-career").await;
        set_open_profile(&stack, member, true).await.unwrap();
    }
    send(&stack, "hugo", "op1").await.unwrap();
    send(&stack, "hugo", "op2").await.unwrap();
    let capped = send(&stack, "hugo", "op3").await.unwrap_err();
    assert_eq!(
        (capped.code(), reason(&capped).as_str()),
        (Code::ResourceExhausted, "OPEN_PROFILE_MONTHLY_LIMIT")
    );
    stack.set_time(utc(2027, 6, 1, 0)).await;
    let next_month = send(&stack, "hugo", "op3").await.unwrap();
    assert_eq!(kind(&next_month), MessageKind::OpenProfile);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_stop_messages_both_ways_and_remove_the_connection() {
    let stack = Stack::start().await;
    connect(&stack, "ivy", "jay").await;
    send(&stack, "jay", "ivy").await.unwrap();
    stack
        .messaging_as("ivy")
        .block_member(pb::BlockMemberRequest {
            request_id: rid(),
            member_id: "ivy".into(),
            blocked_member_id: "jay".into(),
        })
        .await
        .unwrap();
    for (from, to) in [("jay", "ivy"), ("ivy", "jay")] {
        let blocked = send(&stack, from, to).await.unwrap_err();
        assert_eq!(reason(&blocked), "BLOCKED");
    }
    let connections = stack
        .messaging_as("ivy")
        .list_connections(pb::ListConnectionsRequest {
            member_id: "ivy".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(connections.connections.is_empty());
    let blocked = stack
        .messaging_as("ivy")
        .list_blocked_members(pb::ListBlockedMembersRequest {
            member_id: "ivy".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(blocked.blocked_members[0].member_id, "jay");
    let refused = invite(&stack, "jay", "ivy").await.unwrap_err();
    assert_eq!(reason(&refused), "BLOCKED");
    stack
        .messaging_as("ivy")
        .unblock_member(pb::UnblockMemberRequest {
            request_id: rid(),
            member_id: "ivy".into(),
            blocked_member_id: "jay".into(),
        })
        .await
        .unwrap();
    send(&stack, "ivy", "jay")
        .await
        .expect("unblocked: a reply is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_inmail_off_refuses_inmail_but_not_open_profile_or_connections() {
    let stack = Stack::start().await;
    subscribe(&stack, "kim", "premium-career").await;
    subscribe(&stack, "lou", "premium-career").await;
    stack
        .messaging_as("lou")
        .set_inmail_preference(pb::SetInmailPreferenceRequest {
            request_id: rid(),
            member_id: "lou".into(),
            accept_inmail: false,
        })
        .await
        .unwrap();
    let refused = send(&stack, "kim", "lou").await.unwrap_err();
    assert_eq!(reason(&refused), "INMAIL_NOT_ACCEPTED");
    assert_eq!(available(&stack, "kim").await, 5);
    set_open_profile(&stack, "lou", true).await.unwrap();
    assert_eq!(
        kind(&send(&stack, "kim", "lou").await.unwrap()),
        MessageKind::OpenProfile
    );
    connect(&stack, "lou", "max").await;
    assert_eq!(
        kind(&send(&stack, "max", "lou").await.unwrap()),
        MessageKind::Connection
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_is_newest_activity_first_paginated_and_private() {
    let stack = Stack::start().await;
    for friend in ["n1", "n2", "n3", "n4", "n5"] {
        connect(&stack, "nia", friend).await;
        send(&stack, "nia", friend).await.unwrap();
        stack.advance(Duration::from_secs(1)).await;
    }
    // Activity in an older conversation brings it to the top.
    send(&stack, "n2", "nia").await.unwrap();
    let mut order = Vec::new();
    let mut token = String::new();
    loop {
        let page = stack
            .messaging_as("nia")
            .list_conversations(pb::ListConversationsRequest {
                member_id: "nia".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.conversations.len() <= 2);
        order.extend(page.conversations.into_iter().map(|c| c.conversation_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(order, ["n2~nia", "n5~nia", "n4~nia", "n3~nia", "n1~nia"]);

    let messages = stack
        .messaging_as("nia")
        .list_messages(pb::ListMessagesRequest {
            member_id: "nia".into(),
            conversation_id: "n2~nia".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(messages.messages[0].sender_id, "n2", "newest first");
    let older = stack
        .messaging_as("nia")
        .list_messages(pb::ListMessagesRequest {
            member_id: "nia".into(),
            conversation_id: "n2~nia".into(),
            page_size: 1,
            page_token: messages.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(older.messages[0].sender_id, "nia");
    assert!(older.next_page_token.is_empty());

    let outsider = conversation(&stack, "n3", "n2~nia").await.unwrap_err();
    assert_eq!(outsider.code(), Code::NotFound);
    let outsider = stack
        .messaging_as("n3")
        .list_messages(pb::ListMessagesRequest {
            member_id: "n3".into(),
            conversation_id: "n2~nia".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(outsider.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_stores_nothing_and_charges_nothing() {
    let stack = Stack::start().await;
    subscribe(&stack, "oz", "premium-career").await;
    send(&stack, "oz", "pat").await.unwrap();
    let before = stack.redis.digest().await;
    let mut m = stack.messaging_as("oz");
    let ok = send_request("oz", "quinn", "Subject", "Body");
    let mut cases: Vec<(&str, tonic::Status)> = Vec::new();
    for (field, request) in [
        (
            "request_id",
            pb::SendMessageRequest {
                request_id: "".into(),
                ..ok.clone()
            },
        ),
        (
            "sender_id",
            pb::SendMessageRequest {
                sender_id: "".into(),
                ..ok.clone()
            },
        ),
        (
            "sender_id",
            pb::SendMessageRequest {
                sender_id: "o z".into(),
                ..ok.clone()
            },
        ),
        (
            "recipient_id",
            pb::SendMessageRequest {
                recipient_id: "q".repeat(65),
                ..ok.clone()
            },
        ),
        (
            "recipient_id",
            pb::SendMessageRequest {
                recipient_id: "oz".into(),
                ..ok.clone()
            },
        ),
        (
            "subject",
            pb::SendMessageRequest {
                subject: "s".repeat(201),
                ..ok.clone()
            },
        ),
        (
            "subject",
            pb::SendMessageRequest {
                subject: "".into(),
                ..ok.clone()
            },
        ),
        (
            "body",
            pb::SendMessageRequest {
                body: "".into(),
                ..ok.clone()
            },
        ),
        (
            "body",
            pb::SendMessageRequest {
                body: "b".repeat(2001),
                ..ok.clone()
            },
        ),
        (
            "body",
            pb::SendMessageRequest {
                body: "é".repeat(8001),
                ..ok.clone()
            },
        ),
    ] {
        cases.push((field, m.send_message(request).await.unwrap_err()));
    }
    let respond_ok = pb::RespondToInmailRequest {
        request_id: rid(),
        member_id: "pat".into(),
        conversation_id: "oz~pat".into(),
        response: InmailResponse::Accept as i32,
        body: String::new(),
    };
    for (field, request) in [
        (
            "conversation_id",
            pb::RespondToInmailRequest {
                conversation_id: "pat~oz".into(),
                ..respond_ok.clone()
            },
        ),
        (
            "conversation_id",
            pb::RespondToInmailRequest {
                conversation_id: "".into(),
                ..respond_ok.clone()
            },
        ),
        (
            "response",
            pb::RespondToInmailRequest {
                response: 0,
                ..respond_ok.clone()
            },
        ),
        (
            "response",
            pb::RespondToInmailRequest {
                response: 17,
                ..respond_ok.clone()
            },
        ),
        (
            "body",
            pb::RespondToInmailRequest {
                body: "no".into(),
                ..respond_ok.clone()
            },
        ),
        (
            "body",
            pb::RespondToInmailRequest {
                response: InmailResponse::Reply as i32,
                ..respond_ok.clone()
            },
        ),
        (
            "request_id",
            pb::RespondToInmailRequest {
                request_id: "".into(),
                ..respond_ok.clone()
            },
        ),
    ] {
        cases.push((field, m.respond_to_inmail(request).await.unwrap_err()));
    }
    cases.push((
        "invitee_id",
        m.send_invitation(pb::SendInvitationRequest {
            request_id: rid(),
            member_id: "oz".into(),
            invitee_id: "oz".into(),
            note: String::new(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "note",
        m.send_invitation(pb::SendInvitationRequest {
            request_id: rid(),
            member_id: "oz".into(),
            invitee_id: "pat".into(),
            note: "n".repeat(301),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "direction",
        m.list_invitations(pb::ListInvitationsRequest {
            member_id: "oz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "inviter_id",
        m.accept_invitation(pb::AcceptInvitationRequest {
            request_id: rid(),
            member_id: "oz".into(),
            inviter_id: "".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "member_id",
        m.remove_connection(pb::RemoveConnectionRequest {
            request_id: rid(),
            member_id: "".into(),
            other_member_id: "pat".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "blocked_member_id",
        m.block_member(pb::BlockMemberRequest {
            request_id: rid(),
            member_id: "oz".into(),
            blocked_member_id: "p!t".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "request_id",
        m.unblock_member(pb::UnblockMemberRequest {
            request_id: "".into(),
            member_id: "oz".into(),
            blocked_member_id: "pat".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "member_id",
        m.set_inmail_preference(pb::SetInmailPreferenceRequest {
            request_id: rid(),
            member_id: "".into(),
            accept_inmail: false,
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "page_token",
        m.list_conversations(pb::ListConversationsRequest {
            member_id: "oz".into(),
            page_size: 0,
            page_token: "zz".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "page_size",
        m.list_connections(pb::ListConnectionsRequest {
            member_id: "oz".into(),
            page_size: -1,
            page_token: "".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "conversation_id",
        m.list_messages(pb::ListMessagesRequest {
            member_id: "oz".into(),
            conversation_id: "x".into(),
            page_size: 0,
            page_token: "".into(),
        })
        .await
        .unwrap_err(),
    ));
    cases.push((
        "member_id",
        m.get_conversation(pb::GetConversationRequest {
            member_id: "".into(),
            conversation_id: "oz~pat".into(),
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
    assert_eq!(
        available(&stack, "oz").await,
        4,
        "bad input charged a credit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_twice_answers_the_same() {
    let stack = Stack::start().await;
    subscribe(&stack, "val", "premium-career").await;
    send(&stack, "val", "wyn").await.unwrap();
    let first = respond(&stack, "wyn", "val~wyn", InmailResponse::Accept, "")
        .await
        .unwrap();
    let again = respond(&stack, "wyn", "val~wyn", InmailResponse::Accept, "")
        .await
        .unwrap();
    assert_eq!(first.refund_status, RefundStatus::Refunded as i32);
    assert_eq!(again.refund_status, RefundStatus::Refunded as i32);
    assert_eq!(available(&stack, "val").await, 5, "refunded once");
    let decline = respond(&stack, "wyn", "val~wyn", InmailResponse::Decline, "")
        .await
        .unwrap_err();
    assert_eq!(reason(&decline), "NO_INMAIL_AWAITING_RESPONSE");
}

/// A refund billing could not take stays owed even when another response
/// to the same InMail follows, and the sweeper delivers it later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_owed_while_billing_is_down_comes_back_later() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "xan", "premium-career").await;
    send(&stack, "xan", "yul").await.unwrap();
    assert_eq!(available(&stack, "xan").await, 4);
    stack.stop_billing().await;
    // The recipient accepts and replies at the same moment: both calls see
    // the InMail awaiting a response; one of them makes the refund due.
    let mut accept = tonic::Request::new(pb::RespondToInmailRequest {
        request_id: rid(),
        member_id: "yul".into(),
        conversation_id: "xan~yul".into(),
        response: InmailResponse::Accept as i32,
        body: String::new(),
    });
    accept.set_timeout(Duration::from_secs(1));
    let mut reply = tonic::Request::new(send_request("yul", "xan", "", "Thanks, happy to talk"));
    reply.set_timeout(Duration::from_secs(1));
    let (mut a, mut b) = (stack.messaging_as("yul"), stack.messaging_as("yul"));
    let (accepted, replied) = tokio::join!(a.respond_to_inmail(accept), b.send_message(reply));
    let statuses = [
        accepted.ok().map(|r| r.into_inner().refund_status),
        replied.ok().map(|r| r.into_inner().refund_status),
    ];
    assert!(
        statuses.contains(&Some(RefundStatus::Pending as i32)),
        "one response made the refund due: {statuses:?}"
    );
    stack.start_billing_again().await;
    assert_eq!(available(&stack, "xan").await, 4);
    stack.advance(Duration::from_secs(61)).await;
    // The sweeper asks billing, then records the refund in the conversation.
    let refunded = eventually(Duration::from_secs(8), || async {
        let c = conversation(&stack, "xan", "xan~yul").await.unwrap();
        c.inmail.unwrap().refund_status == RefundStatus::Refunded as i32
    })
    .await;
    assert!(refunded, "the owed refund never came back");
    assert_eq!(available(&stack, "xan").await, 5);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// The recipient's Open Profile comes from what subscription-plan publishes
/// in Redis with every change (inmail_shared::state::published), not from a call
/// per send: with subscription-plan stopped, a message to an Open Profile is
/// still free, one to a closed profile or to a member who never subscribed
/// costs an InMail, and a scheduled cancellation turns Open Profile off at
/// the cycle end without any write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_profile_is_read_from_what_subscription_plan_publishes_without_calling_it() {
    let mut stack = Stack::start().await;
    stack.set_time(utc(2027, 3, 5, 12)).await;
    for member in ["sam", "tess", "olive", "rosa", "carl"] {
        subscribe(&stack, member, "premium-business").await;
    }
    set_open_profile(&stack, "olive", true).await.unwrap();
    set_open_profile(&stack, "carl", true).await.unwrap();
    stack
        .plans_as("carl")
        .cancel_subscription(plans::CancelSubscriptionRequest {
            request_id: rid(),
            member_id: "carl".into(),
            timing: plans::ChangeTiming::EndOfCycle as i32,
        })
        .await
        .unwrap();
    // carl takes no InMail: once his profile closes, a stranger's message
    // is refused by messaging alone (no credit, no billing call).
    stack
        .messaging_as("carl")
        .set_inmail_preference(pb::SetInmailPreferenceRequest {
            request_id: rid(),
            member_id: "carl".into(),
            accept_inmail: false,
        })
        .await
        .unwrap();
    let credits = available(&stack, "sam").await;

    stack.stop_plans().await;
    let free = send(&stack, "sam", "olive").await.unwrap();
    assert_eq!(kind(&free), MessageKind::OpenProfile);
    let free = send(&stack, "sam", "carl").await.unwrap();
    assert_eq!(
        kind(&free),
        MessageKind::OpenProfile,
        "open until the cycle end"
    );
    assert_eq!(available(&stack, "sam").await, credits);
    for closed in ["rosa", "nina"] {
        let paid = send(&stack, "sam", closed).await.unwrap();
        assert_eq!(kind(&paid), MessageKind::Inmail, "{closed}");
    }
    assert_eq!(available(&stack, "sam").await, credits - 2);

    // Past carl's cycle end his plan is free and his profile closed, though
    // nothing was written since: tess's message would be an InMail, which
    // carl does not take.
    stack.set_time(utc(2027, 4, 5, 13)).await;
    let refused = send(&stack, "tess", "carl").await.unwrap_err();
    assert_eq!(reason(&refused), "INMAIL_NOT_ACCEPTED", "{refused:?}");
}

/// Subscriptions stored before Open Profile was published (an upgrade from
/// an earlier version) are asked for over gRPC until subscription-plan,
/// at its next start, publishes them all; a member with neither published
/// key is taken as never subscribed only after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_stored_before_publication_are_asked_for_then_published_at_start() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "sam", "premium-business").await;
    subscribe(&stack, "olive", "premium-business").await;
    set_open_profile(&stack, "olive", true).await.unwrap();
    // What an earlier version left: no published Open Profile, no revision,
    // no "all published".
    let mut redis = stack.redis.conn().await;
    for key in [
        "plans:{olive}:open".to_string(),
        "plans:{olive}:rev".to_string(),
        "plans:published".to_string(),
    ] {
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // A messaging that has not seen "all published" yet asks: free.
    let replica = stack.messaging_replica().await;
    let mut fresh = messaging_at(replica.addr, &As::member("sam"));
    let free = fresh
        .send_message(send_request("sam", "olive", "Hi", "Hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&free), MessageKind::OpenProfile);
    // With subscription-plan down it cannot tell, and says so; it does not
    // take the missing keys for "never subscribed".
    stack.stop_plans().await;
    let unknown = fresh
        .send_message(send_request("sam", "omar", "Hi", "Hello"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown:?}");

    // Its next start publishes what is missing.
    stack.start_plans_again().await;
    let published = eventually(Duration::from_secs(5), || {
        let mut redis = redis.clone();
        async move {
            redis::cmd("EXISTS")
                .arg("plans:published")
                .query_async::<bool>(&mut redis)
                .await
                .unwrap()
        }
    })
    .await;
    assert!(published, "plans:published was not set at start");
    let open: Option<String> = redis::cmd("GET")
        .arg("plans:{olive}:open")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        open.is_some_and(|v| v.ends_with(":1:0:1")),
        "olive's Open Profile was not published"
    );
    stack.stop_plans().await;
    let free = send(&stack, "tess", "olive").await.unwrap();
    assert_eq!(kind(&free), MessageKind::OpenProfile);
    let paid = fresh
        .send_message(send_request("sam", "omar", "Hi", "Hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&paid), MessageKind::Inmail);
}
