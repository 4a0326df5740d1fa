//! The wire protocol of the dispatcher server (see `shared/PROTOCOL.md`).
//!
//! Every type here serializes to exactly the JSON the Python `dispatcher-server`
//! speaks, so workers written for it work unchanged. Fields this project adds are
//! optional on input and additive on output.

use serde::{Deserialize, Serialize};

/// A work item: one input line handed to a worker, and later its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// The 0-based index of the input line; it also names the output line.
    pub work_id: u64,
    /// The input line without its trailing newline.
    pub content: String,
    /// The result: a string that holds one JSON value. `null` when issued.
    #[serde(default)]
    pub result: Option<String>,
    /// How many times this item was reissued before this issue.
    #[serde(default)]
    pub retry_count: u32,
    /// The server's `--max-retries`; `None` when reissues are unlimited,
    /// which is `-1` on the wire as the Python server writes it (`null` is
    /// read as unlimited too).
    #[serde(default, with = "max_retries_wire")]
    pub max_retries: Option<u32>,
    /// Extension: the engine requests an earlier issue of this line completed,
    /// for the task to replay instead of sending them again. Absent when there
    /// are none; workers that do not know it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<Vec<JournalEntry>>,
}

impl WorkItem {
    /// The work item of line `work_id` handed out on its `retry_count`-th
    /// reissue, with the server's `max_retries` and the journal of its
    /// earlier issues.
    pub fn issued(
        work_id: u64,
        content: String,
        retry_count: u32,
        max_retries: Option<u32>,
        journal: Option<Vec<JournalEntry>>,
    ) -> WorkItem {
        WorkItem {
            work_id,
            content,
            result: None,
            retry_count,
            max_retries,
            journal,
        }
    }
}

/// One engine request a task completed: its place in the task's sequence of
/// requests, a fingerprint of the request, and the response the task got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Its position among the task's requests, from 0.
    pub seq: u32,
    /// A hash of the request's canonical JSON, 16 hex digits.
    pub fingerprint: String,
    /// The response, as the task saw it.
    pub response: serde_json::Value,
}

/// A [`JournalEntry`] of one line, as a worker sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The line it belongs to.
    pub work_id: u64,
    /// The entry.
    #[serde(flatten)]
    pub entry: JournalEntry,
}

/// `POST /journal` (extension): entries of lines a worker is working on, and
/// what its journals saved since the last call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRequest {
    /// The `worker` of its work requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// New entries.
    #[serde(default)]
    pub entries: Vec<JournalRecord>,
    /// Requests answered from a journal instead of the engine, since the last call.
    #[serde(default)]
    pub replayed: u64,
    /// Engine tokens (prompt and completion) those replayed responses had cost.
    #[serde(default)]
    pub tokens_saved: u64,
}

/// The answer to `POST /journal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalResponse {
    /// `"OK"`.
    pub status: String,
    /// Entries recorded (the rest were of lines already written, repeats, or
    /// over `--max-journal-mib`).
    pub recorded: u64,
}

/// `max_retries` on the wire: a count, or `-1` for unlimited.
mod max_retries_wire {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u32(*n),
            None => s.serialize_i64(-1),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.and_then(|n| u32::try_from(n).ok()))
    }
}

/// The `status` field of a `GET /work` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkStatus {
    /// `items` holds 1..N items to process.
    #[serde(rename = "OK")]
    Ok,
    /// The input is exhausted but items are still in flight: ask again in `retry_in` s.
    #[serde(rename = "retry")]
    Retry,
    /// Every line has its output line: the worker should exit.
    #[serde(rename = "all_work_complete")]
    AllWorkComplete,
}

impl WorkStatus {
    /// The status string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkStatus::Ok => "OK",
            WorkStatus::Retry => "retry",
            WorkStatus::AllWorkComplete => "all_work_complete",
        }
    }
}

/// The answer to `GET /work?batch_size=N`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkResponse {
    /// What the worker should do next.
    pub status: WorkStatus,
    /// Seconds to wait before asking again (with [`WorkStatus::Retry`]).
    pub retry_in: Option<u64>,
    /// The items handed out (with [`WorkStatus::Ok`]).
    #[serde(default)]
    pub items: Vec<WorkItem>,
    /// Extension: the lease length in seconds. Workers that send
    /// `POST /heartbeat` for their items well within it keep them; silent ones
    /// lose them when it runs out. Absent from the Python server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<f64>,
    /// Extension, with [`WorkStatus::Retry`]: no unissued line remains (every
    /// line is done or in flight with a worker, none is queued for reissue),
    /// so this worker will get nothing more unless one comes back. Workers
    /// run with `--exit-when-drained` (as `dispatcher launch` starts them)
    /// exit once they hold nothing; others ignore it. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

impl WorkResponse {
    /// `OK` with `items`.
    pub fn ok(items: Vec<WorkItem>, lease_secs: Option<f64>) -> WorkResponse {
        WorkResponse {
            status: WorkStatus::Ok,
            retry_in: None,
            items,
            lease_secs,
            drained: false,
        }
    }

    /// `retry` in `secs` seconds.
    pub fn retry(secs: u64, lease_secs: Option<f64>) -> WorkResponse {
        WorkResponse {
            status: WorkStatus::Retry,
            retry_in: Some(secs),
            items: Vec::new(),
            lease_secs,
            drained: false,
        }
    }

    /// This answer, saying whether no unissued line remains.
    pub fn with_drained(self, drained: bool) -> WorkResponse {
        WorkResponse { drained, ..self }
    }

    /// `all_work_complete`.
    pub fn complete(lease_secs: Option<f64>) -> WorkResponse {
        WorkResponse {
            status: WorkStatus::AllWorkComplete,
            retry_in: None,
            items: Vec::new(),
            lease_secs,
            drained: false,
        }
    }
}

/// The body of `POST /results`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsRequest {
    /// Items with `result` set.
    pub items: Vec<WorkItem>,
    /// Extension: who sends them (the `worker` of its work requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Extension: engine tokens the worker used since its last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenCounts>,
}

/// What the server reads of a `POST /results` body: `{"items": [...]}` where
/// each item needs only `work_id` and `result`. Every other field is skipped
/// without being copied, so a worker may send each issued item back whole (as
/// the Python client does, prompt included) or just those two fields. An item
/// whose fields have the wrong types is read too (see [`SubmittedResult`]), so
/// that one bad item does not cost the rest of the batch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubmittedResults {
    /// The results.
    pub items: Vec<SubmittedResult>,
    /// Extension: who sends them (anything but a string is taken as no one).
    #[serde(default, deserialize_with = "lenient_string")]
    pub worker: Option<String>,
    /// Extension: engine tokens the worker used since its last report. A
    /// malformed one is ignored: counts never cost a batch of results.
    #[serde(default, deserialize_with = "lenient_usage")]
    pub usage: Option<TokenCounts>,
}

/// Reads an optional string, taking anything else as none.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// Reads an optional [`TokenCounts`], taking anything else (an array, a
/// negative or fractional count) as none.
fn lenient_usage<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TokenCounts>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        value @ serde_json::Value::Object(_) => serde_json::from_value(value).ok(),
        _ => None,
    })
}

/// Reads an optional [`PrefixCache`], taking anything else (not an object
/// of two counts, or more hits than queries) as none: a heartbeat renews
/// its leases whatever its optional fields hold.
fn lenient_prefix_cache<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<PrefixCache>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        value @ serde_json::Value::Object(_) => serde_json::from_value::<PrefixCache>(value)
            .ok()
            .filter(|c| c.hits <= c.queries),
        _ => None,
    })
}

/// One item of [`SubmittedResults`], as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmittedResult {
    /// The work id it is for; `None` when it is missing or not a work id.
    pub work_id: Option<u64>,
    /// The result.
    pub result: SubmittedValue,
}

/// The `result` of a submitted item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmittedValue {
    /// A string: what the protocol asks for (it must hold one JSON value).
    Text(String),
    /// `null` or missing.
    Null,
    /// Some other JSON type, named (`"an object"`, `"a number"`, ...).
    Other(&'static str),
}

impl<'de> Deserialize<'de> for SubmittedResult {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(lenient::ResultVisitor)
    }
}

/// Readers that take any JSON type where the protocol wants one, so a wrong
/// type becomes a per-item problem instead of a refused body.
mod lenient {
    use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;

    use super::{SubmittedResult, SubmittedValue};

    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum Field {
        WorkId,
        Result,
        #[serde(other)]
        Other,
    }

    pub(super) struct ResultVisitor;

    impl<'de> Visitor<'de> for ResultVisitor {
        type Value = SubmittedResult;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a work item object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SubmittedResult, A::Error> {
            let mut work_id = None;
            let mut result = SubmittedValue::Null;
            while let Some(field) = map.next_key::<Field>()? {
                match field {
                    Field::WorkId => work_id = map.next_value::<AnyId>()?.0,
                    Field::Result => result = map.next_value::<AnyResult>()?.0,
                    Field::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(SubmittedResult { work_id, result })
        }
    }

    /// A work id if the value is one (a non-negative integer), else `None`.
    struct AnyId(Option<u64>);

    impl<'de> Deserialize<'de> for AnyId {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(AnyIdVisitor)
        }
    }

    struct AnyIdVisitor;

    impl<'de> Visitor<'de> for AnyIdVisitor {
        type Value = AnyId;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a work id")
        }
        fn visit_u64<E>(self, v: u64) -> Result<AnyId, E> {
            Ok(AnyId(Some(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<AnyId, E> {
            Ok(AnyId(u64::try_from(v).ok()))
        }
        fn visit_f64<E>(self, _: f64) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_bool<E>(self, _: bool) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_str<E>(self, _: &str) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_unit<E>(self) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyId, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(AnyId(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyId, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(AnyId(None))
        }
    }

    /// A result of any JSON type.
    struct AnyResult(SubmittedValue);

    impl<'de> Deserialize<'de> for AnyResult {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(AnyResultVisitor)
        }
    }

    struct AnyResultVisitor;

    impl<'de> Visitor<'de> for AnyResultVisitor {
        type Value = AnyResult;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a result")
        }
        fn visit_str<E>(self, v: &str) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Text(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Text(v)))
        }
        fn visit_unit<E>(self) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Null))
        }
        fn visit_none<E>(self) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Null))
        }
        fn visit_bool<E>(self, _: bool) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a boolean")))
        }
        fn visit_u64<E>(self, _: u64) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a number")))
        }
        fn visit_i64<E>(self, _: i64) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a number")))
        }
        fn visit_f64<E>(self, _: f64) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a number")))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyResult, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(AnyResult(SubmittedValue::Other("an array")))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyResult, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(AnyResult(SubmittedValue::Other("an object")))
        }
    }
}

/// Reads a list of work ids keeping only the first of each: a body that
/// repeats one id millions of times costs memory for one.
fn distinct_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    struct Ids;
    impl<'de> serde::de::Visitor<'de> for Ids {
        type Value = Vec<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of work ids (non-negative integers)")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut seen = rustc_hash::FxHashSet::default();
            let mut ids = Vec::new();
            while let Some(id) = seq.next_element::<u64>()? {
                if seen.insert(id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        }
    }
    d.deserialize_seq(Ids)
}

/// The answer to `POST /results`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsResponse {
    /// `"OK"`.
    pub status: String,
    /// How many results were accepted as the first result of their item.
    pub count: u64,
    /// Extension: results ignored because their item was already done or never issued.
    #[serde(default)]
    pub ignored: u64,
    /// Extension: work ids of results whose item was already done elsewhere (or was
    /// tombstoned): the worker that holds them may drop them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub already_done: Vec<u64>,
    /// Extension: work ids whose result was not one JSON value: each got an
    /// `invalid_result` error record as its output line (counted in `count`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<u64>,
}

/// The body of `POST /release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The work ids to put back at the front of the queue (repeats are read
    /// once).
    #[serde(deserialize_with = "distinct_ids")]
    pub work_ids: Vec<u64>,
    /// Extension: why. `"retry"` (a task asked for another attempt) counts
    /// against `--max-retries`; `"preempted"` draws on the separate
    /// `--max-releases` budget. Without a reason (workers written for the
    /// Python server) a release counts against `--max-retries`, as it did there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReleaseReason>,
    /// Extension: who releases (the `worker` of its work requests). An item
    /// that was reissued to another worker since is not taken from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// Why items are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The worker stops (preemption, SIGTERM, a dead engine): not the item's fault.
    Preempted,
    /// The task asked for another attempt: a failure of the item.
    Retry,
}

/// The body of `POST /heartbeat` (extension): the worker is alive and still
/// working on these items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Items the worker holds (repeats are read once).
    #[serde(deserialize_with = "distinct_ids")]
    pub work_ids: Vec<u64>,
    /// Extension: who holds them (the `worker` of its work requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Extension: the prefix cache counters of the worker's engine, where
    /// the engine reports them (vLLM), as read lately. A malformed one is
    /// ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_prefix_cache"
    )]
    pub prefix_cache: Option<PrefixCache>,
    /// Extension: engine tokens the worker used since its last report. A
    /// malformed one is ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_usage"
    )]
    pub usage: Option<TokenCounts>,
}

/// Engine requests answered and the tokens they took, as the engine's
/// `usage` says. Workers report what they used since their last report
/// that was answered (with results and heartbeats), so a server adds each
/// report once and a restarted server loses nothing a worker had not sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Engine requests answered.
    #[serde(default)]
    pub requests: u64,
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

impl TokenCounts {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == TokenCounts::default()
    }
}

/// Saturating: counts come from workers, and a broken one may send anything.
impl std::ops::AddAssign for TokenCounts {
    fn add_assign(&mut self, other: TokenCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }
}

impl std::ops::Add for TokenCounts {
    type Output = TokenCounts;
    fn add(mut self, other: TokenCounts) -> TokenCounts {
        self += other;
        self
    }
}

/// An engine's prefix cache counters (vLLM's `prefix_cache_queries` and
/// `prefix_cache_hits`): prompt tokens looked up, and those found cached,
/// since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCache {
    /// Prompt tokens looked up in the cache.
    pub queries: u64,
    /// Of those, tokens found cached (not computed again).
    pub hits: u64,
}

impl PrefixCache {
    /// `hits / queries`, 0 before any query.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            (self.hits as f64 / self.queries as f64).min(1.0)
        }
    }
}

/// The answer to `POST /heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// `"OK"`.
    pub status: String,
    /// How many leases were extended (by the work timeout, from now).
    pub extended: u64,
    /// Items already done (by another worker, or tombstoned): drop them.
    #[serde(default)]
    pub done: Vec<u64>,
    /// The lease length in seconds: heartbeat well within it.
    pub lease_secs: f64,
    /// Extension: a heartbeat that names its `worker` renews every lease
    /// that worker holds, listed or not, so later heartbeats need not list
    /// them (an older server leaves it out: list them all).
    #[serde(default)]
    pub renews_held: bool,
}

/// The answer to `POST /release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// `"OK"`.
    pub status: String,
    /// How many of the ids were in flight and went back to the queue.
    pub released_count: u64,
}

/// The body of `POST /work_timeout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkTimeoutRequest {
    /// The new work timeout in seconds.
    pub timeout: f64,
}

/// The answer to `POST /work_timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageResponse {
    /// `"OK"`.
    pub status: String,
    /// What changed, in words.
    pub message: String,
}

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

/// The answer to `GET /status`: the fields of PROTOCOL.md first, then extensions.
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

/// A result that passed [`check_results`]: one JSON value on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultLine {
    /// The work id it is for.
    pub work_id: u64,
    /// The output line, without its line break.
    pub line: String,
}

/// A result refused by [`check_results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedResult {
    /// The work id it is for.
    pub work_id: u64,
    /// Why, in words a worker's author can act on.
    pub reason: String,
}

/// Splits `(work_id, result)` pairs into results that fit on one output line
/// and refusals.
pub fn check_results(
    results: impl ExactSizeIterator<Item = (u64, Option<String>)>,
) -> (Vec<ResultLine>, Vec<RefusedResult>) {
    let mut valid = Vec::with_capacity(results.len());
    let mut refused = Vec::new();
    for (work_id, result) in results {
        let checked = match result {
            Some(text) => check_result_line(text).map_err(|e| e.reason),
            None => Err("its result is null".into()),
        };
        match checked {
            Ok(line) => valid.push(ResultLine { work_id, line }),
            Err(reason) => refused.push(RefusedResult { work_id, reason }),
        }
    }
    (valid, refused)
}

/// A submitted result that is not one JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidResult {
    /// Why, in words a worker's author can act on.
    pub reason: String,
    /// The result as submitted.
    pub text: String,
}

/// Checks that a result is one JSON value and returns it as one output line.
///
/// JSON as Python's `json` module writes it is accepted: `NaN`, `Infinity`
/// and `-Infinity` (its readers take them back), and line breaks between
/// tokens (`json.dumps(indent=2)`), which are removed: in valid JSON a line
/// break can only be whitespace, so the value is unchanged.
pub fn check_result_line(text: String) -> Result<String, InvalidResult> {
    if let Err(e) = check_json_value(&text) {
        return Err(InvalidResult {
            reason: format!("its result is not one JSON value ({e})"),
            text,
        });
    }
    if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_none() {
        return Ok(text);
    }
    let mut bytes = text.into_bytes();
    bytes.retain(|&b| b != b'\n' && b != b'\r');
    Ok(String::from_utf8(bytes).expect("removing ASCII bytes keeps UTF-8"))
}

/// Checks that `text` is one JSON value, as Python's `json` module reads it
/// (`NaN`, `Infinity` and `-Infinity` included).
pub fn check_json_value(text: &str) -> Result<(), serde_json::Error> {
    let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) else {
        return Ok(());
    };
    match without_python_constants(text) {
        Some(t) if serde_json::from_str::<serde::de::IgnoredAny>(&t).is_ok() => Ok(()),
        _ => Err(e),
    }
}

/// `text` with the constants Python's `json` writes outside strings (`NaN`,
/// `Infinity`, `-Infinity`) replaced by numbers, to check the rest is JSON;
/// `None` when it has none.
pub(crate) fn without_python_constants(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut copied, mut in_string, mut changed) = (0, 0, false, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'N' | b'I' if !in_string => {
                let constant = ["NaN", "Infinity"]
                    .into_iter()
                    .find(|c| text[i..].starts_with(c));
                if let Some(constant) = constant {
                    out.push_str(&text[copied..i]);
                    out.push('0');
                    i += constant.len();
                    copied = i;
                    changed = true;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_item_round_trips_python_json() {
        let py = r#"{"work_id": 7, "content": "{\"a\": 1}", "result": null, "retry_count": 0, "max_retries": 3}"#;
        let item: WorkItem = serde_json::from_str(py).unwrap();
        assert_eq!(item.work_id, 7);
        assert_eq!(item.content, r#"{"a": 1}"#);
        assert_eq!(item.max_retries, Some(3));
        let back: serde_json::Value = serde_json::to_value(&item).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"work_id": 7, "content": "{\"a\": 1}", "result": null, "retry_count": 0, "max_retries": 3})
        );
    }

    #[test]
    fn status_strings_match_the_protocol() {
        for (s, text) in [
            (WorkStatus::Ok, "\"OK\""),
            (WorkStatus::Retry, "\"retry\""),
            (WorkStatus::AllWorkComplete, "\"all_work_complete\""),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), text);
            assert_eq!(format!("\"{}\"", s.as_str()), text);
        }
    }
}
