#!/usr/bin/env bash
# A profile-guided (PGO) release build of the gateway: the binary to deploy.
#   bench/pgo.sh        # ~25 min on 2 cores (clean checkout); writes target/pgo/<host>/release/switchyard
#                       # (under $CARGO_TARGET_DIR if set), and prints that path
# 1. builds the gateway instrumented (-Cprofile-generate) in target/pgo-gen,
# 2. runs it through the benchmark harness's scenarios for a short while (pass-through and
#    streamed routes, the example chains, API keys with rate limits on the memory store and, if
#    redis-server is installed, the Redis store, ONNX invocations), all on 127.0.0.1 against the
#    mock upstream,
# 3. merges the profile with llvm-profdata and builds again with it (-Cprofile-use).
# Same code, same behaviour: only where the compiler inlines and lays out code changes (see
# BENCHMARKS.md, "Stop 25: a profile-guided build"). The profile is made anew on every run; nothing
# of it is committed. Needs llvm-profdata: `rustup component add llvm-tools` (matches rustc's
# LLVM) or Debian's `apt-get install llvm-19` (reads this rustc's profiles; a too old one says
# it cannot read them). Set LLVM_PROFDATA to choose one.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
host=$(rustc -vV | sed -n 's/^host: //p')
# Absolute: rustc runs in each dependency's own folder, and -Cprofile-use names a file here.
base=$(realpath -m "${CARGO_TARGET_DIR:-$root/target}")
gen_dir="$base/pgo-gen"
use_dir="$base/pgo"
profiles="$gen_dir/profiles"
say() { echo "[pgo] $*" >&2; }

# --target keeps RUSTFLAGS off build scripts and proc macros: only the gateway is instrumented.
# RUSTFLAGS of your own apply to both builds.
build() { # build <target dir> <rustflags>
  CARGO_TARGET_DIR="$1" RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$2" \
    nice -n 10 cargo build --release --locked --quiet --target "$host" -p switchyard
}
say "1/3 instrumented build in $gen_dir ..."
rm -rf "$profiles"
build "$gen_dir" "-Cprofile-generate=$profiles"
say "building the harness's mock and load generator ($base/release) ..."
CARGO_TARGET_DIR="$base" nice -n 10 cargo build --release --locked --quiet -p switchyard-bench
if ! command -v oha >/dev/null 2>&1; then
  say "oha not found; installing it with cargo (one time) ..."
  nice -n 10 cargo install oha --locked --quiet
fi

say "2/3 training run (the harness's scenarios, short rounds) ..."
# Every gateway the harness starts writes its profile when it exits (SIGTERM: a clean exit).
LLVM_PROFILE_FILE="$profiles/switchyard-%p-%m.profraw" python3 bench/run.py \
  --bin-dir "$base/release" --switchyard "$gen_dir/$host/release/switchyard" \
  --oha "$(command -v oha)" --peers '' --no-install --seconds 1 --rounds 1 --onnx-models scaler_logreg \
  --build-note "instrumented build (PGO training run)" --out "$gen_dir/training.md" >/dev/null
shopt -s nullglob
raw=("$profiles"/*.profraw)
[ ${#raw[@]} -gt 0 ] || { say "the training run wrote no profile"; exit 1; }
# rustc's own llvm-profdata (rustup's llvm-tools) first, then the newest installed: an older
# LLVM's cannot read this rustc's profiles.
if [ -n "${LLVM_PROFDATA:-}" ]; then
  tools=("$LLVM_PROFDATA")
else
  tools=("$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata")
  installed=(/usr/lib/llvm-*/bin/llvm-profdata) # nullglob: none is none
  if [ ${#installed[@]} -gt 0 ]; then
    mapfile -t installed < <(printf '%s\n' "${installed[@]}" | sort -V -r)
    tools+=("${installed[@]}")
  fi
  tools+=("$(command -v llvm-profdata || true)")
fi
merged=""
for tool in "${tools[@]}"; do
  [ -f "$tool" ] && [ -x "$tool" ] || continue
  if "$tool" merge --failure-mode=all -o "$profiles/merged.profdata" "${raw[@]}" \
    >&2 2>"$profiles/merge.err"; then
    merged="$tool" && break
  fi
  say "$tool: $(tail -1 "$profiles/merge.err")"
done
if [ -z "$merged" ]; then
  say "no llvm-profdata that reads these profiles: rustup component add llvm-tools, or"
  say "apt-get install llvm-19 (or newer), or set LLVM_PROFDATA"
  exit 1
fi
# Named by its content, so that a new profile rebuilds every crate (cargo does not look into
# files that RUSTFLAGS name).
sum=$(sha256sum "$profiles/merged.profdata" | cut -c1-16)
profile="$profiles/merged-$sum.profdata"
mv "$profiles/merged.profdata" "$profile"
say "merged ${#raw[@]} profiles with $merged"

say "3/3 optimised build in $use_dir ..."
build "$use_dir" "-Cprofile-use=$profile"
say "done"
echo "$use_dir/$host/release/switchyard" # the only line on standard output
