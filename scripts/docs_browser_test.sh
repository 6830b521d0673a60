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
# shellcheck source=scripts/live_server.sh
source scripts/live_server.sh
start_live_server docs warn user_profile:A3RTKL9KB8KLID '["0553092626","0393316041"]'

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
