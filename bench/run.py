#!/usr/bin/env python3
"""Switchyard benchmark driver (issue 7). Python standard library only.

Starts the mock upstream, the Switchyard gateway and the peers (LiteLLM proxy, MLflow gateway)
on 127.0.0.1, all in front of the same mock, then runs each scenario against the mock directly
and through every gateway, interleaved round by round, and writes a markdown report to
bench/results/<date>.md. Normally started by bench/run.sh, which builds the binaries first.

Nothing here talks to anything but 127.0.0.1, except pip installing the peers from PyPI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / "work"  # scratch: configs, logs, oha databases (gitignored)
RESULTS = BENCH / "results"

# Every target is called with the same body; `model` is the endpoint name in each gateway
# (the mock ignores it).
MESSAGES = [{"role": "user", "content": "Hello! Please answer in a few words."}]
BODY = json.dumps({"model": "chat", "messages": MESSAGES, "max_tokens": 64})
STREAM_BODY = json.dumps(
    {
        "model": "chat",
        "messages": MESSAGES,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
# A key the peers insist on having; the mock ignores it. Not a secret.
DUMMY_KEY = "mock-key-not-a-secret"

# Scenarios that need features the gateway does not have yet. Each becomes a real scenario when
# its issue lands: add a config builder in `switchyard_config` and a block in `main`.
FUTURE_SCENARIOS = [
    ("chain: each example chain (a two-call chain should add ~2x the pass-through overhead)",
     "chains do not exist yet"),
    ("pass-through with an API key and a rate-limit rule (memory store)",
     "API keys and limits do not exist yet"),
    ("pass-through with an API key and a rate-limit rule (Redis store)",
     "API keys and limits do not exist yet"),
    ("ONNX invocations (`POST /endpoints/{name}/invocations`)", "ONNX serving does not exist yet"),
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for children: no proxies (everything is loopback), no real API keys."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.endswith("_API_KEY")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


class Proc:
    """A child process in its own session, logging to bench/work/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = WORK / f"{name}.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or clean_env(),
            cwd=WORK,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            # The child leads its own process group (start_new_session), so this reaches its
            # workers too and nothing else.
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=10)
        self.log_file.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_mb(pid: int, field: str) -> tuple[float, int]:
    """Sum of `field` (VmHWM or VmRSS) over the process tree in MB, and the process count."""
    pids = process_tree(pid)
    return sum(status_kb(p, field) for p in pids) / 1024, len(pids)


def http(method: str, url: str, body: str | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e).encode()


def wait_ready(proc: Proc, url: str, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        status, _ = http("GET", url, timeout=2)
        if status == 200:
            return True
        time.sleep(0.2)
    return False


def smoke_test(base: str) -> tuple[str | None, bool]:
    """One plain and one streamed request; returns what went wrong (or None) and whether the
    stream ended with `data: [DONE]` as OpenAI's streams do."""
    status, body = http("POST", base + "/chat/completions", BODY, timeout=30)
    if status != 200 or b'"choices"' not in body:
        return f"non-stream request failed: HTTP {status} {body[:300]!r}", False
    status, body = http("POST", base + "/chat/completions", STREAM_BODY, timeout=30)
    if status != 200 or b"data: " not in body:
        return f"stream request failed: HTTP {status} {body[-300:]!r}", False
    return None, body.rstrip().endswith(b"data: [DONE]")


# ---------------------------------------------------------------------------------------------
# Targets


class Target:
    def __init__(self, name: str, base: str, proc: Proc | None, version: str = ""):
        self.name = name
        self.base = base  # e.g. http://127.0.0.1:PORT/v1
        self.proc = proc
        self.version = version
        self.idle_rss_mb = 0.0
        self.processes = 1
        self.stream_ok = True
        self.stream_done = True  # its streams end with `data: [DONE]`
        self.notes: list[str] = []

    @property
    def url(self) -> str:
        return self.base + "/chat/completions"


def switchyard_config(mock_base: str, listen: str) -> str:
    """Gateway config: one route endpoint `chat` passing through to the mock.

    Hook: chain, API-key and rate-limit scenarios extend this with `[[endpoints]]` pointing at
    logged chains, `[auth]` and `[[limits]]` once those issues land."""
    return f"""# Generated by bench/run.py
[server]
listen = "{listen}"

[providers.mock]
kind = "openai"
base_url = "{mock_base}"

[routes.main]
targets = [{{ provider = "mock", model = "mock-model" }}]
timeout_ms = 30000

[[endpoints]]
name = "chat"
route = "main"
"""


def venv_python_version(python: Path, package: str) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip()


def ensure_venv(path: Path, packages: list[str], module: str, install: bool) -> str | None:
    """Creates the virtualenv and installs `packages` if needed; returns a reason on failure."""
    python = path / "bin" / "python"
    if python.exists() and venv_python_version(python, module):
        return None
    if not install:
        return f"not installed in {path.relative_to(ROOT)} (run without --no-install)"
    log(f"installing {' '.join(packages)} into {path.relative_to(ROOT)} (one time) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *packages],
            check=True,
            capture_output=True,
            timeout=1200,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        stderr = getattr(e, "stderr", b"") or b""
        return f"pip install failed: {stderr.decode(errors='replace')[-300:]}"
    return None


def start_litellm(mock_base: str, install: bool) -> tuple[Target | None, str | None]:
    venv = BENCH / ".venv"
    reason = ensure_venv(venv, ["litellm[proxy]"], "litellm", install)
    if reason:
        return None, reason
    port = free_port()
    config = WORK / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: chat
    litellm_params:
      model: openai/mock-model
      api_base: {mock_base}
      api_key: {DUMMY_KEY}
litellm_settings:
  telemetry: false
"""
    )
    # No master key: the proxy listens on 127.0.0.1 only, for the length of the run.
    env = clean_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                     "LITELLM_TELEMETRY": "False",
                     "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"})
    proc = Proc(
        "litellm",
        [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
         "--port", str(port), "--num_workers", "1"],
        env,
    )
    version = venv_python_version(venv / "bin" / "python", "litellm")
    return check_started(proc, f"LiteLLM {version}", f"http://127.0.0.1:{port}",
                         "/health/liveliness", 120)


def start_mlflow(mock_base: str, install: bool) -> tuple[Target | None, str | None]:
    venv = BENCH / ".venv-mlflow"
    reason = ensure_venv(venv, ["mlflow[gateway]", "psutil"], "mlflow", install)
    if reason:
        return None, reason
    port = free_port()
    config = WORK / "mlflow.yaml"
    config.write_text(
        f"""endpoints:
  - name: chat
    endpoint_type: llm/v1/chat
    model:
      provider: openai
      name: mock-model
      config:
        openai_api_key: {DUMMY_KEY}
        openai_api_base: {mock_base}
"""
    )
    proc = Proc(
        "mlflow",
        [str(venv / "bin" / "mlflow"), "gateway", "start", "--config-path", str(config),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        clean_env({"MLFLOW_TRACKING_URI": f"file://{WORK / 'mlruns'}"}),
    )
    version = venv_python_version(venv / "bin" / "python", "mlflow")
    return check_started(proc, f"MLflow gateway {version}", f"http://127.0.0.1:{port}",
                         "/health", 120)


def check_started(proc: Proc, name: str, root: str, health: str, deadline_s: float):
    if not wait_ready(proc, root + health, deadline_s):
        tail = proc.log_tail()
        proc.stop()
        return None, f"did not become ready within {deadline_s:.0f} s; log tail:\n{tail}"
    target = Target(name, root + "/v1", proc)
    problem, target.stream_done = smoke_test(target.base)
    if problem and problem.startswith("stream"):
        target.stream_ok = False
        target.notes.append(f"{name}: {problem}; left out of the stream scenario")
    elif problem:
        proc.stop()
        return None, problem
    elif not target.stream_done:
        target.notes.append(
            f"{name}: its stream does not end with `data: [DONE]` (OpenAI's streams do); "
            "a stream counts as a success when its body completes with HTTP 200"
        )
    return target, None


# ---------------------------------------------------------------------------------------------
# Load


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


PCTS = (50, 90, 99, 99.9)


class Measurement:
    """Merged samples of one target in one scenario (all interleaved rounds)."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []  # non-stream latency, or stream TTFB
        self.last_byte_ms: list[float] = []  # stream only
        self.sent = 0
        self.ok = 0
        self.seconds = 0.0

    def add(self, latencies, sent, ok, seconds, last_byte=()):
        self.latencies_ms.extend(latencies)
        self.last_byte_ms.extend(last_byte)
        self.sent += sent
        self.ok += ok
        self.seconds += seconds

    def pct(self, which: str = "first") -> dict[float, float]:
        values = sorted(self.latencies_ms if which == "first" else self.last_byte_ms)
        return {p: percentile(values, p) for p in PCTS}

    @property
    def success(self) -> float:
        return self.ok / self.sent if self.sent else 0.0

    @property
    def achieved(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


class Loader:
    def __init__(self, oha: str, sse_load: str, concurrency: int):
        self.oha = oha
        self.sse_load = sse_load
        self.concurrency = concurrency
        self.runs = 0

    def oha_json(self, args: list[str], url: str, body: str, db: Path | None):
        cmd = [self.oha, "--no-tui", "--output-format", "json",
               "--wait-ongoing-requests-after-deadline", "-m", "POST",
               "-H", "content-type: application/json", "-d", body, *args]
        if db is not None:
            cmd += ["--db-url", str(db)]
        out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=600,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"oha failed: {out.stderr[-500:]}")
        return json.loads(out.stdout)

    def fixed_rate(self, url: str, rate: float, seconds: float) -> tuple[list[float], int, int, float]:
        """oha at a fixed rate with latency correction; returns (latencies ms of 2xx, sent, ok, s)."""
        self.runs += 1
        db = WORK / f"oha-{self.runs}.db"
        db.unlink(missing_ok=True)
        report = self.oha_json(
            ["-q", str(rate), "--latency-correction", "-z", f"{seconds}s",
             "-c", str(self.concurrency)],
            url, BODY, db,
        )
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT duration, status FROM oha").fetchall()
        db.unlink(missing_ok=True)
        latencies = [d * 1000 for d, status in rows if 200 <= status < 300]
        errors = sum((report.get("errorDistribution") or {}).values())
        return latencies, len(rows) + errors, len(latencies), seconds

    def stream(self, url: str, rate: float, seconds: float, expect_done: bool = True):
        out = subprocess.run(
            [self.sse_load, "--url", url, "--rate", str(rate), "--duration", str(seconds),
             "--body", STREAM_BODY, *(["--expect-done"] if expect_done else [])],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sse-load failed: {out.stderr[-500:]}")
        r = json.loads(out.stdout)
        ttfb = [us / 1000 for us in r["ttfb_us"]]
        ttlb = [us / 1000 for us in r["ttlb_us"]]
        return ttfb, r["sent"], r["ok"], r["elapsed_s"], ttlb

    def max_throughput(self, url: str, seconds: float) -> dict:
        report = self.oha_json(["-c", str(self.concurrency), "-z", f"{seconds}s"], url, BODY, None)
        summary = report["summary"]
        codes = report.get("statusCodeDistribution") or {}
        ok = sum(n for code, n in codes.items() if str(code).startswith("2"))
        total = sum(codes.values()) + sum((report.get("errorDistribution") or {}).values())
        pct = report.get("latencyPercentiles") or {}
        return {
            "rps": ok / summary["total"] if summary.get("total") else 0.0,
            "success": ok / total if total else 0.0,
            "p50": (pct.get("p50") or math.nan) * 1000,
            "p99": (pct.get("p99") or math.nan) * 1000,
        }


# ---------------------------------------------------------------------------------------------
# Report


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def added(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def latency_table(direct: Measurement, rows: list[tuple[str, Measurement]], which: str) -> list[str]:
    base = direct.pct(which)
    lines = [
        "| target | achieved req/s | success | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| added p50 | added p90 | added p99 | added p99.9 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        p = m.pct(which)
        extra = ["—"] * 4 if m is direct else [added(p[q] - base[q]) for q in PCTS]
        lines.append(
            f"| {name} | {m.achieved:.0f} | {m.success * 100:.2f}% | "
            + " | ".join(ms(p[q]) for q in PCTS)
            + " | "
            + " | ".join(extra)
            + " |"
        )
    return lines


def machine_info() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return [f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB RAM, Linux {platform.release()}, "
            f"{rustc or 'rustc ?'}; load generator, mock, gateways all on this machine"]


# ---------------------------------------------------------------------------------------------
# Main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, required=True,
                        help="directory holding the release `switchyard`, `mock-upstream`, `sse-load`")
    parser.add_argument("--oha", default=shutil.which("oha") or "oha")
    parser.add_argument("--seconds", type=float, default=4, help="length of one measured round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per scenario")
    parser.add_argument("--rates", default="25,1000", help="non-stream fixed rates (req/s)")
    parser.add_argument("--stream-rates", default="25,500", help="stream fixed rates (req/s)")
    parser.add_argument("--peer-max-rate", type=float, default=25,
                        help="peers join fixed-rate scenarios up to this rate (they saturate above)")
    parser.add_argument("--chunks", type=int, default=16, help="content chunks per mock stream")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="oha connections (max-throughput run and fixed-rate pool)")
    parser.add_argument("--peers", default="litellm,mlflow", help="comma list, or '' for none")
    parser.add_argument("--no-install", action="store_true", help="skip peers not yet installed")
    parser.add_argument("--out", type=Path, default=None, help="report path")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                        help="also run a second switchyard with this environment as its own row, "
                             "e.g. 'warn+jemalloc:RUST_LOG=warn,LD_PRELOAD=/usr/lib/x86_64-linux-gnu/"
                             "libjemalloc.so.2' (repeatable; for A/B experiments in the same run)")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for switchyard, e.g. RUST_LOG=warn or "
                             "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (repeatable)")
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    bins = args.bin_dir
    started = time.monotonic()
    procs: list[Proc] = []
    notes: list[str] = []
    try:
        mock_port, gw_port = free_port(), free_port()
        mock = Proc("mock-upstream", [str(bins / "mock-upstream"), "--listen",
                                      f"127.0.0.1:{mock_port}", "--chunks", str(args.chunks)])
        procs.append(mock)
        mock_base = f"http://127.0.0.1:{mock_port}/v1"
        if not wait_ready(mock, f"http://127.0.0.1:{mock_port}/health", 10):
            raise RuntimeError(f"mock did not start:\n{mock.log_tail()}")
        config = WORK / "switchyard.toml"
        config.write_text(switchyard_config(mock_base, f"127.0.0.1:{gw_port}"))
        gateway_env = {"RUST_LOG": os.environ.get("RUST_LOG", "info")}
        gateway_env.update(kv.split("=", 1) for kv in args.gateway_env)
        gateway = Proc("switchyard", [str(bins / "switchyard"), "serve", "--config", str(config)],
                       clean_env(gateway_env))
        procs.append(gateway)
        if not wait_ready(gateway, f"http://127.0.0.1:{gw_port}/ready", 20):
            raise RuntimeError(f"switchyard did not start:\n{gateway.log_tail()}")
        direct = Target("direct (mock)", mock_base, None)
        switchyard = Target("switchyard", f"http://127.0.0.1:{gw_port}/v1", gateway)
        for t in (direct, switchyard):
            problem, done = smoke_test(t.base)
            if problem or not done:
                problem = problem or "stream did not end with data: [DONE]"
                raise RuntimeError(f"{t.name}: {problem}")

        peers: list[Target] = []
        starters = {"litellm": start_litellm, "mlflow": start_mlflow}
        for name in [p for p in args.peers.split(",") if p]:
            log(f"starting peer {name} ...")
            target, reason = starters[name](mock_base, not args.no_install)
            if target is None:
                note = f"peer {name} skipped: {reason}"
                log(note)
                notes.append(note)
            else:
                procs.append(target.proc)
                peers.append(target)
                notes.extend(target.notes)
                log(f"{target.name} ready")

        variants: list[Target] = []
        for spec in args.variant:
            label, _, assignments = spec.partition(":")
            port = free_port()
            env = dict(gateway_env)
            env.update(kv.split("=", 1) for kv in assignments.split(",") if kv)
            vconfig = WORK / f"switchyard-{len(variants)}.toml"
            vconfig.write_text(switchyard_config(mock_base, f"127.0.0.1:{port}"))
            proc = Proc(f"switchyard-{len(variants)}",
                        [str(bins / "switchyard"), "serve", "--config", str(vconfig)], clean_env(env))
            procs.append(proc)
            if not wait_ready(proc, f"http://127.0.0.1:{port}/ready", 20):
                raise RuntimeError(f"switchyard variant {label} did not start:\n{proc.log_tail()}")
            variants.append(Target(f"switchyard ({label})", f"http://127.0.0.1:{port}/v1", proc))
        # Variants run wherever switchyard runs; peers only up to --peer-max-rate.
        ours = [switchyard, *variants]
        gateways = [*ours, *peers]
        time.sleep(1)
        for t in gateways:
            t.idle_rss_mb, t.processes = memory_mb(t.proc.pid, "VmRSS")

        loader = Loader(args.oha, str(bins / "sse-load"), args.concurrency)
        sections: list[str] = []
        checks: dict[str, float] = {}

        # Non-stream pass-through at fixed rates.
        for rate in [float(r) for r in args.rates.split(",") if r]:
            targets = [direct] + [t for t in gateways if t in ours or rate <= args.peer_max_rate]
            results = {t.name: Measurement() for t in targets}
            for t in targets:  # warm-up, unmeasured
                loader.fixed_rate(t.url, rate, 1)
            for r in range(args.rounds):
                for t in targets:
                    log(f"non-stream {rate:.0f} req/s round {r + 1}/{args.rounds}: {t.name}")
                    results[t.name].add(*loader.fixed_rate(t.url, rate, args.seconds))
            rows = [(t.name, results[t.name]) for t in targets]
            sections += [f"### Pass-through, non-stream, fixed rate {rate:.0f} req/s "
                         f"({args.rounds} × {args.seconds:g} s per target, interleaved; oha, latency-corrected)",
                         "", *latency_table(results[direct.name], rows, "first"), ""]
            d, s = results[direct.name].pct(), results[switchyard.name].pct()
            checks[f"nonstream_{rate:.0f}_p50"] = s[50] - d[50]
            checks[f"nonstream_{rate:.0f}_p99"] = s[99] - d[99]

        # Streams at fixed rates: time to first byte and to last byte.
        for rate in [float(r) for r in args.stream_rates.split(",") if r]:
            targets = [direct] + [t for t in gateways if t.stream_ok and
                                  (t in ours or rate <= args.peer_max_rate)]
            results = {t.name: Measurement() for t in targets}
            for t in targets:
                loader.stream(t.url, rate, 1, t.stream_done)
            for r in range(args.rounds):
                for t in targets:
                    log(f"stream {rate:.0f} req/s round {r + 1}/{args.rounds}: {t.name}")
                    results[t.name].add(*loader.stream(t.url, rate, args.seconds, t.stream_done))
            rows = [(t.name, results[t.name]) for t in targets]
            title = (f"{args.chunks} content chunks + role/finish/usage frames, fixed rate {rate:.0f} req/s "
                     f"({args.rounds} × {args.seconds:g} s per target, interleaved; sse-load, latency-corrected)")
            sections += [f"### Stream, time to first byte — {title}", "",
                         *latency_table(results[direct.name], rows, "first"), "",
                         f"### Stream, time to last byte — same runs", "",
                         *latency_table(results[direct.name], rows, "last"), ""]
            d, s = results[direct.name].pct(), results[switchyard.name].pct()
            checks["stream_ttfb_p50"] = s[50] - d[50]
            checks["stream_rate"] = rate

        # Max throughput at fixed concurrency, interleaved rounds, mean of rounds.
        targets = [direct, *gateways]
        rounds: dict[str, list[dict]] = {t.name: [] for t in targets}
        for r in range(args.rounds):
            for t in targets:
                log(f"max throughput round {r + 1}/{args.rounds}: {t.name}")
                rounds[t.name].append(loader.max_throughput(t.url, args.seconds))
        mean = {n: {k: sum(x[k] for x in v) / len(v) for k in v[0]} for n, v in rounds.items()}
        direct_rps = mean[direct.name]["rps"]
        lines = ["| target | req/s | success | % of direct | p50 ms | p99 ms |",
                 "|---|---:|---:|---:|---:|---:|"]
        for t in targets:
            m = mean[t.name]
            lines.append(f"| {t.name} | {m['rps']:.0f} | {m['success'] * 100:.2f}% | "
                         f"{m['rps'] / direct_rps * 100:.1f}% | {ms(m['p50'])} | {ms(m['p99'])} |")
        sections += [f"### Max throughput, non-stream, {args.concurrency} connections "
                     f"(oha, {args.rounds} × {args.seconds:g} s per target, interleaved, mean of rounds)",
                     "", *lines, ""]
        checks["throughput_ratio"] = mean[switchyard.name]["rps"] / direct_rps
        litellm = next((t for t in peers if t.name.startswith("LiteLLM")), None)
        if litellm:
            checks["vs_litellm"] = mean[switchyard.name]["rps"] / mean[litellm.name]["rps"]

        # Memory, read last: VmHWM is the peak over the process's life, load included.
        lines = ["| gateway | processes | RSS idle MB | peak RSS (VmHWM) MB |", "|---|---:|---:|---:|"]
        for t in gateways:
            peak, n = memory_mb(t.proc.pid, "VmHWM")
            lines.append(f"| {t.name} | {n} | {t.idle_rss_mb:.1f} | {peak:.1f} |")
            if t is switchyard:
                checks["rss_mb"] = peak
        sections += ["### Memory (sum over the gateway's processes)", "", *lines, ""]

        # Targets of issue 7.
        def verdict(ok: bool) -> str:
            return "met" if ok else "**missed**"

        goals = []
        if "nonstream_1000_p50" in checks:
            goals.append(("pass-through added p50 at 1000 req/s", "≤ 0.150 ms",
                          f"{checks['nonstream_1000_p50']:.3f} ms", checks["nonstream_1000_p50"] <= 0.15))
            goals.append(("pass-through added p99 at 1000 req/s", "≤ 0.500 ms",
                          f"{checks['nonstream_1000_p99']:.3f} ms", checks["nonstream_1000_p99"] <= 0.5))
        goals.append(("max throughput, share of direct", "≥ 40%",
                      f"{checks['throughput_ratio'] * 100:.1f}%", checks["throughput_ratio"] >= 0.4))
        if "vs_litellm" in checks:
            goals.append(("max throughput vs LiteLLM", "≥ 20×", f"{checks['vs_litellm']:.1f}×",
                          checks["vs_litellm"] >= 20))
        goals.append(("peak RSS under load", "≤ 64 MB", f"{checks['rss_mb']:.1f} MB",
                      checks["rss_mb"] <= 64))
        if "stream_ttfb_p50" in checks:
            goals.append((f"stream added TTFB p50 (at {checks['stream_rate']:.0f} req/s)", "≤ 0.300 ms",
                          f"{checks['stream_ttfb_p50']:.3f} ms", checks["stream_ttfb_p50"] <= 0.3))
        goal_lines = ["| target (issue 7) | goal | measured | |", "|---|---|---|---|"]
        goal_lines += [f"| {a} | {b} | {c} | {verdict(ok)} |" for a, b, c, ok in goals]

        now = dt.datetime.now()
        report = [
            f"## Switchyard benchmark — {now:%Y-%m-%d %H:%M}",
            "",
            f"Machine: {machine_info()[0]}.",
            f"Switchyard: release build, RUST_LOG={gateway_env['RUST_LOG']} (info = one log line "
            f"per request, written to a file)"
            + (f", extra environment {' '.join(args.gateway_env)}" if args.gateway_env else "")
            + ". "
            f"Targets: {', '.join(t.name for t in [direct, *gateways])}. "
            f"Latencies in ms; *added* = target percentile − direct percentile. "
            f"Whole run: {(time.monotonic() - started) / 60:.1f} min.",
            "",
            *goal_lines,
            "",
            *sections,
            "### Not measured yet",
            "",
            *[f"- {what}: {why}." for what, why in FUTURE_SCENARIOS],
            *[f"- {note}" for note in notes],
            "",
        ]
        text = "\n".join(report)
        print(text)
        out = args.out or RESULTS / f"{now:%Y-%m-%d}.md"
        out.write_text(text)
        log(f"report written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
        return 0
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
