#!/usr/bin/env python3
"""Idle memory per connection, SSE stream against WebSocket (issue 12): N
connections of one kind held open (welcome read, then nothing) against a
running node, its RSS (/proc/PID/status) before and after. The bench tool
(wsgate-bench idle) measures WebSockets only; this compares both kinds the
same way. Loopback only.

    ulimit -n 20000
    wsgate serve --jwt-secret s --listen 127.0.0.1:8080 --max-pending-connections 4096 &
    python3 benches/sse-idle.py sse 4000 8080 $! "$(wsgate token --jwt-secret s --sub u)"
    # (a fresh node for) python3 benches/sse-idle.py ws 4000 8080 PID TOKEN
"""
import base64
import os
import socket
import sys
import time


def main():
    kind, n, port, pid, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    assert kind in ("ws", "sse"), kind

    def rss_kib():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise SystemExit("no VmRSS")

    def open_one():
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if kind == "ws":
            key = base64.b64encode(os.urandom(16)).decode()
            req = (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Authorization: Bearer {token}\r\n\r\n")
        else:
            req = (f"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                   f"Authorization: Bearer {token}\r\n\r\n")
        s.sendall(req.encode())
        buf = b""
        while b"welcome" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit(f"refused: {buf[:200]!r}")
            buf += chunk
        return s

    time.sleep(0.5)
    before = rss_kib()
    conns = [open_one() for _ in range(n)]
    time.sleep(2)
    after = rss_kib()
    print(f"{kind}: {n} idle connections, RSS {before} -> {after} KiB, "
          f"{(after - before) / n * 1024:.0f} bytes per connection")
    for c in conns:
        c.close()


if __name__ == "__main__":
    main()
