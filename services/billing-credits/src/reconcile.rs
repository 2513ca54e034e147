//! Ledger reconciliation: replays members' ledgers and reports every member
//! whose ledger does not add up to the counter (DESIGN.md §4.5).

use inmail_shared::ApiError;
use inmail_shared::proto::billing::v1 as pb;

use crate::store::BillingStore;

/// One page of the check: up to `size` members from `cursor` (a SCAN
/// cursor, "0" to start). Answers the page and the next cursor ("0" when
/// every member was checked).
pub async fn reconcile_page(
    store: &BillingStore,
    cursor: String,
    size: usize,
) -> Result<(pb::ReconcileLedgersResponse, String), ApiError> {
    let mut response = pb::ReconcileLedgersResponse::default();
    let mut cursor = cursor;
    // SCAN may answer few keys per step; keep going until a page is full.
    loop {
        let (next, members) = store.scan_members(&cursor, size).await?;
        for member in members {
            let checked = store.reconcile_member(&member).await?;
            response.members_checked += 1;
            response.entries_replayed += checked.entries;
            if checked.counter != checked.ledger_sum || !checked.first_bad_entry.is_empty() {
                let detail = if checked.counter != checked.ledger_sum {
                    format!(
                        "counter {} but the {} ledger entries add up to {}",
                        checked.counter, checked.entries, checked.ledger_sum
                    )
                } else {
                    format!(
                        "entry {} does not carry the running balance",
                        checked.first_bad_entry
                    )
                };
                tracing::error!(member = %member, %detail, "ledger mismatch");
                response.mismatches.push(pb::LedgerMismatch {
                    member_id: member,
                    counter_balance: checked.counter,
                    ledger_balance: checked.ledger_sum,
                    detail,
                });
            }
        }
        cursor = next;
        if cursor == "0" || response.members_checked as usize >= size {
            return Ok((response, cursor));
        }
    }
}

/// The `reconcile` subcommand: pages through ReconcileLedgers of the service
/// at `url` and prints every mismatch; exit 0 when every ledger adds up.
pub fn run_command(url: &str) -> std::process::ExitCode {
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
    match runtime.block_on(reconcile_all(url)) {
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

async fn reconcile_all(url: &str) -> Result<(u64, u64, Vec<pb::LedgerMismatch>), String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("BILLING_CREDITS_URL {url:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let mut client = pb::billing_credits_service_client::BillingCreditsServiceClient::new(channel);
    let (mut members, mut entries, mut mismatches) = (0u64, 0u64, Vec::new());
    let mut page_token = String::new();
    loop {
        let page = client
            .reconcile_ledgers(pb::ReconcileLedgersRequest {
                page_size: 1000,
                page_token: page_token.clone(),
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
