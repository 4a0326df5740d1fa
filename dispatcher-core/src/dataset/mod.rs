//! A job's input as a dataset: one JSONL file as ever, or what a dataset
//! really is on a cluster: compressed JSONL (`.jsonl.gz`, `.jsonl.zst`),
//! Parquet, the Arrow files `datasets`' `save_to_disk` writes, a directory or
//! a glob of shards, a Hugging Face snapshot folder with its splits.
//!
//! [`resolve`] names the shards, in a stable order (sorted paths; the order
//! `save_to_disk` recorded); [`prepare`] gives the job one plain JSONL file to
//! read: a single plain JSONL shard as it is, anything else staged once,
//! streaming, into `<output>.input.jsonl` beside the output, so that every
//! guarantee of the plain input (offsets, reissues by byte range, exact
//! resume, the input checks) holds unchanged, and a resume reads nothing
//! again. [`rows`] says how a row becomes a line.

#[cfg(feature = "parquet")]
pub mod export;
pub mod outdir;
#[cfg(feature = "parquet")]
pub mod rows;
mod stage;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use stage::{input_lines, prepare, Prepared, Sources, StagedShard};

/// How a shard is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// JSON Lines.
    Jsonl,
    /// JSON Lines, gzip-compressed (one member or several, as `gzip` and
    /// `bgzip` write).
    JsonlGz,
    /// JSON Lines, zstd-compressed (one frame or several).
    JsonlZst,
    /// Apache Parquet.
    Parquet,
    /// Arrow IPC, stream or file format (`datasets` writes the stream format).
    Arrow,
}

impl Format {
    /// The format of the file at `path`: by its first bytes where they say,
    /// else by its extension; a file of no known extension is JSONL (an
    /// input named `prompts.txt` reads as it always did). `None` for a file
    /// a directory walk should pass over (a README, a `.json` of metadata).
    pub fn of(path: &Path, explicit: bool) -> std::io::Result<Option<Format>> {
        let mut magic = [0u8; 6];
        let mut file = std::fs::File::open(path)?;
        let mut read = 0;
        while read < magic.len() {
            match file.read(&mut magic[read..])? {
                0 => break,
                n => read += n,
            }
        }
        let magic = &magic[..read];
        let by_magic = if magic.starts_with(&[0x1f, 0x8b]) {
            Some(Format::JsonlGz)
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Format::JsonlZst)
        } else if magic.starts_with(b"PAR1") {
            Some(Format::Parquet)
        } else if magic.starts_with(b"ARROW1") {
            Some(Format::Arrow)
        } else {
            None
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let by_name = if name.ends_with(".parquet") {
            Some(Format::Parquet)
        } else if name.ends_with(".arrow") {
            Some(Format::Arrow)
        } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
            Some(Format::JsonlGz)
        } else if name.ends_with(".jsonl.zst") || name.ends_with(".json.zst") {
            Some(Format::JsonlZst)
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            Some(Format::Jsonl)
        } else {
            None
        };
        Ok(match (by_magic, by_name) {
            (Some(f), _) => Some(f),
            (None, Some(f)) => Some(f),
            (None, None) if explicit => Some(Format::Jsonl),
            (None, None) => None,
        })
    }
}

/// A JSONL file's content, decompressed by its format (`Jsonl`, `JsonlGz`,
/// `JsonlZst`), buffered: for staging a shard and for reading an output back.
pub fn open_jsonl(
    path: &Path,
    format: Format,
) -> Result<std::io::BufReader<Box<dyn Read>>, DatasetError> {
    let file = std::fs::File::open(path).map_err(|e| DatasetError::shard(path, e))?;
    let reader: Box<dyn Read> = match format {
        Format::JsonlGz => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        ))),
        Format::JsonlZst => Box::new(
            zstd::stream::read::Decoder::new(file).map_err(|e| DatasetError::shard(path, e))?,
        ),
        _ => Box::new(file),
    };
    Ok(std::io::BufReader::with_capacity(1 << 20, reader))
}

/// One file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Where it is.
    pub path: PathBuf,
    /// How it is stored.
    pub format: Format,
}

/// What is wrong with a dataset; every message names the file or the flag
/// and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// No file, directory or glob match.
    #[error("--input {input}: no such file or directory, and no file matches it as a glob")]
    NotFound {
        /// The input as given.
        input: String,
    },
    /// A directory without data files.
    #[error(
        "--input {input}: no data files in it (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .arrow)"
    )]
    NoDataFiles {
        /// The input as given.
        input: String,
    },
    /// Several splits and no `--split`.
    #[error("--input {input} holds several splits ({}); pick one with --split", splits.join(", "))]
    SeveralSplits {
        /// The input as given.
        input: String,
        /// The splits found.
        splits: Vec<String>,
    },
    /// `--split` names no split of the dataset.
    #[error("--split {split}: {input} has no such split (it has: {})", if splits.is_empty() { "none named".to_string() } else { splits.join(", ") })]
    NoSuchSplit {
        /// The input as given.
        input: String,
        /// The split asked for.
        split: String,
        /// The splits found.
        splits: Vec<String>,
    },
    /// The output (or a file of the job) would be read as input.
    #[error("--output {output} is inside the input directory {input}: its files would be read as input; write the output elsewhere")]
    OutputInsideInput {
        /// The input directory.
        input: PathBuf,
        /// The output.
        output: PathBuf,
    },
    /// A shard that cannot be read.
    #[error("{path}: {message}")]
    Shard {
        /// The shard.
        path: PathBuf,
        /// What went wrong, and where in it.
        message: String,
    },
    /// A shard changed since the job staged it, and the job has output to
    /// resume.
    #[error("the input shard {path} {what} since this job staged its input; the output so far was made from the old content. Restore the shard to resume, or start the job over (--overwrite in local mode, or move the output and its checkpoint away)")]
    Changed {
        /// The shard.
        path: PathBuf,
        /// What changed.
        what: String,
    },
    /// The job's files.
    #[error(transparent)]
    Job(#[from] crate::job::checkpoint::ResumeError),
    /// Reading or writing the staged input.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl DatasetError {
    fn shard(path: &Path, message: impl std::fmt::Display) -> DatasetError {
        DatasetError::Shard {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }
}

/// The shards of `input` (a file, a directory or a glob), in the job's
/// order, of `split` where the dataset has splits.
pub fn resolve(input: &Path, split: Option<&str>) -> Result<Vec<Shard>, DatasetError> {
    let shown = input.display().to_string();
    if input.is_file() {
        let format = Format::of(input, true)
            .map_err(|e| DatasetError::shard(input, e))?
            .expect("an explicit file has a format");
        return Ok(vec![Shard {
            path: input.to_owned(),
            format,
        }]);
    }
    if input.is_dir() {
        return resolve_dir(input, &shown, split);
    }
    let pattern = input.to_string_lossy();
    if pattern.contains(['*', '?', '[']) {
        let paths = glob::glob(&pattern).map_err(|e| DatasetError::Shard {
            path: input.to_owned(),
            message: format!("not a valid glob: {e}"),
        })?;
        let mut files = Vec::new();
        for path in paths {
            let path = path.map_err(|e| DatasetError::shard(e.path(), e.error()))?;
            if path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(DatasetError::NotFound { input: shown });
        }
        let shards = files
            .into_iter()
            .map(|path| {
                let format = Format::of(&path, true)
                    .map_err(|e| DatasetError::shard(&path, e))?
                    .expect("an explicit file has a format");
                Ok(Shard { path, format })
            })
            .collect::<Result<Vec<_>, DatasetError>>()?;
        return filter_split(shards, input, &shown, split);
    }
    Err(DatasetError::NotFound { input: shown })
}

fn resolve_dir(dir: &Path, shown: &str, split: Option<&str>) -> Result<Vec<Shard>, DatasetError> {
    // `DatasetDict.save_to_disk`: one folder per split, listed.
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let splits = json_list(&dict, "splits", |s| s.as_str().map(String::from))?;
        let chosen = match (split, splits.as_slice()) {
            (Some(s), _) if splits.iter().any(|x| x == s) => s.to_string(),
            (Some(s), _) => {
                return Err(DatasetError::NoSuchSplit {
                    input: shown.into(),
                    split: s.into(),
                    splits,
                })
            }
            (None, [only]) => only.clone(),
            (None, _) => {
                return Err(DatasetError::SeveralSplits {
                    input: shown.into(),
                    splits,
                })
            }
        };
        return resolve_dir(&dir.join(&chosen), shown, None);
    }
    // `Dataset.save_to_disk`: its Arrow files, in the order it recorded.
    let state = dir.join("state.json");
    if state.is_file() {
        let recorded = json_list(&state, "_data_files", |f| {
            f["filename"].as_str().map(|n| dir.join(n))
        })?;
        if !recorded.is_empty() {
            return Ok(recorded
                .into_iter()
                .map(|path| Shard {
                    path,
                    format: Format::Arrow,
                })
                .collect());
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files).map_err(|e| DatasetError::shard(dir, e))?;
    files.sort();
    let mut shards = Vec::new();
    let mut json_files = Vec::new();
    for path in files {
        match Format::of(&path, false).map_err(|e| DatasetError::shard(&path, e))? {
            Some(format) => shards.push(Shard { path, format }),
            None if is_unread_json(&path) => json_files.push(path),
            None => {}
        }
    }
    // A `.json` file may hold JSON lines (the Hub has datasets so named):
    // passed over, it is said, not lost without a word.
    if let Some(first) = json_files.first() {
        tracing::warn!(
            input = shown,
            files = json_files.len(),
            first = %first.display(),
            "passed over .json files in the dataset folder: only .jsonl, .ndjson, .jsonl.gz/.zst, .parquet and .arrow files are read from a folder; if they hold JSON lines, give them by a glob (DIR/*.json) or rename them .jsonl"
        );
    }
    if shards.is_empty() {
        return Err(DatasetError::NoDataFiles {
            input: shown.into(),
        });
    }
    filter_split(shards, dir, shown, split)
}

/// Whether `path` is a `.json` file a folder walk passes over that may be
/// data, not one of the metadata files `datasets` writes.
fn is_unread_json(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.ends_with(".json")
        && !matches!(
            name.as_str(),
            "dataset_info.json" | "state.json" | "dataset_dict.json" | "dataset_infos.json"
        )
}

/// The items of the list `key` of the JSON file at `path`, as `item` reads
/// them (nothing where the file has no such list).
fn json_list<T>(
    path: &Path,
    key: &str,
    item: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Vec<T>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::shard(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Ok(value[key]
        .as_array()
        .map(|a| a.iter().filter_map(&item).collect())
        .unwrap_or_default())
}

/// Every file under `dir`, hidden ones (`.git`, `.cache`) left out.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// The split names Hugging Face uses for folders.
const SPLIT_FOLDERS: &[&str] = &["train", "test", "validation", "valid", "dev", "eval"];

/// The split a shard belongs to, by Hugging Face's naming:
/// `train-00000-of-00042.parquet` anywhere, `data/train.jsonl.gz`, or a
/// file in a folder named like a split (`default/train/0000.parquet`).
fn split_of(path: &Path, root: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    if let Some((prefix, rest)) = name.split_once('-') {
        let numbered = rest.split_once("-of-").is_some_and(|(a, b)| {
            a.bytes().all(|c| c.is_ascii_digit()) && b.starts_with(|c: char| c.is_ascii_digit())
        });
        if numbered && prefix != "data" {
            return Some(prefix.to_string());
        }
    }
    let parent = path.parent()?;
    let parent_name = parent.file_name()?.to_string_lossy();
    if parent != root && SPLIT_FOLDERS.contains(&parent_name.as_ref()) {
        return Some(parent_name.into_owned());
    }
    if parent_name == "data" {
        let stem = name.split('.').next()?;
        return Some(stem.to_string());
    }
    None
}

fn filter_split(
    shards: Vec<Shard>,
    root: &Path,
    shown: &str,
    split: Option<&str>,
) -> Result<Vec<Shard>, DatasetError> {
    let splits_of: Vec<Option<String>> = shards.iter().map(|s| split_of(&s.path, root)).collect();
    let mut names: Vec<String> = splits_of.iter().flatten().cloned().collect();
    names.sort();
    names.dedup();
    match split {
        Some(wanted) => {
            let in_folder = |s: &Shard| {
                s.path
                    .strip_prefix(root)
                    .ok()
                    .and_then(Path::parent)
                    .is_some_and(|p| p.components().any(|c| c.as_os_str() == wanted))
            };
            let kept: Vec<Shard> = shards
                .iter()
                .zip(&splits_of)
                .filter(|(s, of)| of.as_deref() == Some(wanted) || in_folder(s))
                .map(|(s, _)| s.clone())
                .collect();
            if kept.is_empty() {
                return Err(DatasetError::NoSuchSplit {
                    input: shown.into(),
                    split: wanted.into(),
                    splits: names,
                });
            }
            Ok(kept)
        }
        None if names.len() > 1 => Err(DatasetError::SeveralSplits {
            input: shown.into(),
            splits: names,
        }),
        None => Ok(shards),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, rel: &str, content: &[u8]) -> PathBuf {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        path
    }

    fn names(shards: &[Shard], root: &Path) -> Vec<String> {
        shards
            .iter()
            .map(|s| s.path.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn a_snapshot_folder_s_splits_are_chosen_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "README.md", b"# a dataset");
        touch(root, ".gitattributes", b"*.parquet lfs");
        for i in [1, 0] {
            touch(
                root,
                &format!("data/train-0000{i}-of-00002.parquet"),
                b"PAR1",
            );
        }
        touch(root, "data/test-00000-of-00001.parquet", b"PAR1");
        let error = resolve(root, None).unwrap_err().to_string();
        assert!(
            error.contains("several splits (test, train); pick one with --split"),
            "{error}"
        );
        let train = resolve(root, Some("train")).unwrap();
        assert_eq!(
            names(&train, root),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert!(train.iter().all(|s| s.format == Format::Parquet));
        let error = resolve(root, Some("dev")).unwrap_err().to_string();
        assert!(
            error.contains("--split dev: ") && error.contains("(it has: test, train)"),
            "{error}"
        );
    }

    #[test]
    fn shards_of_a_folder_or_glob_are_sorted_and_read_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "b.jsonl.gz", &[0x1f, 0x8b, 8, 0]);
        touch(root, "a.jsonl.zst", &[0x28, 0xb5, 0x2f, 0xfd]);
        touch(root, "c.jsonl", b"{}\n");
        touch(root, "notes.txt", b"not data");
        // A compressed file whatever its name says.
        touch(root, "d.jsonl", &[0x1f, 0x8b, 8, 0]);
        let shards = resolve(root, None).unwrap();
        assert_eq!(
            names(&shards, root),
            ["a.jsonl.zst", "b.jsonl.gz", "c.jsonl", "d.jsonl"]
        );
        let formats: Vec<Format> = shards.iter().map(|s| s.format).collect();
        assert_eq!(
            formats,
            [
                Format::JsonlZst,
                Format::JsonlGz,
                Format::Jsonl,
                Format::JsonlGz
            ]
        );
        let globbed = resolve(&root.join("*.jsonl*"), None).unwrap();
        assert_eq!(
            names(&globbed, root),
            ["a.jsonl.zst", "b.jsonl.gz", "c.jsonl", "d.jsonl"]
        );
        // One explicit file of any name is JSONL, as ever.
        let one = resolve(&root.join("notes.txt"), None).unwrap();
        assert_eq!(one[0].format, Format::Jsonl);
        let error = resolve(&root.join("nothing*"), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no such file or directory"), "{error}");
    }

    #[test]
    fn save_to_disk_folders_are_read_in_their_recorded_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(
            root,
            "dataset_dict.json",
            br#"{"splits": ["train", "test"]}"#,
        );
        touch(
            root,
            "train/state.json",
            br#"{"_data_files": [{"filename": "data-00001-of-00002.arrow"}, {"filename": "data-00000-of-00002.arrow"}]}"#,
        );
        touch(root, "train/dataset_info.json", b"{}");
        touch(root, "test/data-00000-of-00001.arrow", b"ARROW1");
        let error = resolve(root, None).unwrap_err().to_string();
        assert!(error.contains("several splits (train, test)"), "{error}");
        let train = resolve(root, Some("train")).unwrap();
        assert_eq!(
            names(&train, root),
            [
                "train/data-00001-of-00002.arrow",
                "train/data-00000-of-00002.arrow"
            ]
        );
        let test = resolve(root, Some("test")).unwrap();
        assert_eq!(names(&test, root), ["test/data-00000-of-00001.arrow"]);
    }
}

/// A build without the `parquet` feature (a task crate's, by default).
#[cfg(all(test, not(feature = "parquet")))]
mod without_parquet_tests {
    use super::*;

    /// A Parquet input is refused with what to do, naming the shard; the job
    /// writes nothing.
    #[test]
    fn a_parquet_input_is_refused_naming_the_feature_and_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("train.parquet");
        std::fs::write(&input, b"PAR1 not read").unwrap();
        let files = crate::job::JobFiles::new(dir.path().join("out.jsonl"), None);
        let e = prepare(&input, None, &files).unwrap_err().to_string();
        assert!(
            e.contains("train.parquet")
                && e.contains("`parquet` feature")
                && e.contains("dispatcher serve"),
            "{e}"
        );
        assert!(!dir.path().join("out.jsonl").exists());
    }
}
