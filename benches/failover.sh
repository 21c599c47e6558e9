#!/usr/bin/env bash
# The failover figures of docs/benchmarks.md ("Failover", issue 14).
#
# Runs FAILOVERS (default 10) Redis Sentinel failovers under load: a
# primary, a replica and three Sentinels (down-after 1 s), two wsgate nodes
# following them with redis+sentinel://, 4 publishers (one publish every
# 20 ms each, with an idempotency key) and 4 members in each of 8 rooms,
# spread over both nodes. Each failover SIGKILLs the primary; a probe
# publishes every 50 ms until a publish is acknowledged again; the old
# primary then comes back as the new primary's replica for the next round.
#
# Prints one JSON line per failover (kill_to_accepted_ms) and a summary:
# acked and delivered counts (a delivery is one message to one member),
# (room, epoch, seq) conflicts, seq gaps within an epoch and acked
# messages a member never got with no new epoch announced to it after the
# ack ("lost without notice"): these three must be 0, and the run exits
# non-zero otherwise. Also: acked messages a member never got but was told
# of by a later new epoch, per failover with the oldest such ack's age at
# the kill. Publishers stop first; members get 2 s to drain.
#
#   benches/failover.sh
#   FAILOVERS=3 benches/failover.sh
#   PROFILE=release benches/failover.sh    # optimized build (longer build)
#
# The harness is the ignored test `failover_figures` in
# crates/gateway/tests/failover.rs (real redis-server and Sentinel
# processes on free loopback ports, wsgate nodes as child processes). The figures
# are dominated by Sentinel's failure detection and promotion, not by CPU,
# so the default debug build measures the same thing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FAILOVERS=${FAILOVERS:-10}
PROFILE=${PROFILE:-dev}

command -v redis-server >/dev/null || {
    echo "failover.sh: redis-server is not installed (apt-get install -y --no-install-recommends redis-server redis-sentinel)" >&2
    exit 1
}

cd "$ROOT"
export FAILOVERS
exec cargo test --profile "$PROFILE" -p wsgate --test failover failover_figures \
    -- --ignored --nocapture --test-threads 1
