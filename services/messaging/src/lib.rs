//! messaging: invitations, connections, blocks, InMail preferences, conversations and
//! messages; InMail charged through billing-credits and refunded on response.

pub mod archive;
mod checks;
pub mod conversations;
pub mod domain;
pub mod downstream;
pub mod error;
pub mod events;
pub mod grpc;
pub mod history;
pub mod relations;
pub mod respond;
pub mod send;
pub mod service;
pub mod store;
pub mod sweeper;
pub mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use inmail_shared::runtime::bootstrap::Runtime;
use inmail_shared::runtime::cli::ServiceBinary;
use inmail_shared::runtime::config::CommonArgs;
use inmail_shared::state::history::{open_and_migrate, when_migrated};
use inmail_shared::state::idempotency::REQUEST_RETENTION;
use inmail_shared::state::sweep::{LEAVE_WAIT, await_leave};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::PendingInmailPolicy;
use crate::downstream::{Billing, Plans};
use crate::grpc::MessagingApi;
use crate::send::{Config, Faults, Messaging};
use crate::store::{InvitationLimits, MessagingStore, SendLimits};

pub const SERVICE: &str = "messaging";

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The `messaging` binary.
pub struct Service;

/// Development tools of the `messaging` binary (what `scripts/dev-up.sh`
/// uses; a production deployment has its own CA and identity provider).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Commands {
    /// Print a member token signed with the development signing key, for
    /// `grpcurl -H "authorization: Bearer <token>"`.
    Token {
        /// The member the token is for.
        #[arg(long)]
        member: String,
        /// The Ed25519 signing key (PKCS#8 PEM).
        #[arg(long, env = "JWT_SIGNING_KEY_FILE")]
        signing_key_file: std::path::PathBuf,
        /// The key id the verifiers know it by.
        #[arg(long, default_value = "dev-1")]
        kid: String,
        /// How long the token is valid.
        #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Write a development PKI into DIR: a CA, a certificate per service
    /// and an operator's, the member-token signing key and its JWK set, a
    /// Redis password per service and the Redis ACL files. Leaves a DIR that
    /// already holds one (ca.crt) as it is unless --force.
    DevPki {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Replace what DIR holds.
        #[arg(long)]
        force: bool,
        /// Host names and addresses the services are reached at (besides
        /// their service names).
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
    },
}

fn run_dev_command(command: Commands, args: &Args) -> Result<String, String> {
    match command {
        Commands::Token {
            member,
            signing_key_file,
            kid,
            ttl,
        } => {
            if !inmail_shared::contract::validate::is_member_id(&member) {
                return Err(format!("--member {member:?} is not a member id"));
            }
            let pem = std::fs::read(&signing_key_file)
                .map_err(|e| format!("JWT_SIGNING_KEY_FILE {}: {e}", signing_key_file.display()))?;
            let signer = inmail_shared::runtime::auth::token::TokenSigner::new(
                &pem,
                &kid,
                &args.common.jwt_issuer,
                &args.common.jwt_audience,
            )
            .map_err(|e| format!("JWT_SIGNING_KEY_FILE {}: {e}", signing_key_file.display()))?;
            signer.mint(&member, ttl)
        }
        Commands::DevPki { dir, force, hosts } => {
            if !force && dir.join("ca.crt").exists() {
                inmail_shared::runtime::auth::devpki::DevPki::refresh_acl_files(&dir)?;
                return Ok(format!(
                    "{} already holds a development PKI; left as it is, its Redis ACL files \
                     rewritten to the current rules and passwords it lacked added \
                     (--force replaces it all)",
                    dir.display()
                ));
            }
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let pki = inmail_shared::runtime::auth::devpki::DevPki::generate(&hosts)?;
            pki.write(&dir)?;
            Ok(format!("development PKI written to {}", dir.display()))
        }
    }
}

impl ServiceBinary for Service {
    const NAME: &'static str = SERVICE;
    const ABOUT: &'static str =
        "InMail conversations and messages, charged through billing-credits (gRPC)";
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

    fn run_command(command: Commands, args: Args) -> ExitCode {
        match run_dev_command(command, &args) {
            Ok(output) => {
                println!("{output}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("messaging: {message}");
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50053")]
    pub listen_addr: SocketAddr,

    /// billing-credits, which charges and refunds InMail.
    #[arg(
        long,
        env = "BILLING_CREDITS_URL",
        default_value = "https://127.0.0.1:50052"
    )]
    pub billing_credits_url: String,

    /// subscription-plan, asked for recipients' Open Profile.
    #[arg(
        long,
        env = "SUBSCRIPTION_PLAN_URL",
        default_value = "https://127.0.0.1:50051"
    )]
    pub subscription_plan_url: String,

    /// InMails a sender may send at once before the daily rate applies.
    #[arg(long, env = "INMAIL_BURST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub inmail_burst: u32,

    /// InMails a sender may send per day, on average.
    #[arg(long, env = "INMAIL_PER_DAY", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub inmail_per_day: u32,

    /// Free messages (every kind but InMail) a sender may send at once before
    /// the per-minute rate applies.
    #[arg(long, env = "FREE_SEND_BURST", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub free_send_burst: u32,

    /// Free messages a sender may send per minute, on average.
    #[arg(long, env = "FREE_SENDS_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub free_sends_per_minute: u32,

    /// The most bytes one page of a list answers (at least one item): pages
    /// of large messages hold fewer of them.
    #[arg(long, env = "PAGE_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(4096..))]
    pub page_bytes: u32,

    /// Open Profile messages a sender may send per calendar month.
    #[arg(long, env = "OPEN_PROFILE_MONTHLY_LIMIT", default_value_t = 800)]
    pub open_profile_monthly_limit: u32,

    /// What a sender's further message does while their InMail awaits a
    /// response: refuse (AWAITING_RESPONSE) or allow-follow-ups (free).
    #[arg(long, env = "PENDING_INMAIL_POLICY", value_enum, default_value_t = PendingInmailPolicy::Refuse)]
    pub pending_inmail_policy: PendingInmailPolicy,

    /// Invitations a member may send per week (the budget refills evenly).
    #[arg(long, env = "INVITATIONS_PER_WEEK", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub invitations_per_week: u32,

    /// Invitations one member may have pending at once.
    #[arg(long, env = "MAX_PENDING_INVITATIONS", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_invitations: u32,

    /// After a withdrawn or ignored invitation, how long before the inviter
    /// may invite the same member again.
    #[arg(long, env = "INVITATION_COOLDOWN", default_value = "21days", value_parser = humantime::parse_duration)]
    pub invitation_cooldown: Duration,

    /// The most connections one member may have.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 30_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// The most members one member may block.
    #[arg(long, env = "MAX_BLOCKS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_blocks: u32,

    /// A response within this long after sending refunds the InMail's credit.
    #[arg(long, env = "REFUND_WINDOW", default_value = "90days", value_parser = humantime::parse_duration)]
    pub refund_window: Duration,

    /// When the outbox sweeper takes over a send or a response whose
    /// process died; must be longer than REQUEST_TIMEOUT, which bounds the
    /// calls still in flight.
    #[arg(long, env = "SEND_RECOVERY_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub send_recovery_after: Duration,

    /// How often the outbox sweeper asks billing again for a refund it did
    /// not take.
    #[arg(long, env = "REFUND_RETRY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub refund_retry: Duration,

    /// How often the outbox sweeper runs.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// How long inbox events are kept for WatchInbox to resume from.
    #[arg(long, env = "EVENTS_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub events_retention: Duration,

    /// The most inbox events kept per member.
    #[arg(long, env = "EVENTS_MAX_PER_MEMBER", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub events_max_per_member: u32,

    #[command(flatten)]
    pub watch: inmail_shared::state::events::WatchArgs,

    /// Where delivered messages older than HISTORY_HOT_RETENTION go.
    #[command(flatten)]
    pub history: inmail_shared::runtime::config::HistoryArgs,

    /// How long delivered messages stay in Redis when DATABASE_URL is set
    /// (then they move to the history store, still read by ListMessages).
    #[arg(long, env = "HISTORY_HOT_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub history_hot_retention: Duration,

    /// How often messages past HISTORY_HOT_RETENTION are moved.
    #[arg(long, env = "ARCHIVE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub archive_interval: Duration,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Refuses timing settings that contradict each other, naming them.
fn check_timing(args: &Args) -> Result<(), String> {
    if args.events_retention < Duration::from_secs(1) {
        return Err("EVENTS_RETENTION must be at least 1s".into());
    }
    if args.archive_interval.is_zero() {
        return Err("ARCHIVE_INTERVAL must be positive".into());
    }
    if args.sweep_interval.is_zero() {
        return Err("SWEEP_INTERVAL must be positive".into());
    }
    if args.refund_retry.is_zero() {
        return Err("REFUND_RETRY must be positive".into());
    }
    let timeout = args.common.request_timeout;
    if args.send_recovery_after <= timeout {
        return Err(format!(
            "SEND_RECOVERY_AFTER ({}) must be longer than REQUEST_TIMEOUT ({}): the outbox \
             sweeper would take over sends and responses that are still in flight",
            humantime::format_duration(args.send_recovery_after),
            humantime::format_duration(timeout),
        ));
    }
    Ok(())
}

/// Serves messaging on `listener` until `stop` is cancelled.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), String> {
    serve_with_faults(args, Faults::default(), listener, stop).await
}

/// [`serve`], with faults injected by tests.
pub async fn serve_with_faults(
    args: Args,
    faults: Faults,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), String> {
    check_timing(&args)?;
    let listen = listener
        .local_addr()
        .map_err(|e| format!("LISTEN_ADDR: {e}"))?;
    let runtime = Runtime::open(
        &args.common,
        listen,
        &[
            ("BILLING_CREDITS_URL", &args.billing_credits_url),
            ("SUBSCRIPTION_PLAN_URL", &args.subscription_plan_url),
        ],
    )?;
    let billing = runtime.channel(
        "BILLING_CREDITS_URL",
        &args.billing_credits_url,
        "billing-credits",
    )?;
    let plans = runtime.channel(
        "SUBSCRIPTION_PLAN_URL",
        &args.subscription_plan_url,
        "subscription-plan",
    )?;
    let config = Config {
        policy: args.pending_inmail_policy,
        limits: SendLimits {
            burst: args.inmail_burst,
            tokens_per_ms: f64::from(args.inmail_per_day) / DAY.as_millis() as f64,
            free_burst: args.free_send_burst,
            free_tokens_per_ms: f64::from(args.free_sends_per_minute) / 60_000.0,
            open_profile_monthly: args.open_profile_monthly_limit,
            open_profile_counter_ttl_ms: (32 * DAY).as_millis() as i64,
            request_retention_ms: REQUEST_RETENTION.as_millis() as i64,
            quota: args.common.mutation_quota(),
        },
        invitations: InvitationLimits {
            per_week: args.invitations_per_week,
            tokens_per_ms: f64::from(args.invitations_per_week) / (7 * DAY).as_millis() as f64,
            max_pending: args.max_pending_invitations,
            cooldown_ms: args.invitation_cooldown.as_millis() as i64,
            max_connections: args.max_connections,
            max_blocks: args.max_blocks,
        },
        refund_window: args.refund_window,
        recovery_after: args.send_recovery_after,
        refund_retry: args.refund_retry,
        // As long as the request record: every retry of a given-up send
        // answers the same refusal.
        failed_keep: REQUEST_RETENTION,
        page_bytes: args.page_bytes as usize,
        events: crate::service::EventRetention {
            keep: args.events_max_per_member as usize,
            retention: args.events_retention,
        },
        faults,
    };
    let mut messaging = Messaging::new(
        MessagingStore::new(runtime.redis.clone()),
        Billing::new(billing, args.common.downstream_timeout),
        Plans::new(plans, args.common.downstream_timeout),
        runtime.clock.clone(),
        config,
    );
    if let Some(settings) = args.history.settings() {
        let (db, migrated) = open_and_migrate(&settings, history::migrations).await?;
        let history = history::MessageHistory::new(db.clone());
        messaging = messaging.with_history(history.clone());
        let archive = archive::Archive::new(history, args.history_hot_retention);
        let (archiving, interval) = (messaging.clone(), args.archive_interval);
        // The archiver leaves the archivers' group itself when `stop` is
        // cancelled.
        when_migrated(
            db,
            migrated,
            history::migrations,
            interval,
            stop.clone(),
            move |stop| {
                archive::spawn_archiver(archive, archiving, interval, stop);
            },
        );
    }
    let sweeper =
        sweeper::spawn_outbox_sweeper(messaging.clone(), args.sweep_interval, stop.clone());
    let events = inmail_shared::state::events::EventHub::spawn(
        runtime.redis.clone(),
        "messaging",
        args.watch
            .limits(args.events_retention, args.events_max_per_member as usize),
        stop.clone(),
    );
    let mut server = runtime.server(SERVICE, args.common.limits());
    server.add_service(
        MessagingApi::new(
            messaging,
            events,
            args.common.request_timeout,
            args.common.mutation_quota(),
        )
        .into_server(),
        grpc::ACCESS,
    );
    let served = runtime.serve(server, listener, stop).await;
    await_leave(sweeper, LEAVE_WAIT).await;
    served
}
