//! `dispatcher infer`'s built-in task with scripted replies: prompt selection
//! by jq, request fields, output shape and the error records.

use dispatcher::engine::{Choice, Response, Usage};
use dispatcher::infer::{Infer, InferConfig, InputFormat, Mode};
use dispatcher::testing::TaskTest;
use dispatcher::LineOutcome;
use serde_json::json;

fn infer(config: InferConfig) -> Infer {
    Infer::new(config).unwrap()
}

/// Answers with `n` choices `"<prompt> #i"` and usage 3/5.
fn honour_n(req: &dispatcher::Request) -> Result<Response, dispatcher::RequestError> {
    let j = req.to_json();
    let prompt = j["messages"].as_array().and_then(|m| m.last()).map_or_else(
        || j["prompt"].as_str().unwrap_or_default().to_string(),
        |m| m["content"].as_str().unwrap_or_default().to_string(),
    );
    let n = j["n"].as_u64().unwrap_or(1) as u32;
    Ok(Response {
        model: "m".into(),
        choices: (0..n)
            .map(|i| Choice {
                index: i,
                text: format!("{prompt} #{i}"),
                finish_reason: Some("stop".into()),
                ..Default::default()
            })
            .collect(),
        usage: Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
            total_tokens: 8,
        }),
        ..Default::default()
    })
}

#[tokio::test]
async fn defaults_select_the_first_message_and_keep_the_line() {
    let config = InferConfig {
        num_generations: 2,
        ..InferConfig::default()
    };
    let line = json!({"id": 7, "messages": [{"role": "user", "content": "Hi"}]});
    let run = TaskTest::new(infer(config))
        .respond_with(honour_n)
        .run(line.clone())
        .await;
    assert_eq!(run.output["id"], 7);
    assert_eq!(run.output["messages"], line["messages"]);
    assert_eq!(run.output["responses"], json!(["Hi #0", "Hi #1"]));
    assert!(run.output.get("usage").is_none());
    let req = run.requests[0].to_json();
    assert_eq!(
        (
            req["temperature"].as_f64(),
            req["top_p"].as_f64(),
            req["min_p"].as_f64(),
            req["max_tokens"].as_u64(),
            req["n"].as_u64()
        ),
        (Some(0.8), Some(0.95), Some(0.05), Some(4096), Some(2)),
        "the Python tool's defaults"
    );
    assert_eq!(req["messages"], json!([{"role": "user", "content": "Hi"}]));
}

#[tokio::test]
async fn jq_filters_completion_mode_stop_seed_system_and_usage() {
    let config = InferConfig {
        prompt_path: ".doc.parts[1] | ascii_upcase".into(),
        mode: Mode::Completion,
        stop: vec!["\n".into(), "END".into()],
        seed: Some(42),
        include_usage: true,
        ..InferConfig::default()
    };
    let run = TaskTest::new(infer(config))
        .respond_with(honour_n)
        .run(json!({"doc": {"parts": ["a", "second part"]}}))
        .await;
    assert_eq!(run.output["responses"], json!(["SECOND PART #0"]));
    assert_eq!(
        run.output["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );
    assert_eq!(run.output["finish_reasons"], json!(["stop"]));
    let req = run.requests[0].to_json();
    assert_eq!(req["prompt"], "SECOND PART");
    assert_eq!(req["stop"], json!(["\n", "END"]));
    assert_eq!(req["seed"], 42);

    let config = InferConfig {
        prompt_path: ".conversation".into(),
        system: Some("Be brief.".into()),
        ..InferConfig::default()
    };
    let run = TaskTest::new(infer(config))
        .respond_with(honour_n)
        .run(json!({"conversation": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}))
        .await;
    assert_eq!(run.output["responses"], json!(["c #0"]));
    assert_eq!(
        run.requests[0].to_json()["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        run.requests[0].to_json()["messages"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test]
async fn plain_text_is_kept_beside_the_responses() {
    let run = TaskTest::new(infer(InferConfig {
        prompt_path: ".".into(),
        ..InferConfig::default()
    }))
    .respond_with(honour_n)
    .run(json!("Tell me a joke"))
    .await;
    assert_eq!(
        run.output,
        json!({"text": "Tell me a joke", "responses": ["Tell me a joke #0"]})
    );

    let run = TaskTest::new(infer(InferConfig {
        input_format: InputFormat::Text,
        ..InferConfig::default()
    }))
    .respond_with(honour_n)
    .run_line("not json: just a prompt")
    .await;
    assert_eq!(
        run.output,
        json!({"text": "not json: just a prompt", "responses": ["not json: just a prompt #0"]})
    );
}

#[tokio::test]
async fn engines_that_ignore_n_are_asked_again() {
    let run = TaskTest::new(infer(InferConfig {
        num_generations: 3,
        ..InferConfig::default()
    }))
    .respond_with(|req| {
        let mut r = honour_n(req)?;
        r.choices.truncate(1);
        Ok(r)
    })
    .run(json!({"messages": [{"role": "user", "content": "x"}]}))
    .await;
    assert_eq!(run.output["responses"].as_array().unwrap().len(), 3);
    assert_eq!(run.requests.len(), 3);
}

#[tokio::test]
async fn a_missing_or_unusable_prompt_is_an_error_record_naming_the_path() {
    let t = || TaskTest::new(infer(InferConfig::default())).respond_with(honour_n);
    let run = t().run(json!({"prompt": "wrong field"})).await;
    assert_eq!(run.error_type(), Some("prompt_missing"));
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains(".messages[0].content"));
    assert_eq!(
        run.output["__ERROR__"]["task_data"],
        json!({"prompt": "wrong field"})
    );
    assert!(run.requests.is_empty(), "nothing sent for a bad line");

    let run = t().run_line("this is not json").await;
    assert_eq!(run.error_type(), Some("invalid_json"));
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("--input-format text"));

    let run = t()
        .run(json!({"messages": [{"role": "user", "content": 5}]}))
        .await;
    assert_eq!(run.error_type(), Some("prompt_not_string"));
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("a number"));

    let run = t().run(json!({"messages": "a string"})).await;
    assert_eq!(run.error_type(), Some("prompt_path_error"));
}

#[test]
fn a_bad_prompt_path_is_refused_before_any_work() {
    for bad in [".messages[0", "nosuchfilter(1)"] {
        let e = Infer::new(InferConfig {
            prompt_path: bad.into(),
            ..InferConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("--prompt-path") && e.contains(bad), "{e}");
    }
}

#[tokio::test]
async fn the_input_keeps_its_key_order_and_responses_come_last() {
    let line = r#"{"zeta": 1, "messages": [{"role": "user", "content": "Hi"}], "alpha": {"y": 2, "b": 3}}"#;
    let run = TaskTest::new(infer(InferConfig::default()))
        .respond_with(honour_n)
        .run_line(line)
        .await;
    let LineOutcome::Line { line: out, .. } = &run.outcome else {
        panic!("{:?}", run.outcome)
    };
    let keys: Vec<&String> = run.output.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["zeta", "messages", "alpha", "responses"], "{out}");
    // The line's own text, byte for byte (spacing too), then infer's field.
    assert_eq!(
        out,
        &format!(r#"{},"responses":["Hi #0"]}}"#, &line[..line.len() - 1])
    );
}
