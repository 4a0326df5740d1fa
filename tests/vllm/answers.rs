//! The full answer on real vLLM (#39): log-probabilities (of the answer and
//! of the prompt) in the chat and the completion form, a reasoning parser's
//! trace, and a LoRA adapter picked per line, through `infer`.

use super::*;

/// Runs `dispatcher infer -i in.jsonl -o out.jsonl ARGS` in `dir` with
/// vLLM's environment to its end; its output lines.
async fn infer(dir: &std::path::Path, args: &[String]) -> Vec<Value> {
    let child = Command::new(dispatcher_bin())
        .args(["infer", "-i", "in.jsonl", "-o", "out.jsonl", "-q"])
        .args(args)
        .envs(VLLM_ENV)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(child, Duration::from_secs(300)).await;
    assert_eq!(code, 0, "{stderr}");
    crate::support::jsonl(dir.join("out.jsonl"))
}

/// One vLLM; `infer --logprobs 2` in chat mode and in completion mode: every
/// response carries a log-probability for each generated token (with the
/// two likeliest at its place, the likeliest first, and the sampled one
/// where vLLM adds it), and the tokens spell the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_keeps_vllms_log_probabilities_in_both_modes() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let (engine, port) = launch_vllm(&bin, &model).await;
    let url = format!("http://127.0.0.1:{port}");
    for mode in ["chat", "completion"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), chat_lines(3).0).unwrap();
        let out = infer(
            dir.path(),
            &strings(&[
                "--engine-url",
                &url,
                "--mode",
                mode,
                "--logprobs",
                "2",
                "--prompt-logprobs",
                "1",
                "--max-tokens",
                "8",
                "--include-usage",
            ]),
        )
        .await;
        for line in out {
            // The prompt's: one entry per prompt token, none for the first.
            let prompt = line["prompt_logprobs"]
                .as_array()
                .unwrap_or_else(|| panic!("{mode}: {line}"));
            assert_eq!(
                prompt.len() as u64,
                line["usage"]["prompt_tokens"].as_u64().unwrap(),
                "{mode}: {line}"
            );
            assert!(
                prompt[0].is_null() && prompt[1..].iter().all(Value::is_object),
                "{mode}: {line}"
            );
            let text = line["responses"][0].as_str().unwrap();
            let tokens = line["logprobs"][0]
                .as_array()
                .unwrap_or_else(|| panic!("{mode}: {line}"));
            assert_eq!(
                tokens.len() as u64,
                line["usage"]["completion_tokens"].as_u64().unwrap(),
                "{mode}: one per generated token: {line}"
            );
            let spelled: String = tokens
                .iter()
                .map(|t| t["token"].as_str().unwrap())
                .collect();
            assert!(
                spelled.starts_with(text),
                "{mode}: {spelled:?} spells {text:?}"
            );
            for t in tokens {
                assert!(t["logprob"].as_f64().unwrap() <= 0.0, "{mode}: {t}");
                // The two likeliest; vLLM adds the sampled token where it
                // is not one of them.
                let top = t["top"].as_array().unwrap();
                assert!((2..=3).contains(&top.len()), "{mode}: {t}");
                assert!(
                    top.windows(2)
                        .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()),
                    "{mode}: the likeliest first: {t}"
                );
            }
        }
    }
    drop(engine);
}

/// A reasoning model behind vLLM's reasoning parser (`deepseek_r1`; the tiny
/// model's tokenizer has the think markers), cut at `--max-tokens` while it
/// still thinks: vLLM answers `content: null` with the trace as
/// `reasoning_content`, and infer writes the response as null with the
/// trace beside it, not an empty string that throws the trace away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_answer_cut_while_thinking_keeps_its_trace_on_vllm() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), chat_lines(3).0).unwrap();
    let mut args = strings(&["--max-tokens", "6", "--temperature", "0", "--include-usage"]);
    let mut engine = engine_flags(&bin, &model, 512);
    let extra = engine
        .iter()
        .position(|a| a == "--vllm-extra-args")
        .unwrap()
        + 1;
    engine[extra].push_str(" --reasoning-parser deepseek_r1");
    args.extend(engine);
    let out = infer(dir.path(), &args).await;
    assert_eq!(out.len(), 3);
    for line in out {
        assert_eq!(line["responses"], json!([null]), "{line}");
        let trace = line["reasoning"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{line}"));
        assert!(!trace.is_empty(), "{line}");
        assert_eq!(line["finish_reasons"], json!(["length"]), "{line}");
    }
}

/// A LoRA adapter served beside the model (`--lora sql=PATH`, the worker
/// launching vLLM) answers the lines that name it as their `model`
/// (`--request-path .params`); the others get the base model. Greedy, the
/// same prompt: the adapter's answers differ from the base model's, and
/// every line gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lines_model_picks_the_lora_adapter_the_worker_serves() {
    let Some((bin, model)) = vllm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..4)
        .map(|i| {
            let mut line =
                json!({"messages": [{"role": "user", "content": "say hello to the world"}]});
            if i % 2 == 1 {
                line["params"] = json!({"model": "sql"});
            }
            line.to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("in.jsonl"), lines).unwrap();
    let lora = format!("sql={model}/lora-sql");
    let mut args = strings(&[
        "--request-path",
        ".params",
        "--lora",
        &lora,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        // One request at a time: vLLM 0.32's CPU backend applies an adapter
        // to every request of a batch that mixes it with the base model
        // (seen here; GPU builds batch them apart).
        "--max-in-flight",
        "1",
    ]);
    args.extend(engine_flags(&bin, &model, 512));
    let out = infer(dir.path(), &args).await;
    let text = |i: usize| out[i]["responses"][0].as_str().unwrap().to_string();
    assert_eq!(text(0), text(2), "the base model, greedy: {out:?}");
    assert_eq!(text(1), text(3), "the adapter, greedy: {out:?}");
    assert_ne!(text(0), text(1), "the adapter answered its lines: {out:?}");
}
