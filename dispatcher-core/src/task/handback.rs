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
use crate::protocol::{ReleaseReason, WorkItem};

/// What goes back to the source: handed to the submitter task, which batches.
#[derive(Debug)]
pub(super) enum Handback {
    Result(WorkItem),
    Release(u64, ReleaseReason),
    Journal(JournalEvent),
}

/// Hands results and releases back, batching whatever piled up while the last
/// call was in flight. Retries unreachable servers for a while; what cannot be
/// delivered is reissued by the server after its work timeout.
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
        while let Some(msg) = next.take() {
            match msg {
                Handback::Result(item) => results.push(item),
                Handback::Release(id, ReleaseReason::Preempted) => preempted.push(id),
                Handback::Release(id, ReleaseReason::Retry) => retried.push(id),
                Handback::Journal(JournalEvent::Entry(entry)) => entries.push(entry),
                Handback::Journal(JournalEvent::Replayed { tokens }) => {
                    replayed += 1;
                    tokens_saved += tokens;
                }
            }
            if results.len() < max && entries.len() < max {
                next = rx.try_recv().ok();
            }
        }
        // Journal entries first: a line released next must find them on the
        // server when it is issued again.
        if !entries.is_empty() || replayed > 0 {
            let batch = std::mem::take(&mut entries);
            let (r, t) = (
                std::mem::take(&mut replayed),
                std::mem::take(&mut tokens_saved),
            );
            deliver("journal entries", &failed, || {
                source.journal(batch.clone(), r, t)
            })
            .await;
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

/// Hands in finished results, in requests as small as the server needs: a
/// batch refused as too large (413) is split in halves until each part is
/// taken, so no answer is thrown away while the server is reachable. One
/// result that is too large alone is sent without its input line (which the
/// server does not need), and, refused again, replaced by a small
/// `result_too_large` failure record: its line gets an output line rather
/// than being computed again on every reissue.
async fn deliver_results(source: &dyn WorkSource, items: Vec<WorkItem>, failed: &Failure) {
    let mut parts = vec![items];
    while let Some(part) = parts.pop() {
        match deliver("results", failed, || source.submit(part.clone())).await {
            Delivery::Done | Delivery::Lost => {}
            Delivery::TooLarge if part.len() > 1 => {
                let mut first = part;
                let second = first.split_off(first.len() / 2);
                tracing::info!(
                    parts = 2,
                    items = first.len() + second.len(),
                    "results refused as too large: handing them in in smaller parts"
                );
                // Popped last-in first: the first half goes first.
                parts.push(second);
                parts.push(first);
            }
            Delivery::TooLarge => {
                let mut item = part.into_iter().next().expect("one item");
                if !item.content.is_empty() {
                    item.content = String::new();
                    parts.push(vec![item]);
                    continue;
                }
                let bytes = item.result.as_ref().map_or(0, String::len);
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
                parts.push(vec![item]);
            }
        }
    }
}
