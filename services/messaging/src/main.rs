use std::process::ExitCode;

use clap::Parser;
use messaging::{Cli, Command, SERVICE, serve};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Healthcheck) => inmail_shared::bootstrap::healthcheck(cli.args.listen_addr),
        Some(Command::Serve) | None => {
            let args = cli.args;
            let common = args.common.clone();
            let listen = args.listen_addr;
            inmail_shared::bootstrap::run_service(SERVICE, &common, listen, |listener, stop| {
                serve(args, listener, stop)
            })
        }
    }
}
