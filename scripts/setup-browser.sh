#!/usr/bin/env bash
# A real browser for the job page's tests: Debian's headless-capable
# `chromium` and its WebDriver, `chromium-driver` (chromedriver), from the
# distribution's own packages (about 300 MB, a minute or two at mirror
# speed; nothing to do when both are installed). The tests find both on PATH.
set -euo pipefail

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing Debian's chromium and chromium-driver" >&2
  "$(dirname "$0")/apt-install.sh" chromium chromium-driver
fi
chromedriver --version
