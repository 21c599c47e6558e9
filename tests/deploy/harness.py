"""Processes and clients for the deployment tests.

Everything here talks to loopback only, picks free ports, bounds every wait
with a deadline and stops only the processes it started.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from websockets.sync.client import connect as ws_connect

REPO = Path(__file__).resolve().parents[2]


def wsgate_bin() -> Path:
    """The gateway binary: $WSGATE_BIN, else target/release, else target/debug."""
    env = os.environ.get("WSGATE_BIN")
    if env:
        return Path(env)
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / "wsgate"
        if p.exists():
            return p
    return REPO / "target" / "release" / "wsgate"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ProcessExited(AssertionError):
    """A process the test started has ended: waiting longer cannot help."""


def wait_for(what: str, cond: Callable[[], object], timeout: float = 20.0, interval: float = 0.05):
    """Poll `cond` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET without proxies; returns (status, headers, body) for any status."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def http_post(url: str, body: bytes, headers: dict, timeout: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def mint_token(secret: str, sub: str, rooms=("*",), publish=("*",), ttl: int = 3600) -> str:
    """An HS256 JWT as a back-end service would mint it (PROTOCOL.md claims)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": sub, "iat": now, "exp": now + ttl, "rooms": list(rooms), "publish": list(publish)}
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


# --------------------------------------------------------------------------
# Processes


class Proc:
    """A child process in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = logdir / f"{name}.log"
        self._logf = open(self.log, "wb")
        self.p = subprocess.Popen(
            self.argv, stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def check_alive(self):
        if not self.alive():
            raise ProcessExited(f"{self.name} exited with {self.p.returncode}:\n{self.tail()}")

    def kill(self):
        """SIGKILL, as a crash would."""
        if self.alive():
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=10)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0):
        if self.alive():
            try:
                self.p.send_signal(sig)
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        # Leftover children of this process group (nginx workers) go too.
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._logf.close()


def clean_env(extra: dict | None = None) -> dict:
    """The test's environment without any WSGATE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
    env.setdefault("RUST_LOG", "info")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def start_redis(logdir: Path) -> tuple[Proc, int]:
    for _ in range(5):
        port = free_port()
        proc = Proc(f"redis-{port}", ["redis-server", "--port", port, "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", logdir],
                    logdir)

        def pong():
            proc.check_alive()
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        try:
            wait_for("redis to answer PING", pong, timeout=15)
            return proc, port
        except AssertionError:
            proc.stop()
            if "Address already in use" not in proc.tail():
                raise
    raise AssertionError("could not start redis-server on a free port")


@dataclass
class Node:
    node_id: str
    proc: Proc
    port: int
    ops_port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"


def _launch(label: str, node_id: str, logdir: Path, wait_ready: bool, make, what: str = "") -> Node:
    """Start a node on two free loopback ports and wait for /ready (or
    /health) == 200; `make(port, ops_port)` gives (argv, env). A clash on a
    port picked free but taken meanwhile is retried, up to 5 times."""
    last = ""
    for _ in range(5):
        port, ops_port = free_port(), free_port()
        argv, env = make(port, ops_port)
        proc = Proc(f"{label}-{port}", argv, logdir, env=clean_env(env))
        node = Node(node_id, proc, port, ops_port)
        path = "/ready" if wait_ready else "/health"

        def up():
            proc.check_alive()
            return http_get(node.ops + path, timeout=2)[0] == 200
        try:
            wait_for(f"{label}{what} {path} == 200", up, timeout=30)
            return node
        except AssertionError as exc:
            last = str(exc)
            proc.stop()
            if "in use" not in last.lower():
                break
    raise AssertionError(f"wsgate {label}{what} did not start:\n{last}")


def start_node(logdir: Path, node_id: str, *, secret: str | None = None, redis_port: int | None = None,
               extra_args: list[str] | None = None, env: dict | None = None, wait_ready: bool = True) -> Node:
    """`wsgate serve` on two free loopback ports; waits for /ready == 200."""
    binary = wsgate_bin()
    assert binary.exists(), f"gateway binary {binary} not found (build it: cargo build --release -p wsgate)"

    def make(port, ops_port):
        argv = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--ops-listen", f"127.0.0.1:{ops_port}",
                "--node-id", node_id]
        if secret is not None:
            argv += ["--jwt-secret", secret]
        if redis_port is not None:
            argv += ["--redis-url", f"redis://127.0.0.1:{redis_port}/"]
        return argv + (extra_args or []), env
    return _launch(node_id, node_id, logdir, wait_ready, make, what=" node")


# --------------------------------------------------------------------------
# nginx


NGINX_CONF = REPO / "nginx" / "nginx.conf"


def render_nginx_conf(dest_dir: Path, listen_port: int, upstreams: list[str], tls_port: int | None = None) -> Path:
    """Copy the repo's nginx.conf with the documented substitutions only.

    - `listen 8080;` -> `listen 127.0.0.1:<listen_port>;`
    - upstreams.conf (next to the copy) lists the given host:port servers,
      with the same server parameters as the shipped file;
    - with tls_port: the `#tls ` prefixes removed, `listen 443 ssl;` ->
      `listen 127.0.0.1:<tls_port> ssl;` (certs/tls.crt and certs/tls.key
      must exist next to the copy).
    """
    text = NGINX_CONF.read_text()
    text, n = re.subn(r"^(\s*)listen 8080;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    assert n == 1, "nginx.conf must contain exactly one active `listen 8080;`"
    name = "nginx.conf"
    if tls_port is not None:
        text = re.sub(r"^(\s*)#tls ", r"\1", text, flags=re.M)
        text, n = re.subn(r"^(\s*)listen 443 ssl;", rf"\g<1>listen 127.0.0.1:{tls_port} ssl;", text, flags=re.M)
        assert n == 1, "nginx.conf must contain exactly one `#tls listen 443 ssl;`"
        name = "nginx-tls.conf"
    shipped = (REPO / "nginx" / "upstreams.conf").read_text()
    params = re.search(r"^server\s+\S+(\s+[^;]*)?;", shipped, flags=re.M)
    server_params = (params.group(1) or "") if params else ""
    dest_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(dest_dir, 0o755)  # nginx workers run as an unprivileged user when started as root
    (dest_dir / "upstreams.conf").write_text("".join(f"server {u}{server_params};\n" for u in upstreams))
    conf = dest_dir / name
    conf.write_text(text)
    return conf


def nginx_argv(prefix: Path, conf: Path, test_only: bool = False) -> list[str]:
    argv = ["nginx", "-p", f"{prefix}/", "-e", "stderr", "-c", str(conf),
            "-g", f"pid {prefix}/nginx.pid;" + ("" if test_only else " daemon off;")]
    if test_only:
        argv.insert(1, "-t")
    return argv


def start_nginx(prefix: Path, logdir: Path, upstreams: list[str], tls: bool = False) -> tuple[Proc, int, int | None]:
    """The real nginx with the repo's conf; returns (proc, port, tls_port)."""
    for _ in range(5):
        port = free_port()
        tls_port = free_port() if tls else None
        conf = render_nginx_conf(prefix, port, upstreams, tls_port)
        proc = Proc(f"nginx-{port}", nginx_argv(prefix, conf), logdir)

        def listening():
            proc.check_alive()
            with socket.create_connection(("127.0.0.1", tls_port or port), timeout=1):
                return True
        try:
            wait_for("nginx to listen", listening, timeout=15)
            return proc, port, tls_port
        except AssertionError:
            proc.stop()
            if "in use" not in proc.tail():
                raise AssertionError(f"nginx did not start:\n{proc.tail()}")
    raise AssertionError("could not start nginx on a free port")


# --------------------------------------------------------------------------
# WebSocket client


class WsClient:
    """A protocol-v1 client: records every frame; message frames per room.
    `compression="deflate"` offers permessage-deflate (websockets' default)."""

    def __init__(self, url: str, token: str, *, source: str | None = None, origin: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 timeout: float = 10.0, compression: str | None = None):
        m = re.match(r"wss?://([^:/]+):(\d+)", url)
        assert m, url
        host, port = m.group(1), int(m.group(2))
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        self.source = source or "127.0.0.1"
        kwargs = dict(sock=sock, additional_headers={"Authorization": f"Bearer {token}"},
                      open_timeout=timeout, close_timeout=2, proxy=None, compression=compression)
        if origin:
            kwargs["origin"] = origin
        if ssl_context is not None:
            kwargs["ssl"] = ssl_context
            kwargs["server_hostname"] = server_hostname or host
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(ws_connect(url, **kwargs))
        self.frames: list[dict] = []
        self.messages: dict[str, list[dict]] = {}
        self.welcome = self.expect(lambda f: f.get("type") == "welcome", timeout)
        self.node = self.welcome["node"]

    def send(self, frame: dict):
        self.ws.send(json.dumps(frame))

    def _recv(self, timeout: float) -> dict:
        frame = json.loads(self.ws.recv(timeout=timeout))
        self.frames.append(frame)
        if frame.get("type") == "message":
            self.messages.setdefault(frame["room"], []).append(frame)
        return frame

    def expect(self, pred: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """Read frames until one matches `pred` (others are recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; last frames: {self.frames[-5:]}")
            try:
                frame = self._recv(left)
            except TimeoutError:
                continue
            if pred(frame):
                return frame

    def join(self, room: str, since: int | None = None, epoch: str | None = None, timeout: float = 10.0) -> dict:
        frame = {"type": "join", "room": room, "id": f"j-{room}"}
        if since is not None:
            frame["since"] = since
        if epoch is not None:
            frame["epoch"] = epoch
        self.send(frame)
        reply = self.expect(lambda f: f.get("id") == frame["id"] and f.get("type") in ("joined", "error"), timeout)
        assert reply["type"] == "joined", reply
        return reply

    def publish(self, room: str, data, msg_id: str, timeout: float = 10.0) -> dict:
        self.send({"type": "publish", "room": room, "data": data, "id": msg_id})
        reply = self.expect(lambda f: f.get("id") == msg_id and f.get("type") in ("ack", "error"), timeout)
        assert reply["type"] == "ack", reply
        return reply

    def seqs(self, room: str) -> list[int]:
        return [m["seq"] for m in self.messages.get(room, [])]

    def wait_seq(self, room: str, seq: int, timeout: float = 10.0):
        """Read until a message of `room` with seq >= `seq` has arrived."""
        if any(s >= seq for s in self.seqs(room)):
            return
        self.expect(lambda f: f.get("type") == "message" and f.get("room") == room and f["seq"] >= seq, timeout)

    def drain_dead(self, timeout: float = 15.0):
        """Read until the connection ends (the node went away)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._recv(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - ConnectionClosed or a reset: that's what we wait for
                return
        raise AssertionError("connection still open after its node was killed")

    def close(self):
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001 - already gone
            pass


def load_yaml_all(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def start_node_from_env(logdir: Path, name: str, env: dict, argv_tail: list[str] | None = None,
                        wait_ready: bool = True) -> Node:
    """`wsgate serve` configured only through WSGATE_* variables, as compose
    and Kubernetes run it; the listeners are moved to free loopback ports."""
    binary = wsgate_bin()

    def make(port, ops_port):
        full = dict(env, WSGATE_LISTEN=f"127.0.0.1:{port}", WSGATE_OPS_LISTEN=f"127.0.0.1:{ops_port}")
        return [binary] + (argv_tail or ["serve"]), full
    return _launch(name, env.get("WSGATE_NODE_ID", name), logdir, wait_ready, make, what=" from its environment")


def start_prometheus(prefix: Path, logdir: Path, config: dict, rule_files: list[Path]) -> tuple[Proc, str]:
    """The real Prometheus with `config` (rule files copied next to it)."""
    import shutil
    prefix.mkdir(parents=True, exist_ok=True)
    for f in rule_files:
        shutil.copy(f, prefix / f.name)
    for _ in range(5):
        port = free_port()
        cfg = json.loads(json.dumps(config))
        for job in cfg["scrape_configs"]:
            if job["job_name"] == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        (prefix / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = Proc(f"prometheus-{port}", [
            "prometheus", f"--config.file={prefix / 'prometheus.yml'}",
            f"--storage.tsdb.path={prefix / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        ], logdir, env=clean_env())
        url = f"http://127.0.0.1:{port}"

        def ready():
            proc.check_alive()
            return http_get(url + "/-/ready", timeout=2)[0] == 200
        try:
            wait_for("prometheus /-/ready", ready, timeout=60)
            return proc, url
        except AssertionError:
            proc.stop()
            if "address already in use" not in proc.tail().lower():
                raise AssertionError(f"prometheus did not start:\n{proc.tail()}")
    raise AssertionError("could not start prometheus on a free port")


def prom_query(url: str, expr: str) -> list[dict]:
    status, _, body = http_get(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=5)
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", f"{expr}: {reply}"
    return reply["data"]["result"]
