//! What messaging's scripts answer and what its hashes hold, parsed once at
//! the store boundary into types: no caller reads a reply by position or a
//! state as a string.

use std::collections::HashMap;

use inmail_shared::ApiError;
use serde::Deserialize;

use crate::domain::{InmailInfo, InmailStage, Kind, Pair, RefundState, SendFailure};

/// Where a stored message stands (the message's `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// Stored, not visible: its InMail is being charged.
    Staged,
    Delivered,
    /// Given up; `reason` says why.
    Failed,
}

impl MessageState {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "staged" => Self::Staged,
            "delivered" => Self::Delivered,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// Why a script refused (its `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Refusal {
    Blocked,
    AwaitingResponse,
    NoInmailAwaitingResponse,
}

impl From<Refusal> for SendFailure {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Blocked => Self::Blocked,
            Refusal::AwaitingResponse => Self::AwaitingResponse,
            Refusal::NoInmailAwaitingResponse => Self::NoInmailAwaitingResponse,
        }
    }
}

/// The message a script found in place of a new or staged one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Existing {
    /// `None`: no such message (a staged one that vanished).
    #[serde(default)]
    pub state: Option<MessageState>,
    /// The fingerprint of the request that stored it.
    #[serde(default)]
    pub fp: String,
}

/// A response to an InMail that a script recorded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Responded {
    pub refund: RefundState,
    pub inmail_id: String,
    pub inmail_sender: String,
    /// When the response was recorded: the refund window is judged then.
    pub responded_at: i64,
}

/// BEGIN_SEND's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Begun {
    New,
    Exists { msg: String, conv: String },
    Mismatch,
    RateLimited { retry_ms: u64 },
    SendRateLimited { retry_ms: u64 },
    OpenProfileLimited,
    MutationLimited { retry_ms: u64 },
}

/// STAGE_INMAIL's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Staged {
    Ok,
    Exists(Existing),
    Refused {
        reason: Refusal,
    },
    /// The pair changed since the kind was decided; decide again.
    Retry,
}

/// DELIVER's answer for a delivered message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Delivered {
    pub seq: u64,
    pub sent_at: i64,
    #[serde(flatten)]
    pub response: Option<Responded>,
}

/// A response to an InMail recorded earlier by another call (one response
/// per InMail).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Recorded {
    /// The reply that answered the InMail.
    pub reply_id: String,
    #[serde(flatten)]
    pub response: Responded,
}

/// DELIVER's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Delivery {
    Ok(Delivered),
    Exists(Existing),
    /// Response mode: the InMail was already answered by this reply.
    Responded(Recorded),
    Refused {
        reason: Refusal,
    },
    Retry,
}

/// FAIL_STAGED's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum GivenUp {
    Ok,
    Exists(Existing),
}

/// RESPOND's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Response {
    Ok(Responded),
    /// The same response was recorded before: its outcome.
    Responded(Responded),
    NotFound,
    Refused {
        reason: Refusal,
    },
}

/// CONNECT's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Connected {
    Ok { since: i64 },
    Refused { reason: Refusal },
}

/// RESERVE_INVITATION's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Reserved {
    /// A token taken and the invitee listed as pending.
    Reserved,
    /// The invitee is listed already; nothing taken.
    Present,
    TooManyPending,
    RateLimited {
        retry_ms: u64,
    },
}

/// INVITE's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Invited {
    Invited {
        at: i64,
    },
    /// The other member had invited the inviter: now they are connected.
    Connected {
        since: i64,
    },
    Refused {
        reason: InvitationRefusal,
    },
    CoolingOff {
        ends: i64,
    },
}

/// Why INVITE refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InvitationRefusal {
    Blocked,
    AlreadyConnected,
    InvitationPending,
}

/// ANSWER_INVITATION's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum Answered {
    Connected {
        since: i64,
    },
    Done,
    /// No such pending invitation.
    None,
}

/// Parses a script's JSON reply into its type.
pub fn parse<T: serde::de::DeserializeOwned>(script: &str, json: &str) -> Result<T, ApiError> {
    serde_json::from_str(json).map_err(|e| {
        ApiError::internal(format!(
            "unreadable reply of the {script} script {json:?}: {e}"
        ))
    })
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: String,
    pub from: String,
    pub to: String,
    pub kind: Kind,
    pub subject: String,
    pub body: String,
    pub credits: i32,
    pub at_ms: i64,
    pub state: MessageState,
    /// Why it failed.
    pub reason: Option<SendFailure>,
    pub balance_after: Option<i64>,
    /// Fingerprint of the request that sent it.
    pub fingerprint: String,
}

impl StoredMessage {
    /// About the bytes it takes in a response (for page size budgets).
    pub fn wire_size(&self) -> usize {
        self.id.len() + self.from.len() + self.to.len() + self.subject.len() + self.body.len() + 64
    }

    /// Reads a message hash; `None` when it does not exist or is unreadable.
    pub fn from_fields(id: &str, fields: HashMap<String, String>) -> Option<Self> {
        if fields.is_empty() {
            return None;
        }
        let get = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let kind = Kind::parse(&get("kind"))?;
        let state = MessageState::parse(&get("state"))?;
        Some(Self {
            id: id.to_string(),
            from: get("from"),
            to: get("to"),
            kind,
            subject: get("subject"),
            body: get("body"),
            credits: get("credits").parse().unwrap_or(0),
            at_ms: get("at").parse().unwrap_or(0),
            state,
            reason: SendFailure::parse(&get("reason")),
            balance_after: fields.get("bal_after").and_then(|v| v.parse().ok()),
            fingerprint: get("fp"),
        })
    }
}

/// A conversation hash as stored: the pair the rules look at, and what the
/// views show.
#[derive(Debug, Clone, Default)]
pub struct ConversationRecord {
    pub pair: Pair,
    /// Whether any message was delivered (a pair with only a connection, a
    /// block or a staged InMail is not a conversation yet).
    pub last_message_id: Option<String>,
    pub last_activity_ms: i64,
    pub message_count: u32,
}

impl ConversationRecord {
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        let get = |name: &str| fields.get(name).map(String::as_str).unwrap_or("");
        let int = |name: &str| get(name).parse::<i64>().unwrap_or(0);
        let mut written = HashMap::new();
        for side in ["a", "b"] {
            if let Some(member) = fields.get(side) {
                written.insert(member.clone(), int(&format!("w_{side}")) as u64);
            }
        }
        let inmail = InmailStage::parse(get("im_state")).map(|stage| InmailInfo {
            message_id: get("im_id").to_string(),
            sender: get("im_from").to_string(),
            sent_at_ms: int("im_at"),
            stage,
            responded_at_ms: fields.get("im_resp_at").and_then(|v| v.parse().ok()),
            refund: RefundState::parse(get("im_refund")),
            reply_id: fields.get("im_reply").cloned(),
        });
        Self {
            pair: Pair {
                connected: get("conn") == "1",
                blocked: !get("blk_a").is_empty() || !get("blk_b").is_empty(),
                inmail,
                written,
                open: get("open") == "1",
            },
            last_message_id: fields.get("last_msg").cloned(),
            last_activity_ms: int("last"),
            message_count: int("count") as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replies_parse_by_name() {
        let d: Delivery = parse(
            "deliver",
            r#"{"s":"ok","seq":3,"sent_at":5,"refund":"due","inmail_id":"m-1","inmail_sender":"sam","responded_at":5}"#,
        )
        .unwrap();
        let Delivery::Ok(delivered) = d else {
            panic!("{d:?}")
        };
        assert_eq!(delivered.seq, 3);
        assert_eq!(
            delivered.response,
            Some(Responded {
                refund: RefundState::Due,
                inmail_id: "m-1".into(),
                inmail_sender: "sam".into(),
                responded_at: 5,
            })
        );
        let plain: Delivery = parse("deliver", r#"{"s":"ok","seq":1,"sent_at":5}"#).unwrap();
        assert!(matches!(
            plain,
            Delivery::Ok(Delivered { response: None, .. })
        ));
        let refused: Delivery = parse("deliver", r#"{"s":"refused","reason":"BLOCKED"}"#).unwrap();
        assert_eq!(
            refused,
            Delivery::Refused {
                reason: Refusal::Blocked
            }
        );
        let begun: Begun = parse("begin", r#"{"s":"rate_limited","retry_ms":7}"#).unwrap();
        assert_eq!(begun, Begun::RateLimited { retry_ms: 7 });
    }

    #[test]
    fn a_changed_reply_is_an_error_not_a_wrong_field() {
        assert!(parse::<Delivery>("deliver", r#"{"s":"ok","sequence":3}"#).is_err());
        assert!(parse::<Staged>("stage", r#"{"s":"weird"}"#).is_err());
    }

    #[test]
    fn conversation_record_reads_the_stored_fields() {
        let fields: HashMap<String, String> = [
            ("a", "rita"),
            ("b", "sam"),
            ("w_a", "2"),
            ("conn", "1"),
            ("im_state", "awaiting"),
            ("im_from", "sam"),
            ("im_id", "m-9"),
            ("im_at", "5"),
            ("im_refund", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let record = ConversationRecord::from_fields(&fields);
        let p = record.pair;
        assert!(p.connected && !p.blocked && !p.open);
        assert!(p.has_written("rita") && !p.has_written("sam"));
        let inmail = p.inmail.unwrap();
        assert_eq!(
            (inmail.sender.as_str(), inmail.stage, inmail.refund),
            ("sam", InmailStage::AwaitingResponse, None)
        );
        assert!(record.last_message_id.is_none());
    }
}
