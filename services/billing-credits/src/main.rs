fn main() -> std::process::ExitCode {
    inmail_shared::cli::main::<billing_credits::Service>()
}
