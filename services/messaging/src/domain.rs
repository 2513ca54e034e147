//! The rules of messages (README.md, "How it behaves"), pure: what kind a message
//! is, what it costs and who may send it.

use std::collections::HashMap;

use inmail_shared::contract::reasons;
use inmail_shared::contract::validate::is_member_id;
use inmail_shared::state::idempotency::digest;

/// Longest InMail subject, in characters (Unicode scalar values).
pub const SUBJECT_MAX_CHARS: usize = 200;
/// Longest InMail body, in characters.
pub const INMAIL_BODY_MAX_CHARS: usize = 2_000;
/// Longest body of the free kinds, in characters.
pub const BODY_MAX_CHARS: usize = 8_000;
/// An invitation's note (LinkedIn's 300): a greeting, not a way around
/// InMail.
pub const INVITATION_NOTE_MAX_CHARS: usize = 300;

/// What a message is, which decides its price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connection,
    Reply,
    OpenProfile,
    Inmail,
    FollowUp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connection => "CONNECTION",
            Kind::Reply => "REPLY",
            Kind::OpenProfile => "OPEN_PROFILE",
            Kind::Inmail => "INMAIL",
            Kind::FollowUp => "FOLLOW_UP",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "CONNECTION" => Kind::Connection,
            "REPLY" => Kind::Reply,
            "OPEN_PROFILE" => Kind::OpenProfile,
            "INMAIL" => Kind::Inmail,
            "FOLLOW_UP" => Kind::FollowUp,
            _ => return None,
        })
    }

    pub fn credits(self) -> i32 {
        i32::from(self == Kind::Inmail)
    }
}

/// What to do with a further message while one's own InMail awaits a
/// response (the seed's sources disagree; refusing is the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PendingInmailPolicy {
    /// Refuse with AWAITING_RESPONSE.
    Refuse,
    /// Accept it as a free FOLLOW_UP in the same conversation.
    AllowFollowUps,
}

/// Where the conversation's InMail stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InmailStage {
    /// Charged or being charged, not yet delivered.
    Staged,
    AwaitingResponse,
    Replied,
    Accepted,
    Declined,
}

impl InmailStage {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "staged" => Self::Staged,
            "awaiting" => Self::AwaitingResponse,
            "replied" => Self::Replied,
            "accepted" => Self::Accepted,
            "declined" => Self::Declined,
            _ => return None,
        })
    }

    pub fn is_pending(self) -> bool {
        matches!(self, Self::Staged | Self::AwaitingResponse)
    }
}

/// What became of an InMail's credit once it was responded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefundState {
    /// Responded within the window; billing has not taken the refund yet.
    Due,
    Refunded,
    /// Responded after the window: no refund.
    Closed,
}

impl RefundState {
    /// As stored; `None` for "" (not responded yet) or anything unknown.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "due" => Self::Due,
            "refunded" => Self::Refunded,
            "closed" => Self::Closed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Due => "due",
            Self::Refunded => "refunded",
            Self::Closed => "closed",
        }
    }
}

/// The InMail of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InmailInfo {
    pub message_id: String,
    pub sender: String,
    pub sent_at_ms: i64,
    pub stage: InmailStage,
    /// When it was responded to; `None` before that, or when the record
    /// cannot be read (never guessed: a refund is judged at this time).
    pub responded_at_ms: Option<i64>,
    /// `None` until it is responded to.
    pub refund: Option<RefundState>,
    /// The reply that answered it, when a reply did.
    pub reply_id: Option<String>,
}

/// What the rules need to know about a pair of members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pair {
    pub connected: bool,
    pub blocked: bool,
    /// The InMail of the conversation, if any.
    pub inmail: Option<InmailInfo>,
    /// Messages delivered from each member.
    pub written: HashMap<String, u64>,
    /// Someone responded to an InMail here: both write freely.
    pub open: bool,
}

impl Pair {
    /// Whether `member` has written in this conversation.
    pub fn has_written(&self, member: &str) -> bool {
        self.written.get(member).copied().unwrap_or(0) > 0
    }
}

/// Why a message cannot be sent (before anything is charged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendRefusal {
    #[error("one of the members blocked the other")]
    Blocked,
    #[error("the sender's InMail to this member still awaits a response")]
    AwaitingResponse,
    #[error("the recipient does not accept InMail")]
    InmailNotAccepted,
    #[error("an InMail from the recipient is being delivered in this conversation; retry")]
    ConcurrentInmail,
}

/// The kind of a message, or what is still needed to decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Kind(Kind),
    /// Whether the recipient is on a paid plan with Open Profile on decides.
    NeedOpenProfile,
}

/// Decides a message's kind in README.md's order ("Messages"): blocks stop everything;
/// connections are free; one's own pending InMail holds further messages
/// (policy); writing back to someone who wrote (or responded) is a free
/// reply; then Open Profile; everyone else costs an InMail.
pub fn decide(
    pair: &Pair,
    sender: &str,
    recipient: &str,
    policy: PendingInmailPolicy,
    recipient_open_profile: Option<bool>,
    recipient_accepts_inmail: bool,
) -> Result<Decision, SendRefusal> {
    if pair.blocked {
        return Err(SendRefusal::Blocked);
    }
    if pair.connected {
        return Ok(Decision::Kind(Kind::Connection));
    }
    if let Some(inmail) = pair.inmail.as_ref().filter(|i| i.stage.is_pending()) {
        if inmail.sender == sender {
            return match policy {
                PendingInmailPolicy::Refuse => Err(SendRefusal::AwaitingResponse),
                PendingInmailPolicy::AllowFollowUps => Ok(Decision::Kind(Kind::FollowUp)),
            };
        }
        if inmail.stage == InmailStage::Staged {
            return Err(SendRefusal::ConcurrentInmail);
        }
        // The recipient's InMail awaits this sender's response.
        return Ok(Decision::Kind(Kind::Reply));
    }
    if pair.open || pair.has_written(recipient) {
        return Ok(Decision::Kind(Kind::Reply));
    }
    match recipient_open_profile {
        None => Ok(Decision::NeedOpenProfile),
        Some(true) => Ok(Decision::Kind(Kind::OpenProfile)),
        Some(false) if recipient_accepts_inmail => Ok(Decision::Kind(Kind::Inmail)),
        Some(false) => Err(SendRefusal::InmailNotAccepted),
    }
}

/// The conversation of two members: both ids, sorted, joined by '~' (a
/// character member ids cannot contain).
pub fn conversation_id(one: &str, other: &str) -> String {
    let (a, b) = sorted(one, other);
    format!("{a}~{b}")
}

pub fn sorted<'a>(one: &'a str, other: &'a str) -> (&'a str, &'a str) {
    if one <= other {
        (one, other)
    } else {
        (other, one)
    }
}

/// The two members of a conversation id, if it is one.
pub fn conversation_members(conversation_id: &str) -> Option<(&str, &str)> {
    let (a, b) = conversation_id.split_once('~')?;
    (is_member_id(a) && is_member_id(b) && a < b).then_some((a, b))
}

/// A message's id, derived from its sender and request id so a retry of the
/// request names the same message (and so the same debit).
pub fn message_id(sender: &str, request_id: &str) -> String {
    format!(
        "m-{}",
        digest(&[b"message", sender.as_bytes(), request_id.as_bytes()])
    )
}

/// The calendar month (UTC) of an instant, as `YYYYMM`: the Open Profile
/// monthly limit counts per calendar month.
pub fn calendar_month(now_ms: i64) -> String {
    use chrono::Datelike;
    let t = inmail_shared::state::clock::millis_to_datetime(now_ms);
    format!("{:04}{:02}", t.year(), t.month())
}

/// Start of the next calendar month (UTC), epoch ms.
pub fn next_month_start_ms(now_ms: i64) -> i64 {
    use chrono::{Datelike, NaiveDate};
    let t = inmail_shared::state::clock::millis_to_datetime(now_ms);
    let (year, month) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc().timestamp_millis())
        .unwrap_or(i64::MAX)
}

/// Why a send ended without a delivery, as stored with its request (a
/// refusal) or its message (a failure), so a retry answers the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    Blocked,
    AwaitingResponse,
    NoInmailAwaitingResponse,
    /// billing refused the debit: no credit left.
    InsufficientCredits,
    /// billing refused the debit: not on a paid plan.
    PaidPlanRequired,
    /// billing released the debit (its hold ran out) before it was confirmed.
    DebitReleased,
    /// The sweeper gave up a send whose process died before the commit,
    /// after billing had taken its credit (given back by the release).
    Abandoned,
    /// The sweeper gave up a send whose process died before billing took
    /// any credit for it.
    AbandonedUncharged,
    /// The send failed after its debit and gave the credit back.
    NotStored,
    /// billing had the message id under another member or amount.
    MessageIdConflict,
}

impl SendFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => reasons::BLOCKED,
            Self::AwaitingResponse => reasons::AWAITING_RESPONSE,
            Self::NoInmailAwaitingResponse => reasons::NO_INMAIL_AWAITING_RESPONSE,
            Self::InsufficientCredits => reasons::INSUFFICIENT_CREDITS,
            Self::PaidPlanRequired => reasons::PAID_PLAN_REQUIRED,
            Self::DebitReleased => reasons::DEBIT_RELEASED,
            Self::Abandoned => "ABANDONED",
            Self::AbandonedUncharged => "ABANDONED_UNCHARGED",
            Self::NotStored => "NOT_STORED",
            Self::MessageIdConflict => reasons::MESSAGE_ID_CONFLICT,
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Blocked,
            Self::AwaitingResponse,
            Self::NoInmailAwaitingResponse,
            Self::InsufficientCredits,
            Self::PaidPlanRequired,
            Self::DebitReleased,
            Self::Abandoned,
            Self::AbandonedUncharged,
            Self::NotStored,
            Self::MessageIdConflict,
        ]
        .into_iter()
        .find(|f| f.as_str() == value)
    }

    /// billing's refusal of a debit or confirmation, as a failure of the send.
    pub fn of_billing(reason: &str) -> Option<Self> {
        match reason {
            reasons::INSUFFICIENT_CREDITS => Some(Self::InsufficientCredits),
            reasons::PAID_PLAN_REQUIRED => Some(Self::PaidPlanRequired),
            reasons::DEBIT_RELEASED => Some(Self::DebitReleased),
            reasons::MESSAGE_ID_CONFLICT => Some(Self::MessageIdConflict),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "sam";
    const R: &str = "rita";

    fn pair() -> Pair {
        Pair::default()
    }

    fn with_inmail(from: &str, stage: InmailStage) -> Pair {
        Pair {
            inmail: Some(InmailInfo {
                message_id: "m-1".into(),
                sender: from.into(),
                sent_at_ms: 1,
                stage,
                responded_at_ms: None,
                refund: None,
                reply_id: None,
            }),
            ..pair()
        }
    }

    fn kind(pair: &Pair, open_profile: Option<bool>) -> Result<Decision, SendRefusal> {
        decide(pair, S, R, PendingInmailPolicy::Refuse, open_profile, true)
    }

    #[test]
    fn a_stranger_needs_the_open_profile_answer_then_pays_an_inmail() {
        assert_eq!(kind(&pair(), None), Ok(Decision::NeedOpenProfile));
        assert_eq!(kind(&pair(), Some(false)), Ok(Decision::Kind(Kind::Inmail)));
        assert_eq!(
            kind(&pair(), Some(true)),
            Ok(Decision::Kind(Kind::OpenProfile))
        );
    }

    #[test]
    fn connections_are_free_and_outrank_open_profile() {
        let p = Pair {
            connected: true,
            ..pair()
        };
        assert_eq!(kind(&p, Some(true)), Ok(Decision::Kind(Kind::Connection)));
    }

    #[test]
    fn blocks_stop_everything_even_connections() {
        let p = Pair {
            connected: true,
            blocked: true,
            ..pair()
        };
        assert_eq!(kind(&p, None), Err(SendRefusal::Blocked));
    }

    #[test]
    fn own_pending_inmail_is_refused_or_a_follow_up_by_policy() {
        for stage in [InmailStage::Staged, InmailStage::AwaitingResponse] {
            let p = with_inmail(S, stage);
            assert_eq!(kind(&p, None), Err(SendRefusal::AwaitingResponse));
            assert_eq!(
                decide(&p, S, R, PendingInmailPolicy::AllowFollowUps, None, true),
                Ok(Decision::Kind(Kind::FollowUp))
            );
        }
    }

    #[test]
    fn writing_back_to_an_inmail_is_a_free_reply() {
        let p = with_inmail(R, InmailStage::AwaitingResponse);
        assert_eq!(kind(&p, None), Ok(Decision::Kind(Kind::Reply)));
    }

    #[test]
    fn after_a_response_both_write_freely() {
        let mut p = with_inmail(S, InmailStage::Declined);
        p.open = true;
        assert_eq!(kind(&p, None), Ok(Decision::Kind(Kind::Reply)));
        let mut q = pair();
        q.written.insert(R.into(), 1);
        assert_eq!(kind(&q, None), Ok(Decision::Kind(Kind::Reply)));
    }

    #[test]
    fn inmail_off_refuses_inmail_but_not_open_profile() {
        assert_eq!(
            decide(
                &pair(),
                S,
                R,
                PendingInmailPolicy::Refuse,
                Some(false),
                false
            ),
            Err(SendRefusal::InmailNotAccepted)
        );
        assert_eq!(
            decide(
                &pair(),
                S,
                R,
                PendingInmailPolicy::Refuse,
                Some(true),
                false
            ),
            Ok(Decision::Kind(Kind::OpenProfile))
        );
    }

    #[test]
    fn conversation_ids_are_symmetric_and_parse_back() {
        assert_eq!(conversation_id("bob", "alice"), "alice~bob");
        assert_eq!(conversation_id("alice", "bob"), "alice~bob");
        assert_eq!(conversation_members("alice~bob"), Some(("alice", "bob")));
        assert_eq!(conversation_members("bob~alice"), None);
        assert_eq!(conversation_members("alice"), None);
        assert_eq!(conversation_members("al ice~bob"), None);
    }

    #[test]
    fn message_ids_are_stable_per_sender_and_request() {
        assert_eq!(message_id("s", "r1"), message_id("s", "r1"));
        assert_ne!(message_id("s", "r1"), message_id("t", "r1"));
        assert_ne!(message_id("s", "r1"), message_id("s", "r2"));
    }

    #[test]
    fn calendar_months_roll_over_the_year() {
        use chrono::TimeZone;
        let dec = chrono::Utc
            .with_ymd_and_hms(2027, 12, 31, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert_eq!(calendar_month(dec), "202712");
        let jan = chrono::Utc
            .with_ymd_and_hms(2028, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert_eq!(next_month_start_ms(dec), jan);
        assert_eq!(calendar_month(jan), "202801");
    }
}
