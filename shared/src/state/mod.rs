//! The state: what lives in Redis and how it is read and written. Uses the
//! contract only.

pub mod clock;
pub mod idempotency;
pub mod paging;
pub mod published;
pub mod storage;
pub mod sweep;
