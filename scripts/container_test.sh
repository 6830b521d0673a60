#!/usr/bin/env bash
# Build the image from the repository's Dockerfile and run the README's walk-through against it
# (docs/container.md):
#   1. the engine: docker when one answers, else podman (installed when missing, with the settings
#      this kind of machine needs: runc, cgroupfs, no default ulimits; a private containers.conf);
#   2. the base: with no registry answering, a Debian bookworm image made here (debootstrap from
#      this machine's apt sources, read at run time) serves as BUILDER_IMAGE and RUNTIME_IMAGE; with
#      PyTorch's CPU index unreachable, TORCH_INDEX_URL is empty (PyPI's wheel, reduced to the CPU);
#   3. the build (layers and caches kept, so a machine that built before rebuilds only what
#      changed), with the image size and build time printed;
#   4. a redis-server on a free loopback port and the image (`serve --listen`, host networking, a
#      free port): /health 200 and the image's HEALTHCHECK passing, POST /recommend/<id> with a
#      real profile (the README's), the cache-first GET, /metrics, the listener picking up a
#      profile write, and `stop` exiting 0 within the shutdown grace;
#   5. model-compose-standalone.yml: up (docker-compose, against podman's API socket under podman),
#      healthy, a recommendation through it, down.
# Environment: CONTAINER_ENGINE (docker | podman), BUILDER_IMAGE, RUNTIME_IMAGE, VARIANT,
# TORCH_INDEX_URL (passed on as build arguments when set), IMAGE (default model-service:latest, the
# name the compose files use).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_apt

say() { printf '[container] %s\n' "$*" >&2; }
fail() { printf 'container_test: FAIL: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
t_start=$(date +%s)

IMAGE="${IMAGE:-model-service:latest}"
GRACE=20
work="$(mktemp -d)"
name=""
redis_pid=""
api_pid=""
compose_up=""

cleanup() {
    set +e
    if [ -n "$compose_up" ]; then
        DOCKER_HOST="$compose_host" docker-compose -f model-compose-standalone.yml down >/dev/null 2>&1
    fi
    if [ -n "$name" ]; then "$ENGINE" rm -f "$name" >/dev/null 2>&1; fi
    if [ -n "$api_pid" ]; then kill "$api_pid" 2>/dev/null; wait "$api_pid" 2>/dev/null; fi
    if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- 1. engine ---
ENGINE="${CONTAINER_ENGINE:-}"
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
if [ "$ENGINE" = podman ]; then
    missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]} (with the packages podman recommends)"
        ms_sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive ms_sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # crun fails here ("cgroups in hybrid mode not supported"), and so do the default ulimits
    # (setrlimit: Operation not permitted); runc with cgroupfs and the engine's own limits work.
    cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    export CONTAINERS_CONF="$work/containers.conf"
fi
say "engine: $ENGINE ($("$ENGINE" --version))"

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# --- 2. base images and wheel index ---
BASE=localhost/debian:bookworm
make_base() {
    if image_exists "$BASE"; then say "base image $BASE: present"; return 0; fi
    command -v debootstrap >/dev/null || fail "no registry answers and debootstrap is missing"
    local targets mirror security updates t0
    # shellcheck disable=SC2016 # apt expands $(REPO_URI) itself
    targets="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' | sort -u)"
    mirror="$(awk '$2 == "bookworm" {print $1; exit}' <<<"$targets")"
    security="$(awk '$2 == "bookworm-security" {print $1; exit}' <<<"$targets")"
    updates="$(awk '$2 == "bookworm-updates" {print $1; exit}' <<<"$targets")"
    [ -n "$mirror" ] || fail "no apt source for Debian bookworm on this machine (apt-get indextargets)"
    [ -n "$security" ] || say "no bookworm-security source: the builder gets Debian's Rust 1.85, too old for Cargo.lock (1.89)"
    say "base image $BASE: debootstrap --variant=minbase bookworm from this machine's apt mirror"
    t0=$(date +%s)
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
    rm -f "$work/rootfs/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: bookworm%s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" "$([ "$updates" = "$mirror" ] && echo " bookworm-updates")"
        if [ -n "$security" ]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$security"
        fi
    } >"$work/rootfs/etc/apt/sources.list.d/debian.sources"
    rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/archives/"*.deb
    tar -C "$work/rootfs" -c . | "$ENGINE" import - "$BASE" >/dev/null
    rm -rf "$work/rootfs"
    say "base image $BASE: made in $(($(date +%s) - t0)) s"
}

build_args=(--build-arg "VARIANT=${VARIANT:-cpu}")
if [ -z "${BUILDER_IMAGE:-}${RUNTIME_IMAGE:-}" ]; then
    if timeout 60 "$ENGINE" pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
        say "a registry answers: the Dockerfile's default base images"
    else
        say "no registry answers: a Debian base made here"
        make_base
        BUILDER_IMAGE="$BASE" RUNTIME_IMAGE="$BASE"
    fi
fi
[ -n "${BUILDER_IMAGE:-}" ] && build_args+=(--build-arg "BUILDER_IMAGE=$BUILDER_IMAGE")
[ -n "${RUNTIME_IMAGE:-}" ] && build_args+=(--build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE")
if [ -z "${TORCH_INDEX_URL+set}" ] && [ "${VARIANT:-cpu}" = cpu ] \
    && ! curl -fsS -o /dev/null --max-time 20 https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    say "PyTorch's CPU index does not answer: torch from PyPI, reduced to its CPU libraries"
    TORCH_INDEX_URL=""
fi
[ -n "${TORCH_INDEX_URL+set}" ] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
# The CAs added to this machine's trust store (a TLS-intercepting proxy's), for pip and cargo in
# the builder; empty when there are none.
cat /usr/local/share/ca-certificates/*.crt >"$work/extra_ca.pem" 2>/dev/null || true
build_args+=(--secret "id=extra_ca,src=$work/extra_ca.pem")
if [ "$ENGINE" = podman ]; then
    build_args+=(--format docker) # HEALTHCHECK is dropped in the OCI format
else
    export DOCKER_BUILDKIT=1
fi

# --- 3. build ---
say "$ENGINE build ${build_args[*]} -t $IMAGE ."
t0=$(date +%s)
"$ENGINE" build --network=host "${build_args[@]}" -t "$IMAGE" . >"$work/build.log" 2>&1 \
    || { tail -n 60 "$work/build.log" >&2; fail "the image does not build (log above)"; }
build_s=$(($(date +%s) - t0))
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
cached=$(grep -c -- '--> Using cache\|CACHED' "$work/build.log" || true)
say "image $IMAGE: $((size / 1000000)) MB, built in ${build_s} s ($cached steps from the layer cache)"
# What users of the image rely on: user, entrypoint, command, port, health check, environment.
# (docker reports the health check in .Config.Healthcheck, podman beside .Config, as .Healthcheck)
config=$("$ENGINE" image inspect "$IMAGE")
python3 -c "
import json, sys
image = json.loads(sys.argv[1])[0]
c = image['Config']
assert c['User'] == 'model-service', c['User']
assert c['Entrypoint'] == ['model-service'] and c['Cmd'] == ['serve'], (c['Entrypoint'], c['Cmd'])
assert '8001/tcp' in c['ExposedPorts'], c['ExposedPorts']
health = c.get('Healthcheck') or image.get('Healthcheck') or {}
assert '/health' in ' '.join(health.get('Test', [])), health
env = dict(e.split('=', 1) for e in c['Env'])
assert env['MODEL_DIR'] == '/app/model_output' and env['PORT'] == '8001' and env['DEVICE'] == 'auto', env
" "$config" || fail "the image's configuration is not what the Dockerfile promises: ${config:0:3000}"

# --- 4. the walk-through ---
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
rcli() { redis-cli -p "$redis_port" "$@"; }
for _ in $(seq 50); do rcli ping >/dev/null 2>&1 && break; sleep 0.1; done
rcli ping >/dev/null || fail "redis-server did not start"

port=$(free_port)
name="model-service-test-$$"
"$ENGINE" run -d --name "$name" --network=host \
    -e HOST=127.0.0.1 -e PORT="$port" -e REDIS_HOST=127.0.0.1 -e REDIS_PORT="$redis_port" \
    -e SHUTDOWN_GRACE_SECS="$GRACE" "$IMAGE" serve --listen >/dev/null 2>>"$work/engine.log" \
    || { cat "$work/engine.log" >&2; fail "$ENGINE run failed"; }
base="http://127.0.0.1:$port"

# http METHOD PATH -> the body in $work/body, the status printed
http() { curl -s -o "$work/body" -w '%{http_code}' -X "$1" "$base$2" || true; }
# json CODE [ARG...]: CODE run with d = the body's JSON, the ARGs in sys.argv[2:]
json() { local code="$1"; shift; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); $code" "$work/body" "$@"; }

wait_health() { # $1 name, $2 url: /health answers 200 within 240 s (model loading and warm-up)
    local code
    for _ in $(seq 240); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "$2/health" || true)
        [ "$code" = 200 ] && return 0
        [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$1")" = true ] \
            || { "$ENGINE" logs "$1" 2>&1 | tail -n 30 >&2; fail "$1 exited before /health answered 200"; }
        sleep 1
    done
    "$ENGINE" logs "$1" 2>&1 | tail -n 30 >&2
    fail "$1: /health did not answer 200 within 240 s (last: $code)"
}

wait_healthy() { # $1 name: the image's HEALTHCHECK passes and the engine reports healthy
    local status=""
    for _ in $(seq 60); do
        if [ "$ENGINE" = podman ]; then podman healthcheck run "$1" >/dev/null 2>&1 || true; fi
        status=$("$ENGINE" inspect --format '{{.State.Health.Status}}' "$1" 2>/dev/null || true)
        [ "$status" = healthy ] && return 0
        sleep 2
    done
    fail "$1: the health check did not pass (status: ${status:-none})"
}

t0=$(date +%s)
wait_health "$name" "$base"
say "/health 200 after $(($(date +%s) - t0)) s"
if [ "$ENGINE" = podman ]; then
    podman healthcheck run "$name" >/dev/null || fail "podman healthcheck run $name failed"
fi
wait_healthy "$name"
say "HEALTHCHECK: healthy"

# The README walk-through's profile: real Amazon-Book ids of the shipped catalog.
user=A3RTKL9KB8KLID
history='["0553092626","0393316041"]'
for id in 0553092626 0393316041 038531258X; do
    grep -q "$id" model_output/catalog.tsv || fail "$id is not in model_output/catalog.tsv"
done
rcli SET "user_profile:$user" "$history" >/dev/null
code=$(http POST "/recommend/$user")
[ "$code" = 200 ] || fail "POST /recommend/$user: HTTP $code $(cat "$work/body")"
json "
h=$history; r=[x['item_id'] for x in d['recommendations']]
assert d['strategy']=='personalized' and len(r)==10 and not set(r)&set(h) and d['unknown_items']==0, d
print(json.dumps(r,separators=(',',':')))" >"$work/list" || fail "POST /recommend/$user: $(cat "$work/body")"
[ "$(rcli GET "recommendations:$user")" = "$(cat "$work/list")" ] || fail "Redis does not hold the list POST returned"
ttl=$(rcli TTL "recommendations:$user")
[ "$ttl" -gt 0 ] || fail "recommendations:$user has no TTL ($ttl)"
say "POST /recommend/$user: 200, personalized, $(cat "$work/list") in Redis (TTL $ttl)"

code=$(http GET "/recommendations/$user")
[ "$code" = 200 ] || fail "GET /recommendations/$user: HTTP $code $(cat "$work/body")"
json "
assert d['source']=='cache', d
assert json.dumps([x['item_id'] for x in d['recommendations']],separators=(',',':'))==sys.argv[2], d" "$(cat "$work/list")" \
    || fail "GET /recommendations/$user is not the cached list: $(cat "$work/body")"
say "GET /recommendations/$user: 200, source cache, the same list"

code=$(http GET /metrics)
[ "$code" = 200 ] || fail "/metrics: HTTP $code"
grep -Eq '^model_service_stage_duration_seconds_count\{stage="ranknet",variant="default"\} [1-9]' "$work/body" || fail "/metrics counts no ranknet stage"
grep -Eq '^model_service_cache_answers_total\{outcome="hit"\} [1-9]' "$work/body" || fail "/metrics counts no cache hit"
say "/metrics: 200, the ranking stages and the cache hit counted"

user2="${user}-listener"
rcli SET "user_profile:$user2" '["0553092626","038531258X"]' >/dev/null
for _ in $(seq 60); do [ -n "$(rcli GET "recommendations:$user2")" ] && break; sleep 0.5; done
list2=$(rcli GET "recommendations:$user2")
python3 -c "import json,sys; r=json.loads(sys.argv[1]); assert len(r)==10 and '038531258X' not in r, r" "$list2" \
    || fail "serve --listen did not write recommendations:$user2 after the profile write (got '$list2')"
say "serve --listen: the profile write of $user2 answered in Redis ($list2)"

t0=$(date +%s.%N)
"$ENGINE" stop -t $((GRACE + 15)) "$name" >/dev/null 2>>"$work/engine.log" \
    || { cat "$work/engine.log" >&2; fail "$ENGINE stop $name failed"; }
stop_s=$(python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$t0")
exit_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$name")
[ "$exit_code" = 0 ] || { "$ENGINE" logs "$name" 2>&1 | tail -n 20 >&2; fail "stop: exit status $exit_code"; }
python3 -c "import sys; assert float(sys.argv[1]) < $GRACE" "$stop_s" || fail "stop took ${stop_s} s, beyond the ${GRACE} s grace"
say "$ENGINE stop: exit status 0 after ${stop_s} s (grace ${GRACE} s)"
"$ENGINE" rm -f "$name" >/dev/null 2>>"$work/engine.log"
name=""

# --- 5. the standalone compose file ---
compose_host="${DOCKER_HOST:-}"
if [ "$ENGINE" = podman ]; then
    podman system service --time=0 "unix://$work/podman.sock" >"$work/podman-service.log" 2>&1 &
    api_pid=$!
    for _ in $(seq 50); do [ -S "$work/podman.sock" ] && break; sleep 0.1; done
    compose_host="unix://$work/podman.sock"
fi
if [ "$IMAGE" != model-service:latest ]; then "$ENGINE" tag "$IMAGE" model-service:latest; fi
port=$(free_port)
export REDIS_HOST=127.0.0.1 REDIS_PORT="$redis_port" PORT="$port"
compose_up=1
DOCKER_HOST="$compose_host" docker-compose -f model-compose-standalone.yml up -d >"$work/compose.log" 2>&1 \
    || { cat "$work/compose.log" >&2; fail "docker-compose -f model-compose-standalone.yml up -d failed"; }
base="http://127.0.0.1:$port"
wait_health model-service "$base"
wait_healthy model-service
say "model-compose-standalone.yml: up, /health 200, healthy"
rcli DEL "recommendations:$user" >/dev/null
code=$(http POST "/recommend/$user")
[ "$code" = 200 ] || fail "compose: POST /recommend/$user: HTTP $code $(cat "$work/body")"
json "assert d['strategy']=='personalized' and len(d['recommendations'])==10, d" || fail "compose: $(cat "$work/body")"
[ -n "$(rcli GET "recommendations:$user")" ] || fail "compose: no list in Redis"
DOCKER_HOST="$compose_host" docker-compose -f model-compose-standalone.yml down >>"$work/compose.log" 2>&1 \
    || { cat "$work/compose.log" >&2; fail "docker-compose down failed"; }
compose_up=""
if "$ENGINE" container inspect model-service >/dev/null 2>&1; then fail "docker-compose down left the container model-service"; fi
say "model-compose-standalone.yml: up, healthy, POST /recommend/$user 200, down"

echo "container test: all checks passed (image $((size / 1000000)) MB, build ${build_s} s, total $(($(date +%s) - t_start)) s)"
