// The allocator, chosen by measurement (BENCHMARKS.md, "The static binary"):
// mimalloc beats both glibc's and musl's on this binary's work (estimate's
// tokenizing threads most, the server's small per-request allocations too), so
// every build uses it, and the static (musl) one does not pay for musl's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dispatcher_cli::main()
}
