//! Everything the engine says reaches the output (#39): a reasoning model's
//! trace beside each response, an answer with no text told from an empty
//! one, and the tokens' log-probabilities asked for with `--logprobs`.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::{dispatcher_bin, jsonl, last_message, succeed, HttpEngine};

/// A reasoning model behind a reasoning parser: the prompt "cut" runs out of
/// tokens while thinking (`content: null`), "plain" has no trace, the
/// others answer with their trace beside; with `logprobs` asked, each answer
/// carries its tokens'.
async fn reasoning_engine() -> HttpEngine {
    HttpEngine::start_raw(|body| {
        let prompt = last_message(body);
        let message = match prompt.as_str() {
            "cut" => json!({"role": "assistant", "content": null,
                "reasoning_content": "Let me think. First, cut"}),
            "plain" => json!({"role": "assistant", "content": "plain answer"}),
            _ => json!({"role": "assistant", "content": format!("{prompt}!"),
                "reasoning_content": format!("because {prompt}")}),
        };
        let mut choice = json!({"index": 0, "message": message,
            "finish_reason": if prompt == "cut" { "length" } else { "stop" }});
        if body["logprobs"] == true {
            let top = body["top_logprobs"].as_u64().unwrap_or(0) as usize;
            let alternatives: Vec<Value> = (0..top)
                .map(|i| json!({"token": format!("t{i}"), "logprob": -(i as f64) - 0.5, "bytes": [116]}))
                .collect();
            choice["logprobs"] = json!({"content": [{"token": "Yes", "logprob": -0.25,
                "bytes": [89, 101, 115], "top_logprobs": alternatives}]});
        }
        json!({"id": "x", "model": "test-model", "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}})
    })
    .await
}

fn infer(dir: &std::path::Path, engine: &HttpEngine, extra: &[&str]) -> Vec<Value> {
    let lines: String = ["why", "cut", "plain"]
        .iter()
        .map(|p| json!({"messages": [{"role": "user", "content": p}]}).to_string() + "\n")
        .collect();
    std::fs::write(dir.join("in.jsonl"), lines).unwrap();
    succeed(
        Command::new(dispatcher_bin())
            .args(["infer", "--engine-url", &engine.url, "-q"])
            .args(["-i", "in.jsonl", "-o", "out.jsonl", "--overwrite"])
            .args(extra)
            .current_dir(dir),
    );
    jsonl(dir.join("out.jsonl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_keeps_the_reasoning_beside_each_response_and_no_text_is_null() {
    let engine = reasoning_engine().await;
    let dir = tempfile::tempdir().unwrap();
    let out = infer(dir.path(), &engine, &["--include-usage"]);
    assert_eq!(out[0]["responses"], json!(["why!"]));
    assert_eq!(out[0]["reasoning"], json!(["because why"]));
    // Cut while thinking: no text (not ""), and the trace, the job's
    // product here, is kept.
    assert_eq!(out[1]["responses"], json!([null]), "{}", out[1]);
    assert_eq!(out[1]["reasoning"], json!(["Let me think. First, cut"]));
    assert_eq!(out[1]["finish_reasons"], json!(["length"]));
    // No trace from the engine: no field.
    assert_eq!(out[2]["responses"], json!(["plain answer"]));
    assert!(out[2].get("reasoning").is_none(), "{}", out[2]);
    assert!(out.iter().all(|l| l.get("logprobs").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_asks_for_log_probabilities_and_keeps_them_per_response() {
    let engine = reasoning_engine().await;
    let dir = tempfile::tempdir().unwrap();
    let out = infer(dir.path(), &engine, &["--logprobs", "2"]);
    for body in engine.answered() {
        assert_eq!(
            (&body["logprobs"], &body["top_logprobs"]),
            (&json!(true), &json!(2))
        );
    }
    let lp = &out[0]["logprobs"][0][0];
    assert_eq!(lp["token"], "Yes");
    assert_eq!(lp["logprob"], -0.25);
    assert_eq!(lp["bytes"], json!([89, 101, 115]));
    assert_eq!(
        lp["top"],
        json!([{"token": "t0", "logprob": -0.5, "bytes": [116]}, {"token": "t1", "logprob": -1.5, "bytes": [116]}])
    );
    assert_eq!(out[1]["logprobs"].as_array().unwrap().len(), 1);
    // --logprobs and the same fields in --extra-body: refused, naming both.
    let refused = Command::new(dispatcher_bin())
        .args([
            "infer", "--engine", "echo", "-i", "in.jsonl", "-o", "o2.jsonl",
        ])
        .args(["--logprobs", "1", "--extra-body", r#"{"top_logprobs": 3}"#])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("top_logprobs") && said.contains("--logprobs"),
        "{said}"
    );
}

/// A line whose messages hold content parts (an image by data URL, a part
/// no type names), a speaker's name and a tool's answer reaches the engine
/// as the line has them: `--prompt-path .messages` sends them untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_sends_messages_with_content_parts_and_tool_turns_as_they_are() {
    let engine = HttpEngine::start(|_| "a cat".to_string()).await;
    let dir = tempfile::tempdir().unwrap();
    let messages = json!([
        {"role": "system", "content": "Describe images."},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            {"type": "video_url", "video_url": {"url": "file:///v.mp4"}, "fps": 1.5}
        ]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "zoom", "arguments": "{\"x\": 0.25}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "zoomed"}
    ]);
    std::fs::write(
        dir.path().join("in.jsonl"),
        json!({"id": 1, "messages": messages}).to_string() + "\n",
    )
    .unwrap();
    succeed(
        Command::new(dispatcher_bin())
            .args(["infer", "--engine-url", &engine.url, "-q"])
            .args([
                "-i",
                "in.jsonl",
                "-o",
                "out.jsonl",
                "--prompt-path",
                ".messages",
            ])
            .current_dir(dir.path()),
    );
    let sent = engine.answered();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["messages"], messages, "sent as the line has them");
    assert_eq!(
        jsonl(dir.path().join("out.jsonl"))[0]["responses"],
        json!(["a cat"])
    );
}

/// `--request-path`: each line's own settings (a LoRA adapter as `model`, a
/// temperature, a stop) are sent over the flags' for that line alone; a
/// line with a bad value fails alone, with a kind of its own naming the
/// field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_line_sends_its_own_request_fields_and_a_bad_one_fails_alone() {
    let engine = HttpEngine::start(|body| format!("from {}", body["model"])).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        json!({"q": "a", "params": {"temperature": 0.1, "model": "sql-lora", "stop": ["END"], "top_k": 5}}),
        json!({"q": "b"}),
        json!({"q": "c", "params": {"max_tokens": 0}}),
    ];
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(dir.path().join("in.jsonl"), text).unwrap();
    let out = Command::new(dispatcher_bin())
        .args(["infer", "--engine-url", &engine.url, "-q"])
        .args(["-i", "in.jsonl", "-o", "out.jsonl", "--prompt-path", ".q"])
        .args(["--request-path", ".params", "--temperature", "0.7"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a line failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = engine.answered();
    assert_eq!(sent.len(), 2, "the bad line sends nothing");
    let a = sent.iter().find(|b| last_message(b) == "a").unwrap();
    assert_eq!(
        (&a["temperature"], &a["model"], &a["stop"], &a["top_k"]),
        (&json!(0.1), &json!("sql-lora"), &json!(["END"]), &json!(5))
    );
    let b = sent.iter().find(|b| last_message(b) == "b").unwrap();
    assert_eq!(
        b["temperature"], 0.7,
        "the flags' settings where a line has none"
    );
    assert_eq!(b["model"], "test-model");
    let output = jsonl(dir.path().join("out.jsonl"));
    assert_eq!(output[0]["responses"], json!(["from \"sql-lora\""]));
    let error = &output[2]["__ERROR__"];
    assert_eq!(error["error"], "request_field_invalid", "{}", output[2]);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("\"max_tokens\"") && message.contains(".params"),
        "{message}"
    );
}

/// Runs an example task in local mode against `engine`; its output.
fn run_example(
    name: &str,
    dir: &std::path::Path,
    engine: &HttpEngine,
    input: &[Value],
) -> Vec<Value> {
    let text: String = input.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(dir.join("in.jsonl"), text).unwrap();
    let _ = Command::new(crate::support::example(name))
        .args(["--engine-url", &engine.url, "-q"])
        .args(["--input", "in.jsonl", "--output", "out.jsonl"])
        .current_dir(dir)
        .output()
        .unwrap();
    jsonl(dir.join("out.jsonl"))
}

/// `judge_by_logprob` scores by the probability of "Yes" against "No" among
/// the first token's alternatives, asked for with `logprobs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logprob_judge_scores_by_the_verdict_tokens_probabilities() {
    let engine = HttpEngine::start_raw(|body| {
        assert_eq!((&body["logprobs"], &body["top_logprobs"]), (&json!(true), &json!(5)));
        let (yes, no) = if last_message(body).contains("Berlin") { (-3.0, -0.05) } else { (-0.1, -2.5) };
        let top = if last_message(body).contains("spider") {
            json!([{"token": "Maybe", "logprob": -0.01}])
        } else {
            json!([{"token": "Yes", "logprob": yes}, {"token": " no", "logprob": no}, {"token": "I", "logprob": -6.0}])
        };
        json!({"model": "judge", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"},
            "logprobs": {"content": [{"token": "Yes", "logprob": yes, "top_logprobs": top}]}, "finish_reason": "length"}]})
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input: Vec<Value> = std::fs::read_to_string("examples/data/judged.jsonl")
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let out = run_example("judge_by_logprob", dir.path(), &engine, &input);
    let share = |yes: f64, no: f64| yes.exp() / (yes.exp() + no.exp());
    assert!(
        (out[0]["score"].as_f64().unwrap() - share(-0.1, -2.5)).abs() < 1e-12,
        "{}",
        out[0]
    );
    assert!(
        (out[1]["score"].as_f64().unwrap() - share(-3.0, -0.05)).abs() < 1e-12,
        "{}",
        out[1]
    );
    assert_eq!(
        out[2]["__ERROR__"]["error"], "no_verdict_tokens",
        "{}",
        out[2]
    );
}

/// `reasoning_traces` keeps the trace and the answer, and a trace cut
/// while thinking as a trace without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_keeper_keeps_a_trace_cut_while_thinking() {
    let engine = reasoning_engine().await;
    let dir = tempfile::tempdir().unwrap();
    let input: Vec<Value> = ["why", "cut"]
        .iter()
        .map(|p| json!({"messages": [{"role": "user", "content": p}]}))
        .collect();
    let out = run_example("reasoning_traces", dir.path(), &engine, &input);
    assert_eq!(
        (&out[0]["reasoning"], &out[0]["answer"], &out[0]["complete"]),
        (&json!("because why"), &json!("why!"), &json!(true))
    );
    assert_eq!(
        (&out[1]["reasoning"], &out[1]["answer"], &out[1]["complete"]),
        (
            &json!("Let me think. First, cut"),
            &Value::Null,
            &json!(false)
        )
    );
}

/// `describe_image` sends the image file inline as a data URL beside the
/// question (byte for byte what the file holds); an unreadable image fails
/// its line alone, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_task_sends_the_file_inline_and_fails_a_missing_one_alone() {
    use base64::Engine as _;
    let engine = HttpEngine::start(|_| "a red square".to_string()).await;
    let dir = tempfile::tempdir().unwrap();
    // A 1x1 PNG.
    let png = base64::engine::general_purpose::STANDARD
        .decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
        .unwrap();
    std::fs::write(dir.path().join("red.png"), &png).unwrap();
    let input = [
        json!({"image": dir.path().join("red.png"), "question": "What colour?"}),
        json!({"image": dir.path().join("gone.png"), "question": "And this?"}),
    ];
    let out = run_example("describe_image", dir.path(), &engine, &input);
    assert_eq!(out[0]["answer"], "a red square");
    let sent = engine.answered();
    assert_eq!(sent.len(), 1);
    let content = &sent[0]["messages"][0]["content"];
    assert_eq!(content[0], json!({"type": "text", "text": "What colour?"}));
    let url = content[1]["image_url"]["url"].as_str().unwrap();
    let data = url.strip_prefix("data:image/png;base64,").unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
        png
    );
    assert_eq!(out[1]["__ERROR__"]["error"], "image_unreadable");
    assert!(
        out[1]["__ERROR__"]["message"]
            .as_str()
            .unwrap()
            .contains("gone.png"),
        "{}",
        out[1]
    );
}

/// `--lora` takes NAME=PATH; anything else is refused before any engine
/// starts, naming the flag and the form.
#[test]
fn a_lora_flag_without_a_name_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let out = Command::new(dispatcher_bin())
        .args([
            "infer",
            "--engine",
            "vllm",
            "--model",
            "m",
            "--lora",
            "/loras/sql",
        ])
        .args(["-i", "in.jsonl", "-o", "out.jsonl"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("--lora \"/loras/sql\": give NAME=PATH"),
        "{said}"
    );
}

/// A task's journal keeps the whole answer: a line issued again replays
/// the trace, the log-probabilities and a field no type names, exactly, and
/// asks the engine nothing.
#[tokio::test]
async fn a_replayed_answer_is_the_answer_field_for_field() {
    use dispatcher::testing::TaskTest;
    use dispatcher::{task, Request, TaskError};

    #[task]
    async fn keep_all(prompt: String) -> Result<Value, TaskError> {
        let r = yield_request!(Request::chat()
            .user(prompt)
            .extra("logprobs", true)
            .extra("top_logprobs", 1))?;
        Ok(json!({
            "answer": r.content(),
            "reasoning": r.reasoning(),
            "logprobs": r.logprobs().map(|l| l.iter().map(|t| (t.token.clone(), t.logprob)).collect::<Vec<_>>()),
            "raw_extra": r.raw()["choices"][0]["stop_reason"],
        }))
    }

    let body = json!({"id": "c", "model": "m", "choices": [{"index": 0,
        "message": {"role": "assistant", "content": null, "reasoning_content": "Thinking 0.1+0.2"},
        "logprobs": {"content": [{"token": "Thinking", "logprob": -0.30000000000000004, "top_logprobs": []}]},
        "finish_reason": "length", "stop_reason": 42}]});
    let live = {
        let body = body.clone();
        TaskTest::new(keep_all)
            .respond_with(move |_| Ok(dispatcher::Response::from_openai(body.clone()).unwrap()))
            .run(json!("why?"))
            .await
    };
    assert_eq!(live.output["raw_extra"], 42, "{}", live.output);
    assert_eq!(live.output["logprobs"][0][1], -0.30000000000000004);
    let replayed = TaskTest::new(keep_all)
        .respond_with(|_| panic!("a replayed line asks the engine nothing"))
        .journal(live.journal.clone())
        .run(json!("why?"))
        .await;
    assert_eq!(replayed.replayed, 1);
    assert_eq!(replayed.output, live.output);
    assert_eq!(replayed.output["answer"], Value::Null);
    assert_eq!(replayed.output["reasoning"], "Thinking 0.1+0.2");
}

/// Tool calls make the round trip in a task: the model's calls are read,
/// the answer pushed onto the chat carries them (content null), and the
/// tool's result goes back as a `tool` message naming its call.
#[tokio::test]
async fn a_task_reads_tool_calls_and_answers_them() {
    use dispatcher::testing::TaskTest;
    use dispatcher::{task, Message, Request, TaskError};

    #[task]
    async fn use_tools(question: String) -> Result<Value, TaskError> {
        let mut chat = Request::chat()
            .user(question)
            .extra("tools", json!([{"type": "function", "function": {"name": "add",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]));
        let first = yield_request!(chat.clone())?;
        let calls = first.choices[0].tool_calls.clone().unwrap_or_default();
        chat.push(&first);
        for call in calls.as_array().into_iter().flatten() {
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("{}"))
                    .unwrap_or_default();
            let sum = args["a"].as_f64().unwrap_or(0.0) + args["b"].as_f64().unwrap_or(0.0);
            chat.push(Message::tool(
                call["id"].as_str().unwrap_or(""),
                sum.to_string(),
            ));
        }
        let last = yield_request!(chat)?;
        Ok(json!({"answer": last.text()}))
    }

    let run = TaskTest::new(use_tools)
        .respond_with(|req| {
            let body = req.to_json();
            let messages = body["messages"].as_array().unwrap();
            let answer = if messages.len() == 1 {
                json!({"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "call_7", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 40}"}}]},
                    "finish_reason": "tool_calls"}]})
            } else {
                assert_eq!(messages[1]["role"], "assistant");
                assert_eq!(messages[1]["content"], Value::Null);
                assert_eq!(messages[1]["tool_calls"][0]["id"], "call_7");
                assert_eq!(messages[2], json!({"role": "tool", "content": "42", "tool_call_id": "call_7"}));
                json!({"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "2 + 40 = 42"},
                    "finish_reason": "stop"}]})
            };
            Ok(dispatcher::Response::from_openai(answer).unwrap())
        })
        .run(json!("What is 2 + 40?"))
        .await;
    assert_eq!(run.requests.len(), 2);
    assert_eq!(run.output, json!({"answer": "2 + 40 = 42"}));
}
