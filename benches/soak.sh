#!/usr/bin/env bash
# The soak of issue 9: connect churn, join/leave churn, publish storms, Redis
# SIGSTOP/SIGCONT and kill/restart (empty), node SIGKILL and restart, for
# DURATION, over three wsgate nodes on a private redis-server.
#
# Starts redis-server and nodes n1..n3 from the release binaries on free
# loopback ports, runs `wsgate-bench soak` against them, injects one fault
# every FAULT_EVERY in turn (below), samples every node's RSS from /proc
# every 2 s, and ends with the tool's counts (acknowledged messages lost
# without notice, duplicates) and each node's RSS at its start plateau and
# at the end. Exits non-zero on any loss or duplicate, or when a node that
# was never killed ends more than 10 % away from its start plateau. Every
# process it starts is stopped on exit, whatever the exit.
#
#   benches/soak.sh                         # 10 minutes
#   DURATION=3m SKIP_BUILD=1 benches/soak.sh
#
# Faults, in turn: (1) Redis SIGSTOP for 4 s, then SIGCONT; (2) node n3
# SIGKILL, restarted 2 s later on the same ports; (3) Redis SIGKILL,
# restarted 2 s later on the same port, empty (new epochs: clients are told).
# Faults stop one FAULT_EVERY (and at least a tenth of DURATION) before the
# load ends, so the end RSS window is calm. n1 and n2 are never killed:
# their RSS is the one checked, median over the start plateau (from a fifth
# of the run, and not before the first full cycle of faults, 4 x
# FAULT_EVERY: the first n3 kill moves its subscribers to n1 and n2 for
# good) against the median over the last tenth of the load.
#
# Environment: DURATION (10m), FAULT_EVERY (20s), SUBSCRIBERS (300),
# SUB_ROOMS (2), ROOMS (8), QUIET_ROOMS (2: storm messages only),
# PUBLISHERS (4), RATE (20 msg/s each), STORM (300 messages from each
# publisher), STORM_EVERY (30s), CHURNERS (40), OUT (a
# temporary directory unless set: logs, rss.tsv, faults.log, soak.out),
# SKIP_BUILD=1 (use the built binaries), WSGATE and BENCH (binaries; default
# $CARGO_TARGET_DIR or target/, release).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_TAG=soak
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

DURATION=${DURATION:-10m}
FAULT_EVERY=${FAULT_EVERY:-20s}
OUT=${OUT:-$(mktemp -d /tmp/wsgate-soak.XXXXXX)}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WSGATE=${WSGATE:-$TARGET/release/wsgate}
BENCH=${BENCH:-$TARGET/release/wsgate-bench}
SECRET="soak-$RANDOM$RANDOM"
mkdir -p "$OUT"

seconds() { # seconds 10m|90s|1h: a duration in whole seconds
    local v=$1
    case $v in
        *ms) echo 0 ;;
        *h) echo $((${v%h} * 3600)) ;;
        *m) echo $((${v%m} * 60)) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}
DUR_S=$(seconds "$DURATION")
EVERY_S=$(seconds "$FAULT_EVERY")
[[ $DUR_S -ge 30 ]] || die "DURATION must be at least 30s"
[[ $EVERY_S -ge 5 ]] || die "FAULT_EVERY must be at least 5s"

prepare_binaries

read -r -a PORTS <<<"$(free_ports 7)"
REDIS_PORT=${PORTS[0]}
REDIS_PID=""
NODE_PID=("" "" "" "")
TOOL_PID=""
SAMPLER_PID=""

stop_pid() { # stop_pid PID: SIGCONT (it may be frozen), SIGTERM, bounded wait, SIGKILL
    local pid=$1
    [[ -n $pid ]] || return 0
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    touch "$OUT/stop"
    stop_pid "$TOOL_PID"
    stop_pid "$SAMPLER_PID"
    local i
    for i in 1 2 3; do stop_pid "${NODE_PID[$i]}"; done
    stop_pid "$REDIS_PID"
}
trap cleanup EXIT

start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >>"$OUT/redis.log" 2>&1 &
    REDIS_PID=$!
    echo "$REDIS_PID" >"$OUT/redis.pid"
    wait_for "redis on $REDIS_PORT" redis-cli -p "$REDIS_PORT" ping
}

start_node() { # start_node I: node nI on its ports, waits until ready
    local i=$1
    local port=${PORTS[$((2 * i - 1))]} ops=${PORTS[$((2 * i))]}
    "$WSGATE" serve --listen "127.0.0.1:$port" --ops-listen "127.0.0.1:$ops" --node-id "n$i" \
        --jwt-secret "$SECRET" --redis-url "redis://127.0.0.1:$REDIS_PORT/" \
        --publish-rate 1000 --publish-burst 2000 --log warn >>"$OUT/node$i.log" 2>&1 &
    NODE_PID[i]=$!
    echo "${NODE_PID[$i]}" >"$OUT/n$i.pid"
    wait_for "node n$i ready" curl -sf "http://127.0.0.1:$ops/ready"
}

# RSS of every node and of Redis every 2 s: "seconds name pid kib" lines.
sample_rss() {
    local t0=$1 name pid kib
    for _ in $(seq $(((DUR_S + 600) / 2))); do
        [[ -e $OUT/stop ]] && break
        for name in n1 n2 n3 redis; do
            pid=$(cat "$OUT/$name.pid" 2>/dev/null || true)
            kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
            [[ -n $kib ]] && echo "$(($(date +%s) - t0)) $name $pid $kib"
        done
        sleep 2
    done >>"$OUT/rss.tsv"
}

fault() { # fault K: the K-th fault of the cycle
    local now=$(($(date +%s) - T0))
    case $(($1 % 3)) in
        0)
            log "t=${now}s fault: Redis SIGSTOP for 4 s"
            echo "$now redis-sigstop-4s" >>"$OUT/faults.log"
            kill -STOP "$REDIS_PID"
            sleep 4
            kill -CONT "$REDIS_PID"
            ;;
        1)
            log "t=${now}s fault: node n3 SIGKILL, restart in 2 s"
            echo "$now n3-sigkill-restart" >>"$OUT/faults.log"
            kill -9 "${NODE_PID[3]}"
            wait "${NODE_PID[3]}" 2>/dev/null || true
            sleep 2
            start_node 3
            ;;
        2)
            log "t=${now}s fault: Redis SIGKILL, restart empty in 2 s"
            echo "$now redis-sigkill-restart-empty" >>"$OUT/faults.log"
            kill -9 "$REDIS_PID"
            wait "$REDIS_PID" 2>/dev/null || true
            sleep 2
            start_redis
            ;;
    esac
}

log "output in $OUT"
start_redis
for i in 1 2 3; do start_node "$i"; done

TARGETS=()
for i in 1 2 3; do
    TARGETS+=(--url "ws://127.0.0.1:${PORTS[$((2 * i - 1))]}/ws" --ops-url "http://127.0.0.1:${PORTS[$((2 * i))]}")
done
T0=$(date +%s)
sample_rss "$T0" &
SAMPLER_PID=$!

log "wsgate-bench soak for $DURATION, a fault every $FAULT_EVERY"
"$BENCH" soak "${TARGETS[@]}" --jwt-secret "$SECRET" --duration "$DURATION" \
    -s "${SUBSCRIBERS:-300}" --sub-rooms "${SUB_ROOMS:-2}" --rooms "${ROOMS:-8}" \
    --quiet-rooms "${QUIET_ROOMS:-2}" -p "${PUBLISHERS:-4}" -r "${RATE:-20}" --storm "${STORM:-300}" --storm-every "${STORM_EVERY:-30s}" \
    -c "${CHURNERS:-40}" >"$OUT/soak.out" 2>"$OUT/soak.err" &
TOOL_PID=$!

# The tool needs a moment to connect its subscribers before the load (and
# the schedule) starts; faults during the set-up would only slow it.
calm=$((EVERY_S > DUR_S / 10 ? EVERY_S : DUR_S / 10))
k=0
while kill -0 "$TOOL_PID" 2>/dev/null; do
    for _ in $(seq "$EVERY_S"); do
        kill -0 "$TOOL_PID" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$TOOL_PID" 2>/dev/null || break
    [[ $(($(date +%s) - T0)) -lt $((DUR_S - calm)) ]] || break
    fault "$k"
    k=$((k + 1))
done
LOAD_END=$((T0 + DUR_S))
rc=0
wait "$TOOL_PID" || rc=$?
TOOL_PID=""
touch "$OUT/stop"
grep -v '^{' "$OUT/soak.out" || true
log "faults injected: $k (see $OUT/faults.log); tool exit $rc; progress lines in $OUT/soak.err"

touch "$OUT/faults.log"
python3 - "$OUT/rss.tsv" "$DUR_S" "$((LOAD_END - T0))" "$EVERY_S" "$OUT/faults.log" <<'EOF' || rc=1
import statistics, sys
path, dur, load_end, every = (sys.argv[1], *(int(a) for a in sys.argv[2:5]))
faults = []
with open(sys.argv[5], encoding="utf-8") as f:
    for line in f:
        parts = line.split()
        if len(parts) == 2:
            faults.append((int(parts[0]), parts[1]))
window = max(10, dur // 10)
# The start plateau comes after the first full cycle of faults: the first
# n3 kill moves its subscribers to n1 and n2 for good (more connections,
# more memory, no leak), so an earlier window would not be comparable.
start_from = min(max(20, dur // 5, 4 * every), load_end - 2 * window)
rows = []
with open(path, encoding="utf-8") as f:
    for line in f:
        parts = line.split()
        if len(parts) == 4:
            rows.append((int(parts[0]), parts[1], parts[2], int(parts[3])))
bad = False
print(f"RSS (median KiB; start plateau t={start_from}..{start_from + window}s, "
      f"end t={load_end - window}..{load_end}s of the load):")
for name in ("n1", "n2", "n3", "redis"):
    mine = [r for r in rows if r[1] == name]
    last_pid = mine[-1][2] if mine else None
    start = [r[3] for r in mine if start_from <= r[0] <= start_from + window]
    end = [r[3] for r in mine if load_end - window <= r[0] <= load_end]
    if not start or not end:
        print(f"  {name}: not enough samples")
        bad = bad or name in ("n1", "n2")
        continue
    s, e = statistics.median(start), statistics.median(end)
    change = (e - s) / s * 100
    pids = len({r[2] for r in mine})
    checked = name in ("n1", "n2")
    verdict = ("ok" if abs(change) <= 10 else "OFF BY MORE THAN 10 %") if checked else \
        f"not checked ({pids} processes: restarted by the faults)" if pids > 1 else "not checked"
    print(f"  {name}: start {s:,.0f} KiB, end {e:,.0f} KiB ({change:+.1f} %): {verdict}")
    if checked and abs(change) > 10:
        bad = True
# Where memory moved: n1 and n2 just before each fault and once it is over.
def around(name, lo, hi):
    v = [r[3] for r in rows if r[1] == name and lo <= r[0] < hi]
    return f"{statistics.median(v):,.0f}" if v else "?"
print("RSS of n1 / n2 (KiB) in the 10 s before each fault -> 10 to 20 s after it:")
for t, what in faults:
    print(f"  t={t}s {what}: " + ", ".join(
        f"{n} {around(n, t - 10, t)} -> {around(n, t + 10, t + 20)}" for n in ("n1", "n2")))
sys.exit(1 if bad else 0)
EOF
if [[ $rc -eq 0 ]]; then log "soak passed"; else log "soak FAILED"; fi
exit "$rc"
