#!/usr/bin/env bash
# Reproduce the benchmark table of issue 5 on this machine.
#
# Starts a private redis-server and wsgate nodes from target/release, pins
# them (and Redis) to one CPU and the load tool to another with taskset,
# runs every scenario RUNS times (default 3) on fresh servers, and prints a
# markdown table of the medians. Raw JSON lines stay in $OUT (a temporary
# directory unless set); nothing is written into the repository.
#
#   benches/run.sh                       # the whole table (about 10 minutes)
#   ONLY=fanout,rooms RUNS=1 benches/run.sh
#   ONLY=issue10-15 RUNS=2 benches/run.sh  # the issue 10/15 before-and-after table (~9 min)
#   ONLY=presence RUNS=1 benches/run.sh    # issue 11: idle with and without presence, the storms (~7 min)
#   ONLY=sse RUNS=2 benches/run.sh         # issue 12: idle and fan-out, WebSocket and SSE (~6 min)
#
# Environment: RUNS, ONLY (comma list of: connect idle fanout rooms ramp
# reconnect reconnect-overload, and the extras single cross scale floor rooms-floor wire
# idle-deflate idle-users idle-presence reconnect-rooms reconnect-presence,
# which are not in the default list; issue10-15 stands for
# idle,idle-deflate,floor,rooms,wire, presence for idle-users,idle-presence,
# reconnect,reconnect-rooms,reconnect-presence; sse for idle,idle-sse,fanout,
# fanout-sse: WebSocket and SSE in the same run), PRESENCE_ROOMS
# (default 200 for idle, 150 for reconnect: about 100 users per room, since
# presence events cost members x joins per room), FLOOR_RATES (default "100 500": the
# rates `floor` measures the floor server and wsgate's fan-out at),
# PAYLOAD_BYTES (default 2048: the dashboard payload of `wire`),
# RECONNECT_RATE (default 5 msg/s: recovery), CHAT_RATE (default 1: msg/s each
# chat member publishes in rooms and rooms-floor),
# OVERLOAD_RATE (default 100 msg/s: the overload case), KEYS=1 (every
# fanout/rooms publish carries an idempotency key: its cost), OUT, SERVER_CPU (default 0), TOOL_CPU (default 1),
# SKIP_BUILD=1 (use the binaries already in target/release), QUICK=1 (a
# tenth of the load and short phases: checks the script, not the figures).
# Everything listens on 127.0.0.1 on free ports; nothing else is touched.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-3}
ONLY=${ONLY:-connect,idle,fanout,rooms,ramp,reconnect,reconnect-overload}
ONLY=${ONLY//issue10-15/idle,idle-deflate,floor,rooms,wire}
ONLY=",$ONLY,"
ONLY=${ONLY//,sse,/,idle,idle-sse,fanout,fanout-sse,}
ONLY=${ONLY//,presence,/,idle-users,idle-presence,reconnect,reconnect-rooms,reconnect-presence,}
ONLY=${ONLY#,}
ONLY=${ONLY%,}
FLOOR_RATES=${FLOOR_RATES:-100 500}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-2048}
RECONNECT_RATE=${RECONNECT_RATE:-5}
CHAT_RATE=${CHAT_RATE:-1}
OVERLOAD_RATE=${OVERLOAD_RATE:-100}
SERVER_CPU=${SERVER_CPU:-0}
TOOL_CPU=${TOOL_CPU:-1}
OUT=${OUT:-$(mktemp -d /tmp/wsgate-bench.XXXXXX)}
SECRET="bench-$RANDOM$RANDOM"
WSGATE="${CARGO_TARGET_DIR:-$ROOT/target}/release/wsgate"
BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/wsgate-bench"
mkdir -p "$OUT"

# The table's sizes; QUICK=1 shrinks them to check the script itself.
# Each can also be set in the environment (for example N_IDLE=500 for the
# 1,000-connection point of the scale table).
if [[ "${QUICK:-0}" == 1 ]]; then
    : "${N_CONNECT:=1000}" "${N_IDLE:=1000}" "${N_SUBS:=100}" "${N_ROOMS:=200}" "${N_CLIENTS:=1500}"
    : "${D:=2s}" "${WARMUP:=1s}" "${STEP:=1s}" "${HOLD:=4s}" "${BEFORE:=1s}"
else
    : "${N_CONNECT:=10000}" "${N_IDLE:=10000}" "${N_SUBS:=1000}" "${N_ROOMS:=2000}" "${N_CLIENTS:=15000}"
    : "${D:=10s}" "${WARMUP:=3s}" "${STEP:=5s}" "${HOLD:=20s}" "${BEFORE:=5s}"
fi

LOG_TAG=bench
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

prepare_binaries

# Pinning: servers and Redis on SERVER_CPU, the load tool on TOOL_CPU.
if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
    PIN_SERVER=(taskset -c "$SERVER_CPU")
    PIN_TOOL=(taskset -c "$TOOL_CPU")
else
    log "warning: no taskset or fewer than 2 CPUs: not pinning"
    PIN_SERVER=()
    PIN_TOOL=()
fi

PIDS=()
REDIS_PID=""
NODE_PIDS=()
NODE_PORTS=()
OPS_PORTS=()

stop_servers() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded wait: 100 x 0.1 s, then SIGKILL.
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    REDIS_PID=""
    NODE_PIDS=()
    NODE_PORTS=()
    OPS_PORTS=()
}
trap stop_servers EXIT

# start_servers N [memory]: a fresh redis-server and N nodes (n1..nN) on
# free ports; with "memory", one node on the in-process broker, no Redis.
start_servers() {
    local n=$1 broker=${2:-redis} ports i
    read -r -a ports <<<"$(free_ports $((1 + 2 * n)))"
    local redis_port=${ports[0]} relay=()
    if [[ $broker == memory ]]; then
        n=1
    else
        relay=(--redis-url "redis://127.0.0.1:$redis_port/")
        "${PIN_SERVER[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
            >"$OUT/redis.log" 2>&1 &
        REDIS_PID=$!
        PIDS+=("$REDIS_PID")
        wait_for "redis on $redis_port" redis-cli -p "$redis_port" ping
    fi
    for ((i = 1; i <= n; i++)); do
        local port=${ports[$((2 * i - 1))]} ops=${ports[$((2 * i))]}
        "${PIN_SERVER[@]}" "$WSGATE" serve --listen "127.0.0.1:$port" --ops-listen "127.0.0.1:$ops" \
            --node-id "n$i" --jwt-secret "$SECRET" "${relay[@]}" \
            --publish-rate 1000000 --publish-burst 1000000 --max-connections 100000 \
            --log warn >"$OUT/node$i.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        NODE_PIDS+=("$pid")
        NODE_PORTS+=("$port")
        OPS_PORTS+=("$ops")
        wait_for "node n$i ready" curl -sf "http://127.0.0.1:$ops/ready"
    done
}

# Flags naming every node (URLs, ops URLs) and every server process (--pid).
target_flags() {
    local i flags=()
    for i in "${!NODE_PORTS[@]}"; do
        flags+=(--url "ws://127.0.0.1:${NODE_PORTS[$i]}/ws" --ops-url "http://127.0.0.1:${OPS_PORTS[$i]}")
        flags+=(--pid "${NODE_PIDS[$i]}")
    done
    [[ -n $REDIS_PID ]] && flags+=(--pid "$REDIS_PID")
    flags+=(--jwt-secret "$SECRET")
    printf '%s\n' "${flags[@]}"
}

bench() { # bench NAME RUN [SCENARIO] ARGS...: run the tool pinned, keep its JSON line
    local name=$1 run=$2 scenario=$1
    shift 2
    case ${1:-} in connect | idle | fanout | rooms | ramp | reconnect) scenario=$1; shift ;; esac
    local flags
    mapfile -t flags < <(target_flags)
    # --only-node I: subscribers on node I only; --publisher-node J: publish on node J.
    if [[ ${1:-} == --only-node ]]; then
        local only=$2 publisher=$4
        shift 4
        local kept=() i=0
        while ((i < ${#flags[@]})); do
            if [[ ${flags[$i]} == --url ]]; then
                [[ ${flags[$((i + 1))]} == "ws://127.0.0.1:${NODE_PORTS[$((only - 1))]}/ws" ]] && kept+=(--url "${flags[$((i + 1))]}")
                i=$((i + 2))
            else
                kept+=("${flags[$i]}")
                i=$((i + 1))
            fi
        done
        flags=("${kept[@]}" --publisher-url "ws://127.0.0.1:${NODE_PORTS[$((publisher - 1))]}/ws")
    fi
    log "$name run $run: wsgate-bench $scenario $*"
    local rc=0
    "${PIN_TOOL[@]}" "$BENCH" "$scenario" "${flags[@]}" "$@" >"$OUT/$name.$run.out" 2>"$OUT/$name.$run.err" || rc=$?
    tail -n 1 "$OUT/$name.$run.out" >"$OUT/$name.$run.json"
    grep -v '^{' "$OUT/$name.$run.out" >&2 || true
    [[ $rc -eq 0 ]] || log "warning: $name run $run exited $rc (see $OUT/$name.$run.*)"
}

wants() { [[ ",$ONLY," == *",$1,"* ]]; }

# run_idle NAME RUN [TOOL FLAGS...]: 20,000 connections joined to a room,
# over two nodes. One process may open 20,000 files here, so one tool
# process per node, 10,000 each; the server memory is measured by this
# script from /proc before and after. IDLE_NODES=3 N_IDLE=16667 gives the
# 50,000-connection point.
run_idle() {
    local name=$1 run=$2
    shift 2
    local local_nodes=${IDLE_NODES:-2} flags tools=() t before after held want
    start_servers "$local_nodes"
    mapfile -t flags < <(target_flags)
    before=$(rss)
    log "$name run $run: $local_nodes x wsgate-bench idle -n $N_IDLE --hold $HOLD $*"
    for ((t = 0; t < local_nodes; t++)); do
        # Each process its own user ids (they matter with --distinct-users).
        "${PIN_TOOL[@]}" "$BENCH" idle "${flags[@]}" -n "$N_IDLE" --hold "$HOLD" --json "$@" \
            --user-prefix "bench-idle-$t" --source-ips "127.0.0.$((2 * t + 2)),127.0.0.$((2 * t + 3))" \
            >"$OUT/$name.$run.$t.json" 2>"$OUT/$name.$run.$t.err" &
        tools+=($!)
    done
    want=$((local_nodes * N_IDLE))
    # Poll (at most 90 s) until the tools hold all their connections.
    for _ in $(seq 900); do [[ $(active) -ge $want ]] && break; sleep 0.1; done
    held=$(active)
    sleep 3 # let the allocator settle before reading RSS (not synchronization)
    after=$(rss)
    for t in "${!tools[@]}"; do
        wait "${tools[$t]}" || log "warning: idle tool $t failed (see $OUT/$name.$run.$t.*)"
    done
    python3 - "$name" "$before" "$after" "$held" "$want" >"$OUT/$name.$run.json" <<'EOF'
import json, sys
name = sys.argv[1]
before, after, held, want = (int(x) for x in sys.argv[2:])
print(json.dumps({"scenario": name, "ok": held >= want, "held": held,
                  "server_kib_before": before, "server_kib_after": after,
                  "server_kib_per_connection": (after - before) / max(held, 1)}))
EOF
    log "$name run $run: $held connections, $(((after - before) * 1024 / (held > 0 ? held : 1))) bytes each"
    stop_servers
}

rss() { local t=0 p; for p in "${NODE_PIDS[@]}"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }
# Connections the nodes hold, every transport (the series has a transport label since SSE).
active() { local t=0 o v; for o in "${OPS_PORTS[@]}"; do v=$(curl -sf "http://127.0.0.1:$o/metrics" | awk '/^wsgate_connections_active[ {]/ {s += $2} END {printf "%d", s}' || true); t=$((t + ${v:-0})); done; echo "$t"; }

# floor NAME RUN SCENARIO ARGS...: the floor server (wsgate-bench
# floor-server, pinned like the nodes) under the same load tool scenario as
# wsgate's (fanout: N_SUBS subscribers, one publisher; rooms: the chat
# shape); its CPU is read from /proc like the nodes'.
floor() {
    local name=$1 run=$2 scenario=$3 port pid rc=0
    shift 3
    "${PIN_SERVER[@]}" "$BENCH" floor-server --listen 127.0.0.1:0 >"$OUT/$name.$run.server" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_for "floor server" grep -q '^listening ' "$OUT/$name.$run.server"
    port=$(awk '/^listening / {n = split($2, a, ":"); print a[n]}' "$OUT/$name.$run.server")
    log "$name run $run: wsgate-bench $scenario against the floor server, $*"
    "${PIN_TOOL[@]}" "$BENCH" "$scenario" --url "ws://127.0.0.1:$port/ws" --pid "$pid" --jwt-secret "$SECRET" \
        "$@" -d "$D" --warmup "$WARMUP" >"$OUT/$name.$run.out" 2>"$OUT/$name.$run.err" || rc=$?
    tail -n 1 "$OUT/$name.$run.out" >"$OUT/$name.$run.json"
    grep -v '^{' "$OUT/$name.$run.out" >&2 || true
    [[ $rc -eq 0 ]] || log "warning: $name run $run exited $rc (see $OUT/$name.$run.*)"
    stop_servers
}

# ratio WSGATE FLOOR RUN: print wsgate's server CPU per delivery over the
# floor's, and whether it means anything: both must have kept up with the
# offered rate (95 % of the deliveries, p50 at most 50 ms; a sender that
# falls behind writes several frames to a socket at once, which is cheaper
# per delivery, so a ratio against a run that did not keep up is not valid).
ratio() {
    python3 "$ROOT/benches/table.py" --ratio "$OUT/$1.$3.json" "$OUT/$2.$3.json" >&2 || true
}


for ((run = 1; run <= RUNS; run++)); do
    if wants connect; then
        # HS256 JWT + Origin check + welcome; connections held until all are open.
        start_servers 2
        bench connect "$run" -n "$N_CONNECT" --concurrency 64 --origin http://127.0.0.1:8080 \
            --source-ips 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
        stop_servers
    fi

    if wants idle; then
        run_idle idle "$run"
    fi

    if wants idle-deflate; then
        # The same with permessage-deflate offered (and negotiated once the
        # server supports it): what the extension costs an idle connection.
        run_idle idle-deflate "$run" --deflate
    fi

    if wants idle-users; then
        # Issue 11's baseline: the same 20,000 connections, each its own user,
        # in rooms of about 100 users; presence tracked (it always is), no
        # presence events asked for.
        run_idle idle-users "$run" --rooms "${PRESENCE_ROOMS:-200}" --distinct-users
    fi

    if wants idle-presence; then
        # The same, every member joined with "presence":true: what presence
        # events cost an idle connection (target: within 0.2 KiB).
        run_idle idle-presence "$run" --rooms "${PRESENCE_ROOMS:-200}" --presence
    fi

    if wants idle-sse; then
        # Issue 12: the same 20,000 idle members over SSE (GET /sse, join by POST).
        run_idle idle-sse "$run" --transport sse
    fi

    if wants fanout; then
        # 1,000 subscribers over two nodes (half on the publisher's node), 100 msg/s.
        start_servers 2
        bench fanout "$run" -s "$N_SUBS" -p 1 -r 100 -d "$D" --warmup "$WARMUP" ${KEYS:+--keys}
        stop_servers
    fi

    if wants fanout-sse; then
        # Issue 12: the same fan-out with the subscribers on SSE (the publisher on WebSocket).
        start_servers 2
        bench fanout-sse "$run" fanout -s "$N_SUBS" -p 1 -r 100 -d "$D" --warmup "$WARMUP" --transport sse
        stop_servers
    fi

    if wants rooms; then
        # The chat shape: 2,000 connections in rooms of 10, each publishing 1 msg/s.
        start_servers 2
        bench rooms "$run" -n "$N_ROOMS" -k 10 -r "$CHAT_RATE" -d "$D" --warmup "$WARMUP" ${KEYS:+--keys}
        stop_servers
    fi

    if wants rooms-floor; then
        # The chat shape against the floor server (one process, no broker,
        # one write() per delivery) and against one node on the in-process
        # broker, in the same run as the two nodes + Redis of `rooms`: what
        # of the chat p99 is this machine's, what the Redis hop's.
        floor rooms-floor "$run" rooms -n "$N_ROOMS" -k 10 -r "$CHAT_RATE"
        start_servers 1 memory
        bench rooms-single "$run" rooms -n "$N_ROOMS" -k 10 -r "$CHAT_RATE" -d "$D" --warmup "$WARMUP"
        stop_servers
    fi

    if wants ramp; then
        # Fan-out to 1,000 subscribers, rate x1.2 per 5 s step until p99 > 50 ms or a loss.
        start_servers 2
        bench ramp "$run" -s "$N_SUBS" -p 1 --start-rate 50 --factor 1.2 --step "$STEP" --max-steps 30 \
            --max-rate 2000 --p99-limit 50ms
        stop_servers
    fi

    if wants floor; then
        # wsgate's fan-out (two nodes + Redis) and the floor, in the same run
        # and pinning, at each of FLOOR_RATES: the ratio is issue 10's target.
        for rate in $FLOOR_RATES; do
            floor "floor-r$rate" "$run" fanout -s "$N_SUBS" -p 1 -r "$rate"
            start_servers 2
            bench "fanout-r$rate" "$run" fanout -s "$N_SUBS" -p 1 -r "$rate" -d "$D" --warmup "$WARMUP"
            stop_servers
            ratio "fanout-r$rate" "floor-r$rate" "$run"
        done
    fi

    if wants wire; then
        # A ~2 KiB dashboard JSON payload to 1,000 subscribers at 100 msg/s,
        # plain and with permessage-deflate offered: bytes on the wire and
        # server CPU per delivery (issue 15).
        start_servers 2
        bench wire-plain "$run" fanout -s "$N_SUBS" -p 1 -r 100 -d "$D" --warmup "$WARMUP" --payload-bytes "$PAYLOAD_BYTES"
        stop_servers
        start_servers 2
        bench wire-deflate "$run" fanout -s "$N_SUBS" -p 1 -r 100 -d "$D" --warmup "$WARMUP" --payload-bytes "$PAYLOAD_BYTES" --deflate
        stop_servers
    fi

    if wants single; then
        # Extra (not in the table): one node on the in-process broker, 1,000 subscribers.
        start_servers 1 memory
        bench single "$run" fanout -s "$N_SUBS" -p 1 -r 100 -d "$D" --warmup "$WARMUP"
        stop_servers
    fi

    if wants cross; then
        # Extra: every subscriber on n2, the publisher on n1, so each message
        # crosses Redis before any delivery (the relay's own figure).
        start_servers 2
        bench cross "$run" fanout --only-node 2 --publisher-node 1 -s "$N_SUBS" -p 1 -r 100 -d "$D" --warmup "$WARMUP"
        stop_servers
    fi

    if wants scale; then
        # Extra: the same fan-out on 1, 2 and 3 nodes, and at 100 and 500 msg/s.
        for nodes in 1 2 3; do
            for rate in 100 500; do
                start_servers "$nodes"
                bench "scale-n$nodes-r$rate" "$run" fanout -s "$N_SUBS" -p 1 -r "$rate" -d "$D" --warmup "$WARMUP"
                stop_servers
            done
        done
    fi

    if wants reconnect; then
        # Recovery: 15,000 clients, 10,000 of them on n1, which is killed while
        # $RECONNECT_RATE msg/s flow (75,000 deliveries/s: well below what the
        # servers' core delivers, so the figure is the resume, not a backlog).
        # The drain waits until every client has every acked message (or the
        # servers are idle for 5 s: then what is missing is lost).
        start_servers 3
        bench reconnect "$run" -c "$N_CLIENTS" --first-share 0.6667 -r "$RECONNECT_RATE" --kill-pid "${NODE_PIDS[0]}" \
            --before "$BEFORE" --after 3s --resume-timeout 30s --drain 120s --idle 5s \
            --source-ips 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
        stop_servers
    fi

    # Issue 11: the storm into rooms of about 100, each client its own user
    # (the same 15,000 clients, 10,000 on the killed n1; one publisher per
    # room at $RECONNECT_RATE msg/s: the same 75,000 deliveries/s), without
    # (reconnect-rooms) and with (reconnect-presence) "presence":true on
    # every join. Presence is tracked either way: after the nodes'
    # --presence-ttl (15 s) + 5 s + 2 s, every room's presence on n2 and n3
    # must list exactly the users connected in it.
    for variant in reconnect-rooms:--distinct-users reconnect-presence:--presence; do
        wants "${variant%%:*}" || continue
        start_servers 3
        bench "${variant%%:*}" "$run" reconnect -c "$N_CLIENTS" --rooms "${PRESENCE_ROOMS:-150}" "${variant#*:}" \
            --first-share 0.6667 -r "$RECONNECT_RATE" --kill-pid "${NODE_PIDS[0]}" \
            --before "$BEFORE" --after 3s --resume-timeout 30s --drain 120s --idle 5s --presence-settle 22s \
            --source-ips 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
        stop_servers
    done

    if wants reconnect-overload; then
        # Overload, reported beside it: the same fault at $OVERLOAD_RATE msg/s
        # (1.5M deliveries/s offered to one core). Clients fall seconds behind;
        # the run tells how far (lag at the stop, catch-up time) and whether
        # anything was lost once they caught up.
        start_servers 3
        bench reconnect-overload "$run" reconnect -c "$N_CLIENTS" --first-share 0.6667 -r "$OVERLOAD_RATE" \
            --kill-pid "${NODE_PIDS[0]}" --before "$BEFORE" --after 3s --resume-timeout 60s --drain 300s --idle 5s \
            --source-ips 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
        stop_servers
    fi
done

log "raw results in $OUT"
python3 "$ROOT/benches/table.py" "$OUT"
