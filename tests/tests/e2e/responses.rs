//! Responses to one InMail racing each other, and duplicates of one request
//! racing each other (issue 9.5 and 9.11): exactly one response wins, and
//! every duplicate of a request gets the one first outcome. Each test failed
//! on the code before its fix.

use std::collections::HashSet;

use inmail_shared::contract::proto::billing::v1::LedgerEntryKind as Entry;
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::messaging::v1::{InmailResponse, RefundStatus};
use inmail_tests::{As, MessagingClient, Stack, messaging_at, rid};

use crate::common::*;

fn respond_request(
    member: &str,
    conv: &str,
    response: InmailResponse,
    body: &str,
) -> pb::RespondToInmailRequest {
    pb::RespondToInmailRequest {
        request_id: rid(),
        member_id: member.into(),
        conversation_id: conv.into(),
        response: response as i32,
        body: body.into(),
    }
}

async fn messages(stack: &Stack, member: &str, conv: &str) -> Vec<pb::Message> {
    stack
        .messaging_as(member)
        .list_messages(pb::ListMessagesRequest {
            member_id: member.into(),
            conversation_id: conv.into(),
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages
}

/// What an answer to RespondToInmail says, to compare answers.
fn gist(answer: &Result<pb::RespondToInmailResponse, tonic::Status>) -> String {
    match answer {
        Ok(r) => format!(
            "OK reply={:?} refund={} inmail={:?}",
            r.reply.as_ref().map(|m| m.message_id.clone()),
            r.refund_status,
            r.conversation
                .as_ref()
                .and_then(|c| c.inmail.as_ref())
                .map(|i| (i.state, i.refund_status)),
        ),
        Err(s) => format!("{:?} {}", s.code(), reason(s)),
    }
}

async fn race(
    clients: Vec<MessagingClient>,
    requests: Vec<pb::RespondToInmailRequest>,
) -> Vec<Result<pb::RespondToInmailResponse, tonic::Status>> {
    let calls = requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            let mut client = clients[i % clients.len()].clone();
            async move {
                client
                    .respond_to_inmail(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .collect();
    inmail_tests::race(calls, 3).await
}

/// 30 concurrent REPLY responses to one InMail, each with its own body: one
/// reply is stored and answered OK, the credit comes back once, and the 29
/// other bodies are refused NO_INMAIL_AWAITING_RESPONSE (they were all
/// answered OK while only one body was stored; issue 19.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_concurrent_replies_store_one_and_refuse_the_other_bodies() {
    let stack = Stack::start().await;
    subscribe(&stack, "ada", "premium-career").await;
    send(&stack, "ada", "bo").await.unwrap();
    let requests = (0..30)
        .map(|i| respond_request("bo", "ada~bo", InmailResponse::Reply, &format!("reply {i}")))
        .collect();
    let answers = race(vec![stack.messaging_as("bo")], requests).await;
    let accepted: Vec<&pb::RespondToInmailResponse> =
        answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    assert_eq!(
        accepted.len(),
        1,
        "one body wins: {:?}",
        answers.iter().map(gist).collect::<HashSet<_>>()
    );
    let refused = format!(
        "{:?} NO_INMAIL_AWAITING_RESPONSE",
        tonic::Code::FailedPrecondition
    );
    for answer in answers.iter().filter(|a| a.is_err()) {
        assert_eq!(gist(answer), refused);
    }
    let winner = accepted[0];
    assert_eq!(winner.refund_status, RefundStatus::Refunded as i32);
    let reply = winner.reply.as_ref().unwrap();
    let stored = messages(&stack, "ada", "ada~bo").await;
    assert_eq!(
        stored.len(),
        2,
        "the InMail and exactly one reply: {stored:?}"
    );
    let stored_reply = stored
        .iter()
        .find(|m| m.message_id == reply.message_id)
        .expect("the answered reply is stored");
    assert_eq!(
        stored_reply.body, reply.body,
        "the answered body is the stored one"
    );
    // The same body again answers the recorded reply; another is refused.
    let again = respond(&stack, "bo", "ada~bo", InmailResponse::Reply, &reply.body)
        .await
        .unwrap();
    assert_eq!(again.reply.unwrap().message_id, reply.message_id);
    let other = respond(
        &stack,
        "bo",
        "ada~bo",
        InmailResponse::Reply,
        "something else",
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&other), "NO_INMAIL_AWAITING_RESPONSE", "{other:?}");
    assert_eq!(messages(&stack, "ada", "ada~bo").await.len(), 2);
    assert_eq!(available(&stack, "ada").await, 5, "refunded once");
    assert_eq!(count_kind(&ledger(&stack, "ada").await, Entry::Refund), 1);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// ACCEPT and REPLY racing on one InMail: one response wins; the same kind
/// answers that response, the other kind is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accept_and_reply_racing_leave_one_response() {
    let stack = Stack::start().await;
    subscribe(&stack, "cy", "premium-career").await;
    send(&stack, "cy", "di").await.unwrap();
    let requests = (0..30)
        .map(|i| {
            if i % 2 == 0 {
                respond_request("di", "cy~di", InmailResponse::Accept, "")
            } else {
                respond_request("di", "cy~di", InmailResponse::Reply, "sure")
            }
        })
        .collect();
    let answers = race(vec![stack.messaging_as("di")], requests).await;
    let accepted: HashSet<String> = answers.iter().step_by(2).map(gist).collect();
    let replied: HashSet<String> = answers.iter().skip(1).step_by(2).map(gist).collect();
    assert_eq!(accepted.len(), 1, "accept answers disagree: {accepted:?}");
    assert_eq!(replied.len(), 1, "reply answers disagree: {replied:?}");
    let refused = format!(
        "{:?} NO_INMAIL_AWAITING_RESPONSE",
        tonic::Code::FailedPrecondition
    );
    let accept_won = replied.contains(&refused);
    let reply_won = accepted.contains(&refused);
    assert!(
        accept_won != reply_won,
        "exactly one kind wins: {accepted:?} {replied:?}"
    );
    let stored = messages(&stack, "cy", "cy~di").await;
    assert_eq!(stored.len(), if reply_won { 2 } else { 1 });
    assert_eq!(available(&stack, "cy").await, 5, "refunded once");
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// Accepting again with a new request id answers the recorded response;
/// declining after it is refused (the rule of the proto).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_concurrent_accepts_with_new_request_ids_agree() {
    let stack = Stack::start().await;
    subscribe(&stack, "ed", "premium-career").await;
    send(&stack, "ed", "flo").await.unwrap();
    let requests = (0..30)
        .map(|_| respond_request("flo", "ed~flo", InmailResponse::Accept, ""))
        .collect();
    let answers = race(vec![stack.messaging_as("flo")], requests).await;
    let kinds: HashSet<String> = answers.iter().map(gist).collect();
    assert_eq!(kinds.len(), 1, "the answers disagree: {kinds:?}");
    assert_eq!(
        answers[0].as_ref().unwrap().refund_status,
        RefundStatus::Refunded as i32
    );
    assert_eq!(available(&stack, "ed").await, 5);
}

/// The same request (same request_id) 30 times at once, split over two
/// messaging replicas: every duplicate gets the one first outcome, for
/// ACCEPT, DECLINE, REPLY and an InMail send.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_of_one_request_over_two_replicas_get_the_first_outcome() {
    let stack = Stack::start().await;
    let replica = stack.messaging_replica().await;
    let both = |member: &str| {
        vec![
            stack.messaging_as(member),
            messaging_at(replica.addr, &As::member(member)),
        ]
    };
    for (n, response) in [
        (0, InmailResponse::Accept),
        (1, InmailResponse::Decline),
        (2, InmailResponse::Reply),
    ] {
        let (sender, recipient) = (format!("gil{n}"), format!("hu{n}"));
        let conv = format!("{sender}~{recipient}");
        subscribe(&stack, &sender, "premium-career").await;
        send(&stack, &sender, &recipient).await.unwrap();
        let body = if response == InmailResponse::Reply {
            "ok"
        } else {
            ""
        };
        let request = respond_request(&recipient, &conv, response, body);
        let answers = race(both(&recipient), vec![request; 30]).await;
        let kinds: HashSet<String> = answers.iter().map(gist).collect();
        assert_eq!(
            kinds.len(),
            1,
            "{response:?}: the duplicates disagree: {kinds:?}"
        );
        assert!(answers[0].is_ok(), "{response:?}: {kinds:?}");
        assert_eq!(
            available(&stack, &sender).await,
            5,
            "{response:?}: refunded once"
        );
    }
    // An InMail send, the same request 30 times over both replicas.
    subscribe(&stack, "ivy", "premium-career").await;
    let request = send_request("ivy", "jon", "Hello", "Same request, thirty times");
    let clients = both("ivy");
    let mut calls = Vec::new();
    for i in 0..30 {
        let mut client = clients[i % 2].clone();
        let request = request.clone();
        calls.push(tokio::spawn(async move {
            client
                .send_message(request)
                .await
                .map(tonic::Response::into_inner)
        }));
    }
    let mut answers = HashSet::new();
    for call in calls {
        let answer = call.await.unwrap();
        answers.insert(match answer {
            Ok(r) => format!(
                "OK {:?} charged={} balance={:?}",
                r.message.map(|m| m.message_id),
                r.credits_charged,
                r.sender_balance_after
            ),
            Err(s) => format!("{:?} {}", s.code(), reason(&s)),
        });
    }
    assert_eq!(answers.len(), 1, "the duplicates disagree: {answers:?}");
    assert_eq!(available(&stack, "ivy").await, 4, "charged once");
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}
