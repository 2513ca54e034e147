//! What billing's scripts answer, parsed once at the store boundary: a
//! script's reply is JSON with named fields, read into these types; no caller
//! looks at a raw string.

use inmail_shared::contract::reasons;
use serde::Deserialize;

/// How a balance script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done (or a replay of the first reply).
    #[default]
    Ok,
    /// A business refusal; `reason` says which.
    Refused,
    /// No entitlement billing may trust: ask subscription-plan.
    Need,
    /// The entitlement passed in is older than what the account applied.
    Stale,
    /// The request id was used with other arguments.
    Mismatch,
    /// ConfirmDebit found the hold's time run out (nothing recorded).
    Expired,
}

/// Why a script refused, as its reply names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Refusal {
    InsufficientCredits,
    PaidPlanRequired,
    MessageIdConflict,
    DebitReleased,
    DebitNotFound,
    DebitConfirmed,
    DebitNotConfirmed,
    RefundWindowClosed,
    HoldWindowMissed,
    /// RefundMessage's responded_at is before the debit was made.
    RespondedBeforeDebit,
}

impl Refusal {
    /// The ErrorInfo reason of this refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Self::InsufficientCredits => reasons::INSUFFICIENT_CREDITS,
            Self::PaidPlanRequired => reasons::PAID_PLAN_REQUIRED,
            Self::MessageIdConflict => reasons::MESSAGE_ID_CONFLICT,
            Self::DebitReleased => reasons::DEBIT_RELEASED,
            Self::DebitNotFound => reasons::DEBIT_NOT_FOUND,
            Self::DebitConfirmed => reasons::DEBIT_CONFIRMED,
            Self::DebitNotConfirmed => reasons::DEBIT_NOT_CONFIRMED,
            Self::RefundWindowClosed => reasons::REFUND_WINDOW_CLOSED,
            Self::HoldWindowMissed => reasons::HOLD_WINDOW_MISSED,
            Self::RespondedBeforeDebit => reasons::INVALID_FIELD,
        }
    }
}

/// Where a message's debit stands (the record's `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DebitState {
    Held,
    Confirmed,
    Released,
    Refunded,
}

impl DebitState {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "held" => Self::Held,
            "confirmed" => Self::Confirmed,
            "released" => Self::Released,
            "refunded" => Self::Refunded,
            _ => return None,
        })
    }
}

/// Why a debit was released (the record's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReleaseCause {
    MessageNotStored,
    HoldExpired,
    Abandoned,
}

impl ReleaseCause {
    /// As the scripts store it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageNotStored => "MESSAGE_NOT_STORED",
            Self::HoldExpired => "HOLD_EXPIRED",
            Self::Abandoned => "ABANDONED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "MESSAGE_NOT_STORED" => Self::MessageNotStored,
            "HOLD_EXPIRED" => Self::HoldExpired,
            "ABANDONED" => Self::Abandoned,
            _ => return None,
        })
    }
}

/// What every balance script answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Reply {
    pub s: Outcome,
    pub reason: Option<Refusal>,
    /// The plan-period version the account applied ("need"/"stale").
    pub ver: u64,
    pub balance: Option<BalanceView>,
    pub debit: Option<DebitView>,
    pub balance_after: Option<i64>,
    pub released_now: Option<bool>,
    pub refunded_now: Option<bool>,
    pub entry_id: Option<String>,
    /// The first reply of this request id, answered again.
    pub replayed: bool,
    /// Credits moved by this call, for metrics.
    pub renewed: i64,
    pub written_off: i64,
    pub debited: i64,
    pub released: i64,
    pub refunded: i64,
    pub granted: i64,
    /// SetLowBalanceAlert: the threshold set, and whether the balance is at
    /// or below it.
    pub threshold: i64,
    pub low: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BalanceView {
    pub available: i64,
    pub plan: String,
    pub monthly: i64,
    pub cap: i64,
    pub cstart: i64,
    pub cend: i64,
    pub debited: i64,
    pub refunded: i64,
    pub released: i64,
    pub granted: i64,
    pub ver: u64,
}

/// A debit record as a script answers it. Its times (epoch ms) come as
/// JSON numbers or, where the script passes on the string it was given or
/// read, as decimal strings (no float formatting in Lua); a time not
/// reached yet may be left out (0).
#[derive(Debug, Clone, Deserialize)]
pub struct DebitView {
    pub state: DebitState,
    #[serde(default)]
    pub amount: i64,
    #[serde(default, deserialize_with = "millis")]
    pub debited_at: i64,
    #[serde(default, deserialize_with = "millis")]
    pub expires_at: i64,
    #[serde(default, deserialize_with = "millis")]
    pub confirmed_at: i64,
    #[serde(default, deserialize_with = "millis")]
    pub refundable_until: i64,
    #[serde(default, deserialize_with = "millis")]
    pub returned_at: i64,
    #[serde(default)]
    pub reason: Option<ReleaseCause>,
    #[serde(default)]
    pub balance_after: i64,
}

/// Epoch ms as a JSON number or a decimal string.
fn millis<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Millis;
    impl serde::de::Visitor<'_> for Millis {
        type Value = i64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("epoch ms, as a number or a decimal string")
        }

        fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<i64, E> {
            Ok(ms)
        }

        fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<i64, E> {
            i64::try_from(ms).map_err(|_| E::custom(format!("epoch ms out of range: {ms}")))
        }

        fn visit_f64<E: serde::de::Error>(self, ms: f64) -> Result<i64, E> {
            if ms.fract() == 0.0 && ms.abs() < 9.0e15 {
                Ok(ms as i64)
            } else {
                Err(E::custom(format!("not epoch ms: {ms}")))
            }
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<i64, E> {
            text.parse()
                .map_err(|_| E::custom(format!("not epoch ms: {text:?}")))
        }
    }
    deserializer.deserialize_any(Millis)
}

/// The kind of a ledger entry (the entry's `k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Renewal,
    Debit,
    Release,
    Refund,
    Grant,
    WriteOff,
    /// An immediate plan change: the new plan's month less what the cycle used.
    PlanChange,
}

impl EntryKind {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "RENEWAL" => Self::Renewal,
            "DEBIT" => Self::Debit,
            "RELEASE" => Self::Release,
            "REFUND" => Self::Refund,
            "GRANT" => Self::Grant,
            "WRITE_OFF" => Self::WriteOff,
            "PLAN_CHANGE" => Self::PlanChange,
            _ => return None,
        })
    }
}

/// One ledger entry as stored.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub id: String,
    pub kind: Option<EntryKind>,
    pub amount: i64,
    pub balance_after: i64,
    pub at_ms: i64,
    pub message_id: String,
    pub request_id: String,
    pub plan_id: String,
    pub plan_version: u64,
    pub cycle_index: u32,
    pub note: String,
}

impl StoredEntry {
    pub fn parse(id: String, fields: Vec<(String, String)>) -> Self {
        let mut entry = Self {
            id,
            kind: None,
            amount: 0,
            balance_after: 0,
            at_ms: 0,
            message_id: String::new(),
            request_id: String::new(),
            plan_id: String::new(),
            plan_version: 0,
            cycle_index: 0,
            note: String::new(),
        };
        for (name, value) in fields {
            match name.as_str() {
                "k" => entry.kind = EntryKind::parse(&value),
                "a" => entry.amount = value.parse().unwrap_or(0),
                "b" => entry.balance_after = value.parse().unwrap_or(0),
                "t" => entry.at_ms = value.parse().unwrap_or(0),
                "m" => entry.message_id = value,
                "r" => entry.request_id = value,
                "p" => entry.plan_id = value,
                "v" => entry.plan_version = value.parse().unwrap_or(0),
                "c" => entry.cycle_index = value.parse().unwrap_or(0),
                "n" => entry.note = value,
                _ => {}
            }
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_into_types() {
        let reply: Reply = serde_json::from_str(
            r#"{"s":"refused","reason":"INSUFFICIENT_CREDITS","balance":{"available":0}}"#,
        )
        .unwrap();
        assert_eq!(reply.s, Outcome::Refused);
        assert_eq!(reply.reason, Some(Refusal::InsufficientCredits));
        let debit: DebitView =
            serde_json::from_str(r#"{"state":"released","amount":1,"reason":"HOLD_EXPIRED"}"#)
                .unwrap();
        assert_eq!(debit.state, DebitState::Released);
        assert_eq!(debit.reason, Some(ReleaseCause::HoldExpired));
    }

    #[test]
    fn debit_times_parse_from_numbers_or_strings_and_default_to_zero() {
        let debit: DebitView = serde_json::from_str(
            r#"{"state":"held","amount":1,"debited_at":"1795824659926","expires_at":1795824689926}"#,
        )
        .unwrap();
        assert_eq!(
            (debit.debited_at, debit.expires_at, debit.confirmed_at),
            (1_795_824_659_926, 1_795_824_689_926, 0)
        );
        assert!(
            serde_json::from_str::<DebitView>(r#"{"state":"held","debited_at":"soon"}"#).is_err()
        );
    }

    #[test]
    fn an_unknown_status_is_an_error_not_a_default() {
        assert!(serde_json::from_str::<Reply>(r#"{"s":"weird"}"#).is_err());
        assert!(serde_json::from_str::<DebitView>(r#"{"state":"lost"}"#).is_err());
    }
}
