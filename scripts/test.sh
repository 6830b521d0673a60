#!/usr/bin/env bash
# Set up (like start_model_service.sh), then run every test: formatting, clippy, the Rust unit and
# integration tests (real redis-server, real TorchScript models), the Python tests, and, with
# CONTAINER_TEST=1, the container image (scripts/container_test.sh: built, and the walk-through run
# in it; its time printed). The image's cold build (20-40 minutes on 2 cores) is not yet in CI: a
# fresh CI run with it has not been measured inside the 90-minute limit (docs/container.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_all
setup_tansu

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --release --no-fail-fast -- --test-threads 2
echo "== HTTP contract (openapi-spec-validator, schemathesis)"
scripts/contract_test.sh
echo "== /docs in headless Chromium"
scripts/docs_browser_test.sh
echo "== deployment files"
scripts/check_deploy.sh
echo "== python tests"
(cd tests/python && "$PY" -m pytest -q)
if [ "${CONTAINER_TEST:-0}" = 1 ]; then
    echo "== container image: build, walk-through in the container, compose (scripts/container_test.sh)"
    container_t0=$SECONDS
    scripts/container_test.sh
    echo "== container test: $((SECONDS - container_t0)) s"
else
    echo "== container image: skipped (CONTAINER_TEST=1 scripts/test.sh, or scripts/container_test.sh, runs it)"
fi
