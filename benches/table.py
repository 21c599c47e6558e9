#!/usr/bin/env python3
"""Turn the JSON lines benches/run.sh collected into issue 5's table.

Usage: benches/table.py OUT_DIR

Each figure is the median over the runs found (files SCENARIO.RUN.json, one
JSON line each, as printed by wsgate-bench or by run.sh for `idle`).
"""

import glob
import json
import os
import statistics
import sys


def load(out, scenario):
    runs = []
    for path in sorted(glob.glob(os.path.join(out, f"{scenario}.*.json"))):
        base = os.path.basename(path)
        # idle.1.json is the run's figure; idle.1.0.json, idle.1.1.json ... are the tools'.
        if base.count(".") != 2:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                line = f.read().strip().splitlines()[-1]
            runs.append(json.loads(line))
        except (OSError, IndexError, ValueError):
            continue
    return runs


def dig(obj, path):
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def median(runs, path):
    values = [v for v in (dig(r, path) for r in runs) if isinstance(v, (int, float))]
    return (statistics.median(values), len(values)) if values else (None, 0)


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def verdict(v, ok):
    if v is None:
        return "not measured"
    return "met" if ok(v) else "NOT met"


def kept_up(run):
    """Whether a fan-out run kept up with its rate: 95 % of the offered
    deliveries, and a median latency of at most 50 ms (5 message intervals at
    100 msg/s: a sender further behind has frames queued per socket and
    writes them together, which is cheaper per delivery)."""
    expected = run.get("expected_deliveries_per_s") or 0
    p50 = dig(run, "latency.p50_ms")
    return (run.get("deliveries_per_s") or 0) >= 0.95 * expected and p50 is not None and p50 <= 50


def lateness(runs):
    """Why a pair of (wsgate, floor) runs gives no valid ratio; empty when it does."""
    return "; ".join(
        f"{name} delivered {r.get('deliveries_per_s') or 0:,.0f}/s of {r.get('expected_deliveries_per_s') or 0:,.0f}/s, "
        f"p50 {dig(r, 'latency.p50_ms') or 0:,.0f} ms"
        for name, r in zip(("wsgate", "floor"), runs) if not kept_up(r))


def print_ratio(wsgate_path, floor_path):
    """One line: wsgate's server CPU per delivery over the floor's, valid or not."""
    runs = []
    for path in (wsgate_path, floor_path):
        with open(path, encoding="utf-8") as f:
            runs.append(json.loads(f.read().strip().splitlines()[-1]))
    w, f = (r.get("server_cpu_us_per_delivery") for r in runs)
    if w and f:
        late = lateness(runs)
        verdict = "valid" if not late else "NOT valid: " + late
        print(f"[bench] server CPU per delivery: wsgate {w:.2f} us, floor {f:.2f} us: {w / f:.2f}x the floor ({verdict})")
    return 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--ratio":
        return print_ratio(sys.argv[2], sys.argv[3])
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    rows = []

    idle = load(out, "idle")
    v, n = median(idle, "server_kib_per_connection")
    rows.append(("memory per idle connection (20,000 over two nodes)", "<= 3 KiB RSS",
                 f"{fmt(v, '.2f')} KiB", n, verdict(v, lambda x: x <= 3.0), ""))

    fan = load(out, "fanout")
    cpu, n = median(fan, "server_cpu_us_per_delivery")
    dps, _ = median(fan, "deliveries_per_s")
    busy, _ = median(fan, "usage.server_core_busy")
    tool, _ = median(fan, "usage.tool_core_busy")
    tool_us, _ = median(fan, "tool_cpu_us_per_delivery")
    note = (f"{fmt(dps, ',.0f')} deliveries/s, servers+Redis {fmt(busy and busy * 100, '.0f')} % of a core; "
            f"tool {fmt(tool and tool * 100, '.0f')} % ({fmt(tool_us, '.2f')} us/delivery)")
    rows.append(("server CPU per delivered message (1,000 subs, 2 nodes + Redis, 100 msg/s)", "<= 1.0 us",
                 f"{fmt(cpu, '.2f')} us", n, verdict(cpu, lambda x: x <= 1.0), note))
    p99, n = median(fan, "latency.p99_ms")
    rows.append(("p99 end-to-end latency in that fan-out", "<= 5 ms",
                 f"{fmt(p99, '.3f')} ms", n, verdict(p99, lambda x: x <= 5.0), note))

    rooms = load(out, "rooms")
    p99, n = median(rooms, "latency.p99_ms")
    dps, _ = median(rooms, "deliveries_per_s")
    tool, _ = median(rooms, "usage.tool_core_busy")
    rows.append(("chat shape: 2,000 connections in rooms of 10, 1 msg/s each: p99", "<= 0.5 ms",
                 f"{fmt(p99, '.3f')} ms", n, verdict(p99, lambda x: x <= 0.5),
                 f"{fmt(dps, ',.0f')} deliveries/s; tool {fmt(tool and tool * 100, '.0f')} %"))

    ramp = load(out, "ramp")
    best, n = median(ramp, "best_deliveries_per_s")
    busy, _ = median(ramp, "best.usage.server_core_busy")
    tool, _ = median(ramp, "best.usage.tool_core_busy")
    rows.append(("highest fan-out rate with p99 <= 50 ms and no loss", "tool's ceiling, server core <= 25 % busy",
                 f"{fmt(best, ',.0f')} deliveries/s", n,
                 verdict(busy, lambda x: x <= 0.25),
                 f"servers+Redis {fmt(busy and busy * 100, '.0f')} % of a core; tool {fmt(tool and tool * 100, '.0f')} %"))

    conn = load(out, "connect")
    hs, n = median(conn, "handshakes_per_s")
    tool, _ = median(conn, "usage.tool_core_busy")
    rows.append(("handshakes/s (HS256 JWT, Origin check, welcome)", ">= 15,000",
                 f"{fmt(hs, ',.0f')}/s", n, verdict(hs, lambda x: x >= 15000),
                 f"tool {fmt(tool and tool * 100, '.0f')} %"))

    for name, label in (("reconnect", "recovery load"), ("reconnect-overload", "OVERLOAD")):
        rec = load(out, name)
        t, n = median(rec, "all_resumed_s")
        lost, _ = median(rec, "lost")
        lag, _ = median(rec, "lagging")
        dup, _ = median(rec, "seq.duplicated")
        aff, _ = median(rec, "affected")
        behind, _ = median(rec, "drain.at_start.max")
        catch, _ = median(rec, "drain.took_s")
        p99, _ = median(rec, "latency.p99_ms")
        ok = None if t is None else (t <= 5.0 and lost == 0 and dup == 0 and not lag)
        rows.append((f"reconnect ({label}): clients of a killed node resumed on the others",
                     "<= 5 s, 0 lost, 0 duplicated",
                     f"{fmt(t, '.2f')} s, {fmt(lost, '.0f')} lost, {fmt(dup, '.0f')} duplicated", n,
                     "not measured" if ok is None else ("met" if ok else "NOT met"),
                     f"{fmt(aff, ',.0f')} clients on the killed node; lag at the stop up to "
                     f"{fmt(behind, ',.0f')} messages, caught up in {fmt(catch, '.1f')} s "
                     f"({fmt(lag, '.0f')} still lagging); delivery p99 {fmt(p99, '.0f')} ms"))

    print("| figure | target | measured (median) | runs | verdict | notes |")
    print("|---|---|---|---|---|---|")
    for figure, target, measured, runs, verdict_text, notes in rows:
        print(f"| {figure} | {target} | {measured} | {runs} | {verdict_text} | {notes} |")
    issue_10_15(out)
    issue_11_12(out)
    return 0


def values(runs, path, spec):
    """Every run's value, in run order, formatted."""
    return ", ".join(fmt(dig(r, path), spec) for r in runs if isinstance(dig(r, path), (int, float)))


def add_row(rows, out, figure, target, name, path, spec, unit):
    """Append a row of every run's value and their median; the median, or None without runs."""
    runs = load(out, name)
    if not runs:
        return None
    v, n = median(runs, path)
    rows.append((figure, target, f"{values(runs, path, spec)}: **{fmt(v, spec)}{unit}**", n))
    return v


def print_rows(title, rows):
    """A markdown table of (figure, target, measured, runs) rows, when there are any."""
    if not rows:
        return
    print()
    print(f"| {title} | target | runs: median | runs |")
    print("|---|---|---|---|")
    for figure, target, measured, n in rows:
        print(f"| {figure} | {target} | {measured} | {n} |")


def issue_10_15(out):
    """The issue 10/15 table (ONLY=issue10-15), when any of its runs exist."""
    rows = []

    def add(figure, target, name, path, spec, unit):
        return add_row(rows, out, figure, target, name, path, spec, unit)

    add("memory per idle connection, 20,000 over two nodes", "<= 2.5 KiB",
        "idle", "server_kib_per_connection", ".2f", " KiB")
    add("the same with permessage-deflate offered", "within 0.2 KiB of plain",
        "idle-deflate", "server_kib_per_connection", ".2f", " KiB")
    for rate in (100, 500):
        w = add(f"server CPU per delivery, 1,000 subscribers over two nodes + Redis, {rate} msg/s",
                "", f"fanout-r{rate}", "server_cpu_us_per_delivery", ".2f", " us")
        f = add(f"floor server CPU per delivery, same load", "", f"floor-r{rate}",
                "server_cpu_us_per_delivery", ".2f", " us")
        ratios, invalid = [], 0
        for a, b in zip(load(out, f"fanout-r{rate}"), load(out, f"floor-r{rate}")):
            x, y = dig(a, "server_cpu_us_per_delivery"), dig(b, "server_cpu_us_per_delivery")
            if x and y:
                if lateness([a, b]):
                    invalid += 1
                else:
                    ratios.append(x / y)
        if ratios or invalid:
            measured = (", ".join(f"{r:.2f}" for r in ratios) + f": **{statistics.median(ratios):.2f}x**"
                        if ratios else "no valid run")
            if invalid:
                measured += f" ({invalid} run(s) left out: wsgate or the floor did not keep up with the rate)"
            rows.append((f"ratio to the floor at {rate} msg/s",
                         "<= 1.25x" if rate == 100 else "no worse than before", measured, len(ratios)))
        elif w is not None and f is not None:
            rows.append((f"ratio to the floor at {rate} msg/s", "", f"{w / f:.2f}x (of medians)", 1))
    add("fan-out p99 at 100 msg/s", "no worse than before", "fanout-r100", "latency.p99_ms", ".2f", " ms")
    add("chat shape p99 (2,000 connections in rooms of 10)", "<= 0.5 ms", "rooms", "latency.p99_ms", ".2f", " ms")
    plain = add("bytes on the wire per delivery, ~2 KiB dashboard payload, plain", "",
                "wire-plain", "wire_bytes_per_delivery", ".0f", " B")
    comp = add("the same with permessage-deflate offered", "at least 3x smaller",
               "wire-deflate", "wire_bytes_per_delivery", ".0f", " B")
    negotiated, _ = median(load(out, "wire-deflate"), "deflate_negotiated")
    if plain and comp:
        rows.append(("plain / deflate bytes", ">= 3x", f"**{plain / comp:.2f}x** (deflate negotiated on "
                     f"{fmt(negotiated, '.0f')} connections)", 1))
    add("server CPU per delivery, 2 KiB payload, plain", "", "wire-plain", "server_cpu_us_per_delivery", ".2f", " us")
    add("server CPU per delivery, 2 KiB payload, deflate offered", "within 15 % of plain",
        "wire-deflate", "server_cpu_us_per_delivery", ".2f", " us")
    print_rows("figure (issue 10 / 15)", rows)


def issue_11_12(out):
    """The presence (issue 11) and SSE (issue 12) figures, when any of their runs exist."""
    rows = []

    def add(figure, target, name, path, spec, unit):
        return add_row(rows, out, figure, target, name, path, spec, unit)

    users = add("memory per idle connection, 20,000 over two nodes, each its own user, rooms of ~100, "
                "no presence events", "", "idle-users", "server_kib_per_connection", ".2f", " KiB")
    pres = add("the same, every member joined with \"presence\":true", "within 0.2 KiB",
               "idle-presence", "server_kib_per_connection", ".2f", " KiB")
    if users is not None and pres is not None:
        rows.append(("presence - no presence", "<= 0.2 KiB", f"**{pres - users:+.2f} KiB**", 1))
    add("reconnect storm, one room (this run)", "<= 5 s", "reconnect", "all_resumed_s", ".2f", " s")
    add("reconnect storm, rooms of ~100, each client its own user, no presence events (this run)", "<= 5 s",
        "reconnect-rooms", "all_resumed_s", ".2f", " s")
    t = add("reconnect storm into presence-enabled rooms: all resumed", "<= 5 s",
            "reconnect-presence", "all_resumed_s", ".2f", " s")
    if t is not None:
        runs = load(out, "reconnect-presence")
        for path, what in (("lost", "lost"), ("seq.duplicated", "duplicated"),
                           ("presence.answers", "presence answers"), ("presence.wrong", "presence answers wrong"),
                           ("presence.failed", "presence queries failed"),
                           ("presence.expected_users", "users expected present"),
                           ("presence.answered_users", "users answered present (first node)")):
            rows.append((f"... {what}", "0" if "wrong" in what or "failed" in what or what in ("lost", "duplicated") else "",
                         values(runs, path, ".0f"), len(runs)))
    ws = add("memory per idle connection, WebSocket (this run)", "", "idle", "server_kib_per_connection", ".2f", " KiB")
    sse = add("memory per idle connection, SSE", "within 0.5 KiB of WebSocket", "idle-sse",
              "server_kib_per_connection", ".2f", " KiB")
    if ws is not None and sse is not None:
        rows.append(("SSE - WebSocket, idle", "<= 0.5 KiB", f"**{sse - ws:+.2f} KiB**", 1))
    ws = add("server CPU per delivery, WebSocket subscribers (this run)", "", "fanout",
             "server_cpu_us_per_delivery", ".2f", " us")
    sse = add("server CPU per delivery, SSE subscribers", "within 20 % of WebSocket", "fanout-sse",
              "server_cpu_us_per_delivery", ".2f", " us")
    if ws and sse:
        rows.append(("SSE / WebSocket, fan-out CPU per delivery", "<= 1.20x", f"**{sse / ws:.2f}x**", 1))
    print_rows("figure (issue 11 / 12)", rows)


if __name__ == "__main__":
    sys.exit(main())
