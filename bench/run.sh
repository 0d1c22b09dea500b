#!/usr/bin/env bash
# Switchyard benchmark harness (issue 7): one command.
#   bench/run.sh                 # full run, ~16 min on 2 cores (first run also installs the peers)
#   bench/run.sh --seconds 3     # shorter rounds; see `python3 bench/run.py --help` for all options
#   bench/run.sh --scenarios onnx  # only ONNX invocations vs `mlflow models serve` (~5 min)
#   PGO=1 bench/run.sh           # the profile-guided build (bench/pgo.sh, ~20 min more) as
#                                # `switchyard`, the plain release build beside it as a variant
# Builds the release binaries, installs oha if missing, then runs bench/run.py, which prints a
# markdown report and writes it to bench/results/<date>.md. All traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TARGET_DIR="$target_dir"
echo "[bench] building release binaries (target dir $target_dir) ..." >&2
nice -n 10 cargo build --release --quiet -p switchyard -p switchyard-bench
if ! command -v oha >/dev/null 2>&1; then
  echo "[bench] oha not found; installing it with cargo (one time) ..." >&2
  nice -n 10 cargo install oha --locked --quiet
fi
gateway=()
if [ "${PGO:-0}" = 1 ]; then
  pgo_build=$(bench/pgo.sh) # its path
  gateway=(--switchyard "$pgo_build"
    --build-note "profile-guided release build (bench/pgo.sh)"
    --variant "no PGO:BIN=$target_dir/release/switchyard")
fi
exec python3 bench/run.py --bin-dir "$target_dir/release" --oha "$(command -v oha)" "${gateway[@]}" "$@"
