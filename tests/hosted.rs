//! Hosted endpoints and named engines, against a test engine behind rustls
//! with a certificate generated for the test: TLS with a CA of one's own, an
//! API key from the environment, 429 answers with `Retry-After`, client-side
//! rate limits, a judge engine beside the launched one, and a named engine
//! that is down.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher::engine::Engine;
use dispatcher::engine::{ApiKey, OpenAiEngine, RateLimit, RequestError, RetryPolicy};
use dispatcher::metrics::WorkerMetrics;
use dispatcher::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio_rustls::rustls;

use crate::support::{dispatcher_bin, example, wait_exit, Served};

/// One request as the test engine saw it.
#[derive(Debug, Clone)]
struct Arrival {
    at: Instant,
    status: u16,
    authorization: Option<String>,
    body: Value,
}

/// What the test engine does and saw.
#[derive(Debug, Default)]
struct EngineState {
    /// The bearer token it requires, if any.
    key: Option<String>,
    /// The next this many chat requests are answered 429 with `Retry-After: 1`.
    throttle: AtomicUsize,
    /// How long each answer takes.
    delay: Duration,
    arrivals: Mutex<Vec<Arrival>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// An OpenAI-compatible engine over TLS on 127.0.0.1, serving the model
/// `judge-model`: chat answers are `Score: 7. You said: <last message>`.
struct TlsEngine {
    url: String,
    ca_pem: Vec<u8>,
    ca_path: PathBuf,
    state: Arc<EngineState>,
    _dir: tempfile::TempDir,
}

impl TlsEngine {
    async fn start(state: EngineState) -> TlsEngine {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key_pair.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.into())
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(state);
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, cert.pem()).unwrap();
        TlsEngine {
            url,
            ca_pem: cert.pem().into_bytes(),
            ca_path,
            state,
            _dir: dir,
        }
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.state.arrivals.lock().unwrap().clone()
    }
}

fn reply(status: u16, headers: &[(&str, &str)], body: Value) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

async fn answer(
    state: &EngineState,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let path = req.uri().path().to_string();
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    if path == "/v1/models" {
        return reply(200, &[], json!({"data": [{"id": "judge-model"}]}));
    }
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let authorized = match &state.key {
        Some(key) => authorization.as_deref() == Some(&format!("Bearer {key}")),
        None => true,
    };
    let throttled = authorized
        && state
            .throttle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let status = match (authorized, throttled) {
        (false, _) => 401,
        (true, true) => 429,
        (true, false) => 200,
    };
    state.arrivals.lock().unwrap().push(Arrival {
        at: Instant::now(),
        status,
        authorization,
        body: body.clone(),
    });
    match status {
        401 => return reply(401, &[], json!({"error": {"message": "invalid API key"}})),
        429 => {
            return reply(
                429,
                &[("retry-after", "1")],
                json!({"error": {"message": "rate limited; slow down"}}),
            )
        }
        _ => {}
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(state.delay).await;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    reply(
        200,
        &[],
        json!({
            "model": "judge-model",
            // As hosted APIs answer: the trace as `reasoning`, and fields of
            // their own.
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Score: 7. You said: {last}"),
                "reasoning": format!("thought about {last}")}, "finish_reason": "stop",
                "logprobs": {"content": [{"token": "Score", "logprob": -0.5, "top_logprobs": []}]}}],
            "provider": "test-cloud",
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        }),
    )
}

const KEY: &str = "sk-test-5f0c1e2d9a";

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_its_retry_after_over_tls_with_the_key_and_counted() {
    let engine = TlsEngine::start(EngineState {
        key: Some(KEY.into()),
        throttle: AtomicUsize::new(2),
        ..EngineState::default()
    })
    .await;
    let metrics = Arc::new(WorkerMetrics::default());
    let backend = OpenAiEngine::builder(&engine.url)
        .ca_cert_pem(engine.ca_pem.clone())
        .api_key(ApiKey::new(KEY))
        .build()
        .unwrap()
        .with_metrics(metrics.clone(), "hosted");
    let response = backend.send(Request::chat().user("hello")).await.unwrap();
    assert_eq!(response.text(), "Score: 7. You said: hello");
    // The hosted answer is kept whole: its trace, its log-probabilities and a
    // field no type names.
    assert_eq!(response.reasoning(), Some("thought about hello"));
    assert_eq!(response.logprobs().unwrap()[0].logprob, -0.5);
    assert_eq!(response.raw()["provider"], "test-cloud");
    let arrivals = engine.arrivals();
    assert_eq!(
        arrivals.iter().map(|a| a.status).collect::<Vec<_>>(),
        vec![429, 429, 200]
    );
    assert!(arrivals
        .iter()
        .all(|a| a.authorization.as_deref() == Some(&*format!("Bearer {KEY}"))));
    // Retry-After: 1 is longer than the first backoffs (0.25 s, 0.5 s): each
    // retry came at least a second after the 429 before it.
    for pair in arrivals.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
    }
    let text = metrics.render();
    assert_eq!(
        metric(
            &text,
            "dispatcher_worker_engine_retries_total{engine=\"hosted\",cause=\"rate_limited\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_and_a_wrong_key_is_a_rejection_not_a_retry() {
    let engine = TlsEngine::start(EngineState {
        key: Some(KEY.into()),
        ..EngineState::default()
    })
    .await;
    let no_retries = RetryPolicy {
        retries: 0,
        ..RetryPolicy::default()
    };
    // Without the test's CA the certificate is not trusted: nothing is sent.
    let untrusted = OpenAiEngine::builder(&engine.url)
        .retry(no_retries.clone())
        .api_key(ApiKey::new(KEY))
        .build()
        .unwrap();
    let err = untrusted.send(Request::chat().user("x")).await.unwrap_err();
    assert!(matches!(err, RequestError::Unavailable(_)), "{err:?}");
    assert!(engine.arrivals().is_empty());
    // Trusted, with the wrong key: the engine's 401 fails the request at once.
    let wrong_key = OpenAiEngine::builder(&engine.url)
        .retry(no_retries)
        .ca_cert_pem(engine.ca_pem.clone())
        .api_key(ApiKey::new("sk-wrong"))
        .build()
        .unwrap();
    let err = wrong_key.send(Request::chat().user("x")).await.unwrap_err();
    let RequestError::Rejected { status, message } = err else {
        panic!("{err:?}")
    };
    assert_eq!((status, message.as_str()), (401, "invalid API key"));
    assert_eq!(engine.arrivals().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_hold_at_the_engine_however_many_tasks_send() {
    let engine = TlsEngine::start(EngineState::default()).await;
    let backend = Arc::new(
        OpenAiEngine::builder(&engine.url)
            .ca_cert_pem(engine.ca_pem.clone())
            .rate_limit(RateLimit {
                requests_per_minute: Some(120),
                tokens_per_minute: None,
            })
            .build()
            .unwrap(),
    );
    let sends: Vec<_> = (0..6)
        .map(|i| {
            let backend = backend.clone();
            tokio::spawn(async move { backend.send(Request::chat().user(format!("{i}"))).await })
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap();
    }
    // 120 a minute: two at once (one second's worth), then one every 0.5 s,
    // so the sixth arrives 2 s after the first at the earliest.
    let arrivals = engine.arrivals();
    assert_eq!(arrivals.len(), 6);
    let span = arrivals[5].at - arrivals[0].at;
    assert!(
        span >= Duration::from_millis(1900),
        "six requests in {span:?}"
    );
}

fn questions(n: usize) -> (String, Vec<String>) {
    let qs: Vec<String> = (0..n).map(|i| format!("What is {i} + {i}?")).collect();
    let input = qs
        .iter()
        .map(|q| json!({ "question": q }).to_string() + "\n")
        .collect();
    (input, qs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_runs_on_a_hosted_engine_with_the_key_from_the_environment_and_never_logs_it() {
    let engine = TlsEngine::start(EngineState {
        key: Some(KEY.into()),
        throttle: AtomicUsize::new(1),
        ..EngineState::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let (lines, qs) = crate::support::chat_lines(5);
    std::fs::write(&input, lines).unwrap();
    let child = Command::new(dispatcher_bin())
        .args(["-vv", "infer", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--engine-url", &engine.url, "--ca-cert"])
        .arg(&engine.ca_path)
        .args([
            "--api-key-env",
            "HOSTED_TEST_KEY",
            "--model",
            "hosted-model",
            "--prompt-path",
            ".messages",
        ])
        .env("HOSTED_TEST_KEY", KEY)
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(child, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(KEY), "the key is in the log:\n{stderr}");
    let out: Vec<Value> = crate::support::jsonl(&output);
    assert_eq!(out.len(), 5);
    for (line, q) in out.iter().zip(&qs) {
        assert_eq!(line["responses"][0], format!("Score: 7. You said: {q}"));
    }
    let arrivals = engine.arrivals();
    // Five answered, one 429 retried; all with the key and --model.
    assert_eq!(arrivals.iter().filter(|a| a.status == 200).count(), 5);
    assert_eq!(arrivals.iter().filter(|a| a.status == 429).count(), 1);
    for a in &arrivals {
        assert_eq!(a.authorization.as_deref(), Some(&*format!("Bearer {KEY}")));
        assert_eq!(a.body["model"], "hosted-model");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_generates_on_the_launched_engine_and_judges_on_a_named_one_within_its_limit() {
    let judge = TlsEngine::start(EngineState {
        delay: Duration::from_millis(100),
        ..EngineState::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let (lines, qs) = questions(12);
    std::fs::write(&input, lines).unwrap();
    let judge_url = format!("judge={}", judge.url);
    let child = Command::new(example("generate_and_judge"))
        .args(["--engine", "echo", "--workers", "8", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--engine-url", &judge_url, "--engine-workers", "judge=2"])
        .arg("--ca-cert")
        .arg(&judge.ca_path)
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(child, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stderr}");
    let out: Vec<Value> = crate::support::jsonl(&output);
    assert_eq!(out.len(), 12);
    for (line, q) in out.iter().zip(&qs) {
        // The answer is the echo engine's; the verdict the judge's, on that answer.
        assert_eq!(line["question"], *q);
        assert_eq!(line["answer"], *q);
        assert_eq!(line["judge_model"], "judge-model");
        assert_eq!(line["score"], 7);
        assert!(line["verdict"]
            .as_str()
            .unwrap()
            .ends_with(&format!("Answer: {q}")));
    }
    let arrivals = judge.arrivals();
    assert_eq!(arrivals.len(), 12, "only the judging goes to the judge");
    // The model the judge lists, discovered at the first request.
    assert!(arrivals.iter().all(|a| a.body["model"] == "judge-model"));
    // Twelve tasks wanted the judge at once; it never had more than its 2.
    assert_eq!(judge.state.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_dead_named_engine_hands_the_lines_back_and_another_worker_finishes() {
    let (input, qs) = questions(6);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let run = |extra: &[&str]| {
        Command::new(example("generate_and_judge"))
            .args(["--dispatcher", &served.addr, "--engine", "echo"])
            .args(["--engine-retries", "1", "--server-wait", "30"])
            .args(extra)
            .env_remove("OPENAI_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // No judge at all: the first judging request stops the worker, saying
    // which flag is missing.
    let (code, stderr) = wait_exit(run(&[]), Duration::from_secs(60)).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("--engine-url judge=URL"), "{stderr}");
    // A judge nobody listens at: the worker stops, naming it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("judge=http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (code, stderr) =
        wait_exit(run(&["--engine-url", &dead_url]), Duration::from_secs(60)).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("the engine \"judge\""), "{stderr}");
    // Every line was handed back, none written as a failure: a worker with a
    // judge finishes all six.
    let judge = TlsEngine::start(EngineState::default()).await;
    let judge_url = format!("judge={}", judge.url);
    let ca = judge.ca_path.display().to_string();
    let (code, stderr) = wait_exit(
        run(&["--engine-url", &judge_url, "--ca-cert", &ca]),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 6);
    for (line, q) in out.iter().zip(&qs) {
        assert_eq!(line["question"], *q, "{line}");
        assert_eq!(line["score"], 7, "{line}");
    }
}
