//! Sharded output (`--outdir DIR`): one output shard per input shard, named
//! after it, each written once all its lines are durable, with a manifest
//! that lists every shard and says which are complete, so downstream jobs can
//! start on finished shards while the others still run.
//!
//! The job writes its one ordered output as ever (by default
//! `DIR/.job/output.jsonl`, beside its checkpoint and journal): resume,
//! reissues, `report` and `--redo-errors` work on it unchanged. Shards are
//! cut from it up to the checkpoint's durable line count, each into a
//! temporary file renamed into place, so a shard that exists is whole, and a
//! job killed mid-way cuts the rest when it is resumed. A redo (a new job id in
//! the checkpoint) cuts every shard again from the redone output.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DatasetError, Prepared};
use crate::error::IoContext;
use crate::job::checkpoint::Checkpoint;
use crate::job::files::{rename_durably, with_suffix, write_atomically};
use crate::job::JobFiles;

/// How output shards are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compress {
    /// Plain JSONL.
    #[default]
    None,
    /// zstd (level 3), as `.jsonl.zst`.
    Zstd,
}

/// The output shards of a job, and how far they are cut.
#[derive(Debug)]
pub struct OutputShards {
    dir: PathBuf,
    output: PathBuf,
    checkpoint: PathBuf,
    manifest: Manifest,
}

/// `DIR/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Whether every shard is complete.
    pub complete: bool,
    /// How shards are stored.
    pub compress: Compress,
    /// The job whose output the shards were cut from (its checkpoint's id).
    pub job_id: String,
    /// Lines of all shards together.
    pub lines: u64,
    /// Every shard, in the job's order.
    pub shards: Vec<OutputShard>,
}

/// One output shard, in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputShard {
    /// Its file, relative to the output folder.
    pub name: String,
    /// The input shard its lines answer.
    pub input: PathBuf,
    /// Its lines: as many as its input shard's.
    pub lines: u64,
    /// Whether the file is written, whole.
    pub complete: bool,
    /// Where its lines end in the job's output (once complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_end: Option<u64>,
}

impl OutputShards {
    /// The output shards of the job at `files` over `input`, in `dir`: what
    /// an earlier run of the same plan cut is kept.
    pub fn plan(
        dir: &Path,
        files: &JobFiles,
        input: &Prepared,
        compress: Compress,
    ) -> Result<OutputShards, DatasetError> {
        let shards: Vec<(PathBuf, u64)> = match &input.sources {
            Some(sources) => sources
                .shards()
                .iter()
                .map(|s| (s.path.clone(), s.lines))
                .collect(),
            None => vec![(
                input.path.clone(),
                crate::input::count_lines(&input.path)
                    .map_err(|e| DatasetError::shard(&input.path, e))?,
            )],
        };
        let names = names(shards.iter().map(|(p, _)| p.as_path()), compress);
        let planned: Vec<OutputShard> = shards
            .iter()
            .zip(names)
            .map(|((input, lines), name)| OutputShard {
                name,
                input: input.clone(),
                lines: *lines,
                complete: false,
                output_end: None,
            })
            .collect();
        std::fs::create_dir_all(dir).with_path("create the output folder", dir)?;
        let path = dir.join("manifest.json");
        let earlier = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok());
        let same_plan = |m: &Manifest| {
            m.compress == compress
                && m.shards.len() == planned.len()
                && m.shards
                    .iter()
                    .zip(&planned)
                    .all(|(a, b)| (&a.name, &a.input, a.lines) == (&b.name, &b.input, b.lines))
        };
        let manifest = match earlier {
            Some(m) if same_plan(&m) => m,
            _ => Manifest {
                complete: false,
                compress,
                job_id: String::new(),
                lines: planned.iter().map(|s| s.lines).sum(),
                shards: planned,
            },
        };
        let shards = OutputShards {
            dir: dir.to_owned(),
            output: files.output().to_owned(),
            checkpoint: files.checkpoint().to_owned(),
            manifest,
        };
        shards.save()?;
        Ok(shards)
    }

    /// The manifest as it stands.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Cuts every shard whose lines the checkpoint says are durable and that
    /// is not cut yet; returns how many it cut.
    pub fn cut(&mut self) -> Result<usize, DatasetError> {
        let Some(cp) = Checkpoint::load(&self.checkpoint)? else {
            return Ok(0);
        };
        if cp.job_id != self.manifest.job_id {
            // Another job's output (a redo replaced it): every shard again.
            for shard in &mut self.manifest.shards {
                shard.complete = false;
                shard.output_end = None;
            }
            self.manifest.complete = false;
            self.manifest.job_id = cp.job_id.clone();
        }
        let mut cut = 0;
        let (mut first_line, mut offset) = (0u64, 0u64);
        for i in 0..self.manifest.shards.len() {
            let shard = &self.manifest.shards[i];
            let end_line = first_line + shard.lines;
            let on_disk = self.dir.join(&shard.name).exists();
            match (shard.complete, shard.output_end) {
                (true, Some(end)) if on_disk => offset = end,
                _ if end_line <= cp.lines_written => {
                    let end = self.write_shard(i, offset)?;
                    let shard = &mut self.manifest.shards[i];
                    shard.complete = true;
                    shard.output_end = Some(end);
                    offset = end;
                    cut += 1;
                    self.manifest.complete = self.manifest.shards.iter().all(|s| s.complete);
                    self.save()?;
                }
                _ => break,
            }
            first_line = end_line;
        }
        Ok(cut)
    }

    /// Writes shard `i` from the output's bytes at `offset`; returns where
    /// its lines end.
    fn write_shard(&self, i: usize, offset: u64) -> Result<u64, DatasetError> {
        let shard = &self.manifest.shards[i];
        let path = self.dir.join(&shard.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_path("create the output folder", parent)?;
        }
        let tmp = with_suffix(&path, ".tmp");
        let mut output = File::open(&self.output).with_path("open the output", &self.output)?;
        output
            .seek(SeekFrom::Start(offset))
            .with_path("read the output", &self.output)?;
        let mut reader = BufReader::with_capacity(1 << 20, output);
        let file = BufWriter::with_capacity(
            1 << 20,
            File::create(&tmp).with_path("create an output shard", &tmp)?,
        );
        let mut writer = match self.manifest.compress {
            Compress::None => Sink::Plain(file),
            Compress::Zstd => Sink::Zstd(
                zstd::stream::write::Encoder::new(file, 3)
                    .with_path("compress an output shard", &tmp)?,
            ),
        };
        let mut line = Vec::new();
        let mut end = offset;
        for n in 0..shard.lines {
            line.clear();
            reader
                .read_until(b'\n', &mut line)
                .with_path("read the output", &self.output)?;
            if line.last() != Some(&b'\n') {
                return Err(io::Error::other(format!(
                    "{}: the output ends within line {} of shard {}, which its checkpoint says is written",
                    self.output.display(),
                    n,
                    shard.name
                ))
                .into());
            }
            writer
                .write_all(&line)
                .with_path("write an output shard", &tmp)?;
            end += line.len() as u64;
        }
        writer
            .finish()
            .and_then(|f| f.sync_all())
            .with_path("write an output shard", &tmp)?;
        rename_durably(&tmp, &path)?;
        tracing::info!(shard = %path.display(), lines = shard.lines, "output shard complete");
        Ok(end)
    }

    fn save(&self) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(&self.manifest).expect("the manifest serializes");
        write_atomically(
            &self.dir.join("manifest.json"),
            &json,
            "the output manifest",
        )
    }
}

/// Where a shard's lines go: the file, or a zstd stream into it.
enum Sink {
    Plain(BufWriter<File>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<File>>),
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(bytes),
            Sink::Zstd(w) => w.write_all(bytes),
        }
    }

    /// Ends the stream (a zstd frame's end) and flushes: the file, to sync.
    fn finish(self) -> io::Result<File> {
        let buffered = match self {
            Sink::Plain(w) => w,
            Sink::Zstd(w) => w.finish()?,
        };
        buffered.into_inner().map_err(|e| e.into_error())
    }
}

/// Output names for input shards: the file name with its data extensions
/// replaced (`train-00000-of-00042.parquet` -> `train-00000-of-00042.jsonl`);
/// paths relative to the shards' common folder where two file names are
/// the same.
fn names<'a>(inputs: impl Iterator<Item = &'a Path> + Clone, compress: Compress) -> Vec<String> {
    let extension = match compress {
        Compress::None => ".jsonl",
        Compress::Zstd => ".jsonl.zst",
    };
    let stem = |path: &Path| {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let lower = name.to_lowercase();
        let cut = [
            ".jsonl.gz",
            ".json.gz",
            ".jsonl.zst",
            ".json.zst",
            ".parquet",
            ".arrow",
            ".jsonl",
            ".ndjson",
            ".json",
        ]
        .iter()
        .find(|e| lower.ends_with(*e))
        .map_or(name.len(), |e| name.len() - e.len());
        name[..cut].to_string()
    };
    let stems: Vec<String> = inputs.clone().map(stem).collect();
    let mut sorted = stems.clone();
    sorted.sort();
    let unique = sorted.windows(2).all(|w| w[0] != w[1]);
    if unique {
        return stems.into_iter().map(|s| s + extension).collect();
    }
    let paths: Vec<&Path> = inputs.collect();
    let common = paths
        .iter()
        .filter_map(|p| p.parent())
        .fold(None::<PathBuf>, |acc, p| match acc {
            None => Some(p.to_owned()),
            Some(a) => Some(
                a.components()
                    .zip(p.components())
                    .take_while(|(x, y)| x == y)
                    .map(|(x, _)| x)
                    .collect(),
            ),
        })
        .unwrap_or_default();
    paths
        .iter()
        .zip(stems)
        .map(|(p, s)| {
            let folder = p
                .parent()
                .and_then(|f| f.strip_prefix(&common).ok())
                .unwrap_or(Path::new(""));
            folder.join(s + extension).to_string_lossy().into_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_named_after_their_input_shards() {
        let inputs = [
            Path::new("/d/data/train-00000-of-00002.parquet"),
            Path::new("/d/data/train-00001-of-00002.parquet"),
        ];
        assert_eq!(
            names(inputs.iter().copied(), Compress::None),
            ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
        );
        assert_eq!(
            names([Path::new("/x/a.jsonl.gz")].into_iter(), Compress::Zstd),
            ["a.jsonl.zst"]
        );
        let same = [
            Path::new("/d/en/0000.parquet"),
            Path::new("/d/fr/0000.parquet"),
        ];
        assert_eq!(
            names(same.iter().copied(), Compress::None),
            ["en/0000.jsonl", "fr/0000.jsonl"]
        );
    }
}
