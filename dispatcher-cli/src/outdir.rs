//! `--outdir DIR`: the job's output as one shard per input shard, cut while
//! the job runs ([`dispatcher_core::dataset::outdir`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use dispatcher_core::dataset::outdir::{Compress, OutputShards};
use dispatcher_core::dataset::Prepared;
use dispatcher_core::job::JobFiles;

/// The flags of sharded output, shared by `serve` and local mode.
#[derive(Debug, Clone, Default, Args)]
pub struct OutdirArgs {
    /// Also write the output as one shard per input shard in DIR, named
    /// after it (`train-00000-of-00042.jsonl`), each once its lines are
    /// durable, with `DIR/manifest.json` saying which are complete. Without
    /// an output path, the job's own output goes to `DIR/.job/output.jsonl`.
    #[arg(long, value_name = "DIR")]
    pub outdir: Option<PathBuf>,
    /// How output shards are stored.
    #[arg(long, value_enum, default_value_t = CompressArg::None, requires = "outdir")]
    pub compress: CompressArg,
}

/// `--compress`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    /// Plain `.jsonl`.
    #[default]
    None,
    /// `.jsonl.zst`, compressed once the shard is complete.
    Zstd,
}

impl OutdirArgs {
    /// The job's output: `output` when given, else `DIR/.job/output.jsonl`.
    pub fn output(&self, output: Option<&Path>) -> Option<PathBuf> {
        match (output, &self.outdir) {
            (Some(o), _) => Some(o.to_owned()),
            (None, Some(dir)) => Some(dir.join(".job").join("output.jsonl")),
            (None, None) => None,
        }
    }

    /// Makes the folder of the default output; the folders it made are
    /// removed again unless [`NewDirs::keep`] says the job started.
    pub fn create_job_dir(&self, output: &Path) -> anyhow::Result<NewDirs> {
        let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(NewDirs(Vec::new()));
        };
        let mut made: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .map(Path::to_owned)
            .collect();
        made.reverse();
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("--outdir: cannot create {}: {e}", parent.display()))?;
        Ok(NewDirs(made))
    }

    /// The shards of the job at `files` over `input`, when `--outdir` is given.
    pub fn plan(&self, files: &JobFiles, input: &Prepared) -> anyhow::Result<Option<Follower>> {
        let Some(dir) = &self.outdir else {
            return Ok(None);
        };
        let compress = match self.compress {
            CompressArg::None => Compress::None,
            CompressArg::Zstd => Compress::Zstd,
        };
        let shards = OutputShards::plan(dir, files, input, compress)?;
        Ok(Some(Follower {
            shards: Arc::new(Mutex::new(shards)),
            task: None,
        }))
    }
}

/// Folders made for a job's output, outermost first: removed when dropped
/// (those still empty), so that a start refused leaves no empty folder.
#[must_use = "the folders are removed when this is dropped; keep() them once the job starts"]
#[derive(Debug)]
pub struct NewDirs(Vec<PathBuf>);

impl NewDirs {
    /// The job started: the folders stay.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for NewDirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            // Fails, as it should, on a folder something was written to.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Cuts output shards as the job makes their lines durable.
#[derive(Debug)]
pub struct Follower {
    shards: Arc<Mutex<OutputShards>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How often the checkpoint is read for shards to cut.
const EVERY: Duration = Duration::from_secs(2);

impl Follower {
    /// Starts cutting in the background.
    pub fn start(&mut self) {
        let shards = self.shards.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(EVERY).await;
                let shards = shards.clone();
                let cut = tokio::task::spawn_blocking(move || {
                    shards.lock().unwrap_or_else(|e| e.into_inner()).cut()
                })
                .await;
                match cut {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("output shards: {e}; trying again"),
                    Err(e) => tracing::warn!("output shards: {e}"),
                }
            }
        }));
    }

    /// Stops the background cutting and cuts what the job made durable;
    /// says how many shards are complete.
    pub async fn finish(self) -> anyhow::Result<()> {
        if let Some(task) = self.task {
            task.abort();
            let _ = task.await;
        }
        let shards = self.shards;
        tokio::task::spawn_blocking(move || {
            let mut shards = shards.lock().unwrap_or_else(|e| e.into_inner());
            shards.cut()?;
            let manifest = shards.manifest();
            let done = manifest.shards.iter().filter(|s| s.complete).count();
            tracing::info!(
                complete = done,
                of = manifest.shards.len(),
                "output shards{}",
                if manifest.complete {
                    ": all written"
                } else {
                    ""
                }
            );
            Ok(())
        })
        .await?
    }
}
