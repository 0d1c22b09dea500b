#!/usr/bin/env bash
# CPU time and context switches per pass-through request at a fixed rate, for one or more
# gateway variants side by side (same mock), plus the gateway's own time from its request log.
#   bench/cpu-per-request.sh "shipped:" "one worker:TOKIO_WORKER_THREADS=1" "quiet:RUST_LOG=warn"
#   RATE=1000 SECONDS_PER_ROUND=5 ROUNDS=2 BIN=/path/to/switchyard bench/cpu-per-request.sh "a:" ...
# Each argument is "name:ENV=VALUE,ENV=VALUE" (env may be empty). Rounds alternate the variants.
# Needs perf (Debian: linux-perf) and oha; uses the release binaries bench/run.sh builds.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bins="${CARGO_TARGET_DIR:-$PWD/target}/release"
gateway="${BIN:-$bins/switchyard}"
rate="${RATE:-1000}"
seconds="${SECONDS_PER_ROUND:-5}"
rounds="${ROUNDS:-2}"
work=bench/work
mkdir -p "$work"
mock_port=19190
"$bins/mock-upstream" --listen "127.0.0.1:$mock_port" >"$work/cpu-mock.log" 2>&1 &
pids=("$!")
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
names=() ports=() gw_pids=()
port=19191
for spec in "$@"; do
  name="${spec%%:*}" envs="${spec#*:}"
  passthrough_config "$work/cpu-$port.toml" "$port" "$mock_port"
  # shellcheck disable=SC2086 # the env list is split on purpose
  env RUST_LOG=info ${envs//,/ } "$gateway" serve --config "$work/cpu-$port.toml" >"$work/cpu-$port.log" 2>&1 &
  pids+=("$!") gw_pids+=("$!") names+=("$name") ports+=("$port")
  port=$((port + 1))
done
for p in "${ports[@]}"; do wait_ready "$p"; done
echo "| gateway | round | CPU per request µs | context switches per request |"
echo "|---|---:|---:|---:|"
for round in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    perf stat -x, -e task-clock,context-switches -p "${gw_pids[$i]}" -o "$work/cpu-stat.txt" -- sleep "$seconds" &
    stat_pid=$!
    oha --no-tui -q "$rate" -z "${seconds}s" -m POST -H 'content-type: application/json' -d "$CHAT_BODY" \
      "http://127.0.0.1:${ports[$i]}/v1/chat/completions" >/dev/null
    wait "$stat_pid"
    requests=$((rate * seconds))
    awk -F, -v n="${names[$i]}" -v r="$round" -v q="$requests" '
      /task-clock/ { cpu = $1 } /context-switches/ { cs = $1 }
      END { printf "| %s | %d | %.0f | %.1f |\n", n, r, cpu * 1000 / q, cs / q }' "$work/cpu-stat.txt"
  done
done
echo
echo "| gateway | own time p50 ms (request log: latency_ms − upstream_ms) |"
echo "|---|---:|"
for i in "${!names[@]}"; do
  python3 - "$work/cpu-${ports[$i]}.log" "${names[$i]}" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
own = [float(a) - float(b) for a, b in re.findall(r"latency_ms=([\d.]+) upstream_ms=([\d.]+)", text)]
print(f"| {sys.argv[2]} | {statistics.median(own):.3f} |" if own else f"| {sys.argv[2]} | — |")
PY
done
