//! `GET /work`: work items and the answers that carry them; the journal
//! entries an item may carry.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

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
///
/// The response is kept as the JSON text it came in, on the worker, on the
/// wire and on the server (in memory and in the journal file): read into
/// values, a response takes several times the memory of its text. It is read
/// into a value only when a task replays it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Its position among the task's requests, from 0.
    pub seq: u32,
    /// A hash of the request's canonical JSON, 16 hex digits.
    pub fingerprint: String,
    /// The response, as the task saw it, as JSON text.
    pub response: Box<RawValue>,
}

impl JournalEntry {
    /// The entry of request `seq` whose response was `response`.
    pub fn new(seq: u32, fingerprint: impl Into<String>, response: &Value) -> JournalEntry {
        JournalEntry {
            seq,
            fingerprint: fingerprint.into(),
            response: to_raw(response),
        }
    }

    /// The response, read into a value.
    pub fn response(&self) -> Value {
        serde_json::from_str(self.response.get()).expect("held text is the JSON of a value")
    }

    /// About the bytes it takes on the wire.
    pub fn wire_bytes(&self) -> usize {
        ENTRY_OVERHEAD + self.fingerprint.len() + self.response.get().len()
    }
}

/// The bytes of an entry's keys and punctuation on the wire, and a work id.
const ENTRY_OVERHEAD: usize = 64;

fn to_raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a JSON value serializes")
}

// Compared by the response's text: the same value written with other
// whitespace is another entry (which costs at most a repeat).
impl PartialEq for JournalEntry {
    fn eq(&self, other: &JournalEntry) -> bool {
        self.seq == other.seq
            && self.fingerprint == other.fingerprint
            && self.response.get() == other.response.get()
    }
}

impl Eq for JournalEntry {}

/// A [`JournalEntry`] of one line, as a worker hands it in and the server's
/// journal file holds it (flat: the entry's fields beside `work_id`).
/// Entries compare by their responses' texts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The line it belongs to.
    pub work_id: u64,
    /// Its position among the task's requests, from 0.
    pub seq: u32,
    /// A hash of the request's canonical JSON, 16 hex digits.
    pub fingerprint: String,
    /// The response, as JSON text.
    pub response: Box<RawValue>,
}

impl JournalRecord {
    /// `entry`, of line `work_id`.
    pub fn new(work_id: u64, entry: JournalEntry) -> JournalRecord {
        JournalRecord {
            work_id,
            seq: entry.seq,
            fingerprint: entry.fingerprint,
            response: entry.response,
        }
    }

    /// Its entry, without the line.
    pub fn entry(&self) -> JournalEntry {
        JournalEntry {
            seq: self.seq,
            fingerprint: self.fingerprint.clone(),
            response: self.response.clone(),
        }
    }

    /// About the bytes it takes on the wire.
    pub fn wire_bytes(&self) -> usize {
        ENTRY_OVERHEAD + self.fingerprint.len() + self.response.get().len()
    }
}

impl PartialEq for JournalRecord {
    fn eq(&self, other: &JournalRecord) -> bool {
        self.work_id == other.work_id
            && self.seq == other.seq
            && self.fingerprint == other.fingerprint
            && self.response.get() == other.response.get()
    }
}

impl Eq for JournalRecord {}

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
