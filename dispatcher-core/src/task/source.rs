//! Where a worker's items come from and its results go: a dispatcher server, or
//! a local file pair for developing tasks without one.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::{ClientError, DispatcherClient};
use crate::engine::BoxFuture;
use crate::job::checkpoint::ResumeError;
use crate::ledger::{Ask, Cause, Ledger, LedgerConfig, WorkReply};
use crate::protocol::{ReleaseReason, WorkItem, WorkResponse};

/// Why a source call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The dispatcher server call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The local files failed (the message names the path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The local files could not be opened or resumed.
    #[error(transparent)]
    Resume(#[from] ResumeError),
}

impl SourceError {
    /// Whether trying again later may help: the server is unreachable (still
    /// starting, restarting, or gone for good: the caller decides by how long).
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Client(e) if e.is_unavailable())
    }

    /// Whether the job cannot go on: the local files failed (an input line
    /// changed, a shard deleted, a full disk) or cannot be resumed. A server
    /// stops on such failures by itself; a local run stops on them too,
    /// rather than ask again forever.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Io(_) | SourceError::Resume(_))
    }

    /// Whether the server refused the request as too large (413): the same
    /// content sent in smaller requests may pass.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            SourceError::Client(ClientError::Status { status, .. })
                if *status == reqwest::StatusCode::PAYLOAD_TOO_LARGE
        )
    }
}

/// The work protocol from a worker's side.
pub trait WorkSource: Send + Sync + std::fmt::Debug {
    /// Asks for up to `batch` items.
    fn get_work(&self, batch: usize) -> BoxFuture<'_, Result<WorkResponse, SourceError>>;
    /// Hands in results.
    fn submit(&self, items: Vec<WorkItem>) -> BoxFuture<'_, Result<(), SourceError>>;
    /// Hands items back: unprocessed (`Preempted`) or for another attempt (`Retry`).
    fn release(
        &self,
        ids: Vec<u64>,
        reason: ReleaseReason,
    ) -> BoxFuture<'_, Result<(), SourceError>>;
    /// Extends the leases of `ids` (and, where the answer says so, of every
    /// item this worker holds); answers the ids already done elsewhere.
    /// `None` where the source has no leases.
    fn heartbeat(&self, ids: Vec<u64>) -> BoxFuture<'_, Result<Option<Heartbeat>, SourceError>> {
        let _ = ids;
        Box::pin(std::future::ready(Ok(None)))
    }
    /// The job's progress as the source sees it (the server's `/status`), when
    /// available: for progress bars and ETAs.
    fn progress(&self) -> BoxFuture<'_, Option<JobProgress>> {
        Box::pin(std::future::ready(None))
    }
    /// Hands in journal entries of lines this worker works on, and what its
    /// journals saved since the last call. Sources without a journal ignore them.
    fn journal(
        &self,
        entries: Vec<crate::protocol::JournalRecord>,
        replayed: u64,
        tokens_saved: u64,
    ) -> BoxFuture<'_, Result<(), SourceError>> {
        let _ = (entries, replayed, tokens_saved);
        Box::pin(std::future::ready(Ok(())))
    }
    /// Says who this worker is (`POST /hello` to a server); nothing elsewhere.
    fn hello(&self, hello: crate::protocol::Hello) -> BoxFuture<'_, Result<(), SourceError>> {
        let _ = hello;
        Box::pin(std::future::ready(Ok(())))
    }
    /// Called once when the worker stops (the file source checkpoints).
    fn finish(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// Items already done elsewhere: drop them.
    pub done: Vec<u64>,
    /// The source renews every item this worker holds at each heartbeat, so
    /// the next ones need not list them.
    pub renews_held: bool,
}

/// How far the whole job is, for a worker's progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobProgress {
    /// Output lines written.
    pub lines_done: u64,
    /// Input bytes read so far.
    pub input_bytes_consumed: u64,
    /// Size of the input file.
    pub input_bytes_total: u64,
}

/// A dispatcher server.
#[derive(Debug, Clone)]
pub struct ServerSource {
    client: DispatcherClient,
}

impl ServerSource {
    /// Items from the server at `addr` (`HOST:PORT`).
    pub fn new(client: DispatcherClient) -> ServerSource {
        ServerSource { client }
    }
}

impl WorkSource for ServerSource {
    fn get_work(&self, batch: usize) -> BoxFuture<'_, Result<WorkResponse, SourceError>> {
        Box::pin(async move { Ok(self.client.get_work(batch).await?) })
    }

    fn hello(&self, hello: crate::protocol::Hello) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            self.client.hello(hello).await?;
            Ok(())
        })
    }

    fn journal(
        &self,
        entries: Vec<crate::protocol::JournalRecord>,
        replayed: u64,
        tokens_saved: u64,
    ) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            self.client.journal(entries, replayed, tokens_saved).await?;
            Ok(())
        })
    }

    fn submit(&self, items: Vec<WorkItem>) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            self.client.submit(items).await?;
            Ok(())
        })
    }

    fn release(
        &self,
        ids: Vec<u64>,
        reason: ReleaseReason,
    ) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            self.client.release_for(ids, Some(reason)).await?;
            Ok(())
        })
    }

    fn heartbeat(&self, ids: Vec<u64>) -> BoxFuture<'_, Result<Option<Heartbeat>, SourceError>> {
        Box::pin(async move {
            let answer = self.client.heartbeat(ids).await?;
            Ok(Some(Heartbeat {
                done: answer.done,
                renews_held: answer.renews_held,
            }))
        })
    }

    fn progress(&self) -> BoxFuture<'_, Option<JobProgress>> {
        Box::pin(async move {
            let s = self.client.status().await.ok()?;
            Some(JobProgress {
                lines_done: s.lines_done,
                input_bytes_consumed: s.input_bytes_consumed,
                input_bytes_total: s.input_bytes_total,
            })
        })
    }
}

/// A local input/output pair, run through the same ledger as the server: output
/// in input order, checkpointed, resumable.
#[derive(Debug)]
pub struct FileSource {
    ledger: Mutex<Ledger>,
    /// Woken when a result or release may have made work issuable, so that a
    /// work request waits for that instead of sleeping `retry_in`.
    changed: Notify,
    /// When results next take a checkpoint: what is durable is what a
    /// follower of the job (`--outdir`'s shards) may use.
    next_checkpoint: Mutex<Instant>,
}

/// How often a local job checkpoints while results come in.
const LOCAL_CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// Items are never lost inside one process: no reissue by timeout.
const LOCAL_WORK_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl FileSource {
    /// Opens (or resumes) `input` → `output`, with the checkpoint and the
    /// journal beside the output.
    pub fn open(
        input: &std::path::Path,
        output: &std::path::Path,
        max_retries: Option<u32>,
    ) -> Result<FileSource, SourceError> {
        FileSource::open_with_journal(input, output, max_retries, true)
    }

    /// [`open`](Self::open), with the journal (`<output>.journal`) or without.
    pub fn open_with_journal(
        input: &std::path::Path,
        output: &std::path::Path,
        max_retries: Option<u32>,
        journal: bool,
    ) -> Result<FileSource, SourceError> {
        let input = crate::dataset::Prepared {
            path: input.to_owned(),
            sources: None,
        };
        FileSource::open_prepared(&input, output, max_retries, journal, None)
    }

    /// [`open_with_journal`](Self::open_with_journal) of an input that
    /// [`crate::dataset::prepare`] made ready: the staged copy of a dataset
    /// is read, and its shards watched; with `grouping`, lines are handed
    /// out by group key (`--group-by`).
    pub fn open_prepared(
        input: &crate::dataset::Prepared,
        output: &std::path::Path,
        max_retries: Option<u32>,
        journal: bool,
        grouping: Option<crate::ledger::Grouping>,
    ) -> Result<FileSource, SourceError> {
        let config = LedgerConfig {
            work_timeout: LOCAL_WORK_TIMEOUT,
            max_retries,
            retry_secs: 1,
            journal,
            sources: input.sources.clone(),
            grouping,
            ..LedgerConfig::new(input.path.clone(), crate::job::JobFiles::new(output, None))
        };
        let ledger = Ledger::open(config, Instant::now())?;
        Ok(FileSource {
            ledger: Mutex::new(ledger),
            changed: Notify::new(),
            next_checkpoint: Mutex::new(Instant::now() + LOCAL_CHECKPOINT_EVERY),
        })
    }

    /// Output lines written, when every input line has its output line.
    pub fn complete_lines(&self) -> Option<u64> {
        let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.is_complete().then(|| ledger.lines_written())
    }

    /// Runs `f` on the ledger under its lock.
    fn with_ledger<T>(
        &self,
        f: impl FnOnce(&mut Ledger) -> std::io::Result<T>,
    ) -> Result<T, SourceError> {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&mut ledger)?)
    }
}

impl WorkSource for FileSource {
    fn get_work(&self, batch: usize) -> BoxFuture<'_, Result<WorkResponse, SourceError>> {
        Box::pin(async move {
            loop {
                // Registered before looking, so a change in between is not missed.
                let changed = self.changed.notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                let (reply, max_retries) = self.with_ledger(|l| {
                    Ok((
                        l.take_work(Ask::batch(batch), Instant::now())?,
                        l.config().max_retries,
                    ))
                })?;
                // Only this process holds items: nothing is issuable until one
                // of its own results or releases comes in.
                if !matches!(reply, WorkReply::Retry { .. }) {
                    return Ok(crate::server::work_response(reply, max_retries, None));
                }
                changed.await;
            }
        })
    }

    fn submit(&self, items: Vec<WorkItem>) -> BoxFuture<'_, Result<(), SourceError>> {
        let (valid, refused) =
            crate::protocol::check_results(items.into_iter().map(|r| (r.work_id, r.result)));
        let r = self
            .with_ledger(|l| {
                l.complete(valid)?;
                let mut next = self
                    .next_checkpoint
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if Instant::now() >= *next {
                    *next = Instant::now() + LOCAL_CHECKPOINT_EVERY;
                    l.checkpoint()?;
                }
                Ok(())
            })
            .and_then(|_| match refused.first() {
                // Our own worker serializes results: a refusal is a bug, not input.
                Some(refused) => Err(SourceError::Io(std::io::Error::other(format!(
                    "work_id {}: {}",
                    refused.work_id, refused.reason
                )))),
                None => Ok(()),
            });
        self.changed.notify_waiters();
        Box::pin(std::future::ready(r))
    }

    fn release(
        &self,
        ids: Vec<u64>,
        reason: ReleaseReason,
    ) -> BoxFuture<'_, Result<(), SourceError>> {
        let cause = Cause::of_release(Some(reason));
        let r = self
            .with_ledger(|l| l.release(&ids, cause, None))
            .map(|_| ());
        self.changed.notify_waiters();
        Box::pin(std::future::ready(r))
    }

    fn journal(
        &self,
        entries: Vec<crate::protocol::JournalRecord>,
        _replayed: u64,
        _tokens_saved: u64,
    ) -> BoxFuture<'_, Result<(), SourceError>> {
        let r = self.with_ledger(|l| l.record_journal(entries)).map(|_| ());
        Box::pin(std::future::ready(r))
    }

    fn finish(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(std::future::ready(self.with_ledger(|l| {
            l.checkpoint()?;
            l.finish()
        })))
    }

    fn progress(&self) -> BoxFuture<'_, Option<JobProgress>> {
        let progress = self
            .with_ledger(|l| {
                let s = l.stats(Instant::now());
                Ok(JobProgress {
                    lines_done: s.lines_written,
                    input_bytes_consumed: s.input_bytes_consumed,
                    input_bytes_total: s.input_bytes_total,
                })
            })
            .ok();
        Box::pin(std::future::ready(progress))
    }
}
