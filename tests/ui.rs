//! Misuse of `#[task]` and `yield_request!` is a compile error in the project's
//! own words, with the caret on the offending token, and nothing else: no
//! cascade of errors elsewhere, no unused-import warnings.
//!
//! The compile-fail snapshots hold rustc's exact output, which changes between
//! compiler versions: they are compared with the toolchain they were made with
//! (below), and regenerated with `TRYBUILD=overwrite` after a toolchain change.
//! The pass cases run with any toolchain.

/// The rustc the snapshots in `tests/ui/*.stderr` were made with.
const SNAPSHOT_RUSTC: &str = "rustc 1.95.0 ";

#[test]
fn macro_misuse_gives_clear_compile_errors() {
    let t = trybuild::TestCases::new();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(&rustc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.starts_with(SNAPSHOT_RUSTC) {
        t.compile_fail("tests/ui/*.rs");
    } else {
        eprintln!(
            "SKIPPED: the compile-fail snapshots are of {SNAPSHOT_RUSTC}, this is {}",
            version.trim()
        );
    }
    t.pass("tests/ui-pass/*.rs");
}
