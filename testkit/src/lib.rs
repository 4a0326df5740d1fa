//! What the tests of the workspace share, so that each test says only what
//! it proves: a job's directory with its input ([`JobDir`]), reading a JSONL
//! output ([`jsonl`], [`lines`]), signals ([`send_signal`]), a server process
//! and its address ([`ServerProcess`]), a fake worker ([`answer_batch`],
//! [`work_until_done`]), and an OpenAI-compatible test engine whose answers
//! a test scripts ([`HttpEngine`]), a headless browser ([`browser`]). Every
//! address is on 127.0.0.1.

pub mod browser;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_core::client::DispatcherClient;
use dispatcher_core::protocol::{WorkItem, WorkStatus};
use serde_json::Value;

/// A job in a temporary directory: `in.jsonl` holds `{"n": i}` for each of
/// its lines; the job's files go beside it.
#[derive(Debug)]
pub struct JobDir {
    /// The directory, removed when the fixture is dropped.
    pub dir: tempfile::TempDir,
    /// The input's lines, without newlines.
    pub input: Vec<String>,
}

impl JobDir {
    /// A job of `lines` input lines.
    pub fn new(lines: usize) -> JobDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let input: Vec<String> = (0..lines).map(|i| format!("{{\"n\": {i}}}")).collect();
        let text: String = input.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.path().join("in.jsonl"), text).expect("the input is written");
        JobDir { dir, input }
    }

    /// A file of the job: `path("out.jsonl")`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The output's lines, as written (none while there is no output).
    pub fn output_lines(&self) -> Vec<String> {
        lines(self.path("out.jsonl"))
    }

    /// The output's lines, parsed.
    pub fn output_values(&self) -> Vec<Value> {
        jsonl(self.path("out.jsonl"))
    }
}

/// The lines of a file, without their newlines; a missing file has none.
pub fn lines(path: impl AsRef<Path>) -> Vec<String> {
    let path = path.as_ref();
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(String::from).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// The lines of a JSONL file, parsed; a line that is not JSON fails the test
/// naming the file and the line.
pub fn jsonl(path: impl AsRef<Path>) -> Vec<Value> {
    let path = path.as_ref();
    lines(path)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{} line {}: {e}: {l}", path.display(), i + 1))
        })
        .collect()
}

/// Runs `command` to its end and returns what it printed; a command that
/// does not exit 0 fails the test with its stderr.
pub fn succeed(command: &mut Command) -> std::process::Output {
    let out = command.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `command`, which must end with exit status 3: the job is complete
/// and some of its output lines are error records (the one rule of
/// `dispatcher_cli::exit`, for local runs, `launch` and `report`).
pub fn complete_with_errors(command: &mut Command) -> std::process::Output {
    let out = command.output().expect("the command starts");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{command:?} did not end with error records ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sends `sig` to process `pid`; kill(2)'s result.
#[allow(unsafe_code)]
pub fn send_signal(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) }
}

/// A `dispatcher serve` process (any command that prints `listening on
/// ADDR` once its job is open), killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    /// The process; its stderr is piped.
    pub child: Child,
    /// `HOST:PORT` it listens on.
    pub addr: String,
}

impl ServerProcess {
    /// Starts `command` and waits for its address; a process that exits
    /// first fails the test with its stderr.
    pub fn start(mut command: Command) -> ServerProcess {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the server's stdout reads");
        match line.trim().strip_prefix("listening on ") {
            Some(addr) => ServerProcess {
                addr: addr.to_string(),
                child,
            },
            None => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("the server is reaped");
                panic!(
                    "the server did not start (its first line: {line:?}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// Sends `sig` to it.
    pub fn signal(&self, sig: i32) {
        assert_eq!(send_signal(self.child.id() as i32, sig), 0);
    }

    /// Waits at most `limit` for it to exit: its exit code and stderr.
    pub fn wait(mut self, limit: Duration) -> (i32, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                return (status.code().unwrap_or(-1), stderr);
            }
            assert!(
                start.elapsed() < limit,
                "the server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A test that fails half-way must not leave its server running.
impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fake worker's round against the server at `addr`: takes up to `batch`
/// items and answers each with `answer(item)` as its result. Returns the
/// work ids it took.
pub async fn answer_batch(
    addr: &str,
    batch: usize,
    answer: impl Fn(&WorkItem) -> String,
) -> Vec<u64> {
    let client = DispatcherClient::new(addr);
    let work = client.get_work(batch).await.expect("the server answers");
    client
        .submit(answered(&work.items, &answer))
        .await
        .expect("the results are taken");
    work.items.iter().map(|i| i.work_id).collect()
}

/// `items` with `answer(item)` as each one's result.
fn answered(items: &[WorkItem], answer: &impl Fn(&WorkItem) -> String) -> Vec<WorkItem> {
    items
        .iter()
        .map(|item| WorkItem {
            result: Some(answer(item)),
            ..item.clone()
        })
        .collect()
}

/// A fake worker that answers every item the server at `addr` hands out
/// (`answer(item)` is its result), `batch` at a time, until the server says
/// all work is complete or is gone. Returns the work ids it was given, in
/// order.
pub async fn work_until_done(
    addr: &str,
    batch: usize,
    answer: impl Fn(&WorkItem) -> String,
) -> Vec<u64> {
    let client = DispatcherClient::new(addr);
    let mut ids = Vec::new();
    loop {
        let Ok(work) = client.get_work(batch).await else {
            return ids;
        };
        match work.status {
            WorkStatus::Ok => {
                ids.extend(work.items.iter().map(|i| i.work_id));
                client
                    .submit(answered(&work.items, &answer))
                    .await
                    .expect("the results are taken");
            }
            WorkStatus::AllWorkComplete => return ids,
            WorkStatus::Retry => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// An OpenAI-compatible engine on 127.0.0.1 whose chat answers come from a
/// function of the request's body, counting what it answered.
#[derive(Debug)]
pub struct HttpEngine {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    answered: Arc<Mutex<Vec<Value>>>,
}

/// How an [`HttpEngine`] answers: the text of its reply to a chat request.
pub type Answer = dyn Fn(&Value) -> String + Send + Sync;

/// How an [`HttpEngine`] started with [`HttpEngine::start_raw`] answers:
/// the whole answer's JSON.
pub type RawAnswer = dyn Fn(&Value) -> Value + Send + Sync;

impl HttpEngine {
    /// Starts the engine on the current tokio runtime; it serves
    /// `/v1/models` (one model, `test-model`) and answers chat requests with
    /// `answer(body)`.
    pub async fn start(answer: impl Fn(&Value) -> String + Send + Sync + 'static) -> HttpEngine {
        HttpEngine::start_raw(move |body| {
            serde_json::json!({
                "model": "test-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer(body)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
            })
        })
        .await
    }

    /// Like [`start`](HttpEngine::start), with `answer(body)` the whole
    /// answer's JSON: for answers of every shape an engine gives.
    pub async fn start_raw(answer: impl Fn(&Value) -> Value + Send + Sync + 'static) -> HttpEngine {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().expect("has an address"));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<RawAnswer> = Arc::new(answer);
        let seen = answered.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (answer, seen) = (answer.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (answer, seen) = (answer.clone(), seen.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                                let reply = if path.ends_with("/models") {
                                    serde_json::json!({"data": [{"id": "test-model"}]})
                                } else {
                                    let reply = answer(&body);
                                    seen.lock().expect("not poisoned").push(body);
                                    reply
                                };
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(reply.to_string())))
                                        .expect("a response builds"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        HttpEngine { url, answered }
    }

    /// The bodies of the chat requests answered so far.
    pub fn answered(&self) -> Vec<Value> {
        self.answered.lock().expect("not poisoned").clone()
    }
}

/// The last message's content of a chat request body.
pub fn last_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}
