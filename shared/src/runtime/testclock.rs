//! `inmail.testclock.v1.TestClockService`: reads and moves the shared test
//! clock ([`crate::state::clock::Clock`]). Every service serves it; only a
//! stack started with `--test-clock` (`TEST_CLOCK=true`) lets it move time.

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::contract::proto::testclock::v1 as pb;
use crate::contract::time::{from_timestamp, to_timestamp};
use crate::contract::validate::Checks;
use crate::state::clock::Clock;

const DOMAIN: &str = "testclock.inmail";
/// AdvanceTime accepts at most this much at once.
const MAX_ADVANCE: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

/// `inmail.testclock.v1.TestClockService`, served by every service.
#[derive(Clone, Debug)]
pub struct TestClockApi {
    clock: Clock,
}

impl TestClockApi {
    pub fn new(clock: Clock) -> Self {
        Self { clock }
    }

    pub fn into_server(self) -> pb::test_clock_service_server::TestClockServiceServer<Self> {
        pb::test_clock_service_server::TestClockServiceServer::new(self)
            .max_decoding_message_size(crate::runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(crate::runtime::server::MAX_RESPONSE_BYTES)
    }
}

#[tonic::async_trait]
impl pb::test_clock_service_server::TestClockService for TestClockApi {
    async fn get_time(
        &self,
        _request: Request<pb::GetTimeRequest>,
    ) -> Result<Response<pb::GetTimeResponse>, Status> {
        let now = self.clock.now().await.map_err(|e| e.into_status(DOMAIN))?;
        Ok(Response::new(pb::GetTimeResponse {
            now: Some(to_timestamp(now)),
            test_clock_enabled: self.clock.is_test(),
        }))
    }

    async fn advance_time(
        &self,
        request: Request<pb::AdvanceTimeRequest>,
    ) -> Result<Response<pb::AdvanceTimeResponse>, Status> {
        let request = request.into_inner();
        let mut checks = Checks::new();
        checks.request_id(&request.request_id);
        let by = match request.by.map(Duration::try_from) {
            Some(Ok(by)) if !by.is_zero() && by <= MAX_ADVANCE => Some(by),
            Some(Ok(by)) if by.is_zero() => {
                checks.add("by", "must be positive");
                None
            }
            Some(Ok(_)) => {
                checks.add("by", "must be at most 100 years");
                None
            }
            Some(Err(_)) => {
                checks.add("by", "must be positive");
                None
            }
            None => {
                checks.add("by", "is required");
                None
            }
        };
        checks.finish().map_err(|e| e.into_status(DOMAIN))?;
        let by = by.expect("checked above");
        let now = self
            .clock
            .move_clock(&request.request_id, "by", by.as_millis() as i64)
            .await
            .map_err(|e| e.into_status(DOMAIN))?;
        tracing::info!(by = ?by, now = %now, "test clock advanced");
        Ok(Response::new(pb::AdvanceTimeResponse {
            now: Some(to_timestamp(now)),
        }))
    }

    async fn set_time(
        &self,
        request: Request<pb::SetTimeRequest>,
    ) -> Result<Response<pb::SetTimeResponse>, Status> {
        let request = request.into_inner();
        let mut checks = Checks::new();
        checks.request_id(&request.request_id);
        let target = match request.time.as_ref().map(from_timestamp) {
            Some(Some(t)) => Some(t),
            Some(None) => {
                checks.add("time", "is not a valid timestamp");
                None
            }
            None => {
                checks.add("time", "is required");
                None
            }
        };
        checks.finish().map_err(|e| e.into_status(DOMAIN))?;
        let target = target.expect("checked above");
        let now = self
            .clock
            .move_clock(&request.request_id, "to", target.timestamp_millis())
            .await
            .map_err(|e| e.into_status(DOMAIN))?;
        tracing::info!(now = %now, "test clock set");
        Ok(Response::new(pb::SetTimeResponse {
            now: Some(to_timestamp(now)),
        }))
    }
}
