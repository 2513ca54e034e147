fn main() -> std::process::ExitCode {
    inmail_shared::cli::main::<subscription_plan::Service>()
}
