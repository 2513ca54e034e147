//! The authorization matrix (issue 10): every RPC of every service, called
//! with no credentials, with a valid token of another member, with the
//! certificate of a service the table does not admit, with a certificate
//! from another CA, and as the right caller. The refused calls change
//! nothing in Redis (DEBUG DIGEST).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::messaging::v1 as msg;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_shared::contract::proto::testclock::v1 as clock;
use inmail_shared::runtime::auth::access::{Table, Who};
use inmail_tests::identity::foreign_certificate;
use inmail_tests::{As, Stack, channel_as, rid};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::common::*;

/// Passes encoded messages through as they are.
#[derive(Debug, Clone, Default)]
struct Raw;

#[derive(Debug, Clone, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Default)]
struct RawDecoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

pub(crate) async fn call(
    addr: SocketAddr,
    who: &As,
    path: &'static str,
    body: &[u8],
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel_as(addr, who));
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body.to_vec());
    request.set_timeout(Duration::from_secs(10));
    if path
        .rsplit('/')
        .next()
        .is_some_and(|m| m.starts_with("Watch"))
    {
        // A watch is admitted when its stream is answered (a refusal is a
        // status instead); its frames are not waited for.
        return grpc
            .server_streaming(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                Raw,
            )
            .await
            .map(|_| ());
    }
    grpc.unary(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|_| ())
}

#[derive(Clone, Copy)]
enum Port {
    Plans,
    Billing,
    Messaging,
}

struct Case {
    path: &'static str,
    port: Port,
    table: Table,
    right: As,
    body: Vec<u8>,
}

fn case(path: &'static str, port: Port, table: Table, right: As, body: impl Message) -> Case {
    Case {
        path,
        port,
        table,
        right,
        body: body.encode_to_vec(),
    }
}

fn admits(table: Table, path: &str) -> &'static [Who] {
    table
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, who)| *who)
        .unwrap_or_else(|| panic!("{path} is in no access table"))
}

fn cases() -> Vec<Case> {
    use Port::*;
    const P: Table = subscription_plan::grpc::ACCESS;
    const B: Table = billing_credits::grpc::ACCESS;
    const M: Table = messaging::grpc::ACCESS;
    const C: Table = inmail_shared::runtime::auth::access::TEST_CLOCK;
    let nia = || As::member("nia");
    let sam = || As::member("sam");
    let messaging = || As::Service("messaging");
    vec![
        case(
            "/inmail.plans.v1.SubscriptionPlanService/ListPlans",
            Plans,
            P,
            As::Anonymous,
            plans::ListPlansRequest::default(),
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/GetPlan",
            Plans,
            P,
            As::Anonymous,
            plans::GetPlanRequest {
                plan_id: "premium-career".into(),
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/Subscribe",
            Plans,
            P,
            nia(),
            plans::SubscribeRequest {
                request_id: rid(),
                member_id: "nia".into(),
                plan_id: "premium-career".into(),
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/GetSubscription",
            Plans,
            P,
            nia(),
            plans::GetSubscriptionRequest {
                member_id: "nia".into(),
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/ChangePlan",
            Plans,
            P,
            nia(),
            plans::ChangePlanRequest {
                request_id: rid(),
                member_id: "nia".into(),
                plan_id: "recruiter-lite".into(),
                timing: plans::ChangeTiming::EndOfCycle as i32,
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/ClearScheduledChange",
            Plans,
            P,
            nia(),
            plans::ClearScheduledChangeRequest {
                request_id: rid(),
                member_id: "nia".into(),
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/SetOpenProfile",
            Plans,
            P,
            nia(),
            plans::SetOpenProfileRequest {
                request_id: rid(),
                member_id: "nia".into(),
                enabled: true,
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/CancelSubscription",
            Plans,
            P,
            nia(),
            plans::CancelSubscriptionRequest {
                request_id: rid(),
                member_id: "nia".into(),
                timing: plans::ChangeTiming::EndOfCycle as i32,
            },
        ),
        case(
            "/inmail.plans.v1.SubscriptionPlanService/GetEntitlement",
            Plans,
            P,
            As::Service("billing-credits"),
            plans::GetEntitlementRequest {
                member_id: "nia".into(),
                after_version: 0,
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/GetBalance",
            Billing,
            B,
            sam(),
            billing::GetBalanceRequest {
                member_id: "sam".into(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/DebitForMessage",
            Billing,
            B,
            messaging(),
            billing::DebitForMessageRequest {
                request_id: rid(),
                member_id: "sam".into(),
                message_id: "mx-1".into(),
                amount: 1,
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/ConfirmDebit",
            Billing,
            B,
            messaging(),
            billing::ConfirmDebitRequest {
                request_id: rid(),
                member_id: "sam".into(),
                message_id: "mx-1".into(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/RefundMessage",
            Billing,
            B,
            messaging(),
            billing::RefundMessageRequest {
                request_id: rid(),
                member_id: "sam".into(),
                message_id: "mx-1".into(),
                responded_at: None,
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/ReleaseDebit",
            Billing,
            B,
            messaging(),
            billing::ReleaseDebitRequest {
                request_id: rid(),
                member_id: "sam".into(),
                message_id: "mx-2".into(),
                reason: billing::ReleaseReason::Abandoned as i32,
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/GetDebit",
            Billing,
            B,
            messaging(),
            billing::GetDebitRequest {
                member_id: "sam".into(),
                message_id: "mx-1".into(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/GrantCredits",
            Billing,
            B,
            As::Operator,
            billing::GrantCreditsRequest {
                request_id: rid(),
                member_id: "sam".into(),
                amount: 1,
                reason: "support".into(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/SetLowBalanceAlert",
            Billing,
            B,
            sam(),
            billing::SetLowBalanceAlertRequest {
                request_id: rid(),
                member_id: "sam".into(),
                threshold: 1,
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/WatchLedger",
            Billing,
            B,
            As::Operator,
            billing::WatchLedgerRequest::default(),
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/ExportLedger",
            Billing,
            B,
            As::Operator,
            billing::ExportLedgerRequest {
                start_time: Some(prost_types::Timestamp::default()),
                end_time: None,
                member_id: "sam".into(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/WatchBalance",
            Billing,
            B,
            sam(),
            billing::WatchBalanceRequest {
                member_id: "sam".into(),
                resume_token: String::new(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/ListLedgerEntries",
            Billing,
            B,
            sam(),
            billing::ListLedgerEntriesRequest {
                member_id: "sam".into(),
                page_size: 0,
                page_token: String::new(),
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/GetBalanceHistory",
            Billing,
            B,
            sam(),
            billing::GetBalanceHistoryRequest {
                member_id: "sam".into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ),
        case(
            "/inmail.billing.v1.BillingCreditsService/ReconcileLedgers",
            Billing,
            B,
            As::Operator,
            billing::ReconcileLedgersRequest::default(),
        ),
        case(
            "/inmail.messaging.v1.MessagingService/SendInvitation",
            Messaging,
            M,
            sam(),
            msg::SendInvitationRequest {
                request_id: rid(),
                member_id: "sam".into(),
                invitee_id: "ina".into(),
                note: "Met at the fair".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/ListInvitations",
            Messaging,
            M,
            sam(),
            msg::ListInvitationsRequest {
                member_id: "sam".into(),
                direction: msg::InvitationDirection::Received as i32,
                ..Default::default()
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/WithdrawInvitation",
            Messaging,
            M,
            sam(),
            msg::WithdrawInvitationRequest {
                request_id: rid(),
                member_id: "sam".into(),
                invitee_id: "ina".into(),
            },
        ),
        // The invitations from ivo and ira are sent before the matrix runs.
        case(
            "/inmail.messaging.v1.MessagingService/AcceptInvitation",
            Messaging,
            M,
            sam(),
            msg::AcceptInvitationRequest {
                request_id: rid(),
                member_id: "sam".into(),
                inviter_id: "ivo".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/IgnoreInvitation",
            Messaging,
            M,
            sam(),
            msg::IgnoreInvitationRequest {
                request_id: rid(),
                member_id: "sam".into(),
                inviter_id: "ira".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/AddConnection",
            Messaging,
            M,
            As::Operator,
            msg::AddConnectionRequest {
                request_id: rid(),
                member_id: "sam".into(),
                other_member_id: "con".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/ListConnections",
            Messaging,
            M,
            sam(),
            msg::ListConnectionsRequest {
                member_id: "sam".into(),
                ..Default::default()
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/RemoveConnection",
            Messaging,
            M,
            sam(),
            msg::RemoveConnectionRequest {
                request_id: rid(),
                member_id: "sam".into(),
                other_member_id: "con".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/BlockMember",
            Messaging,
            M,
            sam(),
            msg::BlockMemberRequest {
                request_id: rid(),
                member_id: "sam".into(),
                blocked_member_id: "eve".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/ListBlockedMembers",
            Messaging,
            M,
            sam(),
            msg::ListBlockedMembersRequest {
                member_id: "sam".into(),
                ..Default::default()
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/UnblockMember",
            Messaging,
            M,
            sam(),
            msg::UnblockMemberRequest {
                request_id: rid(),
                member_id: "sam".into(),
                blocked_member_id: "eve".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/SetInmailPreference",
            Messaging,
            M,
            sam(),
            msg::SetInmailPreferenceRequest {
                request_id: rid(),
                member_id: "sam".into(),
                accept_inmail: true,
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/GetInmailPreference",
            Messaging,
            M,
            sam(),
            msg::GetInmailPreferenceRequest {
                member_id: "sam".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/SendMessage",
            Messaging,
            M,
            sam(),
            msg::SendMessageRequest {
                request_id: rid(),
                sender_id: "sam".into(),
                recipient_id: "rita".into(),
                subject: "Hi".into(),
                body: "Hello".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/RespondToInmail",
            Messaging,
            M,
            As::member("rita"),
            msg::RespondToInmailRequest {
                request_id: rid(),
                member_id: "rita".into(),
                conversation_id: "rita~sam".into(),
                response: msg::InmailResponse::Reply as i32,
                body: "Sure".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/ListConversations",
            Messaging,
            M,
            sam(),
            msg::ListConversationsRequest {
                member_id: "sam".into(),
                ..Default::default()
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/GetConversation",
            Messaging,
            M,
            sam(),
            msg::GetConversationRequest {
                member_id: "sam".into(),
                conversation_id: "rita~sam".into(),
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/ListMessages",
            Messaging,
            M,
            sam(),
            msg::ListMessagesRequest {
                member_id: "sam".into(),
                conversation_id: "rita~sam".into(),
                ..Default::default()
            },
        ),
        case(
            "/inmail.messaging.v1.MessagingService/WatchInbox",
            Messaging,
            M,
            sam(),
            msg::WatchInboxRequest {
                member_id: "sam".into(),
                resume_token: String::new(),
            },
        ),
        case(
            "/inmail.testclock.v1.TestClockService/GetTime",
            Messaging,
            C,
            As::Operator,
            clock::GetTimeRequest {},
        ),
        case(
            "/inmail.testclock.v1.TestClockService/AdvanceTime",
            Messaging,
            C,
            As::Operator,
            clock::AdvanceTimeRequest {
                request_id: rid(),
                by: Some(Duration::from_secs(1).try_into().unwrap()),
            },
        ),
    ]
}

/// Every method of our services has a case here: a new RPC without one
/// fails this test (and one without a table entry fails the services').
#[test]
fn the_matrix_covers_every_rpc() {
    let covered: Vec<&str> = cases().iter().map(|c| c.path).collect();
    let mut missing = Vec::new();
    for (service, table) in [
        (
            "inmail.plans.v1.SubscriptionPlanService",
            subscription_plan::grpc::ACCESS,
        ),
        (
            "inmail.billing.v1.BillingCreditsService",
            billing_credits::grpc::ACCESS,
        ),
        (
            "inmail.messaging.v1.MessagingService",
            messaging::grpc::ACCESS,
        ),
        (
            "inmail.testclock.v1.TestClockService",
            inmail_shared::runtime::auth::access::TEST_CLOCK,
        ),
    ] {
        // Every method of the service, from its table (the services' tests
        // prove the tables list every method of the contracts).
        assert!(inmail_shared::runtime::auth::access::unlisted(table, service).is_empty());
        for (path, _) in table {
            if !covered.contains(path) && !path.ends_with("/SetTime") {
                missing.push(*path);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "methods without a matrix case: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_admits_only_the_callers_its_table_names() {
    let stack = Stack::start().await;
    subscribe(&stack, "sam", "premium-career").await;
    for inviter in ["ivo", "ira"] {
        invite(&stack, inviter, "sam").await.unwrap();
    }
    let services = ["subscription-plan", "billing-credits", "messaging"];
    for case in cases() {
        let addr = match case.port {
            Port::Plans => stack.plans.addr,
            Port::Billing => stack.billing.addr,
            Port::Messaging => stack.messaging.addr,
        };
        let who = admits(case.table, case.path);
        let open = who.contains(&Who::Anyone);
        let before = stack.redis.digest().await;

        let anonymous = call(addr, &As::Anonymous, case.path, &case.body).await;
        let other_member = call(addr, &As::member("mallory"), case.path, &case.body).await;
        let wrong_service = services
            .iter()
            .find(|s| !who.contains(&Who::Service(s)))
            .map(|s| As::Service(s));
        let foreign = call(
            addr,
            &As::Certificate(foreign_certificate("operator/eve")),
            case.path,
            &case.body,
        )
        .await;
        if open {
            assert!(anonymous.is_ok(), "{}: {anonymous:?}", case.path);
            assert!(other_member.is_ok(), "{}: {other_member:?}", case.path);
        } else {
            assert_eq!(
                anonymous.as_ref().map_err(tonic::Status::code).unwrap_err(),
                Code::Unauthenticated,
                "{}: no credentials",
                case.path
            );
            assert_eq!(
                other_member
                    .as_ref()
                    .map_err(tonic::Status::code)
                    .unwrap_err(),
                Code::PermissionDenied,
                "{}: another member's token",
                case.path
            );
            if let Some(service) = &wrong_service {
                let answer = call(addr, service, case.path, &case.body).await;
                assert_eq!(
                    answer.as_ref().map_err(tonic::Status::code).unwrap_err(),
                    Code::PermissionDenied,
                    "{}: {service:?}",
                    case.path
                );
            }
        }
        // Another CA's certificate does not even complete the handshake.
        let refused = foreign.expect_err("a certificate of another CA was accepted");
        assert!(
            matches!(
                refused.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{}: {refused:?}",
            case.path
        );
        assert_eq!(
            stack.redis.digest().await,
            before,
            "{}: a refused call changed Redis",
            case.path
        );

        let right = call(addr, &case.right, case.path, &case.body).await;
        assert!(
            right.is_ok(),
            "{} as {:?}: {right:?}",
            case.path,
            case.right
        );
    }
}

/// One README row per method: `| `Service/Method` | who |`.
fn readme_rows() -> Vec<String> {
    let tables: [(&str, Table); 4] = [
        ("subscription-plan", subscription_plan::grpc::ACCESS),
        ("billing-credits", billing_credits::grpc::ACCESS),
        ("messaging", messaging::grpc::ACCESS),
        (
            "all (when `TEST_CLOCK` is on)",
            inmail_shared::runtime::auth::access::TEST_CLOCK,
        ),
    ];
    let mut rows = Vec::new();
    for (server, table) in tables {
        for (path, who) in table {
            let method = path.rsplit('.').next().unwrap();
            let who: Vec<String> = who
                .iter()
                .map(|w| match w {
                    Who::Anyone => "anyone".to_string(),
                    Who::Member => "the member itself".to_string(),
                    Who::Service(name) => format!("service `{name}`"),
                    Who::Operator => "operator".to_string(),
                })
                .collect();
            rows.push(format!("| {server} | `{method}` | {} |", who.join(", ")));
        }
    }
    rows
}

/// README.md's access table is the code's, row for row.
#[test]
fn readme_states_the_access_tables_of_the_code() {
    let readme = include_str!("../../../README.md");
    let rows = readme_rows();
    let missing: Vec<&String> = rows
        .iter()
        .filter(|r| !readme.contains(r.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's access table differs from the code; these rows are missing:\n{}",
        missing
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let listed = readme
        .lines()
        .filter(|l| {
            l.starts_with("| subscription-plan | `")
                || l.starts_with("| billing-credits | `")
                || l.starts_with("| messaging | `")
                || l.starts_with("| all (when")
        })
        .count();
    assert_eq!(
        listed,
        rows.len(),
        "README.md lists methods the code does not"
    );
}
