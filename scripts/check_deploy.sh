#!/usr/bin/env bash
# Validate the deployment files without a Docker engine or a cluster: compose files
# (docker-compose config), the Dockerfile's defaults, shell scripts (shellcheck), Prometheus config
# and alert rules (promtool), Kubernetes manifests (kubernetes-validate against the 1.37 schemas,
# yamllint), and the start script's help and its Docker modes on a machine without a Docker engine.
# Needs the tools setup_apt installs and the venv of setup_venv ($VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check_deploy: $*" >&2; exit 1; }

echo "-- docker-compose config"
for f in model-compose.yml model-compose-standalone.yml; do
    docker-compose -f "$f" config -q || fail "$f is not a valid compose file"
done
echo "-- shellcheck"
shellcheck -x start_model_service.sh scripts/*.sh scripts/py .ci/run
echo "-- promtool"
promtool check config deploy/prometheus.yml
promtool check rules deploy/alerts.yml
promtool test rules deploy/alerts_test.yml
echo "-- kubernetes manifests"
"$VENV/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
"$VENV/bin/yamllint" -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' deploy/k8s deploy/*.yml
echo "-- replicas and disruption budget"
"$VENV/bin/python" - <<'PY' || fail "the Deployment and its PodDisruptionBudget do not fit together"
import yaml
dep = yaml.safe_load(open("deploy/k8s/deployment.yaml"))
pdb = yaml.safe_load(open("deploy/k8s/pdb.yaml"))
assert pdb["kind"] == "PodDisruptionBudget", pdb["kind"]
labels = dep["spec"]["template"]["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "selector"
replicas, keep = dep["spec"]["replicas"], pdb["spec"]["minAvailable"]
assert 1 <= keep < replicas, f"minAvailable {keep} with {replicas} replicas blocks every drain"
assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["serve", "--listen"]
cm = yaml.safe_load(open("deploy/k8s/configmap.yaml"))["data"]
for key in ("REDIS_CLUSTER_NODES", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "USER_CLAIM_MS"):
    assert key in cm, key
PY
for f in model-compose.yml model-compose-standalone.yml; do
    rendered="$(REDIS_CLUSTER_NODES=a:7000,b:7001 docker-compose -f "$f" config)"
    grep -q "REDIS_CLUSTER_NODES: a:7000,b:7001" <<<"$rendered" || fail "$f does not pass REDIS_CLUSTER_NODES on"
done
echo "-- Dockerfile defaults"
# Users with a registry build with no arguments: the Docker Hub bases and the CPU variant.
# shellcheck disable=SC2016 # the Dockerfile's own ${...}
for line in "ARG BUILDER_IMAGE=rust:1-bookworm" "ARG RUNTIME_IMAGE=debian:bookworm-slim" "ARG VARIANT=cpu" \
    "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" 'FROM ${BUILDER_IMAGE} AS builder' \
    'FROM ${RUNTIME_IMAGE} AS runtime' "USER model-service" 'ENTRYPOINT ["model-service"]' 'CMD ["serve"]'; do
    grep -qxF -- "$line" Dockerfile || fail "Dockerfile: no line '$line'"
done
echo "-- start_model_service.sh"
help="$(./start_model_service.sh --help)"
for mode in --local --docker-network --host-network --help; do
    grep -q -- "$mode" <<<"$help" || fail "--help does not document $mode"
done
# Docker modes without a Docker engine: print the exact command, then fail with a clear message.
fake="$(mktemp -d)"
trap 'rm -rf "$fake"' EXIT
# shellcheck disable=SC2016 # the fake script expands $1 itself
printf '#!/bin/sh\n[ "$1" = info ] && exit 1\n[ "$1" = compose ] && exit 1\nexit 0\n' >"$fake/docker"
chmod +x "$fake/docker"
for args in "--docker-network redisnet" "--host-network"; do
    # shellcheck disable=SC2086
    if out="$(PATH="$fake:$PATH" ./start_model_service.sh $args 2>&1)"; then fail "$args succeeded without Docker"; fi
    grep -q -- "+ docker-compose -f model-compose" <<<"$out" || fail "$args did not print its docker command: $out"
    grep -q "No Docker engine answers" <<<"$out" || fail "$args did not explain the failure: $out"
done
echo "deployment files: all checks passed"
