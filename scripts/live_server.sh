#!/usr/bin/env bash
# Shared by the scripts that test a live server (contract_test.sh, docs_browser_test.sh). Source
# it, then call `start_live_server NAME LOG_LEVEL [KEY VALUE]...`: a redis-server and "$BIN serve"
# (the shipped models, API_TOKEN set) on free loopback ports, each KEY stored with its VALUE first,
# and a trap that stops both and removes the scratch folder on exit. It sets $work (that folder),
# $redis_port, $base (the server's URL) and $token; it returns once /health answers 200.

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

stop_live_server() {
    if [ -n "${server_pid:-}" ]; then kill "$server_pid" 2>/dev/null || true; fi
    if [ -n "${redis_pid:-}" ]; then kill "$redis_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$work"
}

start_live_server() {
    local name="$1" log_level="$2"
    shift 2
    redis_port=$(free_port)
    local http_port
    http_port=$(free_port)
    work=$(mktemp -d)
    trap stop_live_server EXIT
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    while [ $# -ge 2 ]; do
        redis-cli -p "$redis_port" set "$1" "$2" >/dev/null
        shift 2
    done
    token="$name-$RANDOM$RANDOM"
    REDIS_HOST=127.0.0.1 REDIS_PORT="$redis_port" HOST=127.0.0.1 PORT="$http_port" DEVICE=cpu API_TOKEN="$token" \
        MODEL_DIR=model_output RUST_LOG="model_service=$log_level" "$BIN" serve >"$work/server.log" 2>&1 &
    server_pid=$!
    base="http://127.0.0.1:$http_port"
    for _ in $(seq 600); do
        curl -fs "$base/health" >/dev/null 2>&1 && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
        sleep 0.1
    done
    curl -fs "$base/health" >/dev/null
}
