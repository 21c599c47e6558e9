"""The configuration shipped in docker-compose.yml, the Dockerfile and the
Kubernetes overlays, run by the real binary: every WSGATE_* name is a real
flag, and a node started with exactly that environment serves."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time

import pytest
import yaml

from harness import (REPO, WsClient, http_get, load_yaml_all, mint_token, start_node_from_env, start_redis,
                     wait_for, wsgate_bin)


def env_names_in_help() -> set[str]:
    r = subprocess.run([str(wsgate_bin()), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    names = set(re.findall(r"\[env: (WSGATE_[A-Z0-9_]+)", r.stdout))
    assert "WSGATE_LISTEN" in names, "`wsgate serve --help` lists no environment variables"
    return names


def compose_gateways() -> dict[str, dict]:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    return {n: s for n, s in services.items() if "WSGATE_NODE_ID" in (s.get("environment") or {})}


def render(kubectl, overlay) -> list[dict]:
    r = subprocess.run([kubectl, "kustomize", str(REPO / "k8s/overlays" / overlay)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return load_yaml_all(r.stdout)


def dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (REPO / "deploy/Dockerfile").read_text())
    env = {}
    for m in re.finditer(r"^ENV\s+(.*)$", text, flags=re.M):
        for k, v in re.findall(r"(\w+)=(\S+)", m.group(1)):
            env[k] = v
    return env


def test_every_shipped_wsgate_variable_is_a_real_flag(kubectl):
    known = env_names_in_help()
    used = {}
    for name, svc in compose_gateways().items():
        for k in svc["environment"]:
            used.setdefault(k, f"docker-compose.yml {name}")
    for k in dockerfile_env():
        if k.startswith("WSGATE_"):
            used.setdefault(k, "deploy/Dockerfile")
    for overlay in ["dev", "production", "production-gateway-api"]:
        for doc in render(kubectl, overlay):
            if doc["kind"] == "ConfigMap":
                for k in doc["data"]:
                    used.setdefault(k, f"k8s {overlay} ConfigMap")
            if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "wsgate":
                for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]:
                    used.setdefault(e["name"], f"k8s {overlay} Deployment")
    unknown = {k: where for k, where in used.items() if k.startswith("WSGATE_") and k not in known}
    assert not unknown, f"not flags of `wsgate serve` (clap would ignore them silently): {unknown}"


@pytest.fixture
def redis(tmp_path):
    proc, port = start_redis(tmp_path)
    yield port
    proc.stop()


def test_compose_gateway_environment_serves_a_cross_node_dev_cluster(tmp_path, redis):
    """gateway-1 and gateway-2 with their compose environment (only listen
    addresses and the Redis host moved to loopback), as the Dockerfile's
    ENTRYPOINT + CMD run them: the chat page and /dev/token are served, a
    token from one replica is valid on the other, and a message crosses."""
    gws = compose_gateways()
    nodes = {}
    try:
        for name in ["gateway-1", "gateway-2"]:
            env = {k: str(v) for k, v in gws[name]["environment"].items()}
            assert env["WSGATE_REDIS_URL"].startswith("redis://redis:")
            env["WSGATE_REDIS_URL"] = f"redis://127.0.0.1:{redis}/"
            env["WSGATE_JWT_SECRET"] = re.sub(r"^\$\{WSGATE_JWT_SECRET:-(.*)\}$", r"\1", env["WSGATE_JWT_SECRET"])
            nodes[name] = start_node_from_env(tmp_path, name, env, argv_tail=["serve"])
        g1, g2 = nodes["gateway-1"], nodes["gateway-2"]
        status, headers, body = http_get(f"http://127.0.0.1:{g1.port}/")
        assert status == 200 and "html" in headers.get("content-type", "").lower()
        status, _, body = http_get(f"http://127.0.0.1:{g1.port}/dev/token?sub=zed")
        assert status == 200, body
        token = json.loads(body)["token"]
        origin = "http://localhost:8080"
        a = WsClient(g1.ws_url, token, origin=origin)
        b = WsClient(g2.ws_url, token, origin=origin)
        try:
            assert (a.node, b.node) == ("gateway-1", "gateway-2")
            a.join("lobby")
            ack = b.publish("lobby", {"text": "hi"}, "x1")
            a.wait_seq("lobby", ack["seq"])
        finally:
            a.close()
            b.close()
    finally:
        for n in nodes.values():
            n.proc.stop()


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_kubernetes_pod_environment_serves_and_drains_within_the_grace_period(tmp_path, redis, kubectl, overlay):
    """A pod's environment from the rendered overlay (ConfigMap, Secrets,
    downward-API node id; production's external Secrets filled in by the
    test), the container's args, listeners moved to loopback. It serves, and
    on SIGTERM closes its clients with 1001 and exits 0 well within
    terminationGracePeriodSeconds minus the preStop sleep."""
    docs = render(kubectl, overlay)
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "wsgate")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cms = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
               for d in docs if d["kind"] == "Secret"}
    secrets.setdefault("wsgate-jwt", {"jwt-secret": "external-secret-store-value-for-the-test"})
    secrets.setdefault("wsgate-redis", {"url": "redis://managed-redis.example.internal:6379/0"})
    env = {}
    for src in c.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]])
    pod_name = "wsgate-5d9c7b8f6-x2x7q"
    for e in c["env"]:
        vf = e.get("valueFrom", {})
        if "fieldRef" in vf:
            assert vf["fieldRef"]["fieldPath"] == "metadata.name"
            env[e["name"]] = pod_name
        elif "secretKeyRef" in vf:
            env[e["name"]] = secrets[vf["secretKeyRef"]["name"]][vf["secretKeyRef"]["key"]]
        else:
            env[e["name"]] = e["value"]
    env["WSGATE_REDIS_URL"] = f"redis://127.0.0.1:{redis}/"
    node = start_node_from_env(tmp_path, f"pod-{overlay}", env, argv_tail=c["args"])
    try:
        client = WsClient(node.ws_url, mint_token(env["WSGATE_JWT_SECRET"], "kube"))
        assert client.node == pod_name
        budget = pod["terminationGracePeriodSeconds"] - float(c["lifecycle"]["preStop"]["exec"]["command"][1])
        started = time.monotonic()
        node.proc.p.send_signal(signal.SIGTERM)

        def not_ready():
            try:
                return http_get(node.ops + "/ready", timeout=2)[0] == 503
            except OSError:
                return True  # the ops listener is already closed: not ready either
        wait_for("/ready to stop answering 200 after SIGTERM", not_ready, timeout=budget)
        from websockets.exceptions import ConnectionClosed
        with pytest.raises(ConnectionClosed) as closed:
            client.expect(lambda f: False, timeout=budget)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        left = budget - (time.monotonic() - started)
        try:
            rc = node.proc.p.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {budget:.0f}s after SIGTERM (terminationGracePeriodSeconds minus preStop): "
                        "Kubernetes would SIGKILL it")
        assert rc == 0
    finally:
        node.proc.stop()
