fn main() -> std::process::ExitCode {
    inmail_shared::cli::main::<messaging::Service>()
}
