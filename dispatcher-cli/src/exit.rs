//! Exit statuses beyond 0, 1 and clap's 2, and the error that sets one:
//! `launch` exits [`EXIT_ERRORS`] when the job completed with error records
//! in its output, [`EXIT_INTERRUPTED`] when stopped before it was complete.

/// Exit status of a job that completed with error records in its output.
pub const EXIT_ERRORS: u8 = 3;
/// Exit status after Ctrl-C or SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

/// An error that only sets the exit status: what it means was printed.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}
