//! What the three InMail services share, in three layers. Each layer uses
//! only the layers below it (`scripts/check-layers.py` checks this, and that
//! no modules anywhere in the workspace import each other in a circle):
//!
//! - [`runtime`]: how a service runs — identity and trust (`auth`), the call
//!   context, the gRPC client and server, configuration, telemetry,
//!   bootstrap, the CLI, and the test clock's gRPC service (`testclock`).
//! - [`state`]: what lives in Redis — the connection (`storage`), request
//!   idempotency and the member's mutation quota, paging tokens, sweeps,
//!   the keys subscription-plan publishes, the clock.
//! - [`contract`]: what the wire promises — the generated proto, the error
//!   table and its reasons, input validation, time conversions, handlers'
//!   mapping to a `Status`.

pub mod contract;
pub mod runtime;
pub mod state;

pub use contract::error::ApiError;
