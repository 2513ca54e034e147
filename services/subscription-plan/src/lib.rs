//! subscription-plan: the plan catalog and each member's subscription,
//! billing cycle, scheduled changes and Open Profile.

pub mod catalog;
pub mod cycles;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use inmail_shared::runtime::bootstrap::Runtime;
use inmail_shared::runtime::cli::{NoCommands, ServiceBinary};
use inmail_shared::runtime::config::CommonArgs;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::grpc::PlansApi;
use crate::store::PlanStore;

pub const SERVICE: &str = "subscription-plan";

/// The `subscription-plan` binary.
pub struct Service;

impl ServiceBinary for Service {
    const NAME: &'static str = SERVICE;
    const ABOUT: &'static str =
        "InMail plan catalog, subscriptions, billing cycles and Open Profile (gRPC)";
    type Args = Args;
    type Commands = NoCommands;

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

    fn run_command(command: NoCommands, _args: Args) -> ExitCode {
        match command {}
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,

    /// Plan catalog (TOML); the built-in catalog when unset.
    #[arg(long, env = "PLANS_FILE")]
    pub plans_file: Option<PathBuf>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Serves subscription-plan on `listener` until `stop` is cancelled.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), String> {
    let catalog = Arc::new(Catalog::load(args.plans_file.as_deref())?);
    let listen = listener
        .local_addr()
        .map_err(|e| format!("LISTEN_ADDR: {e}"))?;
    let runtime = Runtime::open(&args.common, listen, &[])?;
    let store = PlanStore::new(runtime.redis.clone(), args.common.mutation_quota());
    tokio::spawn(publish_all(store.clone(), stop.clone()));
    let api = PlansApi::new(catalog, store, runtime.clock.clone());
    let mut server = runtime.server(SERVICE, args.common.limits());
    server.add_service(api.into_server(), grpc::ACCESS);
    runtime.serve(server, listener, stop).await
}

/// Publishes the subscriptions stored before their revision and Open
/// Profile were published (store.rs), retrying while Redis is unreachable.
async fn publish_all(store: PlanStore, stop: CancellationToken) {
    loop {
        match store.publish_all().await {
            Ok(0) => return,
            Ok(published) => {
                tracing::info!(
                    published,
                    "published subscriptions stored before publication"
                );
                return;
            }
            Err(err) => tracing::warn!(error = %err, "publishing stored subscriptions; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
    }
}
