//! subscription-plan's Redis keys and its one script. Every key of a member
//! carries the member's hash tag, so the script touches one slot (Redis
//! Cluster) and runs atomically.
//!
//! Keys (prefix `plans:`):
//! - `plans:{M}:subscription` hash: `rev` (grows at every write), `state`
//!   (the member's [`SubscriptionState`] as JSON).
//! - `plans:{M}:request:<request_id>` hash: `fp` (fingerprint of the
//!   arguments), `outcome` (the first outcome, JSON). Expires after 7 days.
//! - `plans:{M}:rev` string: the subscription's revision, published for
//!   billing-credits (written with every change; billing's scripts read it
//!   to know whether their cached entitlement still holds, and billing's
//!   Redis user may reach this key and no other of ours). Absent: 0.

use inmail_shared::ApiError;
use inmail_shared::idempotency::{Outcome, REQUEST_RETENTION};
use inmail_shared::storage::Redis;
use redis::Script;

use crate::domain::SubscriptionState;

/// Commits a change; see the script's header.
const COMMIT: &str = include_str!("lua/commit.lua");

fn subscription_key(member: &str) -> String {
    format!("plans:{{{member}}}:subscription")
}

/// The published revision (see the module header); billing-credits reads
/// it under the same name.
pub fn revision_key(member: &str) -> String {
    format!("plans:{{{member}}}:rev")
}

fn request_key(member: &str, request_id: &str) -> String {
    format!("plans:{{{member}}}:request:{request_id}")
}

/// A member's stored subscription and, for a mutation, its request record.
#[derive(Debug)]
pub struct Loaded {
    pub rev: u64,
    /// The revision published for billing (0 before the first change that
    /// published one).
    pub published: u64,
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
}

#[derive(Clone)]
pub struct PlanStore {
    redis: Redis,
    commit: Script,
}

impl PlanStore {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            commit: Script::new(COMMIT),
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
        if let Some((request_id, _)) = request {
            pipe.cmd("HMGET")
                .arg(request_key(member, request_id))
                .arg("fp")
                .arg("outcome");
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut self.redis.conn()).await?;
        let published: Option<u64> = redis::from_redis_value(replies.remove(1))
            .map_err(|e| ApiError::internal(format!("bad published revision: {e}")))?;
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
        let reply: Vec<String> = self
            .commit
            .key(subscription_key(member))
            .key(request_key(member, request_id))
            .key(revision_key(member))
            .arg(rev)
            .arg(state_json)
            .arg(fingerprint)
            .arg(outcome_json)
            .arg(REQUEST_RETENTION.as_millis() as u64)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.redis.acknowledge(&[&subscription_key(member)]).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Committed::Ok),
            Some("conflict") => Ok(Committed::Conflict),
            Some("mismatch") => Ok(Committed::Mismatch),
            Some("done") => Ok(Committed::Done(decode_outcome(
                reply.get(1).map(String::as_str).unwrap_or_default(),
            )?)),
            _ => Err(ApiError::internal(
                "unexpected reply from the commit script",
            )),
        }
    }
}

fn decode_outcome(json: &str) -> Result<Outcome, ApiError> {
    serde_json::from_str(json).map_err(|e| ApiError::internal(format!("unreadable outcome: {e}")))
}
