#!/usr/bin/env bash
# What one Redis round trip costs depending on where Redis runs relative to its caller, and what
# the Redis limits store adds inside the gateway in each case (issue 6's target: no more than one
# round trip). Three parts, on one redis-server of its own (port 19499, persisting nothing):
#  1. paced EVALSHA of the limiter's script (`redis-rtt`) from a caller pinned to CPU 0, with
#     Redis pinned to CPU 0 (same core) or CPU 1 (another core), on an idle machine;
#  2. a one-thread gateway pinned to CPU 0 with a per-key rule on that Redis, Redis on CPU 0 or
#     CPU 1: its own time (request log: latency_ms − upstream_ms, p50) minus that of a plain
#     gateway pinned the same way, at RATE req/s;
#  3. nothing pinned, the plain gateway under RATE req/s: the paced probe from one thread at
#     RATE, and from one thread per core at RATE / cores each (`redis-rtt --threads`: the
#     gateway's shape, and the harness's reference for the Redis goal); then the extra of a
#     gateway with one thread per core.
# The mock and oha are not pinned: in part 2 they share the cores with Redis and the gateway.
#   bench/redis-placement.sh            # RATE=1000 SECONDS_PER_ROUND=5
# Needs redis-server, taskset (util-linux) and oha, and 2+ cores; uses the release binaries
# bench/run.sh builds; CPUs 0 and 1 must be usable. Prints a table; a run that completes also
# writes it, with the commit and settings, to bench/results/<date>-<time>-placement.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bins="${CARGO_TARGET_DIR:-$PWD/target}/release"
rate="${RATE:-1000}" seconds="${SECONDS_PER_ROUND:-5}"
cores=$(nproc)
[ "$cores" -ge 2 ] || { echo "needs 2 or more cores (has $cores)" >&2; exit 1; }
for tool in redis-server oha taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool on PATH" >&2; exit 1; }
done
work="$PWD/bench/work/placement"
mkdir -p "$work"
redis_port=19499 mock_port=19490 plain_port=19491 limited_port=19492
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
redis-server --port "$redis_port" --save '' --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
"$bins/mock-upstream" --listen "127.0.0.1:$mock_port" >"$work/mock.log" 2>&1 &
pids+=("$!")
passthrough_config "$work/plain.toml" "$plain_port" "$mock_port"
passthrough_config "$work/limited.toml" "$limited_port" "$mock_port"
cat >>"$work/limited.toml" <<TOML
[auth]
keys = [{ id = "bench", key_env = "BENCH_CLIENT_KEY" }]
[[limits]]
scope = ["api_key"]
requests_per_minute = 60000000 # never refuses at the tested rates
burst = 100000
[limits_store]
kind = "redis"
url = "redis://127.0.0.1:$redis_port"
TOML
export BENCH_CLIENT_KEY=sk-bench-placement
load() { # PORT SECONDS
  oha --no-tui -q "$rate" --latency-correction -z "$2s" -m POST -H 'content-type: application/json' \
    -H "authorization: Bearer $BENCH_CLIENT_KEY" -d "$CHAT_BODY" \
    "http://127.0.0.1:$1/v1/chat/completions" >/dev/null
}
load_in_background() { # PORT SECONDS: oha itself in the background, its pid last in `pids`
  oha --no-tui -q "$rate" --latency-correction -z "$2s" -m POST -H 'content-type: application/json' \
    -H "authorization: Bearer $BENCH_CLIENT_KEY" -d "$CHAT_BODY" \
    "http://127.0.0.1:$1/v1/chat/completions" >/dev/null &
  pids+=("$!")
}
own_p50() { # LOG FROM_BYTE: median of latency_ms − upstream_ms of the chat lines after FROM_BYTE
  tail -c "+$(($2 + 1))" "$1" | python3 -c '
import re, statistics, sys
times = [float(a) - float(b) for a, b in re.findall(
    r"path=\"/v1/chat/completions\" .*?status=200 .*?latency_ms=([\d.]+) upstream_ms=([\d.]+)", sys.stdin.read())]
if not times:
    sys.exit("no request lines in the log")
print(f"{statistics.median(times):.3f}")'
}
minus() { python3 -c "print(f'{float(\"$1\") - float(\"$2\"):+.3f}')"; }
gateways() { # PIN (a CPU list for taskset, or "all"), THREADS (empty: one per core)
  local cpus=$1 threads=$2
  [ "$cpus" = all ] && cpus="0-$((cores - 1))"
  for name in plain limited; do
    env -u TOKIO_WORKER_THREADS ${threads:+TOKIO_WORKER_THREADS=$threads} taskset -c "$cpus" "$bins/switchyard" serve \
      --config "$work/$name.toml" >>"$work/$name.log" 2>&1 &
    pids+=("$!")
    eval "${name}_pid=$!"
  done
  wait_ready "$plain_port"
  wait_ready "$limited_port"
  load "$limited_port" 1 # the first decision loads the script
}
extra_row() { # PART PLACEMENT: both gateways under the load in turn, the table row of the extra
  local from_plain from_limited plain limited
  from_plain=$(stat -c %s "$work/plain.log") from_limited=$(stat -c %s "$work/limited.log")
  load "$plain_port" "$seconds"
  load "$limited_port" "$seconds"
  plain=$(own_p50 "$work/plain.log" "$from_plain")
  limited=$(own_p50 "$work/limited.log" "$from_limited")
  echo "| $1 | $2 | Redis store's extra inside the gateway (own p50 $limited vs $plain) | $(minus "$limited" "$plain") |"
}
stop_gateways() {
  kill "$plain_pid" "$limited_pid"
  wait "$plain_pid" "$limited_pid" 2>/dev/null || true
}
: >"$work/plain.log"
: >"$work/limited.log"

# The table goes to the terminal and to a file, copied into bench/results/ at the end.
table="$work/table.md"
results="bench/results/$(date +%Y-%m-%d-%H%M)-placement.md"
echo "\`bench/redis-placement.sh\` on $(git describe --always --dirty), $(date -u '+%Y-%m-%d %H:%M UTC'), RATE=$rate, SECONDS_PER_ROUND=$seconds, $cores cores" >"$table"
echo >>"$table"
exec 3>&1 > >(tee -a "$table")
tee_pid=$!
echo "| part | placement | figure | p50 ms |"
echo "|---|---|---|---:|"
gateways 0 1
sha=$(python3 -c 'import sys; sys.path[:0] = ["bench"]; import run; print(run.limiter_script_sha() or "")')
[ -n "$sha" ] || { echo "cannot read the limiter script from crates/gateway/src/limits/redis.rs" >&2; exit 1; }
probe() { # [taskset -c CPU] redis-rtt ARGS: its whole exchange's p50
  local out
  out=$("$@")
  sed -n 's/.*whole exchange p50 \([0-9.]*\) ms.*/\1/p' <<<"$out" | grep . || { echo "redis-rtt: $out" >&2; exit 1; }
}
rtt=("$bins/redis-rtt" --port "$redis_port" --sha "$sha")
for redis_cpu in 0 1; do
  taskset -apc "$redis_cpu" "$redis_pid" >/dev/null
  where=$([ "$redis_cpu" = 0 ] && echo "same core" || echo "other core")
  p50=$(probe taskset -c 0 "${rtt[@]}" --rate "$rate" --count $((rate * 3)))
  echo "| 1 | Redis on CPU $redis_cpu, caller on CPU 0 ($where) | paced EVALSHA, idle machine | $p50 |"
  extra_row 2 "Redis on CPU $redis_cpu, one-thread gateway on CPU 0 ($where)"
done
stop_gateways

taskset -apc "0-$((cores - 1))" "$redis_pid" >/dev/null
gateways all ""
for threads in 1 "$cores"; do
  load_in_background "$plain_port" $((seconds + 1))
  sleep 0.5
  p50=$(probe "${rtt[@]}" --rate "$rate" --count $((rate * seconds / 2)) --threads "$threads")
  wait "${pids[-1]}"
  echo "| 3 | nothing pinned, plain gateway under load | paced EVALSHA from $threads thread(s), $rate/s in all | $p50 |"
done
extra_row 3 "nothing pinned, gateway with one thread per core"
exec >&3 3>&-
wait "$tee_pid"
cp "$table" "$results"
echo "written to $results"
