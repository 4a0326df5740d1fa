//! Misuse of `#[task]` and `yield_request!` is a compile error in the project's
//! own words, with the caret on the offending token (snapshots made with rustc
//! 1.95.0; regenerate with `TRYBUILD=overwrite` after a toolchain change).

#[test]
fn macro_misuse_gives_clear_compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui-pass/*.rs");
}
