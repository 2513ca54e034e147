//! Store-level tests: each Lua script against a real Redis, without the
//! services — the rules that live in the scripts (renewal, rollover cap,
//! write-off, grant windows, holds, refunds, buckets, the pair's InMail slot,
//! one response per InMail, reconciliation steps).

mod billing;
mod messaging;
mod storage;
