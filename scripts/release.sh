#!/usr/bin/env bash
# The release: static `dispatcher` binaries for Linux on x86_64 and aarch64
# (musl, linked with mimalloc), each in an archive with a man page per command,
# bash/zsh/fish completions, the README and the licences, and SHA256SUMS.
#
#   scripts/release.sh [TARGET ...]     # default: both targets; prints the dist folder
#
# Targets: x86_64-unknown-linux-musl, aarch64-unknown-linux-musl. They are built
# with `cargo zigbuild` (zig is the C compiler and linker for both, so zstd's
# and ring's C code cross-compiles without a cross toolchain); zig (PyPI's
# `ziglang`), cargo-zigbuild and the musl standard libraries are installed
# once under ~/.cache/dispatcher. The binaries of a given source tree are kept
# in ~/.cache/dispatcher/release/bin-<hash of the sources>/ and its archives in
# release/<hash>/, so a second run (CI's release tests) reuses them instead of
# building again.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DISPATCHER_CACHE:-$HOME/.cache/dispatcher}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

# The sources that make the binaries, committed or not, and those that make
# the archives around them: a change to the README re-packs, it does not rebuild.
sources() { # $@: paths
  git ls-files -s -- "$@"
  git diff HEAD -- "$@"
}
bin_hash=$({ sources Cargo.toml Cargo.lock dispatcher-core dispatcher-cli scripts/release.sh; printf '%s\n' "${targets[@]}"; } | sha256sum | cut -c1-16)
hash=$({ echo "$bin_hash"; sources README.md LICENSE-MIT LICENSE-APACHE; } | sha256sum | cut -c1-16)
dist="$cache/release/$hash"
bins="$cache/release/bin-$bin_hash"
if [ -s "$dist/SHA256SUMS" ]; then
  echo "$dist"
  exit 0
fi

log() { echo "release: $*" >&2; }
# Tools, once.
export PATH="$cache/tools/bin:$cache/zig/bin:$PATH"
if ! "$cache/zig/bin/python3" -m ziglang version >/dev/null 2>&1; then
  log "installing zig (PyPI's ziglang) into $cache/zig"
  rm -rf "$cache/zig"
  python3 -m venv "$cache/zig"
  "$cache/zig/bin/pip" install -q ziglang >&2
fi
if ! command -v cargo-zigbuild >/dev/null; then
  log "installing cargo-zigbuild into $cache/tools"
  CARGO_TARGET_DIR="$cache/tools/build" cargo install -q --locked --root "$cache/tools" cargo-zigbuild >&2
  rm -rf "$cache/tools/build"
fi
for target in "${targets[@]}"; do
  rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
done

# Releases of older source trees, untouched for two weeks, go.
find "$cache/release" -mindepth 1 -maxdepth 1 -mtime +14 -exec rm -rf {} + 2>/dev/null || true
if [ ! -x "$bins/${targets[-1]}/dispatcher" ]; then
  for target in "${targets[@]}"; do
    log "building $target"
    cargo zigbuild --release --locked -q -p dispatcher-cli --bin dispatcher --target "$target" >&2
    mkdir -p "$bins/$target"
    cp "target/$target/release/dispatcher" "$bins/$target/dispatcher"
  done
fi
tmp="$dist.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"

# Man pages and completions come from the command line's definitions: any
# build of this source tree prints the same ones, so the x86_64 one (or the
# host's) makes them for every archive.
host="$bins/x86_64-unknown-linux-musl/dispatcher"
[ -x "$host" ] && "$host" --version >/dev/null 2>&1 || {
  cargo build --release --locked -q -p dispatcher-cli --bin dispatcher >&2
  host=target/release/dispatcher
}
pages="$tmp/pages"
"$host" man --out "$pages/man/man1"
mkdir -p "$pages/completions"
"$host" completions bash >"$pages/completions/dispatcher.bash"
"$host" completions zsh >"$pages/completions/_dispatcher"
"$host" completions fish >"$pages/completions/dispatcher.fish"

for target in "${targets[@]}"; do
  name="dispatcher-$version-$target"
  dir="$tmp/$name"
  mkdir -p "$dir"
  cp "$bins/$target/dispatcher" "$dir/dispatcher"
  cp -r "$pages/man" "$pages/completions" "$dir/"
  cp README.md LICENSE-MIT LICENSE-APACHE "$dir/"
  # Reproducible archives: sorted names, one owner, the commit's time.
  tar --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$(git log -1 --format=%ct)" -C "$tmp" -czf "$tmp/$name.tar.gz" "$name"
  rm -rf "$dir"
done
rm -rf "$pages"
(cd "$tmp" && sha256sum ./*.tar.gz | sed 's| \./| |' >SHA256SUMS)
rm -rf "$dist"
mv "$tmp" "$dist"
# The newest release of this checkout, where the README says it is.
rm -rf dist && mkdir -p dist && cp "$dist"/* dist/
log "wrote $(ls "$dist" | tr '\n' ' ')"
echo "$dist"
