#!/usr/bin/env bash
# The book (docs/, mdBook) built into target/book with warnings as errors, and
# every link of it and of the README checked: a relative link must name a
# file, and an anchor (#...) a heading of that page. mdBook is installed once
# into ~/.cache/dispatcher/tools (its `search` feature only: no file watcher,
# no web server to compile).
#
#   scripts/book.sh            # then open target/book/index.html
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DISPATCHER_CACHE:-$HOME/.cache/dispatcher}
mdbook_version=0.4.52
mdbook="$cache/tools/bin/mdbook"
if ! "$mdbook" --version 2>/dev/null | grep -q "v$mdbook_version"; then
  echo "book: installing mdBook $mdbook_version into $cache/tools" >&2
  CARGO_TARGET_DIR="$cache/tools/build" cargo install -q --locked --root "$cache/tools" \
    --no-default-features --features search --version "$mdbook_version" mdbook >&2
  rm -rf "$cache/tools/build"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$mdbook" build docs --dest-dir ../target/book 2>"$log" || { cat "$log" >&2; exit 1; }
if grep -E 'WARN|ERROR' "$log" >&2; then
  echo "book: mdBook warned (above): fix the pages" >&2
  exit 1
fi

python3 - docs/src <<'PY'
import os, re, sys
root = sys.argv[1]
def anchors(path):
    # mdBook's ids: the heading's text, lower case, spaces to '-', other
    # punctuation but '-' and '_' dropped; a repeat gets '-1', '-2', ...
    seen, ids, fence = {}, set(), False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6} (.*)", line)
        if m:
            text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", m.group(1)).strip().lower()
            base = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids
bad = []
pages = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".md")]
pages.append("README.md")  # the front page links into the book
cache = {}
for page in pages:
    text = open(page, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # no links in code
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, mailto: ...: not checked (no network here)
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(file):
            bad.append(f"{page}: {target}: no such file")
            continue
        if anchor and file.endswith(".md"):
            ids = cache.setdefault(file, anchors(file))
            if anchor not in ids:
                bad.append(f"{page}: {target}: no heading #{anchor} in {file}")
for b in bad:
    print("book: broken link:", b, file=sys.stderr)
if bad:
    sys.exit(1)
print(f"book: {len(pages)} pages, links checked", file=sys.stderr)
PY
echo "target/book/index.html"
