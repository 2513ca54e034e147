//! The gRPC edge of billing-credits: decode, validate, run the operation, map
//! the reply.

use inmail_shared::ApiError;
use inmail_shared::context::{CallContext, record_identity};
use inmail_shared::idempotency::fingerprint;
use inmail_shared::paging::{self, decode_token, encode_token};
use inmail_shared::proto::billing::v1 as pb;
use inmail_shared::time::ms_to_timestamp;
use inmail_shared::validate::Checks;
use tonic::{Request, Response, Status};

use crate::credits::{Credits, Op};
use crate::error::DOMAIN;
use crate::store::{BalanceView, DebitView, Reply, StoredEntry};

/// Most credits one message may cost.
pub const MAX_DEBIT: i32 = 100;
/// Most credits one grant may add.
pub const MAX_GRANT: i32 = 1000;
/// Longest grant reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;
/// Longest message id billing keeps.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

#[derive(Clone)]
pub struct BillingApi {
    credits: Credits,
}

type Reply_<T> = Result<Response<T>, Status>;

fn reply<T>(result: Result<T, ApiError>) -> Reply_<T> {
    result.map(Response::new).map_err(|e| e.into_status(DOMAIN))
}

impl BillingApi {
    pub fn new(credits: Credits) -> Self {
        Self { credits }
    }

    pub fn into_server(
        self,
    ) -> pb::billing_credits_service_server::BillingCreditsServiceServer<Self> {
        pb::billing_credits_service_server::BillingCreditsServiceServer::new(self)
    }
}

fn check_message_id(checks: &mut Checks, value: &str) {
    if value.is_empty() {
        checks.add("message_id", "is required");
    } else if value.len() > MAX_MESSAGE_ID_LEN {
        checks.add(
            "message_id",
            format!("must be at most {MAX_MESSAGE_ID_LEN} characters"),
        );
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'|' && b != b'{' && b != b'}')
    {
        checks.add(
            "message_id",
            "must be printable ASCII without spaces, '|', '{' or '}'",
        );
    }
}

fn balance_after(reply: &Reply) -> i64 {
    reply
        .balance_after
        .or_else(|| reply.balance.as_ref().map(|b| b.available))
        .unwrap_or(0)
}

fn debit_of(reply: &Reply, member: &str, message_id: &str) -> Result<pb::Debit, ApiError> {
    let view = reply
        .debit
        .as_ref()
        .ok_or_else(|| ApiError::internal("script answered no debit"))?;
    Ok(debit_view(view, member, message_id))
}

fn debit_view(view: &DebitView, member: &str, message_id: &str) -> pb::Debit {
    let state = match view.state.as_str() {
        "held" => pb::DebitState::Held,
        "confirmed" => pb::DebitState::Confirmed,
        "released" => pb::DebitState::Released,
        "refunded" => pb::DebitState::Refunded,
        _ => pb::DebitState::Unspecified,
    };
    let release_reason = match view.reason.as_str() {
        "MESSAGE_NOT_STORED" => pb::ReleaseReason::MessageNotStored,
        "HOLD_EXPIRED" => pb::ReleaseReason::HoldExpired,
        "ABANDONED" => pb::ReleaseReason::Abandoned,
        _ => pb::ReleaseReason::Unspecified,
    };
    pb::Debit {
        member_id: member.to_string(),
        message_id: message_id.to_string(),
        amount: view.amount as i32,
        state: state as i32,
        debited_at: ms_to_timestamp(view.debited_at),
        hold_expires_at: ms_to_timestamp(view.expires_at),
        confirmed_at: ms_to_timestamp(view.confirmed_at),
        refundable_until: ms_to_timestamp(view.refundable_until),
        returned_at: ms_to_timestamp(view.returned_at),
        release_reason: release_reason as i32,
    }
}

fn balance_view(member: &str, view: &BalanceView) -> pb::Balance {
    pb::Balance {
        member_id: member.to_string(),
        plan_id: view.plan.clone(),
        available: view.available,
        monthly_credits: view.monthly as i32,
        rollover_cap: view.cap as i32,
        cycle_start: ms_to_timestamp(view.cstart),
        cycle_end: ms_to_timestamp(view.cend),
        debited_this_cycle: view.debited,
        refunded_this_cycle: view.refunded,
        released_this_cycle: view.released,
        granted_this_cycle: view.granted,
        plan_version: view.ver,
    }
}

fn entry_view(entry: &StoredEntry) -> pb::LedgerEntry {
    let kind = match entry.kind.as_str() {
        "RENEWAL" => pb::LedgerEntryKind::Renewal,
        "DEBIT" => pb::LedgerEntryKind::Debit,
        "RELEASE" => pb::LedgerEntryKind::Release,
        "REFUND" => pb::LedgerEntryKind::Refund,
        "GRANT" => pb::LedgerEntryKind::Grant,
        "WRITE_OFF" => pb::LedgerEntryKind::WriteOff,
        _ => pb::LedgerEntryKind::Unspecified,
    };
    pb::LedgerEntry {
        entry_id: entry.id.clone(),
        kind: kind as i32,
        amount: entry.amount,
        balance_after: entry.balance_after,
        occurred_at: ms_to_timestamp(entry.at_ms),
        message_id: entry.message_id.clone(),
        request_id: entry.request_id.clone(),
        plan_id: entry.plan_id.clone(),
        plan_version: entry.plan_version,
        cycle_index: entry.cycle_index,
        note: entry.note.clone(),
    }
}

fn is_stream_id(cursor: &str) -> bool {
    cursor
        .split_once('-')
        .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
}

#[tonic::async_trait]
impl pb::billing_credits_service_server::BillingCreditsService for BillingApi {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Reply_<pb::GetBalanceResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            Checks::new()
                .member_id("member_id", &request.member_id)
                .finish()?;
            let out = self
                .credits
                .run(&ctx, &request.member_id, "", "", Op::Balance)
                .await?;
            let view = out
                .balance
                .ok_or_else(|| ApiError::internal("script answered no balance"))?;
            Ok(pb::GetBalanceResponse {
                balance: Some(balance_view(&request.member_id, &view)),
            })
        }
        .await;
        reply(result)
    }

    async fn debit_for_message(
        &self,
        request: Request<pb::DebitForMessageRequest>,
    ) -> Reply_<pb::DebitForMessageResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id);
            check_message_id(&mut checks, &request.message_id);
            if !(1..=MAX_DEBIT).contains(&request.amount) {
                checks.add(
                    "amount",
                    format!("must be between 1 and {MAX_DEBIT}, got {}", request.amount),
                );
            }
            checks.finish()?;
            let fp = fingerprint(&pb::DebitForMessageRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let op = Op::Debit {
                message_id: &request.message_id,
                amount: request.amount,
            };
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::DebitForMessageResponse {
                debit: Some(debit_of(&out, &request.member_id, &request.message_id)?),
                balance_after: balance_after(&out),
            })
        }
        .await;
        reply(result)
    }

    async fn confirm_debit(
        &self,
        request: Request<pb::ConfirmDebitRequest>,
    ) -> Reply_<pb::ConfirmDebitResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id);
            check_message_id(&mut checks, &request.message_id);
            checks.finish()?;
            let fp = fingerprint(&pb::ConfirmDebitRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let op = Op::Confirm {
                message_id: &request.message_id,
            };
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::ConfirmDebitResponse {
                debit: Some(debit_of(&out, &request.member_id, &request.message_id)?),
            })
        }
        .await;
        reply(result)
    }

    async fn release_debit(
        &self,
        request: Request<pb::ReleaseDebitRequest>,
    ) -> Reply_<pb::ReleaseDebitResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .known_enum::<pb::ReleaseReason>("reason", request.reason);
            check_message_id(&mut checks, &request.message_id);
            checks.finish()?;
            let reason = match pb::ReleaseReason::try_from(request.reason) {
                Ok(pb::ReleaseReason::HoldExpired) => "HOLD_EXPIRED",
                Ok(pb::ReleaseReason::Abandoned) => "ABANDONED",
                _ => "MESSAGE_NOT_STORED",
            };
            let fp = fingerprint(&pb::ReleaseDebitRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let op = Op::Release {
                message_id: &request.message_id,
                reason,
                only_if_expired: false,
            };
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::ReleaseDebitResponse {
                debit: Some(debit_of(&out, &request.member_id, &request.message_id)?),
                released_now: out.released_now.unwrap_or(false),
                balance_after: balance_after(&out),
            })
        }
        .await;
        reply(result)
    }

    async fn refund_message(
        &self,
        request: Request<pb::RefundMessageRequest>,
    ) -> Reply_<pb::RefundMessageResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id);
            check_message_id(&mut checks, &request.message_id);
            checks.finish()?;
            let fp = fingerprint(&pb::RefundMessageRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let op = Op::Refund {
                message_id: &request.message_id,
            };
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::RefundMessageResponse {
                debit: Some(debit_of(&out, &request.member_id, &request.message_id)?),
                refunded_now: out.refunded_now.unwrap_or(false),
                balance_after: balance_after(&out),
            })
        }
        .await;
        reply(result)
    }

    async fn get_debit(
        &self,
        request: Request<pb::GetDebitRequest>,
    ) -> Reply_<pb::GetDebitResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            check_message_id(&mut checks, &request.message_id);
            checks.finish()?;
            let view = self
                .credits
                .store()
                .get_debit(&request.member_id, &request.message_id)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(
                        "DEBIT_NOT_FOUND",
                        format!(
                            "no debit of message {} for member {}",
                            request.message_id, request.member_id
                        ),
                    )
                })?;
            Ok(pb::GetDebitResponse {
                debit: Some(debit_view(&view, &request.member_id, &request.message_id)),
            })
        }
        .await;
        reply(result)
    }

    async fn grant_credits(
        &self,
        request: Request<pb::GrantCreditsRequest>,
    ) -> Reply_<pb::GrantCreditsResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        let result = async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id)
                .text("reason", &request.reason, true, MAX_REASON_CHARS);
            if !(1..=MAX_GRANT).contains(&request.amount) {
                checks.add(
                    "amount",
                    format!("must be between 1 and {MAX_GRANT}, got {}", request.amount),
                );
            }
            checks.finish()?;
            let fp = fingerprint(&pb::GrantCreditsRequest {
                request_id: String::new(),
                ..request.clone()
            });
            let op = Op::Grant {
                amount: request.amount,
                reason: &request.reason,
            };
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            let entry_id = out
                .entry_id
                .clone()
                .ok_or_else(|| ApiError::internal("grant answered no ledger entry"))?;
            // The entry as written, read back by its id.
            let entry = self
                .credits
                .store()
                .ledger_entry(&request.member_id, &entry_id)
                .await?
                .map(|e| entry_view(&e));
            Ok(pb::GrantCreditsResponse {
                entry,
                balance_after: balance_after(&out),
            })
        }
        .await;
        reply(result)
    }

    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Reply_<pb::ListLedgerEntriesResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let result = async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let size = paging::page_size(
                &mut checks,
                request.page_size,
                paging::DEFAULT_PAGE_SIZE,
                paging::MAX_PAGE_SIZE,
            );
            let before = decode_token(&mut checks, "ledger", &request.page_token);
            if before.as_deref().is_some_and(|c| !is_stream_id(c)) {
                checks.add("page_token", "is not a token returned by this list");
            }
            checks.finish()?;
            let mut entries = self
                .credits
                .store()
                .ledger_page(&request.member_id, before.as_deref(), size)
                .await?;
            let next_page_token = if entries.len() > size {
                entries.truncate(size);
                entries
                    .last()
                    .map(|e| encode_token("ledger", &e.id))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListLedgerEntriesResponse {
                entries: entries.iter().map(entry_view).collect(),
                next_page_token,
            })
        }
        .await;
        reply(result)
    }

    async fn reconcile_ledgers(
        &self,
        request: Request<pb::ReconcileLedgersRequest>,
    ) -> Reply_<pb::ReconcileLedgersResponse> {
        let request = request.into_inner();
        let result = async {
            let mut checks = Checks::new();
            let size = paging::page_size(&mut checks, request.page_size, 100, 1000);
            let cursor = decode_token(&mut checks, "reconcile", &request.page_token)
                .unwrap_or_else(|| "0".into());
            if !cursor.bytes().all(|b| b.is_ascii_digit() || b == b':') {
                checks.add("page_token", "is not a token returned by this call");
            }
            checks.finish()?;
            let mut response = pb::ReconcileLedgersResponse::default();
            let mut cursor = cursor;
            // SCAN may answer few keys per step; keep going until a page is full.
            loop {
                let (next, members) = self.credits.store().scan_members(&cursor, size).await?;
                for member in members {
                    let checked = self.credits.store().reconcile_member(&member).await?;
                    response.members_checked += 1;
                    response.entries_replayed += checked.entries;
                    if checked.counter != checked.ledger_sum || !checked.first_bad_entry.is_empty()
                    {
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
                    break;
                }
            }
            if cursor != "0" {
                response.next_page_token = encode_token("reconcile", &cursor);
            }
            Ok(response)
        }
        .await;
        reply(result)
    }
}
