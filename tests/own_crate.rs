//! The book's "Your own task crate", taken from docs/src/tasks.md as it stands: its
//! `Cargo.toml` and `src/main.rs` make a crate outside this workspace, which
//! builds and runs a job on local files with the echo engine.

use std::path::Path;
use std::process::Command;

/// The code blocks of `lang` (with any attributes: `rust,no_run`) in the
/// chapter's section under `heading`.
fn blocks(chapter: &str, heading: &str, lang: &str) -> Vec<String> {
    let section = chapter
        .split_once(heading)
        .unwrap_or_else(|| panic!("the chapter has no {heading:?}"))
        .1;
    let section = section.split("\n## ").next().unwrap_or(section);
    let fence = format!("```{lang}");
    section
        .split(fence.as_str())
        .skip(1)
        .map(|b| {
            let body = b.split_once('\n').map_or("", |(_attributes, body)| body);
            body.split("```").next().unwrap().to_string()
        })
        .collect()
}

#[test]
fn the_books_own_task_crate_builds_outside_the_workspace_and_runs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chapter = std::fs::read_to_string(repo.join("docs/src/tasks.md")).unwrap();
    let heading = "## Your own task crate";
    let (manifest, main) = (
        blocks(&chapter, heading, "toml"),
        blocks(&chapter, heading, "rust"),
    );
    assert_eq!(
        (manifest.len(), main.len()),
        (1, 1),
        "one Cargo.toml, one main.rs"
    );
    let manifest = manifest[0].replace(
        r#"path = "../dispatcher""#,
        &format!("path = {:?}", repo.display().to_string()),
    );
    assert!(manifest.contains(&repo.display().to_string()), "{manifest}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    // Its own workspace, so that it is outside this one.
    std::fs::write(dir.path().join("Cargo.toml"), manifest + "\n[workspace]\n").unwrap();
    std::fs::write(dir.path().join("src/main.rs"), &main[0]).unwrap();
    // The versions this workspace has locked, and its compiled dependencies
    // (in a target directory of their own: the test's is locked by cargo).
    std::fs::copy(repo.join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
    let target = repo.join("target/tests/own-crate");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = Command::new(&cargo)
        .args(["build", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        // Outside this workspace, so without its .cargo/config.toml: no debug
        // info, which is most of what a debug build puts on disk.
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    assert!(
        build.stderr.is_empty(),
        "it builds without a warning: {}",
        String::from_utf8_lossy(&build.stderr)
    );

    std::fs::write(
        dir.path().join("prompts.jsonl"),
        "{\"prompt\": \"one\"}\n{\"prompt\": \"two\"}\n",
    )
    .unwrap();
    let run = Command::new(target.join("debug/my-tasks"))
        .args([
            "--input",
            "prompts.jsonl",
            "--output",
            "out.jsonl",
            "--engine",
            "echo",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["prompt"], "one");
    assert_eq!(
        lines[1]["answer"], "two",
        "the echo engine answers with the prompt"
    );
}
