#!/usr/bin/env bash
# Compose sub-suite: the repo's docker-compose.yml run for real, in
# containers, with podman (no Docker engine on the CI machines), and checked
# from the host (test_compose.py). See deploy/README.md, "Tests".
#
#   sudo bash tests/compose/run.sh [pytest args]
#
# 1. installs podman, runc, netavark, debootstrap and docker-compose (Debian's
#    packages) when missing;
# 2. builds the local base images the compose file and deploy/Dockerfile
#    need (no registry is reachable): a debootstrapped Debian bookworm as
#    debian:bookworm-slim, a Rust builder (the host's rustup toolchain on
#    top of it), Redis, nginx and Prometheus from Debian's packages. They are
#    reused while their recipe is unchanged (label io.wsgate.compose-test.recipe);
# 3. builds the gateway image from deploy/Dockerfile (its stages unchanged,
#    only RUST_IMAGE and RUNTIME_IMAGE passed), podman's layer cache reused;
# 4. starts podman's Docker-compatible API on a private socket and runs
#    `docker-compose up` with the repo's file plus compose.override.yml (the
#    local image names only), every service but Grafana (no Debian package);
# 5. runs test_compose.py, then tears down everything it started (trap):
#    containers, network and volumes of the compose project
#    "wsgate-compose-test", the API service, the health-check driver.
#
# Everything it creates is named wsgate-compose* (images
# localhost/wsgate-compose/*, labelled io.wsgate.compose-test); nothing
# else is touched. Needs root (podman as root, apt-get) and the host ports
# the compose file publishes: 8080-8083 and 9090.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
WORK="${WSGATE_COMPOSE_WORK:-/var/tmp/wsgate-compose}"
PROJECT=wsgate-compose-test
IMG=localhost/wsgate-compose
LABEL=io.wsgate.compose-test
MIRROR="${WSGATE_COMPOSE_MIRROR:-http://deb.debian.org/debian}"
SERVICES=(redis gateway-1 gateway-2 gateway-3 nginx prometheus)
export CONTAINERS_CONF="$HERE/containers.conf"

t0=$SECONDS
say() { printf '[compose %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (podman runs rootful here; apt-get)"

# --- 1. packages ------------------------------------------------------------
missing=()
for p in podman runc debootstrap docker-compose; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ -x /usr/lib/podman/netavark ] || missing+=(netavark aardvark-dns)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${missing[@]}" iptables uidmap ca-certificates >/dev/null
fi
say "$(podman --version), $(runc --version | head -1), $(docker-compose version --short 2>/dev/null || echo docker-compose)"

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/requirements.txt"

# --- 2. base images -----------------------------------------------------------
mkdir -p "$WORK"

# recipe_of IMAGE: the recipe label of a present image ("" when absent).
recipe_of() {
    podman image inspect --format "{{index .Labels \"$LABEL.recipe\"}}" "$1" 2>/dev/null || true
}

# build_image NAME RECIPE CONTEXT [podman build args...]: builds $IMG/NAME
# unless an image with the same recipe hash is already there.
build_image() {
    local name=$1 recipe=$2 context=$3; shift 3
    if [ "$(recipe_of "$IMG/$name")" = "$recipe" ]; then
        say "image $IMG/$name: present, reused"
        return
    fi
    say "image $IMG/$name: building (log: $WORK/build-${name%%:*}.log)"
    local start=$SECONDS
    if ! podman build --format docker --layers --label "$LABEL=base" --label "$LABEL.recipe=$recipe" \
            -t "$IMG/$name" "$@" "$context" > "$WORK/build-${name%%:*}.log" 2>&1; then
        tail -n 30 "$WORK/build-${name%%:*}.log" >&2
        die "building $IMG/$name"
    fi
    say "image $IMG/$name: built in $((SECONDS - start))s"
}

base="$IMG/debian:bookworm-slim"
base_recipe="debootstrap-minbase-bookworm-v1"
if [ "$(recipe_of "$base")" != "$base_recipe" ]; then
    say "image $base: debootstrap --variant=minbase bookworm (log: $WORK/debootstrap.log)"
    start=$SECONDS
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" --numeric-owner -c . | podman import \
        --change 'CMD ["bash"]' --change "LABEL $LABEL=base" --change "LABEL $LABEL.recipe=$base_recipe" \
        - "$base" >/dev/null
    rm -rf "$WORK/rootfs"
    say "image $base: imported in $((SECONDS - start))s"
else
    say "image $base: present, reused"
fi

# The service images mostly download packages: built in the background,
# while the Rust builder and the gateway image take the CPU.
(
    for svc in redis nginx prometheus; do
        file="$HERE/images/$svc.Containerfile"
        recipe="$(cat "$file" <(echo "$base_recipe") | sha256sum | cut -c1-16)"
        build_image "$svc:bookworm" "$recipe" "$HERE/images" -f "$file" --build-arg "BASE=$base"
    done
) &
services_pid=$!

# The Rust builder: the host's toolchain (the one `rustc` on PATH runs) and
# the host's extra certificate authorities, staged as the build context.
sysroot="$(rustc --print sysroot)" || die "rustc (rustup) is required on the host"
rustc_version="$(rustc --version)"
ca_sum="$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-16)"
recipe="$( (cat "$HERE/images/rust.Containerfile"; echo "$base_recipe $rustc_version $ca_sum") | sha256sum | cut -c1-16)"
if [ "$(recipe_of "$IMG/rust:bookworm")" != "$recipe" ]; then
    ctx="$WORK/rust-context"
    rm -rf "$ctx" && mkdir -p "$ctx/ca"
    say "staging $rustc_version from $sysroot"
    cp -al "$sysroot" "$ctx/rust" 2>/dev/null || cp -a "$sysroot" "$ctx/rust"
    rm -rf "$ctx/rust/share/doc"
    cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
    cp "$HERE/images/rust.Containerfile" "$ctx/Containerfile"
    build_image "rust:bookworm" "$recipe" "$ctx" --build-arg "BASE=$base"
    rm -rf "$ctx"
else
    say "image $IMG/rust:bookworm: present, reused"
fi

# --- 3. the gateway image -------------------------------------------------------
# A cold build keeps the release target/ of the dependencies as a layer:
# several GB, and a full disk fails it only when the layer is committed.
mkdir -p /var/lib/containers
say "image $IMG/wsgate:local: building deploy/Dockerfile (cargo build --release inside; log: $WORK/build-wsgate.log; $(df -h --output=avail /var/lib/containers | tail -1 | tr -d ' ') free, a cold build needs about 5G)"
start=$SECONDS
if ! timeout 2400 podman build --format docker --layers --label "$LABEL=gateway" \
        --build-arg "RUST_IMAGE=$IMG/rust:bookworm" --build-arg "RUNTIME_IMAGE=$base" \
        -f "$REPO/deploy/Dockerfile" -t "$IMG/wsgate:local" "$REPO" > "$WORK/build-wsgate.log" 2>&1; then
    tail -n 40 "$WORK/build-wsgate.log" >&2
    ! grep -q 'no space left on device' "$WORK/build-wsgate.log" || say "the disk is full: free some space and run again" >&2
    die "building the gateway image from deploy/Dockerfile"
fi
say "image $IMG/wsgate:local: built in $((SECONDS - start))s"
wait "$services_pid" || die "building the service images"

# --- 4. the cluster ---------------------------------------------------------------
run_dir="$(mktemp -d /run/wsgate-compose.XXXXXX)"
service_pid=""
driver_pid=""
COMPOSE=(docker-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" -f "$HERE/compose.override.yml")
compose() { "${COMPOSE[@]}" "$@"; }
teardown() {
    local rc=$?
    trap - EXIT INT TERM
    say "tearing down project $PROJECT"
    if [ -n "$service_pid" ]; then
        compose logs --no-color --tail=200 > "$WORK/compose-logs.txt" 2>&1 || true
        compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    fi
    # Whatever compose left (a container it lost track of): by project label.
    podman ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null 2>&1 || true
    podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
    podman network ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null 2>&1 || true
    [ -z "$driver_pid" ] || kill "$driver_pid" 2>/dev/null || true
    [ -z "$service_pid" ] || kill "$service_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$run_dir"
    say "done in $((SECONDS - t0))s (logs of the last run: $WORK/compose-logs.txt)"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# A previous run killed before its trap ran: its leftovers are ours.
podman ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null 2>&1 || true
podman network ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null 2>&1 || true

for port in 8080 8081 8082 8083 9090; do
    if ! "$VENV/bin/python" -c 'import socket,sys; s=socket.socket(); s.bind(("0.0.0.0", int(sys.argv[1])))' "$port" 2>/dev/null; then
        die "host port $port (published by docker-compose.yml) is in use"
    fi
done

say "starting podman's Docker API on $run_dir/podman.sock"
podman system service --time=0 "unix://$run_dir/podman.sock" > "$WORK/podman-service.log" 2>&1 &
service_pid=$!
export DOCKER_HOST="unix://$run_dir/podman.sock"
for _ in $(seq 100); do [ -S "$run_dir/podman.sock" ] && break; sleep 0.1; done
[ -S "$run_dir/podman.sock" ] || die "podman system service did not start"

# No systemd here, so podman has nothing to run HEALTHCHECKs on their
# interval: this driver runs each container's own check (podman healthcheck
# run), every 2 s, which updates its health status as the timer would.
(
    while sleep 2; do
        for c in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
            podman healthcheck run "$c" >/dev/null 2>&1 || true
        done
    done
) &
driver_pid=$!

say "docker-compose up -d ${SERVICES[*]} (Grafana left out: no Debian package, no registry)"
timeout 300 "${COMPOSE[@]}" up -d --no-build "${SERVICES[@]}" || die "docker-compose up"
compose ps

# --- 5. the checks ------------------------------------------------------------------
export COMPOSE_PROJECT="$PROJECT" COMPOSE_FILES="$REPO/docker-compose.yml:$HERE/compose.override.yml"
say "running test_compose.py"
cd "$HERE"
timeout 600 "$VENV/bin/python" -m pytest -p no:cacheprovider -v -ra --rootdir "$HERE" "$@" "$HERE/test_compose.py"
