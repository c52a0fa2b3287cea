#!/usr/bin/env bash
# The aeforge compose stack (infra/compose.yaml), deployed the way infra/README.md and the README's deploy section
# say, with podman + podman-compose or docker + docker compose. `make test-stack` runs these same commands.
#
#   infra/stack.sh deps                 install podman, podman-compose, runc, debootstrap from the distribution (root)
#   infra/stack.sh build                the images: the base (a registry's, else built with debootstrap), aeforge's,
#                                       and stand-ins for PostgreSQL and MinIO where no image registry answers
#   infra/stack.sh init                 infra/.env and the secrets in infra/secrets/ (kept if there; never committed)
#   infra/stack.sh up                   compose up, then wait until every service is healthy
#   infra/stack.sh wait                 wait until every service is healthy (AEFORGE_WAIT_S, default 600)
#   infra/stack.sh ps                   the stack's containers and their health
#   infra/stack.sh exec SERVICE CMD...  run CMD in the service's (first) container
#   infra/stack.sh client CMD...        run CMD in a one-off client container on the stack's network, with the
#                                       admin token and the current folder mounted read-only at /work
#   infra/stack.sh down [-v]            stop and remove the stack (-v: its volumes too); nothing is left running
#   infra/stack.sh images               the images and their sizes
#
# Settings (environment): ENGINE (podman | docker), COMPOSE (the compose command), AEFORGE_BASE_IMAGE (a base image
# to use as is, e.g. your registry mirror's python:3.11-slim-bookworm), AEFORGE_VARIANT (cpu | cuda),
# TORCH_INDEX_URL (an index serving the variant's torch build), AEFORGE_WHEELS (a folder of wheels; default: pip's
# configured find-links folder), AEFORGE_BUILD_CA (a CA bundle for HTTPS during builds; default: this machine's).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PROJECT=aeforge
NETWORK=${PROJECT}_default
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)
VARIANT=${AEFORGE_VARIANT:-cpu}
export AEFORGE_IMAGE=${AEFORGE_IMAGE:-localhost/aeforge:$VERSION-$VARIANT}
# The registry base image the Containerfile names by default, and the one debootstrap.sh builds where none answers.
REGISTRY_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$HERE/Containerfile")
LOCAL_BASE=localhost/aeforge-base:bookworm-py3.11
# The third-party images compose.yaml pins (a stand-in is built under the same name where no registry answers).
POSTGRES_IMAGE=$(sed -n 's#^ *image: \(.*/postgres:.*\)$#\1#p' "$HERE/compose.yaml")
S3_IMAGE=$(sed -n 's#^ *image: \(.*/minio:.*\)$#\1#p' "$HERE/compose.yaml")
SECRETS=$HERE/secrets
API_PID_FILE=/run/aeforge-podman-api.pid  # podman's API service, when this script started it

log() { printf '[stack %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ -z "${ENGINE:-}" ]; then
    if command -v podman >/dev/null; then ENGINE=podman; elif command -v docker >/dev/null; then ENGINE=docker; else ENGINE=podman; fi
fi
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ ! -e /etc/containers/containers.conf ]; then
    # runc and ulimits this kind of host accepts (see podman/containers.conf); a site's own file is left alone.
    export CONTAINERS_CONF=$HERE/podman/containers.conf
fi

# The compose command: COMPOSE if set (e.g. "docker-compose", Docker Compose v2 on its own, also against podman's
# Docker-compatible API), else docker's compose plugin with docker, podman-compose with podman.
compose() {
    if [ -n "${COMPOSE:-}" ]; then
        # shellcheck disable=SC2086
        $COMPOSE -f "$HERE/compose.yaml" -p "$PROJECT" "$@"
    elif [ "$ENGINE" = docker ]; then
        docker compose -f "$HERE/compose.yaml" "$@"
    else
        podman-compose -f "$HERE/compose.yaml" -p "$PROJECT" "$@"
    fi
}

# Docker Compose (the plugin, or COMPOSE=docker-compose), which follows depends_on's conditions and has --wait.
docker_compose() { [ "$ENGINE" = docker ] && [ -z "${COMPOSE:-}" ] || [[ "${COMPOSE:-}" == *docker* ]]; }

# Docker Compose with podman talks to podman's Docker-compatible API: start podman's service if no socket answers.
podman_api() {
    docker_compose && [ "$ENGINE" = podman ] || return 0
    local sock=/run/podman/podman.sock
    export DOCKER_HOST=${DOCKER_HOST:-unix://$sock}
    if ! curl -sf --unix-socket "${DOCKER_HOST#unix://}" http://d/_ping >/dev/null 2>&1; then
        log "starting podman's API service on ${DOCKER_HOST}"
        mkdir -p "$(dirname "${DOCKER_HOST#unix://}")"
        nohup podman system service --time=0 "$DOCKER_HOST" >/dev/null 2>&1 &
        echo $! >"$API_PID_FILE"  # stack.sh down stops it
        local i
        for i in $(seq 50); do
            curl -sf --unix-socket "${DOCKER_HOST#unix://}" http://d/_ping >/dev/null 2>&1 && return 0
            sleep 0.2
        done
        die "podman's API service did not answer on $DOCKER_HOST"
    fi
}

have_image() { "$ENGINE" image exists "$1" 2>/dev/null || "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# The image, from the local store or its registry; false if neither has it.
find_image() {
    have_image "$1" && return 0
    log "pulling $1"
    timeout 300 "$ENGINE" pull -q "$1" >/dev/null 2>&1
}

cmd_deps() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v buildah >/dev/null || missing+=(buildah)
    command -v podman-compose >/dev/null || missing+=(podman-compose)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -eq 0 ]; then
        log "podman $(podman --version | awk '{print $3}'), podman-compose, runc, debootstrap: installed"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: install them (as root: apt-get install ${missing[*]})"
    log "installing ${missing[*]} from the distribution's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        uidmap slirp4netns fuse-overlayfs catatonit containernetworking-plugins netavark aardvark-dns iptables >/dev/null
}

# Where this machine keeps wheels for pip (pip's find-links), for the build's /wheels.
wheels_dir() {
    if [ -n "${AEFORGE_WHEELS:-}" ]; then echo "$AEFORGE_WHEELS"; return; fi
    local d
    for d in ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
        if [ -d "$d" ]; then echo "$d"; return; fi
    done
}

build_ca() {
    if [ -n "${AEFORGE_BUILD_CA:-}" ]; then echo "$AEFORGE_BUILD_CA"; return; fi
    local f
    for f in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$f" ] && [ -f "$f" ]; then echo "$f"; return; fi
    done
}

build_image() {  # TAG CONTAINERFILE [podman build arguments...]
    local tag=$1 file=$2; shift 2
    local args=(-f "$file" -t "$tag")
    [ "$ENGINE" = podman ] && args+=(--format docker)
    local wheels ca
    wheels=$(wheels_dir); ca=$(build_ca)
    if [ "$ENGINE" = podman ]; then  # read-only during the build, never in a layer
        # Only for the CPU variant: a folder's torch 2.13.0+cpu would also match the CUDA lock's torch==2.13.0.
        [ -n "$wheels" ] && [ "$VARIANT" = cpu ] && args+=(--volume "$wheels:/wheels:ro")
        [ -n "$ca" ] && args+=(--volume "$ca:/run/build-ca.crt:ro")
    fi
    local start=$SECONDS
    # Each line of the build's log carries the seconds since the build began: the slow steps are reported below.
    "$ENGINE" build "${args[@]}" "$@" "$REPO" 2>&1 | stamp "$start" >"$BUILD_LOG" \
        || { tail -n 40 "$BUILD_LOG" >&2; die "building $tag failed (log: $BUILD_LOG)"; }
    log "built $tag in $((SECONDS - start)) s ($(image_size "$tag"))"
    slow_steps <"$BUILD_LOG" | while IFS= read -r line; do log "  $line"; done
}

stamp() {  # START: each input line prefixed with the seconds since START
    local line
    while IFS= read -r line; do printf '%5d %s\n' "$((SECONDS - $1))" "$line"; done
}

# The build steps that took 5 s or more (from stamp's log): "STEP n/m ... : S s".
slow_steps() {
    awk '$2 == "STEP" || $2 == "COMMIT" {
            if (step != "" && $1 - since >= 5) printf "%4d s  %s\n", $1 - since, step
            step = substr($0, index($0, $2)); since = $1
            if (length(step) > 100) step = substr(step, 1, 97) "..."
        }
        {last = $1}
        END {if (step != "" && last - since >= 5) printf "%4d s  %s\n", last - since, step}'
}

image_size() { "$ENGINE" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

cmd_build() {
    BUILD_LOG=$(mktemp "${TMPDIR:-/tmp}/aeforge-build.XXXXXX")
    local base=${AEFORGE_BASE_IMAGE:-}
    if [ -n "$base" ]; then
        find_image "$base" || die "AEFORGE_BASE_IMAGE=$base: not found locally nor in its registry"
    elif find_image "$REGISTRY_BASE"; then
        base=$REGISTRY_BASE
    else
        base=$LOCAL_BASE
        if have_image "$base"; then
            log "no registry answers for $REGISTRY_BASE; using $base (built from Debian's packages earlier)"
        else
            log "no registry answers for $REGISTRY_BASE; building $base with debootstrap"
            local start=$SECONDS
            ENGINE=$ENGINE "$HERE/base/debootstrap.sh" "$base" >/dev/null
            log "built $base in $((SECONDS - start)) s ($(image_size "$base"))"
        fi
    fi
    # The PostgreSQL stand-in (apt) builds beside aeforge's image (pip): they share only the base.
    local pg_pid=
    if ! find_image "$POSTGRES_IMAGE"; then
        log "no registry answers for $POSTGRES_IMAGE; building a stand-in from Debian's PostgreSQL"
        BUILD_LOG=$BUILD_LOG.postgres build_image "$POSTGRES_IMAGE" "$HERE/standins/postgres.Containerfile" \
            --build-arg "BASE_IMAGE=$base" --label io.aeforge.standin=true &
        pg_pid=$!
    fi
    build_image "$AEFORGE_IMAGE" "$HERE/Containerfile" --build-arg "BASE_IMAGE=$base" \
        --build-arg "VARIANT=$VARIANT" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" \
        --build-arg "AEFORGE_VERSION=$VERSION"
    if [ -n "$pg_pid" ]; then wait "$pg_pid" || die "building the PostgreSQL stand-in failed"; fi
    if ! find_image "$S3_IMAGE"; then
        log "no registry answers for $S3_IMAGE; building a stand-in from moto's S3 server"
        build_image "$S3_IMAGE" "$HERE/standins/s3.Containerfile" --build-arg "APP_IMAGE=$AEFORGE_IMAGE" \
            --label io.aeforge.standin=true
    fi
    rm -f "$BUILD_LOG" "$BUILD_LOG.postgres"
}

cmd_images() {
    local image
    for image in "$AEFORGE_IMAGE" "$POSTGRES_IMAGE" "$S3_IMAGE" "$LOCAL_BASE"; do
        have_image "$image" && printf '%s\t%s\n' "$image" "$(image_size "$image")"
    done
    return 0
}

random_hex() { python3 -c "import secrets; print(secrets.token_hex($1))"; }

cmd_init() {
    install -d -m 0700 "$SECRETS"
    if [ ! -s "$HERE/.env" ]; then
        umask 077
        printf 'POSTGRES_PASSWORD=%s\n' "$(random_hex 16)" >"$HERE/.env"
        log "wrote infra/.env"
    fi
    if [ ! -s "$SECRETS/s3-credentials.ini" ]; then
        local key secret
        key=$(random_hex 10); secret=$(random_hex 20)
        # 0644 inside a 0700 folder: readable by the containers' unprivileged users, not by this host's other users.
        printf '%s' "$key" >"$SECRETS/s3-access-key-id"
        printf '%s' "$secret" >"$SECRETS/s3-secret-access-key"
        printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$key" "$secret" \
            >"$SECRETS/s3-credentials.ini"
        chmod 0644 "$SECRETS"/s3-*
        log "wrote the S3 keys to infra/secrets/"
    fi
    if [ ! -s "$SECRETS/tokens.yaml" ]; then
        have_image "$AEFORGE_IMAGE" || die "$AEFORGE_IMAGE is not built: run infra/stack.sh build first"
        local tmp; tmp=$(mktemp -d); chmod 0777 "$tmp"
        # `aeforge tokens add` keeps the hash in the file and prints the token once: kept for the CLI, root-only.
        (umask 077; "$ENGINE" run --rm $([ "$ENGINE" = podman ] && echo --no-healthcheck) --network none -v "$tmp:/tokens" \
            -e AEFORGE_TOKENS_FILE=/tokens/tokens.yaml "$AEFORGE_IMAGE" aeforge tokens add platform --role admin \
            2>/dev/null | tr -d '\n' >"$SECRETS/admin-token")
        install -m 0644 "$tmp/tokens.yaml" "$SECRETS/tokens.yaml"
        rm -rf "$tmp"
        [ -s "$SECRETS/admin-token" ] || die "aeforge tokens add printed no token"
        log "wrote infra/secrets/tokens.yaml (hashes) and infra/secrets/admin-token (the admin's token, mode 0600)"
    fi
}

# The stack's containers: NAME SERVICE STATE, one a line.
containers() {
    "$ENGINE" ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --format '{{.Names}} {{index .Labels "com.docker.compose.service"}} {{.State}}'
}

container_of() {  # SERVICE [N]: the name of its Nth container (1 by default)
    containers | awk -v s="$1" '$2 == s {print $1}' | sort | sed -n "${2:-1}p"
}

# 0 when the container is healthy (or, without a health check, running; or, a one-shot, exited 0).
container_ready() {
    local name=$1 state health test
    state=$("$ENGINE" inspect --format '{{.State.Status}}' "$name" 2>/dev/null) || return 1
    if [ "$state" = exited ]; then
        [ "$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$name")" = 0 ] && [ "$(restart_policy "$name")" != always ] \
            && [ "$(restart_policy "$name")" != unless-stopped ]
        return
    fi
    [ "$state" = running ] || return 1
    test=$("$ENGINE" inspect --format '{{if .Config.Healthcheck}}{{len .Config.Healthcheck.Test}}{{else}}0{{end}}' "$name" 2>/dev/null || echo 0)
    [ "$test" != 0 ] || return 0
    if [ "$ENGINE" = podman ]; then
        # podman runs health checks from systemd timers; without systemd, run the check here.
        podman healthcheck run "$name" >/dev/null 2>&1
    else
        health=$(docker inspect --format '{{.State.Health.Status}}' "$name")
        [ "$health" = healthy ]
    fi
}

restart_policy() { "$ENGINE" inspect --format '{{.HostConfig.RestartPolicy.Name}}' "$1" 2>/dev/null || true; }

# One round of health checks: "ready NAME" or "pending SERVICE" for each container, skipping the containers named in
# SKIP (space-separated).
check_round() {
    local skip=" ${1:-} " name service state
    while read -r name service state; do
        [ -n "$name" ] || continue
        case "$skip" in *" $name "*) continue ;; esac
        if container_ready "$name" </dev/null; then echo "ready $name"; else echo "pending $service"; fi
    done < <(containers)
}

# One round of health checks: the services not ready yet, one a line (none: all ready).
cmd_wait_once() { check_round | awk '$1 == "pending" {print $2}'; }

cmd_wait() {
    local limit=${AEFORGE_WAIT_S:-600} start=$SECONDS ready="" pending line
    while :; do
        # Each round checks only what was not ready yet: a check is a podman call and a process in the container, on
        # a host busy starting the stack. When nothing is left, one full round confirms that all are ready at once.
        pending=""
        while read -r line; do
            case $line in
                ready\ *) ready="$ready ${line#ready }" ;;
                *) pending="$pending ${line#pending }" ;;
            esac
        done < <(check_round "$ready")
        if [ -z "$pending" ] && [ -n "$ready" ]; then
            pending=$(cmd_wait_once | sort -u | tr '\n' ' ')
            if [ -z "$pending" ] && [ -n "$(containers)" ]; then
                log "all services healthy after $((SECONDS - start)) s"
                return 0
            fi
            ready=""  # one fell over meanwhile (a Ray node that lost its head, say): check them all again
        fi
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            cmd_ps >&2
            die "not healthy after ${limit} s: $(echo "${pending:-no containers}" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
        fi
        sleep 3
    done
}

cmd_ps() {
    local name service state health
    while read -r name service state; do
        [ -n "$name" ] || continue
        if container_ready "$name" </dev/null; then health=ready; else health=not-ready; fi
        printf '%-28s %-12s %-10s %s\n' "$name" "$service" "$state" "$health"
    done < <(containers)
}

cmd_up() {
    [ -s "$HERE/.env" ] && [ -s "$SECRETS/tokens.yaml" ] || die "run infra/stack.sh init first"
    local start=$SECONDS
    # Compose's output echoes commands and environments (podman-compose): its log is private (mktemp: 0600).
    local out; out=$(mktemp "${TMPDIR:-/tmp}/aeforge-compose-up.XXXXXX")
    if docker_compose; then
        podman_api
        # Docker Compose waits for each dependency's health; under podman without systemd the checks run only when
        # asked, so they are run here (cmd_wait) while compose waits.
        compose up -d --no-build --wait >"$out" 2>&1 &
        local compose_pid=$!
        if [ "$ENGINE" = podman ]; then
            while kill -0 "$compose_pid" 2>/dev/null; do cmd_wait_once >/dev/null 2>&1 || true; sleep 2; done
        fi
        wait "$compose_pid" || { tail -n 30 "$out" >&2; die "compose up failed (log: $out)"; }
    else
        compose up -d --no-build >"$out" 2>&1 || { tail -n 30 "$out" >&2; die "compose up failed (log: $out)"; }
    fi
    rm -f "$out"
    cmd_wait
    log "stack up in $((SECONDS - start)) s"
}

cmd_exec() {
    [ $# -ge 2 ] || die "usage: stack.sh exec SERVICE CMD..."
    local name; name=$(container_of "$1"); shift
    [ -n "$name" ] || die "no container for that service"
    "$ENGINE" exec -i "$name" "$@"
}

cmd_client() {
    [ -r "$SECRETS/admin-token" ] || die "no infra/secrets/admin-token: run infra/stack.sh init"
    AEFORGE_API_TOKEN=$(cat "$SECRETS/admin-token") "$ENGINE" run --rm -i $([ "$ENGINE" = podman ] && echo --no-healthcheck) --network "$NETWORK" \
        -e AEFORGE_API_URL=http://aeforge:8765 -e AEFORGE_API_TOKEN -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
        -e COLUMNS=160 -v "$PWD:/work:ro" -w /work "$AEFORGE_IMAGE" "$@"
}

cmd_down() {
    local volumes=()
    [ "${1:-}" = -v ] && volumes=(-v)
    podman_api
    local out; out=$(mktemp "${TMPDIR:-/tmp}/aeforge-compose-down.XXXXXX")
    compose down "${volumes[@]}" >"$out" 2>&1 || { tail -n 30 "$out" >&2; die "compose down failed (log: $out)"; }
    rm -f "$out"
    # What compose leaves: one-off client containers, and (podman-compose 1.0) the project's network.
    local name
    for name in $(containers | awk '{print $1}'); do "$ENGINE" rm -f "$name" >/dev/null </dev/null; done
    if "$ENGINE" network inspect "$NETWORK" >/dev/null 2>&1; then "$ENGINE" network rm "$NETWORK" >/dev/null; fi
    if [ ${#volumes[@]} -gt 0 ]; then
        for name in $("$ENGINE" volume ls -q --filter "label=com.docker.compose.project=$PROJECT"); do
            "$ENGINE" volume rm -f "$name" >/dev/null
        done
    fi
    [ -z "$(containers)" ] || die "containers left: $(containers | awk '{print $1}' | tr '\n' ' ')"
    if [ -s "$API_PID_FILE" ]; then  # the API service this script started for Docker Compose: nothing left running
        kill "$(cat "$API_PID_FILE")" 2>/dev/null || true
        rm -f "$API_PID_FILE"
    fi
    log "stack down${volumes:+ (volumes removed)}"
}

main() {
    local cmd=${1:-}; shift || true
    case "$cmd" in
        deps) cmd_deps ;;
        build) cmd_build ;;
        init) cmd_init ;;
        up) cmd_up ;;
        wait) cmd_wait ;;
        ps) cmd_ps ;;
        exec) cmd_exec "$@" ;;
        client) cmd_client "$@" ;;
        down) cmd_down "$@" ;;
        images) cmd_images ;;
        compose) podman_api; compose "$@" ;;
        *) sed -n '2,22p' "$0" >&2; exit 2 ;;
    esac
}

# One line, read whole before it runs: editing this file while it runs cannot change what runs next.
main "$@"; exit
