//! `--redo-errors`: the previous output of the job, read in step with the
//! input. Each of its lines is kept (written to the new output as it is, byte
//! for byte) unless it is an error record to redo, or missing (a partly
//! complete output): those lines are handed out again.

use std::fs::File;
use std::io::{self, BufRead, BufReader};

use crate::error::IoContext;
use crate::job::redo::RedoConfig;

/// The fate of one line of the previous output.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Written to the new output as it is.
    Keep(Box<str>),
    /// Handed out again.
    Redo,
}

/// The previous output, one decision read ahead.
#[derive(Debug)]
pub(super) struct Previous {
    config: RedoConfig,
    reader: BufReader<File>,
    next: Option<Decision>,
    buf: Vec<u8>,
}

impl Previous {
    /// Opens the previous output past its first `skip` lines (those the new
    /// output has already).
    pub(super) fn open(config: RedoConfig, skip: u64) -> io::Result<Previous> {
        let path = config.previous.output();
        let file = File::open(path).with_path("open the previous output", path)?;
        let mut p = Previous {
            reader: BufReader::with_capacity(1 << 20, file),
            config,
            next: None,
            buf: Vec::new(),
        };
        for _ in 0..skip {
            p.take()?;
        }
        Ok(p)
    }

    /// The decision about the next line, without taking it.
    pub(super) fn peek(&mut self) -> io::Result<&Decision> {
        if self.next.is_none() {
            self.next = Some(self.read()?);
        }
        Ok(self.next.as_ref().expect("just read"))
    }

    /// The decision about the next line.
    pub(super) fn take(&mut self) -> io::Result<Decision> {
        match self.next.take() {
            Some(d) => Ok(d),
            None => self.read(),
        }
    }

    fn read(&mut self) -> io::Result<Decision> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .with_path("read the previous output", self.config.previous.output())?;
        // Past its end (a partly complete output), or a last line without its
        // newline (torn when the writer died): redone.
        if n == 0 || self.buf.last() != Some(&b'\n') {
            return Ok(Decision::Redo);
        }
        let line = &self.buf[..n - 1];
        if self.config.redoes(&crate::record::classify(line)) {
            return Ok(Decision::Redo);
        }
        match std::str::from_utf8(line) {
            Ok(text) => Ok(Decision::Keep(text.into())),
            Err(_) => Ok(Decision::Redo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobFiles;

    #[test]
    fn error_records_of_the_types_asked_for_are_redone_and_the_rest_kept() {
        let redo_line = |line: &[u8], kinds: Option<&[String]>| {
            RedoConfig {
                previous: JobFiles::new("out", None),
                kinds: kinds.map(<[String]>::to_vec),
            }
            .redoes(&crate::record::classify(line))
        };
        let types = ["request_rejected".to_string()];
        let rejected = br#"{"__ERROR__": {"error": "request_rejected", "message": "x"}}"#;
        let tombstone = br#"{"__ERROR__": {"error": "max_retries_exceeded", "work_id": 1}}"#;
        let batch = br#"{"id": "b", "custom_id": "c", "response": null, "error": {"code": "invalid_json"}}"#;
        let fine = br#"{"id": 1, "responses": ["an error was made"], "error": null}"#;
        for (line, all, some) in [
            (&rejected[..], true, true),
            (&tombstone[..], true, false),
            (&batch[..], true, false),
            (&fine[..], false, false),
            (&b"{cut off"[..], true, true),
            (&br#"{"plain": "line"}"#[..], false, false),
        ] {
            assert_eq!(
                redo_line(line, None),
                all,
                "{}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(
                redo_line(line, Some(&types)),
                some,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn the_previous_output_is_read_in_step_and_redone_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "1\n{\"__ERROR__\": {\"error\": \"x\"}}\n3\n4").unwrap();
        let config = RedoConfig {
            previous: JobFiles::new(path, None),
            kinds: None,
        };
        let mut p = Previous::open(config.clone(), 0).unwrap();
        assert_eq!(p.peek().unwrap(), &Decision::Keep("1".into()));
        assert_eq!(p.take().unwrap(), Decision::Keep("1".into()));
        assert_eq!(p.take().unwrap(), Decision::Redo);
        assert_eq!(p.take().unwrap(), Decision::Keep("3".into()));
        // A torn last line, and past the end.
        assert_eq!(p.take().unwrap(), Decision::Redo);
        assert_eq!(p.take().unwrap(), Decision::Redo);
        let mut resumed = Previous::open(config, 2).unwrap();
        assert_eq!(resumed.take().unwrap(), Decision::Keep("3".into()));
    }
}
