//! Tasks run with scripted replies: the examples' behaviour and the failure
//! semantics every task gets from `#[task]`.

use dispatcher::engine::{RequestError, Response};
use dispatcher::task;
use dispatcher::testing::{reply, TaskTest};
use dispatcher::{Request, TaskContext, TaskError};
use serde_json::json;

// The examples' tasks, compiled into this test binary; their `main`s (the
// task binaries' entry points) are not called here.
#[allow(dead_code)]
#[path = "../examples/compare_responses.rs"]
mod compare_example;
#[allow(dead_code)]
#[path = "../examples/critique_and_revise.rs"]
mod critique_example;
#[allow(dead_code)]
#[path = "../examples/generate_and_judge.rs"]
mod judge_example;
#[allow(dead_code)]
#[path = "../examples/validated_response.rs"]
mod validated_example;

use compare_example::{compare_responses, verdict};
use validated_example::validated_response;

fn conversation() -> serde_json::Value {
    json!({"messages": [{"role": "user", "content": "Name a prime."}]})
}

#[tokio::test]
async fn compare_sends_two_candidates_then_a_judge_and_keeps_the_preferred_one() {
    let run = TaskTest::new(compare_responses)
        .replies(["two", "seven", "B"])
        .run(conversation())
        .await;
    assert_eq!(run.output["preferred_text"], "seven");
    assert_eq!(run.output["dispreferred_text"], "two");
    assert_eq!(run.output["messages"], conversation()["messages"]);
    assert_eq!(run.output["judge_model"], "scripted");
    assert_eq!(run.requests.len(), 3);
    let (a, b) = (run.requests[0].to_json(), run.requests[1].to_json());
    assert_eq!(a["messages"], conversation()["messages"]);
    assert_ne!(a["seed"], b["seed"], "two distinct samples");
    let judge = run.requests[2].to_json();
    let prompt = judge["messages"][1]["content"].as_str().unwrap();
    assert!(
        prompt.contains("Response A:\ntwo") && prompt.contains("Response B:\nseven"),
        "{prompt}"
    );
}

#[tokio::test]
async fn compare_fails_the_line_when_the_judge_answers_neither_a_nor_b() {
    let run = TaskTest::new(compare_responses)
        .replies(["x", "y", "Both are fine."])
        .run(conversation())
        .await;
    assert_eq!(run.error_type(), Some("judge_response_invalid"));
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("Both are fine."));
    assert_eq!(run.output["__ERROR__"]["task_data"], conversation());
}

#[test]
fn verdicts_are_read_from_bare_letters_and_first_mentions() {
    for (answer, expected) in [
        ("A", Some('A')),
        (" \"B\". ", Some('B')),
        ("Answer: B", Some('B')),
        ("Response B is clearer than A", Some('B')),
        ("Neither", None),
        ("", None),
    ] {
        assert_eq!(verdict(answer), expected, "{answer:?}");
    }
}

#[tokio::test]
async fn validated_response_retries_without_the_marker_and_gives_up_on_the_last_attempt() {
    let input = json!({"prompt": "Count to three."});
    let ok = TaskTest::new(validated_response)
        .replies(["1 2 3 DONE"])
        .attempt(1, Some(3))
        .run(input.clone())
        .await;
    assert_eq!(ok.output["response"], "1 2 3 DONE");
    assert_eq!(
        ok.output["task_metadata"],
        json!({"success": true, "retry_count": 1, "max_retries": 3})
    );

    let retry = TaskTest::new(validated_response)
        .replies(["1 2 3"])
        .run(input.clone())
        .await;
    assert!(
        matches!(&retry.outcome, dispatcher::LineOutcome::Retry(why) if why.contains("DONE")),
        "{:?}",
        retry.outcome
    );

    let last = TaskTest::new(validated_response)
        .replies(["1 2 3"])
        .attempt(3, Some(3))
        .run(input)
        .await;
    assert_eq!(last.error_type(), Some("retries_exhausted"));
}

#[derive(serde::Deserialize)]
struct Numbers {
    values: Vec<u32>,
}

/// Asks once per value, all in parallel.
#[task]
async fn fan_out(input: Numbers) -> Result<Vec<String>, TaskError> {
    let requests: Vec<Request> = input
        .values
        .iter()
        .map(|v| Request::completion(v.to_string()))
        .collect();
    let responses = yield_request!(requests)?;
    Ok(responses.iter().map(|r| r.text().to_string()).collect())
}

#[tokio::test]
async fn parallel_requests_come_back_in_request_order() {
    // The script answers by content, so order of arrival does not matter.
    let run = TaskTest::new(fan_out)
        .respond_with(|req| {
            let prompt = req.to_json()["prompt"].as_str().unwrap().to_string();
            Ok(reply(format!("r{prompt}")))
        })
        .run(json!({"values": [5, 1, 9]}))
        .await;
    assert_eq!(run.output, json!(["r5", "r1", "r9"]));
}

/// A task that fails in every way a task can.
#[task]
async fn troublesome(input: String, ctx: TaskContext) -> Result<String, TaskError> {
    match input.as_str() {
        "panic" => panic!("boom at work_id {}", ctx.work_id()),
        "fail" => Err(TaskError::failed("too_short", "the input is too short")),
        "ask" => {
            let r = yield_request!(Request::chat().user("hi"))?;
            Ok(r.text().to_string())
        }
        _ => Ok(format!("{input} ok")),
    }
}

#[tokio::test]
async fn failures_become_records_with_the_input_as_task_data() {
    let run = TaskTest::new(troublesome).run(json!("panic")).await;
    assert_eq!(run.error_type(), Some("task_panicked"));
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("boom at work_id 0"));
    assert_eq!(run.output["__ERROR__"]["task_data"], "panic");

    let run = TaskTest::new(troublesome).run(json!("fail")).await;
    assert_eq!(
        run.output,
        json!({"__ERROR__": {"error": "too_short", "message": "the input is too short", "task_data": "fail"}})
    );

    let run = TaskTest::new(troublesome).run_line("{not json").await;
    assert_eq!(run.error_type(), Some("invalid_input"));
    assert_eq!(run.output["__ERROR__"]["task_data"], "{not json");

    let run = TaskTest::new(troublesome).run(json!(17)).await;
    assert_eq!(
        run.error_type(),
        Some("invalid_input"),
        "a number is not a String"
    );
}

#[tokio::test]
async fn a_refused_request_fails_the_line_and_a_dead_engine_stops_the_worker() {
    let run = TaskTest::new(troublesome)
        .respond_with(|_| {
            Err(RequestError::Rejected {
                status: 400,
                message: "the prompt exceeds the context size".into(),
            })
        })
        .run(json!("ask"))
        .await;
    assert_eq!(run.error_type(), Some("request_rejected"));
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("context size"));

    let run = TaskTest::new(troublesome)
        .respond_with(|_| Err(RequestError::Unavailable("connection refused".into())))
        .run(json!("ask"))
        .await;
    assert!(matches!(
        run.outcome,
        dispatcher::LineOutcome::EngineUnavailable(_)
    ));
}

#[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
struct Verdict {
    score: u32,
    reason: String,
}

/// Structured output through `json::<T>()`.
#[task]
async fn score(input: String) -> Result<Verdict, TaskError> {
    let schema = json!({"type": "object", "properties": {"score": {"type": "integer"}, "reason": {"type": "string"}}});
    let r: Response = yield_request!(Request::chat().user(input).json_schema("verdict", schema))?;
    Ok(r.json::<Verdict>()?)
}

#[tokio::test]
async fn structured_output_parses_or_fails_the_line() {
    let run = TaskTest::new(score)
        .replies([r#"{"score": 4, "reason": "clear"}"#])
        .run(json!("rate this"))
        .await;
    assert_eq!(run.output, json!({"score": 4, "reason": "clear"}));
    assert_eq!(
        run.requests[0].to_json()["response_format"]["type"],
        "json_schema"
    );
    let run = TaskTest::new(score)
        .replies(["four"])
        .run(json!("rate"))
        .await;
    assert_eq!(run.error_type(), Some("response_not_json"));
}

#[tokio::test]
async fn generate_and_judge_answers_on_the_default_engine_and_grades_on_the_judge() {
    let run = TaskTest::new(judge_example::generate_and_judge)
        .respond_with(|r| {
            Ok(match r.engine.as_deref() {
                None => reply("Paris."),
                Some("judge") => Response {
                    model: "big-judge".into(),
                    ..reply("Score: 9. Reason: correct.")
                },
                Some(other) => panic!("no engine {other}"),
            })
        })
        .run(json!({"question": "Capital of France?"}))
        .await;
    assert_eq!(run.output["answer"], "Paris.");
    assert_eq!(run.output["score"], 9);
    assert_eq!(run.output["judge_model"], "big-judge");
    let engines: Vec<_> = run.requests.iter().map(|r| r.engine.clone()).collect();
    assert_eq!(engines, vec![None, Some("judge".to_string())]);
    let graded = &run.requests[1].to_json()["messages"][1]["content"];
    assert_eq!(graded, "Question: Capital of France?\n\nAnswer: Paris.");
}

#[test]
fn a_judges_score_is_the_first_number_from_one_to_ten() {
    use judge_example::score_of;
    assert_eq!(score_of("Score: 7. Reason: fine"), Some(7));
    assert_eq!(score_of("0 issues; score 10/10"), Some(10));
    assert_eq!(score_of("I give it 42, then 3"), Some(3));
    assert_eq!(score_of("no score here"), None);
}

#[tokio::test]
async fn critique_and_revise_grows_one_conversation_over_three_turns() {
    let run = TaskTest::new(critique_example::critique_and_revise)
        .replies([
            "Paris.",
            "It lacks a reason.",
            "Paris, the seat of government.",
        ])
        .run(json!({"question": "Capital of France?"}))
        .await;
    assert_eq!(run.output["answer"], "Paris, the seat of government.");
    assert_eq!(run.output["critique"], "It lacks a reason.");
    assert_eq!(run.requests.len(), 3);
    let turns: Vec<Vec<(String, String)>> = run
        .requests
        .iter()
        .map(|r| {
            r.to_json()["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["role"].as_str().unwrap().into(),
                        m["content"].as_str().unwrap().into(),
                    )
                })
                .collect()
        })
        .collect();
    assert_eq!(turns[0].len(), 1);
    assert_eq!(turns[1].len(), 3);
    assert_eq!(turns[2].len(), 5);
    assert_eq!(turns[2][1], ("assistant".into(), "Paris.".into()));
    assert_eq!(
        turns[2][3],
        ("assistant".into(), "It lacks a reason.".into())
    );
    assert_eq!(turns[2][4].0, "user");
}

/// An error type of the task's own, with the conversion `?` needs.
#[derive(Debug)]
enum GradeError {
    NoDigit(String),
}

impl From<GradeError> for TaskError {
    fn from(e: GradeError) -> TaskError {
        match e {
            GradeError::NoDigit(text) => {
                TaskError::failed("no_digit", format!("no digit in {text:?}"))
            }
        }
    }
}

impl From<dispatcher::RequestError> for GradeError {
    fn from(e: dispatcher::RequestError) -> GradeError {
        GradeError::NoDigit(e.to_string())
    }
}

#[task]
async fn grade(input: String) -> Result<u32, GradeError> {
    let r = yield_request!(Request::chat().user(input))?;
    r.text()
        .chars()
        .find_map(|c| c.to_digit(10))
        .ok_or_else(|| GradeError::NoDigit(r.text().to_string()))
}

#[task]
async fn first_word(input: String) -> Result<String, TaskError> {
    use dispatcher::OrFail;
    let r = yield_request!(Request::chat().user(&input))?;
    let word = r.text().split_whitespace().next().or_fail("empty_answer")?;
    let n: u32 = word.parse().or_fail("not_a_number")?;
    Ok(format!("{input}: {n}"))
}

/// `yield_request!` inside another macro's arguments is rewritten too.
#[task]
async fn in_macro_args(input: String) -> Result<Vec<String>, TaskError> {
    let line = format!(
        "{} / {}",
        yield_request!(Request::chat().user(&input))?.text(),
        input
    );
    Ok(vec![
        line,
        yield_request!(Request::completion("more"))?
            .text()
            .to_string(),
    ])
}

#[tokio::test]
async fn a_tasks_own_error_type_and_or_fail_become_failure_records() {
    let run = TaskTest::new(grade)
        .replies(["grade: 7"])
        .run(json!("essay"))
        .await;
    assert_eq!(run.output, json!(7));
    let run = TaskTest::new(grade)
        .replies(["none"])
        .run(json!("essay"))
        .await;
    assert_eq!(
        run.output["__ERROR__"]["error"], "no_digit",
        "{}",
        run.output
    );

    let run = TaskTest::new(first_word)
        .replies(["42 is it"])
        .run(json!("q"))
        .await;
    assert_eq!(run.output, json!("q: 42"));
    let run = TaskTest::new(first_word)
        .replies([""])
        .run(json!("q"))
        .await;
    assert_eq!(run.output["__ERROR__"]["error"], "empty_answer");
    let run = TaskTest::new(first_word)
        .replies(["many"])
        .run(json!("q"))
        .await;
    assert_eq!(run.output["__ERROR__"]["error"], "not_a_number");
    assert!(run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid digit"));

    let run = TaskTest::new(in_macro_args)
        .replies(["a", "b"])
        .run(json!("x"))
        .await;
    assert_eq!(run.output, json!(["a / x", "b"]));
}

#[derive(serde::Deserialize)]
struct Needs {
    #[allow(dead_code)]
    question: String,
}

#[task]
async fn needs_a_question(input: Needs) -> Result<(), TaskError> {
    let _ = input;
    Ok(())
}

#[tokio::test]
async fn input_that_does_not_fit_names_its_line_and_column() {
    let ctx = dispatcher::testing::TaskTest::new(needs_a_question);
    let run = ctx.work_id(3).run(json!({"prompt": "hi"})).await;
    let message = run.output["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with(
            "input line 4 (work_id 3) does not fit the task's input type: missing field `question`"
        ),
        "{message}"
    );
    assert!(message.ends_with("(at column 15)"), "{message}");
    assert!(!message.contains("line 1"), "{message}");
}

/// An engine whose answers differ every time (as at temperature > 0).
fn random_replies() -> impl Fn(&Request) -> Result<Response, dispatcher::RequestError> + Send + Sync
{
    let n = std::sync::atomic::AtomicU64::new(0);
    move |_| {
        let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(reply(format!("sample {}", k * 7919 % 1000)))
    }
}

#[tokio::test]
async fn a_reissued_line_replays_the_requests_its_journal_has_and_sends_only_the_rest() {
    let question = json!({"question": "Capital of France?"});
    let first = TaskTest::new(critique_example::critique_and_revise)
        .respond_with(random_replies())
        .run(question.clone())
        .await;
    assert_eq!(first.journal.len(), 3);
    // As if the first worker died after its second request: two entries.
    let recorded: Vec<_> = first.journal[..2].to_vec();
    let second = TaskTest::new(critique_example::critique_and_revise)
        .respond_with(|_| Ok(reply("the third answer")))
        .journal(recorded)
        .run(question)
        .await;
    assert_eq!(second.replayed, 2);
    assert_eq!(second.requests.len(), 1, "only the third request is sent");
    // The replayed responses are the recorded ones, not new samples.
    assert_eq!(second.output["draft"], first.output["draft"]);
    assert_eq!(second.output["critique"], first.output["critique"]);
    assert_eq!(second.output["answer"], "the third answer");
    assert_eq!(second.journal.len(), 1);
    assert_eq!(second.journal[0].seq, 2);
}

#[tokio::test]
async fn answers_recorded_under_another_model_are_not_replayed() {
    let question = json!({"question": "Capital of France?"});
    let first = TaskTest::new(critique_example::critique_and_revise)
        .model("model-a")
        .respond_with(random_replies())
        .run(question.clone())
        .await;
    let elsewhere = TaskTest::new(critique_example::critique_and_revise)
        .model("model-b")
        .respond_with(|_| Ok(reply("live")))
        .journal(first.journal.clone())
        .run(question.clone())
        .await;
    assert_eq!((elsewhere.replayed, elsewhere.requests.len()), (0, 3));
    let same = TaskTest::new(critique_example::critique_and_revise)
        .model("model-a")
        .respond_with(|_| Ok(reply("live")))
        .journal(first.journal)
        .run(question)
        .await;
    assert_eq!((same.replayed, same.requests.len()), (3, 0));
}

/// `critique_and_revise` with a different second request: a changed task.
#[task]
async fn critique_differently(input: critique_example::Question) -> Result<String, TaskError> {
    let mut chat = Request::chat().user(&input.question).max_tokens(1024);
    let draft = yield_request!(chat.clone())?;
    chat.push(&draft);
    chat.push(dispatcher::Message::user(
        "List three flaws of your answer.",
    ));
    let critique = yield_request!(chat.clone())?;
    chat.push(&critique);
    chat.push(dispatcher::Message::user("Revise it."));
    Ok(yield_request!(chat)?.text().to_string())
}

#[tokio::test]
async fn a_changed_task_replays_up_to_the_change_and_runs_the_rest_live() {
    let question = json!({"question": "Capital of France?"});
    let first = TaskTest::new(critique_example::critique_and_revise)
        .respond_with(random_replies())
        .run(question.clone())
        .await;
    let changed = TaskTest::new(critique_differently)
        .respond_with(|_| Ok(reply("live")))
        .journal(first.journal.clone())
        .run(question)
        .await;
    // The first request is the same and replays; the second differs: it and
    // everything after it go to the engine, even the third, whose fingerprint
    // could match by chance.
    assert_eq!(changed.replayed, 1);
    assert_eq!(changed.requests.len(), 2);
    assert_eq!(changed.output, "live");
}

#[tokio::test]
async fn requests_sent_together_replay_together() {
    let input = conversation();
    let first = TaskTest::new(compare_responses)
        .respond_with(|r| {
            // Two candidates in parallel, then the judge.
            let judging = r.max_tokens == Some(8);
            Ok(reply(if judging { "A" } else { "a candidate" }))
        })
        .run(input.clone())
        .await;
    let candidates = first.journal.iter().filter(|e| e.seq < 2).count();
    assert_eq!(candidates, 2);
    // Both candidates recorded, not the judge: the pair replays, the judge runs.
    let pair: Vec<_> = first
        .journal
        .iter()
        .filter(|e| e.seq < 2)
        .cloned()
        .collect();
    let second = TaskTest::new(compare_responses)
        .respond_with(|_| Ok(reply("A")))
        .journal(pair.clone())
        .run(input.clone())
        .await;
    assert_eq!((second.replayed, second.requests.len()), (2, 1));
    // Only one of the pair recorded (a worker died between them): both run again.
    let third = TaskTest::new(compare_responses)
        .respond_with(|_| Ok(reply("A")))
        .journal(pair[..1].to_vec())
        .run(input)
        .await;
    assert_eq!((third.replayed, third.requests.len()), (0, 3));
}

/// A task that parses its answer with serde_json directly.
#[task]
async fn parse_score(input: critique_example::Question) -> Result<u32, TaskError> {
    use dispatcher::OrFail;
    let answer = yield_request!(Request::chat().user(&input.question))?;
    let parsed: serde_json::Value = serde_json::from_str(answer.text())?;
    parsed["score"]
        .as_u64()
        .map(|s| s as u32)
        .or_fail("no_score")
}

/// `?` on a `serde_json::Error` compiles and fails the line with its own kind.
#[tokio::test]
async fn a_serde_json_error_fails_the_line_as_json_error() {
    let question = json!({"question": "Rate it."});
    let good = TaskTest::new(parse_score)
        .replies([r#"{"score": 7}"#])
        .run(question.clone())
        .await;
    assert_eq!(good.output, 7);
    let bad = TaskTest::new(parse_score)
        .replies(["seven"])
        .run(question)
        .await;
    assert_eq!(bad.error_type(), Some("json_error"));
}

/// A judge as a user writes it before any GPU is at hand: three samples, the
/// longest kept, graded by the same model, the grade parsed from its answer.
#[task]
async fn best_of_three_judged(
    input: critique_example::Question,
) -> Result<serde_json::Value, TaskError> {
    use dispatcher::OrFail;
    let samples: Vec<Request> = (0..3)
        .map(|seed| {
            Request::chat()
                .user(format!("Question: {}", input.question))
                .seed(seed)
        })
        .collect();
    let answers = yield_request!(samples)?;
    let best = answers
        .iter()
        .map(|r| r.text())
        .max_by_key(|t| t.len())
        .unwrap_or_default()
        .to_string();
    let verdict = yield_request!(Request::chat().user(format!("Rate this answer: {best}")))?;
    let score: u8 = verdict
        .text()
        .split_once("Score: ")
        .and_then(|(_, rest)| rest.split('/').next()?.trim().parse().ok())
        .or_fail("no_score")?;
    Ok(json!({"best": best, "score": score}))
}

/// `--echo-script` drives a task's parsing in a dry run: samples that differ
/// by seed, a judge's answer in the shape the task parses, a known score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_script_drives_a_judge_task_to_a_known_score() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let (script, input, output) = (
        dir.path().join("replies.txt"),
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
    );
    std::fs::write(
        &script,
        "# Samples of varying length, by seed.\n\
         match: ^Question: (?P<q>.*)\n\
         reply: {pick:Short.|A much longer answer about {q}.|Medium answer.}\n\
         \n\
         # The judge, in the shape the task parses.\n\
         match: ^Rate this answer\n\
         reply: Fine.\\nScore: 7/10\n",
    )
    .unwrap();
    std::fs::write(
        &input,
        "{\"question\": \"cats\"}\n{\"question\": \"dogs\"}\n",
    )
    .unwrap();
    let run = |script_flag: &str, script: &std::path::Path| {
        dispatcher::cli::TaskCli::try_parse_from([
            "judge".as_ref(),
            "--engine".as_ref(),
            "echo".as_ref(),
            script_flag.as_ref(),
            script.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            output.as_os_str(),
        ])
        .unwrap()
    };
    let cli = run("--echo-script", &script);
    dispatcher::cli::worker::run_task(&best_of_three_judged, &cli.engine, &cli.work)
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = crate::support::jsonl(&output);
    assert_eq!(
        lines,
        [
            json!({"best": "A much longer answer about cats.", "score": 7}),
            json!({"best": "A much longer answer about dogs.", "score": 7}),
        ]
    );

    // A mistake in the script stops the run before it starts, naming the line.
    std::fs::write(&script, "match: ^Rate\nreply: Score: {score}\n").unwrap();
    std::fs::remove_file(&output).unwrap();
    let cli = run("--echo-script", &script);
    let error = dispatcher::cli::worker::run_task(&best_of_three_judged, &cli.engine, &cli.work)
        .await
        .unwrap_err();
    let expected = format!("{}:2: unknown placeholder {{score}}", script.display());
    assert!(format!("{error:#}").contains(&expected), "{error:#}");
    assert!(!output.exists());
}

/// A two-step task, for reading every field of what `TaskTest::run` gives.
#[task]
async fn draft_and_rate(input: String) -> Result<String, TaskError> {
    let draft = yield_request!(Request::chat().user(format!("Write about {input}")))?;
    let rating = yield_request!(Request::chat().user(format!("Rate this: {}", draft.text())))?;
    Ok(format!("{} ({})", draft.text(), rating.text()))
}

/// Every field of `TaskRun`, as the README's table names them: the output,
/// the outcome, the requests in order, the journal, and what a rerun with
/// that journal replays.
#[tokio::test]
async fn a_task_runs_fields_are_what_the_readme_says() {
    use dispatcher::LineOutcome;
    let run = TaskTest::new(draft_and_rate)
        .replies(["A draft.", "Score: 7"])
        .run(json!("tea"))
        .await;
    assert_eq!(run.output, json!("A draft. (Score: 7)"));
    assert_eq!(run.error_type(), None);
    match &run.outcome {
        LineOutcome::Line { line, .. } => assert_eq!(line, "\"A draft. (Score: 7)\""),
        other => panic!("{other:?}"),
    }
    let sent: Vec<String> = run
        .requests
        .iter()
        .map(|r| {
            r.to_json()["messages"][0]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(sent, ["Write about tea", "Rate this: A draft."]);
    assert_eq!(run.journal.len(), 2);
    assert_eq!(run.replayed, 0);

    // A reissued line with that journal asks the engine nothing again.
    let again = TaskTest::new(draft_and_rate)
        .replies(Vec::<String>::new())
        .journal(run.journal.clone())
        .run(json!("tea"))
        .await;
    assert_eq!(again.replayed, 2);
    assert!(again.requests.is_empty());
    assert_eq!(again.output, run.output);
}
