# Helpers shared by benches/run.sh and benches/soak.sh (sourced, not run).
# LOG_TAG names the script in log lines.

log() { printf '[%s] %s\n' "${LOG_TAG:-bench}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# free_ports N: N free loopback TCP ports, space-separated.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

wait_for() { # wait_for DESCRIPTION COMMAND...: poll for up to 15 s
    local what=$1
    shift
    for _ in $(seq 150); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out waiting for $what"
}

# prepare_binaries: check the commands the scripts need, build the release
# binaries unless SKIP_BUILD=1, and check that $WSGATE and $BENCH exist.
prepare_binaries() {
    local tool
    for tool in redis-server redis-cli python3 curl; do
        command -v "$tool" >/dev/null ||
            die "$tool is needed (apt-get install -y --no-install-recommends redis-server python3 curl)"
    done
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        log "building wsgate and wsgate-bench (release)"
        (cd "$ROOT" && cargo build --release -p wsgate -p wsgate-bench)
    fi
    [[ -x "$WSGATE" && -x "$BENCH" ]] || die "missing $WSGATE or $BENCH"
}
