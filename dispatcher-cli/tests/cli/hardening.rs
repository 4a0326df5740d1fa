//! The server at cluster scale, tried as a thousand workers and a flaky
//! network would: connections cut off halfway, idle connections by the
//! hundred under a low open-file limit, live timeout changes, stale workers,
//! SIGKILL restarts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_core::client::DispatcherClient;
use dispatcher_core::protocol::WorkStatus;

use super::{answer, AnswerBatch, Job, Server, BIN};

/// A connection that sent `bytes` and then nothing more, like a worker node
/// that died mid-request.
fn cut_off(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// A keep-alive connection that made one whole request and then idles.
fn idle_after_one_request(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream
}

/// The ways a request is cut off halfway.
fn half_sent_requests(addr: &str) -> Vec<TcpStream> {
    vec![
        cut_off(addr, b"G"),
        cut_off(addr, b"GET /status HTTP/1.1\r\nHost: test\r\n"),
        cut_off(
            addr,
            b"POST /results HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n{\"items\": [",
        ),
        idle_after_one_request(addr),
    ]
}

#[test]
fn half_sent_requests_do_not_keep_the_server_alive() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // After completion, and after SIGTERM: the process exits within the grace
    // period and the shutdown timeout, not when those connections close (an
    // idle timeout of ten minutes rules that out as the cause).
    for by_signal in [false, true] {
        let job = Job::new(20);
        let server = job.serve(&[
            "--exit-grace",
            "0.2",
            "--idle-timeout",
            "600",
            "--shutdown-timeout",
            "1",
        ]);
        let _half_open = half_sent_requests(&server.addr);
        if by_signal {
            server.answer_batch(&rt, 5);
            server.signal(libc::SIGTERM);
        } else {
            server.answer_batch(&rt, 20);
        }
        let stopping = Instant::now();
        let (code, stderr) = server.wait(Duration::from_secs(30));
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stopping.elapsed() < Duration::from_secs(6),
            "exited {:?} after the end of the job, with cut-off connections open",
            stopping.elapsed()
        );
        assert!(
            stderr.contains("closing them"),
            "the shutdown timeout ended them: {stderr}"
        );
        assert_eq!(
            job.checkpointed_lines(),
            if by_signal { 5 } else { 20 },
            "with a final checkpoint"
        );
    }
}

#[test]
fn a_stalled_or_idle_connection_is_closed_after_the_idle_timeout() {
    let job = Job::new(5);
    let server = job.serve(&["--idle-timeout", "1"]);
    let mut conns = half_sent_requests(&server.addr);
    let start = Instant::now();
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        // The server closes it (a 408 or nothing, then EOF), or resets it.
        let _ = conn.read_to_end(&mut rest);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "connection {i} was still open after {:?}",
            start.elapsed()
        );
    }
    // The server itself is fine and serves new connections.
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(server.answer_batch(&rt, 5).len(), 5);
}

#[test]
fn with_a_low_open_file_limit_hundreds_of_connections_wait_their_turn_and_the_job_completes() {
    // 128 open files at most, and the server may not raise that: it keeps 64
    // for its files, so at most 64 connections are open at once. 150 idle
    // keep-alive connections come first; the worker's connections wait in the
    // backlog until idle ones are closed, checkpoints keep being written, and
    // nothing is lost.
    let job = Job::new(200);
    let server = job.serve_with_open_file_limit(
        128,
        &[
            "--idle-timeout",
            "1",
            "--checkpoint-interval",
            "0.1",
            "--exit-grace",
            "0.3",
        ],
    );
    let idle: Vec<TcpStream> = (0..150)
        .map(|_| {
            let mut s = TcpStream::connect(&server.addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = DispatcherClient::new(&server.addr);
    rt.block_on(async {
        loop {
            let work = match client.get_work(10).await {
                Ok(work) => work,
                Err(e) if e.is_unavailable() => break,
                Err(e) => panic!("{e}"),
            };
            match work.status {
                WorkStatus::Ok => {
                    client
                        .submit(work.items.iter().map(answer).collect())
                        .await
                        .unwrap();
                }
                WorkStatus::Retry => tokio::time::sleep(Duration::from_millis(50)).await,
                WorkStatus::AllWorkComplete => break,
            }
        }
    });
    let (code, stderr) = server.wait(Duration::from_secs(60));
    drop(idle);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("soft_now=128"),
        "the limit stayed low: {stderr}"
    );
    job.check_output();
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one_and_logged() {
    let job = Job::new(3);
    let serve = job.serve_command();
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg("ulimit -S -n 200 && exec \"$0\" \"$@\"")
        .arg(serve.get_program())
        .args(serve.get_args());
    let server = Server::start(cmd);
    server.signal(libc::SIGTERM);
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    let hard = Command::new("bash")
        .args(["-c", "ulimit -H -n"])
        .output()
        .unwrap();
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_string();
    assert!(
        stderr.contains("soft_before=200") && stderr.contains(&format!("soft_now={hard}")),
        "{stderr}"
    );
}

#[test]
fn listening_is_announced_only_once_the_job_is_open_and_a_closed_stdout_is_harmless() {
    // A start that is refused prints no address.
    let job = Job::new(3);
    std::fs::write(job.path("out.jsonl"), "{\"foreign\": 1}\n").unwrap();
    let out = job.serve_command().output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no 'listening on'"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint"));

    // A server whose stdout is closed before it writes its address serves on.
    let job = Job::new(3);
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--infile")
        .arg(job.path("in.jsonl"))
        .arg("--outfile")
        .arg(job.path("out.jsonl"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--exit-grace", "0.2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let server = Server {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = DispatcherClient::new(&server.addr);
    let start = Instant::now();
    while rt.block_on(client.status()).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.answer_batch(&rt, 3);
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    job.check_output();
}

/// Everything at once, against one job: half-open connections, a low
/// open-file limit, live timeout changes while workers heartbeat, stale
/// workers that release what was reissued to others, and SIGKILL restarts.
/// The output must be exactly one right line per input line.
#[test]
fn chaos_of_a_cluster_leaves_the_output_exact() {
    let job = Job::new(3_000);
    let flags = [
        "--checkpoint-interval",
        "0.05",
        "--work-timeout",
        "2",
        "--max-retries",
        "-1",
        "--max-releases",
        "-1",
        "--exit-grace",
        "0.5",
        "--retry",
        "1",
        "--idle-timeout",
        "1",
        "--shutdown-timeout",
        "1",
    ];
    let start_server = || job.serve_with_open_file_limit(160, &flags);
    let mut server = start_server();
    let addr = Arc::new(Mutex::new(server.addr.clone()));
    let done = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    // Workers that heartbeat what they hold while they "generate".
    for w in 0..4u64 {
        tasks.push(rt.spawn(heartbeating_worker(addr.clone(), done.clone(), w)));
    }
    // A stale worker: takes items, stays silent past the lease, then releases
    // them (by now reissued to others) and answers some of them late.
    tasks.push(rt.spawn(stale_worker(addr.clone(), done.clone())));
    // An operator changing the work timeout back and forth.
    tasks.push(rt.spawn(timeout_changer(addr.clone(), done.clone())));
    // Half-open connections, a few new ones every 100 ms.
    tasks.push(rt.spawn(half_opener(addr.clone(), done.clone())));

    for round in 0..4u64 {
        std::thread::sleep(Duration::from_millis(700 + 150 * round));
        server.signal(libc::SIGKILL);
        let _ = server.wait(Duration::from_secs(10));
        server = start_server();
        *addr.lock().unwrap() = server.addr.clone();
    }
    let (code, stderr) = server.wait(Duration::from_secs(120));
    done.store(true, Ordering::SeqCst);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    assert_eq!(code, 0, "exit after completion; stderr: {stderr}");
    job.check_output();
}

fn current(addr: &Mutex<String>) -> String {
    addr.lock().unwrap().clone()
}

async fn heartbeating_worker(addr: Arc<Mutex<String>>, done: Arc<AtomicBool>, seed: u64) {
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = move |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    while !done.load(Ordering::SeqCst) {
        let client = DispatcherClient::new(&current(&addr));
        let Ok(work) = client.get_work(16).await else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        if work.status != WorkStatus::Ok {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        }
        let ids: Vec<u64> = work.items.iter().map(|i| i.work_id).collect();
        // "Generate" for up to 1.5 s, heartbeating every 250 ms: longer than
        // the shortest work timeout the operator sets.
        let busy = Instant::now() + Duration::from_millis(next(1500));
        while Instant::now() < busy {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let _ = client.heartbeat(ids.clone()).await;
        }
        let _ = client.submit(work.items.iter().map(answer).collect()).await;
    }
}

async fn stale_worker(addr: Arc<Mutex<String>>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::SeqCst) {
        let client = DispatcherClient::new(&current(&addr));
        let Ok(work) = client.get_work(4).await else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        if work.status != WorkStatus::Ok {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        }
        // Silent past any lease the operator sets (1 to 3 s).
        tokio::time::sleep(Duration::from_millis(3_200)).await;
        let ids: Vec<u64> = work.items.iter().map(|i| i.work_id).collect();
        let _ = client
            .release_for(
                ids,
                Some(dispatcher_core::protocol::ReleaseReason::Preempted),
            )
            .await;
        let _ = client
            .submit(work.items.iter().take(2).map(answer).collect())
            .await;
    }
}

async fn timeout_changer(addr: Arc<Mutex<String>>, done: Arc<AtomicBool>) {
    let mut secs = 1.0;
    while !done.load(Ordering::SeqCst) {
        let client = DispatcherClient::new(&current(&addr));
        let _ = client.set_work_timeout(secs).await;
        secs = if secs >= 3.0 { 1.0 } else { secs + 1.0 };
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn half_opener(addr: Arc<Mutex<String>>, done: Arc<AtomicBool>) {
    let mut open = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let target = current(&addr);
        for bytes in [
            &b"G"[..],
            b"POST /results HTTP/1.1\r\nHost: t\r\nContent-Length: 99\r\n\r\n{",
        ] {
            if let Ok(mut s) = tokio::net::TcpStream::connect(&target).await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(bytes).await;
                open.push(s);
            }
        }
        // Bounded: the oldest go away as a dead node's would, eventually.
        if open.len() > 200 {
            open.drain(..100);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A body trickled one byte at a time makes progress forever, so the idle
/// timeout never ends it; `--request-timeout` does, with a 408, and the
/// server is fine afterwards.
#[test]
fn a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_request_timeout() {
    let job = Job::new(5);
    let server = job.serve(&["--idle-timeout", "5", "--request-timeout", "1"]);
    let mut conn = TcpStream::connect(&server.addr).unwrap();
    conn.write_all(b"POST /results HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{")
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    // One byte every 100 ms, each well within the idle timeout, until the
    // server answers or 30 s pass (a million bytes would take a day).
    while start.elapsed() < Duration::from_secs(30) {
        if conn.write_all(b" ").is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-timeout"), "{answer}");
    // The server serves the next worker as before.
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(server.answer_batch(&rt, 5).len(), 5);
}
