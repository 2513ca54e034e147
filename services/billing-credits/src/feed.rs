//! The operators' ledger feed (WatchLedger, README.md "Events"): every
//! ledger entry of every member, from the members' balance event streams.
//!
//! Which members to read comes from the feed index (`billing:cdc:{p<N>}`),
//! written before every balance script, so no member whose events changed
//! is missed. Per partition the feed emits entries in the order of (stream
//! id, member) up to a watermark `CDC_LAG` behind Redis' clock: the events'
//! ids come from that clock and only grow, so once it has passed the
//! watermark no entry at or before it can still appear. The resume token
//! holds each partition's last (id, member) emitted.

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::contract::reasons;
use inmail_shared::contract::time::ms_to_timestamp;
use inmail_shared::contract::validate::Checks;
use inmail_shared::state::events::{EndReason, StreamId};
use inmail_shared::state::paging::PageTokens;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::error::DOMAIN;
use crate::store::BillingStore;
use crate::store::keys::CDC_PARTITIONS;

const TOKEN_LIST: &str = "ledger-feed";

/// How the feed runs.
#[derive(Debug, Clone, Copy)]
pub struct FeedSettings {
    /// How far behind Redis' clock the watermark stays.
    pub lag: Duration,
    /// How often the feed looks for new entries.
    pub poll: Duration,
    /// A heartbeat after this long without a frame.
    pub heartbeat: Duration,
    /// How long events are kept (older tokens are refused).
    pub retention: Duration,
    /// How much earlier than an event its index entry may be stamped (a
    /// script runs within its call's deadline of the index write; clocks
    /// differ a little).
    pub index_margin: Duration,
}

/// One partition's position: the last (event id, member) emitted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub id: StreamId,
    pub member: String,
}

/// Every partition's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedToken(pub Vec<Position>);

impl FeedToken {
    fn encode(&self) -> String {
        self.0
            .iter()
            .map(|p| format!("{}/{}", p.id, p.member))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn decode(text: &str) -> Option<Self> {
        let positions: Option<Vec<Position>> = text
            .split(',')
            .map(|part| {
                let (id, member) = part.split_once('/')?;
                Some(Position {
                    id: StreamId::parse(id)?,
                    member: member.to_string(),
                })
            })
            .collect();
        positions
            .filter(|p| p.len() == CDC_PARTITIONS as usize)
            .map(Self)
    }

    /// Every partition at `id` (from then on).
    fn at(id: StreamId) -> Self {
        Self(
            (0..CDC_PARTITIONS)
                .map(|_| Position {
                    id,
                    member: String::new(),
                })
                .collect(),
        )
    }
}

/// Reads `resume_token` (None: from now); a token that does not verify is
/// added to `checks`.
pub async fn decode_token(
    tokens: &PageTokens,
    checks: &mut Checks,
    token: &str,
) -> Result<Option<FeedToken>, ApiError> {
    let mut own = Checks::new();
    let cursor = tokens.decode(&mut own, TOKEN_LIST, &[], token).await?;
    let decoded = cursor.as_deref().and_then(FeedToken::decode);
    if !own.is_empty() || (cursor.is_some() && decoded.is_none()) {
        checks.add(
            "resume_token",
            "is not a resume_token of the ledger feed (use a frame's resume_token as-is)",
        );
    }
    Ok(decoded)
}

/// Where a feed starts: after `token`, or now; an expired token is refused.
pub async fn start(
    store: &BillingStore,
    settings: &FeedSettings,
    token: Option<FeedToken>,
) -> Result<FeedToken, ApiError> {
    let now = store.redis_time_ms().await?;
    match token {
        None => Ok(FeedToken::at(StreamId(now.saturating_sub(1), u64::MAX))),
        Some(token) => {
            let oldest = now.saturating_sub(settings.retention.as_millis() as u64);
            if token.0.iter().any(|p| p.id.0 < oldest) {
                return Err(ApiError::failed_precondition(
                    reasons::RESUME_TOKEN_EXPIRED,
                    "resume_token is older than the events kept (EVENTS_RETENTION); start again with an empty token",
                ));
            }
            Ok(token)
        }
    }
}

/// Serves one feed until the client leaves, `stop` is cancelled (then
/// UNAVAILABLE SHUTTING_DOWN with the token) or Redis fails.
pub async fn serve(
    store: BillingStore,
    tokens: PageTokens,
    settings: FeedSettings,
    mut position: FeedToken,
    stop: CancellationToken,
    out: mpsc::Sender<Result<pb::WatchLedgerResponse, Status>>,
) {
    let mut last_frame = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                let token = tokens.encode(TOKEN_LIST, &[], &position.encode()).await.unwrap_or_default();
                let _ = out.send(Err(EndReason::ShuttingDown.status(DOMAIN, &token))).await;
                return;
            }
            () = out.closed() => return,
            () = tokio::time::sleep(settings.poll) => {}
        }
        match advance(&store, &tokens, &settings, &mut position, &out).await {
            Ok(0) => {}
            Ok(_) => last_frame = tokio::time::Instant::now(),
            Err(Sent::Gone) => return,
            Err(Sent::Failed(err)) => {
                let _ = out.send(Err(err.into_status(DOMAIN))).await;
                return;
            }
        }
        if last_frame.elapsed() >= settings.heartbeat {
            let Ok(resume_token) = tokens.encode(TOKEN_LIST, &[], &position.encode()).await else {
                continue;
            };
            let frame = pb::WatchLedgerResponse {
                resume_token,
                member_id: String::new(),
                event: None,
                heartbeat_at: ms_to_timestamp(inmail_shared::state::events::wall_clock_ms()),
            };
            if out.send(Ok(frame)).await.is_err() {
                return;
            }
            last_frame = tokio::time::Instant::now();
        }
    }
}

enum Sent {
    Gone,
    Failed(ApiError),
}

impl From<ApiError> for Sent {
    fn from(err: ApiError) -> Self {
        Self::Failed(err)
    }
}

/// Emits every partition's entries up to the watermark; answers how many.
async fn advance(
    store: &BillingStore,
    tokens: &PageTokens,
    settings: &FeedSettings,
    position: &mut FeedToken,
    out: &mpsc::Sender<Result<pb::WatchLedgerResponse, Status>>,
) -> Result<usize, Sent> {
    let now = store.redis_time_ms().await?;
    let watermark = StreamId(
        now.saturating_sub(settings.lag.as_millis() as u64),
        u64::MAX,
    );
    let margin = settings.index_margin.as_millis() as i64;
    let retention = settings.retention.as_millis() as i64;
    let mut sent = 0;
    for partition in 0..CDC_PARTITIONS as usize {
        let from = position.0[partition].clone();
        if from.id >= watermark {
            continue;
        }
        // The index is stamped with the services' wall clock, Redis' ids
        // with Redis' own: the margin covers both the call's time and skew.
        let since = from.id.0 as i64 - margin;
        let forget = inmail_shared::state::events::wall_clock_ms() - retention - margin;
        let members = store.feed_members(partition as u32, since, forget).await?;
        let mut entries = store.events_between(&members, from.id, watermark).await?;
        entries.sort_by(|(a_member, a), (b_member, b)| {
            (a.id, a_member.as_str()).cmp(&(b.id, b_member.as_str()))
        });
        for (member, entry) in entries {
            let at = Position {
                id: entry.id,
                member: member.clone(),
            };
            if at <= from {
                continue;
            }
            position.0[partition] = at;
            let Some(event) = crate::events::event_of(&entry)
                .filter(|e| e.kind() == pb::BalanceEventKind::LedgerEntry)
            else {
                continue;
            };
            let resume_token = tokens.encode(TOKEN_LIST, &[], &position.encode()).await?;
            let frame = pb::WatchLedgerResponse {
                resume_token,
                member_id: member,
                event: Some(event),
                heartbeat_at: None,
            };
            out.send(Ok(frame)).await.map_err(|_| Sent::Gone)?;
            sent += 1;
        }
        position.0[partition] = Position {
            id: watermark,
            member: String::new(),
        };
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_token_round_trips_and_refuses_the_wrong_shape() {
        let mut token = FeedToken::at(StreamId(5, 1));
        token.0[3] = Position {
            id: StreamId(7, 0),
            member: "sam".into(),
        };
        assert_eq!(FeedToken::decode(&token.encode()), Some(token));
        assert_eq!(FeedToken::decode("1-0/a"), None);
    }

    #[test]
    fn positions_order_by_id_then_member() {
        let a = Position {
            id: StreamId(5, 0),
            member: "b".into(),
        };
        let b = Position {
            id: StreamId(5, 0),
            member: "c".into(),
        };
        assert!(a < b);
        assert!(
            Position {
                id: StreamId(4, 9),
                member: "z".into()
            } < a
        );
    }
}
