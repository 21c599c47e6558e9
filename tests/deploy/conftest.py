"""Fixtures of the deployment sub-suite (see run.sh and deploy/README.md)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

import harness
from harness import REPO, Proc, WsClient, mint_token, start_nginx, start_node, start_redis

# Origin the test clusters allow, to check that nginx passes Origin through.
ALLOWED_ORIGIN = "http://chat.deploy.test"

_started: list[Proc] = []
_orig_init = Proc.__init__


def _tracking_init(self, *args, **kwargs):
    _orig_init(self, *args, **kwargs)
    _started.append(self)


Proc.__init__ = _tracking_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the tail of every process log the test started."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in _started:
            report.sections.append((f"log of {proc.name} ({proc.argv[0]})", proc.tail(30)))


class Cluster:
    """Redis, N wsgate nodes sharing one JWT secret, optionally the real nginx."""

    def __init__(self, tmp: Path, n: int = 3, nginx: bool = True, tls: bool = False):
        self.tmp = tmp
        self.secret = "deploy-test-" + secrets.token_hex(16)
        self.procs: list[Proc] = []
        self.nginx = None
        try:
            self.redis, self.redis_port = start_redis(tmp)
            self.procs.append(self.redis)
            self.nodes = []
            for i in range(n):
                node = start_node(tmp, f"node-{i + 1}", secret=self.secret, redis_port=self.redis_port,
                                  extra_args=["--allowed-origins", ALLOWED_ORIGIN])
                self.nodes.append(node)
                self.procs.append(node.proc)
            if nginx:
                self.nginx, self.nginx_port, self.tls_port = start_nginx(
                    tmp / "nginx", tmp, [f"127.0.0.1:{nd.port}" for nd in self.nodes], tls=tls)
                self.procs.append(self.nginx)
        except BaseException:
            self.close()
            raise
        self.clients: list[WsClient] = []

    @property
    def nginx_ws(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}/ws"

    @property
    def nginx_http(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.nodes}

    def token(self, sub: str, **kw) -> str:
        return mint_token(self.secret, sub, **kw)

    def client(self, sub: str, url: str | None = None, source: str | None = None, **kw) -> WsClient:
        c = WsClient(url or self.nginx_ws, self.token(sub), source=source, **kw)
        self.clients.append(c)
        return c

    def close(self):
        for c in getattr(self, "clients", []):
            c.close()
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl with kustomize v5: $KUBECTL (run.sh sets it), else PATH."""
    path = os.environ.get("KUBECTL") or shutil.which("kubectl")
    assert path, "kubectl not found (run.sh installs one)"
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


__all__ = ["Cluster", "ALLOWED_ORIGIN", "harness"]
