//! The stack through the real grpcurl 1.8.6, as users call it: no .proto
//! files, only server reflection (v1alpha, the only one grpcurl 1.8 speaks).

use inmail_tests::grpcurl::{call, run, tls_args};
use inmail_tests::{As, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_every_service_without_proto_files() {
    let stack = Stack::start().await;
    for (addr, service) in [
        (stack.plans.addr, "inmail.plans.v1.SubscriptionPlanService"),
        (
            stack.billing.addr,
            "inmail.billing.v1.BillingCreditsService",
        ),
        (stack.messaging.addr, "inmail.messaging.v1.MessagingService"),
    ] {
        let mut args = tls_args(&As::Anonymous);
        args.extend([addr.to_string(), "list".into()]);
        let listed = run(&args);
        assert!(listed.ok, "{}", listed.stderr);
        let services: Vec<&str> = listed.stdout.lines().collect();
        for expected in [
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "inmail.testclock.v1.TestClockService",
        ] {
            assert!(
                services.contains(&expected),
                "{addr}: {expected} missing from {services:?}"
            );
        }
        let mut args = tls_args(&As::Anonymous);
        args.extend([addr.to_string(), "describe".into(), service.into()]);
        let described = run(&args);
        assert!(described.ok, "{}", described.stderr);
        assert!(described.stdout.contains("rpc "), "{}", described.stdout);
        let health = call(
            addr,
            &As::Anonymous,
            "grpc.health.v1.Health/Check",
            Some("{}"),
        );
        assert!(health.ok, "{}", health.stderr);
        assert_eq!(health.json()["status"], "SERVING");
    }
}

/// The seed's story, scripted with grpcurl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_story_with_grpcurl() {
    let stack = Stack::start().await;
    let (plans, billing, messaging) = (stack.plans.addr, stack.billing.addr, stack.messaging.addr);
    let subscribed = call(
        plans,
        &As::member("sam"),
        "inmail.plans.v1.SubscriptionPlanService/Subscribe",
        Some(r#"{"request_id":"seed-sub","member_id":"sam","plan_id":"premium-career"}"#),
    );
    assert!(subscribed.ok, "{}", subscribed.stderr);
    assert_eq!(
        subscribed.json()["subscription"]["planId"],
        "premium-career"
    );

    for i in 1..=5 {
        let sent = call(
            messaging,
            &As::member("sam"),
            "inmail.messaging.v1.MessagingService/SendMessage",
            Some(&format!(
                r#"{{"request_id":"seed-{i}","sender_id":"sam","recipient_id":"stranger{i}","subject":"Hello","body":"Could we talk?"}}"#
            )),
        );
        assert!(sent.ok, "{}", sent.stderr);
        let json = sent.json();
        assert_eq!(json["message"]["kind"], "MESSAGE_KIND_INMAIL");
        assert_eq!(json["senderBalanceAfter"], (5 - i).to_string());
    }
    let sixth = call(
        messaging,
        &As::member("sam"),
        "inmail.messaging.v1.MessagingService/SendMessage",
        Some(
            r#"{"request_id":"seed-6","sender_id":"sam","recipient_id":"stranger6","subject":"Hello","body":"Hi"}"#,
        ),
    );
    assert!(!sixth.ok);
    assert!(
        sixth.stderr.contains("FailedPrecondition"),
        "{}",
        sixth.stderr
    );
    assert!(
        sixth.stderr.contains("INSUFFICIENT_CREDITS"),
        "{}",
        sixth.stderr
    );

    for (i, responder) in [(1, "stranger1"), (2, "stranger2")] {
        let replied = call(
            messaging,
            &As::member(responder),
            "inmail.messaging.v1.MessagingService/RespondToInmail",
            Some(&format!(
                r#"{{"request_id":"seed-reply-{i}","member_id":"{responder}","conversation_id":"sam~{responder}","response":"INMAIL_RESPONSE_REPLY","body":"Sure"}}"#
            )),
        );
        assert!(replied.ok, "{}", replied.stderr);
        assert_eq!(replied.json()["refundStatus"], "REFUND_STATUS_REFUNDED");
    }
    let balance = call(
        billing,
        &As::member("sam"),
        "inmail.billing.v1.BillingCreditsService/GetBalance",
        Some(r#"{"member_id":"sam"}"#),
    );
    assert!(balance.ok, "{}", balance.stderr);
    assert_eq!(balance.json()["balance"]["available"], "2");

    let invited = call(
        messaging,
        &As::member("sam"),
        "inmail.messaging.v1.MessagingService/SendInvitation",
        Some(
            r#"{"request_id":"seed-invite","member_id":"sam","invitee_id":"colleague","note":"We met at the fair"}"#,
        ),
    );
    assert!(invited.ok, "{}", invited.stderr);
    let received = call(
        messaging,
        &As::member("colleague"),
        "inmail.messaging.v1.MessagingService/ListInvitations",
        Some(r#"{"member_id":"colleague","direction":"INVITATION_DIRECTION_RECEIVED"}"#),
    );
    assert!(received.ok, "{}", received.stderr);
    assert_eq!(received.json()["invitations"][0]["inviterId"], "sam");
    assert_eq!(
        received.json()["invitations"][0]["note"],
        "We met at the fair"
    );
    let accepted = call(
        messaging,
        &As::member("colleague"),
        "inmail.messaging.v1.MessagingService/AcceptInvitation",
        Some(r#"{"request_id":"seed-accept","member_id":"colleague","inviter_id":"sam"}"#),
    );
    assert!(accepted.ok, "{}", accepted.stderr);
    let free = call(
        messaging,
        &As::member("sam"),
        "inmail.messaging.v1.MessagingService/SendMessage",
        Some(
            r#"{"request_id":"seed-free","sender_id":"sam","recipient_id":"colleague","body":"Lunch?"}"#,
        ),
    );
    assert!(free.ok, "{}", free.stderr);
    assert_eq!(free.json()["message"]["kind"], "MESSAGE_KIND_CONNECTION");
    assert_eq!(free.json()["senderBalanceAfter"], "2");

    let bad = call(
        messaging,
        &As::member("sam"),
        "inmail.messaging.v1.MessagingService/SendMessage",
        Some(r#"{"request_id":"seed-bad","sender_id":"sam","recipient_id":"sam","body":"me"}"#),
    );
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("InvalidArgument") && bad.stderr.contains("recipient_id"),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr.contains("google.rpc.BadRequest"),
        "details are readable: {}",
        bad.stderr
    );
}

/// Splits a shell line on spaces, keeping quoted parts ('...' or "...")
/// whole.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut current, mut quote) = (Vec::new(), String::new(), None);
    for c in line.chars() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            (' ', None) => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            (c, _) => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Every grpcurl example of README.md works verbatim (only the ports, the
/// PKI directory (also the CA copied out of compose) and the tokens differ:
/// the test's services listen on free ports with the test's PKI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grpcurl_examples_work_verbatim() {
    let stack = Stack::start().await;
    let readme = include_str!("../../../README.md");
    let examples: Vec<&str> = readme
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("grpcurl -cacert"))
        .collect();
    assert!(examples.len() >= 10, "README lost its grpcurl examples");
    let pki = inmail_tests::pki();
    let pki_dir = format!("{}/", pki.dir.display());
    for example in examples {
        let line = example
            .replace(".local/pki/", &pki_dir)
            .replace(".local/compose-ca.crt", &format!("{pki_dir}ca.crt"))
            .replace("$SAM", &pki.token("sam"))
            .replace("$RITA", &pki.token("rita"))
            .replace("localhost:50051", &stack.plans.addr.to_string())
            .replace("localhost:50052", &stack.billing.addr.to_string())
            .replace("localhost:50053", &stack.messaging.addr.to_string());
        let words = shell_words(&line);
        let args: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
        let output = run(&args);
        assert!(
            output.ok,
            "README example failed: {example}\n{}",
            output.stderr
        );
    }
}
