#!/usr/bin/env bash
# System calls the gateway makes per request, counted with strace -c over a fixed number of
# requests at a fixed rate (the kernel work a user-space profile does not show: every writev to a
# client is also a wake-up of that client).
#   bench/syscalls.sh                     # 1000 pass-through requests at 500 req/s
#   STREAM=1 bench/syscalls.sh            # streamed requests (the mock's 16 chunks)
#   BIN=/path/to/switchyard REQUESTS=2000 RATE=1000 bench/syscalls.sh
# Needs strace (Debian: apt-get install strace) and oha; uses the release binaries bench/run.sh
# builds. strace slows every system call down, so its times are not the gateway's: read the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bins="${CARGO_TARGET_DIR:-$PWD/target}/release"
gateway="${BIN:-$bins/switchyard}"
requests="${REQUESTS:-1000}"
rate="${RATE:-500}"
body="$CHAT_BODY"
[ -n "${STREAM:-}" ] && body="$STREAM_CHAT_BODY"
work=bench/work
mkdir -p "$work"
mock_port=19197
gw_port=19198
"$bins/mock-upstream" --listen "127.0.0.1:$mock_port" >"$work/syscalls-mock.log" 2>&1 &
mock_pid=$!
passthrough_config "$work/syscalls.toml" "$gw_port" "$mock_port"
"$gateway" serve --config "$work/syscalls.toml" >"$work/syscalls-gateway.log" 2>&1 &
gw_pid=$!
trap 'kill "$gw_pid" "$mock_pid" 2>/dev/null || true' EXIT
wait_ready "$gw_port"
send() {
  oha --no-tui -n "$1" -q "$rate" -c 4 -m POST -H 'content-type: application/json' -d "$body" \
    "http://127.0.0.1:$gw_port/v1/chat/completions" | grep -E 'Success rate'
}
send 300 >/dev/null # warm-up: connections, pools
strace -c -f -p "$gw_pid" -o "$work/syscalls.txt" &
strace_pid=$!
sleep 1 # strace attaches to every thread
send "$requests"
kill -INT "$strace_pid"
wait "$strace_pid" || true
echo "$gateway: system calls per ${STREAM:+streamed }request ($requests requests at $rate req/s)"
# strace -c columns: % time, seconds, usecs/call, calls, [errors,] syscall.
awk -v n="$requests" '$1 ~ /^[0-9.]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {
  printf "  %-14s %6.2f\n", $NF, $4 / n }' "$work/syscalls.txt" | sort -k2 -rn | head -8
