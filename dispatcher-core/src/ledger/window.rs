//! The window: every line read from the input and not written to the output
//! yet, the reorder buffer among them, and the output they are written to.
//!
//! Work ids are handed out in input order and written in input order, so one
//! deque indexed by `id - next_write_id` finds every such line without
//! hashing. A slot is 32 bytes, so millions of finished lines can wait behind
//! a stuck one; their results stay in memory up to a cap and go to a spill
//! file past it.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;

use crate::error::IoContext;
use crate::output::OutputWriter;

/// A finished line waiting for an earlier one.
#[derive(Debug)]
struct Done {
    line: Box<str>,
    /// Where the next input line starts: the resume offset once this is written.
    input_end: u64,
}

/// One line of the window.
#[derive(Debug)]
enum Slot {
    /// Issued (or queued for reissue) without a result: its item is the
    /// ledger's `items[key]`.
    Issued(usize),
    /// Without an item and not finished: only between taking an item out and
    /// finishing its line.
    Open,
    /// Finished, kept in memory.
    Mem(Done),
    /// Finished, spilled to the pending file at `offset` (`len` bytes).
    Disk {
        offset: u64,
        len: u32,
        input_end: u64,
    },
}

// Every line between the last written and the last read costs one slot: keep
// it at the 32 bytes that the book (server.md) and BENCHMARKS.md state.
const _: () = assert!(std::mem::size_of::<Slot>() == 32);

/// Lines read and not written, and the output behind them.
#[derive(Debug)]
pub(super) struct Window {
    /// Slot `k` is line `next_write_id + k`. Its finished slots are the
    /// reorder buffer; its front is unfinished until that line is done.
    slots: VecDeque<Slot>,
    /// Output positioned after line `next_write_id - 1`.
    output: OutputWriter,
    /// Id of the next line to write.
    next_write_id: u64,
    /// Input offset of line `next_write_id`: where a resume starts reading.
    written_input_offset: u64,
    /// How many slots are finished (in memory or spilled).
    finished: u64,
    /// Bytes of finished results kept in memory (at most `max_mem_bytes`).
    mem_bytes: u64,
    max_mem_bytes: u64,
    /// How many finished slots are spilled.
    spilled: u64,
    /// Where results past `max_mem_bytes` go.
    spill_path: PathBuf,
    /// The spill file, opened on the first spill; emptied whenever nothing in
    /// it is waiting any more. Never read on resume: a restart redoes lines
    /// that were not written yet.
    spill: Option<SpillFile>,
}

impl Window {
    /// An empty window over `output`, whose next line is `next_write_id`, the
    /// result of the input line at `written_input_offset`.
    pub(super) fn new(
        output: OutputWriter,
        next_write_id: u64,
        written_input_offset: u64,
        spill_path: PathBuf,
        max_mem_bytes: u64,
    ) -> Window {
        Window {
            slots: VecDeque::new(),
            output,
            next_write_id,
            written_input_offset,
            finished: 0,
            mem_bytes: 0,
            max_mem_bytes,
            spilled: 0,
            spill_path,
            spill: None,
        }
    }

    /// Id of the next line to write: lines before it are in the output.
    pub(super) fn next_write_id(&self) -> u64 {
        self.next_write_id
    }

    /// Input offset of the next line to write.
    pub(super) fn written_input_offset(&self) -> u64 {
        self.written_input_offset
    }

    /// Finished lines waiting for an earlier one (the reorder buffer).
    pub(super) fn finished(&self) -> u64 {
        self.finished
    }

    /// Bytes of the reorder buffer held in memory.
    pub(super) fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Lines of the reorder buffer spilled to disk.
    pub(super) fn spilled(&self) -> u64 {
        self.spilled
    }

    /// The output file.
    pub(super) fn output(&mut self) -> &mut OutputWriter {
        &mut self.output
    }

    /// Adds the next line read, issued as item `key`.
    pub(super) fn push_issued(&mut self, key: usize) {
        self.slots.push_back(Slot::Issued(key));
    }

    /// Adds the next line read, to be finished without being issued.
    pub(super) fn push_open(&mut self) {
        self.slots.push_back(Slot::Open);
    }

    /// The slot index and item key of line `id`, when it is issued or queued
    /// without a result.
    pub(super) fn issued(&self, id: u64) -> Option<(usize, usize)> {
        let slot = usize::try_from(id.checked_sub(self.next_write_id)?).ok()?;
        match *self.slots.get(slot)? {
            Slot::Issued(key) => Some((slot, key)),
            _ => None,
        }
    }

    /// Marks slot `slot` (from [`issued`](Self::issued)) as open: its item was
    /// taken out and its line is about to be finished.
    pub(super) fn open(&mut self, slot: usize) {
        debug_assert!(matches!(self.slots[slot], Slot::Issued(_)));
        self.slots[slot] = Slot::Open;
    }

    /// Puts finished line `id` into the reorder buffer: in memory while the
    /// buffer is under its cap (or when it is next to write), spilled
    /// otherwise. `input_end` is where the next input line starts.
    pub(super) fn finish(&mut self, id: u64, line: Box<str>, input_end: u64) -> io::Result<()> {
        let slot = (id - self.next_write_id) as usize;
        debug_assert!(
            matches!(self.slots[slot], Slot::Open),
            "line {id} finished twice or without taking its item"
        );
        self.finished += 1;
        let len = line.len() as u64;
        if slot == 0 || self.mem_bytes + len <= self.max_mem_bytes {
            self.mem_bytes += len;
            self.slots[slot] = Slot::Mem(Done { line, input_end });
            return Ok(());
        }
        let spill = match &mut self.spill {
            Some(spill) => spill,
            none => none.insert(SpillFile::create(self.spill_path.clone())?),
        };
        let offset = spill.append(&line)?;
        self.spilled += 1;
        self.slots[slot] = Slot::Disk {
            offset,
            len: len as u32,
            input_end,
        };
        Ok(())
    }

    /// Writes every finished line that is next in order, then flushes.
    pub(super) fn write_ready(&mut self) -> io::Result<()> {
        let mut wrote = false;
        loop {
            let (line, input_end) = match self.slots.front() {
                Some(Slot::Mem(_)) => match self.slots.pop_front() {
                    Some(Slot::Mem(done)) => {
                        self.mem_bytes -= done.line.len() as u64;
                        (done.line, done.input_end)
                    }
                    _ => unreachable!("checked above"),
                },
                Some(&Slot::Disk {
                    offset,
                    len,
                    input_end,
                }) => {
                    self.slots.pop_front();
                    let spill = self.spill.as_mut().expect("a spilled slot has a file");
                    self.spilled -= 1;
                    (spill.read(offset, len)?.into_boxed_str(), input_end)
                }
                _ => break,
            };
            self.finished -= 1;
            self.output.write_line(&line)?;
            self.next_write_id += 1;
            self.written_input_offset = input_end;
            wrote = true;
        }
        if self.spilled == 0 {
            if let Some(spill) = self.spill.as_mut() {
                spill.clear()?;
            }
        }
        if wrote {
            self.output.flush()?;
        }
        Ok(())
    }
}

/// Results spilled out of the reorder buffer. Append-only while anything in it
/// waits; truncated when nothing does, so it never outgrows what is waiting.
#[derive(Debug)]
struct SpillFile {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
}

impl SpillFile {
    fn create(path: PathBuf) -> io::Result<SpillFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .with_path("create the pending-results file", &path)?;
        Ok(SpillFile { path, file, len: 0 })
    }

    /// Appends `line`; returns its offset.
    fn append(&mut self, line: &str) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let offset = self.len;
        self.file
            .write_all_at(line.as_bytes(), offset)
            .with_path("write the pending-results file", &self.path)?;
        self.len += line.len() as u64;
        Ok(offset)
    }

    fn read(&self, offset: u64, len: u32) -> io::Result<String> {
        let bytes = crate::input::read_exact_at(&self.file, offset, len as usize)
            .with_path("read the pending-results file", &self.path)?;
        String::from_utf8(bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: a spilled result changed on disk", self.path.display()),
            )
        })
    }

    fn clear(&mut self) -> io::Result<()> {
        if self.len > 0 {
            self.file
                .set_len(0)
                .with_path("truncate the pending-results file", &self.path)?;
            self.len = 0;
        }
        Ok(())
    }
}
