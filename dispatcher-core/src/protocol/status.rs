//! `GET /status` and what it is made of; `POST /hello`; the error answer.

use serde::{Deserialize, Serialize};

use super::*;

/// Reissues by what caused them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReissueCounts {
    /// Items whose lease (work timeout) expired.
    pub timeout: u64,
    /// Items that a worker released unprocessed (preemption, shutdown).
    pub release: u64,
    /// Items a task handed back for another attempt (`"reason": "retry"`).
    #[serde(default)]
    pub retry: u64,
}

/// The line every later line waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockingLine {
    /// Its work id (the next line to write).
    pub work_id: u64,
    /// Seconds since it was first issued.
    pub age_secs: f64,
    /// `"in_flight"` or `"queued"`.
    pub state: String,
    /// Results of later lines waiting for it.
    pub waiting_lines: u64,
}

/// The oldest item in flight, for spotting a stuck line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OldestInFlight {
    /// Its work id.
    pub work_id: u64,
    /// Seconds since it was last issued.
    pub age_secs: f64,
    /// How many times it was reissued.
    pub retry_count: u32,
}

/// The answer to `GET /status`: the fields of the wire protocol (the book's reference) first, then extensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The last work id written to the output, `-1` before the first.
    pub last_processed_work_id: i64,
    /// The work id the next new input line will get.
    pub next_work_id: u64,
    /// Items in flight (issued, no result yet).
    pub issued: u64,
    /// Results waiting in the reorder buffer for an earlier line.
    pub pending: u64,
    /// Entries in the timeout heap (may include stale ones).
    pub heap_size: u64,
    /// Items reissued because their work timeout expired.
    pub expired_reissues: u64,
    /// Output lines written.
    pub lines_done: u64,
    /// Input lines in all: counted at start, in the background (`None` until
    /// that count is done, and where it failed).
    pub lines_total: Option<u64>,
    /// Input bytes read so far.
    pub input_bytes_consumed: u64,
    /// Size of the input file.
    pub input_bytes_total: u64,
    /// Items in flight (same as `issued`).
    pub in_flight: u64,
    /// Items queued for reissue.
    pub queued_for_reissue: u64,
    /// Results waiting in the reorder buffer (same as `pending`).
    pub reorder_buffer: u64,
    /// Bytes of results waiting in the reorder buffer.
    pub reorder_buffer_bytes: u64,
    /// Reissues by cause.
    pub reissues: ReissueCounts,
    /// Items given up after `--max-retries` reissues.
    pub tombstones: u64,
    /// Input lines that were not valid UTF-8 (each has an error record).
    pub invalid_lines: u64,
    /// Results ignored (duplicates, unknown ids).
    pub ignored_results: u64,
    /// Extension: lines of the previous output kept as they were, by this run
    /// of a `--redo-errors` job.
    #[serde(default)]
    pub kept_lines: u64,
    /// Extension: failed lines this run of the server wrote (results,
    /// tombstones, invalid input lines), by kind, as `dispatcher report`
    /// names them.
    /// At most the first 100 kinds of the run are listed (a kind may come
    /// from the input); `failed_unlisted` counts the lines of the others.
    #[serde(default)]
    pub failed_by_kind: std::collections::BTreeMap<String, u64>,
    /// Extension: failed lines of kinds past those listed in `failed_by_kind`.
    #[serde(default)]
    pub failed_unlisted: u64,
    /// Extension: journal entries held for unfinished lines.
    #[serde(default)]
    pub journal_entries: u64,
    /// Extension: bytes of those entries.
    #[serde(default)]
    pub journal_bytes: u64,
    /// Extension: entries not recorded because the journal was full
    /// (`--max-journal-mib`).
    #[serde(default)]
    pub journal_dropped: u64,
    /// Extension: requests workers answered from a journal, by this run.
    #[serde(default)]
    pub journal_replayed: u64,
    /// Extension: engine tokens those replayed requests had cost.
    #[serde(default)]
    pub journal_tokens_saved: u64,
    /// Items issued by this run of the server, reissues included.
    #[serde(default)]
    pub issued_total: u64,
    /// Results accepted by this run of the server.
    #[serde(default)]
    pub completed_total: u64,
    /// The oldest item in flight, if any.
    pub oldest_in_flight: Option<OldestInFlight>,
    /// The unfinished line that later finished lines wait for, if any.
    #[serde(default)]
    pub blocking: Option<BlockingLine>,
    /// Results of the reorder buffer spilled to disk (past `--max-pending-mib`).
    #[serde(default)]
    pub reorder_buffer_spilled: u64,
    /// Backup copies of straggling items handed out.
    #[serde(default)]
    pub backups_issued: u64,
    /// The current work timeout in seconds.
    pub work_timeout_secs: f64,
    /// `--max-retries` (`-1` = never tombstone).
    pub max_retries: i64,
    /// Whether every input line has its output line.
    pub complete: bool,
    /// Seconds since the server started.
    pub uptime_secs: f64,
    /// Extension: the workers seen by this run of the server, those that said
    /// hello (`POST /hello`) with who they are, most recently heard from
    /// first: every one not gone, and the 100 gone ones heard from last.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// Extension: gone workers left out of `workers` (a long job on
    /// preemptible nodes meets a new worker at every restart).
    #[serde(default)]
    pub workers_unlisted: u64,
    /// Extension: prefix affinity (`--group-by`), absent without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupStatus>,
    /// Extension: the engines' prefix cache counters, summed over the
    /// workers that report them (absent when none does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<PrefixCache>,
    /// Extension: engine tokens the workers reported, over every run of the
    /// job (earlier runs' from the manifest).
    #[serde(default)]
    pub tokens: TokenCounts,
    /// Extension: lines and tokens per second over the last minute.
    #[serde(default)]
    pub rates: Rates,
    /// Extension: seconds until every line is done at the last minute's
    /// rate, once the total is known and lines are being done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
    /// Extension: the first failed line of each kind this run wrote: its
    /// work id and its first bytes.
    #[serde(default)]
    pub failure_examples: std::collections::BTreeMap<String, FailureExample>,
    /// Extension: with `?history=1`, the job's progress sampled every
    /// [`HISTORY_EVERY_SECS`] over the last hours of this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistorySample>>,
    /// Extension: a sharded input's shards (a dataset of several files), in
    /// the job's order, with the lines of each written; absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardProgress>,
    /// Extension: the prices given (`--price-per-mtok-in/out`) and what the
    /// tokens so far cost at them; absent without prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// One shard of a sharded input in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardProgress {
    /// Its path.
    pub path: String,
    /// Its input lines.
    pub lines: u64,
    /// Of those, lines written to the output.
    pub done: u64,
}

/// Prices per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Prices {
    /// Per million prompt tokens.
    pub per_mtok_in: f64,
    /// Per million generated tokens.
    pub per_mtok_out: f64,
}

impl Prices {
    /// What `tokens` cost.
    pub fn of(&self, tokens: &TokenCounts) -> f64 {
        (tokens.prompt_tokens as f64 * self.per_mtok_in
            + tokens.completion_tokens as f64 * self.per_mtok_out)
            / 1e6
    }
}

/// `/status`'s `cost`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// The prices.
    pub prices: Prices,
    /// What the tokens so far cost.
    pub so_far: f64,
    /// What the whole job will cost if the lines left cost what the lines
    /// done did (absent until lines are done and the total is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected: Option<f64>,
}

/// How often the server samples its progress for `/status?history=1`.
pub const HISTORY_EVERY_SECS: u64 = 5;

/// Lines and tokens per second (over the last minute, in `/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Output lines written per second.
    pub lines_per_sec: f64,
    /// Prompt tokens per second.
    pub prompt_tokens_per_sec: f64,
    /// Generated tokens per second.
    pub completion_tokens_per_sec: f64,
}

/// One point of `/status`'s `history`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistorySample {
    /// Seconds since the server started.
    pub secs: f64,
    /// Output lines written (resumed lines included).
    pub lines_done: u64,
    /// Engine tokens reported so far (all runs).
    pub tokens: TokenCounts,
}

/// An example of a failure kind (`/status`'s `failure_examples`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureExample {
    /// The line's work id.
    pub work_id: u64,
    /// The output line's first bytes (at most [`FailureExample::MAX_BYTES`]).
    pub line: String,
}

impl FailureExample {
    /// How much of a failed line an example keeps.
    pub const MAX_BYTES: usize = 400;

    /// An example of line `work_id`, cut to [`Self::MAX_BYTES`] at a
    /// character boundary.
    pub fn of(work_id: u64, line: &str) -> FailureExample {
        FailureExample {
            work_id,
            line: crate::text::head(line, Self::MAX_BYTES).to_string(),
        }
    }
}

/// `/status`'s `groups`: lines read ahead by group key and where they went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Lines read ahead (`--lookahead`) and not issued yet: unissued lines
    /// besides those past `next_work_id`.
    pub waiting: u64,
    /// Group keys the server keeps (with waiting lines, or seen lately).
    pub keys: u64,
    /// Lines with a key issued by this run (first issues).
    pub issued: u64,
    /// Of those, lines issued to a worker that had their key already.
    pub to_owner: u64,
    /// Of those, lines of a key other workers had, shared out to an idle
    /// worker (a large group spread over several workers).
    pub spread: u64,
    /// Lines read ahead for which the group filter gave no key (it failed,
    /// gave nothing, or the line is not JSON): handed out in input order.
    #[serde(default)]
    pub keyless: u64,
}

/// `POST /hello` (an extension): a worker says who it is when it starts, so
/// that `/status` can list it and the manifest can say how lines were made.
/// Workers that do not (those written for the Python server) still work.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The `worker` its work requests name.
    pub worker: String,
    /// The host it runs on.
    #[serde(default)]
    pub host: String,
    /// The task it runs (`infer`, `run-batch`, a `#[task]`'s name).
    #[serde(default)]
    pub task: String,
    /// The version of its binary.
    #[serde(default)]
    pub version: String,
    /// The engine (`vllm`, `llamacpp`, ..., or the URL of one given by URL).
    #[serde(default)]
    pub engine: String,
    /// The model the engine serves.
    #[serde(default)]
    pub model: Option<String>,
    /// What else decides its output: `infer`'s sampling settings, named
    /// engines. The manifest keeps them (`worker_configurations`); `/status`
    /// leaves them out of its rows.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// The batch job it runs in: the id `dispatcher launch` gave it
    /// (`DISPATCHER_LAUNCH_JOB`), else Slurm's `SLURM_JOB_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// One worker in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The `worker` its requests name.
    pub worker: String,
    /// What it said in its hello, but its settings (those are in the
    /// manifest); `None` for a worker that said none.
    pub hello: Option<Hello>,
    /// Seconds since its last request.
    pub last_contact_secs: f64,
    /// Results of it accepted by this run of the server.
    pub lines_done: u64,
    /// Items in flight with it.
    pub in_flight: u64,
    /// Its engine's prefix cache counters, when it reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<PrefixCache>,
    /// Engine tokens it reported to this run of the server.
    #[serde(default)]
    pub tokens: TokenCounts,
    /// Its prompt and generated tokens per second over its last 30 to 60 s
    /// of reports (over less in its first 30 s; absent before a second
    /// report; 0 once it has reported none for a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// `active` (holds lines), `idle` (holds none), `silent` (not heard
    /// from for a minute, or for a work timeout shorter than that) or `gone`
    /// (not heard from for a work timeout and at least a minute: its lines
    /// were or will be reissued).
    #[serde(default)]
    pub state: String,
}

/// The body of every 4xx/5xx answer of this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// `"error"`.
    pub status: String,
    /// What was wrong and what to do, in words.
    pub error: String,
    /// The work ids the error is about, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub work_ids: Vec<u64>,
    /// With a partly refused `POST /results`: how many results were accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}
