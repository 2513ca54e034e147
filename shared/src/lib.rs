//! What the three InMail services share: the generated contracts, server
//! bootstrap, telemetry, configuration, the error table, Redis, the clock.

pub mod auth;
pub mod bootstrap;
pub mod bounds;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod context;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod paging;
pub mod proto;
pub mod published;
pub mod reasons;
pub mod rpc;
pub mod server;
pub mod storage;
pub mod sweep;
pub mod telemetry;
pub mod time;
pub mod validate;

pub use error::ApiError;
