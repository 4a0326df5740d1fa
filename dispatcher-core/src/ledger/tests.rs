//! The ledger's tests: the state machine with the clock passed in, and a
//! property test that interleaves crashes, torn writes, spills and checkpoints.

use super::*;
use crate::job::checkpoint::{Checkpoint, ResumeError};
use crate::job::JobFiles;
use crate::protocol::{ReissueCounts, WorkItem};
use std::path::Path;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Job {
    dir: tempfile::TempDir,
    config: LedgerConfig,
}

impl Job {
    fn new(input: &[u8], max_retries: Option<u32>) -> Job {
        let dir = tempfile::tempdir().unwrap();
        let infile = dir.path().join("in.jsonl");
        std::fs::write(&infile, input).unwrap();
        let config = LedgerConfig {
            work_timeout: TIMEOUT,
            max_retries,
            ..LedgerConfig::new(
                infile,
                crate::job::JobFiles::new(
                    dir.path().join("out.jsonl"),
                    Some(dir.path().join("out.jsonl.checkpoint")),
                ),
            )
        };
        Job { dir, config }
    }

    fn open(&self, now: Instant) -> Result<Ledger, ResumeError> {
        Ledger::open(self.config.clone(), now)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.config.files.output()).unwrap_or_default()
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn lines(n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"i\":{i}}}\n"))
        .collect::<String>()
        .into_bytes()
}

fn ids(reply: &WorkReply) -> Vec<u64> {
    reply.items().iter().map(|i| i.work_id).collect()
}

/// Takes up to `n` items and answers each with its own content.
fn answer(l: &mut Ledger, n: usize, t: Instant) -> WorkReply {
    let r = l.take_work(Ask::batch(n), t).unwrap();
    let done = r
        .items()
        .iter()
        .map(|i| result(i.work_id, &i.content))
        .collect();
    l.submit(done).unwrap();
    r
}

/// Results as a worker sends them, checked as the HTTP layer checks them:
/// the ledger records the valid ones, and the refused ones are returned.
trait Submit {
    fn submit(&mut self, results: Vec<WorkItem>) -> io::Result<Submitted>;
}

impl Submit for Ledger {
    fn submit(&mut self, results: Vec<WorkItem>) -> io::Result<Submitted> {
        let (valid, refused) =
            crate::protocol::check_results(results.into_iter().map(|r| (r.work_id, r.result)));
        Ok(Submitted {
            reply: self.complete(valid)?,
            refused,
        })
    }
}

#[derive(Debug)]
struct Submitted {
    reply: CompleteReply,
    refused: Vec<crate::protocol::RefusedResult>,
}

impl std::ops::Deref for Submitted {
    type Target = CompleteReply;
    fn deref(&self) -> &CompleteReply {
        &self.reply
    }
}

/// An issue as the worker receives it.
fn wire(i: Issue) -> WorkItem {
    WorkItem::issued(i.work_id, i.content, i.retry_count, None, i.journal)
}

fn result(id: u64, value: &str) -> WorkItem {
    WorkItem {
        work_id: id,
        content: String::new(),
        result: Some(value.to_string()),
        retry_count: 0,
        max_retries: None,
        journal: None,
    }
}

#[test]
fn issues_in_order_and_writes_results_in_input_order() {
    let job = Job::new(&lines(3), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let r = l.take_work(Ask::batch(2), t).unwrap();
    assert_eq!(ids(&r), vec![0, 1]);
    assert_eq!(r.items()[1].content, r#"{"i":1}"#);
    // On the wire, each item carries the server's max_retries.
    let wire = crate::server::work_response(r, l.config().max_retries, None);
    assert_eq!(wire.items[0].max_retries, Some(3));
    let r = l.take_work(Ask::batch(5), t).unwrap();
    assert_eq!(ids(&r), vec![2]);
    let done = l.submit(vec![result(2, "2"), result(1, "1")]).unwrap();
    assert_eq!(done.accepted, 2);
    assert_eq!(
        job.output(),
        "",
        "line 0 is not done: nothing may be written"
    );
    assert_eq!(l.stats(t).reorder_lines, 2);
    let r = l.take_work(Ask::batch(1), t).unwrap();
    assert!(matches!(r, WorkReply::Retry { .. }), "{r:?}");
    l.submit(vec![result(0, "0")]).unwrap();
    assert_eq!(job.output(), "0\n1\n2\n");
    assert!(l.is_complete());
    assert_eq!(l.take_work(Ask::batch(1), t).unwrap(), WorkReply::Complete);
}

/// The tail hint of `dispatcher launch`'s workers: `drained` only once no
/// line is left to hand out, and no longer once one comes back.
#[test]
fn retry_says_drained_only_when_no_unissued_line_remains() {
    let drained = |r: &WorkReply| match r {
        WorkReply::Retry { drained, .. } => *drained,
        other => panic!("not a retry: {other:?}"),
    };
    let job = Job::new(&lines(3), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    assert_eq!(ids(&l.take_work(Ask::batch(2), t).unwrap()), vec![0, 1]);
    // Line 2 is unread: a full batch elsewhere must not look drained.
    assert_eq!(ids(&l.take_work(Ask::batch(1), t).unwrap()), vec![2]);
    let r = l.take_work(Ask::batch(4), t).unwrap();
    assert!(drained(&r), "every line is in flight: {r:?}");
    // A released line is unissued again: not drained until it is out.
    l.release(&[1], Cause::Release, None).unwrap();
    assert_eq!(ids(&l.take_work(Ask::batch(4), t).unwrap()), vec![1]);
    l.release(&[0], Cause::Release, None).unwrap();
    l.submit(vec![result(2, "2")]).unwrap();
    let wire = crate::server::work_response(l.take_work(Ask::batch(1), t).unwrap(), None, None);
    assert_eq!(wire.items.len(), 1);
    let wire = crate::server::work_response(l.take_work(Ask::batch(1), t).unwrap(), None, None);
    assert!(wire.drained);
    let json = serde_json::to_value(&wire).unwrap();
    assert_eq!(json["drained"], true, "{json}");

    // With backup copies on, an idle worker may still get one: no hint.
    let mut job = Job::new(&lines(1), Some(3));
    job.config.max_backups = 1;
    job.config.backup_after = Duration::from_secs(3600);
    let mut l = job.open(t).unwrap();
    assert_eq!(ids(&l.take_work(Ask::batch(1), t).unwrap()), vec![0]);
    assert!(!drained(&l.take_work(Ask::batch(1), t).unwrap()));
    // Not drained on the wire means no field at all (older workers' view).
    let wire = crate::server::work_response(l.take_work(Ask::batch(1), t).unwrap(), None, None);
    assert!(serde_json::to_value(&wire)
        .unwrap()
        .get("drained")
        .is_none());
}

#[test]
fn first_result_wins_and_unknown_ids_are_ignored() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(1), t).unwrap();
    let r = l
        .submit(vec![
            result(0, "\"first\""),
            result(0, "\"second\""),
            result(1, "1"),
            result(99, "9"),
        ])
        .unwrap();
    assert_eq!(
        (r.accepted, r.ignored, r.already_done.clone()),
        (1, 3, vec![0])
    );
    l.take_work(Ask::batch(1), t).unwrap();
    l.submit(vec![result(1, "\"one\"")]).unwrap();
    assert_eq!(job.output(), "\"first\"\n\"one\"\n");
    assert_eq!(l.stats(t).ignored_results, 3);
}

#[test]
fn timeout_reissues_with_the_same_id_and_then_tombstones() {
    let job = Job::new(b"{\"i\":0}\n", Some(1));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    assert_eq!(
        l.take_work(Ask::batch(1), t).unwrap().items()[0].retry_count,
        0
    );
    let t = t + TIMEOUT;
    let r = l.take_work(Ask::batch(1), t).unwrap();
    assert_eq!((ids(&r), r.items()[0].retry_count), (vec![0], 1));
    assert_eq!(l.stats(t).reissues.timeout, 1);
    l.tick(t + TIMEOUT).unwrap();
    let out: serde_json::Value = serde_json::from_str(job.output().trim_end()).unwrap();
    assert_eq!(out["__ERROR__"]["error"], "max_retries_exceeded");
    assert_eq!(out["__ERROR__"]["work_id"], 0);
    assert_eq!(out["__ERROR__"]["original_content"], "{\"i\":0}");
    assert_eq!(l.stats(t).tombstones, 1);
    assert!(l.is_complete());
}

#[test]
fn unlimited_retries_never_tombstone() {
    let job = Job::new(&lines(1), None);
    let mut t = Instant::now();
    let mut l = job.open(t).unwrap();
    for round in 0..50 {
        let r = l.take_work(Ask::batch(1), t).unwrap();
        assert_eq!(r.items()[0].retry_count, round);
        t += TIMEOUT;
    }
    assert_eq!(l.stats(t).tombstones, 0);
}

/// Reissued lines whose journals hold large responses go out over several
/// replies, each about `MAX_REPLY_BYTES`, not all in one built in memory.
#[test]
fn a_reply_of_lines_with_large_journals_is_bounded_in_bytes() {
    let job = Job::new(&lines(10), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    assert_eq!(l.take_work(Ask::batch(10), t).unwrap().items().len(), 10);
    let big = serde_json::json!({"text": "x".repeat(6 << 20)});
    let records = (0..10)
        .map(|id| JournalRecord::new(id, JournalEntry::new(0, "00000000000000aa", &big)))
        .collect();
    assert_eq!(l.record_journal(records).unwrap(), 10);
    l.release(&(0..10).collect::<Vec<_>>(), Cause::Release, None)
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 10 {
        let reply = l.take_work(Ask::batch(10), t).unwrap();
        let items = reply.into_items();
        let bytes: usize = items.iter().map(Issue::wire_bytes).sum();
        assert!(!items.is_empty());
        assert!(
            // MAX_REPLY_BYTES (32 MiB) and the line that reached it.
            bytes <= 39 << 20,
            "{} items of {bytes} bytes in one reply",
            items.len()
        );
        for item in items {
            let journal = item.journal.expect("each line has its journal");
            assert_eq!(journal[0].response(), big);
            got.push(item.work_id);
        }
    }
    got.sort();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

#[test]
fn released_items_go_first_in_the_order_given() {
    let job = Job::new(&lines(6), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(4), t).unwrap();
    assert_eq!(
        l.release(&[2, 0, 7, 2], Cause::Release, None).unwrap(),
        2,
        "only items in flight count"
    );
    let r = l.take_work(Ask::batch(3), t).unwrap();
    assert_eq!(ids(&r), vec![2, 0, 4]);
    assert_eq!(r.items()[0].retry_count, 0, "a preemption is not a failure");
    l.release(&[2], Cause::Retry, None).unwrap();
    assert_eq!(
        l.take_work(Ask::batch(1), t).unwrap().items()[0].retry_count,
        1,
        "a task retry is"
    );
    assert_eq!(
        l.stats(t).reissues,
        ReissueCounts {
            timeout: 0,
            release: 2,
            retry: 1,
        }
    );
}

#[test]
fn a_result_for_a_queued_item_is_accepted_and_not_reissued() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(1), t).unwrap();
    l.release(&[0], Cause::Release, None).unwrap();
    assert_eq!(l.submit(vec![result(0, "0")]).unwrap().accepted, 1);
    assert_eq!(ids(&l.take_work(Ask::batch(5), t).unwrap()), vec![1]);
}

#[test]
fn finished_items_in_the_reorder_buffer_are_never_reissued() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(2), t).unwrap();
    l.submit(vec![result(1, "1")]).unwrap();
    let r = l.take_work(Ask::batch(5), t + TIMEOUT).unwrap();
    assert_eq!(ids(&r), vec![0], "only the unfinished item comes back");
}

#[test]
fn results_that_are_not_json_are_refused_and_stay_in_flight() {
    let job = Job::new(&lines(1), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(1), t).unwrap();
    for bad in ["{\"a\":\n", "not json", "1 2", "", "{\"a\": NaNa}"] {
        let r = l.submit(vec![result(0, bad)]).unwrap();
        assert_eq!((r.accepted, r.refused.len()), (0, 1), "{bad:?}");
    }
    let mut null = result(0, "");
    null.result = None;
    assert_eq!(l.submit(vec![null]).unwrap().refused.len(), 1);
    assert_eq!(l.stats(t).in_flight, 1);
    assert_eq!(
        l.submit(vec![result(0, " {\"ok\": true} ")])
            .unwrap()
            .accepted,
        1
    );
    assert_eq!(job.output(), " {\"ok\": true} \n");
}

#[test]
fn blank_lines_invalid_utf8_and_a_missing_last_newline_keep_alignment() {
    let job = Job::new(b"a\n\n\xc3\x28\nlast", Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let r = l.take_work(Ask::batch(10), t).unwrap();
    assert_eq!(ids(&r), vec![0, 1, 3]);
    assert_eq!(r.items()[1].content, "");
    assert_eq!(r.items()[2].content, "last");
    l.submit(vec![result(0, "0"), result(1, "1"), result(3, "3")])
        .unwrap();
    let out: Vec<String> = job.output().lines().map(String::from).collect();
    assert_eq!(out.len(), 4);
    assert!(
        out[2].contains("\"invalid_utf8\"") && out[2].contains("\"work_id\":2"),
        "{}",
        out[2]
    );
    assert_eq!(l.stats(t).invalid_lines, 1);
    assert!(l.is_complete());
}

#[test]
fn an_empty_input_is_complete_at_once() {
    let job = Job::new(b"", Some(3));
    let t = Instant::now();
    let l = job.open(t).unwrap();
    assert!(l.is_complete());
}

#[test]
fn a_checkpoint_names_the_state_when_begun_while_lines_are_written_before_commit() {
    let job = Job::new(&lines(6), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(6), t).unwrap();
    l.submit(vec![result(0, "0"), result(1, "1")]).unwrap();
    let pending = l.begin_checkpoint().unwrap();
    // Requests go on while the checkpoint's fsyncs run.
    l.submit(vec![result(2, "2"), result(3, "3")]).unwrap();
    pending.commit().unwrap();
    drop(l);
    let cp = Checkpoint::load(job.config.files.checkpoint())
        .unwrap()
        .unwrap();
    assert_eq!((cp.lines_written, cp.output_offset), (2, 4));
    let l = job.open(t).unwrap();
    assert_eq!(l.lines_written(), 4);
    assert_eq!(l.recovered_past_checkpoint(), 2);
    assert_eq!(job.output(), "0\n1\n2\n3\n");
}

#[test]
fn resume_skips_lines_written_after_the_checkpoint_and_redoes_a_torn_one() {
    let job = Job::new(&lines(5), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(5), t).unwrap();
    l.submit(vec![result(0, "0")]).unwrap();
    l.checkpoint().unwrap();
    l.submit(vec![result(1, "1"), result(2, "2")]).unwrap();
    drop(l);
    // A crash in the middle of writing line 3.
    let mut out = job.output();
    out.push_str("{\"tor");
    std::fs::write(job.config.files.output(), out).unwrap();

    let l = job.open(t).unwrap();
    assert_eq!(l.lines_written(), 3);
    assert_eq!(l.recovered_past_checkpoint(), 2);
    // Opening writes no checkpoint (a server takes one right after): the
    // one on disk still names line 0 only and still matches the files.
    drop(l);
    let mut l = job.open(t).unwrap();
    assert_eq!((l.lines_written(), l.recovered_past_checkpoint()), (3, 2));
    let r = l.take_work(Ask::batch(5), t).unwrap();
    assert_eq!(ids(&r), vec![3, 4]);
    assert_eq!(r.items()[0].content, "{\"i\":3}");
    l.submit(vec![result(4, "4"), result(3, "3")]).unwrap();
    assert_eq!(job.output(), "0\n1\n2\n3\n4\n");
}

#[test]
fn resume_refuses_a_truncated_output_a_foreign_output_and_a_different_input() {
    let job = Job::new(&lines(3), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(2), t).unwrap();
    l.submit(vec![result(0, "0"), result(1, "1")]).unwrap();
    l.checkpoint().unwrap();
    drop(l);

    std::fs::write(job.config.files.output(), "0\n").unwrap();
    let e = job.open(t).unwrap_err();
    assert!(matches!(e, ResumeError::OutputMismatch { .. }), "{e}");
    assert!(e.to_string().contains("out.jsonl"), "{e}");

    std::fs::write(job.config.files.output(), "0\n1\n").unwrap();
    std::fs::write(
        &job.config.infile,
        lines(3).into_iter().rev().collect::<Vec<u8>>(),
    )
    .unwrap();
    let e = job.open(t).unwrap_err();
    assert!(matches!(e, ResumeError::InputMismatch { .. }), "{e}");

    let mut other = job.config.clone();
    other.files = JobFiles::new(other.files.output(), Some(job.path("other.checkpoint")));
    let e = Ledger::open(other, t).unwrap_err();
    assert!(
        matches!(e, ResumeError::OutputWithoutCheckpoint { .. }),
        "{e}"
    );
}

#[test]
fn a_second_ledger_on_the_same_files_is_refused_while_the_first_lives() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    let first = job.open(t).unwrap();
    let e = job.open(t).unwrap_err();
    assert!(matches!(e, ResumeError::Locked { .. }), "{e}");
    assert!(e.to_string().contains("out.jsonl.checkpoint"), "{e}");
    drop(first);
    job.open(t).unwrap();
}

#[test]
fn resume_refuses_an_output_with_more_lines_than_the_input() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    drop(job.open(t).unwrap());
    std::fs::write(job.config.files.output(), "0\n1\n2\n").unwrap();
    let e = job.open(t).unwrap_err();
    assert!(
        matches!(
            e,
            ResumeError::OutputLongerThanInput {
                output_lines: 3,
                input_lines: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn changing_the_work_timeout_applies_to_items_in_flight() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(1), t).unwrap();
    l.set_work_timeout(Duration::from_secs(1));
    let r = l
        .take_work(Ask::batch(2), t + Duration::from_secs(1))
        .unwrap();
    assert_eq!(ids(&r), vec![0, 1]);
    assert_eq!(r.items()[0].retry_count, 1);
}

#[test]
fn the_timeout_heap_stays_proportional_to_what_is_in_flight() {
    let job = Job::new(&lines(20_000), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    for _ in 0..2_000 {
        let r = l.take_work(Ask::batch(10), t).unwrap();
        let done = r.items().iter().map(|i| result(i.work_id, "0")).collect();
        l.submit(done).unwrap();
    }
    let s = l.stats(t);
    assert_eq!(s.lines_written, 20_000);
    assert!(
        s.lease_entries <= 2 * s.in_flight + 1024 + 10,
        "heap_size {}",
        s.lease_entries
    );
}

#[test]
fn status_names_the_oldest_item_in_flight() {
    let job = Job::new(&lines(3), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(1), t).unwrap();
    l.take_work(Ask::batch(1), t + Duration::from_secs(2))
        .unwrap();
    let s = l.stats(t + Duration::from_secs(5));
    let oldest = s.oldest_in_flight.unwrap();
    assert_eq!((oldest.work_id, oldest.age_secs), (0, 5.0));
    assert_eq!((s.in_flight, s.next_work_id, s.lines_written), (2, 2, 0));
    assert_eq!(s.input_bytes_total, lines(3).len() as u64);
    assert_eq!(s.lines_total, None);
}

#[test]
fn heartbeats_keep_leases_and_silent_workers_lose_their_items() {
    let job = Job::new(&lines(2), Some(3));
    let mut t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(2), t).unwrap();
    // Item 0's worker heartbeats every third of the lease; item 1's is silent.
    for _ in 0..9 {
        t += TIMEOUT / 3;
        assert_eq!(l.heartbeat(&[0], None, t), (1, vec![]));
        l.tick(t).unwrap();
    }
    let s = l.stats(t);
    assert_eq!(
        (s.in_flight, s.queued_for_reissue, s.reissues.timeout),
        (1, 1, 1)
    );
    let r = l.take_work(Ask::batch(5), t).unwrap();
    assert_eq!(ids(&r), vec![1], "only the silent worker's item comes back");
    l.submit(vec![result(0, "0")]).unwrap();
    assert_eq!(
        l.heartbeat(&[0, 1, 9], None, t),
        (1, vec![0]),
        "0 is done: drop it"
    );
}

#[test]
fn a_worker_that_names_itself_keeps_every_item_it_holds_without_listing_them() {
    let mut job = Job::new(&lines(6), Some(3));
    job.config.max_backups = 1;
    job.config.backup_after = Duration::ZERO;
    let mut t = Instant::now();
    let mut l = job.open(t).unwrap();
    let (a, b, c) = (Some(1), Some(2), Some(3));
    assert_eq!(
        ids(&l.take_work(Ask::batch(3).by(a), t).unwrap()),
        vec![0, 1, 2]
    );
    assert_eq!(
        ids(&l.take_work(Ask::batch(3).by(b), t).unwrap()),
        vec![3, 4, 5]
    );
    // A heartbeat that lists nothing renews all of a's items; b is silent.
    for _ in 0..9 {
        t += TIMEOUT / 3;
        assert_eq!(l.heartbeat(&[], a, t), (0, vec![]));
        l.tick(t).unwrap();
    }
    let s = l.stats(t);
    assert_eq!(
        (s.in_flight, s.queued_for_reissue),
        (3, 3),
        "b's items expired"
    );
    assert_eq!(
        ids(&l.take_work(Ask::batch(5).by(c), t).unwrap()),
        vec![3, 4, 5]
    );
    // Once a stops heartbeating, its items expire a lease after its last one.
    t += TIMEOUT - Duration::from_millis(1);
    l.heartbeat(&[], c, t);
    l.tick(t).unwrap();
    assert_eq!(l.stats(t).queued_for_reissue, 0);
    t += Duration::from_millis(2);
    l.heartbeat(&[], c, t);
    l.tick(t).unwrap();
    assert_eq!(l.stats(t).queued_for_reissue, 3, "a's items expired");
    // c holds 3..6 and takes a's items too; an idle worker d gets a backup of
    // the oldest, and its heartbeats keep that item's lease when c is silent.
    let d = Some(4);
    assert_eq!(
        ids(&l.take_work(Ask::batch(5).by(c), t).unwrap()),
        vec![0, 1, 2]
    );
    l.submit(vec![result(0, "0"), result(1, "1"), result(2, "2")])
        .unwrap();
    l.submit(vec![result(4, "4"), result(5, "5")]).unwrap();
    assert_eq!(ids(&l.take_work(Ask::batch(5).by(d), t).unwrap()), vec![3]);
    for _ in 0..6 {
        t += TIMEOUT / 3;
        l.heartbeat(&[], d, t);
        l.tick(t).unwrap();
    }
    assert_eq!(l.stats(t).in_flight, 1, "the backup's worker kept line 3");
    // d's copy wins: c, the holder, learns at its next heartbeat.
    l.submit(vec![result(3, "3")]).unwrap();
    assert_eq!(l.heartbeat(&[], c, t), (0, vec![3]));
    assert_eq!(l.heartbeat(&[], c, t), (0, vec![]), "told once");
    assert!(l.is_complete());
}

#[test]
fn a_live_timeout_change_never_expires_a_heartbeated_item() {
    // The issue's case: --work-timeout 3, a heartbeat every second, then a
    // raise to 5 s after 7 s: the item's lease runs from its last heartbeat.
    let mut job = Job::new(&lines(1), Some(0));
    job.config.work_timeout = Duration::from_secs(3);
    let mut t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(1), t).unwrap();
    for _ in 0..7 {
        t += Duration::from_secs(1);
        assert_eq!(l.heartbeat(&[0], None, t).0, 1);
        l.tick(t).unwrap();
    }
    l.set_work_timeout(Duration::from_secs(5));
    l.tick(t).unwrap();
    t += Duration::from_millis(4900);
    l.tick(t).unwrap();
    let s = l.stats(t);
    assert_eq!((s.in_flight, s.reissues.timeout, s.tombstones), (1, 0, 0));
    // Silent from here: it expires 5 s after its last heartbeat.
    l.tick(t + Duration::from_millis(200)).unwrap();
    assert_eq!(l.stats(t).tombstones, 1);
}

mod timeout_changes {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Whatever sequence of timeout changes, an item whose worker
        /// heartbeats well within the timeout in force never expires, while a
        /// silent one beside it does once a timeout has passed.
        #[test]
        fn a_heartbeated_item_never_expires(
            steps in proptest::collection::vec((1u64..100, proptest::option::of(1u64..60)), 1..60),
        ) {
            let mut job = Job::new(&lines(2), Some(0));
            job.config.work_timeout = Duration::from_secs(30);
            let start = Instant::now();
            let mut t = start;
            let mut l = job.open(t).unwrap();
            l.take_work(Ask::batch(2), t).unwrap();
            let mut timeout = Duration::from_secs(30);
            for (gap_tenths, change) in steps {
                t += Duration::from_millis(gap_tenths * 100).min(timeout / 2);
                l.tick(t).unwrap();
                prop_assert_eq!(l.heartbeat(&[0], None, t).0, 1, "item 0 expired");
                if let Some(secs) = change {
                    timeout = Duration::from_secs(secs);
                    l.set_work_timeout(timeout);
                    l.tick(t).unwrap();
                    prop_assert_eq!(l.stats(t).in_flight + l.stats(t).tombstones, 2);
                }
            }
            l.tick(t).unwrap();
            let s = l.stats(t);
            prop_assert_eq!(s.reissues.timeout, 0, "nothing is requeued: --max-retries 0 tombstones");
            if t.duration_since(start) >= timeout.max(Duration::from_secs(30)) * 2 {
                prop_assert_eq!(s.tombstones, 1, "the silent item 1 expired");
            }
        }
    }
}

#[test]
fn a_retry_goes_to_another_worker_when_one_asks() {
    let job = Job::new(&lines(3), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let (a, b) = (Some(1), Some(2));
    assert_eq!(ids(&l.take_work(Ask::batch(1).by(a), t).unwrap()), vec![0]);
    // A's task asks for another attempt at line 0.
    assert_eq!(l.release(&[0], Cause::Retry, a).unwrap(), 1);
    // A asks again: it gets a new line, not its own retry.
    assert_eq!(ids(&l.take_work(Ask::batch(1).by(a), t).unwrap()), vec![1]);
    // B gets the retry.
    let r = l.take_work(Ask::batch(1).by(b), t).unwrap();
    assert_eq!((ids(&r), r.items()[0].retry_count), (vec![0], 1));
    // Alone, a worker gets its own retry back rather than nothing.
    assert_eq!(l.release(&[0], Cause::Retry, b).unwrap(), 1);
    assert_eq!(ids(&l.take_work(Ask::batch(5).by(b), t).unwrap()), vec![2]);
    assert_eq!(ids(&l.take_work(Ask::batch(5).by(b), t).unwrap()), vec![0]);
}

#[test]
fn a_stale_workers_release_does_not_take_the_item_from_its_new_holder() {
    let mut job = Job::new(&lines(1), Some(1));
    job.config.work_timeout = TIMEOUT;
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let (a, b) = (Some(1), Some(2));
    l.take_work(Ask::batch(1).by(a), t).unwrap();
    // A's lease runs out; B gets the item.
    let t = t + TIMEOUT;
    assert_eq!(ids(&l.take_work(Ask::batch(1).by(b), t).unwrap()), vec![0]);
    // A, back from a stall, releases what it thinks it holds: ignored.
    assert_eq!(l.release(&[0], Cause::Release, a).unwrap(), 0);
    assert_eq!(l.release(&[0], Cause::Retry, a).unwrap(), 0);
    let s = l.stats(t);
    assert_eq!((s.in_flight, s.queued_for_reissue, s.tombstones), (1, 0, 0));
    // B's own release, and a release that names nobody (an old worker), count.
    assert_eq!(l.release(&[0], Cause::Release, b).unwrap(), 1);
    l.take_work(Ask::batch(1).by(b), t).unwrap();
    assert_eq!(l.release(&[0], Cause::Release, None).unwrap(), 1);
}

#[test]
fn appending_to_an_input_whose_last_line_had_no_newline_resumes_exactly() {
    let job = Job::new(b"{\"i\":0}\n{\"i\":1}\n{\"i\":2}", Some(3));
    let t = Instant::now();
    {
        let mut l = job.open(t).unwrap();
        answer(&mut l, 5, t);
        assert!(l.is_complete());
        l.checkpoint().unwrap();
    }
    // The user appends two lines, starting with the newline line 2 lacked.
    let mut input = std::fs::read(&job.config.infile).unwrap();
    input.extend_from_slice(b"\n{\"i\":3}\n{\"i\":4}\n");
    std::fs::write(&job.config.infile, &input).unwrap();
    let mut l = job.open(t).unwrap();
    let r = answer(&mut l, 5, t);
    assert_eq!(ids(&r), vec![3, 4], "no phantom line between 2 and 3");
    assert_eq!(r.items()[0].content, "{\"i\":3}");
    let out: Vec<String> = job.output().lines().map(String::from).collect();
    assert_eq!(out.len(), 5);
    assert_eq!(out[3], "{\"i\":3}");
    drop(l);

    // Appending to that last line itself is refused.
    let job = Job::new(b"{\"i\":0}\n\"last\"", Some(3));
    {
        let mut l = job.open(t).unwrap();
        answer(&mut l, 5, t);
        l.checkpoint().unwrap();
    }
    let mut input = std::fs::read(&job.config.infile).unwrap();
    input.extend_from_slice(b"more\n");
    std::fs::write(&job.config.infile, &input).unwrap();
    let e = job.open(t).unwrap_err();
    assert!(matches!(e, ResumeError::InputMismatch { .. }), "{e}");
    assert!(e.to_string().contains("had no newline"), "{e}");
}

#[test]
fn lines_recovered_past_the_checkpoint_are_cut_at_the_first_that_is_not_json() {
    let job = Job::new(&lines(8), Some(3));
    let t = Instant::now();
    {
        let mut l = job.open(t).unwrap();
        answer(&mut l, 2, t);
        l.checkpoint().unwrap();
        answer(&mut l, 4, t);
    }
    // A power loss: line 4's page was never written (NULs), so were the rest.
    let mut out = std::fs::read(job.config.files.output()).unwrap();
    let breaks: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let line4 = breaks[3] + 1;
    out[line4..].iter_mut().for_each(|b| {
        if *b != b'\n' {
            *b = 0
        }
    });
    std::fs::write(job.config.files.output(), &out).unwrap();
    let mut l = job.open(t).unwrap();
    assert_eq!(
        l.lines_written(),
        4,
        "lines 2 and 3 recovered, 4 and 5 redone"
    );
    assert_eq!(job.output(), "{\"i\":0}\n{\"i\":1}\n{\"i\":2}\n{\"i\":3}\n");
    let r = l.take_work(Ask::batch(10), t).unwrap();
    assert_eq!(ids(&r), vec![4, 5, 6, 7]);
    l.submit(
        r.items()
            .iter()
            .map(|i| result(i.work_id, &i.content))
            .collect(),
    )
    .unwrap();
    assert_eq!(job.output().as_bytes(), &lines(8)[..]);
}

#[test]
fn an_input_changed_during_the_run_stops_the_job_before_anything_wrong_is_handed_out() {
    // Truncated, rewritten in place, replaced by another file.
    for change in 0..3 {
        let job = Job::new(&lines(40), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(Ask::batch(10), t).unwrap();
        let path = &job.config.infile;
        match change {
            0 => std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(20)
                .unwrap(),
            1 => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.write_all_at(b"{\"x\":9}\n", 0).unwrap();
                // Make sure the modification time moves even on a coarse clock.
                f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                    .unwrap();
            }
            _ => {
                let other = job.path("other.jsonl");
                std::fs::write(&other, lines(40)).unwrap();
                std::fs::rename(&other, path).unwrap();
            }
        }
        let e = l
            .take_work(Ask::batch(10), t + Duration::from_secs(2))
            .unwrap_err();
        assert!(
            e.to_string().contains(&path.display().to_string()),
            "{change}: {e}"
        );
        assert_eq!(job.output(), "", "{change}: nothing was written");
    }
    // A reissue reads its line back and finds it no longer ends where it did.
    let job = Job::new(&lines(4), Some(3));
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(2), t).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&job.config.infile)
            .unwrap();
        f.write_all_at(b"{\"i\":0,\"", 0).unwrap();
    }
    l.release(&[0], Cause::Release, None).unwrap();
    let e = l.take_work(Ask::batch(1), t).unwrap_err();
    assert!(
        e.to_string().contains("changed since it was first read"),
        "{e}"
    );
}

#[test]
fn two_of_the_jobs_files_that_are_one_file_are_refused_and_the_output_itself_is_locked() {
    let job = Job::new(&lines(2), Some(3));
    let t = Instant::now();
    // --checkpoint equal to --outfile, and to --infile.
    let mut same = job.config.clone();
    same.files = JobFiles::new(same.files.output(), Some(same.files.output().to_owned()));
    let e = Ledger::open(same, t).unwrap_err();
    assert!(matches!(e, ResumeError::SameFile { .. }), "{e}");
    assert!(e.to_string().contains("--outfile and --checkpoint"), "{e}");
    let mut same = job.config.clone();
    same.files = JobFiles::new(
        same.infile.clone(),
        Some(same.files.checkpoint().to_owned()),
    );
    assert!(matches!(
        Ledger::open(same, t).unwrap_err(),
        ResumeError::SameFile { .. }
    ));
    // A hard link to the input as the output.
    let link = job.path("link.jsonl");
    std::fs::hard_link(&job.config.infile, &link).unwrap();
    let mut same = job.config.clone();
    same.files = JobFiles::new(link, Some(same.files.checkpoint().to_owned()));
    assert!(matches!(
        Ledger::open(same, t).unwrap_err(),
        ResumeError::SameFile { .. }
    ));

    // A second server on the same output through a symlink, with its own
    // checkpoint, while the first runs.
    let _first = job.open(t).unwrap();
    let symlink = job.path("alias.jsonl");
    std::os::unix::fs::symlink(job.config.files.output(), &symlink).unwrap();
    let mut second = job.config.clone();
    second.files = JobFiles::new(symlink, Some(job.path("other.checkpoint")));
    let e = Ledger::open(second, t).unwrap_err();
    assert!(matches!(e, ResumeError::Locked { .. }), "{e}");
}

#[test]
fn checkpoint_counts_that_disagree_with_the_files_are_refused() {
    let job = Job::new(&lines(20), Some(3));
    let t = Instant::now();
    {
        let mut l = job.open(t).unwrap();
        answer(&mut l, 10, t);
        l.checkpoint().unwrap();
    }
    let good = std::fs::read_to_string(job.config.files.checkpoint()).unwrap();
    for bad in ["3", "17", "18446744073709551615"] {
        let edited = good.replace(
            "\"lines_written\": 10",
            &format!("\"lines_written\": {bad}"),
        );
        assert_ne!(edited, good);
        std::fs::write(job.config.files.checkpoint(), edited).unwrap();
        let e = job.open(t).unwrap_err();
        assert!(
            matches!(e, ResumeError::OutputMismatch { .. }),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains("lines"), "{e}");
    }
    std::fs::write(job.config.files.checkpoint(), good).unwrap();
    assert_eq!(job.open(t).unwrap().lines_written(), 10);
}

#[test]
fn preemptions_draw_on_their_own_budget_and_the_tombstone_has_the_history() {
    let mut job = Job::new(&lines(2), Some(1));
    job.config.max_releases = Some(DEFAULT_MAX_RELEASES);
    let mut t = Instant::now();
    let mut l = job.open(t).unwrap();
    // Forty preemptions of both items: far over --max-retries 1, no tombstone.
    for _ in 0..40 {
        let r = l.take_work(Ask::batch(2), t).unwrap();
        assert_eq!(r.items().len(), 2);
        assert!(r.items().iter().all(|i| i.retry_count == 0));
        assert_eq!(l.release(&[0, 1], Cause::Release, None).unwrap(), 2);
    }
    assert_eq!(l.stats(t).tombstones, 0);
    // Item 0 then fails twice (an expiry, a task retry): over --max-retries 1.
    l.take_work(Ask::batch(2), t).unwrap();
    l.submit(vec![result(1, "1")]).unwrap();
    t += TIMEOUT;
    let r = l.take_work(Ask::batch(1), t).unwrap();
    assert_eq!(r.items()[0].retry_count, 1);
    l.release(&[0], Cause::Retry, None).unwrap();
    let out: Vec<serde_json::Value> = job
        .output()
        .lines()
        .map(|x| serde_json::from_str(x).unwrap())
        .collect();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["__ERROR__"]["error"], "max_retries_exceeded");
    assert_eq!(
        out[0]["__ERROR__"]["reissues"],
        serde_json::json!({"timeout": 1, "release": 40, "retry": 1})
    );

    // A poison item that kills every worker is still given up, by releases.
    let mut job = Job::new(&lines(1), Some(1));
    job.config.max_releases = Some(3);
    let mut l = job.open(t).unwrap();
    for _ in 0..4 {
        l.take_work(Ask::batch(1), t).unwrap();
        l.release(&[0], Cause::Release, None).unwrap();
    }
    assert!(job.output().contains("max_releases_exceeded"));
}

#[test]
fn a_stuck_line_spills_later_results_and_memory_stays_under_the_cap() {
    const LATER: u64 = 1_000_000;
    const CAP: u64 = 1 << 20;
    let input: Vec<u8> = (0..=LATER)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let mut job = Job::new(&input, Some(3));
    job.config.max_pending_bytes = CAP;
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    // Line 0 goes to a worker that never answers.
    assert_eq!(ids(&l.take_work(Ask::batch(1), t).unwrap()), vec![0]);
    let mut peak = 0;
    loop {
        let r = l.take_work(Ask::batch(10_000), t).unwrap();
        if r.items().is_empty() {
            break;
        }
        let done = r
            .items()
            .iter()
            .map(|i| ResultLine {
                work_id: i.work_id,
                line: format!("\"result {}\"", i.content),
            })
            .collect();
        l.complete(done).unwrap();
        let s = l.stats(t);
        peak = peak.max(s.reorder_bytes);
        assert!(
            s.reorder_bytes <= CAP,
            "{} bytes in memory",
            s.reorder_bytes
        );
    }
    let s = l.stats(t);
    assert_eq!((s.lines_written, s.reorder_lines), (0, LATER));
    assert!(
        s.reorder_spilled > LATER / 2,
        "most results went to disk: {s:?}"
    );
    let blocking = s.blocking.expect("line 0 blocks the rest");
    assert_eq!(
        (
            blocking.work_id,
            blocking.state.as_str(),
            blocking.waiting_lines
        ),
        (0, "in_flight", LATER)
    );
    assert!(peak > CAP / 2, "the memory was used up to the cap first");
    assert!(job.config.files.pending().metadata().unwrap().len() > 0);
    // The stuck line finally comes back: everything is written, in order.
    l.submit(vec![result(0, "\"result 0\"")]).unwrap();
    assert!(l.is_complete());
    let out = job.output();
    let mut n = 0;
    for (i, line) in out.lines().enumerate() {
        assert_eq!(line, format!("\"result {i}\""));
        n += 1;
    }
    assert_eq!(n, LATER + 1);
    assert_eq!(
        job.config.files.pending().metadata().unwrap().len(),
        0,
        "the spill file is emptied"
    );
}

#[test]
fn idle_workers_get_backups_of_stragglers_and_the_first_result_wins() {
    let mut job = Job::new(&lines(3), Some(3));
    job.config.max_backups = 2;
    job.config.backup_after = Duration::from_secs(5);
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let (a, b) = (Some(1), Some(2));
    assert_eq!(
        ids(&l.take_work(Ask::batch(2).by(a), t).unwrap()),
        vec![0, 1]
    );
    assert_eq!(
        ids(&l.take_work(Ask::batch(5).by(b), t).unwrap()),
        vec![2],
        "no backups beside new lines"
    );
    let later = t + Duration::from_secs(1);
    assert!(
        matches!(
            l.take_work(Ask::batch(5).by(b), later).unwrap(),
            WorkReply::Retry { .. }
        ),
        "too young for a backup"
    );
    let later = t + Duration::from_secs(6);
    assert_eq!(
        ids(&l.take_work(Ask::batch(5).by(a), later).unwrap()),
        vec![2],
        "never one's own items"
    );
    assert_eq!(
        ids(&l.take_work(Ask::batch(5).by(b), later).unwrap()),
        vec![0],
        "the oldest straggler"
    );
    assert!(
        matches!(
            l.take_work(Ask::batch(5), later).unwrap(),
            WorkReply::Retry { .. }
        ),
        "two backups at most"
    );
    l.submit(vec![result(2, "2"), result(0, "\"from B\"")])
        .unwrap();
    let r = l
        .submit(vec![result(0, "\"from A\""), result(1, "1")])
        .unwrap();
    assert_eq!((r.accepted, r.already_done.clone()), (1, vec![0]));
    assert_eq!(job.output(), "\"from B\"\n1\n2\n");
    assert_eq!(l.stats(t).backups_issued, 2);
}

#[test]
fn a_restart_while_results_are_spilled_resumes_exactly() {
    let mut job = Job::new(&lines(50), Some(3));
    job.config.max_pending_bytes = 10;
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    l.take_work(Ask::batch(50), t).unwrap();
    l.submit((1..50).map(|i| result(i, &i.to_string())).collect())
        .unwrap();
    assert!(l.stats(t).reorder_spilled >= 40);
    drop(l); // a crash: line 0 was never answered
    let mut l = job.open(t).unwrap();
    assert_eq!(l.lines_written(), 0);
    let r = l.take_work(Ask::batch(100), t).unwrap();
    assert_eq!(r.items().len(), 50, "unwritten lines are redone");
    l.submit(
        r.items()
            .iter()
            .map(|i| result(i.work_id, &i.work_id.to_string()))
            .collect(),
    )
    .unwrap();
    let expected: String = (0..50).map(|i| format!("{i}\n")).collect();
    assert_eq!(job.output(), expected);
}

mod interleavings {
    //! Random interleavings of issue, complete, duplicate, release, timeout,
    //! crash and restart always end in an output whose line i is the result
    //! for line i or its tombstone.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Take(usize),
        Complete(usize),
        Duplicate(usize),
        Release(usize),
        Expire,
        Heartbeat,
        /// Takes a checkpoint's state; it is written by a later `Commit`
        /// (or lost in a crash), as a server does beside its requests.
        Checkpoint,
        Commit,
        Crash {
            torn: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..5).prop_map(Op::Take),
            4 => any::<usize>().prop_map(Op::Complete),
            1 => any::<usize>().prop_map(Op::Duplicate),
            1 => any::<usize>().prop_map(Op::Release),
            1 => Just(Op::Expire),
            1 => Just(Op::Heartbeat),
            1 => Just(Op::Checkpoint),
            1 => Just(Op::Commit),
            1 => any::<bool>().prop_map(|torn| Op::Crash { torn }),
        ]
    }

    /// The result a worker computes for a line: its content as a JSON string.
    fn answer(item: &WorkItem) -> WorkItem {
        let mut done = item.clone();
        done.result = Some(serde_json::to_string(&item.content).unwrap());
        done
    }

    fn check_output(job: &Job, n: u64) {
        let out = job.output();
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(got.len() as u64, n, "one output line per input line");
        for (i, line) in got.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let expected = format!("{{\"i\":{i}}}");
            match v {
                serde_json::Value::String(s) => assert_eq!(s, expected, "line {i}"),
                other => {
                    assert_eq!(other["__ERROR__"]["work_id"], i as u64, "line {i}");
                    assert_eq!(other["__ERROR__"]["original_content"], expected);
                }
            }
        }
    }

    /// Budgets and limits drawn at random with the operations.
    #[derive(Debug, Clone)]
    struct Limits {
        max_retries: Option<u32>,
        max_releases: Option<u32>,
        /// Tiny caps make the reorder buffer spill constantly.
        max_pending_bytes: u64,
        max_backups: u32,
        /// Grouping: the lookahead, and lines keyed by `i % modulus`.
        grouping: Option<(usize, u64)>,
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (
            prop_oneof![Just(None), (0u32..3).prop_map(Some)],
            prop_oneof![Just(None), (0u32..3).prop_map(Some)],
            prop_oneof![Just(u64::MAX), 0u64..40],
            0u32..3,
            prop_oneof![Just(None), (1usize..8, 1u64..4).prop_map(Some)],
        )
            .prop_map(
                |(max_retries, max_releases, max_pending_bytes, max_backups, grouping)| Limits {
                    max_retries,
                    max_releases,
                    max_pending_bytes,
                    max_backups,
                    grouping,
                },
            )
    }

    fn run(n: u64, limits: Limits, ops: Vec<Op>) {
        let mut job = Job::new(&lines(n), limits.max_retries);
        job.config.max_releases = limits.max_releases;
        job.config.max_pending_bytes = limits.max_pending_bytes;
        job.config.max_backups = limits.max_backups;
        job.config.backup_after = Duration::ZERO;
        if let Some((lookahead, modulus)) = limits.grouping {
            job.config.grouping = Some(Grouping {
                key: std::sync::Arc::new(move |line: &str| {
                    let v: serde_json::Value = serde_json::from_str(line).ok()?;
                    Some(v["i"].as_u64()? % modulus)
                }),
                lookahead,
            });
        }
        let mut t = Instant::now();
        let mut l = job.open(t).unwrap();
        // Items held by workers, which outlive server restarts.
        let mut held: Vec<WorkItem> = Vec::new();
        let mut sent: Vec<WorkItem> = Vec::new();
        let mut pending: Option<PendingCheckpoint> = None;
        for op in ops {
            match op {
                // Three workers that name themselves, and anonymous ones.
                Op::Take(b) => held.extend(
                    l.take_work(Ask::batch(b).by((b % 4 != 0).then_some(b as u64 % 4)), t)
                        .unwrap()
                        .into_items()
                        .into_iter()
                        .map(wire),
                ),
                Op::Complete(k) if !held.is_empty() => {
                    let item = held.swap_remove(k % held.len());
                    l.submit(vec![answer(&item)]).unwrap();
                    sent.push(item);
                }
                Op::Duplicate(k) if !sent.is_empty() => {
                    let r = l.submit(vec![answer(&sent[k % sent.len()])]).unwrap();
                    assert_eq!(r.accepted + r.ignored, 1);
                }
                Op::Release(k) if !held.is_empty() => {
                    let item = held.swap_remove(k % held.len());
                    let cause = if k % 2 == 0 {
                        Cause::Release
                    } else {
                        Cause::Retry
                    };
                    l.release(&[item.work_id], cause, None).unwrap();
                }
                Op::Heartbeat => {
                    let ids: Vec<u64> = held.iter().map(|i| i.work_id).collect();
                    l.heartbeat(&ids, None, t);
                }
                Op::Expire => {
                    t += TIMEOUT;
                    l.tick(t).unwrap();
                }
                Op::Checkpoint => {
                    // One at a time, in order, as the server commits them.
                    if let Some(p) = pending.take() {
                        p.commit().unwrap();
                    }
                    pending = Some(l.begin_checkpoint().unwrap());
                }
                Op::Commit => {
                    if let Some(p) = pending.take() {
                        p.commit().unwrap();
                    }
                }
                Op::Crash { torn } => {
                    // A checkpoint not committed yet dies with the process.
                    pending = None;
                    drop(l);
                    if torn {
                        let mut f = std::fs::OpenOptions::new()
                            .append(true)
                            .open(job.config.files.output())
                            .unwrap();
                        std::io::Write::write_all(&mut f, b"\"{\\\"i\\\":").unwrap();
                    }
                    l = job.open(t).unwrap();
                }
                _ => {}
            }
            if let Some(groups) = &l.groups {
                groups.check();
            }
        }
        // Drain: stale holders finish first, then fresh workers take the rest.
        let stale: Vec<WorkItem> = held.iter().map(answer).collect();
        l.submit(stale).unwrap();
        for _ in 0..(n * 10 + 10) {
            if l.is_complete() {
                break;
            }
            let r = l.take_work(Ask::batch(7), t).unwrap();
            match r {
                WorkReply::Issued(items) => {
                    let done = items.into_iter().map(|i| answer(&wire(i))).collect();
                    l.submit(done).unwrap();
                }
                _ => {
                    t += TIMEOUT;
                    l.tick(t).unwrap();
                }
            }
        }
        assert!(l.is_complete(), "the job must finish");
        check_output(&job, n);
        // And a restart of a finished job changes nothing.
        drop(l);
        let l = job.open(t).unwrap();
        assert!(l.is_complete());
        check_output(&job, n);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn output_line_i_is_always_the_result_or_tombstone_of_line_i(
            n in 0u64..25,
            limits in limits(),
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            run(n, limits, ops);
        }
    }

    #[test]
    fn job_path_helper_is_inside_the_temp_dir() {
        let job = Job::new(b"", None);
        assert!(job.path("x").starts_with(job.dir.path()));
        assert!(Path::new(&job.config.infile).exists());
    }
}

/// A redo of `job` from the previous output `previous` of its whole input
/// (written to `old.jsonl`, with the checkpoint of a finished job), into the
/// job's output.
fn redo(job: &mut Job, previous: &str, kinds: Option<Vec<String>>) {
    let old = crate::job::JobFiles::new(job.path("old.jsonl"), None);
    std::fs::write(old.output(), previous).unwrap();
    let input_len = std::fs::metadata(&job.config.infile).unwrap().len();
    crate::job::checkpoint::Checkpoint::capture(
        "old-job",
        &job.config.infile,
        old.output(),
        previous.lines().count() as u64,
        input_len,
        previous.len() as u64,
    )
    .unwrap()
    .save(old.checkpoint())
    .unwrap();
    job.config.redo = Some(RedoConfig {
        previous: old,
        kinds,
    });
}

#[test]
fn a_redo_keeps_good_lines_without_any_worker_and_hands_out_only_the_failed_ones() {
    let mut job = Job::new(&lines(300_000), Some(3));
    let mut previous = String::new();
    for i in 0..300_000 {
        if i == 250_000 {
            previous.push_str("{\"__ERROR__\": {\"error\": \"request_rejected\"}}\n");
        } else {
            previous.push_str(&format!("{{\"kept\": {i}}}\n"));
        }
    }
    redo(&mut job, &previous, None);
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    // A work request reads past at most KEEP_PER_REQUEST kept lines and says
    // to ask again at once.
    let r = l.take_work(Ask::batch(4), t).unwrap();
    assert_eq!(
        r,
        WorkReply::Retry {
            after_secs: 1,
            drained: false
        }
    );
    assert_eq!(l.lines_written(), KEEP_PER_REQUEST);
    // The ticker reads past the rest up to the failed line, with no worker asking.
    l.tick(t).unwrap();
    assert_eq!(l.lines_written(), 250_000);
    let r = l.take_work(Ask::batch(4), t).unwrap();
    assert_eq!(ids(&r), vec![250_000]);
    let mut done = wire(r.items()[0].clone());
    done.result = Some("\"redone\"".into());
    l.submit(vec![done]).unwrap();
    l.tick(t).unwrap();
    assert!(l.is_complete());
    assert_eq!(l.stats(t).kept_lines, 299_999);
    let out = job.output();
    let expected = previous.replace(
        "{\"__ERROR__\": {\"error\": \"request_rejected\"}}",
        "\"redone\"",
    );
    assert!(
        out == expected,
        "the output is the previous one with the failed line redone"
    );
}

/// Grouping on `{"g": ..}` of each line, with a lookahead of `lookahead`.
fn grouped(job: &mut Job, lookahead: usize) {
    job.config.grouping = Some(Grouping {
        key: std::sync::Arc::new(|line: &str| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            v.get("g")?.as_u64()
        }),
        lookahead,
    });
}

fn group_lines(keys: &[u64]) -> Vec<u8> {
    keys.iter()
        .enumerate()
        .map(|(i, g)| format!("{{\"i\":{i},\"g\":{g}}}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Answers every item of `r` with its content.
fn answer_all(l: &mut Ledger, r: &WorkReply) {
    let done = r
        .items()
        .iter()
        .map(|i| result(i.work_id, &i.content))
        .collect();
    l.submit(done).unwrap();
}

#[test]
fn grouped_lines_stick_to_the_worker_that_opened_their_key_and_the_output_stays_in_order() {
    let keys = [1, 2, 1, 2, 3, 1, 2, 3];
    let mut job = Job::new(&group_lines(&keys), Some(3));
    grouped(&mut job, 64);
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let (a, b) = (Some(1), Some(2));
    // A opens key 1 (lines 0, 2, 5 together), B key 2.
    let ra = l.take_work(Ask::batch(3).by(a), t).unwrap();
    assert_eq!(ids(&ra), vec![0, 2, 5]);
    let rb = l.take_work(Ask::batch(3).by(b), t).unwrap();
    assert_eq!(ids(&rb), vec![1, 3, 6]);
    // Read ahead but not issued: line 4 takes no result.
    let s = l.submit(vec![result(4, "4")]).unwrap();
    assert_eq!((s.accepted, s.never_issued.clone()), (0, vec![4]));
    let stats = l.stats(t).groups.unwrap();
    assert_eq!((stats.waiting, stats.issued), (2, 6));
    // Not drained while read-ahead lines wait.
    answer_all(&mut l, &rb);
    let r = l.take_work(Ask::batch(8).by(b), t).unwrap();
    assert_eq!(ids(&r), vec![4, 7], "B opens key 3");
    answer_all(&mut l, &r);
    let r = l.take_work(Ask::batch(8).by(b), t).unwrap();
    assert!(
        matches!(r, WorkReply::Retry { drained: true, .. }),
        "all out: {r:?}"
    );
    answer_all(&mut l, &ra);
    assert!(l.is_complete());
    let expected: String = String::from_utf8(group_lines(&keys)).unwrap();
    assert_eq!(job.output(), expected, "every line, in input order");
}

#[test]
fn a_silent_workers_keys_move_and_the_lookahead_bounds_what_is_read() {
    let keys: Vec<u64> = (0..40).map(|i| i % 2).collect();
    let mut job = Job::new(&group_lines(&keys), Some(3));
    grouped(&mut job, 10);
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    // Ten lines read ahead: A opens key 0 (its five), B key 1.
    let ra = l.take_work(Ask::batch(2).by(Some(1)), t).unwrap();
    assert_eq!(ids(&ra), vec![0, 2]);
    assert_eq!(
        l.stats(t).next_work_id,
        10,
        "no more than the lookahead is read"
    );
    let rb = l.take_work(Ask::batch(2).by(Some(2)), t).unwrap();
    assert_eq!(ids(&rb), vec![1, 3]);
    // A goes silent past the work timeout (its items expire and come back
    // as reissues); B, asking since, gets them and then A's key.
    let later = t + TIMEOUT + Duration::from_secs(1);
    answer_all(&mut l, &rb);
    l.heartbeat(&[], Some(2), t + TIMEOUT / 2);
    l.tick(later).unwrap();
    let r = l.take_work(Ask::batch(4).by(Some(2)), later).unwrap();
    assert_eq!(
        ids(&r),
        vec![0, 2, 5, 7],
        "A's expired lines first, then its own key 1"
    );
    answer_all(&mut l, &r);
    // B alone finishes the job: key 0 is no longer A's, so B gets it too
    // (its own key 1 first each time).
    let mut got = Vec::new();
    while !l.is_complete() {
        let r = l.take_work(Ask::batch(6).by(Some(2)), later).unwrap();
        assert!(!r.items().is_empty(), "B is never left waiting: {r:?}");
        got.extend(ids(&r));
        answer_all(&mut l, &r);
    }
    assert!(got.contains(&4), "A's key moved to B: {got:?}");
    assert_eq!(
        l.stats(later).groups.unwrap().spread,
        0,
        "moved, not shared out of a live worker's group"
    );
    assert_eq!(job.output(), String::from_utf8(group_lines(&keys)).unwrap());
}

/// A key's owner that is busy for long (alive, asking for nothing) holds
/// back its key's next line while another worker works through the rest:
/// the results held behind that line stay within about the lookahead, and
/// the line goes to the worker that asks once they pile up.
#[test]
fn a_busy_owner_does_not_hold_the_output_back_past_the_lookahead() {
    // Key 0 on line 0 and line 20; every other line a key of its own.
    let keys: Vec<u64> = (0..2_000)
        .map(|i| if i == 0 || i == 20 { 0 } else { i + 1 })
        .collect();
    let mut job = Job::new(&group_lines(&keys), Some(3));
    grouped(&mut job, 100);
    let t = Instant::now();
    let mut l = job.open(t).unwrap();
    let (busy, other) = (Some(1), Some(2));
    let r = l.take_work(Ask::batch(1).by(busy), t).unwrap();
    assert_eq!(ids(&r), vec![0], "the busy worker opens key 0");
    answer_all(&mut l, &r);
    let mut most_held = 0;
    let mut rounds = 0;
    while !l.is_complete() {
        // The owner is alive (heartbeats) but asks for no work.
        l.heartbeat(&[], busy, t);
        let r = l.take_work(Ask::batch(8).by(other), t).unwrap();
        answer_all(&mut l, &r);
        let stats = l.stats(t);
        most_held = most_held.max(stats.next_work_id - stats.lines_written);
        rounds += 1;
        assert!(rounds < 10_000, "no progress: {r:?}");
    }
    assert!(
        most_held <= 2 * 100 + 8,
        "{most_held} lines held behind line 20"
    );
    assert_eq!(job.output(), String::from_utf8(group_lines(&keys)).unwrap());
}
