//! A work request ([`Ask`]) and the ledger's answers to the calls it serves.

use super::*;

/// Who asks for work, and how much: a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// Items wanted at most.
    pub batch: usize,
    /// The worker asking, when it says who it is (a hash of its id): it is
    /// never handed a backup of an item it holds itself, and a retry its own
    /// task asked for goes to another worker when one asks.
    pub worker: Option<u64>,
}

impl Ask {
    /// A request for up to `batch` items from a worker that does not say who
    /// it is.
    pub fn batch(batch: usize) -> Ask {
        Ask {
            batch,
            worker: None,
        }
    }

    /// The same request, from `worker`.
    pub fn by(self, worker: Option<u64>) -> Ask {
        Ask { worker, ..self }
    }
}

/// One line handed out, in the ledger's terms (the HTTP layer and the local
/// source make a work item of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The line's work id: its 0-based index in the input.
    pub work_id: u64,
    /// The line, without its newline.
    pub content: String,
    /// Failures (lease expiries, task retries) before this issue.
    pub retry_count: u32,
    /// The engine responses earlier issues of the line completed.
    pub journal: Option<Vec<JournalEntry>>,
}

impl Issue {
    /// About the bytes it takes in a work reply.
    pub fn wire_bytes(&self) -> usize {
        self.content.len()
            + self
                .journal
                .iter()
                .flatten()
                .map(JournalEntry::wire_bytes)
                .sum::<usize>()
    }
}

/// The answer to a work request.
#[derive(Debug, PartialEq, Eq)]
pub enum WorkReply {
    /// Lines to work on.
    Issued(Vec<Issue>),
    /// Nothing to hand out now: ask again in this many seconds.
    Retry {
        /// Seconds to wait (at least 1).
        after_secs: u64,
        /// No unissued line remains: every line is done or in flight, none
        /// is queued for reissue, and no backup copy may be handed out
        /// (`--backups 0`). Only a line that comes back (a lease expiry, a
        /// release) is left to hand out.
        drained: bool,
    },
    /// Every line has its output line.
    Complete,
}

impl WorkReply {
    /// The lines issued (none unless [`WorkReply::Issued`]).
    pub fn items(&self) -> &[Issue] {
        match self {
            WorkReply::Issued(items) => items,
            _ => &[],
        }
    }

    /// The lines issued, owned.
    pub fn into_items(self) -> Vec<Issue> {
        match self {
            WorkReply::Issued(items) => items,
            _ => Vec::new(),
        }
    }
}

/// The outcome of submitting results.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CompleteReply {
    /// Results accepted as the first of their item.
    pub accepted: u64,
    /// Results ignored: their item was done already or never issued.
    pub ignored: u64,
    /// Ids among the ignored whose item is done (the sender may drop them).
    pub already_done: Vec<u64>,
    /// Ids among the ignored that were never issued.
    pub never_issued: Vec<u64>,
}
