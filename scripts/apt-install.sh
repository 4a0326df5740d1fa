#!/usr/bin/env bash
# Installs Debian packages for the project's scripts: as root, or with sudo;
# if the first try fails (a stale package index on a new machine), the index is
# updated once and it tries again. Quiet on stdout: scripts that print values
# (`KEY=value`) call it.
#
#   scripts/apt-install.sh PACKAGE ...
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 PACKAGE ..." >&2; exit 2; }
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q "$@" >&2 || {
  $sudo apt-get update -q >&2 && $sudo apt-get install -y -q "$@" >&2
}
