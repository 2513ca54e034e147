//! The runtime: how a service runs. Uses the state and the contract. Inside
//! it, from the bottom: `bounds`, `telemetry`, `auth` → `context` → `client`
//! → `server` → `config` → `testclock` → `bootstrap` → `cli`.

pub mod auth;
pub mod bootstrap;
pub mod bounds;
pub mod cli;
pub mod client;
pub mod config;
pub mod context;
pub mod server;
pub mod telemetry;
pub mod testclock;
