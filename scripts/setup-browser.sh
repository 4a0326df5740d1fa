#!/usr/bin/env bash
# A real browser for the job page's tests: Debian's headless-capable
# `chromium` and its WebDriver, `chromium-driver` (chromedriver), from the
# distribution's own packages (about 300 MB, a minute or two at mirror
# speed; nothing to do when both are installed). The tests find both on PATH.
set -euo pipefail

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing Debian's chromium and chromium-driver" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium chromium-driver >&2 || {
    $sudo apt-get update -q >&2 && $sudo apt-get install -y -q chromium chromium-driver >&2
  }
fi
chromedriver --version
