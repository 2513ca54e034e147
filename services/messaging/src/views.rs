//! How messaging's records look on the wire.

use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::time::ms_to_timestamp;

use crate::domain::{self, InmailStage, Kind};
use crate::send::{Refund, Sent};
use crate::store::{ConversationRecord, MessageState, StoredMessage};

pub fn refund_status(refund: Refund) -> pb::RefundStatus {
    match refund {
        Refund::None => pb::RefundStatus::Unspecified,
        Refund::Refunded => pb::RefundStatus::Refunded,
        Refund::Pending => pb::RefundStatus::Pending,
        Refund::WindowClosed => pb::RefundStatus::WindowClosed,
    }
}

pub fn kind(kind: Kind) -> pb::MessageKind {
    match kind {
        Kind::Connection => pb::MessageKind::Connection,
        Kind::Reply => pb::MessageKind::Reply,
        Kind::OpenProfile => pb::MessageKind::OpenProfile,
        Kind::Inmail => pb::MessageKind::Inmail,
        Kind::FollowUp => pb::MessageKind::FollowUp,
    }
}

pub fn message(conv: &str, message: &StoredMessage) -> pb::Message {
    pb::Message {
        message_id: message.id.clone(),
        conversation_id: conv.to_string(),
        sender_id: message.from.clone(),
        recipient_id: message.to.clone(),
        kind: kind(message.kind) as i32,
        subject: message.subject.clone(),
        body: message.body.clone(),
        sent_at: ms_to_timestamp(message.at_ms),
        credits_charged: message.credits,
    }
}

pub fn conversation(
    conv: &str,
    record: &ConversationRecord,
    last: Option<&StoredMessage>,
) -> pb::Conversation {
    let (a, b) = domain::conversation_members(conv).unwrap_or(("", ""));
    let inmail = record.pair.inmail.as_ref().map(|i| {
        let state = match i.stage {
            // Not yet visible to anyone: shown as awaiting to its sender.
            InmailStage::Staged | InmailStage::AwaitingResponse => {
                pb::InmailState::AwaitingResponse
            }
            InmailStage::Replied => pb::InmailState::Replied,
            InmailStage::Accepted => pb::InmailState::Accepted,
            InmailStage::Declined => pb::InmailState::Declined,
        };
        let recipient = if i.sender == a { b } else { a };
        pb::Inmail {
            message_id: i.message_id.clone(),
            sender_id: i.sender.clone(),
            recipient_id: recipient.to_string(),
            state: state as i32,
            sent_at: ms_to_timestamp(i.sent_at_ms),
            responded_at: i.responded_at_ms.and_then(ms_to_timestamp),
            refund_status: refund_status(Refund::of(i.refund)) as i32,
        }
    });
    pb::Conversation {
        conversation_id: conv.to_string(),
        member_ids: vec![a.to_string(), b.to_string()],
        last_activity_at: ms_to_timestamp(record.last_activity_ms),
        last_message: last
            .filter(|m| m.state == MessageState::Delivered)
            .map(|m| message(conv, m)),
        message_count: record.message_count,
        inmail,
    }
}

pub fn send_response(sent: &Sent) -> pb::SendMessageResponse {
    pb::SendMessageResponse {
        message: Some(message(&sent.conv, &sent.message)),
        credits_charged: sent.message.credits,
        sender_balance_after: sent.balance_after,
        refund_status: refund_status(sent.refund) as i32,
    }
}
