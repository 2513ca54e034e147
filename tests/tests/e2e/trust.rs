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
