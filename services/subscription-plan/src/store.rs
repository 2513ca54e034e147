//! subscription-plan's Redis keys and its one script. Every key of a member
//! carries the member's hash tag, so the script touches one slot (Redis
//! Cluster) and runs atomically.
//!
//! Keys (prefix `plans:`):
//! - `plans:{M}:subscription` hash: `rev` (grows at every write), `state`
//!   (the member's [`SubscriptionState`] as JSON).
//! - `plans:{M}:request:<request_id>` hash: `fp` (fingerprint of the
//!   arguments), `outcome` (the first outcome, JSON). Expires after 7 days.
//! - `plans:{M}:rev` and `plans:{M}:open` strings: the revision and the
//!   Open Profile published for the other services (written with every
//!   change; see `inmail_shared::state::published`). Billing's Redis user may reach
//!   the revision, messaging's may read both and `plans:published`, and no
//!   other key of ours.
//! - `plans:published`: set once every stored subscription has both (after
//!   the start-up backfill of subscriptions stored before they existed), so
//!   a member with neither never subscribed.

use inmail_shared::ApiError;
use inmail_shared::state::idempotency::{Outcome, Quota, REQUEST_RETENTION};
use inmail_shared::state::published::{self, OpenProfile};
use inmail_shared::state::storage::Redis;
use redis::Script;

use crate::domain::SubscriptionState;

/// Commits a change; see the script's header.
const COMMIT: &str = concat!(
    include_str!("../../../shared/src/state/lua/bucket.lua"),
    include_str!("lua/commit.lua")
);
/// Publishes what the last write did not; see the script's header.
const PUBLISH: &str = include_str!("lua/publish.lua");

/// The scripts by name, as sent to Redis (what a profile labels their
/// hashes with).
pub const SCRIPTS: [(&str, &str); 2] = [("commit", COMMIT), ("publish", PUBLISH)];

fn subscription_key(member: &str) -> String {
    format!("plans:{{{member}}}:subscription")
}

/// The published revision (see the module header).
pub fn revision_key(member: &str) -> String {
    published::revision_key(member)
}

fn quota_key(member: &str) -> String {
    format!("plans:{{{member}}}:quota")
}

fn request_key(member: &str, request_id: &str) -> String {
    format!("plans:{{{member}}}:request:{request_id}")
}

/// A member's stored subscription and, for a mutation, its request record.
#[derive(Debug)]
pub struct Loaded {
    pub rev: u64,
    /// The published revision (0 before the first change that published
    /// one).
    pub published: u64,
    /// The published Open Profile, as stored.
    pub open: Option<String>,
    pub state: Option<SubscriptionState>,
    pub request: RequestSeen,
}

#[derive(Debug)]
pub enum RequestSeen {
    /// Not a mutation, or a request id not seen before.
    New,
    /// Seen with the same fingerprint and an outcome.
    Done(Outcome),
    /// Seen with other arguments.
    Mismatch,
}

#[derive(Debug)]
pub enum Committed {
    Ok,
    /// Someone else changed the state first; read again.
    Conflict,
    Done(Outcome),
    Mismatch,
    /// A new request id past the member's mutation quota: nothing written.
    Limited(std::time::Duration),
}

#[derive(Clone)]
pub struct PlanStore {
    redis: Redis,
    commit: Script,
    publish: Script,
    quota: Quota,
}

impl PlanStore {
    /// `quota`: each member's quota of changes, which every commit of a
    /// new request id spends from.
    pub fn new(redis: Redis, quota: Quota) -> Self {
        Self {
            redis,
            commit: Script::new(COMMIT),
            publish: Script::new(PUBLISH),
            quota,
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Reads the member's state and (with a request id) its request record in
    /// one round trip.
    pub async fn load(
        &self,
        member: &str,
        request: Option<(&str, &str)>,
    ) -> Result<Loaded, ApiError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(subscription_key(member))
            .arg("rev")
            .arg("state");
        pipe.cmd("GET").arg(revision_key(member));
        pipe.cmd("GET").arg(published::open_profile_key(member));
        if let Some((request_id, _)) = request {
            pipe.cmd("HMGET")
                .arg(request_key(member, request_id))
                .arg("fp")
                .arg("outcome");
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut self.redis.conn()).await?;
        let published: Option<u64> = redis::from_redis_value(replies.remove(1))
            .map_err(|e| ApiError::internal(format!("bad published revision: {e}")))?;
        let open: Option<String> = redis::from_redis_value(replies.remove(1))
            .map_err(|e| ApiError::internal(format!("bad published Open Profile: {e}")))?;
        let mut replies: Vec<Vec<Option<String>>> = replies
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::internal(format!("unreadable subscription: {e}")))?;
        let request_seen = match (request, replies.get(1)) {
            (Some((_, fingerprint)), Some(record)) => match (&record[0], &record[1]) {
                (Some(fp), _) if fp != fingerprint => RequestSeen::Mismatch,
                (Some(_), Some(outcome)) => RequestSeen::Done(decode_outcome(outcome)?),
                _ => RequestSeen::New,
            },
            _ => RequestSeen::New,
        };
        let subscription = replies.swap_remove(0);
        let rev = subscription[0]
            .as_deref()
            .map(|r| r.parse::<u64>())
            .transpose()
            .map_err(|e| ApiError::internal(format!("bad revision: {e}")))?
            .unwrap_or(0);
        let state = subscription[1]
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| ApiError::internal(format!("unreadable subscription state: {e}")))?;
        Ok(Loaded {
            rev,
            published: published.unwrap_or(0),
            open,
            state,
            request: request_seen,
        })
    }

    /// Writes `state` (or, for a refusal, nothing but the outcome) if the
    /// revision is still `rev`.
    pub async fn commit(
        &self,
        member: &str,
        request_id: &str,
        fingerprint: &str,
        rev: u64,
        state: Option<&SubscriptionState>,
        outcome: &Outcome,
    ) -> Result<Committed, ApiError> {
        let state_json = match state {
            Some(state) => serde_json::to_string(state)
                .map_err(|e| ApiError::internal(format!("cannot encode state: {e}")))?,
            None => String::new(),
        };
        let outcome_json = serde_json::to_string(outcome)
            .map_err(|e| ApiError::internal(format!("cannot encode outcome: {e}")))?;
        let open = state
            .map(|s| s.open_profile_schedule().encode(rev + 1))
            .unwrap_or_default();
        let reply: Vec<String> = self
            .commit
            .key(subscription_key(member))
            .key(request_key(member, request_id))
            .key(revision_key(member))
            .key(published::open_profile_key(member))
            .key(quota_key(member))
            .arg(rev)
            .arg(state_json)
            .arg(fingerprint)
            .arg(outcome_json)
            .arg(REQUEST_RETENTION.as_millis() as u64)
            .arg(open)
            .arg(self.quota.burst)
            .arg(self.quota.rate_arg())
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.redis.acknowledge(&[&subscription_key(member)]).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Committed::Ok),
            Some("conflict") => Ok(Committed::Conflict),
            Some("mismatch") => Ok(Committed::Mismatch),
            Some("limited") => Ok(Committed::Limited(std::time::Duration::from_millis(
                reply.get(1).and_then(|ms| ms.parse().ok()).unwrap_or(0),
            ))),
            Some("done") => Ok(Committed::Done(decode_outcome(
                reply.get(1).map(String::as_str).unwrap_or_default(),
            )?)),
            _ => Err(ApiError::internal(
                "unexpected reply from the commit script",
            )),
        }
    }
}

impl Loaded {
    /// Whether the published revision and Open Profile say what this
    /// state does (else [`PlanStore::publish`] them).
    pub fn is_published(&self) -> bool {
        self.published == self.rev
            && self
                .open
                .as_deref()
                .and_then(OpenProfile::decode)
                .is_some_and(|(tag, _)| tag == self.rev)
    }
}

impl PlanStore {
    /// Publishes every stored subscription that lacks its published
    /// revision or Open Profile, then sets `plans:published`; does nothing
    /// once that is set. Answers how many it published.
    pub async fn publish_all(&self) -> Result<u64, ApiError> {
        let done: Option<String> = redis::cmd("GET")
            .arg(published::ALL_PUBLISHED_KEY)
            .query_async(&mut self.redis.conn())
            .await?;
        if done.is_some() {
            return Ok(0);
        }
        let mut published = 0;
        let mut cursor = "0".to_string();
        loop {
            let (next, keys) = self
                .redis
                .scan(&cursor, "plans:{*}:subscription", 500)
                .await?;
            for key in keys {
                let Some(member) = key
                    .strip_prefix("plans:{")
                    .and_then(|k| k.strip_suffix("}:subscription"))
                else {
                    continue;
                };
                let loaded = self.load(member, None).await?;
                if let Some(state) = &loaded.state
                    && !loaded.is_published()
                    && self
                        .publish(member, loaded.rev, &state.open_profile_schedule())
                        .await?
                {
                    published += 1;
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let _: () = redis::cmd("SET")
            .arg(published::ALL_PUBLISHED_KEY)
            .arg(1)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(published)
    }

    /// Publishes the revision `rev` and `open`, computed from the state at
    /// that revision, unless the subscription changed since.
    pub async fn publish(
        &self,
        member: &str,
        rev: u64,
        open: &OpenProfile,
    ) -> Result<bool, ApiError> {
        let published: i64 = self
            .publish
            .key(subscription_key(member))
            .key(revision_key(member))
            .key(published::open_profile_key(member))
            .arg(rev)
            .arg(open.encode(rev))
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(published == 1)
    }
}

fn decode_outcome(json: &str) -> Result<Outcome, ApiError> {
    serde_json::from_str(json).map_err(|e| ApiError::internal(format!("unreadable outcome: {e}")))
}
