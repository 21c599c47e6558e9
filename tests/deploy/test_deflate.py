"""PROTOCOL.md section 12 with a third-party client: Python `websockets`
offers permessage-deflate (`permessage-deflate; client_max_window_bits`) by
default, negotiates it with the gateway, and reads the compressed frames;
its own frames are compressed too. The RSV1 bit of each frame is checked in
crates/gateway/tests/compression.rs; here the point is that a real
implementation of RFC 7692 agrees with ours."""

from __future__ import annotations

import pytest

from harness import WsClient, mint_token, start_node

SECRET = "deflate-test-secret"
ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def dashboard(rows: int) -> list[dict]:
    """About 40 bytes of JSON a row: 50 rows is a 2 KiB dashboard payload."""
    return [{"cpu": i % 97, "mem": i * 31 % 1000, "host": f"node-{i % 7}"} for i in range(rows)]


@pytest.fixture
def node(tmp_path, request):
    n = start_node(tmp_path, "deflate-node", secret=SECRET, extra_args=getattr(request, "param", []))
    yield n
    n.proc.stop()


def clients(node, *subs):
    return [WsClient(node.ws_url, mint_token(SECRET, sub), compression="deflate") for sub in subs]


def test_websockets_negotiates_deflate_and_reads_compressed_frames(node):
    alice, bob = clients(node, "alice", "bob")
    try:
        for c in (alice, bob):
            assert c.ws.response.headers.get("Sec-WebSocket-Extensions") == ANSWER
            assert [e.name for e in c.ws.protocol.extensions] == ["permessage-deflate"]
            c.join("dash")
        small, large = {"cpu": 3}, dashboard(50)
        alice.publish("dash", small, "p-small")
        alice.publish("dash", large, "p-large")  # compressed by the client, too
        bob.wait_seq("dash", 2)
        assert [m["data"] for m in bob.messages["dash"]] == [small, large]
        assert [m["from"] for m in bob.messages["dash"]] == ["alice", "alice"]
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize("node", [["--compression", "off"]], indirect=True)
def test_compression_off_ignores_the_offer(node):
    (alice,) = clients(node, "alice")
    try:
        assert "Sec-WebSocket-Extensions" not in alice.ws.response.headers
        assert alice.ws.protocol.extensions == []
        alice.join("dash")
        alice.publish("dash", dashboard(50), "p1")
        alice.wait_seq("dash", 1)
    finally:
        alice.close()
