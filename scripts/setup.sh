#!/usr/bin/env bash
# Shared, idempotent setup for start_model_service.sh and scripts/test.sh. Source it, then call
# `setup_all` (or the steps). Each step skips what is already done:
#   setup_apt    redis-server, promtool, shellcheck, docker-compose (Debian packages), when missing
#   setup_venv   a virtualenv with requirements.txt under ~/.cache/model-service, reused while the
#                pinned requirements are unchanged (so PyTorch is downloaded once per machine)
#   setup_tansu  the tansu broker (Kafka-compatible, for the ingestion tests; only scripts/test.sh
#                calls it, not setup_all, so starting the service never waits for it), built once with
#                `cargo install` into the cache and reused while its version is unchanged
#   setup_compiled  DIN and RankNet of model_output/ as AOTInductor packages for this CPU, cached
#   setup_build  the release binary, linked against that venv's libtorch (rpath embedded)
# After setup_all: $VENV, $PY (its python) and $BIN (the binary) are set, and PYTHONPATH holds scripts/,
# so the Python side, the package scripts/model_service_py, runs as `"$PY" -m model_service_py.<module>`.
# setup_tansu sets $TANSU_BIN.

MS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MS_CACHE="${MODEL_SERVICE_CACHE:-$HOME/.cache/model-service}"

ms_log() { printf '[setup] %s\n' "$*" >&2; }

ms_sudo() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        ms_log "need root for: $*  (run as root or install sudo)"; return 1
    fi
}

setup_apt() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v shellcheck >/dev/null || missing+=(shellcheck)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v python3 >/dev/null || missing+=(python3 python3-venv)
    # rdkafka builds the librdkafka it bundles: a C toolchain, make, OpenSSL (TLS) and zlib headers
    command -v make >/dev/null || missing+=(make)
    command -v cc >/dev/null || missing+=(gcc g++)
    [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
    [ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    if [ ${#missing[@]} -eq 0 ]; then return 0; fi
    ms_log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    ms_sudo apt-get update -qq
    ms_sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # the prometheus package starts a server we do not need
    if command -v systemctl >/dev/null 2>&1; then ms_sudo systemctl stop prometheus >/dev/null 2>&1 || true; fi
}

setup_venv() {
    local req_hash
    req_hash="$(sha256sum "$MS_ROOT/requirements.txt" | cut -c1-12)"
    VENV="${MODEL_SERVICE_VENV:-$MS_CACHE/venv-$req_hash}"
    PY="$VENV/bin/python"
    # The package is found through PYTHONPATH (this checkout's scripts/), not installed into the
    # venv: the venv is shared by every checkout with the same requirements.txt.
    case ":${PYTHONPATH:-}:" in
        *":$MS_ROOT/scripts:"*) ;;
        *) PYTHONPATH="$MS_ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac
    export PYTHONPATH
    if [ -f "$VENV/.complete" ]; then
        return 0
    fi
    ms_log "creating $VENV (PyTorch 2.11.0 from PyPI: a few GB, once per machine)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r "$MS_ROOT/requirements.txt"
    "$PY" -c "import torch; assert torch.__version__.split('+')[0] == '2.11.0', torch.__version__"
    touch "$VENV/.complete"
}

TANSU_VERSION=0.6.0

setup_tansu() {
    export TANSU_BIN="$MS_CACHE/tansu-$TANSU_VERSION/bin/tansu"
    if [ -x "$TANSU_BIN" ]; then
        return 0
    fi
    command -v cargo >/dev/null || { ms_log "cargo is missing: install Rust from https://rustup.rs"; return 1; }
    # dynostore: the memory:// engine; libsql: sqlite://, which keeps topics and offsets across a
    # broker restart (the outage test restarts it). About 12 minutes on 2 cores, once per machine.
    ms_log "installing the tansu broker $TANSU_VERSION (Kafka-compatible, for the ingestion tests; once per machine)"
    # The build directory lives in the cache, so an interrupted install resumes where it stopped;
    # it is removed once the binary is in place (about 1 GB).
    CARGO_TARGET_DIR="$MS_CACHE/tansu-$TANSU_VERSION-build" \
        cargo install tansu --version "$TANSU_VERSION" --locked --quiet --features dynostore,libsql \
        --root "$MS_CACHE/tansu-$TANSU_VERSION" || return 1
    rm -rf "$MS_CACHE/tansu-$TANSU_VERSION-build"
}

setup_build() {
    command -v cargo >/dev/null || { ms_log "cargo is missing: install Rust from https://rustup.rs"; return 1; }
    ms_log "cargo build --release (incremental)"
    (cd "$MS_ROOT" && LIBTORCH_USE_PYTORCH=1 PATH="$VENV/bin:$PATH" cargo build --release --quiet)
    BIN="$MS_ROOT/target/release/model-service"
}

# DIN and RankNet of model_output/ compiled for this machine (AOTInductor packages beside model.pt,
# STAGE_RUNTIME): about a minute once per machine, then copied from the cache. The thread count is
# the workers' (TORCH_THREADS, else the cores divided among INFERENCE_WORKERS, as the server does).
# A failure leaves TorchScript serving (STAGE_RUNTIME=auto).
setup_compiled() {
    local threads="${TORCH_THREADS:-0}"
    if [ "$threads" -le 0 ]; then
        threads=$(( $(nproc) / ${INFERENCE_WORKERS:-2} ))
        [ "$threads" -ge 1 ] || threads=1
    fi
    (cd "$MS_ROOT" && PYTHONPATH="$MS_ROOT/scripts" "$PY" -m model_service_py.compile_stages \
        --model-dir model_output --threads "$threads" --cache "$MS_CACHE/compiled" 2>"$MS_CACHE/compile_stages.log") \
        || ms_log "compiling the stages failed (TorchScript serves them): $MS_CACHE/compile_stages.log"
}

setup_all() {
    setup_apt && setup_venv && setup_compiled && setup_build
    export VENV PY BIN
    export LIBTORCH_USE_PYTORCH=1 MODEL_SERVICE_PYTHON="$PY"
    export PATH="$VENV/bin:$PATH"
}
