#!/usr/bin/env bash
# Set up (like start_model_service.sh), then run every test: formatting, clippy, the Rust unit and
# integration tests (real redis-server, real TorchScript models), the HTTP contract, /docs in a
# browser, the deployment files, the Python tests, and last the container image
# (scripts/container_test.sh: built, the walk-through run in it, compose; its time printed; the
# first build on a machine takes 20-40 minutes, later ones reuse its layers and caches).
# CONTAINER_TEST=0 leaves the container test out (a quick local run).
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
if [ "${CONTAINER_TEST:-1}" != 0 ]; then
    echo "== container image: build, walk-through in the container, compose (scripts/container_test.sh)"
    container_t0=$SECONDS
    scripts/container_test.sh
    echo "== container test: $((SECONDS - container_t0)) s"
else
    echo "== container image: skipped (CONTAINER_TEST=0)"
fi
