#!/usr/bin/env bash
# Fuzz the profile parser and the request path with cargo-fuzz (libFuzzer), e.g. for 10 minutes:
#
#   scripts/fuzz.sh request 600      # POST /recommend end to end: real router, redis-server, models
#   scripts/fuzz.sh profile 600      # the profile parser and history mapping alone
#
# Needs the nightly toolchain (cargo-fuzz's instrumentation flags); installs cargo-fuzz when
# missing and sets up the venv's libtorch (setup.sh). Crashes land in fuzz/artifacts/<target>/;
# the corpus grows in fuzz/corpus/<target>/. Exit status 0 when the run found nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${1:?usage: scripts/fuzz.sh profile|request [SECONDS]}"
SECONDS_TO_RUN="${2:-600}"
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_apt
setup_venv
export LIBTORCH_USE_PYTORCH=1 PATH="$VENV/bin:$PATH"
if ! cargo +nightly --version >/dev/null 2>&1; then
    ms_log "installing the nightly toolchain (rustup)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    ms_log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# libtorch is not built with AddressSanitizer; the Rust side is checked by its own assertions,
# bounds checks and libFuzzer's crash/timeout/oom detection.
cd fuzz
exec cargo +nightly fuzz run --sanitizer none --release "$TARGET" -- \
    -max_total_time="$SECONDS_TO_RUN" -timeout=10 -rss_limit_mb=8192 -print_final_stats=1
