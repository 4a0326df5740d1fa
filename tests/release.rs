//! The release archives (`scripts/release.sh`), tried where they will run:
//! the x86_64 binary in an empty root (no libc, no certificates, no /proc)
//! through a local `infer` job and a `serve` + worker job; the aarch64 binary
//! checked to be a static aarch64 executable, and run under qemu-user; each
//! archive's contents and sums. `scripts/test.sh` builds the archives once
//! (cached by the sources' hash) and passes their folder as
//! `DISPATCHER_RELEASE_DIR`; without it these tests say they skipped, unless
//! `DISPATCHER_REQUIRE_RELEASE` is set.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dispatcher_testkit::{succeed, ServerProcess};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Says why a test skips, or fails it when `DISPATCHER_REQUIRE_RELEASE` is set
/// (as `scripts/test.sh` sets it): CI must not pass by skipping.
fn skip(why: &str) {
    assert!(
        std::env::var_os("DISPATCHER_REQUIRE_RELEASE").is_none(),
        "DISPATCHER_REQUIRE_RELEASE is set and {why}"
    );
    eprintln!("skipped: {why}");
}

fn release_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DISPATCHER_RELEASE_DIR").map(PathBuf::from);
    if dir.is_none() {
        skip("DISPATCHER_RELEASE_DIR is not set (scripts/release.sh makes the archives)");
    }
    dir
}

/// The archive of `target` unpacked into `into`: the path of its folder.
fn unpack(dist: &Path, target: &str, into: &Path) -> PathBuf {
    let name = format!("dispatcher-{VERSION}-{target}");
    let archive = dist.join(format!("{name}.tar.gz"));
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "tar could not unpack {}",
        archive.display()
    );
    into.join(name)
}

/// What an ELF executable's header and program headers say: its machine
/// (`e_machine`) and whether it asks for a dynamic loader (`PT_INTERP`).
fn elf_machine_and_interpreter(path: &Path) -> (u16, bool) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(bytes[4], 2, "{} is not a 64-bit ELF", path.display());
    assert_eq!(bytes[5], 1, "{} is not little-endian", path.display());
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let machine = u16_at(18);
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    const PT_INTERP: u32 = 3;
    let interpreter = (0..phnum as usize).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP);
    (machine, interpreter)
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

fn prompts(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"messages\":[{{\"role\":\"user\",\"content\":\"line {i}\"}}]}}\n"
            )
        })
        .collect()
}

/// Every output line answers its input line, in order (the echo engine
/// answers with the prompt).
fn assert_answered_in_order(output: &Path, n: usize) {
    let text = std::fs::read_to_string(output).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n, "{text}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["id"], i, "{line}");
        assert_eq!(line["responses"][0], format!("line {i}"), "{line}");
    }
}

/// `/dispatcher` in the root `root`, with an empty environment (no `PATH`,
/// no `HOME`, no certificate variables: nothing the binary could lean on).
fn chroot(root: &Path) -> Command {
    let chroot = ["/usr/sbin/chroot", "/sbin/chroot", "/usr/bin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chroot (coreutils) is installed");
    let mut command = Command::new(chroot);
    command.arg(root).arg("/dispatcher").env_clear();
    command
}

#[test]
fn the_x86_64_archives_binary_runs_whole_jobs_in_an_empty_root() {
    let Some(dist) = release_dir() else { return };
    if !is_root() {
        return skip("chroot needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let unpacked = unpack(&dist, "x86_64-unknown-linux-musl", dir.path());
    let binary = unpacked.join("dispatcher");
    assert_eq!(elf_machine_and_interpreter(&binary), (EM_X86_64, false));

    // The root holds the binary and the job's files, nothing else.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::copy(&binary, root.join("dispatcher")).unwrap();
    std::fs::write(root.join("in.jsonl"), prompts(200)).unwrap();
    let entries: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
    assert_eq!(entries.len(), 2, "only the binary and the input");

    // A local job.
    succeed(chroot(&root).args([
        "infer",
        "--input",
        "/in.jsonl",
        "--output",
        "/out.jsonl",
        "--engine",
        "echo",
    ]));
    assert_answered_in_order(&root.join("out.jsonl"), 200);

    // A server and a worker, both in the empty root, over loopback.
    let mut serve = chroot(&root);
    serve
        .args([
            "serve",
            "--infile",
            "/in.jsonl",
            "--outfile",
            "/served.jsonl",
        ])
        .args(["--host", "127.0.0.1", "--port", "0", "--exit-grace", "1"]);
    let server = ServerProcess::start(serve);
    succeed(chroot(&root).args(["infer", "--dispatcher", &server.addr, "--engine", "echo"]));
    let (code, stderr) = server.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert_answered_in_order(&root.join("served.jsonl"), 200);
}

fn is_root() -> bool {
    // The owner of a file this process creates is its effective user.
    let probe = tempfile::NamedTempFile::new().unwrap();
    std::os::unix::fs::MetadataExt::uid(&probe.as_file().metadata().unwrap()) == 0
}

#[test]
fn the_aarch64_archives_binary_is_static_for_aarch64_and_runs_under_qemu() {
    let Some(dist) = release_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let unpacked = unpack(&dist, "aarch64-unknown-linux-musl", dir.path());
    let binary = unpacked.join("dispatcher");
    assert_eq!(elf_machine_and_interpreter(&binary), (EM_AARCH64, false));

    let qemu = ["qemu-aarch64-static", "qemu-aarch64"]
        .into_iter()
        .find(|q| {
            Command::new(q)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(qemu) = qemu else {
        return skip("there is no qemu-aarch64 to run it (Debian's qemu-user-static)");
    };
    std::fs::write(dir.path().join("in.jsonl"), prompts(50)).unwrap();
    succeed(
        Command::new(qemu)
            .arg(&binary)
            .args(["infer", "--input", "in.jsonl", "--output", "out.jsonl"])
            .args(["--engine", "echo"])
            .current_dir(dir.path()),
    );
    assert_answered_in_order(&dir.path().join("out.jsonl"), 50);
}

#[test]
fn each_archive_holds_its_man_pages_completions_and_licences_and_its_sum() {
    let Some(dist) = release_dir() else { return };
    let check = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");

    let dir = tempfile::tempdir().unwrap();
    for target in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"] {
        assert!(
            sums.contains(&format!("dispatcher-{VERSION}-{target}.tar.gz")),
            "{sums}"
        );
        let unpacked = unpack(&dist, target, dir.path());
        let mut wanted: Vec<String> = ["README.md", "LICENSE-MIT", "LICENSE-APACHE"]
            .iter()
            .map(|f| f.to_string())
            .collect();
        wanted.extend(
            ["dispatcher.bash", "_dispatcher", "dispatcher.fish"]
                .map(|f| format!("completions/{f}")),
        );
        wanted.extend(
            [
                "",
                "-serve",
                "-infer",
                "-run-batch",
                "-status",
                "-report",
                "-work-timeout",
                "-slurm-script",
                "-export",
                "-launch",
                "-estimate",
                "-completions",
            ]
            .map(|c| format!("man/man1/dispatcher{c}.1")),
        );
        for file in &wanted {
            let path = unpacked.join(file);
            let len = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{target}: {file}: {e}"))
                .len();
            assert!(len > 0, "{target}: {file} is empty");
        }
        let serve = std::fs::read_to_string(unpacked.join("man/man1/dispatcher-serve.1")).unwrap();
        assert!(serve.contains("work\\-timeout"), "{serve}");
        let bash = std::fs::read_to_string(unpacked.join("completions/dispatcher.bash")).unwrap();
        assert!(
            bash.contains("--work-timeout") && bash.contains("run-batch"),
            "{bash}"
        );
    }
}
