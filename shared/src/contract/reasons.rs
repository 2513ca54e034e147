//! Every `google.rpc.ErrorInfo` reason the services answer, named once. The
//! services that produce a reason and those that read it (messaging reading
//! billing's refusals, tests, clients) match these constants, never a literal.

// Any service.
/// A request field is malformed (with `BadRequest` field violations).
pub const INVALID_FIELD: &str = "INVALID_FIELD";
/// The request_id was used before with other arguments (AIP-155).
pub const REQUEST_ID_REUSED: &str = "REQUEST_ID_REUSED";
/// Redis cannot be reached or timed out.
pub const STORAGE_UNAVAILABLE: &str = "STORAGE_UNAVAILABLE";
/// The history store (PostgreSQL) cannot be reached: only reads of history
/// older than Redis's hot window need it.
pub const HISTORY_UNAVAILABLE: &str = "HISTORY_UNAVAILABLE";
/// Redis is at its maxmemory and refuses writes (reads go on).
pub const STORAGE_FULL: &str = "STORAGE_FULL";
/// The server is serving its maximum of concurrent calls.
pub const SERVER_OVERLOADED: &str = "SERVER_OVERLOADED";
/// A bug or broken invariant; details stay in the logs.
pub const INTERNAL: &str = "INTERNAL";
/// A downstream answered without a reason of its own.
pub const UPSTREAM_ERROR: &str = "UPSTREAM_ERROR";
/// A downstream could not be reached.
pub const UPSTREAM_UNAVAILABLE: &str = "UPSTREAM_UNAVAILABLE";
/// A concurrent duplicate of the request is still being served.
pub const REQUEST_IN_PROGRESS: &str = "REQUEST_IN_PROGRESS";
/// The caller presented no credentials, or credentials that do not verify.
pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
/// The caller is known but may not do this.
pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
/// The member's quota of changes (new request ids) is spent for now.
pub const MUTATION_RATE_LIMITED: &str = "MUTATION_RATE_LIMITED";
/// No such method is served here (e.g. the test clock when it is off).
pub const UNIMPLEMENTED: &str = "UNIMPLEMENTED";

// Events (WatchInbox, WatchBalance, WatchLedger).
/// A resume token older than the events kept: list again, watch from now.
pub const RESUME_TOKEN_EXPIRED: &str = "RESUME_TOKEN_EXPIRED";
/// The member has the most watches open on this server.
pub const TOO_MANY_WATCHES: &str = "TOO_MANY_WATCHES";
/// The watcher read too slowly: its buffer filled up and the watch ended.
pub const WATCH_BUFFER_FULL: &str = "WATCH_BUFFER_FULL";
/// The server is stopping; watch again elsewhere with the resume token.
pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";

// The test clock.
pub const TEST_CLOCK_DISABLED: &str = "TEST_CLOCK_DISABLED";
pub const CLOCK_WOULD_GO_BACK: &str = "CLOCK_WOULD_GO_BACK";

// subscription-plan.
pub const PLAN_NOT_FOUND: &str = "PLAN_NOT_FOUND";
pub const PLAN_NOT_SUBSCRIBABLE: &str = "PLAN_NOT_SUBSCRIBABLE";
pub const ALREADY_SUBSCRIBED: &str = "ALREADY_SUBSCRIBED";
pub const NOT_SUBSCRIBED: &str = "NOT_SUBSCRIBED";
pub const SAME_PLAN: &str = "SAME_PLAN";
pub const NO_SCHEDULED_CHANGE: &str = "NO_SCHEDULED_CHANGE";
pub const CONCURRENT_MODIFICATION: &str = "CONCURRENT_MODIFICATION";
/// subscription-plan could not be asked (billing's and messaging's reason).
pub const SUBSCRIPTION_PLAN_UNAVAILABLE: &str = "SUBSCRIPTION_PLAN_UNAVAILABLE";

// billing-credits; messaging reads most of them.
/// Out of credits (README.md, "How it behaves").
pub const INSUFFICIENT_CREDITS: &str = "INSUFFICIENT_CREDITS";
/// InMail needs a paid plan (billing and messaging answer it).
pub const PAID_PLAN_REQUIRED: &str = "PAID_PLAN_REQUIRED";
pub const MESSAGE_ID_CONFLICT: &str = "MESSAGE_ID_CONFLICT";
pub const DEBIT_RELEASED: &str = "DEBIT_RELEASED";
pub const DEBIT_NOT_FOUND: &str = "DEBIT_NOT_FOUND";
pub const DEBIT_CONFIRMED: &str = "DEBIT_CONFIRMED";
pub const DEBIT_NOT_CONFIRMED: &str = "DEBIT_NOT_CONFIRMED";
pub const REFUND_WINDOW_CLOSED: &str = "REFUND_WINDOW_CLOSED";
pub const ENTITLEMENT_CHANGING: &str = "ENTITLEMENT_CHANGING";
/// The hold's index entry expired before the debit could be written.
pub const HOLD_WINDOW_MISSED: &str = "HOLD_WINDOW_MISSED";
/// billing-credits could not be asked (messaging's reason).
pub const BILLING_UNAVAILABLE: &str = "BILLING_UNAVAILABLE";
/// A write was not acknowledged by enough Redis replicas in time.
pub const NOT_REPLICATED: &str = "NOT_REPLICATED";

// messaging.
pub const BLOCKED: &str = "BLOCKED";
pub const AWAITING_RESPONSE: &str = "AWAITING_RESPONSE";
pub const INMAIL_NOT_ACCEPTED: &str = "INMAIL_NOT_ACCEPTED";
pub const CONCURRENT_INMAIL: &str = "CONCURRENT_INMAIL";
pub const NO_INMAIL_AWAITING_RESPONSE: &str = "NO_INMAIL_AWAITING_RESPONSE";
pub const SEND_ABANDONED: &str = "SEND_ABANDONED";
pub const INMAIL_RATE_LIMITED: &str = "INMAIL_RATE_LIMITED";
pub const SEND_RATE_LIMITED: &str = "SEND_RATE_LIMITED";
pub const OPEN_PROFILE_MONTHLY_LIMIT: &str = "OPEN_PROFILE_MONTHLY_LIMIT";
pub const CONVERSATION_NOT_FOUND: &str = "CONVERSATION_NOT_FOUND";
pub const CONVERSATION_CHANGING: &str = "CONVERSATION_CHANGING";
pub const RETRY_TO_SEE_RESULT: &str = "RETRY_TO_SEE_RESULT";
/// No pending invitation between the two members in that direction.
pub const INVITATION_NOT_FOUND: &str = "INVITATION_NOT_FOUND";
/// The two members are connected already.
pub const ALREADY_CONNECTED: &str = "ALREADY_CONNECTED";
/// This member's invitation to the other is pending already.
pub const INVITATION_PENDING: &str = "INVITATION_PENDING";
/// A withdrawn or ignored invitation's cooling-off period has not passed.
pub const INVITATION_COOLING_OFF: &str = "INVITATION_COOLING_OFF";
/// The sender's weekly invitation budget is spent.
pub const INVITATION_RATE_LIMITED: &str = "INVITATION_RATE_LIMITED";
/// The sender has as many pending invitations as allowed.
pub const TOO_MANY_PENDING_INVITATIONS: &str = "TOO_MANY_PENDING_INVITATIONS";
/// The member has blocked as many members as allowed.
pub const BLOCK_LIMIT_REACHED: &str = "BLOCK_LIMIT_REACHED";
/// One of the two members has as many connections as allowed.
pub const CONNECTION_LIMIT_REACHED: &str = "CONNECTION_LIMIT_REACHED";

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    const PROTOS: [&str; 4] = [
        include_str!("../../../proto/inmail/plans/v1/plans.proto"),
        include_str!("../../../proto/inmail/billing/v1/billing.proto"),
        include_str!("../../../proto/inmail/messaging/v1/messaging.proto"),
        include_str!("../../../proto/inmail/testclock/v1/test_clock.proto"),
    ];

    const CODES: [&str; 12] = [
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "ABORTED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "INTERNAL",
        "ALREADY_EXISTS",
        "UNIMPLEMENTED",
        "DEADLINE_EXCEEDED",
    ];

    /// The reasons the protos' comments name: the UPPER_SNAKE words in the
    /// parentheses after a gRPC code ("FAILED_PRECONDITION (BLOCKED, ...)").
    fn named_in_protos() -> BTreeSet<String> {
        let mut named = BTreeSet::new();
        for proto in PROTOS {
            let comments: Vec<&str> = proto
                .lines()
                .filter_map(|l| l.trim().strip_prefix("//"))
                .collect();
            let text = comments.join(" ");
            for code in CODES {
                let mut rest = text.as_str();
                while let Some(at) = rest.find(code) {
                    rest = &rest[at + code.len()..];
                    let Some(group) = rest.trim_start().strip_prefix('(') else {
                        continue;
                    };
                    let Some(end) = group.find(')') else { break };
                    for word in
                        group[..end].split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    {
                        let reason = word.len() > 2
                            && word
                                .chars()
                                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                            && word.chars().next().is_some_and(|c| c.is_ascii_uppercase());
                        if reason {
                            named.insert(word.to_string());
                        }
                    }
                }
            }
        }
        named
    }

    /// Every `pub const X: &str = "X";` of this file.
    fn defined() -> BTreeSet<String> {
        include_str!("reasons.rs")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .filter_map(|l| l.split('"').nth(1))
            .map(String::from)
            .collect()
    }

    #[test]
    fn every_reason_the_protos_name_exists_and_every_reason_is_documented() {
        let (named, defined) = (named_in_protos(), defined());
        let undefined: Vec<&String> = named.difference(&defined).collect();
        assert!(
            undefined.is_empty(),
            "reasons named in the protos but not in reasons.rs: {undefined:?}"
        );
        let undocumented: Vec<&String> = defined.difference(&named).collect();
        assert!(
            undocumented.is_empty(),
            "reasons never named in a proto comment: {undocumented:?}"
        );
    }
}
