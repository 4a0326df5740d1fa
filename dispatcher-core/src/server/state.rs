//! The state the handlers and background tasks share, and its lock rule: the
//! ledger is locked briefly by each request and never across an `.await`; a
//! failure stops every later request under that same lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::error::ApiError;
use super::ServeOptions;
use crate::error::is_descriptor_shortage;
use crate::ledger::Ledger;
use crate::metrics::ServerMetrics;

/// State shared by the handlers and background tasks.
#[derive(Debug)]
pub struct AppState {
    /// The job. Locked briefly by each request, never across an `.await`. (An
    /// async mutex measured slower at small batches and no faster at large ones:
    /// the lock is not where the time goes; see BENCHMARKS.md.)
    pub(super) ledger: std::sync::Mutex<Ledger>,
    /// Set, under the ledger's lock, by the first failure: no request touches
    /// the ledger after it. (`failure` carries the message to whoever waits.)
    stopped: AtomicBool,
    /// `--max-batch-size`.
    pub(super) max_batch_size: usize,
    /// `--max-request-mib`, in bytes.
    pub(super) max_body_bytes: usize,
    /// `--request-timeout`: how long a request body may take to arrive.
    pub(super) request_timeout: std::time::Duration,
    /// The first fatal I/O error. Once set, every request gets 503 and the server
    /// stops; it is never cleared.
    pub(super) failure: watch::Sender<Option<String>>,
    /// Becomes true once every line has its output line.
    pub(super) complete: watch::Sender<bool>,
    /// The access token, if one is required.
    pub(super) token: Option<String>,
    /// Prometheus metrics, rendered by `GET /metrics`.
    pub(super) metrics: ServerMetrics,
    /// Log the peer and first bytes of requests answered with a 4xx.
    pub(super) log_invalid_http: bool,
    /// Lines of the input, counted in the background at start, so that
    /// `/status` has a total before the input has been read to its end.
    pub(super) input_lines: std::sync::OnceLock<u64>,
    /// Requests workers answered from journals, and the tokens that saved.
    pub(super) journal_replayed: std::sync::atomic::AtomicU64,
    pub(super) journal_tokens_saved: std::sync::atomic::AtomicU64,
    /// Requests refused for want of the token, and those of them logged.
    pub(super) refused: super::access::Refusals,
    /// The workers seen. Its own lock, never held with the ledger's.
    pub(super) workers: std::sync::Mutex<super::workers::Workers>,
    /// `<outfile>.manifest.json`. Its own lock, taken after the ledger's
    /// lock is released (never while holding it).
    pub(super) manifest: std::sync::Mutex<crate::job::manifest::Manifest>,
    /// Held while a checkpoint is taken and written, so that checkpoints are
    /// written one at a time, in the order their state was taken. Taken before
    /// the ledger's lock, never while holding it.
    checkpointing: std::sync::Mutex<()>,
    /// Engine tokens of the job's earlier runs (from the manifest).
    pub(super) earlier_tokens: crate::protocol::TokenCounts,
    /// Progress over time. Its own lock, never held with another.
    pub(super) history: std::sync::Mutex<super::history::History>,
    /// `/status` answers kept for `?max_age`: without and with the history.
    pub(super) status_cache:
        std::sync::Mutex<[Option<(tokio::time::Instant, axum::body::Bytes)>; 2]>,
    /// When the server started.
    pub(super) started: tokio::time::Instant,
    /// `--price-per-mtok-in/out`.
    pub(super) prices: Option<crate::protocol::Prices>,
}

impl AppState {
    /// Logs what is served, and from which line it resumes.
    pub(super) fn log_serving(&self, addr: &str) {
        let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(
            %addr,
            input = %ledger.config().infile.display(),
            output = %ledger.config().files.output().display(),
            resumed_at_line = ledger.lines_written(),
            recovered_past_checkpoint = ledger.recovered_past_checkpoint(),
            "serving"
        );
    }

    /// Wraps an opened ledger.
    pub fn new(ledger: Ledger, options: &ServeOptions) -> Arc<AppState> {
        let complete = ledger.is_complete();
        // A redo's manifest is the job's: it describes the output it replaces.
        let config = ledger.config();
        let manifest = crate::job::manifest::Manifest::start(
            &config.infile,
            config
                .redo
                .as_ref()
                .map_or(config.files.output(), |r| r.previous.output()),
            ledger.lines_written(),
            config.redo.as_ref(),
            ledger.is_fresh() && config.redo.is_none(),
        );
        let earlier_tokens = manifest.earlier_tokens();
        Arc::new(AppState {
            ledger: std::sync::Mutex::new(ledger),
            stopped: AtomicBool::new(false),
            max_batch_size: options.max_batch_size,
            max_body_bytes: options.max_body_bytes,
            request_timeout: options.request_timeout,
            failure: watch::channel(None).0,
            complete: watch::channel(complete).0,
            token: options.token.clone(),
            metrics: ServerMetrics::default(),
            log_invalid_http: options.log_invalid_http,
            input_lines: std::sync::OnceLock::new(),
            workers: std::sync::Mutex::default(),
            journal_replayed: std::sync::atomic::AtomicU64::new(0),
            journal_tokens_saved: std::sync::atomic::AtomicU64::new(0),
            refused: super::access::Refusals::default(),
            manifest: std::sync::Mutex::new(manifest),
            checkpointing: std::sync::Mutex::new(()),
            earlier_tokens,
            history: std::sync::Mutex::default(),
            status_cache: std::sync::Mutex::default(),
            started: tokio::time::Instant::now(),
            prices: options.prices,
        })
    }

    /// Engine tokens reported over every run of the job.
    pub(super) fn tokens(&self) -> crate::protocol::TokenCounts {
        self.earlier_tokens + self.workers().tokens_total()
    }

    /// The progress now, with `lines_done` written.
    pub(super) fn progress(&self, lines_done: u64) -> crate::protocol::HistorySample {
        crate::protocol::HistorySample {
            secs: self.started.elapsed().as_secs_f64(),
            lines_done,
            tokens: self.tokens(),
        }
    }

    /// Adds the progress now to the history.
    pub(super) fn sample_progress(&self, lines_done: u64) {
        let sample = self.progress(lines_done);
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sample);
    }

    /// Writes the tokens this run's workers reported into the manifest.
    pub(super) fn save_tokens(&self) {
        let tokens = self.workers().tokens_total();
        self.manifest().save_tokens(tokens);
    }

    /// The worker registry (its lock recovers from poisoning: nothing under
    /// it can leave it half-changed).
    pub(super) fn workers(&self) -> std::sync::MutexGuard<'_, super::workers::Workers> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The manifest, locked.
    pub(super) fn manifest(&self) -> std::sync::MutexGuard<'_, crate::job::manifest::Manifest> {
        self.manifest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a checkpoint. Its state is taken under the ledger's lock; the
    /// fsyncs that make it durable run on a blocking thread without the lock,
    /// so requests are served meanwhile (on a shared file system an fsync of
    /// 30 s of output can take seconds). A failure stops the server.
    pub(super) async fn checkpoint(self: &Arc<Self>) -> Result<(), ApiError> {
        let state = Arc::clone(self);
        match tokio::task::spawn_blocking(move || state.checkpoint_blocking()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.fail_locked("a bug: writing the checkpoint panicked; stopping".into());
                Err(ApiError::Stopped)
            }
        }
    }

    /// A checkpoint opens files (the input and output for their fingerprints,
    /// a temporary file, the directory): when descriptors run short it waits
    /// for connections to close and tries again, a few times, before it gives
    /// up and stops the server.
    fn checkpoint_blocking(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let mut wait = std::time::Duration::from_millis(50);
        for attempt in 1.. {
            let written = self
                .with_ledger(|l| Ok(l.begin_checkpoint()))?
                .and_then(|pending| pending.commit());
            match written {
                Ok(()) => return Ok(()),
                Err(e) if is_descriptor_shortage(&e) && attempt < 8 => {
                    tracing::warn!(attempt, "checkpoint delayed: {e}");
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(e) => {
                    self.fail_locked(e.to_string());
                    return Err(ApiError::Stopped);
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// [`fail`](Self::fail) from outside the ledger's lock: takes it, so that
    /// the stopped flag is set under it as requests expect.
    pub(super) fn fail_locked(&self, message: String) {
        let _ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        self.fail(message);
    }

    /// Runs `f` on the ledger under its (std) lock; an I/O error stops the
    /// server. Synchronous, so the lock can never be held across an `.await`.
    pub(super) fn with_ledger<T>(
        &self,
        f: impl FnOnce(&mut Ledger) -> std::io::Result<T>,
    ) -> Result<T, ApiError> {
        // A panic inside `f` is caught below, so the lock is never poisoned by
        // one; the stopped flag keeps everyone out of the ledger instead.
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock: whoever failed set it before unlocking, so
        // nothing runs on a ledger whose output may be missing a write.
        if self.stopped.load(Ordering::Acquire) {
            return Err(ApiError::Stopped);
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut ledger)));
        match outcome {
            Ok(Ok(v)) => {
                if ledger.is_complete() {
                    self.complete
                        .send_if_modified(|c| !std::mem::replace(c, true));
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.fail(e.to_string());
                Err(ApiError::Stopped)
            }
            Err(_) => {
                self.fail(
                    "a bug: the ledger panicked; stopping rather than risk a misaligned output"
                        .into(),
                );
                Err(ApiError::Stopped)
            }
        }
    }

    /// Stops the server after a failure. Called with the ledger's lock held
    /// (see [`with_ledger`](Self::with_ledger) and [`fail_locked`](Self::fail_locked)),
    /// so that no request runs on the ledger after it.
    fn fail(&self, message: String) {
        self.stopped.store(true, Ordering::Release);
        tracing::error!("{message}");
        self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(message);
                true
            } else {
                false
            }
        });
    }
}
