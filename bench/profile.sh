#!/usr/bin/env bash
# Profile the gateway under max-throughput load with perf (Debian: apt-get install linux-perf).
#   bench/profile.sh [seconds]        # default 8 s; prints the top symbols, keeps bench/work/perf.data
# Uses the release binaries bench/run.sh builds; set CARGO_TARGET_DIR like for bench/run.sh.
# Extra gateway environment passes through, e.g. RUST_LOG=warn bench/profile.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
seconds="${1:-8}"
work=bench/work
mkdir -p "$work"
mock_port=19180
gw_port=19181
"$bin/mock-upstream" --listen "127.0.0.1:$mock_port" >"$work/profile-mock.log" 2>&1 &
mock_pid=$!
passthrough_config "$work/profile.toml" "$gw_port" "$mock_port"
"$bin/switchyard" serve --config "$work/profile.toml" >"$work/profile-gateway.log" 2>&1 &
gw_pid=$!
trap 'kill "$gw_pid" "$mock_pid" 2>/dev/null || true' EXIT
wait_ready "$gw_port"
perf record -F 1999 -g -p "$gw_pid" -o "$work/perf.data" -- sleep "$seconds" >"$work/perf-record.log" 2>&1 &
perf_pid=$!
oha --no-tui -c 32 -z "${seconds}s" -m POST -H 'content-type: application/json' \
  -d "$CHAT_BODY" \
  "http://127.0.0.1:$gw_port/v1/chat/completions" | grep -E 'Requests/sec|Success rate'
wait "$perf_pid"
echo "--- where the time goes, by binary ---"
perf report -i "$work/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | sed 's/  */ /g' | head -6
echo "--- top symbols (self time) ---"
perf report -i "$work/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | sed 's/  */ /g' | cut -c1-150 | head -40
