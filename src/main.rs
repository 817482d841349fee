//! The `raftbridge` binary: parses the command line and hands over to `cli`.
#![forbid(unsafe_code)]

/// mimalloc instead of glibc malloc: the request path allocates many small, short-lived objects
/// across threads, where glibc's allocator showed up at ~12% of CPU in `perf` under
/// `raftbridge bench state`; see ARCHITECTURE.md for the figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    raftbridge::cli::main()
}
