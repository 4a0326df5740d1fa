//! What the end-to-end tests share: built binaries, a server on loopback in a
//! temporary directory, waiting for processes, signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher::ledger::LedgerConfig;
use dispatcher::server::{self, ServeOptions, StopReason};

/// A server task running on 127.0.0.1:0.
pub type ServerHandle = tokio::task::JoinHandle<Result<StopReason, server::ServerError>>;

/// Serves `dir/in.jsonl` into `dir/out.jsonl` on 127.0.0.1:0 with a 600 s
/// work timeout (changed by `adjust`), exiting `grace` after completion.
pub async fn serve(
    dir: &Path,
    grace: Duration,
    adjust: impl FnOnce(&mut LedgerConfig),
) -> (String, ServerHandle) {
    let mut config = LedgerConfig {
        work_timeout: Duration::from_secs(600),
        retry_secs: 1,
        ..LedgerConfig::new(
            dir.join("in.jsonl"),
            dir.join("out.jsonl"),
            dir.join("out.jsonl.checkpoint"),
        )
    };
    adjust(&mut config);
    let options = ServeOptions {
        exit_grace: grace,
        ..ServeOptions::default()
    };
    let listener = server::bind("127.0.0.1", 0).await.unwrap();
    let addr = server::local_addr(&listener).unwrap().to_string();
    let handle = tokio::spawn(server::serve(
        listener,
        config,
        options,
        std::future::pending(),
    ));
    (addr, handle)
}

/// A binary `cargo test` built next to this test binary.
pub fn built_binary(dir: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = target.join(dir).join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins --examples` (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn example(name: &str) -> PathBuf {
    built_binary("examples", name)
}

#[derive(Debug)]
pub struct Served {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub handle: ServerHandle,
}

impl Served {
    pub async fn start(input: &str, grace: Duration) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
        let (addr, handle) = serve(dir.path(), grace, |_| {}).await;
        Served { dir, addr, handle }
    }

    /// Waits for the server to exit by itself and returns the output lines.
    pub async fn finish(self) -> Vec<serde_json::Value> {
        let reason = tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the server finishes")
            .unwrap()
            .unwrap();
        assert_eq!(reason, StopReason::Complete);
        std::fs::read_to_string(self.dir.path().join("out.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

pub fn worker(binary: &PathBuf, addr: &str, extra: &[&str]) -> Child {
    Command::new(binary)
        .args(["--dispatcher", addr, "--engine", "echo", "-q"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub async fn wait_exit(mut child: Child, limit: Duration) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        assert!(
            start.elapsed() < limit,
            "the worker did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[allow(unsafe_code)]
pub fn send_signal(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) }
}
