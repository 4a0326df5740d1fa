//! Against a real inference engine: llama.cpp's `llama-server` with a tiny
//! generated model (scripts/setup-llama.sh builds both), launched by the worker
//! itself with `--engine llamacpp`, through a real dispatcher server.
//!
//! Where the engine is not built these tests say so and do nothing, unless
//! `DISPATCHER_REQUIRE_LLAMA=1` (scripts/test.sh sets it), which makes a
//! missing engine a failure.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dispatcher::engine::spawn::{self, EngineKind, SpawnConfig};
use dispatcher::engine::{OpenAiEngine, RetryPolicy};
use dispatcher::{task, DynTask, Engines, LineOutcome, Request, TaskContext, TaskError};
use serde_json::{json, Value};

use crate::support::{chat_lines, dispatcher_bin, example, strings, wait_exit, Served};

/// The engine and model, or `None` (with a message) where they are not built.
fn llama() -> Option<(String, String)> {
    let cache = std::env::var("DISPATCHER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/dispatcher")
        });
    let dir = cache.join("llama.cpp-11434.0.0");
    let server = std::env::var("LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or(dir.join("bin/llama-server"));
    let model = std::env::var("TINY_MODEL")
        .map(PathBuf::from)
        .unwrap_or(dir.join("tiny.gguf"));
    if server.exists() && model.exists() {
        return Some((server.display().to_string(), model.display().to_string()));
    }
    assert!(
        std::env::var_os("DISPATCHER_REQUIRE_LLAMA").is_none(),
        "llama-server or the tiny model is missing ({}, {}): run scripts/setup-llama.sh",
        server.display(),
        model.display()
    );
    eprintln!(
        "SKIPPED: llama-server is not built here; run scripts/setup-llama.sh to run this test"
    );
    None
}

/// Worker flags that launch llama-server with the tiny model: `slots` requests
/// at once with a context of `ctx` tokens each.
fn engine_flags(server: &str, model: &str, ctx: u32, slots: u32) -> Vec<String> {
    [
        "--engine",
        "llamacpp",
        "--engine-bin",
        server,
        "--model",
        model,
        "--threads",
        "1",
        "--parallel-slots",
        &slots.to_string(),
        "--max-model-len",
        &ctx.to_string(),
        "--startup-timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn worker(binary: &PathBuf, args: &[String]) -> std::process::Child {
    Command::new(binary)
        .args(args)
        .arg("-q")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_tasks_run_on_llama_cpp_through_a_server() {
    let Some((server, model)) = llama() else {
        return;
    };
    let (input, qs) = chat_lines(12);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let mut args = vec![
        "--dispatcher".to_string(),
        served.addr.clone(),
        "--workers".into(),
        "4".into(),
    ];
    // The judge sees both 512-token candidates: 2,048 tokens of context per slot.
    args.extend(engine_flags(&server, &model, 2048, 2));
    let (code, stderr) = wait_exit(
        worker(&example("compare_responses"), &args),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 12);
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
                    line["judge_model"], "tiny",
                    "llama-server answers with its --alias"
                );
            }
        }
    }

    let prompts: String = (0..6)
        .map(|i| json!({"prompt": format!("Prompt {i}")}).to_string() + "\n")
        .collect();
    let served = Served::start(&prompts, Duration::from_secs(2)).await;
    let mut args = vec!["--dispatcher".to_string(), served.addr.clone()];
    args.extend(engine_flags(&server, &model, 512, 4));
    let (code, stderr) = wait_exit(
        worker(&example("validated_response"), &args),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 6);
    for (i, line) in out.iter().enumerate() {
        let ok = line["response"]
            .as_str()
            .is_some_and(|r| r.contains("DONE"));
        let exhausted = line["__ERROR__"]["error"] == "retries_exhausted"
            && line["__ERROR__"]["task_data"]["prompt"] == format!("Prompt {i}");
        assert!(ok || exhausted, "line {i}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_in_chat_and_completion_mode_with_two_generations_and_an_over_long_prompt() {
    let Some((server, model)) = llama() else {
        return;
    };
    // The long prompt is far over the 128-token context of each slot.
    crate::support::infer_in_both_modes_with_an_over_long_prompt(
        &"river ".repeat(1500),
        "completion_tokens",
        "context",
        |mut args| {
            args.extend(engine_flags(&server, &model, 128, 4));
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

/// Structured output: the schema constrains llama.cpp's sampling.
#[task]
async fn rate(input: String) -> Result<Value, TaskError> {
    let schema = json!({
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 9}, "label": {"type": "string", "maxLength": 12}},
        "required": ["score", "label"],
        "additionalProperties": false
    });
    let r = yield_request!(Request::chat()
        .user(input)
        .json_schema("rating", schema)
        .max_tokens(64)
        .temperature(0.0))?;
    let rating: Rating = r.json()?;
    Ok(json!({"score": rating.score, "label": rating.label}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_llama_cpp_engines_in_one_task_the_launched_one_answers_a_named_one_judges() {
    let Some((server, model)) = llama() else {
        return;
    };
    // The judge: another llama-server, serving the model as `judge-llama`.
    let judge = spawn::spawn(&SpawnConfig {
        kind: EngineKind::Llamacpp,
        model: Some(model.clone()),
        served_model_name: Some("judge-llama".into()),
        engine_bin: Some(server.clone()),
        threads: Some(1),
        max_model_len: Some(1024),
        startup_timeout: Duration::from_secs(60),
        ..SpawnConfig::default()
    })
    .await
    .unwrap();
    let qs = ["Name a colour.", "Name a fruit.", "Name a city."];
    let input: String = qs
        .iter()
        .map(|q| json!({ "question": q }).to_string() + "\n")
        .collect();
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let mut args = strings(&["--dispatcher", &served.addr, "--workers", "2"]);
    args.extend(engine_flags(&server, &model, 1024, 2));
    args.extend(strings(&[
        "--engine-url",
        &format!("judge={}", judge.base_url()),
        "--engine-workers",
        "judge=1",
    ]));
    let (code, stderr) = wait_exit(
        worker(&example("generate_and_judge"), &args),
        Duration::from_secs(300),
    )
    .await;
    judge.stop(Duration::from_secs(5)).await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 3);
    for (line, q) in out.iter().zip(qs) {
        assert_eq!(line["question"], q, "{line}");
        assert!(line["answer"].is_string(), "{line}");
        // The verdict came from the judge's llama-server, under its name.
        assert_eq!(line["judge_model"], "judge-llama", "{line}");
        assert!(line["verdict"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_batch_runs_a_batch_file_on_llama_cpp() {
    let Some((server, model)) = llama() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let line = |id: &str, url: &str, body: Value| {
        json!({"custom_id": id, "method": "POST", "url": url, "body": body}).to_string() + "\n"
    };
    let file = line(
        "chat",
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
    ) + &line(
        "completion",
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 8}),
    ) + &line(
        "too-long",
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "word ".repeat(1000)}], "max_tokens": 8}),
    );
    std::fs::write(&input, file).unwrap();
    let mut args = strings(&["run-batch", "-i", &input.display().to_string()]);
    args.extend(strings(&["-o", &output.display().to_string()]));
    args.extend(engine_flags(&server, &model, 256, 2));
    let (code, stderr) =
        wait_exit(worker(&dispatcher_bin(), &args), Duration::from_secs(300)).await;
    // Complete, with an error line (the over-long prompt's 400): 3.
    assert_eq!(code, 3, "{stderr}");
    let out: Vec<Value> = crate::support::jsonl(&output);
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "completion", "too-long"]);
    assert_eq!(out[0]["response"]["status_code"], 200, "{}", out[0]);
    // The engine's model, not the one the line named.
    assert_eq!(out[0]["response"]["body"]["model"], "tiny", "{}", out[0]);
    assert!(out[0]["response"]["body"]["choices"][0]["message"]["content"].is_string());
    assert_eq!(out[1]["response"]["status_code"], 200, "{}", out[1]);
    assert!(out[1]["response"]["body"]["choices"][0]["text"].is_string());
    assert_eq!(out[2]["response"]["status_code"], 400, "{}", out[2]);
    assert!(out[2]["error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_response_format_gives_output_that_json_parses() {
    let Some((server, model)) = llama() else {
        return;
    };
    let config = SpawnConfig {
        kind: EngineKind::Llamacpp,
        model: Some(model),
        engine_bin: Some(server),
        threads: Some(1),
        max_model_len: Some(256),
        startup_timeout: Duration::from_secs(60),
        ..SpawnConfig::default()
    };
    let running = spawn::spawn(&config).await.unwrap();
    let engine = Arc::new(OpenAiEngine::new(
        running.base_url(),
        Duration::from_secs(120),
        RetryPolicy::default(),
    ));
    for i in 0..3 {
        let ctx = TaskContext::new(i, 0, Some(3), Engines::single(engine.clone()), 0);
        let outcome = rate
            .run_line(json!(format!("Rate item {i}")).to_string(), ctx)
            .await;
        let LineOutcome::Line { line, .. } = outcome else {
            panic!("{outcome:?}")
        };
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v["score"].as_u64().is_some_and(|s| s <= 9), "{v}");
        assert!(v["label"].is_string(), "{v}");
    }
    running.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_run_makes_the_worker_release_and_fail_and_a_new_worker_finishes() {
    let Some((server, model)) = llama() else {
        return;
    };
    crate::support::an_engine_killed_mid_run(40, |addr| {
        let mut args = strings(&[
            "infer",
            "--dispatcher",
            addr,
            "--max-tokens",
            "48",
            "--workers",
            "4",
            "--engine-retries",
            "1",
        ]);
        args.extend(engine_flags(&server, &model, 256, 4));
        worker(&dispatcher_bin(), &args)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vllm_launcher_passes_the_exact_command_line() {
    let Some((server, model)) = llama() else {
        return;
    };
    // A stand-in `vllm` on PATH: records its arguments, then serves with llama-server.
    let bin_dir = tempfile::tempdir().unwrap();
    let record = bin_dir.path().join("argv");
    let fake = bin_dir.path().join("vllm");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\nport=$(printf '%s\\n' \"$@\" | sed -n '/^--port$/{{n;p}}')\nexec {server} -m {model} --host 127.0.0.1 --port \"$port\" -t 1 --parallel 2 -c 512 --alias served\n",
            record = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let (input, _) = chat_lines(4);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let path = format!(
        "{}:{}",
        bin_dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new(dispatcher_bin())
        .args([
            "infer",
            "--dispatcher",
            &served.addr,
            "--max-tokens",
            "4",
            "-q",
        ])
        .args([
            "--engine",
            "vllm",
            "--model",
            "org/some-model",
            "--tensor-parallel-size",
            "2",
            "--served-model-name",
            "served",
            "--max-model-len",
            "512",
        ])
        .args([
            "--gpu-memory-utilization",
            "0.85",
            "--enforce-eager",
            "--chat-template",
            "/t/chat.jinja",
        ])
        .args([
            "--vllm-extra-args",
            "--seed 7 --dtype 'bfloat16'",
            "--startup-timeout",
            "60",
        ])
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(child, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 4);
    assert!(out
        .iter()
        .all(|l| l["responses"].as_array().is_some_and(|r| r.len() == 1)));
    let argv: Vec<String> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let port = argv
        .iter()
        .position(|a| a == "--port")
        .map(|i| argv[i + 1].clone())
        .unwrap();
    assert_eq!(
        argv,
        [
            "serve",
            "org/some-model",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--tensor-parallel-size",
            "2",
            "--max-model-len",
            "512",
            "--gpu-memory-utilization",
            "0.85",
            "--enforce-eager",
            "--chat-template",
            "/t/chat.jinja",
            "--served-model-name",
            "served",
            "--seed",
            "7",
            "--dtype",
            "bfloat16",
        ]
    );
}

/// `--logprobs` on the real engine: every generated token of every response
/// comes with its log-probability and the two most likely tokens at its
/// place, and the tokens spell the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_keeps_llama_cpps_log_probabilities_of_every_token() {
    let Some((server, model)) = llama() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), chat_lines(3).0).unwrap();
    let mut args = strings(&[
        "infer",
        "-i",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "--logprobs",
        "2",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    args.extend(engine_flags(&server, &model, 256, 2));
    let child = Command::new(dispatcher_bin())
        .args(&args)
        .arg("-q")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(child, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stderr}");
    let out = crate::support::jsonl(dir.path().join("out.jsonl"));
    assert_eq!(out.len(), 3);
    for line in &out {
        let text = line["responses"][0].as_str().unwrap();
        let tokens = line["logprobs"][0]
            .as_array()
            .unwrap_or_else(|| panic!("{line}"));
        assert!(!tokens.is_empty(), "{line}");
        let spelled: String = tokens
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(spelled, text, "{line}");
        for t in tokens {
            assert!(t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
            let top = t["top"].as_array().unwrap();
            assert_eq!(top.len(), 2, "{t}");
            assert!(
                top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64(),
                "{t}"
            );
        }
    }
}
