#!/usr/bin/env bash
# Everything the tests need, then the tests: `scripts/test.sh` on a fresh machine.
#   - a one-node Slurm cluster (Debian's slurmctld/slurmd/munge), stopped at the end;
#   - llama.cpp's llama-server and a tiny generated model (built once, cached);
#   - vLLM's CPU backend and a tiny generated model (installed once, cached);
#   - pyarrow and Hugging Face `datasets` in a venv, and zstd, to write the
#     dataset tests' files as users' tools do (installed once, cached);
#   - Debian's chromium and chromedriver, for the job page's tests;
#   - mdBook (installed once), to build the book with its links checked;
#   - the release archives (scripts/release.sh: zig and cargo-zigbuild
#     installed once, archives cached by the sources' hash) and Debian's
#     qemu-user-static to run the aarch64 one;
#   - then every test of the workspace, with all of those required, not skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# Eight CPU slots on any machine: `dispatcher launch`'s tests run four worker
# jobs at once beside the job that holds the server.
SLURM_CI_CPUS=${SLURM_CI_CPUS:-8} scripts/slurm/up.sh
trap 'scripts/slurm/down.sh >/dev/null' EXIT

while IFS='=' read -r key value; do
  case "$key" in LLAMA_SERVER|TINY_MODEL) export "$key=$value" ;; esac
done < <(scripts/setup-llama.sh)
while IFS='=' read -r key value; do
  case "$key" in VLLM_BIN|TINY_HF_MODEL) export "$key=$value" ;; esac
done < <(scripts/setup-vllm.sh)
while IFS='=' read -r key value; do
  case "$key" in DATASETS_PYTHON) export "$key=$value" ;; esac
done < <(scripts/setup-datasets.sh)
scripts/setup-browser.sh
# The book (docs/): built with warnings as errors, every link checked.
scripts/book.sh >/dev/null
# The release archives (static binaries for x86_64 and aarch64, man pages,
# completions), built once per source tree and cached in ~/.cache/dispatcher;
# tests/release.rs runs them in an empty root and under qemu.
command -v qemu-aarch64-static >/dev/null || scripts/apt-install.sh qemu-user-static
DISPATCHER_RELEASE_DIR=$(scripts/release.sh)
export DISPATCHER_RELEASE_DIR DISPATCHER_REQUIRE_RELEASE=1
export DISPATCHER_REQUIRE_LLAMA=1 DISPATCHER_REQUIRE_VLLM=1 DISPATCHER_REQUIRE_SLURM=1
export DISPATCHER_REQUIRE_DATASETS=1 DISPATCHER_REQUIRE_BROWSER=1

# The end-to-end tests run the `dispatcher` binary and the example task binaries as
# worker processes; `cargo test` alone builds examples only as test targets.
cargo build --workspace --bins --examples
cargo test --workspace --all-targets
# The core on its own, as a task crate gets it: without Parquet (a Parquet
# input refused, saying what to do), with the optional schemars derive.
cargo test -p dispatcher-core --features schemars --lib -- schemars without_parquet
cargo test --workspace --doc
