//! A launched job is its own: its workers prove it, and a launch of another
//! input on its output neither watches nor takes it over (#38 items 1, 2).

use super::*;

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A launched job takes lines only from its own workers: on a fixed port
/// where another job ran, workers of that job (holding its token) and a
/// worker started by hand (no token) are refused, and the server says so
/// in its log; every line is answered by the job's own worker command.
#[test]
fn a_launched_job_takes_no_lines_from_workers_not_its_own() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(300);
    let port = free_port().to_string();
    let mut launch = job.start(
        0,
        &["--backend", "local", "--max-workers", "1", "--port", &port],
        &args(&echo_worker(400)),
    );
    job.wait_lines(&rt, 10);
    let token = std::fs::read_to_string(job.path("out.jsonl.launch/token")).unwrap();
    assert_eq!(token.trim().len(), 32, "a token of 128 bits: {token}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(job.path("out.jsonl.launch/token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "only its owner reads the token");
    // Workers that would answer every line "intruder": one with another
    // job's token, one with none.
    let intruders: Vec<Child> = [Some("the-token-of-another-job"), None]
        .into_iter()
        .map(|token| {
            let mut cmd = Command::new(dispatcher_bin());
            cmd.args(["infer", "--engine", "echo", "--echo-reply", "intruder"])
                .args(["--dispatcher", &format!("127.0.0.1:{port}")])
                .env_remove("DISPATCHER_TOKEN")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(token) = token {
                cmd.env("DISPATCHER_TOKEN", token);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    // The server says it refused both.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(job.path("out.jsonl.launch/server.log")).unwrap();
        if log.contains("refused request(s) without this job's token")
            && log.contains("refused request(s) with another token than this job's token")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        wait(&mut launch, Duration::from_secs(120)),
        0,
        "{}",
        job.said(0)
    );
    for mut intruder in intruders {
        let _ = intruder.kill();
        let _ = intruder.wait();
    }
    job.check_output();
}

/// A launch whose output already has a running job of another input (a
/// launch of it running, or its server left after launch was killed) is
/// refused, naming the input, instead of watching or taking over a job
/// that answers another input.
#[test]
fn a_launch_of_another_input_neither_watches_nor_takes_over_the_job() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(300);
    std::fs::write(
        job.path("other.jsonl"),
        question_lines(300).replace("question", "other question"),
    )
    .unwrap();
    let flags = ["--backend", "local", "--max-workers", "1"];
    let mut first = job.start(0, &flags, &args(&echo_worker(200)));
    job.wait_lines(&rt, 20);
    let other = |n: u32| {
        let mut child = Command::new(dispatcher_bin())
            .args([
                "launch",
                "--input",
                "other.jsonl",
                "--output",
                "out.jsonl",
                "--poll",
                "0.3",
            ])
            .args(flags)
            .arg("--")
            .args(echo_worker(5))
            .current_dir(job.dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(job.path(&format!("launch-{n}.out"))).unwrap())
            .stderr(std::fs::File::create(job.path(&format!("launch-{n}.err"))).unwrap())
            .spawn()
            .unwrap();
        let code = wait(&mut child, Duration::from_secs(30));
        let said = job.said(n);
        assert_eq!(code, 1, "{said}");
        assert!(
            said.contains("--input other.jsonl") && said.contains("runs on another input"),
            "{said}"
        );
    };
    // While the first launch runs: no watching.
    other(1);
    // Launch killed, its server and workers left: no taking over.
    first.kill().unwrap();
    first.wait().unwrap();
    other(2);
    // The job's own input takes it over and completes it.
    let mut again = job.start(3, &flags, &args(&echo_worker(5)));
    assert_eq!(
        wait(&mut again, Duration::from_secs(120)),
        0,
        "{}",
        job.said(3)
    );
    job.check_output();
}
