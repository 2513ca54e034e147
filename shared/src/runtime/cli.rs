//! The command line every service binary shares: `serve` (the default),
//! `healthcheck`, and the binary's own subcommands, over its flags.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::runtime::bootstrap::{healthcheck, run_service};
use crate::runtime::config::CommonArgs;

/// A service binary: its name, its flags and how it serves.
pub trait ServiceBinary {
    /// Names the binary, its metrics and its logs (e.g. "billing-credits").
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// The binary's flags (each with an environment variable).
    type Args: clap::Args + Clone + std::fmt::Debug + Send + 'static;
    /// Subcommands beyond `serve` and `healthcheck` ([`NoCommands`] if none).
    type Commands: clap::Subcommand + Clone + std::fmt::Debug;

    fn listen_addr(args: &Self::Args) -> SocketAddr;
    fn common(args: &Self::Args) -> &CommonArgs;
    fn serve(
        args: Self::Args,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Runs one of the binary's own subcommands.
    fn run_command(command: Self::Commands, args: Self::Args) -> ExitCode;
}

/// No subcommands of the binary's own.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NoCommands {}

#[derive(Debug, Clone, clap::Parser)]
pub struct Cli<A: clap::Args, C: clap::Subcommand> {
    #[command(subcommand)]
    pub command: Option<Command<C>>,
    #[command(flatten)]
    pub args: A,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command<C: clap::Subcommand> {
    /// Serve gRPC (the default).
    Serve,
    /// Ask the running service's gRPC health; exit 0 when SERVING.
    Healthcheck,
    #[command(flatten)]
    Own(C),
}

/// The command-line definition of `S`.
pub fn command<S: ServiceBinary>() -> clap::Command {
    Cli::<S::Args, S::Commands>::command()
        .name(S::NAME)
        .bin_name(S::NAME)
        .about(S::ABOUT)
        .version(env!("CARGO_PKG_VERSION"))
}

/// Parses `args` (the first one is the binary's name) as `S`'s command line.
pub fn try_parse_from<S: ServiceBinary, I, T>(
    args: I,
) -> Result<Cli<S::Args, S::Commands>, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command::<S>().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// Parses `args` or panics with clap's message (tests build command lines).
pub fn parse_from<S: ServiceBinary, I, T>(args: I) -> Cli<S::Args, S::Commands>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    try_parse_from::<S, _, _>(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The `main` of a service binary.
pub fn main<S: ServiceBinary>() -> ExitCode {
    let cli = match try_parse_from::<S, _, _>(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Some(Command::Healthcheck) => healthcheck(S::listen_addr(&cli.args), S::common(&cli.args)),
        Some(Command::Own(command)) => S::run_command(command, cli.args),
        Some(Command::Serve) | None => {
            let args = cli.args;
            let common = S::common(&args).clone();
            let listen = S::listen_addr(&args);
            run_service(S::NAME, &common, listen, |listener, stop| {
                S::serve(args, listener, stop)
            })
        }
    }
}
