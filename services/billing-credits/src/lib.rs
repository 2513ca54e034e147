//! billing-credits: each member's InMail credit balance, held in Redis
//! counters changed only by Lua scripts; debits held until confirmed,
//! refunds, renewals, grants and an immutable ledger.

pub mod archive;
pub mod credits;
pub mod entitlement;
pub mod error;
pub mod events;
pub mod export;
pub mod feed;
pub mod grpc;
pub mod history;
pub mod reconcile;
pub mod store;
pub mod sweeper;
pub mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use inmail_shared::runtime::bootstrap::Runtime;
use inmail_shared::runtime::cli::ServiceBinary;
use inmail_shared::runtime::config::{CommonArgs, HistoryArgs};
use inmail_shared::state::history::{open_and_migrate, when_migrated};
use inmail_shared::state::idempotency::REQUEST_RETENTION;
use inmail_shared::state::sweep::{LEAVE_WAIT, await_leave};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credits::{Credits, Policy};
use crate::entitlement::Entitlements;
use crate::grpc::BillingApi;
use crate::store::{BillingStore, Retention};

pub const SERVICE: &str = "billing-credits";

/// The `billing-credits` binary.
pub struct Service;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Commands {
    /// Replay every member's ledger through the running service and report
    /// mismatches; exit 0 when every ledger adds up.
    Reconcile {
        /// The billing-credits service to ask.
        #[arg(
            long,
            env = "BILLING_CREDITS_URL",
            default_value = "https://127.0.0.1:50052"
        )]
        url: String,
        /// Re-verify every ledger from its start, not from each member's
        /// last verified checkpoint.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        operator: inmail_shared::runtime::auth::tls::OperatorArgs,
    },
    /// Write every ledger entry of a time range (from Redis and the history
    /// store) to stdout as JSON Lines or CSV: the audit export, streamed by
    /// the running service (ExportLedger) to the operator.
    ExportLedger {
        /// The billing-credits service to ask.
        #[arg(
            long,
            env = "BILLING_CREDITS_URL",
            default_value = "https://127.0.0.1:50052"
        )]
        url: String,
        #[command(flatten)]
        operator: inmail_shared::runtime::auth::tls::OperatorArgs,
        /// Start of the range (inclusive), RFC 3339.
        #[arg(long)]
        since: chrono::DateTime<chrono::Utc>,
        /// End of the range (exclusive), RFC 3339; default now.
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Only this member's entries.
        #[arg(long)]
        member: Option<String>,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: export::Format,
    },
}

impl ServiceBinary for Service {
    const NAME: &'static str = SERVICE;
    const ABOUT: &'static str =
        "InMail credit balances, debits, refunds, renewals and ledger (gRPC)";
    type Args = Args;
    type Commands = Commands;

    fn listen_addr(args: &Args) -> SocketAddr {
        args.listen_addr
    }

    fn common(args: &Args) -> &CommonArgs {
        &args.common
    }

    fn serve(
        args: Args,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> impl Future<Output = Result<(), String>> + Send {
        serve(args, listener, stop)
    }

    fn run_command(command: Commands, _args: Args) -> ExitCode {
        match command {
            Commands::Reconcile {
                url,
                full,
                operator,
            } => reconcile::run_command(&url, full, &operator),
            Commands::ExportLedger {
                url,
                operator,
                since,
                until,
                member,
                format,
            } => export::run_command(
                &url,
                &operator,
                export::Range {
                    since,
                    until,
                    member,
                    format,
                },
            ),
        }
    }
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
        default_value = "https://127.0.0.1:50051"
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
    /// asking again while the member's subscription is unchanged (a change
    /// is seen at once: the scripts compare its revision), never past the
    /// end of its cycle; 0s asks every time.
    #[arg(long, env = "ENTITLEMENT_CACHE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub entitlement_cache_ttl: Duration,

    /// Where verified ledger entries older than LEDGER_HOT_RETENTION go.
    #[command(flatten)]
    pub history: HistoryArgs,

    /// How long ledger entries stay in Redis once verified, when
    /// DATABASE_URL is set.
    #[arg(long, env = "LEDGER_HOT_RETENTION", default_value = "400days", value_parser = humantime::parse_duration)]
    pub ledger_hot_retention: Duration,

    /// How often old verified entries are moved to the history store.
    #[arg(long, env = "ARCHIVE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub archive_interval: Duration,

    /// How often expired holds are looked for.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// How long balance events are kept for WatchBalance to resume from.
    #[arg(long, env = "EVENTS_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub events_retention: Duration,

    /// The most balance events kept per member.
    #[arg(long, env = "EVENTS_MAX_PER_MEMBER", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub events_max_per_member: u32,

    /// How far behind Redis' clock the operators' ledger feed stays, so no
    /// earlier entry can still appear.
    #[arg(long, env = "CDC_LAG", default_value = "1s", value_parser = humantime::parse_duration)]
    pub cdc_lag: Duration,

    #[command(flatten)]
    pub watch: inmail_shared::state::events::WatchArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Serves billing-credits on `listener` until `stop` is cancelled.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), String> {
    if args.events_retention < Duration::from_secs(1) {
        return Err("EVENTS_RETENTION must be at least 1s".into());
    }
    if args.hold_ttl.is_zero() || args.sweep_interval.is_zero() {
        return Err("HOLD_TTL and SWEEP_INTERVAL must be positive".into());
    }
    let listen = listener
        .local_addr()
        .map_err(|e| format!("LISTEN_ADDR: {e}"))?;
    let runtime = Runtime::open(
        &args.common,
        listen,
        &[("SUBSCRIPTION_PLAN_URL", &args.subscription_plan_url)],
    )?;
    let plans = runtime.channel(
        "SUBSCRIPTION_PLAN_URL",
        &args.subscription_plan_url,
        "subscription-plan",
    )?;
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
        BillingStore::new(runtime.redis.clone())
            .with_event_retention(args.events_max_per_member as usize, args.events_retention),
        Entitlements::new(
            plans,
            args.entitlement_cache_ttl,
            args.common.downstream_timeout,
        ),
        runtime.clock.clone(),
        policy,
    );
    let sweeper = sweeper::spawn_hold_sweeper(credits.clone(), args.sweep_interval, stop.clone());
    let history = match args.history.settings() {
        Some(settings) => {
            let (db, migrated) = open_and_migrate(&settings, history::migrations).await?;
            let history = history::LedgerHistory::new(db.clone());
            let archive = archive::Archive::new(history.clone(), args.ledger_hot_retention);
            let (credits, interval) = (credits.clone(), args.archive_interval);
            // The archiver leaves the archivers' group itself when `stop` is
            // cancelled.
            when_migrated(
                db,
                migrated,
                history::migrations,
                interval,
                stop.clone(),
                move |stop| {
                    archive::spawn_compactor(archive, credits, interval, stop);
                },
            );
            Some(history)
        }
        None => None,
    };
    let mut server = runtime.server(SERVICE, args.common.limits());
    let events = inmail_shared::state::events::EventHub::spawn(
        runtime.redis.clone(),
        "billing",
        args.watch
            .limits(args.events_retention, args.events_max_per_member as usize),
        stop.clone(),
    );
    server.add_service(
        BillingApi::new(
            credits,
            history,
            events,
            args.common.request_timeout,
            args.common.mutation_quota(),
            feed::FeedSettings {
                lag: args.cdc_lag,
                poll: args.watch.watch_poll.max(Duration::from_millis(20)),
                heartbeat: args.watch.watch_heartbeat,
                retention: args.events_retention,
                index_margin: args.common.request_timeout + Duration::from_secs(5),
            },
            stop.clone(),
        )
        .into_server(),
        grpc::ACCESS,
    );
    let served = runtime.serve(server, listener, stop).await;
    await_leave(sweeper, LEAVE_WAIT).await;
    served
}
