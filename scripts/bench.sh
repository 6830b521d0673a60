#!/usr/bin/env bash
# The benchmark (bench/bench.py): model-service against the Python peer and this machine's roofline,
# on the shipped Amazon-Book models and on synthetic 1M-item models.
#
#   scripts/bench.sh DATA_DIR [bench.py options, e.g. --seconds 15 --concurrency 1,8,32,128]
#
# Installs what it needs: wrk and perf (Debian), the peer's packages (bench/requirements.txt, into the project
# venv), the release binary; generates the 1M-item models once under the cache
# (MODEL_SERVICE_CACHE, default ~/.cache/model-service). SYNTHETIC_ITEMS=0 skips that scale.
# BASELINE_REV=<commit> also measures that commit's binary at concurrency 1 and 32 (built once).
# Writes bench/results/latest.json and bench/results/latency_throughput.png.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -f "$1/train.txt" ]; then
    echo "usage: scripts/bench.sh DATA_DIR [bench.py options]   (DATA_DIR holds train.txt)" >&2
    exit 2
fi
DATA="$1"
shift
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_all
if ! command -v wrk >/dev/null; then
    ms_log "installing wrk (Debian package)"
    ms_sudo apt-get install -y -qq --no-install-recommends wrk >/dev/null || {
        ms_sudo apt-get update -qq && ms_sudo apt-get install -y -qq --no-install-recommends wrk >/dev/null
    }
fi
if ! command -v perf >/dev/null; then
    # the server's own CPU per recommendation (perf stat -p); without it the harness reads /proc
    ms_log "installing perf (Debian package linux-perf)"
    ms_sudo apt-get install -y -qq --no-install-recommends linux-perf >/dev/null 2>&1 \
        || ms_log "linux-perf is not installable here; the server's CPU comes from /proc"
fi
BENCH_MARK="$VENV/.bench-$(sha256sum bench/requirements.txt | cut -c1-12)"
if [ ! -f "$BENCH_MARK" ]; then
    ms_log "installing the benchmark's Python packages into $VENV"
    "$PY" -m pip install -q -r bench/requirements.txt
    touch "$BENCH_MARK"
fi
ITEMS="${SYNTHETIC_ITEMS:-1000000}"
SYNTHETIC=()
if [ "$ITEMS" != 0 ]; then
    SYN_DIR="$MS_CACHE/bench/synthetic-$ITEMS"
    "$PY" bench/make_synthetic.py --data "$DATA" --out "$SYN_DIR" --items "$ITEMS"
    SYNTHETIC=(--synthetic-dir "$SYN_DIR")
fi
BASELINE=()
if [ -n "${BASELINE_REV:-}" ]; then
    # the release binary of an earlier commit, measured beside today's (bench.py --baseline-bin): built
    # once per commit from a worktree with a target directory of its own (two checkouts sharing one
    # overwrite each other's build-script output)
    rev=$(git rev-parse --short "$BASELINE_REV")
    BASE_BIN="$MS_CACHE/bench/baseline-$rev"
    if [ ! -x "$BASE_BIN" ]; then
        ms_log "building the baseline binary of $rev (once)"
        tree="$MS_CACHE/bench/worktree-$rev"
        [ -d "$tree" ] || git worktree add --detach "$tree" "$rev" >/dev/null
        (cd "$tree" && CARGO_TARGET_DIR="$MS_CACHE/bench/baseline-target" cargo build --release --quiet)
        cp "$MS_CACHE/bench/baseline-target/release/model-service" "$BASE_BIN"
        git worktree remove --force "$tree"
    fi
    BASELINE=(--baseline-bin "$BASE_BIN")
fi
exec "$PY" bench/bench.py --data "$DATA" --bin "$BIN" "${SYNTHETIC[@]}" "${BASELINE[@]}" "$@"
