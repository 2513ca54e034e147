//! The state: what lives in Redis (and, past its hot window, in the history
//! store, PostgreSQL) and how it is read and written. Uses the contract only.

pub mod clock;
pub mod events;
pub mod history;
pub mod idempotency;
pub mod paging;
pub mod published;
pub mod storage;
pub mod sweep;
