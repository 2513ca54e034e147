//! Ledger reconciliation: replays members' ledgers and reports every member
//! whose ledger does not add up to the counter (README.md, "Money guarantees"). Each member
//! keeps a checkpoint of what was verified, so a call replays only what was
//! added since, in bounded steps (no script ever holds Redis for long).

use std::time::Duration;

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::runtime::context::CallContext;

use crate::store::{BillingStore, ReconcileStep};

/// Entries one script replays at most (about a millisecond of Redis).
pub const CHUNK: usize = 1000;
/// A call stops this long before its deadline, to answer in time.
const MARGIN: Duration = Duration::from_millis(500);

/// What reconciling one member found.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Entries replayed in this call.
    pub replayed: u64,
    /// `None` when the call ran out of time before the end of the ledger.
    pub verdict: Option<Result<(), pb::LedgerMismatch>>,
}

/// Reconciles one member up to the end of its ledger, or until `ctx` is
/// about to expire.
pub async fn reconcile_member(
    store: &BillingStore,
    ctx: &CallContext,
    member: &str,
    epoch: &str,
) -> Result<Checked, ApiError> {
    let mut replayed = 0;
    loop {
        let step = store.reconcile_step(member, CHUNK, epoch).await?;
        let mismatch = |counter: i64, ledger: i64, detail: String| {
            tracing::error!(%member, %detail, "ledger mismatch");
            pb::LedgerMismatch {
                member_id: member.to_string(),
                counter_balance: counter,
                ledger_balance: ledger,
                detail,
            }
        };
        match step {
            ReconcileStep::Done {
                counter,
                sum,
                verified,
                replayed: r,
            } => {
                replayed += r;
                let verdict = if counter == sum {
                    Ok(())
                } else {
                    Err(mismatch(
                        counter,
                        sum,
                        format!(
                            "counter {counter} but the {verified} ledger entries add up to {sum}"
                        ),
                    ))
                };
                return Ok(Checked {
                    replayed,
                    verdict: Some(verdict),
                });
            }
            ReconcileStep::Bad {
                entry_id,
                sum,
                replayed: r,
                ..
            } => {
                replayed += r;
                return Ok(Checked {
                    replayed,
                    verdict: Some(Err(mismatch(
                        sum,
                        sum,
                        format!("entry {entry_id} does not carry the running balance"),
                    ))),
                });
            }
            ReconcileStep::More { replayed: r, .. } => {
                replayed += r;
                if ctx.remaining() < MARGIN {
                    return Ok(Checked {
                        replayed,
                        verdict: None,
                    });
                }
            }
        }
    }
}

/// One page of the check: up to `size` members from `cursor` (a SCAN
/// cursor, "0" to start). Answers the page and the cursor to resume from
/// (`None` when every member was checked); a member not finished in time is
/// resumed, from its checkpoint, by the next page — also when that is in the
/// first SCAN batch, whose cursor is "0" again.
pub async fn reconcile_page(
    store: &BillingStore,
    ctx: &CallContext,
    cursor: String,
    size: usize,
    epoch: &str,
) -> Result<(pb::ReconcileLedgersResponse, Option<String>), ApiError> {
    let mut response = pb::ReconcileLedgersResponse::default();
    let mut cursor = cursor;
    // SCAN may answer few keys per step; keep going until a page is full.
    loop {
        let (next, members) = store.scan_members(&cursor, size).await?;
        for member in members {
            let checked = reconcile_member(store, ctx, &member, epoch).await?;
            response.entries_replayed += checked.replayed;
            match checked.verdict {
                // Out of time: the next page scans this batch again.
                None => return Ok((response, Some(cursor))),
                Some(verdict) => {
                    response.members_checked += 1;
                    if let Err(mismatch) = verdict {
                        response.mismatches.push(mismatch);
                    }
                }
            }
        }
        cursor = next;
        if cursor == "0" {
            return Ok((response, None));
        }
        if response.members_checked as usize >= size || ctx.remaining() < MARGIN {
            return Ok((response, Some(cursor)));
        }
    }
}

/// The `reconcile` subcommand: pages through ReconcileLedgers of the service
/// at `url` and prints every mismatch; exit 0 when every ledger adds up.
pub fn run_command(
    url: &str,
    full: bool,
    operator: &inmail_shared::runtime::auth::tls::OperatorArgs,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("reconcile: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(reconcile_all(url, full, operator)) {
        Ok((members, entries, mismatches)) => {
            println!("checked {members} members, replayed {entries} ledger entries");
            for m in &mismatches {
                println!(
                    "MISMATCH {}: counter {} ledger {}: {}",
                    m.member_id, m.counter_balance, m.ledger_balance, m.detail
                );
            }
            if mismatches.is_empty() {
                println!("every ledger adds up");
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(message) => {
            eprintln!("reconcile: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn reconcile_all(
    url: &str,
    full: bool,
    operator: &inmail_shared::runtime::auth::tls::OperatorArgs,
) -> Result<(u64, u64, Vec<pb::LedgerMismatch>), String> {
    let channel = operator
        .connect(url)
        .await
        .map_err(|e| format!("BILLING_CREDITS_URL: {e}"))?;
    let mut client = pb::billing_credits_service_client::BillingCreditsServiceClient::new(channel);
    let (mut members, mut entries, mut mismatches) = (0u64, 0u64, Vec::new());
    let mut page_token = String::new();
    loop {
        let page = client
            .reconcile_ledgers(pb::ReconcileLedgersRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                full,
            })
            .await
            .map_err(|s| format!("ReconcileLedgers failed: {}", s.message()))?
            .into_inner();
        members += u64::from(page.members_checked);
        entries += page.entries_replayed;
        mismatches.extend(page.mismatches);
        if page.next_page_token.is_empty() {
            return Ok((members, entries, mismatches));
        }
        page_token = page.next_page_token;
    }
}
