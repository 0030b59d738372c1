/// mimalloc for the binary: under load glibc's allocator spent a fifth of dispatchd's CPU (arena
/// locks, consolidation); mimalloc's thread-local heaps do not. The library leaves the choice of
/// allocator to whoever embeds it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dispatchd::cli::main()
}
