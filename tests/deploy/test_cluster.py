"""Three real wsgate nodes and one Redis behind the real nginx running the
repo's nginx/nginx.conf (only the upstream addresses and the listen port
substituted, see harness.render_nginx_conf)."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import uuid

import pytest

from conftest import ALLOWED_ORIGIN, Cluster
from harness import REPO, WsClient, free_port, http_get, http_post, wait_for

# Client source addresses: 127.0.0.1 is the default; the others are bound
# explicitly on the client socket (all of 127.0.0.0/8 is loopback on Linux).
SOURCES = [f"127.0.0.{i}" for i in range(2, 26)]


def node_of(cluster: Cluster, source: str) -> str:
    """The node nginx picks for a client from `source` (one probe connection)."""
    c = cluster.client(f"probe-{source}", source=source)
    c.close()
    return c.node


@pytest.fixture(scope="module")
def placement(cluster) -> dict[str, str]:
    """Source address -> node, as nginx routes them."""
    return {src: node_of(cluster, src) for src in SOURCES}


def test_same_source_address_keeps_its_node(cluster, placement):
    for src in ["127.0.0.1", SOURCES[0], SOURCES[7]]:
        nodes = {node_of(cluster, src) for _ in range(5)}
        assert len(nodes) == 1, f"connections from {src} landed on {nodes}"
        if src in placement:
            assert nodes == {placement[src]}


def test_different_source_addresses_spread_over_nodes(cluster, placement):
    used = set(placement.values())
    assert used <= cluster.node_ids()
    assert len(used) > 1, f"all {len(placement)} source addresses went to {used}"


def pick_sources_on_distinct_nodes(placement) -> tuple[str, str]:
    by_node: dict[str, str] = {}
    for src, node in placement.items():
        by_node.setdefault(node, src)
    assert len(by_node) >= 2
    a, b = list(by_node.values())[:2]
    return a, b


def test_message_crosses_nodes_through_nginx(cluster, placement):
    room = "xnode-" + uuid.uuid4().hex[:8]
    src_a, src_b = pick_sources_on_distinct_nodes(placement)
    alice = cluster.client("alice", source=src_a)
    bob = cluster.client("bob", source=src_b)
    assert alice.node != bob.node
    alice.join(room)
    ack = bob.publish(room, {"text": "hello from " + bob.node}, "m1")
    alice.wait_seq(room, ack["seq"])
    (msg,) = [m for m in alice.messages[room] if m["seq"] == ack["seq"]]
    assert msg["from"] == "bob"
    assert msg["data"] == {"text": "hello from " + bob.node}


def test_http_publish_api_through_nginx(cluster, placement):
    room = "api-" + uuid.uuid4().hex[:8]
    member = cluster.client("carol", source=SOURCES[3])
    member.join(room)
    status, body = http_post(f"{cluster.nginx_http}/api/rooms/{room}/messages", json.dumps({"n": 1}).encode(),
                             {"Authorization": f"Bearer {cluster.token('backend')}",
                              "Content-Type": "application/json"})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["room"] == room
    member.wait_seq(room, reply["seq"])
    assert member.messages[room][-1]["from"] == "backend"


def test_origin_passes_through_nginx(cluster):
    ok = WsClient(cluster.nginx_ws, cluster.token("dora"), origin=ALLOWED_ORIGIN)
    ok.close()
    with pytest.raises(Exception) as exc:
        WsClient(cluster.nginx_ws, cluster.token("eve"), origin="http://evil.example")
    assert "403" in str(exc.value)


def test_gateway_logs_the_client_address_forwarded_by_nginx(cluster):
    """nginx's X-Forwarded-For reaches the gateway: its log lines for a
    connection made through nginx name the client's own address, not nginx's."""
    source = "127.0.0.9"
    c = cluster.client("lou", source=source)
    conn, node_id = c.welcome["conn"], c.node
    c.close()
    node = next(n for n in cluster.nodes if n.node_id == node_id)

    def lines():
        return [ln for ln in node.proc.log.read_text(errors="replace").splitlines() if conn in ln]
    found = wait_for(f"a log line of {conn} on {node_id}", lines, timeout=10)
    assert any(source in ln for ln in found), found


def test_ops_endpoints_are_not_proxied(cluster):
    status, _, body = http_get(cluster.nginx_http + "/metrics")
    assert not (status == 200 and b"wsgate_" in body), "/metrics must not be reachable through nginx"
    # ... while every node serves them on its own ops port.
    for node in cluster.nodes:
        status, _, body = http_get(node.ops + "/metrics")
        assert status == 200 and b"wsgate_" in body


def healthcheck_command() -> list[str]:
    text = re.sub(r"\\\n", " ", (REPO / "deploy/Dockerfile").read_text())
    m = re.search(r"^HEALTHCHECK\s.*?CMD\s+(\[.*\])\s*$", text, flags=re.M)
    assert m, "no exec-form HEALTHCHECK in deploy/Dockerfile"
    return json.loads(m.group(1))


def test_dockerfile_healthcheck_command_against_a_real_node(cluster):
    argv = healthcheck_command()
    node = cluster.nodes[0]
    env = {"PATH": os.environ["PATH"], "WSGATE_OPS_LISTEN": f"0.0.0.0:{node.ops_port}"}
    r = subprocess.run(argv, env=env, capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    env["WSGATE_OPS_LISTEN"] = f"0.0.0.0:{free_port()}"  # nothing listens there
    r = subprocess.run(argv, env=env, capture_output=True, timeout=10)
    assert r.returncode != 0


def test_wss_through_nginx_tls_block(tmp_path, cluster):
    """The commented TLS block, enabled as the README says, serves wss://."""
    from harness import start_nginx
    prefix = tmp_path / "nginx-tls"
    (prefix / "certs").mkdir(parents=True)
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", str(prefix / "certs/tls.key"), "-out", str(prefix / "certs/tls.crt")],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    proc, _, tls_port = start_nginx(prefix, tmp_path, [f"127.0.0.1:{n.port}" for n in cluster.nodes], tls=True)
    try:
        ctx = ssl.create_default_context(cafile=str(prefix / "certs/tls.crt"))
        c = WsClient(f"wss://127.0.0.1:{tls_port}/ws", cluster.token("tina"), ssl_context=ctx,
                     server_hostname="localhost")
        assert c.node in cluster.node_ids()
        room = "tls-" + uuid.uuid4().hex[:8]
        c.join(room)
        ack = c.publish(room, "over tls", "t1")
        c.wait_seq(room, ack["seq"])
        c.close()
    finally:
        proc.stop()


def test_killed_node_clients_resume_through_nginx_without_gap_or_duplicate(tmp_path):
    """SIGKILL one node: its clients reconnect through nginx from the same
    address, land on another node, and `join` with `since` recovers every
    seq exactly once."""
    cluster = Cluster(tmp_path)
    try:
        placement = {src: node_of(cluster, src) for src in SOURCES}
        by_node: dict[str, list[str]] = {}
        for src, node in placement.items():
            by_node.setdefault(node, []).append(src)
        assert len(by_node) >= 2, f"all sources on one node: {by_node}"
        # Kill the node with the most sources; publish from another one.
        victim = max(by_node, key=lambda n: len(by_node[n]))
        victim_sources = by_node[victim][:4]
        pub_src = next(srcs[0] for n, srcs in by_node.items() if n != victim)
        room = "resume-" + uuid.uuid4().hex[:8]

        publisher = cluster.client("pub", source=pub_src)
        assert publisher.node != victim
        subs = [cluster.client(f"sub{i}", source=s) for i, s in enumerate(victim_sources)]
        assert {s.node for s in subs} == {victim}
        joined = {}
        for s in subs:
            joined[s] = s.join(room)
        epoch = joined[subs[0]]["epoch"]
        assert all(j["epoch"] == epoch for j in joined.values())

        published = []

        def publish(n: int):
            for _ in range(n):
                published.append(publisher.publish(room, {"i": len(published)}, f"p{len(published)}")["seq"])

        publish(10)
        for s in subs:
            s.wait_seq(room, published[-1])
        publish(5)  # possibly still in flight to the victim's clients when it dies

        victim_node = next(n for n in cluster.nodes if n.node_id == victim)
        victim_node.proc.kill()
        for s in subs:
            s.drain_dead()

        publish(10)  # while the victim's clients are away

        resumed = []
        for i, (s, src) in enumerate(zip(subs, victim_sources)):
            last = s.seqs(room)[-1] if s.seqs(room) else joined[s]["seq"]
            r = cluster.client(f"sub{i}", source=src)
            assert r.node != victim and r.node in cluster.node_ids()
            j = r.join(room, since=last, epoch=epoch)
            assert j["recovered"] is True, j
            assert j["epoch"] == epoch
            r.prior = s.seqs(room)
            r.first = joined[s]["seq"]
            resumed.append(r)

        publish(5)  # live after the resume
        final = published[-1]
        for r in resumed:
            r.wait_seq(room, final)
            seen = r.prior + r.seqs(room)
            expected = list(range(r.first + 1, final + 1))
            assert seen == expected, f"{r.welcome['user']}: gap or duplicate: {seen} != {expected}"
        assert published == list(range(published[0], published[0] + len(published)))
    finally:
        cluster.close()


def sse_events(resp):
    """The events of an SSE response, parsed, as they come (comments skipped)."""
    data = []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line == "" and data:
            yield json.loads("\n".join(data))
            data = []


def test_sse_fallback_through_nginx_posts_reach_the_stream_from_any_replica(cluster):
    """GET /sse through nginx, then POSTs through nginx, which spreads them
    over the replicas (no stickiness): every one reaches the stream, and
    the answers arrive in order, unbuffered."""
    import http.client

    room = "sse-" + uuid.uuid4().hex[:8]
    token = cluster.token("sse-user")
    conn = http.client.HTTPConnection("127.0.0.1", cluster.nginx_port, timeout=10)
    conn.request("GET", "/sse", headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/event-stream"
    events = sse_events(resp)
    welcome = next(events)
    assert welcome["type"] == "welcome" and welcome["transport"] == "sse", welcome
    url = f"{cluster.nginx_http}/sse/{welcome['conn']}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, body = http_post(url, json.dumps({"type": "join", "room": room, "id": "j"}).encode(), headers)
    assert status == 202, body
    assert next(events)["id"] == "j"
    # Several POSTs: nginx may send each to any replica.
    for i in range(6):
        frame = {"type": "publish", "room": room, "data": i, "id": f"p{i}"}
        status, body = http_post(url, json.dumps(frame).encode(), headers)
        assert status == 202, body
        got = {}
        while set(got) != {"message", "ack"}:
            e = next(events)
            got[e["type"]] = e
        assert got["message"]["data"] == i and got["ack"]["id"] == f"p{i}", got
    conn.close()
