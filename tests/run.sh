#!/usr/bin/env bash
# The test suite: `cargo test --workspace`. The Redis rate-limit tests start a redis-server of
# their own on a free loopback port, so Debian's redis-server is installed first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (the Redis rate-limit tests start their own)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends redis-server
fi
exec cargo test --workspace "$@"
