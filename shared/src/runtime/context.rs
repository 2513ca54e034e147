//! What a call carries across services: its deadline (the caller's remaining
//! budget) and its W3C trace context (`traceparent`).

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataValue;

use crate::runtime::auth::Caller;

pub const TRACEPARENT: &str = "traceparent";

/// A W3C trace context: the trace this call belongs to and this call's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: the span of the current call.
    pub span_id: String,
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace.
    pub fn new_root() -> Self {
        Self {
            trace_id: uuid::Uuid::new_v4().simple().to_string(),
            span_id: new_span_id(),
            sampled: true,
        }
    }

    /// Parses a `traceparent` header (version 00); `None` when malformed.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let is_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !is_hex(version, 2)
            || version == "ff"
            || !is_hex(trace_id, 32)
            || !is_hex(parent_id, 16)
            || !is_hex(flags, 2)
            || trace_id.bytes().all(|b| b == b'0')
            || parent_id.bytes().all(|b| b == b'0')
        {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace_id.to_string(),
            // This call gets its own span id; the caller's is its parent.
            span_id: new_span_id(),
            sampled: flags & 1 == 1,
        })
    }

    /// The header to send on an outgoing call made within this span.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

fn new_span_id() -> String {
    let id = uuid::Uuid::new_v4();
    hex::encode(&id.as_bytes()[..8])
}

/// The deadline, trace and caller of the call being served.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub deadline: Instant,
    pub trace: TraceContext,
    /// Who is calling (the server layer authenticated it).
    pub caller: Caller,
}

impl CallContext {
    /// Work that no client call started (sweepers, start-up).
    pub fn background(budget: Duration) -> Self {
        Self {
            deadline: Instant::now() + budget,
            trace: TraceContext::new_root(),
            caller: Caller::Local,
        }
    }

    /// The caller may act for (or read) `member`, named by `field`.
    pub fn act_for(
        &self,
        field: &str,
        member: &str,
    ) -> Result<(), crate::contract::error::ApiError> {
        self.caller.act_for(field, member)
    }

    /// The context the server layer attached to an incoming request.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<CallContext>()
            .cloned()
            .unwrap_or_else(|| Self::background(Duration::from_secs(10)))
    }

    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// An outgoing request carrying the remaining budget as its deadline and
    /// the trace context.
    pub fn outgoing<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        // A floor of 1 ms: tonic refuses a zero timeout header.
        request.set_timeout(self.remaining().max(Duration::from_millis(1)));
        if let Ok(value) = MetadataValue::try_from(self.trace.header()) {
            request.metadata_mut().insert(TRACEPARENT, value);
        }
        request
    }
}

/// Adds the member a call acts for and its request id to the call's span.
pub fn record_identity(member_id: &str, request_id: &str) {
    let span = tracing::Span::current();
    if !member_id.is_empty() {
        span.record("member_id", member_id);
    }
    if !request_id.is_empty() {
        span.record("request_id", request_id);
    }
}

impl crate::state::idempotency::ServedCall for CallContext {
    fn is_members_own(&self) -> bool {
        self.caller.is_member()
    }

    fn remaining(&self) -> Duration {
        CallContext::remaining(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_keeps_trace_id_and_starts_a_new_span() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(header).unwrap();
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(ctx.span_id, "00f067aa0ba902b7");
        assert!(ctx.sampled);
        let out = ctx.header();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_eq!(TraceContext::parse(&out).unwrap().trace_id, ctx.trace_id);
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        for bad in [
            "",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn root_trace_is_well_formed() {
        let root = TraceContext::new_root();
        assert!(TraceContext::parse(&root.header()).is_some());
    }
}
