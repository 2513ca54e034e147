//! The messaging service's shape: its parts, its configuration, and what a
//! send answers.

use std::sync::Arc;
use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::state::clock::Clock;

use crate::domain::{self, PendingInmailPolicy};
use crate::downstream::{Billing, Plans};
use crate::history::MessageHistory;
use crate::store::{InvitationLimits, MessagingStore, SendLimits, StoredMessage};

/// A hook tests use to break the saga right after the debit (a store
/// failure, or stopping billing): it answers the error to inject, if any.
/// Not reachable from configuration.
pub type AfterDebitHook = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<ApiError>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Default)]
pub struct Faults {
    pub after_debit: Option<AfterDebitHook>,
    /// Breaks a free send right after its message was delivered, before its
    /// events are appended (as if the process died there).
    pub after_deliver: Option<AfterDebitHook>,
    /// Breaks an accept or decline right after the response was recorded,
    /// before its refund and events (as if the process died there).
    pub after_respond: Option<AfterDebitHook>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("after_debit", &self.after_debit.is_some())
            .field("after_deliver", &self.after_deliver.is_some())
            .field("after_respond", &self.after_respond.is_some())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: PendingInmailPolicy,
    pub limits: SendLimits,
    pub invitations: InvitationLimits,
    /// A response within this long after sending refunds the InMail.
    pub refund_window: Duration,
    /// When the sweeper looks at a send that has not finished.
    pub recovery_after: Duration,
    /// When the sweeper retries a refund billing did not take.
    pub refund_retry: Duration,
    /// How long a failed message is kept (for replays of its request).
    pub failed_keep: Duration,
    /// The most bytes one page of a list answers (at least one item).
    pub page_bytes: usize,
    /// How much of each member's inbox events is kept.
    pub events: EventRetention,
    pub faults: Faults,
}

/// How much of each member's inbox events is kept (README.md, "Events").
#[derive(Debug, Clone, Copy)]
pub struct EventRetention {
    /// The most events kept per member.
    pub keep: usize,
    /// How long an event is kept.
    pub retention: Duration,
}

/// Whether a response brought the sender's credit back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refund {
    None,
    Refunded,
    Pending,
    WindowClosed,
}

impl Refund {
    /// What a response's recorded refund state means for its answer.
    pub fn of(state: Option<domain::RefundState>) -> Self {
        match state {
            Some(domain::RefundState::Refunded) => Self::Refunded,
            Some(domain::RefundState::Due) => Self::Pending,
            Some(domain::RefundState::Closed) => Self::WindowClosed,
            None => Self::None,
        }
    }
}

/// A delivered message and what it cost.
#[derive(Debug, Clone)]
pub struct Sent {
    pub conv: String,
    pub message: StoredMessage,
    pub balance_after: Option<i64>,
    pub refund: Refund,
}

/// One send request.
#[derive(Debug, Clone)]
pub struct SendInput<'a> {
    pub request_id: &'a str,
    pub fingerprint: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    /// The sender's one response to the recipient's InMail (RespondToInmail
    /// REPLY).
    pub answering: bool,
}

#[derive(Clone)]
pub struct Messaging {
    pub(crate) store: MessagingStore,
    pub(crate) billing: Billing,
    pub(crate) plans: Plans,
    pub(crate) clock: Clock,
    pub(crate) config: Arc<Config>,
    /// Where delivered messages older than the hot window live (none: they
    /// stay in Redis).
    pub(crate) history: Option<MessageHistory>,
}

impl Messaging {
    pub fn new(
        store: MessagingStore,
        billing: Billing,
        plans: Plans,
        clock: Clock,
        config: Config,
    ) -> Self {
        Self {
            store,
            billing,
            plans,
            clock,
            config: Arc::new(config),
            history: None,
        }
    }

    /// Reads archived messages from `history` where Redis no longer has them.
    pub fn with_history(mut self, history: MessageHistory) -> Self {
        self.history = Some(history);
        self
    }

    pub fn store(&self) -> &MessagingStore {
        &self.store
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The most bytes one page of a list answers (at least one item).
    pub fn page_bytes(&self) -> usize {
        self.config.page_bytes
    }

    pub(crate) fn window_ms(&self) -> i64 {
        self.config.refund_window.as_millis() as i64
    }

    pub(crate) fn recovery_after_ms(&self) -> i64 {
        self.config.recovery_after.as_millis() as i64
    }
}
