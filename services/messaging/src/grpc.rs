//! The gRPC edge of messaging: decode, validate, call the domain, map the
//! result.

use std::collections::HashMap;

use inmail_shared::ApiError;
use inmail_shared::context::{CallContext, record_identity};
use inmail_shared::idempotency::{RequestLog, fingerprint};
use inmail_shared::paging::{self, decode_token, encode_token};
use inmail_shared::proto::messaging::v1 as pb;
use inmail_shared::time::ms_to_timestamp;
use inmail_shared::validate::Checks;
use tonic::{Request, Response, Status};

use crate::domain::{self, BODY_MAX_CHARS, InmailStage, Kind, Pair, SUBJECT_MAX_CHARS};
use crate::error::{DOMAIN, conversation_not_found, refusal};
use crate::send::{Messaging, Refund, SendInput, Sent};
use crate::store::{
    PairReply, StoredMessage, blocked_key, connections_key, inbox_key, request_key,
};

#[derive(Clone)]
pub struct MessagingApi {
    messaging: Messaging,
    requests: RequestLog,
}

type Reply<T> = Result<Response<T>, Status>;

fn reply<T>(result: Result<T, ApiError>) -> Reply<T> {
    result.map(Response::new).map_err(|e| e.into_status(DOMAIN))
}

impl MessagingApi {
    pub fn new(messaging: Messaging) -> Self {
        let requests = RequestLog::new(messaging.store().redis().clone());
        Self {
            messaging,
            requests,
        }
    }

    pub fn into_server(self) -> pb::messaging_service_server::MessagingServiceServer<Self> {
        pb::messaging_service_server::MessagingServiceServer::new(self)
    }

    async fn now(&self) -> Result<i64, ApiError> {
        self.messaging.clock.now_ms().await
    }

    /// A page of one of a member's sorted sets, newest first.
    async fn index_page(
        &self,
        key: &str,
        list: &str,
        page_size: i32,
        page_token: &str,
        checks: &mut Checks,
    ) -> Result<(Vec<(String, i64)>, String), ApiError> {
        let size = paging::page_size(
            checks,
            page_size,
            paging::DEFAULT_PAGE_SIZE,
            paging::MAX_PAGE_SIZE,
        );
        let cursor = decode_token(checks, list, page_token).map(|c| {
            c.split_once(':').and_then(|(score, member)| {
                score.parse::<i64>().ok().map(|s| (s, member.to_string()))
            })
        });
        if matches!(cursor, Some(None)) {
            checks.add("page_token", "is not a token returned by this list");
        }
        checks.finish()?;
        let after = cursor.flatten();
        let mut rows = self
            .messaging
            .store()
            .index_page(key, after.as_ref().map(|(s, m)| (*s, m.as_str())), size)
            .await?;
        let next = if rows.len() > size {
            rows.truncate(size);
            rows.last()
                .map(|(member, score)| encode_token(list, &format!("{score}:{member}")))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    /// The conversation a member asks about, if they are part of it.
    fn member_conversation(
        checks: &mut Checks,
        member: &str,
        conversation_id: &str,
    ) -> Option<(String, String)> {
        checks.member_id("member_id", member);
        if conversation_id.is_empty() {
            checks.add("conversation_id", "is required");
            return None;
        }
        match domain::conversation_members(conversation_id) {
            Some((a, b)) => Some((a.to_string(), b.to_string())),
            None => {
                checks.add(
                    "conversation_id",
                    "is not a conversation id (as returned by this service)",
                );
                None
            }
        }
    }

    async fn conversation_view(&self, conv: &str) -> Result<Option<pb::Conversation>, ApiError> {
        let mut rows = self
            .messaging
            .store()
            .conversations_with_last(&[conv.to_string()])
            .await?;
        let (fields, last) = rows.pop().unwrap_or_default();
        // A pair with no delivered message (only a connection, a block or a
        // staged InMail) is not a conversation yet.
        Ok(fields
            .contains_key("last_msg")
            .then(|| conversation_view(conv, &fields, last)))
    }

    fn send_response(sent: &Sent) -> pb::SendMessageResponse {
        pb::SendMessageResponse {
            message: Some(message_view(&sent.conv, &sent.message)),
            credits_charged: sent.message.credits,
            sender_balance_after: sent.balance_after,
            refund_status: refund_status(sent.refund) as i32,
        }
    }
}

fn refund_status(refund: Refund) -> pb::RefundStatus {
    match refund {
        Refund::None => pb::RefundStatus::Unspecified,
        Refund::Refunded => pb::RefundStatus::Refunded,
        Refund::Pending => pb::RefundStatus::Pending,
        Refund::WindowClosed => pb::RefundStatus::WindowClosed,
    }
}

fn message_view(conv: &str, message: &StoredMessage) -> pb::Message {
    let kind = match Kind::parse(&message.kind) {
        Some(Kind::Connection) => pb::MessageKind::Connection,
        Some(Kind::Reply) => pb::MessageKind::Reply,
        Some(Kind::OpenProfile) => pb::MessageKind::OpenProfile,
        Some(Kind::Inmail) => pb::MessageKind::Inmail,
        Some(Kind::FollowUp) => pb::MessageKind::FollowUp,
        None => pb::MessageKind::Unspecified,
    };
    pb::Message {
        message_id: message.id.clone(),
        conversation_id: conv.to_string(),
        sender_id: message.from.clone(),
        recipient_id: message.to.clone(),
        kind: kind as i32,
        subject: message.subject.clone(),
        body: message.body.clone(),
        sent_at: ms_to_timestamp(message.at_ms),
        credits_charged: message.credits,
    }
}

fn conversation_view(
    conv: &str,
    fields: &HashMap<String, String>,
    last: Option<StoredMessage>,
) -> pb::Conversation {
    let get = |name: &str| fields.get(name).map(String::as_str).unwrap_or("");
    let int = |name: &str| get(name).parse::<i64>().unwrap_or(0);
    let (a, b) = domain::conversation_members(conv).unwrap_or(("", ""));
    let inmail = Pair::from_fields(fields).inmail.map(|i| {
        let state = match i.stage {
            // Not yet visible to anyone: shown as awaiting to its sender.
            InmailStage::Staged | InmailStage::AwaitingResponse => {
                pb::InmailState::AwaitingResponse
            }
            InmailStage::Replied => pb::InmailState::Replied,
            InmailStage::Accepted => pb::InmailState::Accepted,
            InmailStage::Declined => pb::InmailState::Declined,
        };
        let refund = match i.refund.as_str() {
            "refunded" => pb::RefundStatus::Refunded,
            "due" => pb::RefundStatus::Pending,
            "closed" => pb::RefundStatus::WindowClosed,
            _ => pb::RefundStatus::Unspecified,
        };
        let recipient = if i.sender == a { b } else { a };
        pb::Inmail {
            message_id: i.message_id,
            sender_id: i.sender.clone(),
            recipient_id: recipient.to_string(),
            state: state as i32,
            sent_at: ms_to_timestamp(i.sent_at_ms),
            responded_at: ms_to_timestamp(i.responded_at_ms),
            refund_status: refund as i32,
        }
    });
    pb::Conversation {
        conversation_id: conv.to_string(),
        member_ids: vec![a.to_string(), b.to_string()],
        last_activity_at: ms_to_timestamp(int("last")),
        last_message: last
            .filter(|m| m.state == "delivered")
            .map(|m| message_view(conv, &m)),
        message_count: int("count") as u32,
        inmail,
    }
}

fn check_pair(
    checks: &mut Checks,
    member_field: &str,
    member: &str,
    other_field: &str,
    other: &str,
) {
    checks
        .member_id(member_field, member)
        .member_id(other_field, other);
    if !member.is_empty() && member == other {
        checks.add(other_field, format!("must differ from {member_field}"));
    }
}

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for MessagingApi {
    async fn add_connection(
        &self,
        request: Request<pb::AddConnectionRequest>,
    ) -> Reply<pb::AddConnectionResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks.request_id(&request.request_id);
            check_pair(
                &mut checks,
                "member_id",
                &request.member_id,
                "other_member_id",
                &request.other_member_id,
            );
            checks.finish()?;
            let fp = fingerprint(&pb::AddConnectionRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let key = request_key(&request.member_id, &request.request_id);
            self.requests
                .run(&key, &fp, || async {
                    let (me, other) = (&request.member_id, &request.other_member_id);
                    let conv = domain::conversation_id(me, other);
                    let (a, b) = domain::sorted(me, other);
                    let now = self.now().await?;
                    let since = match self.messaging.store().connect(&conv, a, b, now).await? {
                        PairReply::Ok(fields) => fields
                            .first()
                            .and_then(|v| v.parse::<i64>().ok())
                            .unwrap_or(now),
                        PairReply::Refused(reason) => return Err(refusal(&reason)),
                        other => {
                            return Err(ApiError::internal(format!("connect answered {other:?}")));
                        }
                    };
                    self.messaging
                        .store()
                        .index_connection(me, other, since)
                        .await?;
                    Ok(pb::AddConnectionResponse {
                        connection: Some(pb::Connection {
                            member_id: other.clone(),
                            connected_at: ms_to_timestamp(since),
                        }),
                    })
                })
                .await
        }
        .await;
        reply(result)
    }

    async fn remove_connection(
        &self,
        request: Request<pb::RemoveConnectionRequest>,
    ) -> Reply<pb::RemoveConnectionResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks.request_id(&request.request_id);
            check_pair(
                &mut checks,
                "member_id",
                &request.member_id,
                "other_member_id",
                &request.other_member_id,
            );
            checks.finish()?;
            let fp = fingerprint(&pb::RemoveConnectionRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let key = request_key(&request.member_id, &request.request_id);
            self.requests
                .run(&key, &fp, || async {
                    let (me, other) = (&request.member_id, &request.other_member_id);
                    let conv = domain::conversation_id(me, other);
                    let removed = self.messaging.store().disconnect(&conv, me, other).await?;
                    Ok(pb::RemoveConnectionResponse { removed })
                })
                .await
        }
        .await;
        reply(result)
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Reply<pb::ListConnectionsResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let key = connections_key(&request.member_id);
            let (rows, next_page_token) = self
                .index_page(
                    &key,
                    "connections",
                    request.page_size,
                    &request.page_token,
                    &mut checks,
                )
                .await?;
            Ok(pb::ListConnectionsResponse {
                connections: rows
                    .into_iter()
                    .map(|(member_id, at)| pb::Connection {
                        member_id,
                        connected_at: ms_to_timestamp(at),
                    })
                    .collect(),
                next_page_token,
            })
        }
        .await;
        reply(result)
    }

    async fn block_member(
        &self,
        request: Request<pb::BlockMemberRequest>,
    ) -> Reply<pb::BlockMemberResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks.request_id(&request.request_id);
            check_pair(
                &mut checks,
                "member_id",
                &request.member_id,
                "blocked_member_id",
                &request.blocked_member_id,
            );
            checks.finish()?;
            let fp = fingerprint(&pb::BlockMemberRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let key = request_key(&request.member_id, &request.request_id);
            self.requests
                .run(&key, &fp, || async {
                    let (me, other) = (&request.member_id, &request.blocked_member_id);
                    let conv = domain::conversation_id(me, other);
                    let (a, b) = domain::sorted(me, other);
                    let now = self.now().await?;
                    let since = self
                        .messaging
                        .store()
                        .block(&conv, a, b, me, other, now)
                        .await?;
                    Ok(pb::BlockMemberResponse {
                        blocked_at: ms_to_timestamp(since),
                    })
                })
                .await
        }
        .await;
        reply(result)
    }

    async fn unblock_member(
        &self,
        request: Request<pb::UnblockMemberRequest>,
    ) -> Reply<pb::UnblockMemberResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks.request_id(&request.request_id);
            check_pair(
                &mut checks,
                "member_id",
                &request.member_id,
                "blocked_member_id",
                &request.blocked_member_id,
            );
            checks.finish()?;
            let fp = fingerprint(&pb::UnblockMemberRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let key = request_key(&request.member_id, &request.request_id);
            self.requests
                .run(&key, &fp, || async {
                    let (me, other) = (&request.member_id, &request.blocked_member_id);
                    let conv = domain::conversation_id(me, other);
                    let (a, _) = domain::sorted(me, other);
                    let removed = self.messaging.store().unblock(&conv, a, me, other).await?;
                    Ok(pb::UnblockMemberResponse { removed })
                })
                .await
        }
        .await;
        reply(result)
    }

    async fn list_blocked_members(
        &self,
        request: Request<pb::ListBlockedMembersRequest>,
    ) -> Reply<pb::ListBlockedMembersResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let key = blocked_key(&request.member_id);
            let (rows, next_page_token) = self
                .index_page(
                    &key,
                    "blocked",
                    request.page_size,
                    &request.page_token,
                    &mut checks,
                )
                .await?;
            Ok(pb::ListBlockedMembersResponse {
                blocked_members: rows
                    .into_iter()
                    .map(|(member_id, at)| pb::BlockedMember {
                        member_id,
                        blocked_at: ms_to_timestamp(at),
                    })
                    .collect(),
                next_page_token,
            })
        }
        .await;
        reply(result)
    }

    async fn set_inmail_preference(
        &self,
        request: Request<pb::SetInmailPreferenceRequest>,
    ) -> Reply<pb::SetInmailPreferenceResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            Checks::new()
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .finish()?;
            let fp = fingerprint(&pb::SetInmailPreferenceRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let key = request_key(&request.member_id, &request.request_id);
            self.requests
                .run(&key, &fp, || async {
                    self.messaging
                        .store()
                        .set_accepts_inmail(&request.member_id, request.accept_inmail)
                        .await?;
                    Ok(pb::SetInmailPreferenceResponse {
                        accept_inmail: request.accept_inmail,
                    })
                })
                .await
        }
        .await;
        reply(result)
    }

    async fn get_inmail_preference(
        &self,
        request: Request<pb::GetInmailPreferenceRequest>,
    ) -> Reply<pb::GetInmailPreferenceResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            Checks::new()
                .member_id("member_id", &request.member_id)
                .finish()?;
            let accept_inmail = self
                .messaging
                .store()
                .accepts_inmail(&request.member_id)
                .await?;
            Ok(pb::GetInmailPreferenceResponse { accept_inmail })
        }
        .await;
        reply(result)
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Reply<pb::SendMessageResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.sender_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .text("subject", &request.subject, false, SUBJECT_MAX_CHARS)
                .text("body", &request.body, true, BODY_MAX_CHARS);
            check_pair(
                &mut checks,
                "sender_id",
                &request.sender_id,
                "recipient_id",
                &request.recipient_id,
            );
            checks.finish()?;
            let fp = fingerprint(&pb::SendMessageRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let input = SendInput {
                request_id: &request.request_id,
                fingerprint: &fp,
                sender: &request.sender_id,
                recipient: &request.recipient_id,
                subject: &request.subject,
                body: &request.body,
            };
            let sent = self.messaging.send(&ctx, &input, |_| Ok(())).await?;
            Ok(Self::send_response(&sent))
        }
        .await;
        reply(result)
    }

    async fn respond_to_inmail(
        &self,
        request: Request<pb::RespondToInmailRequest>,
    ) -> Reply<pb::RespondToInmailResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks.request_id(&request.request_id);
            let members = Self::member_conversation(
                &mut checks,
                &request.member_id,
                &request.conversation_id,
            );
            let response = pb::InmailResponse::try_from(request.response)
                .unwrap_or(pb::InmailResponse::Unspecified);
            match response {
                pb::InmailResponse::Unspecified => {
                    checks.add("response", "must be REPLY, ACCEPT or DECLINE");
                }
                pb::InmailResponse::Reply => {
                    checks.text("body", &request.body, true, BODY_MAX_CHARS);
                }
                pb::InmailResponse::Accept | pb::InmailResponse::Decline => {
                    if !request.body.is_empty() {
                        checks.add("body", "must be empty unless the response is REPLY");
                    }
                }
            }
            checks.finish()?;
            let (a, b) = members.expect("checked above");
            let me = request.member_id.as_str();
            if me != a && me != b {
                return Err(conversation_not_found());
            }
            let other = if me == a { b.as_str() } else { a.as_str() };
            let conv = request.conversation_id.as_str();
            let fp = fingerprint(&pb::RespondToInmailRequest {
                request_id: String::new(),
                ..request.clone()
            });
            if response == pb::InmailResponse::Reply {
                let input = SendInput {
                    request_id: &request.request_id,
                    fingerprint: &fp,
                    sender: me,
                    recipient: other,
                    subject: "",
                    body: &request.body,
                };
                let awaiting_me = |pair: &Pair| {
                    let awaits = pair.inmail.as_ref().is_some_and(|i| {
                        i.sender == other && i.stage == InmailStage::AwaitingResponse
                    });
                    if awaits {
                        Ok(())
                    } else {
                        Err(refusal("NO_INMAIL_AWAITING_RESPONSE"))
                    }
                };
                let sent = self.messaging.send(&ctx, &input, awaiting_me).await?;
                let conversation = self.conversation_view(conv).await?;
                return Ok(pb::RespondToInmailResponse {
                    conversation,
                    reply: Some(message_view(conv, &sent.message)),
                    refund_status: refund_status(sent.refund) as i32,
                });
            }
            let key = request_key(me, &request.request_id);
            self.requests
                .run(&key, &fp, || async {
                    let accept = response == pb::InmailResponse::Accept;
                    let refund = self
                        .messaging
                        .accept_or_decline(&ctx, conv, me, accept)
                        .await?;
                    let conversation = self.conversation_view(conv).await?;
                    Ok(pb::RespondToInmailResponse {
                        conversation,
                        reply: None,
                        refund_status: refund_status(refund) as i32,
                    })
                })
                .await
        }
        .await;
        reply(result)
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Reply<pb::ListConversationsResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let key = inbox_key(&request.member_id);
            let (rows, next_page_token) = self
                .index_page(
                    &key,
                    "inbox",
                    request.page_size,
                    &request.page_token,
                    &mut checks,
                )
                .await?;
            let convs: Vec<String> = rows.into_iter().map(|(conv, _)| conv).collect();
            let details = self
                .messaging
                .store()
                .conversations_with_last(&convs)
                .await?;
            Ok(pb::ListConversationsResponse {
                // An inbox entry written just before a delivery that did not
                // happen names a pair without messages: not a conversation.
                conversations: convs
                    .iter()
                    .zip(details)
                    .filter(|(_, (fields, _))| fields.contains_key("last_msg"))
                    .map(|(conv, (fields, last))| conversation_view(conv, &fields, last))
                    .collect(),
                next_page_token,
            })
        }
        .await;
        reply(result)
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Reply<pb::GetConversationResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            let members = Self::member_conversation(
                &mut checks,
                &request.member_id,
                &request.conversation_id,
            );
            checks.finish()?;
            let (a, b) = members.expect("checked above");
            if request.member_id != a && request.member_id != b {
                return Err(conversation_not_found());
            }
            let conversation = self
                .conversation_view(&request.conversation_id)
                .await?
                .ok_or_else(conversation_not_found)?;
            Ok(pb::GetConversationResponse {
                conversation: Some(conversation),
            })
        }
        .await;
        reply(result)
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Reply<pb::ListMessagesResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            let members = Self::member_conversation(
                &mut checks,
                &request.member_id,
                &request.conversation_id,
            );
            let size = paging::page_size(
                &mut checks,
                request.page_size,
                paging::DEFAULT_PAGE_SIZE,
                paging::MAX_PAGE_SIZE,
            );
            let before = match decode_token(&mut checks, "messages", &request.page_token)
                .map(|c| c.parse::<u64>())
            {
                Some(Ok(seq)) => Some(seq),
                Some(Err(_)) => {
                    checks.add("page_token", "is not a token returned by this list");
                    None
                }
                None => None,
            };
            checks.finish()?;
            let (a, b) = members.expect("checked above");
            if request.member_id != a && request.member_id != b {
                return Err(conversation_not_found());
            }
            let conv = &request.conversation_id;
            let mut rows = self
                .messaging
                .store()
                .messages_page(conv, before, size)
                .await?;
            if rows.is_empty() && before.is_none() && self.conversation_view(conv).await?.is_none()
            {
                return Err(conversation_not_found());
            }
            let next_page_token = if rows.len() > size {
                rows.truncate(size);
                rows.last()
                    .map(|(seq, _)| encode_token("messages", &seq.to_string()))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListMessagesResponse {
                messages: rows.iter().map(|(_, m)| message_view(conv, m)).collect(),
                next_page_token,
            })
        }
        .await;
        reply(result)
    }
}
