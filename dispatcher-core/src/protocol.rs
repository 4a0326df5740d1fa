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
    /// The server's `--max-retries`; `None` when reissues are unlimited.
    #[serde(default)]
    pub max_retries: Option<u32>,
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
}

/// The body of `POST /results`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsRequest {
    /// Items with `result` set.
    pub items: Vec<WorkItem>,
}

/// What the server reads of a `POST /results` body: `{"items": [...]}` where
/// each item needs only `work_id` and `result`. Every other field is skipped
/// without being copied, so a worker may send each issued item back whole (as
/// the Python client does, prompt included) or just those two fields.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubmittedResults {
    /// The results.
    pub items: Vec<SubmittedResult>,
}

/// One item of [`SubmittedResults`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubmittedResult {
    /// The work id the result is for.
    pub work_id: u64,
    /// The result: a string that holds one JSON value (`null` is refused).
    #[serde(default)]
    pub result: Option<String>,
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
}

/// The body of `POST /release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The work ids to put back at the front of the queue.
    pub work_ids: Vec<u64>,
    /// Extension: why. `"retry"` (a task asked for another attempt) counts
    /// against `--max-retries`; `"preempted"` draws on the separate
    /// `--max-releases` budget. Without a reason (workers written for the
    /// Python server) a release counts against `--max-retries`, as it did there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReleaseReason>,
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
    /// Items the worker holds.
    pub work_ids: Vec<u64>,
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
    /// Input lines in all, once the whole input has been read; `None` before.
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

/// Splits submitted `(work_id, result)` pairs into results that fit on one
/// output line and refusals.
pub fn check_results(
    results: impl ExactSizeIterator<Item = (u64, Option<String>)>,
) -> (Vec<ResultLine>, Vec<RefusedResult>) {
    let mut valid = Vec::with_capacity(results.len());
    let mut refused = Vec::new();
    for (work_id, result) in results {
        let checked = match result {
            Some(line) => check_result_line(&line).map(|()| line),
            None => Err("its result is null".into()),
        };
        match checked {
            Ok(line) => valid.push(ResultLine { work_id, line }),
            Err(reason) => refused.push(RefusedResult { work_id, reason }),
        }
    }
    (valid, refused)
}

/// Checks that a result is one JSON value that fits on one output line.
pub fn check_result_line(s: &str) -> Result<(), String> {
    if memchr::memchr2(b'\n', b'\r', s.as_bytes()).is_some() {
        return Err("its result contains a line break; serialize it as compact JSON".into());
    }
    serde_json::from_str::<serde::de::IgnoredAny>(s)
        .map(|_| ())
        .map_err(|e| format!("its result is not one JSON value ({e})"))
}

/// Builds the output line of a failure record: `{"__ERROR__": {...}}`.
pub fn error_record(fields: serde_json::Map<String, serde_json::Value>) -> String {
    let mut outer = serde_json::Map::with_capacity(1);
    outer.insert("__ERROR__".into(), serde_json::Value::Object(fields));
    serde_json::Value::Object(outer).to_string()
}

/// The tombstone the server writes for an item it gives up on: `error` is
/// `max_retries_exceeded` (failures) or `max_releases_exceeded` (releases), and
/// `reissues` is the attempt history by cause.
pub fn tombstone(
    error: &str,
    work_id: u64,
    original_content: &str,
    reissues: ReissueCounts,
) -> String {
    let mut f = serde_json::Map::new();
    f.insert("error".into(), error.into());
    f.insert("work_id".into(), work_id.into());
    f.insert("original_content".into(), original_content.into());
    f.insert(
        "reissues".into(),
        serde_json::to_value(reissues).expect("counts serialize"),
    );
    error_record(f)
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

    #[test]
    fn tombstone_has_the_protocol_shape() {
        let t: serde_json::Value = serde_json::from_str(&tombstone(
            "max_retries_exceeded",
            4,
            "line \"four\"",
            ReissueCounts {
                timeout: 3,
                release: 1,
                retry: 0,
            },
        ))
        .unwrap();
        let e = &t["__ERROR__"];
        assert_eq!(e["error"], "max_retries_exceeded");
        assert_eq!(e["work_id"], 4);
        assert_eq!(e["original_content"], "line \"four\"");
        assert_eq!(e["reissues"]["timeout"], 3);
    }
}
