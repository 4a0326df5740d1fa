//! The last lines a launched engine wrote, to quote when it fails: kept in
//! memory from its output, or read back from its log file.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The last lines an engine wrote: kept in memory when its output is not
/// kept anywhere else, read back from its log file when it is.
#[derive(Debug, Clone)]
pub(super) enum LogTail {
    /// Captured from its stdout and stderr.
    Captured(Arc<Mutex<VecDeque<String>>>),
    /// Its output goes to this file.
    File(PathBuf),
    /// Its output is the worker's own stderr.
    Inherited,
    /// It has none (the in-process echo engine, an engine not launched here).
    None,
}

/// How long an exited engine's log readers get to take in its last words
/// (its output pipes drain on other tasks) before they are quoted.
pub(super) const LAST_WORDS: Duration = Duration::from_millis(200);

/// Lines of an engine's output kept for its error messages.
pub(super) const TAIL_LINES: usize = 20;

impl LogTail {
    /// "its last lines: ..." (or where to look), for an error message.
    pub(super) fn describe(&self) -> String {
        let lines: Vec<String> = match self {
            LogTail::Captured(lines) => lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
            LogTail::File(path) => match last_lines_of(path) {
                Some(lines) => lines,
                None => return format!("see its log {}", path.display()),
            },
            LogTail::Inherited => return "see its output above".into(),
            LogTail::None => return "it wrote nothing here".into(),
        };
        if lines.is_empty() {
            return "it wrote nothing".into();
        }
        let shown = &lines[lines.len().saturating_sub(TAIL_LINES)..];
        format!("its last lines:\n    {}", shown.join("\n    "))
    }
}

/// The last lines of a log file (its last 8 KiB).
pub(super) fn last_lines_of(path: &std::path::Path) -> Option<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if len > 8192 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    Some(lines.split_off(lines.len().saturating_sub(TAIL_LINES)))
}

/// Keeps the last [`TAIL_LINES`] lines of `output` in `tail`.
pub(super) async fn keep_tail(
    output: impl tokio::io::AsyncRead + Unpin,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}
