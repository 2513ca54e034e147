//! Who the services trust: each checks the SPIFFE id of the service it
//! calls, certificates naming only their SPIFFE id work, member tokens are
//! checked for every claim that bounds them, and the development PKI is
//! readable by standard tools.

use std::sync::Arc;
use std::time::Duration;

use inmail_tests::{As, Stack, StackOptions, messaging_at};
use tonic::Code;

use crate::common::*;

/// Messaging pointed at a billing-credits that serves another identity's
/// certificate of our CA (a service's, the operator's) refuses it: the send
/// fails UNAVAILABLE and nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messaging_refuses_a_billing_credits_serving_another_identity() {
    for impostor in ["messaging", "operator"] {
        let stack = Stack::start().await;
        subscribe(&stack, "sam", "premium-career").await;
        let before = available(&stack, "sam").await;
        let mut fake_billing = stack.billing_with_certificate(impostor).await;
        // Give it time to serve: on a build that does not check, the send
        // below must go through it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut messaging = stack.messaging_calling_billing_at(fake_billing.addr).await;
        let refused = messaging_at(messaging.addr, &As::member("sam"))
            .send_message(send_request("sam", "stranger1", "Hello", "Hi"))
            .await
            .expect_err("messaging charged through a billing that is not billing-credits");
        assert_eq!(refused.code(), Code::Unavailable, "{impostor}: {refused:?}");
        assert_eq!(reason(&refused), "BILLING_UNAVAILABLE", "{refused:?}");
        // Members learn that billing could not be reached, not the TLS
        // error with the peer's names.
        assert!(
            !refused.message().contains("spiffe://") && !refused.message().contains("certificate"),
            "{refused:?}"
        );
        assert_eq!(
            available(&stack, "sam").await,
            before,
            "{impostor}: charged"
        );
        messaging.stop().await;
        fake_billing.stop().await;
        stack.stop().await;
    }
}

/// Service certificates that carry only their SPIFFE id (no DNS name, no
/// address; README's advice for production): the whole stack works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_whose_certificates_name_only_spiffe_ids_works_end_to_end() {
    let stack = Stack::start_with(StackOptions {
        certificate_of: Some(Arc::new(|service| format!("{service}-uri-only"))),
        ..Default::default()
    })
    .await;
    subscribe(&stack, "sam", "premium-career").await;
    let before = available(&stack, "sam").await;
    let sent = send(&stack, "sam", "stranger1")
        .await
        .expect("an InMail through billing and subscription-plan");
    assert_eq!(sent.credits_charged, 1);
    assert_eq!(available(&stack, "sam").await, before - 1);
    stack.stop().await;
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with exactly these claims, signed with the development key
/// (`kid` in the header when given).
fn signed(claims: serde_json::Value, kid: Option<&str>) -> String {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(
        inmail_tests::pki().pki.signing.private_pem.as_bytes(),
    )
    .unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// sam's claims, issued now and valid for `ttl_s`, with `extra` merged in.
fn claims(ttl_s: u64, extra: serde_json::Value) -> serde_json::Value {
    let now = now_s();
    let mut claims = serde_json::json!({
        "sub": "sam", "iss": "inmail", "aud": "inmail", "iat": now, "exp": now + ttl_s,
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

/// sam reads their balance on `addr`'s billing-credits with `token`.
async fn balance_with(addr: std::net::SocketAddr, token: &str) -> Result<(), tonic::Status> {
    inmail_tests::billing_at(addr, &As::Header(format!("Bearer {token}")))
        .get_balance(
            inmail_shared::contract::proto::billing::v1::GetBalanceRequest {
                member_id: "sam".into(),
            },
        )
        .await
        .map(|_| ())
}

fn assert_refused(answer: Result<(), tonic::Status>, says: &str) {
    let refused = answer.expect_err("the token was accepted");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains(says), "{says:?}: {refused:?}");
}

/// `nbf` is honoured: a token not valid yet is UNAUTHENTICATED (the 30 s
/// leeway aside), one whose `nbf` has passed is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_valid_yet_is_unauthenticated() {
    let stack = Stack::start().await;
    let later = signed(
        claims(7200, serde_json::json!({ "nbf": now_s() + 3600 })),
        Some("dev-1"),
    );
    assert_refused(
        balance_with(stack.billing.addr, &later).await,
        "not valid yet",
    );
    let passed = signed(
        claims(7200, serde_json::json!({ "nbf": now_s() - 10 })),
        Some("dev-1"),
    );
    balance_with(stack.billing.addr, &passed).await.unwrap();
    stack.stop().await;
}

/// A token valid for longer than JWT_MAX_LIFETIME (24 h unless set) is
/// refused, measured from `iat`, or from now without `iat`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_valid_longer_than_the_maximum_lifetime_is_refused() {
    let stack = Stack::start_with(StackOptions {
        plans_args: vec!["--jwt-max-lifetime".into(), "2h".into()],
        ..Default::default()
    })
    .await;
    let hour = 3600;
    let two_days = signed(claims(48 * hour, serde_json::json!({})), Some("dev-1"));
    assert_refused(
        balance_with(stack.billing.addr, &two_days).await,
        "longer than",
    );
    let no_iat = signed(
        claims(25 * hour, serde_json::json!({ "iat": null })),
        Some("dev-1"),
    );
    assert_refused(
        balance_with(stack.billing.addr, &no_iat).await,
        "longer than",
    );
    let day = signed(claims(23 * hour, serde_json::json!({})), Some("dev-1"));
    balance_with(stack.billing.addr, &day).await.unwrap();

    // subscription-plan runs with JWT_MAX_LIFETIME=2h.
    let plans = |token: &str| {
        let mut client =
            inmail_tests::plans_at(stack.plans.addr, &As::Header(format!("Bearer {token}")));
        async move {
            client
                .get_subscription(
                    inmail_shared::contract::proto::plans::v1::GetSubscriptionRequest {
                        member_id: "sam".into(),
                    },
                )
                .await
        }
    };
    let refused = plans(&day)
        .await
        .expect_err("a 23 h token under a 2 h maximum");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let hour_token = signed(claims(hour, serde_json::json!({})), Some("dev-1"));
    let answer = plans(&hour_token).await;
    assert_ne!(
        answer.as_ref().map_err(tonic::Status::code).err(),
        Some(Code::Unauthenticated),
        "{answer:?}"
    );
    stack.stop().await;
}

/// With several keys in the JWK set a token must name its key: without a
/// `kid` it is refused (not tried against every key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_kid_is_refused_when_the_key_set_holds_several_keys() {
    let stack = Stack::start_with(StackOptions {
        jwks_file: Some("jwks-two-keys.json"),
        ..Default::default()
    })
    .await;
    let unnamed = signed(claims(3600, serde_json::json!({})), None);
    assert_refused(balance_with(stack.billing.addr, &unnamed).await, "kid");
    let named = signed(claims(3600, serde_json::json!({})), Some("dev-1"));
    balance_with(stack.billing.addr, &named).await.unwrap();
    stack.stop().await;
}

/// A refused token is explained in plain words, never with the JWT or JSON
/// library's error text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_errors_say_what_is_wrong_in_plain_words() {
    use base64::Engine;
    let stack = Stack::start().await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let header = b64(r#"{"alg":"EdDSA","typ":"JWT","kid":"dev-1"}"#);
    let key = jsonwebtoken::EncodingKey::from_ed_pem(
        inmail_tests::pki().pki.signing.private_pem.as_bytes(),
    )
    .unwrap();
    // Signed, but its claims are not JSON.
    let payload = format!("{header}.{}", b64("not json"));
    let signature =
        jsonwebtoken::crypto::sign(payload.as_bytes(), &key, jsonwebtoken::Algorithm::EdDSA)
            .unwrap();
    let good = signed(claims(3600, serde_json::json!({})), Some("dev-1"));
    let (good_payload, _) = good.rsplit_once('.').unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("abc".into(), "not a JWT"),
        ("a.b.c".into(), "not a JWT"),
        (format!("{payload}.{signature}"), "malformed"),
        (format!("{good_payload}.{}", b64("forged")), "signature"),
        (
            signed(
                claims(3600, serde_json::json!({ "exp": "tomorrow" })),
                Some("dev-1"),
            ),
            "exp claim is missing or malformed",
        ),
        (
            signed(
                claims(3600, serde_json::json!({ "sub": null })),
                Some("dev-1"),
            ),
            "sub claim is missing or malformed",
        ),
        (
            signed(
                claims(3600, serde_json::json!({ "aud": "elsewhere" })),
                Some("dev-1"),
            ),
            "audience",
        ),
        (
            signed(
                claims(3600, serde_json::json!({ "exp": now_s() - 3600 })),
                Some("dev-1"),
            ),
            "expired",
        ),
        (
            signed(claims(3600, serde_json::json!({ "sub": 7 })), Some("dev-1")),
            "sub",
        ),
        (
            signed(claims(3600, serde_json::json!({})), Some("nobody")),
            "kid",
        ),
    ];
    for (token, says) in cases {
        let refused = balance_with(stack.billing.addr, &token)
            .await
            .expect_err("a bad token was accepted");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        let message = refused.message();
        assert!(message.contains(says), "{says:?}: {message}");
        for internal in [
            "InvalidToken",
            "Base64",
            "Json",
            "JSON",
            "serde",
            "line ",
            "column",
            "ErrorKind",
            "invalid type",
            "expected value",
        ] {
            assert!(!message.contains(internal), "{internal:?} leaks: {message}");
        }
    }
    stack.stop().await;
}

/// A downstream that cannot be reached (here: it serves a certificate of
/// another CA) is UNAVAILABLE with a reason; the TLS error, which names
/// certificates, stays in messaging's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_learn_billing_is_unreachable_not_the_tls_error() {
    let stack = Stack::start().await;
    subscribe(&stack, "sam", "premium-career").await;
    let before = available(&stack, "sam").await;
    let mut foreign = stack
        .billing_with_certificate("foreign-billing-credits")
        .await;
    let mut messaging = stack.messaging_calling_billing_at(foreign.addr).await;
    let refused = messaging_at(messaging.addr, &As::member("sam"))
        .send_message(send_request("sam", "stranger1", "Hello", "Hi"))
        .await
        .expect_err("sent through a billing of another CA");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused), "BILLING_UNAVAILABLE", "{refused:?}");
    for internal in [
        "certificate",
        "UnknownIssuer",
        "tls",
        "TLS",
        "transport",
        "spiffe",
    ] {
        assert!(
            !refused.message().contains(internal),
            "{internal:?} leaks: {}",
            refused.message()
        );
    }
    assert_eq!(available(&stack, "sam").await, before);
    messaging.stop().await;
    foreign.stop().await;
    stack.stop().await;
}

/// A request body that is not the method's message is the caller's
/// mistake: INVALID_ARGUMENT, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_is_invalid_argument() {
    let stack = Stack::start().await;
    // Field 1, length-delimited, claims 5 bytes and carries one.
    let truncated = [0x0a, 0x05, 0x01];
    for (addr, who, path) in [
        (
            stack.plans.addr,
            As::Anonymous,
            "/inmail.plans.v1.SubscriptionPlanService/ListPlans",
        ),
        (
            stack.billing.addr,
            As::member("sam"),
            "/inmail.billing.v1.BillingCreditsService/GetBalance",
        ),
    ] {
        let refused = crate::access::call(addr, &who, path, &truncated)
            .await
            .expect_err("a malformed request was served");
        assert_eq!(refused.code(), Code::InvalidArgument, "{path}: {refused:?}");
        assert!(!refused.message().contains("Protobuf"), "{refused:?}");
    }
    stack.stop().await;
}

/// The `sh` block of README.md that follows the line containing `marker`.
fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let after = &readme[readme.find(marker).expect("the README marker")..];
    let start = after.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = start + after[start..].find("```").expect("the end of the block");
    after[start..end].to_string()
}

/// The development token key is one standard tools read (PKCS#8 v1:
/// `openssl pkey`, Python's `cryptography`), and a token minted with
/// openssl alone, as README shows, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_token_key_works_with_standard_tools() {
    let pki = inmail_tests::pki();
    let key = pki.file("jwt-signing.pem");
    let read = std::process::Command::new("openssl")
        .args(["pkey", "-in", &key, "-noout"])
        .output()
        .expect("run openssl");
    assert!(
        read.status.success(),
        "openssl pkey cannot read the key: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    let python = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys\n\
             try:\n    from cryptography.hazmat.primitives.serialization import load_pem_private_key\n\
             except ImportError:\n    sys.exit(3)\n\
             load_pem_private_key(open(sys.argv[1], 'rb').read(), None)",
            &key,
        ])
        .output()
        .expect("run python3");
    match python.status.code() {
        Some(0) => {}
        Some(3) => eprintln!("python3 has no `cryptography`: not checked with it"),
        _ => panic!(
            "Python's cryptography cannot read the key: {}",
            String::from_utf8_lossy(&python.stderr)
        ),
    }

    let script = readme_block("or with openssl alone")
        .replace(".local/pki/", &format!("{}/", pki.dir.to_string_lossy()));
    let minted = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("set -e\n{script}\nprintf '%s' \"$SAM\""))
        .output()
        .expect("run sh");
    assert!(
        minted.status.success(),
        "README's openssl recipe failed: {}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap();
    let stack = Stack::start().await;
    balance_with(stack.billing.addr, &token)
        .await
        .unwrap_or_else(|s| panic!("README's token {token:?} was refused: {s:?}"));
    stack.stop().await;
}

/// A certificate from another CA never identifies anyone (README, "Who may
/// call what"): a client that presents it anyway (rustls) has the handshake
/// refused; grpcurl (Go) presents only a certificate of the CAs the server
/// names, so it sends none and calls anonymously: open methods answer,
/// the rest are UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_identifies_nobody() {
    use inmail_tests::grpcurl::run;
    let stack = Stack::start().await;
    let pki = inmail_tests::pki();
    let foreign = |method: &str, data: &str| {
        run(&[
            "-cacert".to_string(),
            pki.file("ca.crt"),
            "-cert".into(),
            pki.file("foreign-billing-credits.crt"),
            "-key".into(),
            pki.file("foreign-billing-credits.key"),
            "-d".into(),
            data.into(),
            stack.billing.addr.to_string(),
            method.into(),
        ])
    };
    let refused = foreign(
        "inmail.billing.v1.BillingCreditsService/GetBalance",
        r#"{"member_id":"sam"}"#,
    );
    assert!(!refused.ok, "{refused:?}");
    assert!(
        refused.stderr.contains("Unauthenticated") && refused.stderr.contains("needs credentials"),
        "{refused:?}"
    );
    let open = foreign("grpc.health.v1.Health/Check", "{}");
    assert!(open.ok, "{open:?}");

    let presented = inmail_tests::billing_at(
        stack.billing.addr,
        &As::Certificate(inmail_tests::identity::foreign_certificate(
            "billing-credits",
        )),
    )
    .get_balance(
        inmail_shared::contract::proto::billing::v1::GetBalanceRequest {
            member_id: "sam".into(),
        },
    )
    .await
    .expect_err("a certificate of another CA was accepted");
    assert!(
        matches!(
            presented.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "the handshake was not refused: {presented:?}"
    );
    stack.stop().await;
}

/// One HTTP GET; the whole answer (status line, headers, body).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Metrics are plain HTTP without authentication: METRICS_ADDR beyond
/// loopback is refused at start unless METRICS_ALLOW_REMOTE=true, and only
/// `GET /metrics` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_on_loopback_and_answer_only_on_metrics() {
    use inmail_tests::processes::{ProcessStack, binary};
    use inmail_tests::redis_server::free_port;

    let mut started = std::process::Command::new(binary("subscription-plan"))
        .env_clear()
        .env("LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("METRICS_ADDR", format!("0.0.0.0:{}", free_port()))
        .envs(inmail_tests::pki().service_env("subscription-plan"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run subscription-plan");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while started.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = started.try_wait().unwrap().is_some();
    if !exited {
        let _ = started.kill();
    }
    let refused = started.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(exited, "it started with METRICS_ADDR beyond loopback");
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("METRICS_ADDR") && stderr.contains("METRICS_ALLOW_REMOTE"),
        "{stderr}"
    );

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let (plans_port, billing_port) = (ports[0], ports[1]);
    let stack = ProcessStack::start(move |name| match name {
        // Beyond loopback, allowed by name; scraped through loopback.
        "subscription-plan" => vec![
            ("METRICS_ADDR".into(), format!("0.0.0.0:{plans_port}")),
            ("METRICS_ALLOW_REMOTE".into(), "true".into()),
        ],
        "billing-credits" => vec![("METRICS_ADDR".into(), format!("127.0.0.1:{billing_port}"))],
        _ => vec![],
    })
    .await;
    for port in [plans_port, billing_port] {
        let addr = format!("127.0.0.1:{port}");
        let metrics = http_get(&addr, "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        for path in ["/", "/favicon.ico", "/metrics/../debug", "/metricsx"] {
            let other = http_get(&addr, path);
            assert!(other.starts_with("HTTP/1.1 404"), "{path}: {other}");
        }
    }
    drop(stack);
}
