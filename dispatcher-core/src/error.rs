//! Error helpers shared by the file-handling modules.

use std::io;
use std::path::Path;

/// Wraps `e` as "could not {what} {path}: {e}", keeping its kind and the OS
/// error under it, so every file error a user sees names its file and code
/// can still tell what went wrong ([`is_descriptor_shortage`]).
pub(crate) fn path_error(e: io::Error, what: &str, path: &Path) -> io::Error {
    let message = format!("could not {what} {}: {e}", path.display());
    io::Error::new(e.kind(), PathError { message, source: e })
}

/// An I/O error with the file it happened to.
#[derive(Debug)]
struct PathError {
    message: String,
    source: io::Error,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether `e` (or the OS error a [`path_error`] wraps) is a shortage of file
/// descriptors, which passes as connections close.
pub(crate) fn is_descriptor_shortage(e: &io::Error) -> bool {
    let os = e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<PathError>())
            .and_then(|p| p.source.raw_os_error())
    });
    matches!(os, Some(libc::EMFILE | libc::ENFILE))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_error_names_the_file_and_keeps_the_os_error() {
        let e = path_error(
            io::Error::from_raw_os_error(libc::EMFILE),
            "open",
            Path::new("/x/out.jsonl"),
        );
        assert!(
            e.to_string().starts_with("could not open /x/out.jsonl: "),
            "{e}"
        );
        assert!(is_descriptor_shortage(&e));
        let other = path_error(
            io::Error::from_raw_os_error(libc::ENOSPC),
            "write",
            Path::new("o"),
        );
        assert!(!is_descriptor_shortage(&other));
    }
}
