#!/usr/bin/env bash
# What an extra proxy hop costs on this machine: the same pass-through request sent to the mock
# directly, through nginx, through HAProxy (both C event-loop proxies with upstream keep-alive),
# through bare-proxy (hyper's server and client and nothing else: the floor of our Rust stack)
# and through Switchyard, at a fixed rate and at full load. Rounds alternate the targets.
#   bench/floor.sh                 # RATE=1000 SECONDS_PER_ROUND=5 ROUNDS=3 CONCURRENCY=32
#   BIN=/path/to/switchyard bench/floor.sh
# Needs nginx and haproxy (Debian: apt-get install nginx-light haproxy), perf (linux-perf) for
# CPU per request, and oha; uses the release binaries bench/run.sh builds. A proxy that is not
# installed is skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bins="${CARGO_TARGET_DIR:-$PWD/target}/release"
gateway="${BIN:-$bins/switchyard}"
rate="${RATE:-1000}" seconds="${SECONDS_PER_ROUND:-5}" rounds="${ROUNDS:-3}"
concurrency="${CONCURRENCY:-32}"
work="$PWD/bench/work/floor"
mkdir -p "$work"
mock_port=19290
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
"$bins/mock-upstream" --listen "127.0.0.1:$mock_port" >"$work/mock.log" 2>&1 &
pids+=("$!")
names=(direct) ports=("$mock_port") watch=("$!")

if command -v nginx >/dev/null; then
  cat >"$work/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx-body;
  proxy_temp_path $work/nginx-proxy;
  upstream mock { server 127.0.0.1:$mock_port; keepalive 64; }
  server {
    listen 127.0.0.1:19291;
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
  nginx -c "$work/nginx.conf" &
  pids+=("$!") names+=(nginx) ports+=(19291) watch+=("$!")
else
  echo "nginx not installed: skipped" >&2
fi
if command -v haproxy >/dev/null; then
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend in
  bind 127.0.0.1:19292
  default_backend mock
backend mock
  server mock 127.0.0.1:$mock_port
CONF
  haproxy -f "$work/haproxy.cfg" -db &
  pids+=("$!") names+=(haproxy) ports+=(19292) watch+=("$!")
else
  echo "haproxy not installed: skipped" >&2
fi
"$bins/bare-proxy" --listen 127.0.0.1:19294 \
  --upstream "http://127.0.0.1:$mock_port/v1/chat/completions" >"$work/bare-proxy.log" 2>&1 &
pids+=("$!") names+=(bare-proxy) ports+=(19294) watch+=("$!")
passthrough_config "$work/switchyard.toml" 19293 "$mock_port"
"$gateway" serve --config "$work/switchyard.toml" >"$work/switchyard.log" 2>&1 &
pids+=("$!") names+=(switchyard) ports+=(19293) watch+=("$!")
wait_ready 19293
# nginx and HAProxy have no readiness endpoint: wait until each answers anything over HTTP.
for port in "${ports[@]}"; do
  for _ in $(seq 50); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && continue 2
    sleep 0.1
  done
  echo "nothing answers on port $port" >&2
  exit 1
done

# perf counts the proxy's whole process tree (nginx's and HAProxy's workers included).
tree() { pgrep -P "$1" | paste -sd, | sed "s/^/$1,/; s/,\$//"; }
echo "| target | round | p50 ms | p99 ms | success | CPU per request µs | context switches per request |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for round in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    perf stat -x, -e task-clock,context-switches -p "$(tree "${watch[$i]}")" -o "$work/stat.txt" \
      -- sleep "$seconds" &
    stat_pid=$!
    oha --no-tui --output-format json -q "$rate" --latency-correction -z "${seconds}s" -m POST \
      -H 'content-type: application/json' -d "$CHAT_BODY" \
      "http://127.0.0.1:${ports[$i]}/v1/chat/completions" >"$work/oha.json"
    wait "$stat_pid"
    python3 - "$work/oha.json" "$work/stat.txt" "${names[$i]}" "$round" "$((rate * seconds))" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
p = report["latencyPercentiles"]
stat = {}
for line in open(sys.argv[2]):
    fields = line.split(",")
    if len(fields) > 3 and fields[0].replace(".", "").isdigit():
        stat[fields[2]] = float(fields[0])
n = int(sys.argv[5])
print(f"| {sys.argv[3]} | {sys.argv[4]} | {p['p50'] * 1000:.3f} | {p['p99'] * 1000:.3f} "
      f"| {report['summary']['successRate']:.3f} "
      f"| {stat.get('task-clock', 0) * 1000 / n:.0f} | {stat.get('context-switches', 0) / n:.1f} |")
PY
  done
done
echo
echo "| target | round | max req/s (oha -c $concurrency) | success |"
echo "|---|---:|---:|---:|"
for round in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    oha --no-tui --output-format json -c "$concurrency" -z "${seconds}s" -m POST \
      -H 'content-type: application/json' -d "$CHAT_BODY" \
      "http://127.0.0.1:${ports[$i]}/v1/chat/completions" >"$work/oha.json"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['summary']; \
print(f'| {sys.argv[2]} | {sys.argv[3]} | {r[\"requestsPerSec\"]:.0f} | {r[\"successRate\"]:.3f} |')" \
      "$work/oha.json" "${names[$i]}" "$round"
  done
done
