#!/usr/bin/env bash
# The tools users write datasets with, for the dataset tests: pyarrow and
# Hugging Face `datasets` from PyPI in a venv of their own, plus Debian's
# `zstd` command (gzip is on every machine). Cached outside the repo keyed by
# version, so a machine installs them once (about 150 MB, a minute at
# registry speed).
#
# Prints one line for the tests: DATASETS_PYTHON=<the venv's python>.
set -euo pipefail
pyarrow_version=26.0.1
datasets_version=5.2.0
cache=${DISPATCHER_CACHE:-$HOME/.cache/dispatcher}/pydata-$pyarrow_version-$datasets_version
venv=$cache/venv
python=${PYTHON:-python3}
mkdir -p "$cache"

if ! command -v zstd >/dev/null; then
  echo "installing Debian's zstd" >&2
  "$(dirname "$0")/apt-install.sh" zstd
fi

installed() {
  "$venv/bin/python" - "$pyarrow_version" "$datasets_version" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
assert m.version("pyarrow") == sys.argv[1]
assert m.version("datasets") == sys.argv[2]
import pyarrow.parquet, datasets  # noqa: F401
PY
}

if ! installed; then
  echo "installing pyarrow $pyarrow_version and datasets $datasets_version into $venv (once)" >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip >&2
  "$venv/bin/pip" install -q "pyarrow==$pyarrow_version" "datasets==$datasets_version" >&2
  installed || { echo "pyarrow/datasets did not install" >&2; exit 1; }
fi
echo "DATASETS_PYTHON=$venv/bin/python"
