//! One caller, or one dead dependency, must not degrade everyone (issue
//! 9.7-9.10). Each test failed on the code before its fix.

use std::time::{Duration, Instant};

use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::messaging::v1::InmailResponse;
use inmail_tests::{Stack, StackOptions, rid};
use rustls::pki_types::pem::PemObject;
use tonic::Code;

use crate::common::*;

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// Redis down: SendMessage and RespondToInmail answer UNAVAILABLE at once,
/// like every other call, not after retrying to their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_sends_and_responses_fail_fast() {
    let mut stack = Stack::start().await;
    subscribe(&stack, "kai", "premium-career").await;
    send(&stack, "kai", "lea").await.unwrap();
    stack.redis.kill();
    let started = Instant::now();
    let send = stack
        .messaging_as("kai")
        .send_message(with_deadline(
            send_request("kai", "max", "Hi", "Hello"),
            Duration::from_secs(8),
        ))
        .await
        .unwrap_err();
    let send_took = started.elapsed();
    let started = Instant::now();
    let reply = stack
        .messaging_as("lea")
        .respond_to_inmail(with_deadline(
            pb::RespondToInmailRequest {
                request_id: rid(),
                member_id: "lea".into(),
                conversation_id: "kai~lea".into(),
                response: InmailResponse::Reply as i32,
                body: "Hello back".into(),
            },
            Duration::from_secs(8),
        ))
        .await
        .unwrap_err();
    let reply_took = started.elapsed();
    assert_eq!(send.code(), Code::Unavailable, "{send:?}");
    assert_eq!(reply.code(), Code::Unavailable, "{reply:?}");
    assert!(
        send_took < Duration::from_millis(1500),
        "SendMessage took {send_took:?}"
    );
    assert!(
        reply_took < Duration::from_millis(1500),
        "RespondToInmail took {reply_took:?}"
    );
}

/// billing down: each InMail fails in milliseconds instead of holding a
/// permit for its deadline, so free messages keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_billing_costs_milliseconds_and_free_messages_are_not_shed() {
    let mut stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--max-concurrent-requests".into(), "8".into()],
        ..Default::default()
    })
    .await;
    for i in 0..20 {
        subscribe(&stack, &format!("nia{i}"), "premium-career").await;
    }
    connect(&stack, "oli", "pam").await;
    stack.stop_billing().await;
    let mut inmails = Vec::new();
    for i in 0..20 {
        let mut client = stack.messaging_as(&format!("nia{i}"));
        inmails.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = client
                .send_message(with_deadline(
                    send_request(&format!("nia{i}"), &format!("quin{i}"), "Hi", "Hello"),
                    Duration::from_secs(5),
                ))
                .await;
            (answer.map(|_| ()), started.elapsed())
        }));
    }
    // Long past a failed call, far before the InMails' deadline.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut free = Vec::new();
    for i in 0..8 {
        let mut client = stack.messaging_as("oli");
        free.push(tokio::spawn(async move {
            client
                .send_message(with_deadline(
                    send_request("oli", "pam", "", &format!("free {i}")),
                    Duration::from_secs(5),
                ))
                .await
        }));
    }
    for call in free {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "a free message was refused: {answer:?}");
    }
    for call in inmails {
        let (answer, took) = call.await.unwrap();
        // Unavailable at once, or shed when more than MAX_CONCURRENT_REQUESTS
        // arrived together.
        let status = answer.unwrap_err();
        assert!(
            matches!(status.code(), Code::Unavailable | Code::ResourceExhausted),
            "{status:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "an InMail held its permit for {took:?}"
        );
    }
}

/// A page token works only with the request it came from (same list, same
/// member, same conversation); another member's, another list's or a forged
/// one is INVALID_ARGUMENT naming page_token (AIP-158).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn page_tokens_are_bound_to_their_list_and_member_and_cannot_be_forged() {
    use base64::Engine;
    use inmail_shared::contract::proto::billing::v1 as billing;
    let stack = Stack::start().await;
    for member in ["rae", "sid"] {
        subscribe(&stack, member, "premium-career").await;
        grant(&stack, member, 1).await;
    }
    let ledger_page = |member: &str, token: &str| {
        let mut client = stack.billing_as(member);
        let request = billing::ListLedgerEntriesRequest {
            member_id: member.into(),
            page_size: 1,
            page_token: token.into(),
        };
        async move {
            client
                .list_ledger_entries(request)
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = ledger_page("rae", "").await.unwrap();
    assert!(!first.next_page_token.is_empty());
    let second = ledger_page("rae", &first.next_page_token).await.unwrap();
    assert_eq!(second.entries.len(), 1, "the token pages its own list");

    let foreign = ledger_page("sid", &first.next_page_token)
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument, "{foreign:?}");
    assert_eq!(bad_fields(&foreign), ["page_token"]);

    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("ledger|{}", first.entries[0].entry_id));
    let forged = ledger_page("rae", &forged).await.unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument, "{forged:?}");

    // A conversation's token does not page another conversation.
    connect(&stack, "rae", "tom").await;
    connect(&stack, "rae", "uli").await;
    for other in ["tom", "uli"] {
        for i in 0..3 {
            stack
                .messaging_as("rae")
                .send_message(send_request("rae", other, "", &format!("m{i}")))
                .await
                .unwrap();
        }
    }
    let messages = |conv: &str, token: &str| {
        let mut client = stack.messaging_as("rae");
        let request = pb::ListMessagesRequest {
            member_id: "rae".into(),
            conversation_id: conv.into(),
            page_size: 1,
            page_token: token.into(),
        };
        async move { client.list_messages(request).await.map(|r| r.into_inner()) }
    };
    let page = messages("rae~tom", "").await.unwrap();
    assert!(messages("rae~tom", &page.next_page_token).await.is_ok());
    let other = messages("rae~uli", &page.next_page_token)
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert_eq!(bad_fields(&other), ["page_token"]);
}

/// Free messages are rate limited per sender too: past the burst, a send is
/// RESOURCE_EXHAUSTED with RetryInfo, and nothing is stored for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn free_messages_are_rate_limited_per_sender() {
    use tonic_types::StatusExt;
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--free-send-burst".into(), "5".into()],
        ..Default::default()
    })
    .await;
    connect(&stack, "vi", "wu").await;
    for i in 0..5 {
        stack
            .messaging_as("vi")
            .send_message(send_request("vi", "wu", "", &format!("hello {i}")))
            .await
            .unwrap();
    }
    let limited = stack
        .messaging_as("vi")
        .send_message(send_request("vi", "wu", "", "one too many"))
        .await
        .unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert_eq!(reason(&limited), "SEND_RATE_LIMITED");
    assert!(
        limited
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .is_some()
    );
    let c = conversation(&stack, "vi", "vi~wu").await.unwrap();
    assert_eq!(c.message_count, 5, "nothing stored for the refused send");
}

/// Pages of large messages stay within a response size budget (fewer items
/// when they are large), and many such pages at once neither fail nor take
/// the service's health down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_pages_stay_within_a_size_budget_and_do_not_starve_the_service() {
    use inmail_tests::{SERVING, health};
    use prost::Message;
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--free-send-burst".into(), "1000".into()],
        ..Default::default()
    })
    .await;
    connect(&stack, "xu", "yo").await;
    // 8,000 characters of four bytes: 32 KB a message, 4.8 MB in all.
    let body: String = "\u{1F600}".repeat(8000);
    let mut sends = Vec::new();
    for i in 0..150 {
        let mut client = stack.messaging_as("xu");
        let body = body.clone();
        sends.push(tokio::spawn(async move {
            client
                .send_message(send_request("xu", "yo", &format!("m{i}"), &body))
                .await
                .unwrap();
        }));
    }
    for send in sends {
        send.await.unwrap();
    }
    let page = |token: String| {
        let mut client = stack.messaging_as("yo");
        async move {
            client
                .list_messages(pb::ListMessagesRequest {
                    member_id: "yo".into(),
                    conversation_id: "xu~yo".into(),
                    page_size: 500,
                    page_token: token,
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let response = page(token).await.expect("a page");
        assert!(
            response.encoded_len() <= 1024 * 1024 + 64 * 1024,
            "a page of {} bytes",
            response.encoded_len()
        );
        assert!(!response.messages.is_empty());
        seen += response.messages.len();
        if response.next_page_token.is_empty() {
            break;
        }
        token = response.next_page_token;
    }
    assert_eq!(seen, 150, "paging reaches every message");

    let mut pages = Vec::new();
    for _ in 0..60 {
        pages.push(tokio::spawn(page(String::new())));
    }
    let watch = tokio::spawn({
        let addr = stack.messaging.addr;
        async move {
            for _ in 0..20 {
                assert_eq!(health(addr).await.unwrap(), SERVING, "health dropped");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    });
    for page in pages {
        let answer = page.await.unwrap();
        assert!(answer.is_ok(), "a page failed: {:?}", answer.err());
    }
    watch.await.unwrap();
}

/// Slow clients: streams that send their headers and never a body hold no
/// permit, so they cannot lock everyone else out; the server gives up on
/// them after its body read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_that_never_send_a_body_do_not_lock_callers_out() {
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec![
            "--max-concurrent-requests".into(),
            "16".into(),
            "--body-read-timeout".into(),
            "2s".into(),
        ],
        ..Default::default()
    })
    .await;
    // A raw HTTP/2 client over TLS, as a member, that never sends a body.
    let tcp = tokio::net::TcpStream::connect(stack.messaging.addr)
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(
        inmail_tests::pki().pki.ca.cert_pem.as_bytes(),
    ) {
        roots.add(ca.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let token = format!("Bearer {}", inmail_tests::pki().token("zoe"));
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..32 {
        let request = http::Request::post(format!(
            "http://{}/inmail.messaging.v1.MessagingService/GetInmailPreference",
            stack.messaging.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", &token)
        .body(())
        .unwrap();
        // Headers only: the body never comes.
        let (response, stream) = client.send_request(request, false).unwrap();
        held.push((response, stream));
        client = client.ready().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let answer = stack
        .messaging_as("zoe")
        .get_inmail_preference(with_deadline(
            pb::GetInmailPreferenceRequest {
                member_id: "zoe".into(),
            },
            Duration::from_secs(5),
        ))
        .await;
    assert!(answer.is_ok(), "a caller was locked out: {answer:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // The stalled streams are answered once the body read times out.
    let (response, _stream) = held.pop().unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), response).await;
    assert!(answered.is_ok(), "a stalled stream was never answered");
}

/// The breaker in front of billing counts billing's failures only, never a
/// caller's deadline running out (issue 19.5). A burst of InMails with
/// deadlines of a few milliseconds does not refuse the next InMail; and,
/// deterministically, messaging's own billing client called with budgets
/// already spent (an InMail whose deadline ran out inside messaging), as
/// often as opens the breaker on failures, still serves the next call with
/// a normal deadline. That call was refused UNAVAILABLE: the spent budgets
/// counted as billing failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_spent_deadlines_do_not_open_the_breaker() {
    use inmail_shared::runtime::client::Downstream;
    use inmail_shared::runtime::context::CallContext;
    use inmail_tests::{As, tls_channel};
    use messaging::downstream::Billing;

    let stack = Stack::start().await;
    for s in 0..3 {
        subscribe(&stack, &format!("rae{s}"), "premium-business").await;
    }
    subscribe(&stack, "sid", "premium-career").await;
    let mut burst = Vec::new();
    for i in 0..24u64 {
        let sender = format!("rae{}", i % 3);
        let mut client = stack.messaging_as(&sender);
        let request = with_deadline(
            send_request(&sender, &format!("ted{i}"), "Hi", "Hello"),
            Duration::from_millis(2 + i % 10),
        );
        burst.push(tokio::spawn(
            async move { client.send_message(request).await },
        ));
    }
    for call in burst {
        let _ = call.await.unwrap();
    }
    let answer = stack
        .messaging_as("sid")
        .send_message(with_deadline(
            send_request("sid", "uli", "Hi", "A normal InMail"),
            Duration::from_secs(5),
        ))
        .await;
    assert!(
        answer.is_ok(),
        "the burst refused the next InMail: {answer:?}"
    );

    let billing = Billing::new(
        tls_channel(stack.billing.addr, &As::Service("messaging")),
        Duration::from_secs(2),
    );
    for _ in 0..=Downstream::FAILURES {
        let spent = CallContext::background(Duration::ZERO);
        let answer = billing.available(&spent, "sid").await;
        assert!(answer.is_err(), "no budget, no answer: {answer:?}");
    }
    let normal = CallContext::background(Duration::from_secs(5));
    let answer = billing.available(&normal, "sid").await;
    assert_eq!(
        answer.ok(),
        Some(4),
        "spent caller deadlines opened the breaker in front of a healthy billing"
    );
}

/// Every kind of call once, on the messaging replica at `messaging` (and
/// billing and subscription-plan), list reads first; answers the calls that
/// failed. Each run sends one InMail (to a new member, `tag`) and one free
/// message.
async fn one_call_of_every_kind(
    stack: &Stack,
    messaging: std::net::SocketAddr,
    tag: &str,
) -> Vec<String> {
    use inmail_shared::contract::proto::billing::v1 as billing;
    use inmail_shared::contract::proto::plans::v1 as plans;
    let mut client = inmail_tests::messaging_at(messaging, &inmail_tests::As::member("ada"));
    let mut failures = Vec::new();
    let mut note = |call: &str, answer: Result<(), tonic::Status>| {
        if let Err(status) = answer {
            failures.push(format!("{call}: {:?} {}", status.code(), status.message()));
        }
    };
    let answer = client
        .list_conversations(pb::ListConversationsRequest {
            member_id: "ada".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await;
    note("ListConversations", answer.map(|_| ()));
    let answer = client
        .get_conversation(pb::GetConversationRequest {
            member_id: "ada".into(),
            conversation_id: "ada~cy".into(),
        })
        .await;
    note("GetConversation", answer.map(|_| ()));
    let answer = client
        .list_messages(pb::ListMessagesRequest {
            member_id: "ada".into(),
            conversation_id: "ada~cy".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await;
    note("ListMessages", answer.map(|_| ()));
    let answer = client
        .list_connections(pb::ListConnectionsRequest {
            member_id: "ada".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await;
    note("ListConnections", answer.map(|_| ()));
    let answer = client
        .get_inmail_preference(pb::GetInmailPreferenceRequest {
            member_id: "ada".into(),
        })
        .await;
    note("GetInmailPreference", answer.map(|_| ()));
    let answer = client
        .send_message(send_request("ada", "bo", "", &format!("free {tag}")))
        .await;
    note("SendMessage (free)", answer.map(|_| ()));
    let answer = client
        .send_message(send_request("ada", tag, "Hi", "An InMail"))
        .await;
    note("SendMessage (InMail)", answer.map(|_| ()));
    let answer = stack
        .billing_as("ada")
        .get_balance(billing::GetBalanceRequest {
            member_id: "ada".into(),
        })
        .await;
    note("GetBalance", answer.map(|_| ()));
    let answer = stack
        .billing_as("ada")
        .list_ledger_entries(billing::ListLedgerEntriesRequest {
            member_id: "ada".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await;
    note("ListLedgerEntries", answer.map(|_| ()));
    let answer = stack
        .plans_as("ada")
        .get_subscription(plans::GetSubscriptionRequest {
            member_id: "ada".into(),
        })
        .await;
    note("GetSubscription", answer.map(|_| ()));
    failures
}

/// Waits until every server at `addrs` reports `status`.
async fn wait_health(addrs: &[std::net::SocketAddr], status: i32, within: Duration) {
    for addr in addrs {
        assert!(
            eventually(within, || async {
                inmail_tests::health(*addr).await.ok() == Some(status)
            })
            .await,
            "{addr} did not report {status} within {within:?}"
        );
    }
}

/// After a Redis outage, once every service reports SERVING again, the
/// first call of every kind succeeds, on each of two messaging replicas: a
/// service reports SERVING only once every Redis connection it holds (the
/// one list pages are read on too) answers again (issue 19.7). Before, each
/// messaging replica's first ListConversations failed with a stale
/// "Connection refused".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_serving_again_after_a_redis_outage_the_first_call_of_every_kind_succeeds() {
    use inmail_tests::{NOT_SERVING, SERVING};
    let mut stack = Stack::start().await;
    let second = stack.messaging_replica().await;
    subscribe(&stack, "ada", "premium-career").await;
    grant(&stack, "ada", 10).await;
    connect(&stack, "ada", "bo").await;
    send(&stack, "ada", "cy").await.unwrap();
    let replicas = [stack.messaging.addr, second.addr];
    // Every connection in use before the outage.
    for (i, addr) in replicas.into_iter().enumerate() {
        let failures = one_call_of_every_kind(&stack, addr, &format!("dee{i}")).await;
        assert!(failures.is_empty(), "before the outage: {failures:#?}");
    }
    let services = [
        stack.plans.addr,
        stack.billing.addr,
        stack.messaging.addr,
        second.addr,
    ];
    stack.redis.kill();
    wait_health(&services, NOT_SERVING, Duration::from_secs(5)).await;
    stack.redis.restart().await;
    wait_health(&services, SERVING, Duration::from_secs(10)).await;
    for (i, addr) in replicas.into_iter().enumerate() {
        let failures = one_call_of_every_kind(&stack, addr, &format!("eli{i}")).await;
        assert!(
            failures.is_empty(),
            "first calls on messaging replica {i} once SERVING again: {failures:#?}"
        );
    }
}

/// The arguments that make every service wait for one replica.
fn wait_for_one_replica(timeout: &str) -> StackOptions {
    let wait = vec![
        "--redis-min-replicas".to_string(),
        "1".into(),
        "--redis-replica-timeout".into(),
        timeout.into(),
    ];
    StackOptions {
        plans_args: wait.clone(),
        billing_args: wait.clone(),
        messaging_args: wait,
        ..Default::default()
    }
}

/// The same with REDIS_MIN_REPLICAS=1: once the restarted primary has its
/// replica again and every service reports SERVING, the first write of
/// each service, each waiting for the replica (`WAIT`), succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_serving_again_after_a_redis_outage_the_first_replicated_writes_succeed() {
    use inmail_shared::contract::proto::plans::v1 as plans;
    use inmail_tests::{NOT_SERVING, RedisServer, SERVING};
    // A single primary with a replica; the cluster run has no replicas.
    inmail_tests::redis_server::single_redis_only();
    let primary = RedisServer::start_single().await;
    let replica = primary.start_replica().await;
    let mut stack = Stack::start_on(primary, wait_for_one_replica("2s")).await;
    subscribe(&stack, "fay", "premium-career").await;
    let services = [stack.plans.addr, stack.billing.addr, stack.messaging.addr];
    stack.redis.kill();
    wait_health(&services, NOT_SERVING, Duration::from_secs(5)).await;
    stack.redis.restart().await;
    replica.wait_replication_link().await;
    wait_health(&services, SERVING, Duration::from_secs(10)).await;

    let mut failures = Vec::new();
    let subscribed = stack
        .plans_as("gil")
        .subscribe(plans::SubscribeRequest {
            request_id: rid(),
            member_id: "gil".into(),
            plan_id: "premium-career".into(),
        })
        .await;
    if let Err(status) = subscribed {
        failures.push(format!("Subscribe: {status:?}"));
    }
    if let Err(status) = stack
        .billing_operator()
        .grant_credits(
            inmail_shared::contract::proto::billing::v1::GrantCreditsRequest {
                request_id: rid(),
                member_id: "fay".into(),
                amount: 1,
                reason: "after the outage".into(),
            },
        )
        .await
    {
        failures.push(format!("GrantCredits: {status:?}"));
    }
    if let Err(status) = send(&stack, "fay", "hal").await {
        failures.push(format!("SendMessage (InMail): {status:?}"));
    }
    assert!(
        failures.is_empty(),
        "first replicated writes: {failures:#?}"
    );
}

/// How many clients of the Redis at `url` are blocked in WAIT.
async fn blocked_waits(url: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    clients
        .lines()
        .filter(|line| {
            line.split(' ').any(|field| field == "cmd=wait")
                && line
                    .split(' ')
                    .any(|field| field.starts_with("flags=") && field.contains('b'))
        })
        .count()
}

/// SetInmailPreference as `member`.
async fn set_preference(
    stack: &Stack,
    member: &str,
    request_id: &str,
    accept_inmail: bool,
) -> Result<(), tonic::Status> {
    stack
        .messaging_as(member)
        .set_inmail_preference(pb::SetInmailPreferenceRequest {
            request_id: request_id.into(),
            member_id: member.into(),
            accept_inmail,
        })
        .await
        .map(|_| ())
}

/// A replica that stalls (SIGSTOP) holds only the writes that wait for it
/// (issue 19.8): while a debit in billing and a preference change in
/// messaging each wait up to REDIS_REPLICA_TIMEOUT (3 s) for it, every
/// service stays SERVING, reads answer at once, and another member's
/// change reaches the primary at once (its answer then waits for the
/// replica too). Before, WAIT went on the connection all of a service's
/// commands share, and Redis blocks the connection it is sent on: health
/// pings, reads and other members' writes queued behind it, and the
/// services turned NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_replica_holds_only_the_writes_that_wait_for_it() {
    use inmail_shared::contract::proto::billing::v1 as billing;
    use inmail_shared::contract::proto::plans::v1 as plans;
    use inmail_tests::{RedisServer, SERVING, health};
    // A single primary with a replica; the cluster run has no replicas.
    inmail_tests::redis_server::single_redis_only();
    let primary = RedisServer::start_single().await;
    let replica = primary.start_replica().await;
    let stack = Stack::start_on(primary, wait_for_one_replica("3s")).await;
    subscribe(&stack, "ida", "premium-career").await;
    let before = available(&stack, "ida").await;
    let debit = billing::DebitForMessageRequest {
        request_id: "req-i1".into(),
        member_id: "ida".into(),
        message_id: "i1".into(),
        amount: 1,
    };

    replica.pause();
    let started = Instant::now();
    let stalled_debit = tokio::spawn({
        let mut billing = stack.billing_as_messaging();
        let request = debit.clone();
        async move { billing.debit_for_message(request).await }
    });
    let stalled_preference = tokio::spawn({
        let mut messaging = stack.messaging_as("ida");
        async move {
            messaging
                .set_inmail_preference(pb::SetInmailPreferenceRequest {
                    request_id: "req-ida-off".into(),
                    member_id: "ida".into(),
                    accept_inmail: false,
                })
                .await
        }
    });
    let primary_url = stack.redis.url();
    assert!(
        eventually(Duration::from_secs(2), || async {
            blocked_waits(&primary_url).await >= 2
        })
        .await,
        "billing and messaging never both waited for the replica"
    );

    // Well under the replica timeout: nothing else queues behind a WAIT.
    let quick = Duration::from_millis(1000);
    let timed = |call: &'static str, answer: Result<(), tonic::Status>, from: Instant| {
        let took = from.elapsed();
        assert!(
            answer.is_ok(),
            "{call} failed while the replica stalled: {answer:?}"
        );
        assert!(
            took < quick,
            "{call} took {took:?} while the replica stalled"
        );
    };
    // Another member's change is on the primary at once (messaging reads
    // it back), while its answer waits for the replica.
    let other = tokio::spawn({
        let mut messaging = stack.messaging_as("jo");
        async move {
            messaging
                .set_inmail_preference(pb::SetInmailPreferenceRequest {
                    request_id: "req-jo-off".into(),
                    member_id: "jo".into(),
                    accept_inmail: false,
                })
                .await
        }
    });
    let from = Instant::now();
    let changed = eventually(quick, || async {
        stack
            .messaging_as("jo")
            .get_inmail_preference(pb::GetInmailPreferenceRequest {
                member_id: "jo".into(),
            })
            .await
            .is_ok_and(|r| !r.into_inner().accept_inmail)
    })
    .await;
    assert!(
        changed,
        "jo's change did not reach the primary within {quick:?} ({:?})",
        from.elapsed()
    );
    let from = Instant::now();
    let answer = stack
        .billing_as_messaging()
        .get_debit(billing::GetDebitRequest {
            member_id: "ida".into(),
            message_id: "i1".into(),
        })
        .await;
    // NOT_FOUND: the debit itself comes after its message id's WAIT.
    let answer = match answer {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        other => other.map(|_| ()),
    };
    timed("GetDebit", answer, from);
    let from = Instant::now();
    let answer = stack
        .billing_as("ida")
        .list_ledger_entries(billing::ListLedgerEntriesRequest {
            member_id: "ida".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await;
    timed("ListLedgerEntries", answer.map(|_| ()), from);
    let from = Instant::now();
    let answer = stack
        .plans_as("ida")
        .get_subscription(plans::GetSubscriptionRequest {
            member_id: "ida".into(),
        })
        .await;
    timed("GetSubscription", answer.map(|_| ()), from);
    let from = Instant::now();
    let answer = stack
        .messaging_as("ida")
        .list_conversations(pb::ListConversationsRequest {
            member_id: "ida".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await;
    timed("ListConversations", answer.map(|_| ()), from);
    // Health, all along the stalled writes' wait.
    let services = [stack.plans.addr, stack.billing.addr, stack.messaging.addr];
    while !(stalled_debit.is_finished() && stalled_preference.is_finished()) {
        for addr in services {
            assert_eq!(
                health(addr).await.ok(),
                Some(SERVING),
                "{addr} stopped serving {:?} into the replica's stall",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = started.elapsed();
    for stalled in [
        stalled_debit.await.unwrap().map(|_| ()),
        stalled_preference.await.unwrap().map(|_| ()),
    ] {
        let stalled = stalled.unwrap_err();
        assert_eq!(stalled.code(), Code::Unavailable, "{stalled:?}");
        assert_eq!(reason(&stalled), "NOT_REPLICATED");
    }
    assert!(
        waited >= Duration::from_millis(2500),
        "the stalled writes were answered after {waited:?}, before the replica timeout"
    );

    replica.resume();
    let other = other.await.unwrap();
    assert!(
        other.is_ok() || reason(other.as_ref().unwrap_err()) == "NOT_REPLICATED",
        "{other:?}"
    );
    let retried = stack
        .billing_as_messaging()
        .debit_for_message(debit)
        .await
        .expect("the retry gets the first outcome")
        .into_inner();
    assert_eq!(retried.balance_after, before - 1);
    set_preference(&stack, "ida", "req-ida-off", false)
        .await
        .expect("the retry gets the first outcome");
}

/// With a replica required and none there, every write is answered
/// `NOT_REPLICATED` (0 of 1), on a single Redis and on each primary of a
/// cluster: the `WAIT` connection's marker write reaches the primary of the
/// write's key (a wrong node would answer MOVED, an error), and it leaves
/// no key behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_replicas_required_each_write_is_not_replicated_on_its_own_primary() {
    use inmail_shared::contract::proto::plans::v1 as plans;
    let stack = Stack::start_with(wait_for_one_replica("100ms")).await;
    // Members on every primary of a cluster.
    for i in 0..12 {
        let member = format!("kim{i}");
        let subscribed = stack
            .plans_as(&member)
            .subscribe(plans::SubscribeRequest {
                request_id: rid(),
                member_id: member.clone(),
                plan_id: "premium-career".into(),
            })
            .await
            .map(|_| ());
        let preference = set_preference(&stack, &member, &rid(), false).await;
        for (call, answer) in [
            ("Subscribe", subscribed),
            ("SetInmailPreference", preference),
        ] {
            let status = answer.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
            assert_eq!(reason(&status), "NOT_REPLICATED", "{call}: {status:?}");
            assert!(
                status.message().contains("0 of the 1"),
                "{call}: {status:?}"
            );
        }
    }
    let digest = stack.redis.digest().await;
    assert!(
        !digest.contains("replication-marker"),
        "a marker key stayed: {digest}"
    );
}
