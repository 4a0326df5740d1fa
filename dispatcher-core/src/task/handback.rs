//! What a worker hands back to its source — results, releases, journal
//! entries — batched on a task of its own, and delivered whatever the
//! server's limits or reachability: retried while it is unreachable for a
//! while, split while it says a request is too large.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::journal::JournalEvent;
use super::source::{SourceError, WorkSource};
use crate::engine::BoxFuture;
use crate::protocol::{JournalRecord, ReleaseReason, WorkItem};

/// What goes back to the source: handed to the submitter task, which batches.
#[derive(Debug)]
pub(super) enum Handback {
    Result(WorkItem),
    Release(u64, ReleaseReason),
    Journal(JournalEvent),
}

/// The bytes a hand-in gathers before it goes: well under the server's
/// smallest sensible `--max-request-mib` (64 by default), so that big results
/// or journal entries are not held by the hundred in one request (a 413 is
/// still split, see [`deliver_results`]).
const BATCH_BYTES: usize = 8 << 20;

/// The bytes of a result's keys, work id and counts on the wire.
const ITEM_OVERHEAD: usize = 96;

/// Hands results and releases back, batching whatever piled up while the last
/// call was in flight, up to `max` items or [`BATCH_BYTES`]. Retries
/// unreachable servers for a while; what cannot be delivered is reissued by
/// the server after its work timeout.
pub(super) async fn hand_back(
    source: Arc<dyn WorkSource>,
    mut rx: mpsc::UnboundedReceiver<Handback>,
    max: usize,
    delivered: Arc<Notify>,
    failed: Failure,
) {
    let mut results = Vec::new();
    let mut preempted = Vec::new();
    let mut retried = Vec::new();
    let mut entries = Vec::new();
    let (mut replayed, mut tokens_saved) = (0, 0);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut bytes = 0;
        while let Some(msg) = next.take() {
            match msg {
                Handback::Result(item) => {
                    bytes += ITEM_OVERHEAD
                        + item.content.len()
                        + item.result.as_ref().map_or(0, String::len);
                    results.push(item);
                }
                Handback::Release(id, ReleaseReason::Preempted) => preempted.push(id),
                Handback::Release(id, ReleaseReason::Retry) => retried.push(id),
                Handback::Journal(JournalEvent::Entry(entry)) => {
                    bytes += entry.wire_bytes();
                    entries.push(entry);
                }
                Handback::Journal(JournalEvent::Replayed { tokens }) => {
                    replayed += 1;
                    tokens_saved += tokens;
                }
            }
            if results.len() < max && entries.len() < max && bytes < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        // Journal entries first: a line released next must find them on the
        // server when it is issued again.
        if !entries.is_empty() || replayed > 0 {
            let counts = (
                std::mem::take(&mut replayed),
                std::mem::take(&mut tokens_saved),
            );
            deliver_journal(&*source, std::mem::take(&mut entries), counts, &failed).await;
        }
        for (ids, reason) in [
            (std::mem::take(&mut retried), ReleaseReason::Retry),
            (std::mem::take(&mut preempted), ReleaseReason::Preempted),
        ] {
            if !ids.is_empty() {
                deliver("release", &failed, || source.release(ids.clone(), reason)).await;
            }
        }
        if !results.is_empty() {
            deliver_results(&*source, std::mem::take(&mut results), &failed).await;
        }
        delivered.notify_one();
    }
}

/// Why the job cannot go on, set once (the first failure wins), and
/// watched by the manager, which stops on it.
pub(super) type Failure = tokio::sync::watch::Sender<Option<String>>;

/// Records `why` as the job's failure unless one is recorded already.
pub(super) fn first_failure(failure: &Failure, why: String) {
    failure.send_if_modified(|f| {
        if f.is_some() {
            return false;
        }
        *f = Some(why);
        true
    });
}

/// What became of a hand-in.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Taken.
    Done,
    /// Refused as too large (413): smaller requests may pass.
    TooLarge,
    /// Given up (the server is gone, or refused it): the server reissues
    /// the items.
    Lost,
}

async fn deliver<'a>(
    what: &str,
    failed: &Failure,
    call: impl Fn() -> BoxFuture<'a, Result<(), SourceError>>,
) -> Delivery {
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..8 {
        match call().await {
            Ok(()) => return Delivery::Done,
            Err(e) if e.is_too_large() => return Delivery::TooLarge,
            Err(e) if e.is_fatal() => {
                // The job cannot go on: the manager stops (once, with the
                // first failure), rather than compute lines it cannot keep.
                tracing::error!("could not hand in {what}: {e}");
                first_failure(failed, e.to_string());
                return Delivery::Lost;
            }
            Err(e) if e.is_transient() && attempt < 7 => {
                tracing::warn!("could not hand in {what} ({e}); retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(
                    "could not hand in {what}: {e}; the server will reissue those items"
                );
                return Delivery::Lost;
            }
        }
    }
    Delivery::Lost
}

/// Puts the two halves of `part` on `parts`, the first half to go first.
fn halve<T>(what: &str, mut part: Vec<T>, parts: &mut Vec<Vec<T>>) {
    let second = part.split_off(part.len() / 2);
    tracing::info!(
        parts = 2,
        items = part.len() + second.len(),
        "{what} refused as too large: handing them in in smaller parts"
    );
    // Popped last-in first.
    parts.push(second);
    parts.push(part);
}

/// Hands in journal entries and the counts of replayed requests, in requests
/// as small as the server needs (split in halves on a 413, as results are).
/// An entry too large alone is left out: the journal only saves work, so its
/// line is asked of the engine again in full if it is issued again.
async fn deliver_journal(
    source: &dyn WorkSource,
    entries: Vec<JournalRecord>,
    (mut replayed, mut tokens_saved): (u64, u64),
    failed: &Failure,
) {
    let mut parts = vec![entries];
    while let Some(part) = parts.pop() {
        let (r, t) = (replayed, tokens_saved);
        match deliver("journal entries", failed, || {
            source.journal(part.clone(), r, t)
        })
        .await
        {
            // The counts go with the first part taken.
            Delivery::Done => (replayed, tokens_saved) = (0, 0),
            Delivery::Lost => {}
            Delivery::TooLarge if part.len() > 1 => halve("journal entries", part, &mut parts),
            Delivery::TooLarge => {
                for entry in part {
                    tracing::warn!(
                        work_id = entry.work_id,
                        bytes = entry.response.get().len(),
                        "a journal entry is larger than the server takes (its --max-request-mib): it is not kept, and its line asks the engine again if it is issued again"
                    );
                }
            }
        }
    }
}

/// Hands in finished results, in requests as small as the server needs: a
/// batch refused as too large (413) is split in halves until each part is
/// taken, so no answer is thrown away while the server is reachable. One
/// result that is too large alone is sent without its input line (which the
/// server does not need), and, refused again, replaced by a small
/// `result_too_large` failure record: its line gets an output line rather
/// than being computed again on every reissue. Should even that be refused
/// (a limit of almost nothing), the item is left to the server to reissue.
async fn deliver_results(source: &dyn WorkSource, items: Vec<WorkItem>, failed: &Failure) {
    let mut parts = vec![items];
    while let Some(part) = parts.pop() {
        match deliver("results", failed, || source.submit(part.clone())).await {
            Delivery::Done | Delivery::Lost => {}
            Delivery::TooLarge if part.len() > 1 => halve("results", part, &mut parts),
            Delivery::TooLarge => {
                let item = part.into_iter().next().expect("one item");
                match smaller(item) {
                    Some(item) => parts.push(vec![item]),
                    None => tracing::error!(
                        "the server refuses even a small failure record as too large (its --max-request-mib): the server will reissue the line"
                    ),
                }
            }
        }
    }
}

/// `item` made smaller after the server refused it alone: without its input
/// line, else with a `result_too_large` record for a result; `None` once it
/// is that record already.
fn smaller(mut item: WorkItem) -> Option<WorkItem> {
    if !item.content.is_empty() {
        item.content = String::new();
        return Some(item);
    }
    let bytes = item.result.as_ref().map_or(0, String::len);
    if bytes <= SMALL_RESULT {
        return None;
    }
    tracing::error!(
        work_id = item.work_id,
        bytes,
        "a result is larger than the server takes: its line gets a result_too_large record"
    );
    item.result = Some(crate::record::task_failure(
        "result_too_large",
        &format!(
            "the result of this line was {bytes} bytes, more than the dispatcher server takes in one request (its --max-request-mib); raise that limit, or make the task's output smaller"
        ),
        "",
    ));
    Some(item)
}

/// A result no smaller than a `result_too_large` record could replace.
const SMALL_RESULT: usize = 1024;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::client::ClientError;
    use crate::protocol::{JournalEntry, JournalRequest, WorkResponse};

    /// A source that takes requests up to `limit` bytes of JSON and refuses
    /// larger ones with a 413, as the server does past `--max-request-mib`.
    #[derive(Debug)]
    struct Limited {
        limit: usize,
        journal: Mutex<Vec<JournalRecord>>,
        replayed: Mutex<u64>,
        results: Mutex<Vec<WorkItem>>,
        /// The bytes of each request taken.
        taken: Mutex<Vec<usize>>,
    }

    impl Limited {
        fn new(limit: usize) -> Arc<Limited> {
            Arc::new(Limited {
                limit,
                journal: Mutex::default(),
                replayed: Mutex::default(),
                results: Mutex::default(),
                taken: Mutex::default(),
            })
        }

        fn take(&self, body: &impl serde::Serialize) -> Result<(), SourceError> {
            let bytes = serde_json::to_vec(body).unwrap().len();
            if bytes > self.limit {
                return Err(SourceError::Client(ClientError::Status {
                    url: "http://127.0.0.1/x".into(),
                    status: reqwest::StatusCode::PAYLOAD_TOO_LARGE,
                    body: String::new(),
                }));
            }
            self.taken.lock().unwrap().push(bytes);
            Ok(())
        }
    }

    impl WorkSource for Limited {
        fn get_work(&self, _: usize) -> BoxFuture<'_, Result<WorkResponse, SourceError>> {
            unreachable!("the hand-back asks for no work")
        }

        fn submit(&self, items: Vec<WorkItem>) -> BoxFuture<'_, Result<(), SourceError>> {
            let r = self.take(&items);
            if r.is_ok() {
                self.results.lock().unwrap().extend(items);
            }
            Box::pin(std::future::ready(r))
        }

        fn release(&self, _: Vec<u64>, _: ReleaseReason) -> BoxFuture<'_, Result<(), SourceError>> {
            Box::pin(std::future::ready(Ok(())))
        }

        fn journal(
            &self,
            entries: Vec<JournalRecord>,
            replayed: u64,
            tokens_saved: u64,
        ) -> BoxFuture<'_, Result<(), SourceError>> {
            let request = JournalRequest {
                worker: None,
                entries,
                replayed,
                tokens_saved,
            };
            let r = self.take(&request);
            if r.is_ok() {
                self.journal.lock().unwrap().extend(request.entries);
                *self.replayed.lock().unwrap() += replayed;
            }
            Box::pin(std::future::ready(r))
        }
    }

    /// Runs the hand-back over `sent`, all queued before it starts (so that
    /// they pile up as behind a slow call), until it has delivered them.
    async fn hand_back_all(source: Arc<Limited>, sent: Vec<Handback>) {
        let (tx, rx) = mpsc::unbounded_channel();
        for msg in sent {
            tx.send(msg).unwrap();
        }
        drop(tx);
        let (failed, _) = tokio::sync::watch::channel(None);
        hand_back(source, rx, 1000, Arc::new(Notify::new()), failed).await;
    }

    fn entry(work_id: u64, bytes: usize) -> Handback {
        let response = serde_json::json!({"text": "x".repeat(bytes)});
        Handback::Journal(JournalEvent::Entry(JournalRecord::new(
            work_id,
            JournalEntry::new(0, "00000000000000aa", &response),
        )))
    }

    #[tokio::test]
    async fn journal_entries_refused_as_too_large_are_split_not_lost() {
        let source = Limited::new(1 << 20);
        let mut sent: Vec<Handback> = (0..12).map(|id| entry(id, 300_000)).collect();
        sent.push(Handback::Journal(JournalEvent::Replayed { tokens: 7 }));
        // One entry larger than the server takes alone is left out.
        sent.push(entry(12, 2 << 20));
        hand_back_all(source.clone(), sent).await;
        let mut ids: Vec<u64> = source
            .journal
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.work_id)
            .collect();
        ids.sort();
        assert_eq!(ids, (0..12).collect::<Vec<_>>());
        assert_eq!(*source.replayed.lock().unwrap(), 1, "counted once");
    }

    #[tokio::test]
    async fn a_hand_in_is_bounded_in_bytes_as_well_as_in_items() {
        let source = Limited::new(usize::MAX);
        let sent = (0..40)
            .map(|id| {
                let mut item = WorkItem::issued(id, "{}".into(), 0, None, None);
                item.result = Some(format!("\"{}\"", "y".repeat(1 << 20)));
                Handback::Result(item)
            })
            .collect();
        hand_back_all(source.clone(), sent).await;
        assert_eq!(source.results.lock().unwrap().len(), 40);
        let taken = source.taken.lock().unwrap().clone();
        assert!(
            // BATCH_BYTES (8 MiB) and the item that reached it.
            taken.iter().all(|&b| b <= 10 << 20),
            "requests of {taken:?} bytes"
        );
    }
}
