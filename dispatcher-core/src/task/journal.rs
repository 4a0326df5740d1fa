//! A task's journal on the worker: the engine requests an earlier issue of
//! its line completed are answered from it, and each request this issue
//! completes is recorded for the next one.
//!
//! A request matches the journal when it is at the same position in the
//! task's sequence of requests and has the same fingerprint (a hash of its
//! canonical JSON and the engine it goes to). Requests sent together
//! (`yield_request!([a, b])`) take consecutive positions and replay only as a
//! whole group. At the first request that does not match, replay stops for
//! the rest of the task (its code changed, or it is not deterministic apart
//! from its requests), and the worker logs it once.

use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use serde_json::Value;

use crate::protocol::{JournalEntry, JournalRecord};

/// What a journal reports to the worker: a new entry to hand in, or a
/// request answered from the journal (with the tokens that saved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEvent {
    /// A request completed live: record it.
    Entry(JournalRecord),
    /// A request was answered from the journal.
    Replayed {
        /// Prompt and completion tokens of the recorded response.
        tokens: u64,
    },
}

/// Where a journal's events go.
pub type JournalSink = Arc<dyn Fn(JournalEvent) + Send + Sync>;

/// How one request of a task is answered.
#[derive(Debug)]
pub(crate) enum Step {
    /// From the journal: the recorded response, as JSON text.
    Replay(Box<RawValue>),
    /// Live; recorded at `seq` with `fingerprint` once it succeeds (when
    /// there is a journal).
    Live(Option<(u32, String)>),
}

/// The journal of one task run.
pub struct TaskJournal {
    work_id: u64,
    sink: JournalSink,
    state: Mutex<State>,
}

impl std::fmt::Debug for TaskJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskJournal")
            .field("work_id", &self.work_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// Entries of earlier issues, by position.
    recorded: Vec<JournalEntry>,
    next_seq: u32,
    diverged: bool,
    replayed: u32,
}

impl TaskJournal {
    /// The journal of line `work_id`, replaying `recorded` and reporting to `sink`.
    pub fn new(work_id: u64, mut recorded: Vec<JournalEntry>, sink: JournalSink) -> TaskJournal {
        recorded.sort_by_key(|e| e.seq);
        TaskJournal {
            work_id,
            sink,
            state: Mutex::new(State {
                recorded,
                next_seq: 0,
                diverged: false,
                replayed: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests answered from the journal so far.
    pub fn replayed(&self) -> u32 {
        self.lock().replayed
    }

    /// The steps of a group of requests sent together, by their fingerprints:
    /// all replayed, or all live.
    pub(crate) fn steps(&self, fingerprints: Vec<String>) -> Vec<Step> {
        let mut s = self.lock();
        let first = s.next_seq;
        s.next_seq += fingerprints.len() as u32;
        let recorded: Vec<Option<&JournalEntry>> = (0..fingerprints.len() as u32)
            .map(|i| s.recorded.iter().find(|e| e.seq == first + i))
            .collect();
        let all_match = !s.diverged
            && recorded
                .iter()
                .zip(&fingerprints)
                .all(|(e, fp)| e.is_some_and(|e| e.fingerprint == *fp));
        if all_match {
            let steps: Vec<Step> = recorded
                .into_iter()
                .map(|e| Step::Replay(e.expect("matched").response.clone()))
                .collect();
            s.replayed += steps.len() as u32;
            drop(s);
            for step in &steps {
                if let Step::Replay(response) = step {
                    (self.sink)(JournalEvent::Replayed {
                        tokens: tokens_of(response),
                    });
                }
            }
            return steps;
        }
        if !s.diverged && recorded.iter().any(Option::is_some) {
            s.diverged = true;
            tracing::info!(
                work_id = self.work_id,
                request = first,
                "the task's requests differ from its journal here (its code changed, or it is not deterministic apart from its requests): the rest of it runs live"
            );
        }
        fingerprints
            .into_iter()
            .enumerate()
            .map(|(i, fp)| Step::Live(Some((first + i as u32, fp))))
            .collect()
    }

    /// Request `seq` with `fingerprint` completed live with `response`.
    pub(crate) fn record(&self, seq: u32, fingerprint: String, response: Box<RawValue>) {
        (self.sink)(JournalEvent::Entry(JournalRecord {
            work_id: self.work_id,
            seq,
            fingerprint,
            response,
        }));
    }
}

/// Prompt and completion tokens of a recorded response (typed or raw).
fn tokens_of(response: &RawValue) -> u64 {
    let Ok(response) = serde_json::from_str::<Value>(response.get()) else {
        return 0;
    };
    let usage = match response.get("body") {
        Some(body) => &body["usage"],
        None => &response["usage"],
    };
    usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0)
}

/// The fingerprint of a request: FNV-1a (64 bits) of its canonical JSON
/// (object keys sorted at every level), so that the same request gives the
/// same fingerprint on every worker and every version of this crate.
pub fn fingerprint(request: &Value) -> String {
    let mut bytes = Vec::new();
    write_canonical(request, &mut bytes);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("a string serializes");
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect("a value serializes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn journal(entries: &[(u32, &str)]) -> (TaskJournal, Arc<Mutex<Vec<JournalEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let events = events.clone();
            Arc::new(move |e| events.lock().unwrap().push(e)) as JournalSink
        };
        let recorded = entries
            .iter()
            .map(|&(seq, fp)| {
                JournalEntry::new(
                    seq,
                    fp,
                    &json!({"text": format!("recorded {seq}"), "usage": {"prompt_tokens": 2, "completion_tokens": 3}}),
                )
            })
            .collect();
        (TaskJournal::new(7, recorded, sink), events)
    }

    fn replayed(steps: &[Step]) -> Vec<bool> {
        steps.iter().map(|s| matches!(s, Step::Replay(_))).collect()
    }

    #[test]
    fn fingerprints_ignore_key_order_and_see_every_value() {
        let a =
            fingerprint(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let b =
            fingerprint(&json!({"messages": [{"content": "hi", "role": "user"}], "model": "m"}));
        let c =
            fingerprint(&json!({"messages": [{"content": "hi!", "role": "user"}], "model": "m"}));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn matching_requests_replay_in_order_then_the_rest_runs_live() {
        let (j, events) = journal(&[(0, "a"), (1, "b")]);
        assert_eq!(replayed(&j.steps(vec!["a".into()])), [true]);
        assert_eq!(replayed(&j.steps(vec!["b".into()])), [true]);
        let third = j.steps(vec!["c".into()]);
        assert!(matches!(&third[0], Step::Live(Some((2, fp))) if fp == "c"));
        assert_eq!(j.replayed(), 2);
        let events = events.lock().unwrap();
        assert_eq!(events[0], JournalEvent::Replayed { tokens: 5 });
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn a_changed_request_stops_replay_for_the_rest_of_the_task() {
        let (j, _) = journal(&[(0, "a"), (1, "b"), (2, "c")]);
        assert_eq!(replayed(&j.steps(vec!["a".into()])), [true]);
        assert_eq!(replayed(&j.steps(vec!["B".into()])), [false]);
        // Request 2 matches its entry, but replay stopped at the change.
        assert_eq!(replayed(&j.steps(vec!["c".into()])), [false]);
        assert_eq!(j.replayed(), 1);
    }

    #[test]
    fn a_group_replays_only_as_a_whole() {
        let (j, _) = journal(&[(0, "a"), (1, "b"), (2, "x")]);
        assert_eq!(
            replayed(&j.steps(vec!["a".into(), "b".into()])),
            [true, true]
        );
        // Half a group recorded (the worker died while the rest ran): all live.
        let (j, _) = journal(&[(0, "a")]);
        assert_eq!(
            replayed(&j.steps(vec!["a".into(), "b".into()])),
            [false, false]
        );
    }
}
