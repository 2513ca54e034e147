//! The audit export: every ledger entry of a time range (one member's, or
//! everyone's), the entries still in Redis, then those archived in the
//! history store. The service streams it (ExportLedger, operator
//! credentials only: [`produce`]); `billing-credits export-ledger` calls
//! it as the operator and writes JSON Lines or CSV on stdout ([`run_command`]).
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
use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::runtime::auth::tls::OperatorArgs;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::history::{LedgerHistory, caller_gone, split_id};
use crate::store::{BillingStore, StoredEntry};

/// Entries per ExportLedger frame.
pub const FRAME: usize = 500;

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

    fn write(&mut self, member: &str, entry: &pb::LedgerEntry) -> Result<(), ApiError> {
        let at = entry
            .occurred_at
            .as_ref()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let kind = pb::LedgerEntryKind::try_from(entry.kind)
            .unwrap_or(pb::LedgerEntryKind::Unspecified)
            .as_str_name();
        let row = Row {
            member_id: member,
            entry_id: &entry.entry_id,
            occurred_at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            kind: kind.strip_prefix("LEDGER_ENTRY_KIND_").unwrap_or(kind),
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

/// What to export (the command's flags).
#[derive(Debug, Clone)]
pub struct Range {
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub member: Option<String>,
    pub format: Format,
}

/// The subcommand: asks the service at `url` as the operator and writes
/// what it streams; exit 0 with every entry written, 1 otherwise (the cause
/// on stderr).
pub fn run_command(url: &str, operator: &OperatorArgs, range: Range) -> ExitCode {
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
    match runtime.block_on(export(url, operator, range)) {
        Ok(count) => {
            eprintln!("export-ledger: {count} entries");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("export-ledger: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn export(url: &str, operator: &OperatorArgs, range: Range) -> Result<u64, String> {
    let channel = operator
        .connect(url)
        .await
        .map_err(|e| format!("BILLING_CREDITS_URL: {e}"))?;
    let mut client = pb::billing_credits_service_client::BillingCreditsServiceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024);
    let timestamp = |t: DateTime<Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    };
    let mut frames = client
        .export_ledger(pb::ExportLedgerRequest {
            start_time: Some(timestamp(range.since)),
            end_time: range.until.map(timestamp),
            member_id: range.member.unwrap_or_default(),
        })
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut out = Writer::new(range.format);
    let mut count = 0;
    while let Some(frame) = frames
        .message()
        .await
        .map_err(|s| format!("after {count} entries: {}: {}", s.code(), s.message()))?
    {
        for exported in &frame.entries {
            let entry = exported.entry.as_ref().ok_or("a frame without its entry")?;
            out.write(&exported.member_id, entry)
                .map_err(|e| e.to_string())?;
            count += 1;
        }
    }
    out.finish().map_err(|e| e.to_string())?;
    Ok(count)
}

/// The server's side: sends every entry of `span` (ms, `[start, end)`) of
/// `member` (every member when `None`) to `out`, Redis first, then the
/// history store; answers how many.
pub async fn produce(
    store: &BillingStore,
    history: Option<&LedgerHistory>,
    member: Option<&str>,
    span: (i64, i64),
    out: &mpsc::Sender<(String, StoredEntry)>,
) -> Result<u64, ApiError> {
    // Redis first, remembering per member the oldest entry it held.
    let mut floors: HashMap<String, (i64, i64)> = HashMap::new();
    let mut count = 0;
    match member {
        Some(member) => {
            count += export_member(store, member.to_string(), span, out, &mut floors).await?;
        }
        None => {
            // SCAN may return a key twice (while Redis rehashes): each
            // member is exported once, its floor recorded the first time.
            let mut seen = std::collections::HashSet::new();
            let mut cursor = "0".to_string();
            loop {
                let (next, members) = store.scan_members(&cursor, 200).await?;
                for member in members {
                    if !seen.insert(member.clone()) {
                        continue;
                    }
                    count += export_member(store, member, span, out, &mut floors).await?;
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
    }
    if let Some(history) = history {
        let skip = |member: &str, entry: &StoredEntry| {
            // Read from Redis already (archived since).
            matches!(
                (floors.get(member), split_id(&entry.id)),
                (Some(floor), Some(id)) if id >= *floor
            )
        };
        count += history.export(member, span, skip, out).await?;
    }
    Ok(count)
}

/// Sends one member's entries of `span` still in Redis, and remembers the
/// oldest entry Redis held for it (what PostgreSQL then skips).
async fn export_member(
    store: &BillingStore,
    member: String,
    span: (i64, i64),
    out: &mpsc::Sender<(String, StoredEntry)>,
    floors: &mut HashMap<String, (i64, i64)>,
) -> Result<u64, ApiError> {
    let (first, entries) = store
        .ledger_range(&member, None, span.0, span.1, usize::MAX)
        .await?;
    let count = entries.len() as u64;
    if let Some(floor) = first.as_deref().and_then(split_id) {
        floors.insert(member.clone(), floor);
    }
    for entry in entries {
        out.send((member.clone(), entry))
            .await
            .map_err(|_| caller_gone())?;
    }
    Ok(count)
}
