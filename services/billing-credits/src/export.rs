//! `billing-credits export-ledger`: the audit export. Every ledger entry of a
//! time range (one member's, or everyone's) as JSON Lines or CSV on stdout,
//! streamed: the entries still in Redis, then those archived in the history
//! store. It runs with the service's own settings (REDIS_URL and its Redis
//! user, DATABASE_URL and DATABASE_PASSWORD_FILE): credentials only an
//! operator of billing-credits holds.
//!
//! An entry the archiver moves while the export runs is written once: for
//! each member, the oldest entry in Redis at the moment it was read bounds
//! what is taken from PostgreSQL (the archiver commits there before it trims
//! Redis, oldest first).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use inmail_shared::ApiError;
use inmail_shared::state::clock::Clock;
use inmail_shared::state::history::{History, HistorySettings};
use inmail_shared::state::storage::Redis;
use serde::Serialize;

use crate::Args;
use crate::history::{LedgerHistory, kind_name, split_id};
use crate::store::{BillingStore, StoredEntry};

/// The export's output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// One exported entry (the same fields in both formats).
#[derive(Debug, Serialize)]
struct Row<'a> {
    member_id: &'a str,
    entry_id: &'a str,
    occurred_at: String,
    kind: &'a str,
    amount: i64,
    balance_after: i64,
    message_id: &'a str,
    request_id: &'a str,
    plan_id: &'a str,
    plan_version: u64,
    cycle_index: u32,
    note: &'a str,
}

enum Writer {
    Jsonl(std::io::BufWriter<std::io::Stdout>),
    Csv(Box<csv::Writer<std::io::Stdout>>),
}

impl Writer {
    fn new(format: Format) -> Self {
        match format {
            Format::Jsonl => Self::Jsonl(std::io::BufWriter::new(std::io::stdout())),
            Format::Csv => Self::Csv(Box::new(csv::Writer::from_writer(std::io::stdout()))),
        }
    }

    fn write(&mut self, member: &str, entry: &StoredEntry) -> Result<(), ApiError> {
        let occurred_at = DateTime::<Utc>::from_timestamp_millis(entry.at_ms)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let row = Row {
            member_id: member,
            entry_id: &entry.id,
            occurred_at,
            kind: kind_name(entry.kind),
            amount: entry.amount,
            balance_after: entry.balance_after,
            message_id: &entry.message_id,
            request_id: &entry.request_id,
            plan_id: &entry.plan_id,
            plan_version: entry.plan_version,
            cycle_index: entry.cycle_index,
            note: &entry.note,
        };
        let failed = |e: &dyn std::fmt::Display| ApiError::internal(format!("writing: {e}"));
        match self {
            Self::Jsonl(out) => {
                serde_json::to_writer(&mut *out, &row).map_err(|e| failed(&e))?;
                out.write_all(b"\n").map_err(|e| failed(&e))
            }
            Self::Csv(out) => out.serialize(&row).map_err(|e| failed(&e)),
        }
    }

    fn finish(self) -> Result<(), ApiError> {
        let failed = |e: &dyn std::fmt::Display| ApiError::internal(format!("writing: {e}"));
        match self {
            Self::Jsonl(mut out) => out.flush().map_err(|e| failed(&e)),
            Self::Csv(mut out) => out.flush().map_err(|e| failed(&e)),
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Range {
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub member: Option<String>,
    pub format: Format,
}

/// The subcommand: exit 0 with every entry written, 1 otherwise (the cause
/// on stderr).
pub fn run_command(args: &Args, range: Range) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("export-ledger: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(export(args, range)) {
        Ok((hot, archived)) => {
            eprintln!("export-ledger: {hot} entries from Redis, {archived} from the history store");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("export-ledger: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn export(args: &Args, range: Range) -> Result<(u64, u64), String> {
    let redis = Redis::open(&args.common.redis()?)?;
    // Now is the service's now (the test clock's, when it is on).
    let clock = if args.common.test_clock {
        Clock::test(redis.clone())
    } else {
        Clock::system()
    };
    let until = match range.until {
        Some(until) => until,
        None => clock.now().await.map_err(|e| e.to_string())? + chrono::Duration::milliseconds(1),
    };
    if until <= range.since {
        return Err("--until must be after --since".into());
    }
    let span = (range.since.timestamp_millis(), until.timestamp_millis());
    let store = BillingStore::new(redis);
    let history = match args.history.settings() {
        Some(settings) => Some(LedgerHistory::new(History::open(&HistorySettings {
            pool_size: 1,
            ..settings
        })?)),
        None => None,
    };
    let text = |e: ApiError| e.to_string();
    let mut out = Writer::new(range.format);
    // Redis first, remembering per member the oldest entry it held.
    let mut floors: HashMap<String, (i64, i64)> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut hot = 0;
    match &range.member {
        Some(member) => {
            hot += export_member(&store, member.clone(), span, &mut out, &mut floors)
                .await
                .map_err(text)?
        }
        None => {
            // SCAN may return a key twice (while Redis rehashes): each
            // member is exported once, its floor recorded the first time.
            let mut cursor = "0".to_string();
            loop {
                let (next, members) = store.scan_members(&cursor, 200).await.map_err(text)?;
                for member in members {
                    if floors.contains_key(&member) || !seen.insert(member.clone()) {
                        continue;
                    }
                    hot += export_member(&store, member, span, &mut out, &mut floors)
                        .await
                        .map_err(text)?;
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
    }
    let mut archived = 0;
    if let Some(history) = &history {
        history
            .export(range.member.as_deref(), span, |member, entry| {
                let id = split_id(&entry.id);
                if let (Some(floor), Some(id)) = (floors.get(member), id)
                    && id >= *floor
                {
                    // Read from Redis already (archived since).
                    return Ok(());
                }
                archived += 1;
                out.write(member, &entry)
            })
            .await
            .map_err(text)?;
    }
    out.finish().map_err(text)?;
    Ok((hot, archived))
}

/// Writes one member's entries of `span` still in Redis, and remembers the
/// oldest entry Redis held for it (what PostgreSQL then skips).
async fn export_member(
    store: &BillingStore,
    member: String,
    span: (i64, i64),
    out: &mut Writer,
    floors: &mut HashMap<String, (i64, i64)>,
) -> Result<u64, ApiError> {
    let (first, entries) = store
        .ledger_range(&member, None, span.0, span.1, usize::MAX)
        .await?;
    for entry in &entries {
        out.write(&member, entry)?;
    }
    if let Some(floor) = first.as_deref().and_then(split_id) {
        floors.insert(member, floor);
    }
    Ok(entries.len() as u64)
}
