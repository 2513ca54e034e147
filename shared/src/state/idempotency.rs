//! AIP-155 request ids: a retry with the same `request_id` gets the first
//! outcome; the same id with different arguments is refused.
//!
//! Billing and subscription-plan keep their request records inside their own
//! Lua scripts (one atomic step with the change). Operations that span several
//! keys use [`RequestLog`]: claim the id (recording a fingerprint of the
//! arguments), do the idempotent work, then store the outcome.

use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::contract::error::ApiError;
use crate::contract::reasons;
use crate::state::storage::Redis;

/// How long a request id is remembered.
pub const REQUEST_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A digest of a request's arguments (the request with `request_id` cleared)
/// and of its type, so look-alike requests of two RPCs never match.
pub fn fingerprint<M: prost::Message + prost::Name>(request_without_id: &M) -> String {
    digest(&[
        M::full_name().as_bytes(),
        &request_without_id.encode_to_vec(),
    ])
}

/// What [`RequestLog::run`] needs of the call it serves (the runtime's call
/// context implements it).
pub trait ServedCall {
    /// Whether a member makes the call as itself: only those calls spend the
    /// member's mutation quota.
    fn is_members_own(&self) -> bool;
    /// Time left before the call's deadline.
    fn remaining(&self) -> Duration;
}

/// A mutating request: it carries a `request_id` (AIP-155), and its
/// fingerprint is the digest of everything else.
pub trait Mutation: prost::Message + prost::Name + Clone {
    fn request_id(&self) -> &str;
    fn request_id_mut(&mut self) -> &mut String;

    /// The fingerprint of the arguments (the request without its id).
    fn fingerprint(&self) -> String {
        let mut without_id = self.clone();
        without_id.request_id_mut().clear();
        fingerprint(&without_id)
    }
}

/// Implements [`Mutation`] for generated request types with a
/// `request_id` field.
#[macro_export]
macro_rules! mutations {
    ($($request:ty),* $(,)?) => {
        $(
            impl $crate::state::idempotency::Mutation for $request {
                fn request_id(&self) -> &str {
                    &self.request_id
                }
                fn request_id_mut(&mut self) -> &mut String {
                    &mut self.request_id
                }
            }
        )*
    };
}

// Every generated request with a `request_id` (the contract layer generates
// them; their idempotency belongs to this layer).
crate::mutations!(
    crate::contract::proto::plans::v1::SubscribeRequest,
    crate::contract::proto::plans::v1::ChangePlanRequest,
    crate::contract::proto::plans::v1::CancelSubscriptionRequest,
    crate::contract::proto::plans::v1::ClearScheduledChangeRequest,
    crate::contract::proto::plans::v1::SetOpenProfileRequest,
    crate::contract::proto::billing::v1::DebitForMessageRequest,
    crate::contract::proto::billing::v1::ConfirmDebitRequest,
    crate::contract::proto::billing::v1::ReleaseDebitRequest,
    crate::contract::proto::billing::v1::RefundMessageRequest,
    crate::contract::proto::billing::v1::GrantCreditsRequest,
    crate::contract::proto::messaging::v1::SendInvitationRequest,
    crate::contract::proto::messaging::v1::AcceptInvitationRequest,
    crate::contract::proto::messaging::v1::IgnoreInvitationRequest,
    crate::contract::proto::messaging::v1::WithdrawInvitationRequest,
    crate::contract::proto::messaging::v1::AddConnectionRequest,
    crate::contract::proto::messaging::v1::RemoveConnectionRequest,
    crate::contract::proto::messaging::v1::BlockMemberRequest,
    crate::contract::proto::messaging::v1::UnblockMemberRequest,
    crate::contract::proto::messaging::v1::SetInmailPreferenceRequest,
    crate::contract::proto::messaging::v1::SendMessageRequest,
    crate::contract::proto::messaging::v1::RespondToInmailRequest,
    crate::contract::proto::testclock::v1::AdvanceTimeRequest,
    crate::contract::proto::testclock::v1::SetTimeRequest,
);

/// Hex SHA-256 (first 128 bits) of the parts, length-prefixed so that
/// ("ab","c") and ("a","bc") differ.
pub fn digest(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..16])
}

/// What a stored request produced: a response or a final (non-transient) error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outcome {
    /// The encoded response message.
    Response(Vec<u8>),
    /// A business refusal (code, reason, message).
    Refused {
        code: i32,
        reason: String,
        message: String,
    },
}

impl Outcome {
    pub fn of<M: prost::Message>(result: &Result<M, ApiError>) -> Option<Self> {
        match result {
            Ok(response) => Some(Self::Response(response.encode_to_vec())),
            Err(err) if err.is_transient() => None,
            Err(err) => Some(Self::Refused {
                code: err.code() as i32,
                reason: err.reason().to_string(),
                message: err.message().to_string(),
            }),
        }
    }

    pub fn into_result<M: prost::Message + Default>(self) -> Result<M, ApiError> {
        match self {
            Self::Response(bytes) => M::decode(bytes.as_slice())
                .map_err(|e| ApiError::internal(format!("stored response is unreadable: {e}"))),
            Self::Refused {
                code,
                reason,
                message,
            } => Err(ApiError::from_parts(Code::from(code), &reason, message)),
        }
    }
}

/// A member's mutation quota: a token bucket every new request id of the
/// member spends from (README.md, "Abuse bounds").
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub burst: u32,
    pub tokens_per_ms: f64,
}

impl Quota {
    pub fn per_day(burst: u32, per_day: u32) -> Self {
        Self {
            burst,
            tokens_per_ms: f64::from(per_day) / 86_400_000.0,
        }
    }

    /// The bucket's rate as scripts take it.
    pub fn rate_arg(&self) -> String {
        format!("{:.12e}", self.tokens_per_ms)
    }
}

/// The refusal of a mutation past the member's quota.
pub fn mutation_rate_limited(retry_after: Duration) -> ApiError {
    ApiError::resource_exhausted(
        reasons::MUTATION_RATE_LIMITED,
        format!(
            "this member made too many changes; the next one is allowed in {}s",
            retry_after.as_secs().max(1)
        ),
        retry_after,
    )
}

/// The state of a request id when claimed.
#[derive(Debug)]
pub enum Claim {
    /// This caller owns the request: do the work, then
    /// [`RequestLog::complete`].
    New,
    /// Another caller owns it and is still within its lease: wait for its
    /// outcome (about this long at most).
    Wait(Duration),
    /// Done before: answer this.
    Done(Outcome),
    /// A new request id past the member's quota: refused, nothing kept.
    Limited(Duration),
}

const CLAIM_SCRIPT: &str = concat!(
    include_str!("lua/bucket.lua"),
    include_str!("lua/request_claim.lua")
);

const COMPLETE_SCRIPT: &str = include_str!("lua/request_complete.lua");

/// The scripts by name, as sent to Redis (what a profile labels their
/// hashes with).
pub const SCRIPTS: [(&str, &str); 2] = [
    ("request_claim", CLAIM_SCRIPT),
    ("request_complete", COMPLETE_SCRIPT),
];

/// Request records under caller-chosen keys (each key carries the hash tag of
/// the member it belongs to), one caller at a time per request: the first
/// does the work under a lease, concurrent duplicates wait for its outcome,
/// and a lease whose owner died is taken over.
#[derive(Clone)]
pub struct RequestLog {
    redis: Redis,
    claim: Script,
    complete: Script,
    lease: Duration,
}

/// How often a waiting duplicate looks for the owner's outcome.
const WAIT_POLL: Duration = Duration::from_millis(20);

impl RequestLog {
    /// `lease`: the longest an owner may take (its calls' time bound).
    pub fn new(redis: Redis, lease: Duration) -> Self {
        Self {
            redis,
            claim: Script::new(CLAIM_SCRIPT),
            complete: Script::new(COMPLETE_SCRIPT),
            lease,
        }
    }

    /// Claims `key` for `owner`; a new request id spends a token of the
    /// quota at `quota_key` (in the record's slot), when given.
    pub async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        owner: &str,
        quota: Option<(&str, Quota)>,
    ) -> Result<Claim, ApiError> {
        let mut invocation = self.claim.key(key);
        invocation
            .arg(fingerprint)
            .arg(REQUEST_RETENTION.as_millis() as u64)
            .arg(self.lease.as_millis() as u64)
            .arg(owner);
        if let Some((quota_key, quota)) = quota {
            invocation
                .key(quota_key)
                .arg(quota.burst)
                .arg(quota.rate_arg());
        }
        let reply: Vec<Vec<u8>> = invocation.invoke_async(&mut self.redis.conn()).await?;
        let millis = |reply: &[Vec<u8>]| {
            reply
                .get(1)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match reply.first().map(Vec::as_slice) {
            Some(b"new") => Ok(Claim::New),
            Some(b"wait") => Ok(Claim::Wait(Duration::from_millis(millis(&reply)))),
            Some(b"limited") => Ok(Claim::Limited(Duration::from_millis(millis(&reply)))),
            Some(b"mismatch") => Err(ApiError::request_id_reused()),
            Some(b"done") => {
                let stored = reply
                    .get(1)
                    .ok_or_else(|| ApiError::internal("request record without outcome"))?;
                let outcome = serde_json::from_slice(stored).map_err(|e| {
                    ApiError::internal(format!("stored outcome is unreadable: {e}"))
                })?;
                Ok(Claim::Done(outcome))
            }
            _ => Err(ApiError::internal("unexpected reply from the claim script")),
        }
    }

    /// Ends `owner`'s claim: stores the outcome, or for a transient error
    /// (not stored: a retry does the work again) gives the lease up so a
    /// waiting duplicate takes over at once.
    pub async fn complete<M: prost::Message>(
        &self,
        key: &str,
        fingerprint: &str,
        owner: &str,
        result: &Result<M, ApiError>,
    ) -> Result<(), ApiError> {
        let encoded = match Outcome::of(result) {
            Some(outcome) => serde_json::to_vec(&outcome)
                .map_err(|e| ApiError::internal(format!("cannot encode outcome: {e}")))?,
            None => Vec::new(),
        };
        let _: i64 = self
            .complete
            .key(key)
            .arg(fingerprint)
            .arg(encoded)
            .arg(REQUEST_RETENTION.as_millis() as u64)
            .arg(owner)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.redis.acknowledge(&[key]).await
    }

    /// Answers the first outcome of the request at `key`: runs `work` when
    /// this caller owns the request, otherwise waits (within `ctx`'s
    /// deadline) for the owner's outcome. A new request id of a member's own
    /// call spends from the quota at `quota` (`None`: not charged).
    pub async fn run<M, F, Fut>(
        &self,
        ctx: &impl ServedCall,
        key: &str,
        quota: Option<(&str, Quota)>,
        fingerprint: &str,
        work: F,
    ) -> Result<M, ApiError>
    where
        M: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<M, ApiError>>,
    {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        // Services and operators act for members; only a member's own calls
        // spend the member's quota.
        let quota = quota.filter(|_| ctx.is_members_own());
        loop {
            match self.claim(key, fingerprint, &owner, quota).await? {
                Claim::Done(outcome) => return outcome.into_result(),
                Claim::Limited(retry_after) => return Err(mutation_rate_limited(retry_after)),
                Claim::New => break,
                Claim::Wait(_) if ctx.remaining() <= WAIT_POLL => {
                    return Err(ApiError::aborted(
                        reasons::REQUEST_IN_PROGRESS,
                        "the same request is still being served; retry it to get its outcome",
                    ));
                }
                Claim::Wait(_) => tokio::time::sleep(WAIT_POLL).await,
            }
        }
        let result = work().await;
        self.complete(key, fingerprint, &owner, &result).await?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_alike_requests_of_two_rpcs_differ() {
        use crate::contract::proto::messaging::v1 as pb;
        let add = pb::AddConnectionRequest {
            request_id: String::new(),
            member_id: "a".into(),
            other_member_id: "b".into(),
        };
        let remove = pb::RemoveConnectionRequest {
            request_id: String::new(),
            member_id: "a".into(),
            other_member_id: "b".into(),
        };
        assert_eq!(
            prost::Message::encode_to_vec(&add),
            prost::Message::encode_to_vec(&remove)
        );
        assert_ne!(fingerprint(&add), fingerprint(&remove));
    }

    #[test]
    fn digest_separates_parts() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
        assert_eq!(digest(&[b"x"]), digest(&[b"x"]));
        assert_eq!(digest(&[b"x"]).len(), 32);
    }

    #[test]
    fn refusals_are_stored_but_transient_errors_are_not() {
        let refused: Result<prost_types::Duration, _> = Err(ApiError::failed_precondition(
            "INSUFFICIENT_CREDITS",
            "none left",
        ));
        let stored = Outcome::of(&refused).expect("refusal stored");
        let replayed = stored.into_result::<prost_types::Duration>().unwrap_err();
        assert_eq!(replayed.reason(), "INSUFFICIENT_CREDITS");
        assert_eq!(replayed.code(), Code::FailedPrecondition);

        let transient: Result<prost_types::Duration, _> =
            Err(ApiError::unavailable("STORAGE_UNAVAILABLE", "down"));
        assert!(Outcome::of(&transient).is_none());
    }
}
