//! `<output>.launch/`: the state file through which a second `launch` on
//! the same output attaches, and a `launch` that was killed takes its
//! workers back; the lock that tells a running `launch` from a dead one;
//! the server's and the workers' logs.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::backend::EndKind;

/// The state file's format version.
const VERSION: u32 = 1;

/// The server of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// HOST:PORT, as workers reach it.
    pub addr: String,
    /// Its process id, when `launch` started it.
    pub pid: Option<u32>,
    /// When that process started (clock ticks since boot): a process that
    /// reuses the id later is not taken for it. Absent from older records.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The host `launch` started it on.
    pub host: String,
}

/// One worker job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Slurm job id, or `local-N`.
    pub id: String,
    /// Its number among the workers of this job (`DISPATCHER_LAUNCH_WORKER`).
    pub ordinal: u64,
    /// Process id of a local worker.
    pub pid: Option<u32>,
    /// When that process started (clock ticks since boot), as for the server.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Its log.
    pub log: PathBuf,
    /// Unix time it was submitted.
    pub submitted: f64,
    /// Unix time it was first seen running.
    pub started: Option<f64>,
    /// Unix time it was seen ended.
    pub ended: Option<f64>,
    /// How it ended.
    pub end: Option<EndKind>,
    /// How it ended, in words.
    pub end_detail: Option<String>,
}

impl WorkerRecord {
    /// Not ended.
    pub fn alive(&self) -> bool {
        self.ended.is_none()
    }

    /// Seen ended at `now`, so, in words `detail`.
    pub fn ended_as(&mut self, now: f64, kind: EndKind, detail: &str) {
        self.ended = Some(now);
        self.end = Some(kind);
        self.end_detail = Some(detail.to_string());
    }
}

/// The state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchState {
    /// Format version.
    pub version: u32,
    /// `slurm` or `local`.
    pub backend: String,
    /// The server: `None` until it listens.
    pub server: Option<ServerRecord>,
    /// Worker jobs, in the order they were submitted.
    pub jobs: Vec<WorkerRecord>,
    /// The next worker's ordinal.
    pub next_ordinal: u64,
    /// Unix time the server first said no line was left to hand out.
    pub drained_at: Option<f64>,
    /// Jobs that ended early (failed or lost) while the job was unfinished,
    /// and were replaced.
    pub replaced: u64,
}

impl LaunchState {
    /// A new state for `backend`.
    pub fn new(backend: &str) -> LaunchState {
        LaunchState {
            version: VERSION,
            backend: backend.to_string(),
            server: None,
            jobs: Vec::new(),
            next_ordinal: 0,
            drained_at: None,
            replaced: 0,
        }
    }

    /// Workers not ended.
    pub fn alive(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.jobs.iter().filter(|j| j.alive())
    }

    /// Ids of the workers not ended.
    pub fn alive_ids(&self) -> Vec<String> {
        self.alive().map(|j| j.id.clone()).collect()
    }
}

/// The folder of a launched job and its lock.
#[derive(Debug)]
pub struct LaunchDir {
    path: PathBuf,
}

impl LaunchDir {
    /// `dir`, created if needed.
    pub fn create(path: PathBuf) -> anyhow::Result<LaunchDir> {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("{}: could not create the launch folder", path.display()))?;
        Ok(LaunchDir { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state file.
    pub fn state_file(&self) -> PathBuf {
        self.path.join("state.json")
    }

    /// The server's log (its standard output and error).
    pub fn server_log(&self) -> PathBuf {
        self.path.join("server.log")
    }

    /// The batch script of the worker jobs.
    pub fn script(&self) -> PathBuf {
        self.path.join("worker.sbatch")
    }

    /// Takes the lock that one `launch` of this job holds while it runs;
    /// `Ok(None)` when another holds it (the OS drops it however that
    /// process ends).
    pub fn lock(&self) -> anyhow::Result<Option<File>> {
        let path = self.path.join("launch.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: could not create the lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("{}: could not lock it", path.display()))
            }
        }
    }

    /// The state an earlier `launch` left, if any.
    pub fn load(&self) -> anyhow::Result<Option<LaunchState>> {
        let path = self.state_file();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("{}: could not read it", path.display()))
            }
        };
        let state: LaunchState = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: not a launch state file of this version; move it aside to start afresh (its workers, if any still run, are then not tracked)",
                path.display()
            )
        })?;
        if state.version != VERSION {
            anyhow::bail!(
                "{}: launch state version {} (this dispatcher writes {VERSION})",
                path.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    /// Writes `state` so that a reader sees the old file or the new one.
    pub fn save(&self, state: &LaunchState) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(state)?;
        dispatcher_core::job::files::write_atomically(
            &self.state_file(),
            &bytes,
            "the launch state",
        )
        .map_err(anyhow::Error::from)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_one_launch_holds_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LaunchDir::create(tmp.path().join("out.jsonl.launch")).unwrap();
        assert_eq!(dir.load().unwrap(), None);
        let mut state = LaunchState::new("slurm");
        state.server = Some(ServerRecord {
            addr: "head:8000".into(),
            pid: Some(42),
            pid_start: Some(7),
            host: "head".into(),
        });
        state.jobs.push(WorkerRecord {
            id: "17".into(),
            ordinal: 0,
            pid: None,
            pid_start: None,
            log: dir.path().join("worker-17.log"),
            submitted: 1.0,
            started: None,
            ended: None,
            end: None,
            end_detail: None,
        });
        dir.save(&state).unwrap();
        assert_eq!(dir.load().unwrap(), Some(state.clone()));
        assert_eq!(state.alive_ids(), vec!["17".to_string()]);

        let held = dir.lock().unwrap();
        assert!(held.is_some());
        assert!(
            dir.lock().unwrap().is_none(),
            "a second launch sees it held"
        );
        drop(held);
        assert!(dir.lock().unwrap().is_some(), "free once the first is gone");

        std::fs::write(dir.state_file(), "{").unwrap();
        let e = format!("{:#}", dir.load().unwrap_err());
        assert!(
            e.contains("state.json") && e.contains("move it aside"),
            "{e}"
        );
    }
}
