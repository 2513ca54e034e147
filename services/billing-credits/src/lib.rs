//! billing-credits: each member's InMail credit balance, held in Redis
//! counters changed only by Lua scripts; debits held until confirmed,
//! refunds, renewals, grants and an immutable ledger.

pub mod credits;
pub mod entitlement;
pub mod error;
pub mod grpc;
pub mod store;
pub mod sweeper;

use std::net::SocketAddr;
use std::time::Duration;

use inmail_shared::bootstrap::Runtime;
use inmail_shared::client::lazy_channel;
use inmail_shared::clock::TestClockApi;
use inmail_shared::config::CommonArgs;
use inmail_shared::idempotency::REQUEST_RETENTION;
use inmail_shared::server::GrpcServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credits::{Credits, Policy};
use crate::entitlement::Entitlements;
use crate::grpc::BillingApi;
use crate::store::{BillingStore, Retention};

pub const SERVICE: &str = "billing-credits";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "billing-credits",
    version,
    about = "InMail credit balances, debits, refunds, renewals and ledger (gRPC)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Ask the running service's gRPC health; exit 0 when SERVING.
    Healthcheck,
    /// Replay every member's ledger through the running service and report
    /// mismatches; exit 0 when every ledger adds up.
    Reconcile {
        /// The billing-credits service to ask.
        #[arg(
            long,
            env = "BILLING_CREDITS_URL",
            default_value = "http://127.0.0.1:50052"
        )]
        url: String,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50052")]
    pub listen_addr: SocketAddr,

    /// subscription-plan, asked for members' entitlements.
    #[arg(
        long,
        env = "SUBSCRIPTION_PLAN_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub subscription_plan_url: String,

    /// How long a debit stays held without confirmation before the sweeper
    /// gives the credit back.
    #[arg(long, env = "HOLD_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub hold_ttl: Duration,

    /// How long after confirmation a refund is accepted.
    #[arg(long, env = "REFUND_WINDOW", default_value = "90days", value_parser = humantime::parse_duration)]
    pub refund_window: Duration,

    /// How long an entitlement from subscription-plan is trusted without
    /// asking again (never past the end of its cycle); 0s asks every time.
    #[arg(long, env = "ENTITLEMENT_CACHE_TTL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub entitlement_cache_ttl: Duration,

    /// How often expired holds are looked for.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Serves billing-credits on `listener` until `stop` is cancelled.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), String> {
    if args.hold_ttl.is_zero() || args.sweep_interval.is_zero() {
        return Err("HOLD_TTL and SWEEP_INTERVAL must be positive".into());
    }
    let runtime = Runtime::open(&args.common)?;
    let plans = lazy_channel(&args.subscription_plan_url)
        .map_err(|e| format!("SUBSCRIPTION_PLAN_URL: {e}"))?;
    let policy = Policy {
        hold: args.hold_ttl,
        refund_window: args.refund_window,
        retention: Retention {
            request: REQUEST_RETENTION,
            confirmed_margin: Duration::from_secs(30 * 24 * 3600),
            tombstone: REQUEST_RETENTION,
            message_owner: args.refund_window + Duration::from_secs(30 * 24 * 3600),
        },
    };
    let credits = Credits::new(
        BillingStore::new(runtime.redis.clone()),
        Entitlements::new(plans, args.entitlement_cache_ttl),
        runtime.clock.clone(),
        policy,
    );
    sweeper::spawn_hold_sweeper(credits.clone(), args.sweep_interval, stop.clone());
    let mut server = GrpcServer::new(SERVICE, args.common.limits());
    server
        .add_service(BillingApi::new(credits).into_server())
        .add_service(TestClockApi::new(runtime.clock.clone()).into_server());
    runtime.serve(server, listener, stop).await
}

/// The `reconcile` subcommand: pages through ReconcileLedgers.
pub async fn reconcile_all(
    url: &str,
) -> Result<
    (
        u64,
        u64,
        Vec<inmail_shared::proto::billing::v1::LedgerMismatch>,
    ),
    String,
> {
    use inmail_shared::proto::billing::v1 as pb;
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
