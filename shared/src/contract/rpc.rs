//! What every gRPC handler shares: run the work, answer its result as a
//! response, or as a `Status` of the service's error domain.

use std::future::Future;

use tonic::{Response, Status};

use crate::contract::error::ApiError;

/// Runs a handler's work and maps its outcome for the wire; `domain` names
/// the service in `ErrorInfo`.
pub async fn handle<T>(
    domain: &'static str,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    work.await
        .map(Response::new)
        .map_err(|e| e.into_status(domain))
}
