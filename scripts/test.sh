#!/usr/bin/env bash
# Everything the tests need, then the tests: `scripts/test.sh` on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-targets
cargo test --workspace --doc
