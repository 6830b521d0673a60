#!/usr/bin/env bash
# The soak test (python -m model_service_py.soak): 10 minutes of mixed load with bad requests, a
# Redis restart in the middle and a model reload, reporting RSS, error counts by kind and lost writes.
#
#   scripts/soak.sh [DATA_DIR] [soak options, e.g. --seconds 600 --clients 8]
#
# DATA_DIR (Amazon-Book, holds train.txt) gives real histories; without it, random ones over the
# catalog. Installs what it needs (setup.sh), builds the release binary, writes
# bench/results/soak.json. Exit status 0 when memory is flat, no write is lost and every error is
# a deliberate one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=()
if [ $# -ge 1 ] && [ -f "$1/train.txt" ]; then
    DATA=(--data "$1")
    shift
fi
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_all
exec "$PY" -m model_service_py.soak --bin "$BIN" "${DATA[@]}" "$@"
