//! Logging set-up: `tracing` to stderr, `info` by default, `-v`/`-q` or `RUST_LOG`.

use clap::Args;
use tracing_subscriber::EnvFilter;

/// Verbosity flags shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// More log output (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, display_order = 1000)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(
        short,
        long,
        action = clap::ArgAction::Count,
        global = true,
        conflicts_with = "verbose",
        display_order = 1000
    )]
    pub quiet: u8,
}

/// Installs the global subscriber.
pub fn init(args: &LogArgs) {
    let level = match (args.verbose, args.quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: job logs on a cluster are files.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr is gone (its reader died), tracing-subscriber reports the
        // failed write with `eprintln!`, which panics: the task that logged
        // would die with it (a server would then ignore SIGTERM). Lost log
        // lines are the lesser harm.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
