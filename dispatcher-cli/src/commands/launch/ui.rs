//! What `launch` shows: events as lines, the status line in place on a
//! terminal.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// What `launch` shows: events as lines, the status as one line redrawn on
/// a terminal, or logged every 30 seconds otherwise.
pub(super) struct Ui {
    pub(super) tty: bool,
    pub(super) shown: bool,
    pub(super) last_plain: Option<Instant>,
}

impl Ui {
    pub(super) fn new() -> Ui {
        Ui {
            tty: std::io::stderr().is_terminal(),
            shown: false,
            last_plain: None,
        }
    }

    pub(super) fn clear(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.shown = false;
        }
    }

    pub(super) fn event(&mut self, message: &str) {
        self.clear();
        let _ = writeln!(std::io::stderr(), "launch: {message}");
    }

    pub(super) fn status(&mut self, line: &str) {
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
            self.shown = true;
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            self.last_plain = Some(Instant::now());
            let _ = writeln!(std::io::stderr(), "launch: {line}");
        }
    }
}
