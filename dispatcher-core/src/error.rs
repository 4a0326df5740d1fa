//! Error helpers shared by the file-handling modules.

use std::io;
use std::path::Path;

/// Wraps `e` as "could not {what} {path}: {e}", keeping its kind, so every file
/// error a user sees names its file.
pub(crate) fn path_error(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("could not {what} {}: {e}", path.display()),
    )
}

/// [`path_error`] for results.
pub(crate) trait IoContext<T> {
    /// Wraps the error as "could not {what} {path}: {error}".
    fn with_path(self, what: &str, path: &Path) -> io::Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn with_path(self, what: &str, path: &Path) -> io::Result<T> {
        self.map_err(|e| path_error(e, what, path))
    }
}
