//! The file-system side of a job's files: the locks that keep one writer per
//! output, what makes two paths one file, the sibling-file names, and
//! durable replacement (write beside, fsync, rename, fsync the directory).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::checkpoint::ResumeError;
use crate::error::{path_error, IoContext};

/// Exclusive locks on `<checkpoint>.lock` and on the output file itself,
/// held for as long as a ledger has the job's files open, so that two servers
/// (or a server and a restart that came too early) never write the same
/// output: not with the same checkpoint, not with another `--checkpoint`, not
/// through a link to the output. The OS drops them when the process dies,
/// however it dies.
#[derive(Debug)]
pub struct JobLock {
    _checkpoint: File,
    _output: File,
    /// `<checkpoint>.lock`, removed when the job is done with it.
    path: PathBuf,
}

impl JobLock {
    /// Takes the locks of the job that writes `outfile` and checkpoints to
    /// `checkpoint`, after checking that the job's three files are three
    /// different files.
    pub fn acquire(
        infile: &Path,
        outfile: &Path,
        checkpoint: &Path,
    ) -> Result<JobLock, ResumeError> {
        check_distinct(&[
            ("--infile", infile),
            ("--outfile", outfile),
            ("--checkpoint", checkpoint),
        ])?;
        let lock = with_suffix(checkpoint, ".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .with_path("create the lock file", &lock)?;
        let locked = |holder: &Path| ResumeError::Locked {
            checkpoint: checkpoint.to_owned(),
            lock: holder.to_owned(),
        };
        try_lock(&file, &lock).map_err(|e| e.unwrap_or_else(|| locked(&lock)))?;
        let output = OpenOptions::new()
            .create(true)
            .truncate(false)
            .append(true)
            .open(outfile)
            .with_path("open the output file", outfile)?;
        try_lock(&output, outfile).map_err(|e| e.unwrap_or_else(|| locked(outfile)))?;
        Ok(JobLock {
            _checkpoint: file,
            _output: output,
            path: lock,
        })
    }

    /// Releases the locks and removes the lock file. A process that opened
    /// the old lock file meanwhile still finds the output locked until this
    /// returns, and the output's own lock is what keeps a second writer out.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks `file`; `Err(None)` when another holds the lock.
///
/// A lock found held is tried again for a moment (about 150 ms) before it
/// counts as held: a process forked by this one (an engine, a task) holds
/// every open file, our locks included, from its fork until its exec closes
/// them, so the lock of a job just stopped can look held for that long. A
/// job run by another process is still refused, just as surely.
fn try_lock(file: &File, path: &Path) -> Result<(), Option<ResumeError>> {
    let mut wait = std::time::Duration::from_millis(10);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock)
                if wait <= std::time::Duration::from_millis(80) =>
            {
                std::thread::sleep(wait);
                wait *= 2;
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Some(path_error(e, "lock", path).into()))
            }
        }
    }
}

/// Refuses two flags that name one file: the same path, a link to it (hard
/// or symbolic), or two spellings of one path.
pub fn check_distinct(files: &[(&'static str, &Path)]) -> Result<(), ResumeError> {
    let keys: Vec<FileKey> = files.iter().map(|(_, p)| FileKey::of(p)).collect();
    for (i, a) in keys.iter().enumerate() {
        for (j, b) in keys.iter().enumerate().skip(i + 1) {
            if a == b {
                return Err(ResumeError::SameFile {
                    first: files[i].0,
                    second: files[j].0,
                    path: files[j].1.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// What makes two paths one file.
#[derive(Debug, PartialEq, Eq)]
enum FileKey {
    /// An existing file, by device and inode.
    Inode(u64, u64),
    /// A file not created yet, by its absolute path (links resolved in its
    /// directory).
    Path(PathBuf),
}

impl FileKey {
    fn of(path: &Path) -> FileKey {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(path) {
            return FileKey::Inode(meta.dev(), meta.ino());
        }
        let dir =
            std::fs::canonicalize(parent_dir(path)).unwrap_or_else(|_| parent_dir(path).to_owned());
        FileKey::Path(dir.join(path.file_name().unwrap_or_default()))
    }
}

/// `path` with `suffix` appended to its file name (`out.jsonl` ->
/// `out.jsonl.checkpoint`): a job's own files sit beside the file they serve.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes the directory entries of `path`'s directory durable (after a
/// rename or a removal in it).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_path("sync the directory", dir)
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the
/// new one, never half of one, also after a crash: a temporary file beside
/// it, fsync, rename, fsync of the directory. `what` names the file in errors.
pub fn write_atomically(path: &Path, bytes: &[u8], what: &str) -> io::Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .with_path(&format!("create {what}"), &tmp)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_path(&format!("write {what}"), &tmp)?;
    drop(file);
    std::fs::rename(&tmp, path).with_path(&format!("rename {what} into place at"), path)?;
    sync_dir(path)
}

/// Moves `from` over `to` durably (rename, then fsync of the directory).
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "could not move {} over {}: {e}",
                from.display(),
                to.display()
            ),
        )
    })?;
    sync_dir(to)
}

/// Removes `path` if it exists.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).with_path("remove", path),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_spellings_of_one_file_are_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        std::fs::write(&a, "1\n").unwrap();
        let hard = dir.path().join("hard.jsonl");
        std::fs::hard_link(&a, &hard).unwrap();
        let soft = dir.path().join("soft.jsonl");
        std::os::unix::fs::symlink(&a, &soft).unwrap();
        let spelled = dir.path().join(".").join("a.jsonl");
        for other in [&hard, &soft, &spelled] {
            let e = check_distinct(&[("--input", &a), ("--error-file", other)]).unwrap_err();
            assert!(e.to_string().contains("--error-file"), "{e}");
        }
        let new = dir.path().join("new.jsonl");
        assert!(check_distinct(&[("--input", &a), ("--error-file", &new)]).is_ok());
        // Not created yet, named twice.
        assert!(check_distinct(&[
            ("--output", &new),
            ("--error-file", &dir.path().join("./new.jsonl"))
        ])
        .is_err());
    }
}
