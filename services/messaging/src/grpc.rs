//! The gRPC edge of messaging: decode, validate, call the domain, map the
//! result. Longer than our ~600-line mark because it is one trait impl of
//! the thirteen MessagingService RPCs, each a few lines of the same shape
//! (checks, `act_for`, one domain call, a view); its request checks live in
//! `checks.rs`, the views in `views.rs`, the work behind them elsewhere.

use inmail_shared::ApiError;
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::rpc::handle;
use inmail_shared::contract::time::ms_to_timestamp;
use inmail_shared::contract::validate::Checks;
use inmail_shared::runtime::auth::access::{Table, Who};
use inmail_shared::runtime::context::{CallContext, record_identity};
use inmail_shared::state::events::EventHub;
use inmail_shared::state::history::History;
use inmail_shared::state::idempotency::{Mutation, Quota, RequestLog};
use inmail_shared::state::paging::{self, PageTokens};
use tonic::{Request, Response, Status};

use crate::checks::{check_pair, member_conversation, other_member, request_and_pair};
use crate::domain::SendFailure;
use crate::domain::{
    BODY_MAX_CHARS, INVITATION_NOTE_MAX_CHARS, InmailStage, Pair, SUBJECT_MAX_CHARS,
};
use crate::error::{DOMAIN, conversation_not_found};
use crate::relations::{InvitationSent, MemberList, Page};
use crate::send::{Messaging, SendInput};
use crate::store::keys;
use crate::views;

/// Who may call each method (README.md, "Who may call what"): members act for and read only
/// themselves; operators may read, and import connections.
pub const ACCESS: Table = &[
    (
        "/inmail.messaging.v1.MessagingService/SendInvitation",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/ListInvitations",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/AcceptInvitation",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/IgnoreInvitation",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/WithdrawInvitation",
        &[Who::Member],
    ),
    // Members connect by invitation only; this imports an existing graph.
    (
        "/inmail.messaging.v1.MessagingService/AddConnection",
        &[Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/RemoveConnection",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/ListConnections",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/BlockMember",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/UnblockMember",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/ListBlockedMembers",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/SetInmailPreference",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/GetInmailPreference",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/SendMessage",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/RespondToInmail",
        &[Who::Member],
    ),
    (
        "/inmail.messaging.v1.MessagingService/ListConversations",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/GetConversation",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.messaging.v1.MessagingService/ListMessages",
        &[Who::Member, Who::Operator],
    ),
    // Members watch only themselves (the handler checks); operators anyone.
    (
        "/inmail.messaging.v1.MessagingService/WatchInbox",
        &[Who::Member, Who::Operator],
    ),
];

#[derive(Clone)]
pub struct MessagingApi {
    messaging: Messaging,
    events: EventHub,
    requests: RequestLog,
    tokens: PageTokens,
    quota: Quota,
}

type Answer<T> = Result<Response<T>, Status>;

impl MessagingApi {
    /// `lease`: the longest one call may take (REQUEST_TIMEOUT); a duplicate
    /// of a request waits that long at most for the first one's outcome.
    /// `quota`: each member's mutation quota, which every new request id
    /// of a member's own call spends from.
    pub fn new(
        messaging: Messaging,
        events: EventHub,
        lease: std::time::Duration,
        quota: Quota,
    ) -> Self {
        let requests = RequestLog::new(messaging.store().redis().clone(), lease);
        let tokens = PageTokens::new(messaging.store().redis().clone(), "messaging");
        Self {
            messaging,
            events,
            requests,
            tokens,
            quota,
        }
    }

    pub fn into_server(self) -> pb::messaging_service_server::MessagingServiceServer<Self> {
        pb::messaging_service_server::MessagingServiceServer::new(self)
            .max_decoding_message_size(inmail_shared::runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(inmail_shared::runtime::server::MAX_RESPONSE_BYTES)
    }

    /// Runs a mutation once per request id (AIP-155): a retry answers the
    /// first outcome.
    async fn once<R, M, F, Fut>(
        &self,
        ctx: &CallContext,
        member: &str,
        request: &R,
        work: F,
    ) -> Result<M, ApiError>
    where
        R: Mutation,
        M: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<M, ApiError>>,
    {
        let key = keys::request(member, request.request_id());
        let quota = keys::quota(member);
        self.requests
            .run(
                ctx,
                &key,
                Some((&quota, self.quota)),
                &request.fingerprint(),
                work,
            )
            .await
    }

    /// A page of one of a member's lists, newest first, and its next token.
    #[allow(clippy::too_many_arguments)]
    async fn list_page(
        &self,
        ctx: &CallContext,
        checks: &mut Checks,
        member: &str,
        list: MemberList,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Page, String), ApiError> {
        let name = list.name();
        let size = paging::page_size(
            checks,
            page_size,
            paging::DEFAULT_PAGE_SIZE,
            paging::MAX_PAGE_SIZE,
        );
        let cursor = self
            .tokens
            .decode(checks, name, &[member], page_token)
            .await?
            .map(|c| {
                c.split_once(':').and_then(|(score, member)| {
                    score.parse::<i64>().ok().map(|s| (s, member.to_string()))
                })
            });
        if matches!(cursor, Some(None)) {
            checks.add("page_token", "is not a token returned by this list");
        }
        std::mem::take(checks).finish()?;
        ctx.act_for("member_id", member)?;
        let after = cursor.flatten();
        let after = after.as_ref().map(|(s, m)| (*s, m.as_str()));
        let page = if matches!(
            list,
            MemberList::InvitationsReceived | MemberList::InvitationsSent
        ) {
            let (invitations, next) = self
                .messaging
                .invitations(member, list, after, size)
                .await?;
            Page {
                rows: Vec::new(),
                invitations,
                next,
            }
        } else {
            self.messaging
                .member_list(member, list, after, size)
                .await?
        };
        let next = match &page.next {
            Some((score, m)) => {
                let cursor = format!("{score}:{m}");
                self.tokens.encode(name, &[member], &cursor).await?
            }
            None => String::new(),
        };
        Ok((page, next))
    }

    /// The conversation as the member sees it now.
    /// The conversation in a change's answer. While the history store is
    /// down, one whose last message is archived comes without that message:
    /// the change is done and recorded, and failing its answer would only
    /// make the client retry into the same outage (README.md, "The history
    /// store").
    async fn conversation_after_change(
        &self,
        conv: &str,
    ) -> Result<Option<pb::Conversation>, ApiError> {
        match self.conversation_view(conv).await {
            Err(e) if History::is_unavailable(&e) => {
                let record = self.messaging.store().conversation(conv).await?;
                Ok(record
                    .last_message_id
                    .is_some()
                    .then(|| views::conversation(conv, &record, None)))
            }
            shown => shown,
        }
    }

    async fn conversation_view(&self, conv: &str) -> Result<Option<pb::Conversation>, ApiError> {
        Ok(self
            .messaging
            .conversation(conv)
            .await?
            .map(|(record, last)| views::conversation(conv, &record, last.as_ref())))
    }
}

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for MessagingApi {
    async fn send_invitation(
        &self,
        request: Request<pb::SendInvitationRequest>,
    ) -> Answer<pb::SendInvitationResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, other) = (&request.member_id, &request.invitee_id);
            let mut checks = Checks::new();
            checks.request_id(&request.request_id).text(
                "note",
                &request.note,
                false,
                INVITATION_NOTE_MAX_CHARS,
            );
            check_pair(&mut checks, "member_id", me, "invitee_id", other);
            checks.finish()?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                let sent = self
                    .messaging
                    .invite(me, other, &request.note, &request.request_id)
                    .await?;
                Ok(match sent {
                    InvitationSent::Pending { at } => pb::SendInvitationResponse {
                        invitation: Some(pb::Invitation {
                            inviter_id: me.clone(),
                            invitee_id: other.clone(),
                            note: request.note.clone(),
                            sent_at: ms_to_timestamp(at),
                        }),
                        connection: None,
                    },
                    InvitationSent::Connected { since } => pb::SendInvitationResponse {
                        invitation: None,
                        connection: Some(pb::Connection {
                            member_id: other.clone(),
                            connected_at: ms_to_timestamp(since),
                        }),
                    },
                })
            })
            .await
        })
        .await
    }

    async fn list_invitations(
        &self,
        request: Request<pb::ListInvitationsRequest>,
    ) -> Answer<pb::ListInvitationsResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let list = match pb::InvitationDirection::try_from(request.direction) {
                Ok(pb::InvitationDirection::Received) => MemberList::InvitationsReceived,
                Ok(pb::InvitationDirection::Sent) => MemberList::InvitationsSent,
                _ => {
                    checks.add(
                        "direction",
                        "must be INVITATION_DIRECTION_RECEIVED or INVITATION_DIRECTION_SENT",
                    );
                    MemberList::InvitationsReceived
                }
            };
            let (page, next_page_token) = self
                .list_page(
                    &ctx,
                    &mut checks,
                    &request.member_id,
                    list,
                    request.page_size,
                    &request.page_token,
                )
                .await?;
            Ok(pb::ListInvitationsResponse {
                invitations: page
                    .invitations
                    .into_iter()
                    .map(|row| pb::Invitation {
                        inviter_id: row.inviter,
                        invitee_id: row.invitee,
                        note: row.note,
                        sent_at: ms_to_timestamp(row.at_ms),
                    })
                    .collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn accept_invitation(
        &self,
        request: Request<pb::AcceptInvitationRequest>,
    ) -> Answer<pb::AcceptInvitationResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, inviter) = (&request.member_id, &request.inviter_id);
            request_and_pair(&request.request_id, "member_id", me, "inviter_id", inviter)?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                let since = self.messaging.accept_invitation(me, inviter).await?;
                Ok(pb::AcceptInvitationResponse {
                    connection: Some(pb::Connection {
                        member_id: inviter.clone(),
                        connected_at: ms_to_timestamp(since),
                    }),
                })
            })
            .await
        })
        .await
    }

    async fn ignore_invitation(
        &self,
        request: Request<pb::IgnoreInvitationRequest>,
    ) -> Answer<pb::IgnoreInvitationResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, inviter) = (&request.member_id, &request.inviter_id);
            request_and_pair(&request.request_id, "member_id", me, "inviter_id", inviter)?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                self.messaging.ignore_invitation(me, inviter).await?;
                Ok(pb::IgnoreInvitationResponse {})
            })
            .await
        })
        .await
    }

    async fn withdraw_invitation(
        &self,
        request: Request<pb::WithdrawInvitationRequest>,
    ) -> Answer<pb::WithdrawInvitationResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, invitee) = (&request.member_id, &request.invitee_id);
            request_and_pair(&request.request_id, "member_id", me, "invitee_id", invitee)?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                self.messaging.withdraw_invitation(me, invitee).await?;
                Ok(pb::WithdrawInvitationResponse {})
            })
            .await
        })
        .await
    }

    async fn add_connection(
        &self,
        request: Request<pb::AddConnectionRequest>,
    ) -> Answer<pb::AddConnectionResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, other) = (&request.member_id, &request.other_member_id);
            request_and_pair(
                &request.request_id,
                "member_id",
                me,
                "other_member_id",
                other,
            )?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                let since = self.messaging.connect(me, other).await?;
                Ok(pb::AddConnectionResponse {
                    connection: Some(pb::Connection {
                        member_id: other.clone(),
                        connected_at: ms_to_timestamp(since),
                    }),
                })
            })
            .await
        })
        .await
    }

    async fn remove_connection(
        &self,
        request: Request<pb::RemoveConnectionRequest>,
    ) -> Answer<pb::RemoveConnectionResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, other) = (&request.member_id, &request.other_member_id);
            request_and_pair(
                &request.request_id,
                "member_id",
                me,
                "other_member_id",
                other,
            )?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                let removed = self.messaging.disconnect(me, other).await?;
                Ok(pb::RemoveConnectionResponse { removed })
            })
            .await
        })
        .await
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Answer<pb::ListConnectionsResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let (page, next_page_token) = self
                .list_page(
                    &ctx,
                    &mut checks,
                    &request.member_id,
                    MemberList::Connections,
                    request.page_size,
                    &request.page_token,
                )
                .await?;
            Ok(pb::ListConnectionsResponse {
                connections: page
                    .rows
                    .into_iter()
                    .map(|(member_id, at)| pb::Connection {
                        member_id,
                        connected_at: ms_to_timestamp(at),
                    })
                    .collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn block_member(
        &self,
        request: Request<pb::BlockMemberRequest>,
    ) -> Answer<pb::BlockMemberResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, other) = (&request.member_id, &request.blocked_member_id);
            request_and_pair(
                &request.request_id,
                "member_id",
                me,
                "blocked_member_id",
                other,
            )?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                let since = self.messaging.block(me, other).await?;
                Ok(pb::BlockMemberResponse {
                    blocked_at: ms_to_timestamp(since),
                })
            })
            .await
        })
        .await
    }

    async fn unblock_member(
        &self,
        request: Request<pb::UnblockMemberRequest>,
    ) -> Answer<pb::UnblockMemberResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let (me, other) = (&request.member_id, &request.blocked_member_id);
            request_and_pair(
                &request.request_id,
                "member_id",
                me,
                "blocked_member_id",
                other,
            )?;
            ctx.act_for("member_id", me)?;
            self.once(&ctx, me, &request, || async {
                let removed = self.messaging.unblock(me, other).await?;
                Ok(pb::UnblockMemberResponse { removed })
            })
            .await
        })
        .await
    }

    async fn list_blocked_members(
        &self,
        request: Request<pb::ListBlockedMembersRequest>,
    ) -> Answer<pb::ListBlockedMembersResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let (page, next_page_token) = self
                .list_page(
                    &ctx,
                    &mut checks,
                    &request.member_id,
                    MemberList::Blocked,
                    request.page_size,
                    &request.page_token,
                )
                .await?;
            Ok(pb::ListBlockedMembersResponse {
                blocked_members: page
                    .rows
                    .into_iter()
                    .map(|(member_id, at)| pb::BlockedMember {
                        member_id,
                        blocked_at: ms_to_timestamp(at),
                    })
                    .collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn set_inmail_preference(
        &self,
        request: Request<pb::SetInmailPreferenceRequest>,
    ) -> Answer<pb::SetInmailPreferenceResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            Checks::new()
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            self.once(&ctx, &request.member_id, &request, || async {
                self.messaging
                    .set_accepts_inmail(&request.member_id, request.accept_inmail)
                    .await?;
                Ok(pb::SetInmailPreferenceResponse {
                    accept_inmail: request.accept_inmail,
                })
            })
            .await
        })
        .await
    }

    async fn get_inmail_preference(
        &self,
        request: Request<pb::GetInmailPreferenceRequest>,
    ) -> Answer<pb::GetInmailPreferenceResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            Checks::new()
                .member_id("member_id", &request.member_id)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let accept_inmail = self.messaging.accepts_inmail(&request.member_id).await?;
            Ok(pb::GetInmailPreferenceResponse { accept_inmail })
        })
        .await
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Answer<pb::SendMessageResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.sender_id, &request.request_id);
        handle(DOMAIN, async {
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
            ctx.act_for("sender_id", &request.sender_id)?;
            let fp = request.fingerprint();
            let input = SendInput {
                request_id: &request.request_id,
                fingerprint: &fp,
                sender: &request.sender_id,
                recipient: &request.recipient_id,
                subject: &request.subject,
                body: &request.body,
                answering: false,
            };
            let sent = self.messaging.send(&ctx, &input, |_| Ok(())).await?;
            Ok(views::send_response(&sent))
        })
        .await
    }

    async fn respond_to_inmail(
        &self,
        request: Request<pb::RespondToInmailRequest>,
    ) -> Answer<pb::RespondToInmailResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.request_id(&request.request_id);
            let members =
                member_conversation(&mut checks, &request.member_id, &request.conversation_id);
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
            ctx.act_for("member_id", &request.member_id)?;
            let members = members.expect("checked above");
            let me = request.member_id.as_str();
            let other = other_member(me, &members)?;
            let conv = request.conversation_id.as_str();
            if response == pb::InmailResponse::Reply {
                let fp = request.fingerprint();
                let input = SendInput {
                    request_id: &request.request_id,
                    fingerprint: &fp,
                    sender: me,
                    recipient: other,
                    subject: "",
                    body: &request.body,
                    answering: true,
                };
                // Refused at once when the other member's InMail is not
                // awaiting (or answered by) a reply; the script decides races.
                let awaiting_me = |pair: &Pair| {
                    let awaits = pair.inmail.as_ref().is_some_and(|i| {
                        i.sender == other
                            && matches!(
                                i.stage,
                                InmailStage::AwaitingResponse | InmailStage::Replied
                            )
                    });
                    if awaits {
                        Ok(())
                    } else {
                        Err(SendFailure::NoInmailAwaitingResponse.into())
                    }
                };
                let sent = self.messaging.send(&ctx, &input, awaiting_me).await?;
                return Ok(pb::RespondToInmailResponse {
                    conversation: self.conversation_after_change(conv).await?,
                    reply: Some(views::message(conv, &sent.message)),
                    refund_status: views::refund_status(sent.refund) as i32,
                });
            }
            // The request record keeps the outcome only (7 days, for
            // retries); the conversation is read afresh, from wherever its
            // last message now lives, on the first answer and on a replay.
            let outcome = self
                .once(&ctx, me, &request, || async {
                    let accept = response == pb::InmailResponse::Accept;
                    let refund = self
                        .messaging
                        .accept_or_decline(&ctx, conv, me, accept)
                        .await?;
                    Ok(pb::RespondToInmailResponse {
                        conversation: None,
                        reply: None,
                        refund_status: views::refund_status(refund) as i32,
                    })
                })
                .await?;
            Ok(pb::RespondToInmailResponse {
                conversation: self.conversation_after_change(conv).await?,
                ..outcome
            })
        })
        .await
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Answer<pb::ListConversationsResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let (page, mut next_page_token) = self
                .list_page(
                    &ctx,
                    &mut checks,
                    &request.member_id,
                    MemberList::Inbox,
                    request.page_size,
                    &request.page_token,
                )
                .await?;
            let convs: Vec<String> = page.rows.iter().map(|(conv, _)| conv.clone()).collect();
            let mut shown: std::collections::HashMap<String, _> = self
                .messaging
                .conversations(&convs)
                .await?
                .into_iter()
                .collect();
            // Within the page byte budget (at least one): the next page
            // starts after the last conversation answered.
            let mut conversations = Vec::new();
            let mut bytes = 0;
            for (i, (conv, _)) in page.rows.iter().enumerate() {
                let Some((record, last)) = shown.remove(conv) else {
                    continue;
                };
                let view = views::conversation(conv, &record, last.as_ref());
                let size = prost::Message::encoded_len(&view);
                if !conversations.is_empty() && bytes + size > self.messaging.page_bytes() {
                    let (prev, score) = &page.rows[i - 1];
                    next_page_token = self
                        .tokens
                        .encode("inbox", &[&request.member_id], &format!("{score}:{prev}"))
                        .await?;
                    break;
                }
                bytes += size;
                conversations.push(view);
            }
            Ok(pb::ListConversationsResponse {
                conversations,
                next_page_token,
            })
        })
        .await
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Answer<pb::GetConversationResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            let members =
                member_conversation(&mut checks, &request.member_id, &request.conversation_id);
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            other_member(&request.member_id, &members.expect("checked above"))?;
            let conversation = self
                .conversation_view(&request.conversation_id)
                .await?
                .ok_or_else(conversation_not_found)?;
            Ok(pb::GetConversationResponse {
                conversation: Some(conversation),
            })
        })
        .await
    }

    type WatchInboxStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
        Result<pb::WatchInboxResponse, Status>,
    >;

    /// Checks the request and where it starts, then serves the frames from
    /// a task of its own; the call itself (and its concurrency permit) ends
    /// when the stream is answered.
    async fn watch_inbox(
        &self,
        request: Request<pb::WatchInboxRequest>,
    ) -> Answer<Self::WatchInboxStream> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let member = request.member_id.clone();
        let after = handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let token = crate::events::decode_token(
                &self.tokens,
                &mut checks,
                &request.member_id,
                &request.resume_token,
            )
            .await?;
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            self.events
                .start_after(&keys::events(&request.member_id), token)
                .await
        })
        .await?
        .into_inner();
        let watch = self
            .events
            .watch(&keys::events(&member), after)
            .map_err(|e| e.into_status(DOMAIN))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(crate::events::serve_watch(
            watch,
            self.tokens.clone(),
            member,
            after,
            tx,
        ));
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Answer<pb::ListMessagesResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            let members =
                member_conversation(&mut checks, &request.member_id, &request.conversation_id);
            let size = paging::page_size(
                &mut checks,
                request.page_size,
                paging::DEFAULT_PAGE_SIZE,
                paging::MAX_PAGE_SIZE,
            );
            let scope = [request.member_id.as_str(), request.conversation_id.as_str()];
            let before = match self
                .tokens
                .decode(&mut checks, "messages", &scope, &request.page_token)
                .await?
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
            ctx.act_for("member_id", &request.member_id)?;
            other_member(&request.member_id, &members.expect("checked above"))?;
            let conv = &request.conversation_id;
            let (rows, more) = self.messaging.messages(conv, before, size).await?;
            if rows.is_empty() && before.is_none() && self.conversation_view(conv).await?.is_none()
            {
                return Err(conversation_not_found());
            }
            let next_page_token = match rows.last() {
                Some((seq, _)) if more => {
                    self.tokens
                        .encode("messages", &scope, &seq.to_string())
                        .await?
                }
                _ => String::new(),
            };
            Ok(pb::ListMessagesResponse {
                messages: rows.iter().map(|(_, m)| views::message(conv, m)).collect(),
                next_page_token,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_table_lists_every_method() {
        assert_eq!(
            inmail_shared::runtime::auth::access::unlisted(
                ACCESS,
                "inmail.messaging.v1.MessagingService"
            ),
            Vec::<String>::new()
        );
    }
}
