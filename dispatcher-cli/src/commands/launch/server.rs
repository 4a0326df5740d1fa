//! The server `launch` works with: started (in its own process group,
//! logging to `server.log`), or attached to.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ArgMatches;
use dispatcher_core::client::DispatcherClient;

use super::*;

/// The server `launch` works with.
pub(super) struct ServerHandle {
    pub(super) record: ServerRecord,
    /// Started by this launch, or by an earlier one on this host: stopped
    /// (after its checkpoint) when the job is stopped.
    pub(super) owned: bool,
    pub(super) child: Option<tokio::process::Child>,
}

impl ServerHandle {
    /// Whether the server process is gone, and how it ended (`Ok` for exit
    /// status 0, else in words); `None` while it runs or when it is not
    /// ours. The exit status of a server an earlier launch started is not
    /// ours to read: gone, it is said to be gone (a server that completed
    /// the job was seen complete before it exited).
    pub(super) fn exited(&mut self) -> Option<Result<(), String>> {
        if let Some(child) = &mut self.child {
            return child.try_wait().ok().flatten().map(ended);
        }
        match self.record.pid {
            Some(pid) if self.owned && !self.is_running(pid) => Some(Err(format!(
                "(process {pid}, started by an earlier launch) is gone, how is unknown here (killed? its log may say)"
            ))),
            _ => None,
        }
    }

    /// Whether `pid` is still the server's process (not one that reused
    /// its id).
    fn is_running(&self, pid: u32) -> bool {
        dispatcher_core::process::running(pid, self.record.pid_start)
    }

    /// SIGTERM (the server checkpoints and exits), then waits up to a minute.
    pub(super) async fn stop(&mut self) {
        if !self.owned {
            return;
        }
        let Some(pid) = self.record.pid.filter(|&pid| self.is_running(pid)) else {
            return;
        };
        dispatcher_core::process::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && self.exited().is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How the server ended, when not with status 0: in words that say what to
/// do.
fn ended(status: std::process::ExitStatus) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (_, Some(sig @ libc::SIGKILL)) => Err(format!(
            "was killed by signal {sig} (SIGKILL: by hand, or by the kernel's out-of-memory killer, which `dmesg` names); its log may not say why"
        )),
        (_, Some(sig)) => Err(format!("was killed by signal {sig}; its log may say why")),
        (code, None) => Err(format!(
            "exited with status {}: fix what its log says",
            code.map_or("?".into(), |c| c.to_string())
        )),
    }
}

pub(super) enum Started {
    Server(Box<ServerHandle>),
    AlreadyComplete,
    Interrupted,
}

/// Attaches to `--server`, to the server an earlier launch started, or
/// starts `dispatcher serve` with the job's flags in the background.
pub(super) async fn start_or_attach(
    args: &LaunchArgs,
    matches: &ArgMatches,
    dir: &LaunchDir,
    state: &mut LaunchState,
    token: Option<&str>,
    ui: &mut Ui,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<Started> {
    if let Some(addr) = &args.launch.server {
        let client = DispatcherClient::with_token(addr, token);
        client
            .status()
            .await
            .with_context(|| format!("--server {addr}"))?;
        return Ok(Started::Server(Box::new(ServerHandle {
            record: ServerRecord {
                addr: addr.clone(),
                pid: None,
                pid_start: None,
                host: String::new(),
            },
            owned: false,
            child: None,
        })));
    }
    if let Some(saved) = state.server.clone() {
        // Its process, not another that took its id since.
        let ours = saved.host == crate::worker::hostname()
            && saved
                .pid
                .is_some_and(|pid| dispatcher_core::process::running(pid, saved.pid_start));
        let client = DispatcherClient::with_token(&saved.addr, token);
        if ours || client.status().await.is_ok() {
            // Taken over only when it runs this job's input.
            identity::check_same_input(args)?;
            ui.event(&format!(
                "attaching to the server an earlier launch started at {}",
                saved.addr
            ));
            return Ok(Started::Server(Box::new(ServerHandle {
                owned: ours,
                record: saved,
                child: None,
            })));
        }
    }

    // Start `dispatcher serve` in its own process group (a Ctrl-C reaches
    // launch, which stops it after the workers), logging to server.log.
    // The token reaches the server through its environment, as the
    // workers': not in a command line any user of the node can list.
    let mut argv: Vec<OsString> = serve_argv(matches)
        .into_iter()
        .filter(|a| {
            !a.to_str()
                .is_some_and(|a| a.starts_with("--token=") || a.starts_with("--token-file="))
        })
        .collect();
    let given = |argv: &[OsString], flag: &str| {
        argv.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a.starts_with(&format!("--{flag}=")))
        })
    };
    let local = args.launch.backend == BackendChoice::Local;
    let host_given = given(&argv, "host");
    if !given(&argv, "port") {
        argv.push("--port=0".into());
    }
    if local && !host_given {
        argv.push("--host=127.0.0.1".into());
    }
    let log_path = dir.server_log();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}: could not create the server's log", log_path.display()))?;
    let start = log.metadata().map_or(0, |m| m.len());
    let _ = writeln!(
        log,
        "==== dispatcher launch started the server at unix time {:.0} ====",
        unix_now()
    );
    let exe =
        std::env::current_exe().context("could not find the dispatcher binary to run `serve`")?;
    let mut cmd = std::process::Command::new(&exe);
    if let Some(token) = token {
        cmd.env("DISPATCHER_TOKEN", token);
    }
    cmd.env_remove("DISPATCHER_TOKEN_FILE");
    cmd.arg("serve")
        .args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("could not start {} serve", exe.display()))?;
    let pid = child.id();
    let staged = dispatcher_core::dataset::Format::of(&args.serve.infile, false)
        .map_or(true, |f| f != Some(dispatcher_core::dataset::Format::Jsonl));
    ui.event(&format!(
        "starting the server (its log: {}){}",
        log_path.display(),
        if staged {
            "; a dataset input is staged first"
        } else {
            ""
        }
    ));
    let bound = loop {
        if let Some(addr) = listening_addr(&log_path, start) {
            break addr;
        }
        if let Some(status) = child.try_wait()? {
            if status.success() {
                // It had nothing to do: the job (or a redo) was complete.
                return Ok(Started::AlreadyComplete);
            }
            bail!(
                "the server exited ({status}) before it listened; its log ({}) ends with:\n{}",
                log_path.display(),
                backend::tail(&log_path, 15)
            );
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = signal.as_mut() => {
                if let Some(pid) = pid {
                    dispatcher_core::process::signal(pid, libc::SIGTERM);
                }
                let _ = child.wait().await;
                return Ok(Started::Interrupted);
            }
        }
    };
    let port = bound.rsplit_once(':').map_or("", |(_, p)| p);
    let bind_host = args.serve.host.as_str();
    let host = match (&args.launch.advertise, local) {
        (Some(h), _) => h.clone(),
        (None, _) if host_given && bind_host != "0.0.0.0" && bind_host != "::" => {
            bind_host.to_string()
        }
        (None, true) => "127.0.0.1".into(),
        (None, false) => Some(crate::worker::hostname())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into()),
    };
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Started::Server(Box::new(ServerHandle {
        record: ServerRecord {
            addr,
            pid,
            pid_start: pid.and_then(dispatcher_core::process::start_time),
            host: crate::worker::hostname(),
        },
        owned: true,
        child: Some(child),
    })))
}

/// The address in the server's `listening on ADDR` line, written to its
/// log past byte `from`.
pub(super) fn listening_addr(log: &Path, from: u64) -> Option<String> {
    let bytes = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(usize::try_from(from).ok()?..)?);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("listening on "))
        .map(str::to_string)
}
