#!/usr/bin/env bash
# Redis cost of one recommendation, measured: commands and bytes per POST /recommend/<id> (INFO
# commandstats and total_net_*_bytes before and after N requests) and memory per user (MEMORY
# USAGE of profile + list + meta), on one node and on a 3-master cluster. Usage:
#   bench/redis_cost.sh MODEL_DIR [N]     (the release binary must be built)
set -euo pipefail
cd "$(dirname "$0")/.."
models="$1"; n="${2:-500}"
bin=target/release/model-service
work="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
profile() { printf '["0553092626","0393316041","T%09d","T%09d","T%09d","T%09d","T%09d","T%09d","T%09d"]' \
    $(( $1 % 290 + 2 )) $(( ($1*7) % 290 + 2 )) $(( ($1*13) % 290 + 2 )) $(( ($1*17) % 290 + 2 )) \
    $(( ($1*19) % 290 + 2 )) $(( ($1*23) % 290 + 2 )) $(( ($1*29) % 290 + 2 )); }
calls() { local total=0; for p in "$@"; do
    total=$(( total + $(redis-cli -p "$p" info commandstats | awk -F'[=,:]' '/^cmdstat_/ {s+=$3} END {print s}') )); done; echo $total; }
bytes() { local total=0; for p in "$@"; do
    total=$(( total + $(redis-cli -p "$p" info stats | awk -F: '/^total_net_(input|output)_bytes/ {s+=$2} END {print s}') )); done; echo $total; }
measure() {  # topology, http port, data ports...
    local kind="$1" http="$2"; shift 2
    for i in $(seq 1 "$n"); do redis-cli -c -p "$1" set "user_profile:cost$i" "$(profile "$i")" >/dev/null; done
    local c0 b0; c0=$(calls "$@"); b0=$(bytes "$@")
    for i in $(seq 1 "$n"); do curl -sf -o /dev/null -X POST "localhost:$http/recommend/cost$i"; done
    local c1 b1; c1=$(calls "$@"); b1=$(bytes "$@")
    local mem=0; for k in user_profile recommendations recommendations_meta; do
        mem=$(( mem + $(redis-cli -c -p "$1" memory usage "$k:cost7" samples 0) )); done
    python3 -c "print('$kind: %.2f commands and %.0f bytes per recommendation; %d bytes of Redis memory for user cost7 (profile + list + meta)' % (($c1-$c0)/$n, ($b1-$b0)/$n, $mem))"
}
# one node
p="$(port)"; redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
sleep 0.5
h="$(port)"; REDIS_PORT="$p" REDIS_HOST=127.0.0.1 MODEL_DIR="$models" DEVICE=cpu PORT="$h" HOST=127.0.0.1 \
    LIGHTGCN_CANDIDATES=200 RUST_LOG=error "$bin" serve & pids+=($!)
until curl -sf "localhost:$h/health" >/dev/null; do sleep 0.2; done
measure single "$h" "$p"
# a 3-master cluster (no replicas: replication traffic is not the service's)
ports=()
for _ in 1 2 3; do q="$(port)"; bus="$(port)"; ports+=("$q")
    redis-server --port "$q" --bind 127.0.0.1 --save "" --appendonly no --cluster-enabled yes --cluster-port "$bus" \
        --cluster-config-file "$work/nodes-$q.conf" --dir "$work" >/dev/null & pids+=($!); done
sleep 0.5
redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-yes >/dev/null
until redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok; do sleep 0.2; done
h="$(port)"; REDIS_CLUSTER_NODES="127.0.0.1:${ports[0]}" MODEL_DIR="$models" DEVICE=cpu PORT="$h" HOST=127.0.0.1 \
    LIGHTGCN_CANDIDATES=200 RUST_LOG=error "$bin" serve & pids+=($!)
until curl -sf "localhost:$h/health" >/dev/null; do sleep 0.2; done
measure cluster "$h" "${ports[@]}"
