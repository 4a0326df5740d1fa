//! `estimate`: prompt tokens counted through the model's own tokenizer and
//! chat template, before any engine runs.

use super::*;

/// The word-level test model: nine words, a chat template.
fn word_model() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/word-model")
}

/// `estimate` on a compressed input with the lines a real one has: prompts
/// counted through the chat template, lines that would fail (no prompt,
/// not UTF-8) by kind, a line over the context, the worst case and its cost.
#[test]
fn estimate_counts_a_gzipped_input_through_the_chat_template() {
    let job = Job::new(0);
    let mut input = Vec::new();
    for text in ["hello", "hello world", "hello world hello world"] {
        input.extend_from_slice(
            format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{text}\"}}]}}\n")
                .as_bytes(),
        );
    }
    input.extend_from_slice(b"{\"id\": 3}\n");
    input.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n");
    let plain = job.path("in.jsonl");
    std::fs::write(&plain, &input).unwrap();
    assert!(Command::new("gzip").arg(&plain).status().unwrap().success());
    let run = |extra: &[&str]| {
        let out = dispatcher_testkit::succeed(
            Command::new(BIN)
                .arg("estimate")
                .arg("--input")
                .arg(job.path("in.jsonl.gz"))
                .arg("--tokenizer")
                .arg(word_model())
                .args(["--max-tokens", "100", "--price-per-mtok-in", "1000000"])
                .args(extra),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let e: serde_json::Value =
        serde_json::from_str(&run(&["--json", "--max-model-len", "10"])).unwrap();
    // <|im_start|> user [words] <|im_end|> \n <|im_start|> assistant: 5 + words.
    assert_eq!(
        (e["lines"].as_u64(), e["counted"].as_u64()),
        (Some(5), Some(3)),
        "{e}"
    );
    assert_eq!(
        e["failing"],
        serde_json::json!({"invalid_utf8": 1, "prompt_missing": 1})
    );
    assert_eq!(e["prompt_tokens"], 6 + 7 + 9);
    assert_eq!(
        (
            e["prompt_tokens_p50"].as_u64(),
            e["prompt_tokens_max"].as_u64()
        ),
        (Some(7), Some(9))
    );
    // Nothing fits a context of 10 but 10 - 6 and 10 - 7 more tokens; none
    // over it.
    assert_eq!(e["over_length"], 0);
    assert_eq!(e["completion_tokens_worst"], 4 + 3 + 1);
    assert_eq!(e["prompt_cost"], 22.0, "a million a token: 22");
    let e: serde_json::Value =
        serde_json::from_str(&run(&["--json", "--max-model-len", "7"])).unwrap();
    assert_eq!(
        e["over_length"], 2,
        "7 and 9 tokens leave no room in 7: {e}"
    );
    assert_eq!(e["completion_tokens_worst"], 1);
    // The model's own context (its config.json) without --max-model-len; as text.
    let text = run(&[
        "--mode",
        "completion",
        "--prompt-path",
        ".messages[0].content",
    ]);
    assert!(text.contains("leave no room in 2,048 tokens"), "{text}");
    // Completion prompts: the words and the tokenizer's <s>.
    assert!(text.contains("prompt tokens    10 in all"), "{text}");
}

/// Lines whose messages hold images: their text parts are counted, and
/// the parts that are not text are said to be left out, not counted as the
/// JSON of a data URL.
#[test]
fn estimate_counts_the_text_of_messages_with_images_and_says_what_it_left_out() {
    let job = Job::new(0);
    let image = serde_json::json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(5000))}});
    let lines = [
        serde_json::json!({"messages": [{"role": "user", "content": "hello world"}]}),
        serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello world"}, image.clone(), image]}]}),
    ];
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(job.path("in.jsonl"), text).unwrap();
    let out = dispatcher_testkit::succeed(
        Command::new(BIN)
            .arg("estimate")
            .arg("--input")
            .arg(job.path("in.jsonl"))
            .arg("--tokenizer")
            .arg(word_model())
            .args(["--prompt-path", ".messages"]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // Both lines: 5 + 2 words each.
    assert!(text.contains("prompt tokens    14 in all"), "{text}");
    assert!(text.contains("not counted      2 content parts"), "{text}");
}
