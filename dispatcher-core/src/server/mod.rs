//! `dispatcher serve`: the HTTP layer over the [`Ledger`], its ticker and
//! checkpointer, and how the server stops (all work complete, a signal, or an
//! I/O failure).
//!
//! - `state.rs`: [`AppState`], the state the handlers share, and its lock rule;
//! - `http.rs`: the router, the handlers and middleware; the wire format of
//!   the ledger's answers is built there;
//! - `access.rs`: who may ask: the token, and no page of another origin;
//! - `body.rs`: request bodies read within their limits, and logged when
//!   refused;
//! - `status.rs`: `GET /status`, built from the ledger, workers and history;
//! - `error.rs`: the HTTP layer's one error type and its JSON answer;
//! - `connections.rs`: the accept loop, per-connection timeouts and the cap;
//! - `workers.rs`: the workers seen;
//! - `history.rs`: progress sampled every few seconds, for rates and the
//!   page's chart;
//! - `page/`: the job page (`index.html`, `page.js`), embedded in the binary;
//! - here: the lifecycle: [`serve`], the ticker, the checkpointer, the
//!   completion watcher and the shutdown.

mod access;
mod body;
mod connections;
mod error;
mod history;
#[cfg(test)]
mod hostile_tests;
mod http;
mod state;
mod status;
#[cfg(test)]
mod tests;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::job::checkpoint::ResumeError;
use crate::ledger::{Ledger, LedgerConfig};
use connections::{serve_connections, ConnectionLimits};

pub use connections::{default_max_connections, raise_open_file_limit, RESERVED_FDS};
pub use http::{app, work_response};
pub use state::AppState;
pub use status::status_response;

/// How the server runs, beyond the job itself.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Seconds between checkpoints.
    pub checkpoint_interval: Duration,
    /// How long to keep answering `all_work_complete` before exiting.
    pub exit_grace: Duration,
    /// Largest `batch_size` a work request may ask for.
    pub max_batch_size: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// A shared secret every endpoint but `/health` requires as
    /// `Authorization: Bearer <token>`; `None` (the default) requires nothing, as
    /// the Python server did.
    pub token: Option<String>,
    /// Log the peer and the first bytes of every request answered with a 4xx.
    pub log_invalid_http: bool,
    /// Longest a connection's read or write may make no progress (an idle
    /// keep-alive connection, a request cut off halfway, a peer that stopped
    /// reading), and longest a request's headers may take.
    pub idle_timeout: Duration,
    /// Connections open at once at most; `None`: the open-file limit less
    /// [`RESERVED_FDS`].
    pub max_connections: Option<usize>,
    /// How long connections may take to finish once the server stops; then
    /// it exits whatever is still open.
    pub shutdown_timeout: Duration,
    /// Longest a request may take from its headers to its answer: its body
    /// must arrive in full within it, however steadily it trickles.
    pub request_timeout: Duration,
    /// Prices per million tokens (`--price-per-mtok-in/out`), for the cost
    /// `/status` and the page show.
    pub prices: Option<crate::protocol::Prices>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            checkpoint_interval: Duration::from_secs(30),
            exit_grace: Duration::from_secs(5),
            max_batch_size: 10_000,
            max_body_bytes: 64 << 20,
            token: None,
            log_invalid_http: false,
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            prices: None,
            shutdown_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// Why the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Every line has its output line, and the grace period is over.
    Complete,
    /// The caller's shutdown future resolved (SIGTERM, SIGINT).
    Shutdown,
}

/// Why the server could not run or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The job's files could not be resumed from.
    #[error(transparent)]
    Resume(#[from] ResumeError),
    /// A file could not be read or written while serving (the message names it);
    /// the output is intact up to the last line written.
    #[error("stopped after an I/O failure: {0}")]
    Io(String),
    /// The listening socket failed.
    #[error("could not listen on {addr}: {source}")]
    Listen {
        /// `HOST:PORT` as given.
        addr: String,
        /// Why binding or accepting failed.
        source: std::io::Error,
    },
}

/// Opens the job and serves it on `listener` until it is complete, `shutdown`
/// resolves, or an I/O failure stops it. Writes a final checkpoint either way
/// it ends well.
pub async fn serve(
    listener: TcpListener,
    config: LedgerConfig,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<StopReason, ServerError> {
    let state = open(config, &options)?;
    serve_state(listener, state, options, shutdown).await
}

/// Opens (or resumes) the job's files for [`serve_state`].
pub fn open(config: LedgerConfig, options: &ServeOptions) -> Result<Arc<AppState>, ServerError> {
    let opening = Instant::now();
    let infile = config.infile.clone();
    let ledger = Ledger::open(config, opening)?;
    tracing::info!(took_ms = opening.elapsed().as_millis(), "job files opened");
    let prefix = ledger.input_prefix();
    let state = AppState::new(ledger, options);
    count_input_lines(&state, infile, prefix);
    Ok(state)
}

/// Counts the input's lines and takes its checksum on a thread of its own
/// (one pass with memchr and crc32fast, while requests are served), for the
/// total in `/status` and the manifest. A resume read the checkpointed part
/// already (`prefix`): only the rest is read.
fn count_input_lines(
    state: &Arc<AppState>,
    infile: std::path::PathBuf,
    prefix: crate::input::InputPrefix,
) {
    let state = Arc::downgrade(state);
    let spawned = std::thread::Builder::new()
        .name("count-input".into())
        .spawn(
            move || match crate::input::count_lines_and_crc32_after(&infile, &prefix) {
                Ok((lines, crc32)) => {
                    if let Some(state) = state.upgrade() {
                        let _ = state.input_lines.set(lines);
                        state.manifest().input_read(lines, crc32);
                        tracing::info!(
                            lines,
                            crc32 = format!("{crc32:08x}"),
                            "input lines counted"
                        );
                    }
                }
                Err(e) => tracing::warn!("could not count the input's lines: {e}"),
            },
        );
    if let Err(e) = spawned {
        tracing::warn!("could not start counting the input's lines: {e}");
    }
}

/// [`serve`] over an already opened state.
pub async fn serve_state(
    listener: TcpListener,
    state: Arc<AppState>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<StopReason, ServerError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    state.log_serving(&addr);
    let stop = Stop::default();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(ticker(state.clone()));
    tasks.spawn(checkpointer(state.clone(), options.checkpoint_interval));
    tasks.spawn(watch_completion(
        state.clone(),
        options.exit_grace,
        stop.clone(),
    ));
    tasks.spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.request(StopReason::Shutdown);
        }
    });
    let router = app(state.clone());
    let (stopping_tx, stopping) = watch::channel(false);
    tasks.spawn({
        let (stop, mut failure) = (stop.clone(), state.failure.subscribe());
        async move {
            tokio::select! {
                () = stop.requested() => {}
                _ = failure.wait_for(|f| f.is_some()) => {}
            }
            stopping_tx.send_replace(true);
        }
    });
    let limits = ConnectionLimits {
        idle_timeout: options.idle_timeout,
        max_connections: options
            .max_connections
            .unwrap_or_else(default_max_connections),
        shutdown_timeout: options.shutdown_timeout,
    };
    tracing::debug!(?limits, "connection limits");
    serve_connections(listener, router, limits, stopping).await;
    tasks.shutdown().await;
    state.save_tokens();

    let lines_done = || {
        state
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines_written()
    };
    if let Some(message) = state.failure.borrow().clone() {
        let lines = lines_done();
        state.manifest().stop(&format!("failed: {message}"), lines);
        return Err(ServerError::Io(message));
    }
    if state.checkpoint().await.is_err() {
        let message = state.failure.borrow().clone().unwrap_or_default();
        let lines = lines_done();
        state.manifest().stop(&format!("failed: {message}"), lines);
        return Err(ServerError::Io(message));
    }
    let reason = stop.reason().unwrap_or(StopReason::Shutdown);
    if reason == StopReason::Complete {
        // What only a running job needs goes; a redo's output takes the
        // old one's place.
        let finished = state
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish();
        if let Err(e) = finished {
            let message = e.to_string();
            state
                .manifest()
                .stop(&format!("failed: {message}"), lines_done());
            return Err(ServerError::Io(message));
        }
    }
    let lines = lines_done();
    state.manifest().stop(
        match reason {
            StopReason::Complete => "complete",
            StopReason::Shutdown => "shutdown",
        },
        lines,
    );
    tracing::info!(?reason, "stopped; checkpoint written");
    Ok(reason)
}

/// Why the server is to stop, once something asked; the first reason wins.
#[derive(Debug, Clone)]
struct Stop(Arc<watch::Sender<Option<StopReason>>>);

impl Default for Stop {
    fn default() -> Self {
        Stop(Arc::new(watch::channel(None).0))
    }
}

impl Stop {
    /// Asks the server to stop, unless something asked first.
    fn request(&self, reason: StopReason) {
        self.0
            .send_if_modified(|r| r.is_none() && r.replace(reason).is_none());
    }

    /// Resolves once a stop was asked for.
    async fn requested(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = rx.wait_for(Option::is_some).await;
    }

    fn reason(&self) -> Option<StopReason> {
        self.0.borrow().clone()
    }
}

/// Once every line has its output line: checkpoints, keeps answering
/// `all_work_complete` for `grace` (so that polling workers learn it), then
/// asks the server to stop.
async fn watch_completion(state: Arc<AppState>, grace: Duration, stop: Stop) {
    let mut complete = state.complete.subscribe();
    if complete.wait_for(|c| *c).await.is_err() {
        return;
    }
    if let Err(e) = state.checkpoint().await {
        tracing::debug!(?e, "final checkpoint failed");
    }
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "all work complete; exiting after the grace period"
    );
    tokio::time::sleep(grace).await;
    stop.request(StopReason::Complete);
}

/// Expires items once a second, so tombstones and completion do not wait for a
/// work request; samples the job's progress every
/// [`HISTORY_EVERY_SECS`](crate::protocol::HISTORY_EVERY_SECS).
async fn ticker(state: Arc<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for second in 0_u64.. {
        interval.tick().await;
        let Ok(lines_done) = state.with_ledger(|l| {
            l.tick(Instant::now())?;
            Ok(l.lines_written())
        }) else {
            return;
        };
        if second % crate::protocol::HISTORY_EVERY_SECS == 0 {
            state.sample_progress(lines_done);
        }
    }
}

/// Checkpoints every `every`, and at once when the ledger recovered output
/// lines past the last checkpoint (after a crash), so that another crash does
/// not count them again.
async fn checkpointer(state: Arc<AppState>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let recovered = state
        .with_ledger(|l| Ok(l.recovered_past_checkpoint()))
        .unwrap_or(0);
    if recovered == 0 {
        interval.tick().await;
    }
    loop {
        interval.tick().await;
        if state.checkpoint().await.is_err() {
            return;
        }
        state.save_tokens();
    }
}

/// Binds `host:port`, naming the address when it fails.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, ServerError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })
}

/// The address a listener is bound to, for logs and tests.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
