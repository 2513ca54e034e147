//! The contract: what the wire promises. Uses nothing else of this crate.

pub mod error;
pub mod proto;
pub mod reasons;
pub mod rpc;
pub mod time;
pub mod validate;
