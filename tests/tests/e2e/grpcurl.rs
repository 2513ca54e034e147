//! The stack through the real grpcurl 1.8.6, as users call it: no .proto
//! files, only server reflection (v1alpha, the only one grpcurl 1.8 speaks).

use inmail_tests::Stack;
use inmail_tests::grpcurl::{call, run};

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
        let listed = run(&["-plaintext", &addr.to_string(), "list"]);
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
        let described = run(&["-plaintext", &addr.to_string(), "describe", service]);
        assert!(described.ok, "{}", described.stderr);
        assert!(described.stdout.contains("rpc "), "{}", described.stdout);
        let health = call(addr, "grpc.health.v1.Health/Check", Some("{}"));
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
        "inmail.billing.v1.BillingCreditsService/GetBalance",
        Some(r#"{"member_id":"sam"}"#),
    );
    assert!(balance.ok, "{}", balance.stderr);
    assert_eq!(balance.json()["balance"]["available"], "2");

    let connected = call(
        messaging,
        "inmail.messaging.v1.MessagingService/AddConnection",
        Some(r#"{"request_id":"seed-conn","member_id":"sam","other_member_id":"colleague"}"#),
    );
    assert!(connected.ok, "{}", connected.stderr);
    let free = call(
        messaging,
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

/// Splits a shell line on spaces, keeping single-quoted parts whole.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut current, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Every grpcurl example of README.md works verbatim (only the ports differ:
/// the test's services listen on free ports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grpcurl_examples_work_verbatim() {
    let stack = Stack::start().await;
    let readme = include_str!("../../../README.md");
    let examples: Vec<&str> = readme
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("grpcurl -plaintext"))
        .collect();
    assert!(examples.len() >= 10, "README lost its grpcurl examples");
    for example in examples {
        let line = example
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
