//! The token out of sight, and text from workers kept off the terminal:
//! what a user of a shared node could read or do to the job's operator.

use super::*;

/// A secret given on the command line is in no file of the job; a token
/// read from `--token-file` works as `--token` does; an empty token is
/// refused rather than turning access control off.
#[test]
fn a_token_given_on_the_command_line_is_in_no_file_of_the_job() {
    let job = Job::new(12);
    let secret = "s3cret-0f-the-job";
    let server = job.serve(&["--token", secret, "--exit-grace", "1"]);
    let token_file = job.path("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    dispatcher_testkit::succeed(
        Command::new(BIN)
            .args([
                "infer",
                "--dispatcher",
                &server.addr,
                "--engine",
                "echo",
                "-q",
            ])
            .args(["--prompt-path", ".n | tostring"])
            .arg("--token-file")
            .arg(&token_file)
            .env_remove("DISPATCHER_TOKEN"),
    );
    let (code, stderr) = server.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(job.output_values().len(), 12);
    let manifest = std::fs::read_to_string(job.path("out.jsonl.manifest.json")).unwrap();
    assert!(manifest.contains("<redacted>"), "{manifest}");
    for entry in std::fs::read_dir(job.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path == token_file {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "{} holds the token",
            path.display()
        );
    }
    assert!(!stderr.contains(secret), "the server's log holds the token");

    // An empty token, from the flag or the variable, is refused.
    for (flag, env) in [(Some(""), None), (None, Some(""))] {
        let mut cmd = job.serve_command();
        if let Some(t) = flag {
            cmd.args(["--token", t]);
        }
        match env {
            Some(t) => cmd.env("DISPATCHER_TOKEN", t),
            None => cmd.env_remove("DISPATCHER_TOKEN"),
        };
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // clap takes an empty variable as unset: a server without a token.
        if flag.is_none() && out.status.success() {
            continue;
        }
        assert!(
            !out.status.success() && stderr.contains("empty"),
            "{flag:?} {env:?}: {stderr}"
        );
    }
    // --help says that a command line is visible.
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--token-file"), "{help}");
    assert!(help.contains("(`ps`)"), "{help}");
}

/// `status --watch` on a server that dies before its job is complete
/// says so and fails; a bad --interval is refused up front.
#[test]
fn status_watch_fails_when_the_server_dies_before_the_job_is_complete() {
    let job = Job::new(1_000);
    let server = job.serve(&[]);
    let mut watch = Command::new(BIN)
        .args([
            "status",
            "--watch",
            "--interval",
            "0.2",
            "--server",
            &server.addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    server.signal(libc::SIGKILL);
    let _ = server.wait(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "status --watch did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = watch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("not complete"), "{stderr}");
    assert!(stderr.contains("0 of 1000 lines"), "{stderr}");

    for bad in ["nan", "inf", "0", "-1", "1e9"] {
        let out = Command::new(BIN)
            .args(["status", "--server", "127.0.0.1:9"])
            .arg(format!("--interval={bad}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains("--interval"),
            "{bad}: {stderr}"
        );
    }
}

/// What a worker says of itself reaches the server's log and `dispatcher
/// status` with its control characters escaped: no screen cleared, no
/// title set, no line that looks like one of ours.
#[test]
fn text_from_workers_reaches_terminals_and_logs_escaped() {
    let job = Job::new(3);
    let server = job.serve(&[]);
    let nasty = "w1\u{1b}[2J\u{1b}]0;pwned\u{7}\nlines done   3 / 3";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let hello = serde_json::json!({"worker": nasty, "host": nasty, "task": "t\u{1b}[31m",
            "version": "1", "engine": "echo"});
        let r = http
            .post(format!("http://{}/hello", server.addr))
            .json(&hello)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let work = DispatcherClient::new(&server.addr)
            .get_work(1)
            .await
            .unwrap();
        let failed =
            serde_json::json!({"__ERROR__": {"error": "kind\u{1b}[2J\u{7}\nfake"}}).to_string();
        let mut item = work.items[0].clone();
        item.result = Some(failed);
        DispatcherClient::new(&server.addr)
            .submit(vec![item])
            .await
            .unwrap();
    });
    let out = Command::new(BIN)
        .args(["status", "--interval", "0.1", "--server", &server.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(text.contains("w1\\u{1b}[2J"), "{text}");
    assert!(text.contains("kind\\u{1b}[2J\\u{7}\\nfake 1"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("lines done")).count(),
        1,
        "{text}"
    );
    server.signal(libc::SIGTERM);
    let (_, stderr) = server.wait(Duration::from_secs(10));
    assert!(stderr.contains("worker said hello"), "{stderr}");
    assert!(
        !stderr.contains('\u{7}') && !stderr.contains("\u{1b}]0;"),
        "{stderr:?}"
    );
    assert!(stderr.contains("\\u{1b}]0;pwned"), "{stderr}");
}
