//! Events (issue 21): WatchInbox over real streams, across two messaging
//! replicas, resumed with tokens, refused past retention, bounded.

use std::collections::HashSet;
use std::time::Duration;

use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::reasons;
use inmail_tests::{As, MessagingClient, Stack, StackOptions, messaging_at};
use tonic::Streaming;

use crate::common::{connect, reason, send_request};

/// Flags that let one sender send a few hundred free messages at once.
fn many_sends() -> Vec<String> {
    [
        "--free-send-burst",
        "2000",
        "--mutation-burst",
        "5000",
        "--watch-heartbeat",
        "200ms",
    ]
    .map(String::from)
    .to_vec()
}

fn with_args(extra: &[&str]) -> StackOptions {
    let mut messaging_args = many_sends();
    messaging_args.extend(extra.iter().map(|s| s.to_string()));
    StackOptions {
        messaging_args,
        ..Default::default()
    }
}

async fn watch(
    client: &mut MessagingClient,
    member: &str,
    token: &str,
) -> Result<Streaming<pb::WatchInboxResponse>, tonic::Status> {
    client
        .watch_inbox(pb::WatchInboxRequest {
            member_id: member.into(),
            resume_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The first heartbeat of a fresh watch: the watch is registered and its
/// token stands for "now".
async fn first_heartbeat(stream: &mut Streaming<pb::WatchInboxResponse>) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a frame within 10 s")
            .expect("the stream goes on")
            .expect("not ended");
        assert!(!frame.resume_token.is_empty(), "every frame has a token");
        if frame.event.is_none() {
            return frame.resume_token;
        }
    }
}

/// Reads events until `want` distinct message events arrived (or the stream
/// ends, or 20 s pass). Answers the message bodies in arrival order (each
/// once), the last token seen, and how the stream ended, if it did.
async fn collect_messages(
    stream: &mut Streaming<pb::WatchInboxResponse>,
    want: usize,
    seen: &mut HashSet<String>,
) -> (Vec<String>, String, Option<tonic::Status>) {
    let mut bodies = Vec::new();
    let mut token = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bodies.len() < want {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.message()).await else {
            break;
        };
        match next {
            Ok(Some(frame)) => {
                assert!(!frame.resume_token.is_empty(), "every frame has a token");
                token = frame.resume_token;
                let Some(event) = frame.event else { continue };
                assert!(!event.event_id.is_empty(), "every event has an id");
                if event.kind() != pb::InboxEventKind::Message {
                    continue;
                }
                if seen.insert(event.event_id.clone()) {
                    bodies.push(event.message.expect("a message event has its message").body);
                }
            }
            Ok(None) => break,
            Err(status) => return (bodies, token, Some(status)),
        }
    }
    (bodies, token, None)
}

async fn send_body(client: &mut MessagingClient, from: &str, to: &str, body: &str) {
    client
        .send_message(send_request(from, to, "", body))
        .await
        .unwrap_or_else(|s| panic!("send {body}: {s:?}"));
}

fn bodies(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("message {n:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_inbox_gets_all_100_messages_sent_through_two_replicas_once_and_in_order() {
    let stack = Stack::start_with(with_args(&[])).await;
    let replica = stack.messaging_replica().await;
    connect(&stack, "sam", "rae").await;
    let mut watcher = stack.messaging_as("rae");
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;

    let mut one = stack.messaging_as("sam");
    let mut two = messaging_at(replica.addr, &As::Member("sam".into()));
    let sent = bodies(0..100);
    for (n, body) in sent.iter().enumerate() {
        let client = if n % 2 == 0 { &mut one } else { &mut two };
        send_body(client, "sam", "rae", body).await;
    }
    let mut seen = HashSet::new();
    let (got, _, ended) = collect_messages(&mut stream, 100, &mut seen).await;
    assert!(ended.is_none(), "the watch ended: {ended:?}");
    assert_eq!(got, sent, "every message once, in the order sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_with_its_last_token_on_the_other_replica_misses_nothing() {
    let stack = Stack::start_with(with_args(&[])).await;
    let replica = stack.messaging_replica().await;
    connect(&stack, "sam", "rae").await;
    let mut sender = stack.messaging_as("sam");
    let mut watcher = stack.messaging_as("rae");
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;

    let sent = bodies(0..60);
    for body in &sent[..30] {
        send_body(&mut sender, "sam", "rae", body).await;
    }
    let mut seen = HashSet::new();
    let (first, token, _) = collect_messages(&mut stream, 20, &mut seen).await;
    assert_eq!(first, sent[..20]);
    // The client goes away midway; more is sent meanwhile.
    drop(stream);
    for body in &sent[30..] {
        send_body(&mut sender, "sam", "rae", body).await;
    }
    let mut other = messaging_at(replica.addr, &As::Member("rae".into()));
    let mut resumed = watch(&mut other, "rae", &token).await.unwrap();
    let (rest, _, ended) = collect_messages(&mut resumed, 40, &mut HashSet::new()).await;
    assert!(ended.is_none(), "{ended:?}");
    assert_eq!(
        rest,
        sent[20..],
        "exactly what followed the token, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_past_retention_is_refused_and_bad_watches_are_refused() {
    let stack = Stack::start_with(with_args(&["--events-max-per-member", "5"])).await;
    connect(&stack, "sam", "rae").await;
    let mut sender = stack.messaging_as("sam");
    let mut watcher = stack.messaging_as("rae");
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    send_body(&mut sender, "sam", "rae", "first").await;
    let (got, token, _) = collect_messages(&mut stream, 1, &mut HashSet::new()).await;
    assert_eq!(got, ["first"]);
    drop(stream);

    // Within retention: resumes.
    send_body(&mut sender, "sam", "rae", "second").await;
    let mut resumed = watch(&mut watcher, "rae", &token).await.unwrap();
    let (got, _, _) = collect_messages(&mut resumed, 1, &mut HashSet::new()).await;
    assert_eq!(got, ["second"]);
    drop(resumed);

    // Five more events push both "second" and the one after the token out.
    for n in 0..6 {
        send_body(&mut sender, "sam", "rae", &format!("more {n}")).await;
    }
    let refused = watch(&mut watcher, "rae", &token)
        .await
        .expect_err("a token past retention");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(reason(&refused), reasons::RESUME_TOKEN_EXPIRED);

    // A malformed token names the field; another member's inbox is refused.
    let bad = watch(&mut watcher, "rae", "not-a-token")
        .await
        .expect_err("a token the service never made");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(crate::common::bad_fields(&bad), ["resume_token"]);
    let bad = watch(&mut watcher, "{rae}", "")
        .await
        .expect_err("a malformed member id");
    assert_eq!(crate::common::bad_fields(&bad), ["member_id"]);
    let other = watch(&mut watcher, "sam", "")
        .await
        .expect_err("rae watches only rae");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    // A token of rae's inbox does not open sam's (operators may watch anyone).
    let mut operator = stack.messaging_with(&As::Operator);
    let bound = watch(&mut operator, "sam", &token)
        .await
        .expect_err("a token of another member");
    assert_eq!(crate::common::bad_fields(&bound), ["resume_token"]);
    let mut ops = watch(&mut operator, "rae", "").await.unwrap();
    first_heartbeat(&mut ops).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_serving_replica_ends_the_watch_unavailable_and_the_other_resumes_it() {
    let stack = Stack::start_with(with_args(&[])).await;
    let mut replica = stack.messaging_replica().await;
    connect(&stack, "sam", "rae").await;
    let mut sender = stack.messaging_as("sam");
    let mut on_replica = messaging_at(replica.addr, &As::Member("rae".into()));
    let mut stream = watch(&mut on_replica, "rae", "").await.unwrap();
    let mut token = first_heartbeat(&mut stream).await;
    let sent = bodies(0..20);
    for body in &sent[..10] {
        send_body(&mut sender, "sam", "rae", body).await;
    }
    let mut seen = HashSet::new();
    let (got, last, _) = collect_messages(&mut stream, 10, &mut seen).await;
    assert_eq!(got, sent[..10]);
    token = if last.is_empty() { token } else { last };

    // SIGTERM's path: the server stops; the watch ends UNAVAILABLE with
    // RetryInfo, and a token.
    let stopping = tokio::spawn(async move { replica.stop().await });
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the watch ends within 10 s")
        {
            Ok(Some(frame)) => token = frame.resume_token,
            Ok(None) => panic!("the watch ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert_eq!(reason(&ended), reasons::SHUTTING_DOWN);
    assert!(tonic_types::StatusExt::get_details_retry_info(&ended).is_some());
    let info = tonic_types::StatusExt::get_details_error_info(&ended).expect("ErrorInfo");
    assert_eq!(info.metadata.get("resume_token"), Some(&token));
    stopping.await.unwrap();

    for body in &sent[10..] {
        send_body(&mut sender, "sam", "rae", body).await;
    }
    let mut elsewhere = stack.messaging_as("rae");
    let mut resumed = watch(&mut elsewhere, "rae", &token).await.unwrap();
    let (rest, _, ended) = collect_messages(&mut resumed, 10, &mut seen).await;
    assert!(ended.is_none(), "{ended:?}");
    assert_eq!(rest, sent[10..], "nothing lost across the replica's end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_bounded_per_member_and_per_process() {
    let stack = Stack::start_with(with_args(&[
        "--max-watches-per-member",
        "2",
        "--max-watches",
        "3",
    ]))
    .await;
    let mut rae = stack.messaging_as("rae");
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = watch(&mut rae, "rae", "").await.unwrap();
        first_heartbeat(&mut stream).await;
        open.push(stream);
    }
    let third = watch(&mut rae, "rae", "").await;
    let refused = match third {
        Err(status) => status,
        Ok(mut stream) => stream.message().await.expect_err("a third watch of rae"),
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(reason(&refused), reasons::TOO_MANY_WATCHES);

    let mut sam = stack.messaging_as("sam");
    let mut stream = watch(&mut sam, "sam", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    open.push(stream);
    let mut ann = stack.messaging_as("ann");
    let fourth = match watch(&mut ann, "ann", "").await {
        Err(status) => status,
        Ok(mut stream) => stream.message().await.expect_err("a fourth watch here"),
    };
    assert_eq!(fourth.code(), tonic::Code::ResourceExhausted, "{fourth:?}");
    assert_eq!(reason(&fourth), reasons::SERVER_OVERLOADED);

    // A closed watch frees its place.
    open.pop();
    let mut freed = false;
    for _ in 0..50 {
        if let Ok(mut stream) = watch(&mut ann, "ann", "").await
            && stream.message().await.is_ok()
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "a closed watch gives its place back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_is_ended_resource_exhausted_and_others_go_on() {
    let stack = Stack::start_with(with_args(&[
        "--watch-buffer",
        "4",
        "--watch-slow-grace",
        "1s",
        "--watch-poll",
        "5ms",
        "--stream-lifetime",
        "40s",
        "--max-watches",
        "3",
    ]))
    .await;
    connect(&stack, "sam", "rae").await;
    let mut sender = stack.messaging_as("sam");
    let mut slow_client = MessagingClient::new(inmail_tests::small_window_channel_as(
        stack.messaging.addr,
        &As::Member("rae".into()),
    ));
    let mut slow = watch(&mut slow_client, "rae", "").await.unwrap();
    let slow_start = first_heartbeat(&mut slow).await;
    let mut fast_client = stack.messaging_as("rae");
    let mut fast = watch(&mut fast_client, "rae", "").await.unwrap();
    first_heartbeat(&mut fast).await;

    // Large messages fill the HTTP/2 windows of the watch that is not
    // read, then its buffer; the other watch reads along.
    let big = "x".repeat(7_900);
    let total = 200;
    let mut seen = HashSet::new();
    let mut fast_got = 0;
    for n in 0..total {
        send_body(&mut sender, "sam", "rae", &format!("{n:03} {big}")).await;
        let (got, _, ended) = collect_messages(&mut fast, 1, &mut seen).await;
        assert!(ended.is_none(), "the reading watch goes on: {ended:?}");
        fast_got += got.len();
    }
    assert_eq!(fast_got, total, "the reading watch got everything");

    // The slow one now reads: what was buffered, then the end with a token.
    let mut read = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.message())
            .await
            .expect("the slow watch has ended")
        {
            Ok(Some(frame)) => read += usize::from(frame.event.is_some()),
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert!(
        read < total,
        "the slow watch was ended before getting it all"
    );
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), reasons::WATCH_BUFFER_FULL);
    let info = tonic_types::StatusExt::get_details_error_info(&status).expect("ErrorInfo");
    let token = info.metadata.get("resume_token").expect("a resume token");
    assert_ne!(token, &slow_start);
    // Its token resumes exactly after what it read.
    let mut again = watch(&mut slow_client, "rae", token).await.unwrap();
    let (rest, _, _) = collect_messages(&mut again, total - read, &mut HashSet::new()).await;
    assert_eq!(
        rest.len(),
        total - read,
        "the rest after the slow watch's token"
    );
    assert!(
        rest[0].starts_with(&format!("{read:03} ")),
        "{}",
        &rest[0][..8]
    );
    // The ended watch gave its place back: with `fast` and `again` open,
    // a third fits under --max-watches 3.
    let mut third = watch(&mut sender, "sam", "")
        .await
        .expect("the ended slow watch's place is free");
    first_heartbeat(&mut third).await;
}

// WatchBalance and SetLowBalanceAlert.

use inmail_shared::contract::proto::billing::v1 as bpb;
use inmail_tests::BillingClient;

async fn watch_balance(
    client: &mut BillingClient,
    member: &str,
    token: &str,
) -> Result<Streaming<bpb::WatchBalanceResponse>, tonic::Status> {
    client
        .watch_balance(bpb::WatchBalanceRequest {
            member_id: member.into(),
            resume_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn set_alert(
    stack: &Stack,
    member: &str,
    threshold: i64,
) -> Result<bpb::SetLowBalanceAlertResponse, tonic::Status> {
    stack
        .billing_as(member)
        .set_low_balance_alert(bpb::SetLowBalanceAlertRequest {
            request_id: inmail_tests::rid(),
            member_id: member.into(),
            threshold,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Reads balance events until `want` arrived or nothing comes for 3 s.
async fn balance_events(
    stream: &mut Streaming<bpb::WatchBalanceResponse>,
    want: usize,
) -> (Vec<bpb::BalanceEvent>, String) {
    let mut events = Vec::new();
    let mut token = String::new();
    while events.len() < want {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(3), stream.message()).await else {
            break;
        };
        let frame = next.expect("the watch goes on").expect("not ended");
        assert!(!frame.resume_token.is_empty(), "every frame has a token");
        token = frame.resume_token;
        if let Some(event) = frame.event {
            events.push(event);
        }
    }
    (events, token)
}

/// An event as (kind, ledger kind, balance after), for comparing.
fn shape(event: &bpb::BalanceEvent) -> (bpb::BalanceEventKind, bpb::LedgerEntryKind, i64) {
    let ledger = event
        .entry
        .as_ref()
        .map_or(bpb::LedgerEntryKind::Unspecified, |e| e.kind());
    (event.kind(), ledger, event.balance_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_balance_carries_every_ledger_entry_and_one_alert_per_crossing() {
    use bpb::BalanceEventKind::{BalanceRecovered, LedgerEntry, LowBalance};
    use bpb::LedgerEntryKind::{Debit, Grant, Release, Unspecified};
    let stack = Stack::start_with(with_args(&[])).await;
    crate::common::subscribe(&stack, "sam", "premium-career").await;
    assert_eq!(crate::common::available(&stack, "sam").await, 5);
    let mut client = stack.billing_as("sam");
    let mut stream = watch_balance(&mut client, "sam", "").await.unwrap();
    let set = set_alert(&stack, "sam", 2).await.unwrap();
    assert_eq!((set.threshold, set.available, set.low), (2, 5, false));
    for n in 0..4 {
        crate::common::spend(&stack, "sam", &format!("m-{n}"))
            .await
            .unwrap();
    }
    // A hold released gives the credit back: still low (2 <= 2).
    let mut billing = stack.billing_as_messaging();
    billing
        .debit_for_message(bpb::DebitForMessageRequest {
            request_id: inmail_tests::rid(),
            member_id: "sam".into(),
            message_id: "m-held".into(),
            amount: 1,
        })
        .await
        .unwrap();
    billing
        .release_debit(bpb::ReleaseDebitRequest {
            request_id: inmail_tests::rid(),
            member_id: "sam".into(),
            message_id: "m-held".into(),
            reason: bpb::ReleaseReason::Abandoned as i32,
        })
        .await
        .unwrap();
    crate::common::grant(&stack, "sam", 5).await;
    let (events, _) = balance_events(&mut stream, 9).await;
    let shapes: Vec<_> = events.iter().map(shape).collect();
    assert_eq!(
        shapes,
        [
            (LedgerEntry, Debit, 4),
            (LedgerEntry, Debit, 3),
            (LedgerEntry, Debit, 2),
            (LowBalance, Unspecified, 2),
            (LedgerEntry, Debit, 1),
            (LedgerEntry, Debit, 0),
            (LedgerEntry, Release, 1),
            (LedgerEntry, Grant, 6),
            (BalanceRecovered, Unspecified, 6),
        ],
        "{events:#?}"
    );
    assert_eq!(events[3].threshold, 2);
    // The ledger entries are the ledger's own, ids and all.
    let ledger = crate::common::ledger(&stack, "sam").await;
    for event in events.iter().filter(|e| e.kind() == LedgerEntry) {
        let entry = event.entry.as_ref().unwrap();
        assert!(
            ledger.iter().any(|l| l == entry),
            "{entry:?} is in the ledger"
        );
        assert_eq!(event.event_id, format!("ledger:{}", entry.entry_id));
    }
    let ids: HashSet<_> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "event ids are distinct");

    // 0 turns the alert off; bad input names the field; members set only
    // their own.
    assert_eq!(set_alert(&stack, "sam", 0).await.unwrap().threshold, 0);
    let bad = set_alert(&stack, "sam", -1).await.expect_err("negative");
    assert_eq!(crate::common::bad_fields(&bad), ["threshold"]);
    let other = stack
        .billing_as("rae")
        .set_low_balance_alert(bpb::SetLowBalanceAlertRequest {
            request_id: inmail_tests::rid(),
            member_id: "sam".into(),
            threshold: 3,
        })
        .await
        .expect_err("rae sets sam's alert");
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
    let other = watch_balance(&mut stack.billing_as("rae"), "sam", "")
        .await
        .expect_err("rae watches sam's balance");
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_racing_debits_cross_the_threshold_with_exactly_one_alert() {
    use bpb::BalanceEventKind::{LedgerEntry, LowBalance};
    let stack = Stack::start_with(with_args(&[])).await;
    crate::common::subscribe(&stack, "ann", "premium-career").await;
    crate::common::grant(&stack, "ann", 45).await;
    assert_eq!(crate::common::available(&stack, "ann").await, 50);
    let mut client = stack.billing_as("ann");
    let mut stream = watch_balance(&mut client, "ann", "").await.unwrap();
    set_alert(&stack, "ann", 25).await.unwrap();
    let calls = (0..50)
        .map(|i| {
            let mut billing = stack.billing_as_messaging();
            async move {
                billing
                    .debit_for_message(bpb::DebitForMessageRequest {
                        request_id: inmail_tests::rid(),
                        member_id: "ann".into(),
                        message_id: format!("race-{i}"),
                        amount: 1,
                    })
                    .await
            }
        })
        .collect();
    for answer in inmail_tests::race(calls, 10).await {
        answer.expect("50 credits for 50 debits");
    }
    let (events, _) = balance_events(&mut stream, 51).await;
    let alerts: Vec<_> = events.iter().filter(|e| e.kind() == LowBalance).collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].balance_after, 25);
    let debits = events.iter().filter(|e| e.kind() == LedgerEntry).count();
    assert_eq!(debits, 50);
    // The alert follows the debit that reached the threshold.
    let at = events.iter().position(|e| e.kind() == LowBalance).unwrap();
    assert_eq!(events[at - 1].balance_after, 25);
    assert_eq!(events.last().unwrap().balance_after, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_watch_resumes_after_its_token_and_refuses_one_past_retention() {
    let stack = Stack::start_with(StackOptions {
        billing_args: ["--events-max-per-member", "4", "--watch-heartbeat", "200ms"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await;
    crate::common::subscribe(&stack, "ivy", "premium-career").await;
    crate::common::available(&stack, "ivy").await;
    let mut client = stack.billing_as("ivy");
    let mut stream = watch_balance(&mut client, "ivy", "").await.unwrap();
    crate::common::grant(&stack, "ivy", 1).await;
    let (events, token) = balance_events(&mut stream, 1).await;
    assert_eq!(events.len(), 1);
    drop(stream);
    for _ in 0..2 {
        crate::common::grant(&stack, "ivy", 1).await;
    }
    let mut resumed = watch_balance(&mut client, "ivy", &token).await.unwrap();
    let (events, _) = balance_events(&mut resumed, 2).await;
    let after: Vec<i64> = events.iter().map(|e| e.balance_after).collect();
    assert_eq!(after, [7, 8], "exactly the entries after the token");
    drop(resumed);
    for _ in 0..4 {
        crate::common::grant(&stack, "ivy", 1).await;
    }
    let refused = watch_balance(&mut client, "ivy", &token)
        .await
        .expect_err("past retention");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused), reasons::RESUME_TOKEN_EXPIRED);
    let bad = watch_balance(&mut client, "ivy", "x.y")
        .await
        .expect_err("not a token");
    assert_eq!(crate::common::bad_fields(&bad), ["resume_token"]);
}

/// The real binaries: SIGKILL the replica serving a watch; the client
/// resumes on the other replica with its last token and misses nothing.
/// SIGTERM ends a watch UNAVAILABLE (SHUTTING_DOWN) with RetryInfo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_serving_a_watch_loses_nothing_when_the_client_resumes_elsewhere() {
    use inmail_tests::processes::ProcessStack;
    let stack = ProcessStack::start(|name| match name {
        "messaging" => vec![("WATCH_HEARTBEAT".into(), "200ms".into())],
        _ => vec![],
    })
    .await;
    let mut replica = stack.messaging.replica().await;
    let main = stack.messaging.addr;
    let mut sam = messaging_at(main, &As::Member("sam".into()));
    let mut rae = messaging_at(main, &As::Member("rae".into()));
    sam.send_invitation(pb::SendInvitationRequest {
        request_id: inmail_tests::rid(),
        member_id: "sam".into(),
        invitee_id: "rae".into(),
        note: String::new(),
    })
    .await
    .unwrap();
    rae.accept_invitation(pb::AcceptInvitationRequest {
        request_id: inmail_tests::rid(),
        member_id: "rae".into(),
        inviter_id: "sam".into(),
    })
    .await
    .unwrap();

    let mut on_replica = messaging_at(replica.addr, &As::Member("rae".into()));
    let mut stream = watch(&mut on_replica, "rae", "").await.unwrap();
    let start = first_heartbeat(&mut stream).await;
    let sent = bodies(0..20);
    for body in &sent[..10] {
        send_body(&mut sam, "sam", "rae", body).await;
    }
    let mut seen = HashSet::new();
    let (got, token, _) = collect_messages(&mut stream, 10, &mut seen).await;
    assert_eq!(got, sent[..10]);
    assert_ne!(token, start);

    replica.kill();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("the killed replica's watch ends");
    assert!(!matches!(ended, Ok(Some(_))));
    for body in &sent[10..] {
        send_body(&mut sam, "sam", "rae", body).await;
    }
    let mut resumed = watch(&mut rae, "rae", &token).await.unwrap();
    let (rest, _, ended) = collect_messages(&mut resumed, 10, &mut seen).await;
    assert!(ended.is_none(), "{ended:?}");
    assert_eq!(rest, sent[10..], "every event after the token, once");

    // SIGTERM: the watch ends UNAVAILABLE with RetryInfo and its token.
    stack.messaging.terminate();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .expect("the watch ends on SIGTERM")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), reasons::SHUTTING_DOWN);
    assert!(tonic_types::StatusExt::get_details_retry_info(&status).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_events_older_than_the_retention_time_are_dropped_and_their_tokens_refused() {
    let stack = Stack::start_with(with_args(&["--events-retention", "1s"])).await;
    connect(&stack, "sam", "rae").await;
    let mut sender = stack.messaging_as("sam");
    let mut watcher = stack.messaging_as("rae");
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    send_body(&mut sender, "sam", "rae", "a").await;
    let (_, after_a, _) = collect_messages(&mut stream, 1, &mut HashSet::new()).await;
    send_body(&mut sender, "sam", "rae", "b").await;
    let (got, _, _) = collect_messages(&mut stream, 1, &mut HashSet::new()).await;
    assert_eq!(got, ["b"]);
    drop(stream);
    // Within the retention the token resumes.
    let mut resumed = watch(&mut watcher, "rae", &after_a).await.unwrap();
    let (got, _, _) = collect_messages(&mut resumed, 1, &mut HashSet::new()).await;
    assert_eq!(got, ["b"]);
    drop(resumed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send_body(&mut sender, "sam", "rae", "c").await;
    let refused = watch(&mut watcher, "rae", &after_a)
        .await
        .expect_err("b aged out");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused), reasons::RESUME_TOKEN_EXPIRED);
    // Nothing at all for the retention: the stream is gone, and so is the
    // token's place.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys: i64 = redis::cmd("EXISTS")
        .arg("messaging:{rae}:events")
        .query_async(&mut stack.redis.conn().await)
        .await
        .unwrap();
    assert_eq!(keys, 0, "an idle member's events expire");
}

async fn watch_ledger(
    stack: &Stack,
    token: &str,
) -> Result<Streaming<bpb::WatchLedgerResponse>, tonic::Status> {
    stack
        .billing_operator()
        .watch_ledger(bpb::WatchLedgerRequest {
            resume_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Reads feed frames until `want` entries arrived or nothing comes for
/// 5 s: (member, event) in arrival order, and the token after each.
async fn feed_entries(
    stream: &mut Streaming<bpb::WatchLedgerResponse>,
    want: usize,
) -> Vec<(String, bpb::BalanceEvent, String)> {
    let mut got = Vec::new();
    let mut quiet_since = tokio::time::Instant::now();
    while got.len() < want && quiet_since.elapsed() < Duration::from_secs(5) {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await else {
            break;
        };
        let frame = next.expect("the feed goes on").expect("not ended");
        assert!(!frame.resume_token.is_empty());
        if let Some(event) = frame.event {
            got.push((frame.member_id, event, frame.resume_token));
            quiet_since = tokio::time::Instant::now();
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_ledger_feed_carries_every_members_entries_once_in_order_and_resumes() {
    let stack = Stack::start_with(StackOptions {
        billing_args: [
            "--cdc-lag",
            "300ms",
            "--watch-poll",
            "20ms",
            "--watch-heartbeat",
            "200ms",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await;
    let members: Vec<String> = (0..6).map(|n| format!("feed{n}")).collect();
    for member in &members {
        crate::common::subscribe(&stack, member, "premium-career").await;
        assert_eq!(crate::common::available(&stack, member).await, 5);
    }
    let mut feed = watch_ledger(&stack, "").await.unwrap();
    // Wait for the feed's first heartbeat: it stands at "now".
    let first = tokio::time::timeout(Duration::from_secs(5), feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.event.is_none());
    for round in 0..3 {
        for member in &members {
            if round < 2 {
                crate::common::grant(&stack, member, 1).await;
            } else {
                crate::common::spend(&stack, member, &format!("{member}-m"))
                    .await
                    .unwrap();
            }
        }
    }
    let got = feed_entries(&mut feed, 18).await;
    assert_eq!(got.len(), 18, "{got:#?}");
    let ids: HashSet<_> = got
        .iter()
        .map(|(m, e, _)| (m.clone(), e.event_id.clone()))
        .collect();
    assert_eq!(ids.len(), 18, "each entry once");
    for member in &members {
        let theirs: Vec<(bpb::LedgerEntryKind, i64)> = got
            .iter()
            .filter(|(m, _, _)| m == member)
            .map(|(_, e, _)| (e.entry.as_ref().unwrap().kind(), e.balance_after))
            .collect();
        assert_eq!(
            theirs,
            [
                (bpb::LedgerEntryKind::Grant, 6),
                (bpb::LedgerEntryKind::Grant, 7),
                (bpb::LedgerEntryKind::Debit, 6)
            ],
            "{member}'s entries in ledger order"
        );
    }
    drop(feed);
    // Resume after the 9th entry: exactly the other nine.
    let token = got[8].2.clone();
    let mut resumed = watch_ledger(&stack, &token).await.unwrap();
    let rest = feed_entries(&mut resumed, 9).await;
    // The same entries (partitions interleave as they pass the watermark:
    // order is per partition, so per member).
    let mut rest_ids: Vec<_> = rest
        .iter()
        .map(|(m, e, _)| (m.clone(), e.event_id.clone()))
        .collect();
    let mut expected: Vec<_> = got[9..]
        .iter()
        .map(|(m, e, _)| (m.clone(), e.event_id.clone()))
        .collect();
    for member in &members {
        let order = |list: &[(String, String)]| -> Vec<String> {
            list.iter()
                .filter(|(m, _)| m == member)
                .map(|(_, id)| id.clone())
                .collect()
        };
        assert_eq!(order(&rest_ids), order(&expected), "{member} in order");
    }
    rest_ids.sort();
    expected.sort();
    assert_eq!(rest_ids, expected, "exactly what followed the token");
    let bad = watch_ledger(&stack, "forged")
        .await
        .expect_err("not a token");
    assert_eq!(crate::common::bad_fields(&bad), ["resume_token"]);
    let member = stack
        .billing_as("feed0")
        .watch_ledger(bpb::WatchLedgerRequest::default())
        .await
        .expect_err("members may not read the feed");
    assert_eq!(member.code(), tonic::Code::PermissionDenied);
}

/// A retried send appends its message event again (the process that stored
/// it may have died before appending): the watcher sees the same event_id
/// twice, and once after dedupe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_appends_its_event_again_with_the_same_event_id() {
    let stack = Stack::start_with(with_args(&[])).await;
    connect(&stack, "sam", "rae").await;
    let mut watcher = stack.messaging_as("rae");
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    let mut sender = stack.messaging_as("sam");
    let request = send_request("sam", "rae", "", "once");
    let first = sender
        .send_message(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = sender.send_message(request).await.unwrap().into_inner();
    assert_eq!(
        first.message, again.message,
        "the retry answers the same message"
    );
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ids.len() < 2 {
        let frame = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("two message events")
            .unwrap()
            .unwrap();
        if let Some(event) = frame.event {
            ids.push(event.event_id);
        }
    }
    assert_eq!(ids[0], ids[1], "the same event, to dedupe by its id");
}

/// A writer that died between appending an event and its notice (or a
/// notice trimmed before it was read): the events reach their watchers by
/// the dispatcher's rescan, which reads every watched stream once per
/// rescan period (2 s here), a slice each poll. The events are written
/// straight to the members' streams, with no notice at all: without the
/// rescan none would arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_notices_were_lost_reach_every_watcher_by_the_rescan() {
    use prost::Message;
    let stack = Stack::start_with(with_args(&[])).await;
    let members: Vec<String> = (0..20).map(|n| format!("lost-{n:02}")).collect();
    let mut streams = Vec::new();
    for member in &members {
        let mut client = stack.messaging_as(member);
        let mut stream = watch(&mut client, member, "").await.unwrap();
        first_heartbeat(&mut stream).await;
        streams.push(stream);
    }
    let mut redis = stack.redis.conn().await;
    for member in &members {
        let event = pb::InboxEvent {
            event_id: format!("lost:{member}"),
            kind: pb::InboxEventKind::Message as i32,
            conversation_id: format!("conv-{member}"),
            message: Some(pb::Message {
                body: format!("for {member}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let _: String = redis::cmd("XADD")
            .arg(format!("messaging:{{{member}}}:events"))
            .arg("*")
            .arg("e")
            .arg(event.encode_to_vec())
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // Two rescan periods, and slack for a loaded machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (member, stream) in members.iter().zip(&mut streams) {
        let event = loop {
            let frame = tokio::time::timeout_at(deadline, stream.message())
                .await
                .unwrap_or_else(|_| panic!("{member}'s event never arrived"))
                .unwrap()
                .unwrap();
            if let Some(event) = frame.event {
                break event;
            }
        };
        assert_eq!(event.event_id, format!("lost:{member}"));
        assert_eq!(event.message.unwrap().body, format!("for {member}"));
    }
}

/// Redis clients connected, over every node.
async fn redis_clients(stack: &Stack) -> u64 {
    let mut total = 0;
    for url in stack.redis.url().split(',') {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(&mut conn)
            .await
            .unwrap();
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Watches hold no concurrency slot (one slot serves unary calls beside
/// forty open watches), and forty watchers add no Redis connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_hold_no_concurrency_slot_and_no_redis_connection() {
    let stack = Stack::start_with(with_args(&["--max-concurrent-requests", "1"])).await;
    connect(&stack, "sam", "rae").await;
    // Let the services' connections settle (lazy dials, the bulk one).
    let mut watcher = stack.messaging_as("rae");
    let mut warm = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut warm).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = redis_clients(&stack).await;
    let mut open = Vec::new();
    for n in 0..40 {
        let member = format!("w{n}");
        let mut client = stack.messaging_as(&member);
        let mut stream = watch(&mut client, &member, "").await.unwrap();
        first_heartbeat(&mut stream).await;
        open.push(stream);
    }
    // rae's own watch, then a unary call on the one slot.
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    send_body(&mut stack.messaging_as("sam"), "sam", "rae", "through").await;
    let (got, _, _) = collect_messages(&mut stream, 1, &mut HashSet::new()).await;
    assert_eq!(got, ["through"]);
    let after = redis_clients(&stack).await;
    assert_eq!(after, before, "watchers opened no Redis connection");
}

/// A stack whose outbox sweeper takes over 3 s after a call (requests time
/// out in 2 s, the sweeper looks every 200 ms), and a fault hook that breaks
/// a call as if its process died there.
fn dying_stack_options() -> (StackOptions, messaging::send::AfterDebitHook) {
    let hook: messaging::send::AfterDebitHook = std::sync::Arc::new(|| {
        Box::pin(async {
            Some(inmail_shared::ApiError::unavailable(
                inmail_shared::contract::reasons::STORAGE_UNAVAILABLE,
                "the process died",
            ))
        })
    });
    let options = with_args(&[
        "--request-timeout",
        "2s",
        "--send-recovery-after",
        "3s",
        "--sweep-interval",
        "200ms",
    ]);
    (options, hook)
}

/// A messaging process that dies right after delivering a message, before
/// appending its inbox events: the events were owed in the outbox from
/// before the delivery, and the sweeper appends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_process_died_before_its_events_gets_them_from_the_sweeper() {
    let (mut options, hook) = dying_stack_options();
    options.faults = messaging::send::Faults {
        after_deliver: Some(hook),
        ..Default::default()
    };
    let stack = Stack::start_with(options).await;
    connect(&stack, "sam", "rae").await;
    let mut watcher = stack.messaging_as("rae");
    let mut stream = watch(&mut watcher, "rae", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    let broken = stack
        .messaging_as("sam")
        .send_message(send_request("sam", "rae", "", "late"))
        .await
        .expect_err("the send broke after delivering");
    assert_eq!(broken.code(), tonic::Code::Unavailable);
    // Stored, not announced: nothing arrives before the sweeper's turn.
    let early = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let frame = stream.message().await.unwrap().unwrap();
            if frame.event.is_some() {
                return frame;
            }
        }
    })
    .await;
    assert!(early.is_err(), "no event before the sweeper: {early:?}");
    let (got, _, ended) = collect_messages(&mut stream, 1, &mut HashSet::new()).await;
    assert!(ended.is_none());
    assert_eq!(got, ["late"], "the sweeper appended the owed event");
    assert_eq!(
        inmail_tests::outbox_len(&stack.redis).await,
        0,
        "nothing left owed"
    );
}

/// A messaging process that dies right after recording an accept, before
/// the refund and the events: the response owed both in the outbox from
/// before it was recorded, and the sweeper refunds the InMail and appends
/// the INMAIL_RESPONSE and REFUND_STATUS events (at least once, deduped by
/// id); nothing stays owed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_process_died_before_its_events_gets_them_from_the_sweeper() {
    let (mut options, hook) = dying_stack_options();
    options.faults = messaging::send::Faults {
        after_respond: Some(hook),
        ..Default::default()
    };
    let stack = Stack::start_with(options).await;
    crate::common::subscribe(&stack, "sam", "premium-career").await;
    stack
        .messaging_as("sam")
        .send_message(send_request("sam", "rae", "Role", "Interested?"))
        .await
        .unwrap();
    assert_eq!(crate::common::available(&stack, "sam").await, 4);
    let conv = messaging::domain::conversation_id("sam", "rae");
    let mut watcher = stack.messaging_as("sam");
    let mut stream = watch(&mut watcher, "sam", "").await.unwrap();
    first_heartbeat(&mut stream).await;
    let broken = crate::common::respond(&stack, "rae", &conv, pb::InmailResponse::Accept, "")
        .await
        .expect_err("the accept broke after it was recorded");
    assert_eq!(broken.code(), tonic::Code::Unavailable);
    // Recorded, not announced nor refunded: nothing before the sweeper.
    let early = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let frame = stream.message().await.unwrap().unwrap();
            if frame.event.is_some() {
                return frame;
            }
        }
    })
    .await;
    assert!(early.is_err(), "no event before the sweeper: {early:?}");
    assert_eq!(crate::common::available(&stack, "sam").await, 4);
    // The sweeper's turn: both events, each kind once after dedupe by id.
    let mut kinds = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while kinds.len() < 2 {
        let frame = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the owed events within 20 s")
            .unwrap()
            .unwrap();
        if let Some(event) = frame.event {
            kinds.entry(event.kind()).or_insert(event);
        }
    }
    let response = &kinds[&pb::InboxEventKind::InmailResponse];
    assert_eq!(response.inmail_state(), pb::InmailState::Accepted);
    assert_eq!(response.conversation_id, conv);
    let refund = &kinds[&pb::InboxEventKind::RefundStatus];
    assert_eq!(refund.refund_status(), pb::RefundStatus::Refunded);
    assert_eq!(crate::common::available(&stack, "sam").await, 5);
    assert!(
        crate::common::eventually(Duration::from_secs(5), || async {
            inmail_tests::outbox_len(&stack.redis).await == 0
        })
        .await,
        "nothing left owed"
    );
}
