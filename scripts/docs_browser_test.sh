#!/usr/bin/env bash
# /docs in a real browser: Debian's chromium, headless, against the release binary (shipped models)
# and its own redis-server on free loopback ports, with API_TOKEN set.
#   1. `chromium --headless --dump-dom /docs`: the rendered DOM names every path and operationId
#      of /openapi.json;
#   2. tests/browser/docs_check.py drives the page over the DevTools protocol: every operation
#      rendered, "Try it out" -> "Execute" answers 200 (GET /health, then GET
#      /recommendations/{user_id} after "Authorize" with the token), and every request the page
#      made went to the server (Chromium has a dead proxy for anything but loopback).
# Installs chromium with apt-get when it is missing.
# Usage: scripts/docs_browser_test.sh   (after `source scripts/setup.sh && setup_all`)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
BIN="${BIN:-target/release/model-service}"
PY="${PY:-python3}"
if ! command -v chromium >/dev/null; then
    ms_log "installing Debian's chromium (for the /docs browser test)"
    export DEBIAN_FRONTEND=noninteractive
    ms_sudo apt-get update -qq
    ms_sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
http_port=$(free_port)
work=$(mktemp -d)
cleanup() {
    if [ -n "${server_pid:-}" ]; then kill "$server_pid" 2>/dev/null || true; fi
    if [ -n "${redis_pid:-}" ]; then kill "$redis_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" set user_profile:A3RTKL9KB8KLID '["0553092626","0393316041"]' >/dev/null
token="docs-$RANDOM$RANDOM"
REDIS_HOST=127.0.0.1 REDIS_PORT="$redis_port" HOST=127.0.0.1 PORT="$http_port" DEVICE=cpu API_TOKEN="$token" \
    MODEL_DIR=model_output RUST_LOG=model_service=warn "$BIN" serve >"$work/server.log" 2>&1 &
server_pid=$!
base="http://127.0.0.1:$http_port"
for _ in $(seq 600); do
    curl -fs "$base/health" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
    sleep 0.1
done
curl -fs "$base/health" >/dev/null

echo "== chromium --headless --dump-dom $base/docs"
chromium --headless --no-sandbox --disable-gpu --virtual-time-budget=10000 --proxy-server=127.0.0.1:9 \
    --user-data-dir="$work/profile" --dump-dom "$base/docs" >"$work/dom.html" 2>"$work/chromium.log" || {
    tail -20 "$work/chromium.log"
    exit 1
}
curl -fs "$base/openapi.json" >"$work/openapi.json"
"$PY" - "$work/openapi.json" "$work/dom.html" <<'PYEOF'
import html, json, sys
spec = json.load(open(sys.argv[1]))
dom = html.unescape(open(sys.argv[2]).read())
ops = [(m.upper(), p, o.get("operationId", "")) for p, item in spec["paths"].items() for m, o in item.items()]
missing = [op for op in ops if f'data-path="{op[1]}"' not in dom or op[2] not in dom]
print(f"dumped DOM: {len(dom)} characters, {dom.count('opblock-summary-path')} operation summaries; "
      f"{len(ops) - len(missing)} of {len(ops)} operations of /openapi.json named")
if missing:
    sys.exit(f"not in the rendered DOM: {missing}")
PYEOF

echo "== DevTools protocol: operations, Try it out, requests"
"$PY" tests/browser/docs_check.py "$base" "$token" A3RTKL9KB8KLID
