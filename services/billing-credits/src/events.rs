//! Balance events (WatchBalance, README.md "Events"): the scripts copy every
//! ledger entry into the member's event stream and decide the low-balance
//! alerts in the same step (account.lua); this turns those entries into
//! frames.

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::contract::time::ms_to_timestamp;
use inmail_shared::contract::validate::Checks;
use inmail_shared::state::events::{self, Entry, StreamId, Watch};
use inmail_shared::state::paging::PageTokens;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::DOMAIN;
use crate::store::StoredEntry;
use crate::views;

/// The resume tokens' list name (tokens are bound to it and the member).
const TOKEN_LIST: &str = "balance-events";

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
        "this member's balance events",
    )
    .await
}

/// The event an entry of the stream stands for.
pub fn event_of(entry: &Entry) -> Option<pb::BalanceEvent> {
    let text = |name: &str| {
        entry
            .fields
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or_default()
            .to_string()
    };
    let kind = text("k");
    let at_ms: i64 = text("t").parse().ok()?;
    let balance_after: i64 = text("b").parse().ok()?;
    let threshold: i64 = text("h").parse().unwrap_or(0);
    let (kind, entry_view) = match kind.as_str() {
        "LOW_BALANCE" => (pb::BalanceEventKind::LowBalance, None),
        "BALANCE_RECOVERED" => (pb::BalanceEventKind::BalanceRecovered, None),
        _ => {
            let fields = entry
                .fields
                .iter()
                .filter(|(name, _)| name.as_str() != "l" && name.as_str() != "h")
                .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
                .collect();
            let stored = StoredEntry::parse(text("l"), fields);
            (
                pb::BalanceEventKind::LedgerEntry,
                Some(views::entry(&stored)),
            )
        }
    };
    let event_id = match &entry_view {
        Some(ledger) => format!("ledger:{}", ledger.entry_id),
        None => format!("alert:{}", entry.id),
    };
    Some(pb::BalanceEvent {
        event_id,
        kind: kind as i32,
        entry: entry_view,
        balance_after,
        threshold: if kind == pb::BalanceEventKind::LedgerEntry {
            0
        } else {
            threshold
        },
        occurred_at: ms_to_timestamp(at_ms),
    })
}

/// Serves one watch (see [`inmail_shared::state::events::serve_watch`]).
pub async fn serve_watch(
    watch: Watch,
    tokens: PageTokens,
    member: String,
    after: StreamId,
    out: mpsc::Sender<Result<pb::WatchBalanceResponse, Status>>,
) {
    let token_of = |id: StreamId| {
        let tokens = tokens.clone();
        let member = member.clone();
        async move { tokens.encode(TOKEN_LIST, &[&member], &id.to_string()).await }
    };
    let frame_of = |entry: Option<&Entry>, resume_token: String| match entry {
        Some(entry) => Some(pb::WatchBalanceResponse {
            resume_token,
            event: Some(event_of(entry)?),
            heartbeat_at: None,
        }),
        None => Some(pb::WatchBalanceResponse {
            resume_token,
            event: None,
            heartbeat_at: ms_to_timestamp(events::wall_clock_ms()),
        }),
    };
    events::serve_watch(watch, after, DOMAIN, token_of, frame_of, out).await;
}
