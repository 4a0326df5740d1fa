//! `dispatcher serve`: flags of the Python server, same names and defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dispatcher_core::job::redo::{RedoConfig, RedoDecision};
use dispatcher_core::job::JobFiles;
use dispatcher_core::ledger::{
    LedgerConfig, DEFAULT_BACKUP_AFTER, DEFAULT_MAX_JOURNAL_BYTES, DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_RELEASES, DEFAULT_MAX_RETRIES, DEFAULT_RETRY_SECS, DEFAULT_WORK_TIMEOUT,
};
use dispatcher_core::server::{self, ServeOptions, StopReason};

/// Flags of `dispatcher serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Input JSONL: line i is work item i (0-based). `--input` is an alias,
    /// as on every other subcommand. Also a dataset: `.jsonl.gz`/`.zst`,
    /// Parquet, Arrow, or a folder or quoted glob of them, staged once as
    /// `<outfile>.input.jsonl` (the book: "Datasets").
    #[arg(long, visible_alias = "input", value_name = "PATH")]
    pub infile: PathBuf,
    /// The split of a dataset input that has several (`train`).
    #[arg(long, value_name = "NAME")]
    pub split: Option<String>,
    /// Output JSONL: line i is the result for input line i. `--output` is
    /// an alias. Optional with --outdir (then `DIR/.job/output.jsonl`).
    #[arg(
        long,
        visible_alias = "output",
        value_name = "PATH",
        required_unless_present = "outdir"
    )]
    pub outfile: Option<PathBuf>,
    /// Sharded output.
    #[command(flatten)]
    pub outdir: crate::outdir::OutdirArgs,
    /// Resume state (default: `<outfile>.checkpoint`).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to bind (0 picks a free one; the log says which).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Seconds before an issued item without a result is reissued.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_WORK_TIMEOUT.as_secs_f64())]
    pub work_timeout: f64,
    /// Reissues after failures (lease expiries, task retries, releases by workers
    /// that give no reason) before an item is tombstoned; -1 never tombstones.
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_MAX_RETRIES.into(),
        allow_negative_numbers = true
    )]
    pub max_retries: i64,
    /// Seconds told to workers to wait when nothing is issuable yet (an upper
    /// bound: less when an in-flight item expires sooner).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RETRY_SECS)]
    pub retry: u64,
    /// Seconds between checkpoints (one is also written at start, on completion
    /// and on SIGTERM/SIGINT).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub checkpoint_interval: f64,
    /// Seconds to keep answering `all_work_complete` before exiting.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub exit_grace: f64,
    /// Largest batch_size a work request may ask for.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_batch_size: usize,
    /// Largest request body accepted, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub max_request_mib: usize,
    /// An access token (`--token-file`, `DISPATCHER_TOKEN`) required on every
    /// endpoint but /health and the page. Off by default, so existing
    /// workers keep working.
    #[command(flatten)]
    pub access: crate::access::TokenArgs,
    /// Log the peer and the first bytes of every request answered with a 4xx.
    #[arg(long)]
    pub log_invalid_http: bool,
    /// Releases of an item by preempted workers before it is tombstoned; -1
    /// never. A budget separate from --max-retries, which counts failures
    /// (lease expiries, task retries).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_RELEASES as i64, allow_negative_numbers = true)]
    pub max_releases: i64,
    /// MiB of finished results kept in memory while they wait for an earlier
    /// line; more are spilled to `<outfile>.pending`.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MAX_PENDING_BYTES >> 20)]
    pub max_pending_mib: u64,
    /// Backup copies of straggling items handed to idle workers at most at once,
    /// once no new line is left (0: off). The first result wins.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub backups: u32,
    /// Seconds an item must have been in flight before it gets a backup copy.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_BACKUP_AFTER.as_secs_f64())]
    pub backup_after: f64,
    /// Seconds a connection may go without progress (idle between requests, or
    /// a request or answer stalled halfway) before it is closed; also the
    /// longest a request's headers may take.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub idle_timeout: f64,
    /// Connections open at once at most (default: the open-file limit, raised
    /// to its hard limit at start, less 64 for the job's own files). Past it,
    /// new connections wait until one closes.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds a request may take from its headers to its answer: its body
    /// must arrive in full within it (a body trickled a byte at a time keeps
    /// a connection busy past any idle timeout).
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Seconds connections may take to finish once the server stops; then it
    /// exits whatever is still open.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub shutdown_timeout: f64,
    /// Redo the failed lines of a finished (or partly finished) output: hand
    /// out again only its failures (all, or those of the listed kinds, as
    /// `dispatcher report` names them, e.g. `--redo-errors
    /// max_retries_exceeded,http_500`), its lines that are not JSON and the
    /// lines it lacks, and write a new output in which every other line is
    /// kept byte for byte. The input must be the one the output was made from. The old output stays as it is until the new one is
    /// complete (`<outfile>.redo`), then replaces it. Resumable like any job.
    #[arg(long, value_name = "KINDS", num_args = 0..=1, default_missing_value = "")]
    pub redo_errors: Option<String>,
    /// Keep no journal: a line issued again is redone from its first engine
    /// request (by default workers hand in each request a task completes, and
    /// a reissued line replays them; `<outfile>.journal`).
    #[arg(long)]
    pub no_journal: bool,
    /// MiB the journal file may take on disk; entries are held (in memory
    /// too) up to half of it, and past that new entries are not recorded
    /// (their lines are redone in full if reissued).
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MAX_JOURNAL_BYTES >> 20)]
    pub max_journal_mib: u64,
    /// Prefix affinity.
    #[command(flatten)]
    pub group: crate::grouping::GroupArgs,
    /// Prices, for the cost shown by `/status`, the page and `dispatcher status`.
    #[command(flatten)]
    pub prices: PriceArgs,
}

/// `--price-per-mtok-in/out`: what a million tokens cost.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PriceArgs {
    /// Price of a million prompt tokens (in any currency: it is only
    /// multiplied); with it, the cost of the tokens so far is shown.
    #[arg(long, value_name = "PRICE")]
    pub price_per_mtok_in: Option<f64>,
    /// Price of a million generated tokens.
    #[arg(long, value_name = "PRICE")]
    pub price_per_mtok_out: Option<f64>,
}

impl PriceArgs {
    /// The prices given (one alone counts the other as free); `None`
    /// without either.
    pub fn prices(&self) -> anyhow::Result<Option<dispatcher_core::protocol::Prices>> {
        for (flag, v) in [
            ("price-per-mtok-in", self.price_per_mtok_in),
            ("price-per-mtok-out", self.price_per_mtok_out),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                bail!("--{flag} must be a price of 0 or more, not {v}");
            }
        }
        if self.price_per_mtok_in.is_none() && self.price_per_mtok_out.is_none() {
            return Ok(None);
        }
        Ok(Some(dispatcher_core::protocol::Prices {
            per_mtok_in: self.price_per_mtok_in.unwrap_or(0.0),
            per_mtok_out: self.price_per_mtok_out.unwrap_or(0.0),
        }))
    }
}

/// `-1` for "never", else a count that fits in `u32`.
fn budget(flag: &str, v: i64) -> anyhow::Result<Option<u32>> {
    match v {
        -1 => Ok(None),
        n if n >= 0 => Ok(Some(
            u32::try_from(n).with_context(|| format!("--{flag} is too large"))?,
        )),
        n => bail!("--{flag} must be -1 (never tombstone) or a count of 0 or more, not {n}"),
    }
}

/// A positive number of seconds given to `--flag`.
pub(crate) fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        bail!("--{flag} must be a positive number of seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl ServeArgs {
    /// The job's files, as the flags name them.
    pub fn files(&self) -> JobFiles {
        let output = (self.outdir)
            .output(self.outfile.as_deref())
            .expect("clap requires --outfile or --outdir");
        JobFiles::new(output, self.checkpoint.clone())
    }

    /// What a `--redo-errors` run redoes, when this is one.
    pub fn redo(&self) -> Option<RedoConfig> {
        let kinds: Vec<String> = self
            .redo_errors
            .as_ref()?
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        Some(RedoConfig {
            previous: self.files(),
            kinds: (!kinds.is_empty()).then_some(kinds),
        })
    }

    /// Validates the flags into the ledger's and server's configuration.
    pub fn config(&self) -> anyhow::Result<(LedgerConfig, ServeOptions)> {
        let max_retries = budget("max-retries", self.max_retries)?;
        let max_releases = budget("max-releases", self.max_releases)?;
        if self.max_batch_size == 0 {
            bail!("--max-batch-size must be at least 1");
        }
        if self.max_request_mib == 0 {
            bail!("--max-request-mib must be at least 1");
        }
        if !self.infile.is_file() {
            bail!(
                "--infile {}: no such file; pass the input JSONL to serve",
                self.infile.display()
            );
        }
        let redo = self.redo();
        let files = match &redo {
            Some(redo) => redo.previous.redo(),
            None => self.files(),
        };
        let ledger = LedgerConfig {
            redo,
            journal: !self.no_journal,
            max_journal_bytes: self.max_journal_mib.saturating_mul(1 << 20),
            work_timeout: secs("work-timeout", self.work_timeout)?,
            max_retries,
            retry_secs: self.retry.max(1),
            max_releases,
            max_pending_bytes: self.max_pending_mib.saturating_mul(1 << 20),
            max_backups: self.backups,
            backup_after: Duration::from_secs_f64(self.backup_after.clamp(0.0, 1e9)),
            grouping: self
                .group
                .grouping(self.max_pending_mib.saturating_mul(1 << 20))?,
            ..LedgerConfig::new(self.infile.clone(), files)
        };
        if self.max_connections == Some(0) {
            bail!("--max-connections must be at least 1");
        }
        let token = self.access.resolve()?;
        let options = ServeOptions {
            checkpoint_interval: secs("checkpoint-interval", self.checkpoint_interval)?,
            exit_grace: Duration::from_secs_f64(self.exit_grace.clamp(0.0, 3600.0)),
            max_batch_size: self.max_batch_size,
            max_body_bytes: self.max_request_mib.saturating_mul(1 << 20),
            token,
            log_invalid_http: self.log_invalid_http,
            idle_timeout: secs("idle-timeout", self.idle_timeout)?,
            max_connections: self.max_connections,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout.clamp(0.0, 3600.0)),
            request_timeout: secs("request-timeout", self.request_timeout)?,
            prices: self.prices.prices()?,
        };
        Ok((ledger, options))
    }
}

/// Before a `--redo-errors` run: the core's decision ([`RedoConfig::decide`]),
/// said. `Ok(false)` when there is nothing to run.
fn prepare_redo(args: &ServeArgs, redo: &RedoConfig) -> anyhow::Result<bool> {
    let output = redo.previous.output().display();
    Ok(match redo.decide(&args.infile)? {
        RedoDecision::FinishedInterrupted => {
            tracing::info!(
                %output,
                "a finished --redo-errors run had not moved its checkpoint into place; it is now, and the output is complete"
            );
            false
        }
        RedoDecision::Nothing(survey) => {
            tracing::info!(
                %output,
                failures = %survey.describe(),
                "nothing to redo: no line of the output is a failure of the kinds asked for, and none is missing; the output is left as it is"
            );
            false
        }
        RedoDecision::Run { survey, missing } => {
            tracing::info!(
                %output,
                redo = survey.to_redo,
                missing,
                failures = %survey.describe(),
                "redoing lines of a previous output"
            );
            true
        }
    })
}

/// Runs the server until the job is complete or a signal stops it.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // A dataset is staged (or its staged copy found) before anything else
    // reads the input: from here on the job's input is one JSONL file.
    let files = args.files();
    let made = args.outdir.create_job_dir(files.output())?;
    let prepared = dispatcher_core::dataset::prepare(&args.infile, args.split.as_deref(), &files)?;
    let mut follower = args.outdir.plan(&files, &prepared)?;
    made.keep();
    let args = ServeArgs {
        infile: prepared.path.clone(),
        ..args
    };
    let redo = args.redo();
    if let Some(redo) = &redo {
        if !prepare_redo(&args, redo)? {
            if let Some(follower) = follower {
                follower.finish().await?;
            }
            return Ok(());
        }
    }
    let (mut ledger, options) = args.config()?;
    ledger.sources = prepared.sources;
    match server::raise_open_file_limit() {
        Ok((before, now)) => {
            tracing::info!(soft_before = before, soft_now = now, "open-file limit")
        }
        Err(e) => tracing::warn!("could not read or raise the open-file limit: {e}"),
    }
    let listener = server::bind(&args.host, args.port).await?;
    let state = server::open(ledger, &options)?;
    let stop_signal = crate::termination_signal();
    if let Some(addr) = server::local_addr(&listener) {
        // A machine-readable line for scripts that started us with --port 0,
        // written once the job's files are open and checked. A closed stdout
        // is no reason to stop serving.
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {addr}").and_then(|()| stdout.flush());
    }
    if let Some(f) = &mut follower {
        f.start();
    }
    let stopped = server::serve_state(listener, state, options, stop_signal).await;
    if let Some(follower) = follower {
        follower.finish().await?;
    }
    match stopped? {
        StopReason::Complete => match &redo {
            Some(redo) => tracing::info!(
                output = %redo.previous.output().display(),
                "all work complete; the redone output replaced the old one"
            ),
            None => tracing::info!("all work complete"),
        },
        StopReason::Shutdown => {
            tracing::info!("stopped by signal; restart with the same flags to resume")
        }
    }
    Ok(())
}
