//! The gRPC edge of billing-credits: decode, validate, run the operation, map
//! the reply.

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::contract::reasons;
use inmail_shared::contract::rpc::handle;
use inmail_shared::contract::time::from_timestamp;
use inmail_shared::contract::validate::Checks;
use inmail_shared::runtime::auth::access::{Table, Who};
use inmail_shared::runtime::context::{CallContext, record_identity};
use inmail_shared::state::events::EventHub;
use inmail_shared::state::idempotency::{Mutation, Quota, RequestLog};
use inmail_shared::state::paging::{self, PageTokens};
use tonic::{Request, Response, Status};

use crate::credits::{Credits, MAX_CLOCK_SKEW_MS, Op};
use crate::error::DOMAIN;
use crate::feed::FeedSettings;
use crate::history::{LedgerHistory, split_id};
use crate::reconcile::reconcile_page;
use crate::store::{ReleaseCause, keys};
use crate::views;

/// Who may call each method (README.md, "Who may call what"): only messaging moves credits for
/// a message, only operators grant and reconcile, members read their own.
pub const ACCESS: Table = &[
    (
        "/inmail.billing.v1.BillingCreditsService/GetBalance",
        &[Who::Member, Who::Service("messaging"), Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/DebitForMessage",
        &[Who::Service("messaging")],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/ConfirmDebit",
        &[Who::Service("messaging")],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/ReleaseDebit",
        &[Who::Service("messaging")],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/RefundMessage",
        &[Who::Service("messaging")],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/GetDebit",
        &[Who::Service("messaging"), Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/GrantCredits",
        &[Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/ListLedgerEntries",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/GetBalanceHistory",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/ReconcileLedgers",
        &[Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/SetLowBalanceAlert",
        &[Who::Member],
    ),
    // Members watch only themselves (the handler checks); operators anyone.
    (
        "/inmail.billing.v1.BillingCreditsService/WatchBalance",
        &[Who::Member, Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/WatchLedger",
        &[Who::Operator],
    ),
    (
        "/inmail.billing.v1.BillingCreditsService/ExportLedger",
        &[Who::Operator],
    ),
];

/// Audit exports one process streams at once (each holds a PostgreSQL
/// connection and walks every member).
pub const MAX_EXPORTS: usize = 2;

/// Ledger feeds one process serves at once (each polls Redis itself).
pub const MAX_LEDGER_FEEDS: usize = 16;

/// The highest low-balance threshold.
pub const MAX_ALERT_THRESHOLD: i64 = 100_000;

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
    tokens: PageTokens,
    /// The archived ledger, when the history store is configured.
    history: Option<LedgerHistory>,
    events: EventHub,
    requests: RequestLog,
    quota: Quota,
    feed: FeedSettings,
    feeds: std::sync::Arc<tokio::sync::Semaphore>,
    exports: std::sync::Arc<tokio::sync::Semaphore>,
    stop: tokio_util::sync::CancellationToken,
}

type Answer<T> = Result<Response<T>, Status>;

/// A request's `start_time` (required) and `end_time` (optional) in ms;
/// one that is not a valid timestamp, or a missing start, is added to
/// `checks`.
fn time_range(
    checks: &mut Checks,
    start: &Option<prost_types::Timestamp>,
    end: &Option<prost_types::Timestamp>,
) -> (Option<i64>, Option<i64>) {
    fn time(checks: &mut Checks, field: &str, ts: &Option<prost_types::Timestamp>) -> Option<i64> {
        match ts.as_ref().map(from_timestamp) {
            Some(Some(t)) => Some(t.timestamp_millis()),
            Some(None) => {
                checks.add(field, "is not a valid timestamp");
                None
            }
            None => None,
        }
    }
    let start_ms = time(checks, "start_time", start);
    if start.is_none() {
        checks.add("start_time", "is required");
    }
    (start_ms, time(checks, "end_time", end))
}

impl BillingApi {
    /// `lease`: the longest one call may take (REQUEST_TIMEOUT); `quota`:
    /// each member's mutation quota (SetLowBalanceAlert spends from it).
    pub fn new(
        credits: Credits,
        history: Option<LedgerHistory>,
        events: EventHub,
        lease: std::time::Duration,
        quota: Quota,
        feed: FeedSettings,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let tokens = PageTokens::new(credits.store().redis().clone(), "billing");
        let requests = RequestLog::new(credits.store().redis().clone(), lease);
        Self {
            credits,
            tokens,
            history,
            events,
            requests,
            quota,
            feed,
            feeds: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LEDGER_FEEDS)),
            exports: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_EXPORTS)),
            stop,
        }
    }

    pub fn into_server(
        self,
    ) -> pb::billing_credits_service_server::BillingCreditsServiceServer<Self> {
        pb::billing_credits_service_server::BillingCreditsServiceServer::new(self)
            .max_decoding_message_size(inmail_shared::runtime::server::MAX_REQUEST_BYTES)
            .max_encoding_message_size(inmail_shared::runtime::server::MAX_RESPONSE_BYTES)
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

/// The checks every debit operation shares: request id, member, message id.
fn debit_checks(request_id: &str, member_id: &str, message_id: &str) -> Checks {
    let mut checks = Checks::new();
    checks
        .request_id(request_id)
        .member_id("member_id", member_id);
    check_message_id(&mut checks, message_id);
    checks
}

fn is_stream_id(cursor: &str) -> bool {
    cursor
        .split_once('-')
        .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
}

#[tonic::async_trait]
impl pb::billing_credits_service_server::BillingCreditsService for BillingApi {
    async fn set_low_balance_alert(
        &self,
        request: Request<pb::SetLowBalanceAlertRequest>,
    ) -> Answer<pb::SetLowBalanceAlertResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks
                .request_id(&request.request_id)
                .member_id("member_id", &request.member_id);
            if !(0..=MAX_ALERT_THRESHOLD).contains(&request.threshold) {
                checks.add(
                    "threshold",
                    format!(
                        "must be between 0 (off) and {MAX_ALERT_THRESHOLD}, got {}",
                        request.threshold
                    ),
                );
            }
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            // Members' mutations spend from their quota and are answered once
            // per request id by the request log (the script itself runs with
            // no request id: the log is the record).
            let member = &request.member_id;
            let mut without_id = request.clone();
            without_id.request_id.clear();
            let fp = inmail_shared::state::idempotency::fingerprint(&without_id);
            self.requests
                .run(
                    &ctx,
                    &keys::alert_request(member, &request.request_id),
                    Some((&keys::quota(member), self.quota)),
                    &fp,
                    || async {
                        let op = Op::SetAlert {
                            threshold: request.threshold,
                        };
                        let out = self.credits.run(&ctx, member, "", "", op).await?;
                        Ok(pb::SetLowBalanceAlertResponse {
                            threshold: out.threshold,
                            available: out.balance.map(|b| b.available).unwrap_or_default(),
                            low: out.low,
                        })
                    },
                )
                .await
        })
        .await
    }

    type WatchBalanceStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
        Result<pb::WatchBalanceResponse, Status>,
    >;

    /// Checks the request and where it starts, then serves the frames from
    /// a task of its own; the call (and its concurrency permit) ends when
    /// the stream is answered.
    async fn watch_balance(
        &self,
        request: Request<pb::WatchBalanceRequest>,
    ) -> Answer<Self::WatchBalanceStream> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        let member = request.member_id.clone();
        let key = keys::events(&member);
        let after = handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let token = crate::events::decode_token(
                &self.tokens,
                &mut checks,
                &request.member_id,
                &request.resume_token,
            )
            .await?;
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            self.events.start_after(&key, token).await
        })
        .await?
        .into_inner();
        let watch = self
            .events
            .watch(&key, after)
            .map_err(|e| e.into_status(DOMAIN))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(crate::events::serve_watch(
            watch,
            self.tokens.clone(),
            member,
            after,
            tx,
        ));
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    type WatchLedgerStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
        Result<pb::WatchLedgerResponse, Status>,
    >;

    async fn watch_ledger(
        &self,
        request: Request<pb::WatchLedgerRequest>,
    ) -> Answer<Self::WatchLedgerStream> {
        let request = request.into_inner();
        let start = handle(DOMAIN, async {
            let mut checks = Checks::new();
            let token =
                crate::feed::decode_token(&self.tokens, &mut checks, &request.resume_token).await?;
            checks.finish()?;
            crate::feed::start(self.credits.store(), &self.feed, token).await
        })
        .await?
        .into_inner();
        let permit = self.feeds.clone().try_acquire_owned().map_err(|_| {
            ApiError::resource_exhausted(
                reasons::SERVER_OVERLOADED,
                format!("this server serves its maximum of {MAX_LEDGER_FEEDS} ledger feeds"),
                std::time::Duration::from_secs(1),
            )
            .into_status(DOMAIN)
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.credits.store().clone();
        let tokens = self.tokens.clone();
        let settings = self.feed;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            crate::feed::serve(store, tokens, settings, start, stop, tx).await;
            drop(permit);
        });
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    type ExportLedgerStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
        Result<pb::ExportLedgerResponse, Status>,
    >;

    async fn export_ledger(
        &self,
        request: Request<pb::ExportLedgerRequest>,
    ) -> Answer<Self::ExportLedgerStream> {
        let request = request.into_inner();
        let (member, span) = handle(DOMAIN, async {
            let mut checks = Checks::new();
            let member = (!request.member_id.is_empty()).then_some(request.member_id.clone());
            if let Some(member) = &member {
                checks.member_id("member_id", member);
            }
            let (start, end) = time_range(&mut checks, &request.start_time, &request.end_time);
            checks.finish()?;
            let end = match end {
                Some(end) => end,
                None => self.credits.clock().now_ms().await? + 1,
            };
            let start = start.expect("checked above");
            if end <= start {
                let mut checks = Checks::new();
                checks.add("end_time", "must be after start_time");
                checks.finish()?;
            }
            Ok((member, (start, end)))
        })
        .await?
        .into_inner();
        let permit = self.exports.clone().try_acquire_owned().map_err(|_| {
            ApiError::resource_exhausted(
                reasons::SERVER_OVERLOADED,
                format!("this server streams its maximum of {MAX_EXPORTS} exports"),
                std::time::Duration::from_secs(5),
            )
            .into_status(DOMAIN)
        })?;
        let (entries_tx, mut entries) = tokio::sync::mpsc::channel(crate::export::FRAME);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (store, history) = (self.credits.store().clone(), self.history.clone());
        // One task reads (Redis, then PostgreSQL) into a small queue; this
        // one packs frames of up to FRAME entries. A slow caller slows the
        // read down (both channels are bounded); one that leaves stops it.
        tokio::spawn(async move {
            let produced = tokio::spawn(async move {
                let member = member.as_deref();
                crate::export::produce(&store, history.as_ref(), member, span, &entries_tx).await
            });
            let mut frame = Vec::with_capacity(crate::export::FRAME);
            while let Some((member_id, entry)) = entries.recv().await {
                frame.push(pb::ExportedLedgerEntry {
                    member_id,
                    entry: Some(views::entry(&entry)),
                });
                while frame.len() < crate::export::FRAME
                    && let Ok((member_id, entry)) = entries.try_recv()
                {
                    frame.push(pb::ExportedLedgerEntry {
                        member_id,
                        entry: Some(views::entry(&entry)),
                    });
                }
                let entries = std::mem::take(&mut frame);
                if tx
                    .send(Ok(pb::ExportLedgerResponse { entries }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            drop(entries);
            match produced.await {
                Ok(Ok(count)) => tracing::info!(count, "ledger exported"),
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e.into_status(DOMAIN))).await;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(ApiError::internal(e.to_string()).into_status(DOMAIN)))
                        .await;
                }
            }
            drop(permit);
        });
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Answer<pb::GetBalanceResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            Checks::new()
                .member_id("member_id", &request.member_id)
                .finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let out = self
                .credits
                .run(&ctx, &request.member_id, "", "", Op::Balance)
                .await?;
            let view = out
                .balance
                .ok_or_else(|| ApiError::internal("script answered no balance"))?;
            Ok(pb::GetBalanceResponse {
                balance: Some(views::balance(&request.member_id, &view)),
            })
        })
        .await
    }

    async fn debit_for_message(
        &self,
        request: Request<pb::DebitForMessageRequest>,
    ) -> Answer<pb::DebitForMessageResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks =
                debit_checks(&request.request_id, &request.member_id, &request.message_id);
            if !(1..=MAX_DEBIT).contains(&request.amount) {
                checks.add(
                    "amount",
                    format!("must be between 1 and {MAX_DEBIT}, got {}", request.amount),
                );
            }
            checks.finish()?;
            let op = Op::Debit {
                message_id: &request.message_id,
                amount: request.amount,
            };
            let fp = request.fingerprint();
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::DebitForMessageResponse {
                debit: Some(views::debit_of(
                    &out,
                    &request.member_id,
                    &request.message_id,
                )?),
                balance_after: views::balance_after(&out),
            })
        })
        .await
    }

    async fn confirm_debit(
        &self,
        request: Request<pb::ConfirmDebitRequest>,
    ) -> Answer<pb::ConfirmDebitResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            debit_checks(&request.request_id, &request.member_id, &request.message_id).finish()?;
            let op = Op::Confirm {
                message_id: &request.message_id,
            };
            let fp = request.fingerprint();
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::ConfirmDebitResponse {
                debit: Some(views::debit_of(
                    &out,
                    &request.member_id,
                    &request.message_id,
                )?),
            })
        })
        .await
    }

    async fn release_debit(
        &self,
        request: Request<pb::ReleaseDebitRequest>,
    ) -> Answer<pb::ReleaseDebitResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks =
                debit_checks(&request.request_id, &request.member_id, &request.message_id);
            checks.known_enum::<pb::ReleaseReason>("reason", request.reason);
            checks.finish()?;
            let cause = match pb::ReleaseReason::try_from(request.reason) {
                Ok(pb::ReleaseReason::HoldExpired) => ReleaseCause::HoldExpired,
                Ok(pb::ReleaseReason::Abandoned) => ReleaseCause::Abandoned,
                _ => ReleaseCause::MessageNotStored,
            };
            let op = Op::Release {
                message_id: &request.message_id,
                cause,
                only_if_expired: false,
            };
            let fp = request.fingerprint();
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::ReleaseDebitResponse {
                debit: Some(views::debit_of(
                    &out,
                    &request.member_id,
                    &request.message_id,
                )?),
                released_now: out.released_now.unwrap_or(false),
                balance_after: views::balance_after(&out),
            })
        })
        .await
    }

    async fn refund_message(
        &self,
        request: Request<pb::RefundMessageRequest>,
    ) -> Answer<pb::RefundMessageResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
            let mut checks =
                debit_checks(&request.request_id, &request.member_id, &request.message_id);
            let responded_at = match request.responded_at.as_ref().map(from_timestamp) {
                None => None,
                Some(Some(t)) => Some(t.timestamp_millis()),
                Some(None) => {
                    checks.add("responded_at", "is not a valid timestamp");
                    None
                }
            };
            checks.finish()?;
            if let Some(at) = responded_at {
                let now = self.credits.clock().now_ms().await?;
                if at > now + MAX_CLOCK_SKEW_MS {
                    return Err(ApiError::invalid_field(
                        "responded_at",
                        "must not be in the future",
                    ));
                }
            }
            let op = Op::Refund {
                message_id: &request.message_id,
                responded_at_ms: responded_at,
            };
            let fp = request.fingerprint();
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            Ok(pb::RefundMessageResponse {
                debit: Some(views::debit_of(
                    &out,
                    &request.member_id,
                    &request.message_id,
                )?),
                refunded_now: out.refunded_now.unwrap_or(false),
                balance_after: views::balance_after(&out),
            })
        })
        .await
    }

    async fn get_debit(
        &self,
        request: Request<pb::GetDebitRequest>,
    ) -> Answer<pb::GetDebitResponse> {
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
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
                        reasons::DEBIT_NOT_FOUND,
                        format!(
                            "no debit of message {} for member {}",
                            request.message_id, request.member_id
                        ),
                    )
                })?;
            Ok(pb::GetDebitResponse {
                debit: Some(views::debit(&view, &request.member_id, &request.message_id)),
            })
        })
        .await
    }

    async fn grant_credits(
        &self,
        request: Request<pb::GrantCreditsRequest>,
    ) -> Answer<pb::GrantCreditsResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, &request.request_id);
        handle(DOMAIN, async {
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
            let op = Op::Grant {
                amount: request.amount,
                reason: &request.reason,
            };
            let fp = request.fingerprint();
            let out = self
                .credits
                .run(&ctx, &request.member_id, &request.request_id, &fp, op)
                .await?;
            let entry_id = out
                .entry_id
                .clone()
                .ok_or_else(|| ApiError::internal("grant answered no ledger entry"))?;
            // The entry as written, read back by its id (the request record
            // keeps the id only): from Redis, or from the history store once
            // archived (a retry after the hot window).
            let mut entry = self
                .credits
                .store()
                .ledger_entry(&request.member_id, &entry_id)
                .await?;
            if entry.is_none()
                && let Some(history) = &self.history
            {
                entry = history.entry(&request.member_id, &entry_id).await?;
            }
            let entry = entry.map(|e| views::entry(&e));
            Ok(pb::GrantCreditsResponse {
                entry,
                balance_after: views::balance_after(&out),
            })
        })
        .await
    }

    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Answer<pb::ListLedgerEntriesResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let size = paging::page_size(
                &mut checks,
                request.page_size,
                paging::DEFAULT_PAGE_SIZE,
                paging::MAX_PAGE_SIZE,
            );
            let scope = [request.member_id.as_str()];
            let before = self
                .tokens
                .decode(&mut checks, "ledger", &scope, &request.page_token)
                .await?;
            if before.as_deref().is_some_and(|c| !is_stream_id(c)) {
                checks.add("page_token", "is not a token returned by this list");
            }
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let store = self.credits.store();
            let member = request.member_id.as_str();
            let mut entries = store.ledger_page(member, before.as_deref(), size).await?;
            // Past the entries still in Redis, the page goes on in the
            // history store, strictly before the oldest entry read here (or
            // the token's): the archiver commits there before it trims here,
            // so an entry trimmed meanwhile is found there, and one in both
            // is read once.
            // A page that Redis fills exactly answers without asking the
            // history store, with a token when anything is archived (its
            // next page may then be empty): recent pages never need
            // PostgreSQL.
            let mut more = entries.len() > size;
            if !more
                && let Some(history) = &self.history
                && store.archived_through(member).await?.is_some()
            {
                if entries.len() == size {
                    more = true;
                } else {
                    let from = entries.last().map(|e| e.id.clone()).or(before);
                    let older = history
                        .page(member, from.as_deref(), size + 1 - entries.len())
                        .await?;
                    entries.extend(older);
                    more = entries.len() > size;
                }
            }
            let next_page_token = if more {
                entries.truncate(size);
                let last = &entries[size - 1].id;
                self.tokens.encode("ledger", &scope, last).await?
            } else {
                String::new()
            };
            Ok(pb::ListLedgerEntriesResponse {
                entries: entries.iter().map(views::entry).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn get_balance_history(
        &self,
        request: Request<pb::GetBalanceHistoryRequest>,
    ) -> Answer<pb::GetBalanceHistoryResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        record_identity(&request.member_id, "");
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            checks.member_id("member_id", &request.member_id);
            let size = paging::page_size(
                &mut checks,
                request.page_size,
                paging::DEFAULT_PAGE_SIZE,
                paging::MAX_PAGE_SIZE,
            );
            let (start, end) = time_range(&mut checks, &request.start_time, &request.end_time);
            if let (Some(start), Some(end)) = (start, end)
                && end <= start
            {
                checks.add("end_time", "must be after start_time");
            }
            // The token is bound to the member and the range as asked (an
            // absent end stays "now" on every page).
            let (start_text, end_text) = (
                start.map(|t| t.to_string()).unwrap_or_default(),
                end.map(|t| t.to_string()).unwrap_or_default(),
            );
            let scope = [request.member_id.as_str(), &start_text, &end_text];
            let after = self
                .tokens
                .decode(&mut checks, "balance-history", &scope, &request.page_token)
                .await?;
            if after.as_deref().is_some_and(|c| !is_stream_id(c)) {
                checks.add("page_token", "is not a token returned by this list");
            }
            checks.finish()?;
            ctx.act_for("member_id", &request.member_id)?;
            let start = start.expect("checked above");
            let end = match end {
                Some(end) => end,
                None => self.credits.clock().now_ms().await? + 1,
            };
            let member = request.member_id.as_str();
            let store = self.credits.store();
            // Redis first, then the history store: the archiver commits
            // there before it trims here, so whatever left Redis before the
            // read below is found there, older than anything read here.
            let (_, hot) = store
                .ledger_range(member, after.as_deref(), start, end, size + 1)
                .await?;
            let opening_hot = store.ledger_last_before(member, start).await?;
            // PostgreSQL holds only entries older than every one in Redis:
            // when Redis holds one from before the range, the archive has
            // nothing in the range and no later opening balance, and the
            // answer needs Redis only (PostgreSQL down does not matter).
            let archived = match (&self.history, &opening_hot) {
                (Some(_), None) => store.archived_through(member).await?,
                _ => None,
            };
            let history = self.history.as_ref().filter(|_| archived.is_some());
            // Nor has it anything past a cursor at or beyond its newest.
            let past_archive = match (
                after.as_deref().and_then(split_id),
                archived.as_deref().and_then(split_id),
            ) {
                (Some(after), Some(newest)) => after >= newest,
                _ => false,
            };
            let mut entries = match history.filter(|_| !past_archive) {
                Some(history) => {
                    history
                        .range(
                            member,
                            after.as_deref(),
                            hot.first().map(|e| e.id.as_str()),
                            (start, end),
                            size + 1,
                        )
                        .await?
                }
                None => Vec::new(),
            };
            entries.extend(hot);
            entries.truncate(size + 1);
            let opening = match (opening_hot, history) {
                (Some(entry), _) => Some(entry),
                (None, Some(history)) => history.last_before(member, start).await?,
                (None, None) => None,
            };
            let next_page_token = if entries.len() > size {
                entries.truncate(size);
                let last = &entries[size - 1].id;
                self.tokens.encode("balance-history", &scope, last).await?
            } else {
                String::new()
            };
            Ok(pb::GetBalanceHistoryResponse {
                opening_balance: opening.map_or(0, |e| e.balance_after),
                entries: entries.iter().map(views::entry).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn reconcile_ledgers(
        &self,
        request: Request<pb::ReconcileLedgersRequest>,
    ) -> Answer<pb::ReconcileLedgersResponse> {
        let ctx = CallContext::of(&request);
        let request = request.into_inner();
        handle(DOMAIN, async {
            let mut checks = Checks::new();
            let size = paging::page_size(&mut checks, request.page_size, 100, 1000);
            // The token carries the SCAN cursor and the epoch of a full
            // re-verification ("" for incremental).
            let (cursor, epoch) = match self
                .tokens
                .decode(&mut checks, "reconcile", &[], &request.page_token)
                .await?
            {
                Some(token) => match token.split_once('|') {
                    Some((cursor, epoch)) => (cursor.to_string(), epoch.to_string()),
                    None => (token, String::new()),
                },
                None if request.full => ("0".into(), uuid::Uuid::new_v4().simple().to_string()),
                None => ("0".into(), String::new()),
            };
            if !cursor.bytes().all(|b| b.is_ascii_digit() || b == b':') {
                checks.add("page_token", "is not a token returned by this call");
            }
            checks.finish()?;
            let (mut response, next) =
                reconcile_page(self.credits.store(), &ctx, cursor, size, &epoch).await?;
            if let Some(next) = next {
                response.next_page_token = self
                    .tokens
                    .encode("reconcile", &[], &format!("{next}|{epoch}"))
                    .await?;
            }
            Ok(response)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_table_lists_every_method() {
        assert_eq!(
            inmail_shared::runtime::auth::access::unlisted(
                ACCESS,
                "inmail.billing.v1.BillingCreditsService"
            ),
            Vec::<String>::new()
        );
    }
}
