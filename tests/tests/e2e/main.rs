//! End-to-end tests: a real redis-server per test and the real services over
//! real gRPC on 127.0.0.1.

mod abuse;
mod access;
mod billing;
mod bounds;
mod common;
mod deploy;
mod events;
mod foundation;
mod grpcurl;
mod history;
mod invitations;
mod ledger;
mod message_history;
mod messaging;
mod money;
mod plan_rules;
mod plans;
mod processes;
mod resilience;
mod responses;
mod trust;
