#!/usr/bin/env bash
# Contract tests of the HTTP API by tools nobody here wrote, against a live server: the release
# binary with the shipped models (model_output/) and its own redis-server on free loopback ports.
#   1. openapi-spec-validator: GET /openapi.json is a valid OpenAPI 3.1 document;
#   2. schemathesis: every route (with the bearer token, so the admin reload runs too), generated
#      inputs; no 5xx, only documented status codes, bodies, content types and headers.
# Usage: scripts/contract_test.sh [--max-examples N]   (after `source scripts/setup.sh && setup_all`)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PY:?run from scripts/test.sh or after: source scripts/setup.sh && setup_all}"
: "${BIN:?}"
max_examples=40
if [ "${1:-}" = "--max-examples" ]; then max_examples="$2"; fi

if ! "$PY" -c "import schemathesis, openapi_spec_validator" 2>/dev/null; then
    echo "[contract] installing tests/contract/requirements.txt into $VENV"
    "$PY" -m pip install -q -r tests/contract/requirements.txt
fi
# a few stored profiles: a real history, an empty one, unknown items
# shellcheck source=scripts/live_server.sh
source scripts/live_server.sh
start_live_server contract error \
    user_profile:A3RTKL9KB8KLID '["0553092626","0393316041"]' \
    user_profile:empty '[]' \
    user_profile:unknown '["nope","0553092626"]'

echo "== openapi-spec-validator"
curl -fs "$base/openapi.json" >"$work/openapi.json"
"$VENV/bin/openapi-spec-validator" "$work/openapi.json"

echo "== schemathesis ($max_examples examples per operation)"
# from the scratch directory: schemathesis keeps its cache in the working directory
(cd "$work" && "$VENV/bin/schemathesis" run "$base/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --header "Authorization: Bearer $token" \
    --max-examples "$max_examples" --workers 1 --seed 1 --suppress-health-check too_slow \
    --report junit --report-dir "$work/report") || {
    echo "[contract] schemathesis found failures (server log below)"
    tail -50 "$work/server.log"
    exit 1
}
