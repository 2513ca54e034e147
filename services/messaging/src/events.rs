//! Inbox events (WatchInbox, README.md "Events"): what is appended to the
//! members' event streams when a message is delivered, an InMail answered
//! or its refund settled, and the frames a watch sends.
//!
//! A conversation's writes live in the conversation's slot and a member's
//! event stream in the member's, so on Redis Cluster one script cannot do
//! both: the events are appended right after the conversation's script
//! answered that it made the change (never for a change it refused). A
//! message's events are owed in the outbox from before it is delivered
//! (OutboxItem::Events) until appended, so if the process dies between the
//! two steps the sweeper appends them (late, at least once). A response's
//! events are owed by its refund entry (OutboxItem::Refund), dropped only
//! after they were appended (`Messaging::response_done`); the sweeper
//! appends them from what the conversation recorded
//! (`Messaging::finish_owed_response`).

use inmail_shared::ApiError;
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::time::ms_to_timestamp;
use inmail_shared::contract::validate::Checks;
use inmail_shared::state::events::{self, Entry, StreamId, Watch};
use inmail_shared::state::paging::PageTokens;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::DOMAIN;
use crate::send::{Messaging, Refund};
use crate::store::{OutboxItem, StoredMessage};
use crate::views;

/// The resume tokens' list name (tokens are bound to it and the member).
const TOKEN_LIST: &str = "inbox-events";

impl Messaging {
    async fn publish(&self, members: &[&str], event: pb::InboxEvent, owed: Option<&OutboxItem>) {
        let retention = self.config.events;
        let bytes = event.encode_to_vec();
        if let Err(err) = self
            .store
            .append_event(
                members,
                &bytes,
                retention.keep,
                retention.retention.as_millis() as i64,
                owed,
            )
            .await
        {
            metrics::counter!("inmail_events_lost_total").increment(1);
            tracing::warn!(event_id = %event.event_id, error = %err, "an inbox event could not be appended");
        }
    }

    /// A message was delivered: both members hear of it (and the outbox
    /// entry that owed its events is dropped).
    pub(crate) async fn publish_message(&self, conv: &str, message: &StoredMessage) {
        let event = pb::InboxEvent {
            event_id: format!("message:{}", message.id),
            kind: pb::InboxEventKind::Message as i32,
            conversation_id: conv.to_string(),
            occurred_at: ms_to_timestamp(message.at_ms),
            message: Some(views::message(conv, message)),
            ..Default::default()
        };
        let owed = OutboxItem::Events {
            conv: conv.to_string(),
            message_id: message.id.clone(),
            sender: message.from.clone(),
        };
        self.publish(&[&message.from, &message.to], event, Some(&owed))
            .await;
    }

    /// An InMail was answered: both members hear of it.
    pub(crate) async fn publish_response(
        &self,
        conv: &str,
        members: [&str; 2],
        inmail_id: &str,
        state: pb::InmailState,
        refund: Refund,
        at_ms: i64,
    ) {
        let event = pb::InboxEvent {
            event_id: format!("response:{inmail_id}"),
            kind: pb::InboxEventKind::InmailResponse as i32,
            conversation_id: conv.to_string(),
            occurred_at: ms_to_timestamp(at_ms),
            inmail_id: inmail_id.to_string(),
            inmail_state: state as i32,
            refund_status: views::refund_status(refund) as i32,
            ..Default::default()
        };
        self.publish(&members, event, None).await;
    }

    /// An InMail's refund was settled: its sender hears of it.
    pub(crate) async fn publish_refund(
        &self,
        conv: &str,
        sender: &str,
        inmail_id: &str,
        refund: Refund,
    ) {
        let at_ms = self.clock.now_ms().await.unwrap_or_default();
        let event = pb::InboxEvent {
            event_id: format!("refund:{inmail_id}"),
            kind: pb::InboxEventKind::RefundStatus as i32,
            conversation_id: conv.to_string(),
            occurred_at: ms_to_timestamp(at_ms),
            inmail_id: inmail_id.to_string(),
            refund_status: views::refund_status(refund) as i32,
            ..Default::default()
        };
        self.publish(&[sender], event, None).await;
    }
}

/// Reads `resume_token` of `member` (None: from now); a token that does
/// not verify is added to `checks`.
pub async fn decode_token(
    tokens: &PageTokens,
    checks: &mut Checks,
    member: &str,
    token: &str,
) -> Result<Option<StreamId>, ApiError> {
    inmail_shared::state::events::decode_resume_token(
        tokens,
        checks,
        TOKEN_LIST,
        member,
        token,
        "this member's inbox events",
    )
    .await
}

/// Serves one watch (see [`inmail_shared::state::events::serve_watch`]).
pub async fn serve_watch(
    watch: Watch,
    tokens: PageTokens,
    member: String,
    after: StreamId,
    out: mpsc::Sender<Result<pb::WatchInboxResponse, Status>>,
) {
    let token_of = |id: StreamId| {
        let tokens = tokens.clone();
        let member = member.clone();
        async move { tokens.encode(TOKEN_LIST, &[&member], &id.to_string()).await }
    };
    let frame_of = |entry: Option<&Entry>, resume_token: String| match entry {
        Some(entry) => {
            let event = pb::InboxEvent::decode(entry.fields.get("e")?.as_slice()).ok()?;
            Some(pb::WatchInboxResponse {
                resume_token,
                event: Some(event),
                heartbeat_at: None,
            })
        }
        None => Some(pb::WatchInboxResponse {
            resume_token,
            event: None,
            heartbeat_at: ms_to_timestamp(events::wall_clock_ms()),
        }),
    };
    events::serve_watch(watch, after, DOMAIN, token_of, frame_of, out).await;
}
