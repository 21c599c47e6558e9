"""The real Prometheus, started with the repo's deploy/prometheus/prometheus.yml
(the wsgate job's targets substituted by three real nodes' ops ports, the
intervals shortened to 1s) and its alerts.yml."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from conftest import Cluster
from harness import REPO, WsClient, prom_query, start_prometheus, wait_for

PROM_DIR = REPO / "deploy" / "prometheus"


def substituted_config(ops_targets: list[str]) -> dict:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "wsgate"]
    assert len(job["static_configs"]) == 1
    job["static_configs"][0]["targets"] = ops_targets
    return cfg


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    cluster = Cluster(tmp, nginx=False)
    try:
        targets = [f"127.0.0.1:{n.ops_port}" for n in cluster.nodes]
        proc, url = start_prometheus(tmp / "prometheus", tmp, substituted_config(targets), [PROM_DIR / "alerts.yml"])
        cluster.procs.append(proc)
        yield cluster, url
    finally:
        cluster.close()


def test_every_replica_is_up(stack):
    cluster, url = stack
    expected = {f"127.0.0.1:{n.ops_port}" for n in cluster.nodes}

    def all_up():
        res = prom_query(url, 'up{job="wsgate"}')
        return {r["metric"]["instance"] for r in res if r["value"][1] == "1"} == expected and len(res) == 3
    wait_for("up == 1 for the three wsgate targets", all_up, timeout=30, interval=0.5)
    nodes = {r["metric"]["node"]: r["value"][1] for r in prom_query(url, "wsgate_broker_up")}
    assert nodes == {n.node_id: "1" for n in cluster.nodes}, "every node reports its Redis relay up"


def test_connections_query_matches_the_clients_held_open(stack):
    cluster, url = stack
    plan = {0: 2, 1: 3, 2: 1}
    clients = {i: [WsClient(cluster.nodes[i].ws_url, cluster.token(f"u{i}-{k}")) for k in range(n)]
               for i, n in plan.items()}
    try:
        total = sum(plan.values())

        def matches(expected_total, per_node):
            def check():
                res = prom_query(url, "sum(wsgate_connections_active)")
                by_node = {r["metric"]["node"]: float(r["value"][1])
                           for r in prom_query(url, "sum by (node) (wsgate_connections_active)")}
                return res and float(res[0]["value"][1]) == expected_total and by_node == per_node
            return check
        wait_for(f"sum(wsgate_connections_active) == {total}",
                 matches(total, {cluster.nodes[i].node_id: float(n) for i, n in plan.items()}),
                 timeout=30, interval=0.5)
        for c in clients[1][:2]:
            c.close()
        plan[1] = 1
        wait_for("the gauge to follow two closed clients",
                 matches(total - 2, {cluster.nodes[i].node_id: float(n) for i, n in plan.items()}),
                 timeout=30, interval=0.5)
    finally:
        for cs in clients.values():
            for c in cs:
                c.close()


def test_alert_rules_load_and_evaluate(stack):
    _, url = stack
    from harness import http_get

    def healthy():
        status, _, body = http_get(url + "/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return status == 200 and len(rules) == 5 and all(r["health"] == "ok" for r in rules)
    wait_for("the five alert rules to evaluate with health ok", healthy, timeout=30, interval=0.5)


def test_dashboard_queries_run_against_real_metrics(stack):
    _, url = stack
    dash = json.loads((REPO / "deploy/grafana/dashboards/wsgate.json").read_text())
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$node", ".*")
            prom_query(url, expr)  # asserts the query parses and runs
    assert prom_query(url, 'sum(wsgate_connections_active{node=~".*"})')


def test_a_stopped_replica_shows_down_and_raises_node_down(stack):
    cluster, url = stack
    victim = cluster.nodes[2]
    victim.proc.stop(signal.SIGKILL)
    instance = f"127.0.0.1:{victim.ops_port}"

    def down():
        return [r["metric"]["instance"] for r in prom_query(url, 'up{job="wsgate"} == 0')] == [instance]
    wait_for("up == 0 for the killed replica", down, timeout=30, interval=0.5)

    def alert():
        from harness import http_get
        alerts = json.loads(http_get(url + "/api/v1/alerts")[2])["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "WsgateNodeDown"
                and a["labels"]["instance"] == instance and a["state"] in ("pending", "firing")]
    wait_for("WsgateNodeDown pending for the killed replica", alert, timeout=30, interval=0.5)
