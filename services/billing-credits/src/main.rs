use std::process::ExitCode;

use billing_credits::{Cli, Command, SERVICE, reconcile_all, serve};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Healthcheck) => inmail_shared::bootstrap::healthcheck(cli.args.listen_addr),
        Some(Command::Reconcile { url }) => reconcile(&url),
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

fn reconcile(url: &str) -> ExitCode {
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
