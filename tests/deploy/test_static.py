"""Static checks of the shipped deployment files, each by the real tool where
one exists offline: promtool, nginx -t, kubectl kustomize + the Kubernetes
OpenAPI schemas (kubernetes-validate), the compose-spec schema
(check-jsonschema), cargo metadata for the Dockerfile's dependency layer."""

from __future__ import annotations

import base64
import copy
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from harness import REPO, load_yaml_all, nginx_argv, render_nginx_conf

PROM_DIR = REPO / "deploy" / "prometheus"
OVERLAYS = ["dev", "production", "production-gateway-api"]
K8S_VERSION = "1.33.0"
HEARTBEAT_S = 30  # OPERATING.md default --heartbeat


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


def duration_s(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text).strip())
    assert m, f"not a duration: {text!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --------------------------------------------------------------------------
# Prometheus


def test_promtool_check_config():
    r = run(["promtool", "check", "config", PROM_DIR / "prometheus.yml"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_check_rules():
    r = run(["promtool", "check", "rules", PROM_DIR / "alerts.yml"])
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = {rule["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
              for rule in g["rules"] if "alert" in rule}
    assert {"WsgateNodeDown", "WsgateRedisRelayDown", "WsgateHandshakeFailureRatioHigh",
            "WsgateSlowConsumerCloses", "WsgatePublishLatencyHigh"} <= alerts


def test_promtool_rule_unit_tests():
    r = run(["promtool", "test", "rules", "alerts_test.yml"], cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_prometheus_scrapes_every_compose_replica_on_its_ops_port():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "wsgate")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    gateways = sorted(s for s, spec in compose["services"].items() if "WSGATE_NODE_ID" in (spec.get("environment") or {}))
    ops_ports = {compose["services"][g]["environment"]["WSGATE_OPS_LISTEN"].rsplit(":", 1)[1] for g in gateways}
    assert len(ops_ports) == 1
    (ops_port,) = ops_ports
    assert sorted(targets) == [f"{g}:{ops_port}" for g in gateways]
    for sc in job["static_configs"]:
        assert "node" not in sc.get("labels", {}), "a target label `node` would clash with the metrics' own"


# --------------------------------------------------------------------------
# Grafana


def test_grafana_dashboard_and_provisioning():
    dash = json.loads((REPO / "deploy/grafana/dashboards/wsgate.json").read_text())
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/wsgate.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    vols = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in vols
    exprs = []
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
            exprs.append(t["expr"])
    text = " ".join(exprs)
    for metric in ["wsgate_connections_active", "wsgate_connections_accepted_total",
                   "wsgate_handshake_rejections_total", "wsgate_messages_received_total",
                   "wsgate_messages_delivered_total", "wsgate_messages_published_total",
                   "wsgate_slow_consumer_closes_total", "wsgate_publish_latency_seconds_bucket",
                   "wsgate_broker_up", "wsgate_rooms_active"]:
        assert metric in text, f"no panel shows {metric}"


# --------------------------------------------------------------------------
# nginx


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
def test_nginx_conf_passes_nginx_t(tmp_path, tls):
    if tls:
        (tmp_path / "certs").mkdir()
        r = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                 "-keyout", tmp_path / "certs/tls.key", "-out", tmp_path / "certs/tls.crt"])
        assert r.returncode == 0, r.stderr
    conf = render_nginx_conf(tmp_path, 18080, ["127.0.0.1:18081", "127.0.0.1:18082"], tls_port=18443 if tls else None)
    r = run(nginx_argv(tmp_path, conf, test_only=True))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test is successful" in r.stderr


def long_lived_unbuffered(active: str, path: str) -> str:
    """The `location = path` block: unbuffered, timeouts far above the heartbeat."""
    found = re.search(r"location\s*=\s*" + re.escape(path) + r"\s*{([^}]*)}", active)
    assert found, f"no `location = {path}` block"
    block = found.group(1)
    assert re.search(r"proxy_buffering\s+off;", block)
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        m = re.search(directive + r"\s+(\S+);", block)
        assert m, f"{directive} missing in the {path} location"
        assert duration_s(m.group(1)) >= 10 * HEARTBEAT_S, f"{directive} must be well above the heartbeat"
    return block


def test_nginx_conf_proxies_websockets_right():
    conf = (REPO / "nginx/nginx.conf").read_text()
    active = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*{", active)
    assert re.search(r"proxy_http_version\s+1\.1;", active)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", active)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", active)
    assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;", active)
    assert re.search(r"proxy_set_header\s+X-Forwarded-Proto\s+\$scheme;", active)
    assert re.search(r"proxy_set_header\s+Host\s+\$(http_)?host;", active)
    assert re.search(r"hash\s+\$remote_addr\s+consistent;", active) or re.search(r"\bip_hash;", active)
    long_lived_unbuffered(active, "/ws")
    # The SSE fallback: the stream unbuffered with long timeouts, the POSTs
    # proxied too, neither through the sticky upstream (any replica will do).
    block = long_lived_unbuffered(active, "/sse")
    posts = re.search(r"location\s+/sse/\s*{([^}]*)}", active)
    assert posts, "no `location /sse/` block"
    for b in (block, posts.group(1)):
        upstream = re.search(r"proxy_pass\s+http://(\w+);", b).group(1)
        up = re.search(r"upstream\s+" + upstream + r"\s*{([^}]*)}", active).group(1)
        assert not re.search(r"\b(hash|ip_hash)\b", up), f"upstream {upstream} is sticky"
    # The upstream list carries only the replicas' public port.
    ups = (REPO / "nginx/upstreams.conf").read_text()
    servers = re.findall(r"^server\s+(\S+)", ups, flags=re.M)
    assert servers and all(s.endswith(":8080") for s in servers), servers
    assert "9090" not in "\n".join(line.split("#", 1)[0] for line in ups.splitlines())


# --------------------------------------------------------------------------
# docker-compose


def test_compose_file_matches_compose_spec_schema(tmp_path):
    checker = Path(sys.executable).parent / "check-jsonschema"
    r = run([checker, "--builtin-schema", "vendor.compose-spec", REPO / "docker-compose.yml"])
    assert r.returncode == 0, r.stdout + r.stderr
    # The validator is not vacuous: a wrong field type is refused.
    bad = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    bad["services"]["nginx"]["ports"] = {"8080": 8080}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    r = run([checker, "--builtin-schema", "vendor.compose-spec", tmp_path / "bad.yml"])
    assert r.returncode != 0


def test_compose_config_with_a_real_compose_implementation():
    """`docker compose config` (v2 plugin) when present, else Debian's
    docker-compose (v1, which run.sh installs): both parse and validate the
    file without a Docker engine."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        argv = [docker, "compose"]
    elif shutil.which("docker-compose"):
        argv = [shutil.which("docker-compose")]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed (run.sh installs docker-compose)")
    r = run(argv + ["-f", REPO / "docker-compose.yml", "config", "-q"], cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_cluster_is_wired_as_documented():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    gateways = {n: s for n, s in services.items() if "WSGATE_NODE_ID" in (s.get("environment") or {})}
    assert len(gateways) == 3
    envs = [g["environment"] for g in gateways.values()]
    assert len({e["WSGATE_NODE_ID"] for e in envs}) == 3, "node ids must be distinct"
    assert len({e["WSGATE_JWT_SECRET"] for e in envs}) == 1, "one shared JWT secret"
    for name, g in gateways.items():
        e = g["environment"]
        assert e["WSGATE_REDIS_URL"].startswith("redis://redis:"), name
        assert str(e["WSGATE_DEV"]).lower() == "true"
        assert "http://localhost:8080" in e["WSGATE_ALLOWED_ORIGINS"].split(",")
        assert g["build"]["dockerfile"] == "deploy/Dockerfile" and g["build"]["context"] == "."
        ops_port = e["WSGATE_OPS_LISTEN"].rsplit(":", 1)[1]
        for p in g.get("ports", []):
            assert not str(p).endswith(":" + ops_port), f"{name} publishes its ops port"
        grace = duration_s(g["stop_grace_period"])
        assert grace > duration_s(e["WSGATE_DRAIN_TIMEOUT"]), "stop_grace_period must exceed the drain timeout"
        assert g["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis" in services
    nginx = services["nginx"]
    assert "8080:8080" in [str(p) for p in nginx["ports"]]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "./nginx/upstreams.conf:/etc/nginx/upstreams.conf:ro" in nginx["volumes"]
    ups = re.findall(r"^server\s+([^:\s]+):(\d+)", (REPO / "nginx/upstreams.conf").read_text(), flags=re.M)
    listen_port = envs[0]["WSGATE_LISTEN"].rsplit(":", 1)[1]
    assert sorted(ups) == sorted((g, listen_port) for g in gateways)
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    # Every bind mount and the build context exist in the repository.
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = str(v).split(":", 1)[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name}: {src} does not exist"
    assert (REPO / "deploy/Dockerfile").exists()


# --------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "deploy/Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rules (last match wins), enough for these files."""
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").lstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        pats = [pat] + ([pat[3:]] if pat.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(pre, p) for pre in prefixes for p in pats) or \
                (pat.startswith("**/") and any(fnmatch.fnmatchcase(seg, pat[3:]) for seg in parts)):
            ignored = not neg
    return ignored


def test_dockerfile_shape():
    ins = dockerfile_instructions()
    args = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest) for op, rest in ins if op == "FROM"]
    assert froms[0].startswith("rust:1-bookworm AS "), froms
    assert froms[-1].startswith("debian:bookworm-slim"), "the runtime image is debian:bookworm-slim"
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    ops = {op: rest for op, rest in final}
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "runtime user must be numeric and non-root"
    assert json.loads(ops["ENTRYPOINT"]) == ["wsgate"]
    assert json.loads(ops["CMD"]) == ["serve"]
    assert ops["EXPOSE"].split() == ["8080", "9090"]
    assert "/health" in ops["HEALTHCHECK"]
    assert any(op == "COPY" and "--from=builder" in rest for op, rest in final)
    # The build reads only what the context (repo root minus .dockerignore) has.
    for op, rest in ins:
        if op == "COPY" and "--from" not in rest:
            srcs = rest.split()[:-1]
            for s in srcs:
                if s == ".":
                    continue
                assert (REPO / s).exists() and not dockerignored(s), f"COPY {s}: missing or ignored"
    assert not dockerignored("deploy/cargo-skeleton.sh")
    assert dockerignored("target") and dockerignored(".git") and dockerignored("tests/deploy/.venv")


def test_dockerfile_dependency_layer_skeleton(tmp_path):
    """The skeleton the Dockerfile builds its dependency layer from is a valid
    workspace (cargo metadata, --locked) with only stub sources, and every
    workspace member is inside the build context."""
    dest = tmp_path / "skeleton"
    r = run(["sh", REPO / "deploy/cargo-skeleton.sh", REPO, dest])
    assert r.returncode == 0, r.stderr
    assert (dest / "Cargo.lock").read_bytes() == (REPO / "Cargo.lock").read_bytes()
    rs = list(dest.rglob("*.rs"))
    assert rs and all(p.read_text() == "fn main() {}\n" for p in rs)
    assert not list(dest.rglob("target"))
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo/bin/cargo")
    meta = run([cargo, "metadata", "--format-version", "1", "--locked", "--offline",
                "--manifest-path", dest / "Cargo.toml"])
    if meta.returncode != 0 and "offline" in meta.stderr:
        meta = run([cargo, "metadata", "--format-version", "1", "--no-deps", "--manifest-path", dest / "Cargo.toml"])
    assert meta.returncode == 0, meta.stderr
    data = json.loads(meta.stdout)
    names = {p["name"] for p in data["packages"] if p["id"] in data["workspace_members"]}
    assert "wsgate" in names
    wsgate = next(p for p in data["packages"] if p["name"] == "wsgate")
    assert any(t["name"] == "wsgate" and "bin" in t["kind"] for t in wsgate["targets"])
    for p in data["packages"]:
        if p["id"] in data["workspace_members"]:
            rel = Path(p["manifest_path"]).parent.relative_to(dest).as_posix()
            assert not dockerignored(rel + "/Cargo.toml"), f"workspace member {rel} is excluded by .dockerignore"


# --------------------------------------------------------------------------
# Kubernetes

# Subsets of the CRDs' OpenAPI schemas (Prometheus Operator ServiceMonitor,
# Gateway API HTTPRoute incl. the experimental sessionPersistence), written
# from their API references, for the fields these manifests use. Unknown
# fields are refused, as the API server's structural schemas do.
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
OBJ_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": OBJ_META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                     "properties": {
                         "selector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                                     "matchExpressions": {"type": "array"}}},
                         "namespaceSelector": {"type": "object"},
                         "jobLabel": {"type": "string"},
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"port": {"type": "string"}, "targetPort": {},
                                            "path": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
                                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                            "honorLabels": {"type": "boolean"}}}}}}}},
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": OBJ_META,
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "parentRefs": {"type": "array", "maxItems": 32, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                                   "namespace": {"type": "string"}, "sectionName": {"type": "string"},
                                   "port": {"type": "integer"}}}},
                "hostnames": {"type": "array", "items": {"type": "string"}},
                "rules": {"type": "array", "maxItems": 16, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "name": {"type": "string"},
                        "matches": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                            "path": {"type": "object", "additionalProperties": False, "properties": {
                                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]}, "value": {"type": "string"}}},
                            "headers": {"type": "array"}, "queryParams": {"type": "array"}, "method": {"type": "string"}}}},
                        "backendRefs": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                        "required": ["name"], "properties": {
                                            "group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                                            "namespace": {"type": "string"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                            "weight": {"type": "integer"}, "filters": {"type": "array"}}}},
                        "filters": {"type": "array"},
                        "timeouts": {"type": "object", "additionalProperties": False, "properties": {
                            "request": DURATION, "backendRequest": DURATION}},
                        "sessionPersistence": {"type": "object", "additionalProperties": False, "properties": {
                            "sessionName": {"type": "string", "maxLength": 128},
                            "absoluteTimeout": DURATION, "idleTimeout": DURATION,
                            "type": {"enum": ["Cookie", "Header"]},
                            "cookieConfig": {"type": "object", "additionalProperties": False, "properties": {
                                "lifetimeType": {"enum": ["Permanent", "Session"]}}}}}}}}}}}},
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def render(kubectl: str, overlay: str) -> list[dict]:
    r = run([kubectl, "kustomize", REPO / "k8s/overlays" / overlay])
    assert r.returncode == 0, r.stderr
    return load_yaml_all(r.stdout)


def validate_k8s(doc: dict):
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs, kind) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name=None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_and_validates_offline(kubectl, overlay):
    docs = render(kubectl, overlay)
    assert docs
    for doc in docs:
        validate_k8s(doc)


def test_schema_validation_is_not_vacuous(kubectl):
    docs = render(kubectl, "production-gateway-api")
    dep = copy.deepcopy(one(docs, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(dep)
    route = copy.deepcopy(one(docs, "HTTPRoute"))
    route["spec"]["rules"][0]["sessionPersistence"]["absoluteTimeout"] = "1d"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(route)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_manifests_fit_together(kubectl, overlay):
    docs = render(kubectl, overlay)
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == "wsgate", f"{d['kind']}/{d['metadata']['name']} outside namespace wsgate"
    one(docs, "Namespace", "wsgate")
    dep = one(docs, "Deployment", "wsgate")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], pod_labels)
    assert spec["replicas"] == 3
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == {"http", "ops"}
    cm = one(docs, "ConfigMap")
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    env = dict(cm["data"])
    assert int(env["WSGATE_LISTEN"].rsplit(":", 1)[1]) == ports["http"]
    assert int(env["WSGATE_OPS_LISTEN"].rsplit(":", 1)[1]) == ports["ops"]
    # Probes on the ops port: liveness /health, readiness /ready.
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "ops"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}
    # preStop, then a drain that fits in the grace period.
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    drain = duration_s(env["WSGATE_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > float(pre[1]) + drain
    # Resources, non-root, read-only root filesystem, anti-affinity.
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert anti["topologyKey"] == "kubernetes.io/hostname" and selects(anti["labelSelector"]["matchLabels"], pod_labels)
    ann = spec["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["ops"]
    # Env: node id from the pod name, secrets by reference only.
    envs = {e["name"]: e for e in c["env"]}
    assert envs["WSGATE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_refs == {"wsgate-jwt", "wsgate-redis"}
    rendered_secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    if overlay == "dev":
        assert set(rendered_secrets) == secret_refs
        for s in rendered_secrets.values():
            assert s["type"] == "Opaque"
        jwt = base64.b64decode(rendered_secrets["wsgate-jwt"]["data"]["jwt-secret"]).decode()
        assert "not-a-real-secret" in jwt, "the dev overlay's key is marked as a throw-away"
    else:
        assert not rendered_secrets, "production renders no Secret: keys come from the secret store"
        template = load_yaml_all((REPO / "k8s/base/secret.template.yaml").read_text())
        assert {t["metadata"]["name"] for t in template} == secret_refs
        for t in template:
            validate_k8s(t)
            assert all("REPLACE" in v for v in t["stringData"].values()), "the template holds no real key"
    # Service: both ports, selecting the pods.
    svc = one(docs, "Service", "wsgate")
    assert selects(svc["spec"]["selector"], pod_labels)
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http", "ops": "ops"}
    svc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    # Edge: Ingress (ingress-nginx) or HTTPRoute, to the public port only.
    if overlay == "production-gateway-api":
        assert not by_kind(docs, "Ingress")
        route = one(docs, "HTTPRoute", "wsgate")
        for rule in route["spec"]["rules"]:
            for b in rule["backendRefs"]:
                assert b["name"] == "wsgate" and b["port"] == svc_port["http"]
            assert rule["sessionPersistence"]["type"] == "Cookie"
    else:
        ing = one(docs, "Ingress", "wsgate")
        a = ing["metadata"]["annotations"]
        assert a["nginx.ingress.kubernetes.io/affinity"] == "cookie"
        for t in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(a[f"nginx.ingress.kubernetes.io/{t}"]) >= 10 * HEARTBEAT_S
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"] == {"name": "wsgate", "port": {"name": "http"}}
        if overlay == "production":
            assert ing["spec"]["tls"], "production terminates TLS at the ingress"
    # PDB, HPA, NetworkPolicy, ServiceMonitor point at the same pods/ports.
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "wsgate" and hpa["spec"]["minReplicas"] >= 3
    netpol = one(docs, "NetworkPolicy", "wsgate")
    assert selects(netpol["spec"]["podSelector"]["matchLabels"], pod_labels)
    allowed = {}
    for rule in netpol["spec"]["ingress"]:
        for p in rule["ports"]:
            allowed.setdefault(p["port"], []).append(rule["from"])
    assert set(allowed) == {"http", "ops"} and all(len(v) == 1 for v in allowed.values())
    ops_peers = json.dumps(allowed["ops"])
    assert "prometheus" in ops_peers and "ingress" not in ops_peers
    sm = one(docs, "ServiceMonitor")
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["ops"]
    # Dev brings its own Redis; its URL names that Service.
    if overlay == "dev":
        redis_svc = one(docs, "Service", "redis")
        url = base64.b64decode(rendered_secrets["wsgate-redis"]["data"]["url"]).decode()
        assert url == f"redis://redis:{redis_svc['spec']['ports'][0]['port']}/"
        redis_dep = one(docs, "Deployment", "redis")
        assert selects(redis_svc["spec"]["selector"], redis_dep["spec"]["template"]["metadata"]["labels"])
    else:
        assert not [d for d in docs if d["metadata"]["name"] == "redis"], "production uses a managed Redis"
