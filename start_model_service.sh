#!/usr/bin/env bash
# Start model-service.
#
#   ./start_model_service.sh [--local]     native mode (default): installs what is missing
#                                          (redis-server, the PyTorch venv, the release build),
#                                          starts a local redis-server if none answers at
#                                          REDIS_HOST:REDIS_PORT, and serves on HOST:PORT (0.0.0.0:8001)
#   ./start_model_service.sh --docker-network NAME
#                                          build and run the image with model-compose.yml, joined to
#                                          the existing Docker network NAME of your Redis (REDIS_HOST
#                                          defaults to the container name `redis`)
#   ./start_model_service.sh --host-network
#                                          build and run the image with model-compose-standalone.yml
#                                          on the host network, pointed at REDIS_HOST:REDIS_PORT
#   ./start_model_service.sh --help
#
# Settings come from the environment (REDIS_HOST, REDIS_PORT, REDIS_DB, REDIS_PASSWORD, REDIS_URL,
# MODEL_DIR, DEVICE, HOST, PORT, RECOMMENDATION_TTL, ...; see `model-service --help`).
# Non-interactive: every choice is a flag.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

mode=local
network=""
while [ $# -gt 0 ]; do
    case "$1" in
        --local) mode=local ;;
        --docker-network) mode=docker-network; network="${2:?--docker-network needs a network name}"; shift ;;
        --host-network) mode=host-network ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

export REDIS_HOST="${REDIS_HOST:-localhost}" REDIS_PORT="${REDIS_PORT:-6379}" REDIS_DB="${REDIS_DB:-0}"

compose() {
    if docker compose version >/dev/null 2>&1; then echo "docker compose"; else echo "docker-compose"; fi
}

docker_run() {
    echo "+ $*"
    if ! command -v docker >/dev/null 2>&1; then
        echo "Docker is not installed: this mode needs the docker CLI and a running Docker engine." >&2
        echo "Use ./start_model_service.sh --local to run natively." >&2
        exit 1
    fi
    if ! docker info >/dev/null 2>&1; then
        echo "No Docker engine answers (docker info failed): start the Docker daemon, or use --local." >&2
        exit 1
    fi
    "$@"
}

case "$mode" in
    docker-network)
        # shellcheck disable=SC2046
        REDIS_NETWORK="$network" REDIS_HOST="${REDIS_HOST/localhost/redis}" \
            docker_run $(compose) -f model-compose.yml up -d --build
        exit 0 ;;
    host-network)
        # shellcheck disable=SC2046
        docker_run $(compose) -f model-compose-standalone.yml up -d --build
        exit 0 ;;
esac

# --- native mode ---
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_all

redis_answers() {
    if [ -n "${REDIS_URL:-}" ]; then
        redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1
    else
        REDISCLI_AUTH="${REDIS_PASSWORD:-}" redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping >/dev/null 2>&1
    fi
}

if ! redis_answers; then
    case "${REDIS_URL:-$REDIS_HOST}" in
        *localhost*|*127.0.0.1*|*::1*)
            mkdir -p "$MS_CACHE/redis"
            echo "[start] no Redis answers at $REDIS_HOST:$REDIS_PORT: starting a local redis-server" >&2
            redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
                --dir "$MS_CACHE/redis" --logfile "$MS_CACHE/redis/redis.log"
            for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
            redis_answers || { echo "redis-server did not start; see $MS_CACHE/redis/redis.log" >&2; exit 1; } ;;
        *)
            echo "[start] Redis at $REDIS_HOST:$REDIS_PORT does not answer (not local, so not started here)." >&2
            echo "[start] serving anyway: /health reports 503 until Redis answers." >&2 ;;
    esac
fi

echo "[start] model-service on ${HOST:-0.0.0.0}:${PORT:-8001}, models from ${MODEL_DIR:-./model_output}" >&2
exec "$BIN" serve
