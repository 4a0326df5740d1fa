//! The real server on 127.0.0.1:0 with many concurrent simulated workers that
//! drop, release and duplicate items: the output must come out exactly right.

use std::time::Duration;

use dispatcher::client::DispatcherClient;
use dispatcher::ledger::LedgerConfig;
use dispatcher::protocol::{WorkItem, WorkStatus};
use dispatcher::server::{self, ServeOptions, StopReason};

/// A tiny deterministic generator, so each worker misbehaves reproducibly.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn answer(item: &WorkItem) -> WorkItem {
    let mut done = item.clone();
    done.result = Some(serde_json::json!({"id": item.work_id, "echo": item.content}).to_string());
    done
}

/// One worker: takes batches and, per item, answers (sometimes twice), releases,
/// or silently drops it (as a crashed worker would).
async fn worker(client: DispatcherClient, seed: u64) -> u64 {
    let mut rng = Lcg(seed);
    let mut answered = 0;
    loop {
        let batch = 1 + rng.next(8) as usize;
        let work = match client.get_work(batch).await {
            Ok(work) => work,
            // The server exited after the last result.
            Err(e) if e.is_unavailable() => return answered,
            Err(e) => panic!("work request failed: {e}"),
        };
        match work.status {
            WorkStatus::Ok => {}
            WorkStatus::Retry => {
                // Honour retry_in, but the test's timeout is short anyway.
                let wait = work.retry_in.unwrap_or(1).min(1);
                tokio::time::sleep(Duration::from_millis(wait * 200)).await;
                continue;
            }
            WorkStatus::AllWorkComplete => return answered,
        }
        let mut results = Vec::new();
        let mut release = Vec::new();
        for item in &work.items {
            match rng.next(20) {
                0 => {}
                1 => release.push(item.work_id),
                2 => {
                    results.push(answer(item));
                    results.push(answer(item));
                }
                _ => results.push(answer(item)),
            }
        }
        if !release.is_empty() {
            client.release(release).await.unwrap();
        }
        if !results.is_empty() {
            answered += client.submit(results).await.unwrap().count;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misbehaving_workers_produce_exactly_one_line_per_input_in_order() {
    const LINES: usize = 2_000;
    const WORKERS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let infile = dir.path().join("in.jsonl");
    let input: Vec<String> = (0..LINES)
        .map(|i| format!("{{\"prompt\": \"p{i}\"}}"))
        .collect();
    std::fs::write(&infile, input.join("\n") + "\n").unwrap();
    let outfile = dir.path().join("out.jsonl");
    let config = LedgerConfig {
        work_timeout: Duration::from_millis(300),
        max_retries: None,
        retry_secs: 1,
        ..LedgerConfig::new(
            infile,
            dispatcher::job::JobFiles::new(
                outfile.clone(),
                Some(dir.path().join("out.jsonl.checkpoint")),
            ),
        )
    };
    let options = ServeOptions {
        checkpoint_interval: Duration::from_millis(100),
        exit_grace: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let listener = server::bind("127.0.0.1", 0).await.unwrap();
    let addr = server::local_addr(&listener).unwrap();
    let served = tokio::spawn(server::serve(
        listener,
        config,
        options,
        std::future::pending(),
    ));

    let client = DispatcherClient::new(&addr.to_string());
    let workers: Vec<_> = (0..WORKERS)
        .map(|seed| tokio::spawn(worker(client.clone(), seed + 1)))
        .collect();
    let mut accepted = 0;
    for w in workers {
        accepted += w.await.unwrap();
    }
    assert_eq!(accepted, LINES as u64, "each line accepted exactly once");
    let reason = tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the server exits by itself once all work is complete")
        .unwrap()
        .unwrap();
    assert_eq!(reason, StopReason::Complete);

    let lines = crate::support::jsonl(&outfile);
    assert_eq!(lines.len(), LINES);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["id"], i, "line {i}");
        assert_eq!(v["echo"], input[i], "line {i}");
    }
    // After the server exits, workers see it as unavailable.
    let late = client.get_work(1).await.unwrap_err();
    assert!(late.is_unavailable(), "{late}");
}
