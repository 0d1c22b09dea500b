#!/usr/bin/env bash
# Instructions the gateway executes per pass-through request, counted by callgrind: user-space
# work only (no kernel, no waiting), but exact — two runs of one build agree to ~0.1 %, where
# CPU time per request moves by ±10 % between runs on a shared VM. For comparing builds:
#   bench/instructions.sh                          # the release build bench/run.sh makes
#   BIN=/tmp/old/switchyard bench/instructions.sh  # another build
#   REQUESTS=5000 RUST_LOG=warn bench/instructions.sh
#   STREAM=1 bench/instructions.sh                 # streamed requests (the mock's 16 chunks)
# Keeps the profile in bench/work/callgrind.out.* for `callgrind_annotate --inclusive=yes`.
# Needs valgrind (Debian: apt-get install valgrind) and oha; the gateway runs ~50× slower under it.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bins="${CARGO_TARGET_DIR:-$PWD/target}/release"
gateway="${BIN:-$bins/switchyard}"
requests="${REQUESTS:-2000}"
body="$CHAT_BODY"
[ -n "${STREAM:-}" ] && body="$STREAM_CHAT_BODY"
work=bench/work
mkdir -p "$work"
rm -f "$work"/callgrind.out.*
mock_port=19195
gw_port=19196
"$bins/mock-upstream" --listen "127.0.0.1:$mock_port" >"$work/instructions-mock.log" 2>&1 &
mock_pid=$!
passthrough_config "$work/instructions.toml" "$gw_port" "$mock_port"
RUST_LOG="${RUST_LOG:-info}" valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out.%p" \
  "$gateway" serve --config "$work/instructions.toml" >"$work/instructions-gateway.log" 2>&1 &
gw_pid=$!
trap 'kill "$gw_pid" "$mock_pid" 2>/dev/null || true' EXIT
wait_ready "$gw_port" 300 # start-up under valgrind takes seconds
send() {
  oha --no-tui -n "$1" -c 4 -m POST -H 'content-type: application/json' -d "$body" \
    "http://127.0.0.1:$gw_port/v1/chat/completions" | grep -E 'Success rate'
}
send 300 >/dev/null # warm-up: connections, pools, lazily built state
callgrind_control --zero "$gw_pid" >/dev/null 2>&1
send "$requests"
callgrind_control --dump "$gw_pid" >/dev/null 2>&1
# The dump after --zero is the file with a part number (callgrind.out.PID.1).
for _ in $(seq 50); do
  dump=$(ls "$work"/callgrind.out.*.* 2>/dev/null | head -1) && [ -s "$dump" ] && break
  sleep 0.1
done
total=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
echo "$gateway: $((total / requests)) instructions per ${STREAM:+streamed }request ($requests requests; profile: $dump)"
