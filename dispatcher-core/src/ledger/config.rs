//! [`LedgerConfig`]: what the ledger needs to know about the job, and the
//! defaults of its bounds.

use std::path::PathBuf;
use std::time::Duration;

use crate::job::JobFiles;

use super::*;

/// What the ledger needs to know about the job.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Input JSONL.
    pub infile: PathBuf,
    /// The job's files: the output JSONL, its checkpoint, and the files named
    /// after the output (journal, spill file, manifest).
    pub files: JobFiles,
    /// How long an issued item may stay without a result before it is reissued.
    pub work_timeout: Duration,
    /// Reissues before an item is tombstoned; `None` never tombstones.
    pub max_retries: Option<u32>,
    /// `retry_in` told to workers when nothing is issuable (an upper bound: the
    /// ledger answers sooner when an in-flight item expires sooner).
    pub retry_secs: u64,
    /// Releases (preemptions) before an item is tombstoned; `None` never. A
    /// budget separate from `max_retries`, so heavy preemption does not
    /// tombstone good items.
    pub max_releases: Option<u32>,
    /// Bytes of finished results kept in memory while they wait for an earlier
    /// line; past it they are spilled to `<outfile>.pending`.
    pub max_pending_bytes: u64,
    /// Backup copies of straggling items handed out at most at once (0: none).
    /// Only idle workers get them: a work request that finds no new line and
    /// no reissue, from a worker that does not hold the item itself.
    pub max_backups: u32,
    /// How long an item must have been in flight before it gets a backup.
    pub backup_after: Duration,
    /// `--redo-errors`: the previous output, whose lines are kept unless they
    /// are error records to redo. `outfile` is then the new output.
    pub redo: Option<RedoConfig>,
    /// Keep a journal of the engine responses of unfinished lines
    /// (`<outfile>.journal`), handed back with a line issued again.
    pub journal: bool,
    /// Bytes of journal entries held at most (`--max-journal-mib`).
    pub max_journal_bytes: u64,
    /// The dataset shards `infile` was staged from
    /// ([`crate::dataset::prepare`]): watched with the input, so that a shard
    /// changed while the job runs stops it, naming the shard.
    pub sources: Option<std::sync::Arc<crate::dataset::Sources>>,
    /// Prefix affinity (`--group-by`): lines are read ahead and handed to
    /// the worker that had their group key; `None` hands lines out in input
    /// order to whoever asks.
    pub grouping: Option<Grouping>,
}

impl LedgerConfig {
    /// A configuration with the defaults of `dispatcher serve` for everything
    /// but the input and the job's files.
    pub fn new(infile: PathBuf, files: JobFiles) -> LedgerConfig {
        LedgerConfig {
            infile,
            files,
            work_timeout: DEFAULT_WORK_TIMEOUT,
            max_retries: Some(DEFAULT_MAX_RETRIES),
            retry_secs: DEFAULT_RETRY_SECS,
            max_releases: Some(DEFAULT_MAX_RELEASES),
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            max_backups: 0,
            backup_after: DEFAULT_BACKUP_AFTER,
            redo: None,
            journal: true,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
            sources: None,
            grouping: None,
        }
    }
}

/// Default `--work-timeout`, as the Python server's.
pub const DEFAULT_WORK_TIMEOUT: Duration = Duration::from_secs(1200);
/// Default `--max-retries`, as the Python server's.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Default `--retry`, as the Python server's.
pub const DEFAULT_RETRY_SECS: u64 = 300;
/// Default `--backup-after`.
pub const DEFAULT_BACKUP_AFTER: Duration = Duration::from_secs(60);
/// Default `--max-releases`: preemptions are not the item's fault; only an item
/// released this often (a poison item that kills workers) is given up.
pub const DEFAULT_MAX_RELEASES: u32 = 50;
/// Default `--max-journal-mib`: 1 GiB of engine responses of unfinished lines.
pub const DEFAULT_MAX_JOURNAL_BYTES: u64 = 1 << 30;
/// Default `--max-pending-mib`: 256 MiB of results waiting for a stuck line.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 256 << 20;
