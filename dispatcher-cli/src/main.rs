fn main() -> std::process::ExitCode {
    dispatcher_cli::main()
}
