"""The repo's docker-compose.yml, running in containers (started by run.sh),
checked from the host through its published loopback ports only.

The tests run in file order against one cluster: the last two stop and kill
a gateway container and bring it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from harness import REPO, WsClient, http_get, http_post, prom_query, wait_for  # noqa: E402

PROJECT = os.environ.get("COMPOSE_PROJECT", "wsgate-compose-test")
COMPOSE_FILES = os.environ.get("COMPOSE_FILES", str(REPO / "docker-compose.yml")).split(":")
# Host ports docker-compose.yml publishes.
NGINX = "http://127.0.0.1:8080"
NGINX_WS = "ws://127.0.0.1:8080/ws"
PROMETHEUS = "http://127.0.0.1:9090"
GATEWAYS = {"gateway-1": 8081, "gateway-2": 8082, "gateway-3": 8083}


def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = ["docker-compose", "-p", PROJECT]
    for f in COMPOSE_FILES:
        argv += ["-f", f]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout)


def container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def inspect(service: str, fmt: str) -> str:
    r = subprocess.run(["podman", "inspect", "--format", fmt, container(service)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def token(sub: str) -> str:
    status, _, body = http_get(f"{NGINX}/dev/token?sub={sub}")
    assert status == 200, body
    return json.loads(body)["token"]


def client(sub: str, url: str = NGINX_WS) -> WsClient:
    return WsClient(url, token(sub))


def direct_ws(service: str) -> str:
    return f"ws://127.0.0.1:{GATEWAYS[service]}/ws"


def wait_closed(c: WsClient, timeout: float = 30.0) -> int | None:
    """Read (and record) frames until the server ends the connection;
    returns the close code it sent, None when it sent no close frame."""
    try:
        c.expect(lambda f: False, timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    raise AssertionError("unreachable")


def wait_healthy(service: str, timeout: float = 90.0):
    wait_for(f"{service} to be healthy", lambda: inspect(service, "{{.State.Health.Status}}") == "healthy",
             timeout=timeout, interval=1)


def test_chat_page_and_client_script_through_nginx():
    status, headers, body = http_get(NGINX + "/")
    assert status == 200, body[:200]
    assert headers.get("content-type", "").startswith("text/html")
    assert b"wsgate.js" in body
    status, headers, body = http_get(NGINX + "/wsgate.js")
    assert status == 200 and b"WebSocket" in body


def test_websocket_through_nginx():
    c = client("compose-ws")
    try:
        assert c.node in GATEWAYS
        room = "ws-" + uuid.uuid4().hex[:8]
        c.join(room)
        ack = c.publish(room, {"text": "hello through nginx"}, "m1")
        c.wait_seq(room, ack["seq"])
        assert c.messages[room][-1]["data"] == {"text": "hello through nginx"}
    finally:
        c.close()


def test_every_gateway_is_healthy_by_its_own_healthcheck():
    image_check = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}",
         "localhost/wsgate-compose/wsgate:local"], capture_output=True, text=True, timeout=30)
    assert image_check.returncode == 0, image_check.stderr
    expected = json.loads(image_check.stdout)
    assert expected and "/health" in " ".join(expected), expected
    for service in GATEWAYS:
        assert json.loads(inspect(service, "{{json .Config.Healthcheck.Test}}")) == expected
        wait_healthy(service)


def test_message_published_through_nginx_reaches_every_gateway():
    room = "fanout-" + uuid.uuid4().hex[:8]
    members = {}
    try:
        for service in GATEWAYS:
            members[service] = client(f"member-{service}", direct_ws(service))
            assert members[service].node == service
            members[service].join(room)
        # The HTTP publish API through nginx ...
        status, body = http_post(f"{NGINX}/api/rooms/{room}/messages", json.dumps({"via": "api"}).encode(),
                                 {"Authorization": f"Bearer {token('backend')}", "Content-Type": "application/json"})
        assert status == 200, body
        api_seq = json.loads(body)["seq"]
        # ... and a WebSocket publish through nginx.
        publisher = client("publisher")
        try:
            ws_seq = publisher.publish(room, {"via": "ws"}, "p1")["seq"]
        finally:
            publisher.close()
        for service, m in members.items():
            m.wait_seq(room, ws_seq)
            got = {msg["seq"]: msg["data"] for msg in m.messages[room]}
            assert got == {api_seq: {"via": "api"}, ws_seq: {"via": "ws"}}, f"{service}: {got}"
    finally:
        for m in members.values():
            m.close()


def test_prometheus_scrapes_every_gateway():
    def all_up():
        result = prom_query(PROMETHEUS, 'up{job="wsgate"}')
        return {r["metric"]["instance"]: r["value"][1] for r in result} == {
            f"{s}:9090": "1" for s in GATEWAYS}
    # scrape_interval is 15 s in deploy/prometheus/prometheus.yml.
    wait_for("Prometheus to scrape the three gateways (up == 1)", all_up, timeout=90, interval=2)


def resume_after(action: str, expect_code: int | None):
    """Clients on the gateway nginx routes this host to; `action` (compose
    stop or kill) takes that gateway down while another one publishes; the
    clients reconnect through nginx, land on another gateway and resume with
    `since`: every seq exactly once. Then the gateway is started again and
    nginx routes to it again."""
    probe = client("probe")
    victim = probe.node
    probe.close()
    other = next(s for s in GATEWAYS if s != victim)
    room = f"{action}-" + uuid.uuid4().hex[:8]
    publisher = client("pub", direct_ws(other))
    subs = [client(f"sub{i}") for i in range(3)]
    assert {s.node for s in subs} == {victim}, "nginx routes one client address to one gateway"
    joined = [s.join(room) for s in subs]
    epoch = joined[0]["epoch"]
    published = []

    def publish(n: int):
        for _ in range(n):
            published.append(publisher.publish(room, {"i": len(published)}, f"p{len(published)}")["seq"])

    publish(5)
    for s in subs:
        s.wait_seq(room, published[-1])
    publish(3)  # possibly in flight when the gateway goes

    argv = ["docker-compose", "-p", PROJECT] + [a for f in COMPOSE_FILES for a in ("-f", f)] + [action, victim]
    down = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        codes = [wait_closed(s) for s in subs]
        assert codes == [expect_code] * len(subs), f"close codes after {action}: {codes}"
        publish(4)  # while the clients are away
        resumed = []
        for i, (s, j) in enumerate(zip(subs, joined)):
            prior = s.seqs(room)
            r = client(f"sub{i}")
            assert r.node != victim and r.node in GATEWAYS, f"resumed on {r.node}"
            rj = r.join(room, since=prior[-1] if prior else j["seq"], epoch=epoch)
            assert rj["recovered"] is True and rj["epoch"] == epoch, rj
            resumed.append((r, prior, j["seq"]))
        publish(3)  # live after the resume
        for r, prior, first in resumed:
            r.wait_seq(room, published[-1])
            seen = prior + r.seqs(room)
            assert seen == list(range(first + 1, published[-1] + 1)), f"gap or duplicate: {seen}"
            r.close()
        out, _ = down.communicate(timeout=60)
        assert down.returncode == 0, out
    finally:
        if down.poll() is None:
            down.kill()
        publisher.close()
        for s in subs:
            s.close()
    return victim


def back_in_rotation(victim: str):
    """The gateway is running again (compose start), healthy by its
    HEALTHCHECK, and nginx sends this host's clients to it again."""
    r = compose("start", victim)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_healthy(victim)

    def routed():
        c = client("rotation")
        c.close()
        return c.node == victim
    # nginx retries a failed server after fail_timeout (10s in upstreams.conf).
    wait_for(f"nginx to route to {victim} again", routed, timeout=60, interval=1)


def test_stop_drains_with_1001_and_clients_resume_on_the_others():
    victim = resume_after("stop", 1001)
    # Stopped by its SIGTERM within stop_grace_period: exit 0, not SIGKILL's 137.
    assert inspect(victim, "{{.State.ExitCode}}") == "0"
    back_in_rotation(victim)


def test_kill_and_clients_resume_on_the_others():
    victim = resume_after("kill", None)
    back_in_rotation(victim)


@pytest.fixture(autouse=True, scope="module")
def _cluster_is_up():
    wait_for("nginx to answer on :8080", lambda: http_get(NGINX + "/", timeout=2)[0] == 200, timeout=90, interval=1)
