fn main() -> std::process::ExitCode {
    dispatchd::cli::main()
}
