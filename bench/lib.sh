# Shared by the bench shell scripts (source it, it is not a command): a pass-through gateway
# config on the mock upstream, the chat bodies they send (plain and streamed), and a wait for a
# gateway to answer /ready.

# A backtrace variable makes every anyhow::Error capture a backtrace (bench/run.py strips them too).
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

# shellcheck disable=SC2034 # used by the scripts that source this file
CHAT_BODY='{"model":"chat","messages":[{"role":"user","content":"Hello! Please answer in a few words."}]}'
# The same request, streamed (for the scripts' STREAM=1).
STREAM_CHAT_BODY="${CHAT_BODY%\}},\"stream\":true}"

# passthrough_config FILE GATEWAY_PORT MOCK_PORT: endpoint "chat" → route "main" → the mock.
passthrough_config() {
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:$2"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$3/v1"
[routes.main]
targets = [{ provider = "mock", model = "mock-model" }]
timeout_ms = 30000
[[endpoints]]
name = "chat"
route = "main"
TOML
}

# wait_ready PORT [TRIES]: up to TRIES × 0.1 s (default 5 s) for the gateway on PORT to answer /ready.
wait_ready() {
  for _ in $(seq "${2:-50}"); do
    curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return 0
    sleep 0.1
  done
  echo "the gateway on port $1 did not become ready" >&2
  return 1
}
