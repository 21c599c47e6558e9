//! Every scenario, briefly and at a tiny scale, against real gateway nodes
//! (in-process, over a private redis-server; `reconnect` against the built
//! binary, which it kills). These check the tool's logic and its verdicts,
//! never a timing: generous limits, and only pass/fail and counts asserted.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use wsgate_bench::cli::{self, Cli, Scenario};
use wsgate_bench::report::Report;
use wsgate_testkit::{wsgate_bin, BinNode, Node, Redis, SECRET};

/// Flags that lift the per-connection publish limit for the load.
const NODE_FLAGS: &[&str] = &["--publish-rate", "100000", "--publish-burst", "100000"];

fn scenario(args: &[&str]) -> Scenario {
    let mut all = vec!["wsgate-bench"];
    all.extend_from_slice(args);
    let cli::Command::Scenario(scenario) = Cli::try_parse_from(all).unwrap().command else {
        panic!("not a scenario: {args:?}");
    };
    scenario.validate().unwrap();
    scenario
}

async fn run(args: &[&str]) -> (Report, Value) {
    let s = scenario(args);
    let report = tokio::time::timeout(s.deadline(), wsgate_bench::scenario::run(&s))
        .await
        .expect("within the scenario's deadline")
        .expect("scenario runs");
    let json: Value = serde_json::from_str(&report.json_line()).unwrap();
    (report, json)
}

struct Cluster {
    _redis: Redis,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let redis = Redis::start();
        let url = redis.url();
        let mut nodes = Vec::new();
        for _ in 0..n {
            let mut flags = vec!["--redis-url", url.as_str()];
            flags.extend_from_slice(NODE_FLAGS);
            nodes.push(Node::start(&flags).await);
        }
        Cluster {
            _redis: redis,
            nodes,
        }
    }

    /// `--url`/`--ops-url` for every node, and the secret.
    fn flags(&self) -> Vec<String> {
        let mut f = Vec::new();
        for n in &self.nodes {
            f.extend([
                "--url".to_owned(),
                n.ws_url(),
                "--ops-url".to_owned(),
                n.ops_url(),
            ]);
        }
        f.extend(["--jwt-secret".to_owned(), SECRET.to_owned()]);
        f
    }
}

fn with<'a>(base: &'a [String], args: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = args.to_vec();
    v.extend(base.iter().map(String::as_str));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_on_two_nodes() {
    let cluster = Cluster::start(2).await;
    let flags = cluster.flags();

    let (r, j) = run(&with(&flags, &["connect", "-n", "50"])).await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["setup"]["connected"], 50);
    assert_eq!(j["setup"]["nodes"].as_object().unwrap().len(), 2);

    let (r, j) = run(&with(
        &flags,
        &["idle", "-n", "40", "--rooms", "4", "--hold", "100ms"],
    ))
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["held"], 40);
    assert!(j["server_bytes_per_connection"].is_number(), "{j}");
    assert_eq!(j["presence"], false);

    let (r, j) = run(&with(
        &flags,
        &[
            "idle",
            "-n",
            "40",
            "--rooms",
            "4",
            "--hold",
            "100ms",
            "--presence",
        ],
    ))
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["held"], 40);
    assert_eq!(j["presence"], true);
    assert_eq!(j["distinct_users"], true);

    let (r, j) = run(&with(
        &flags,
        &[
            "fanout", "-s", "20", "-p", "2", "-r", "100", "-d", "1s", "--warmup", "200ms",
        ],
    ))
    .await;
    assert!(r.ok(), "{}", r.human());
    let seq = &j["seq"];
    assert_eq!(seq["lost"], 0);
    assert_eq!(seq["duplicated"], 0);
    // Every subscriber saw every message published.
    assert!(seq["received"].as_u64().unwrap() >= 20 * 100, "{j}");
    assert_eq!(seq["received"].as_u64().unwrap() % 20, 0, "{j}");
    assert!(j["latency"]["count"].as_u64().unwrap() > 0);

    let (r, j) = run(&with(
        &flags,
        &[
            "rooms", "-n", "30", "-k", "4", "-r", "5", "-d", "1s", "--warmup", "200ms",
        ],
    ))
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["seq"]["lost"], 0);
    assert!(j["seq"]["received"].as_u64().unwrap() > 0);

    let (r, j) = run(&with(
        &flags,
        &[
            "ramp",
            "-s",
            "10",
            "--start-rate",
            "200",
            "--factor",
            "2",
            "--max-steps",
            "2",
            "--step",
            "500ms",
            "--p99-limit",
            "10s",
        ],
    ))
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["steps"].as_array().unwrap().len(), 2);
    assert_eq!(j["best_rate"], 400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_node_fails_the_run() {
    let port = wsgate_testkit::free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (r, j) = run(&["connect", "-n", "3", "--url", &url, "--jwt-secret", "s"]).await;
    assert!(!r.ok());
    assert_eq!(j["setup"]["failures"]["refused"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_counts_401() {
    let node = Node::start(&[]).await;
    let url = node.ws_url();
    let (r, j) = run(&[
        "connect",
        "-n",
        "5",
        "--url",
        &url,
        "--jwt-secret",
        "not-the-secret",
    ])
    .await;
    assert!(!r.ok());
    assert_eq!(j["setup"]["failures"]["http_401"], 5);
}

/// `--transport sse`: idle members and fan-out subscribers on `GET /sse`,
/// joined by `POST /sse/{conn}`, the publisher on WebSocket; every
/// subscriber gets every message, checked by seq as over WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_fanout_over_sse() {
    let cluster = Cluster::start(2).await;
    let flags = cluster.flags();

    let (r, j) = run(&with(
        &flags,
        &[
            "idle",
            "-n",
            "20",
            "--rooms",
            "2",
            "--hold",
            "100ms",
            "--transport",
            "sse",
        ],
    ))
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["held"], 20);
    assert_eq!(j["transport"], "sse");
    assert_eq!(j["setup"]["nodes"].as_object().unwrap().len(), 2, "{j}");

    let fanout: Vec<&str> = "fanout -s 10 -p 1 -r 50 -d 1s --warmup 200ms --transport sse"
        .split(' ')
        .collect();
    let (r, j) = run(&with(&flags, &fanout)).await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["transport"], "sse");
    let seq = &j["seq"];
    assert_eq!(seq["lost"], 0, "{j}");
    assert_eq!(seq["duplicated"], 0, "{j}");
    assert!(seq["received"].as_u64().unwrap() >= 10 * 50, "{j}");
    assert_eq!(seq["received"].as_u64().unwrap() % 10, 0, "{j}");
}

/// The built `wsgate` binary over a private redis-server, for the
/// scenarios that kill a node.
struct BinCluster {
    bin: std::path::PathBuf,
    redis: Redis,
}

impl BinCluster {
    /// `None` (test skipped) when the binary is not built.
    fn start() -> Option<BinCluster> {
        let bin = wsgate_bin();
        if !bin.exists() {
            eprintln!(
                "skipped: no wsgate binary at {} (cargo build -p wsgate)",
                bin.display()
            );
            return None;
        }
        Some(BinCluster {
            bin,
            redis: Redis::start(),
        })
    }

    async fn node(&self) -> BinNode {
        self.node_with(&[]).await
    }

    async fn node_with(&self, extra: &[&str]) -> BinNode {
        let url = self.redis.url();
        let mut flags = vec!["--redis-url", url.as_str()];
        flags.extend_from_slice(NODE_FLAGS);
        flags.extend_from_slice(extra);
        BinNode::start_with(&self.bin, &flags).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_a_node_is_killed() {
    let Some(bins) = BinCluster::start() else {
        return;
    };
    let doomed = bins.node().await;
    let survivor = bins.node().await;
    let pid = doomed.pid().to_string();
    let (urls, survivor_ops) = ([doomed.ws_url(), survivor.ws_url()], survivor.ops_url());
    let (r, j) = run(&[
        "reconnect",
        "-c",
        "30",
        "-r",
        "50",
        "--kill-pid",
        &pid,
        "--before",
        "500ms",
        "--after",
        "300ms",
        "--url",
        &urls[0],
        "--url",
        &urls[1],
        "--ops-url",
        &survivor_ops,
        "--jwt-secret",
        SECRET,
    ])
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["affected"], 15);
    assert_eq!(j["resumed"], 15);
    assert_eq!(j["seq"]["lost"], 0);
    assert_eq!(j["lost"], 0);
    assert_eq!(j["lagging"], 0);
    assert_eq!(j["drain"]["ended"], "caught_up");
    assert_eq!(j["seq"]["duplicated"], 0);
}

/// The storm into presence-enabled rooms: 30 clients, each its own user, in
/// 3 rooms joined with `"presence":true`, 15 on a node that is SIGKILLed.
/// After the killed node's presence lease (`--presence-ttl 1s`) + 5 s + 2 s,
/// every room's `presence` on the survivor lists exactly the 10 users
/// connected in it: the killed node's users are present again through their
/// new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_into_presence_rooms_keeps_presence_right() {
    let Some(bins) = BinCluster::start() else {
        return;
    };
    let ttl = ["--presence-ttl", "1s"];
    let doomed = bins.node_with(&ttl).await;
    let survivor = bins.node_with(&ttl).await;
    let pid = doomed.pid().to_string();
    let targets = [
        "--url".to_owned(),
        doomed.ws_url(),
        "--url".to_owned(),
        survivor.ws_url(),
        "--ops-url".to_owned(),
        survivor.ops_url(),
        "--jwt-secret".to_owned(),
        SECRET.to_owned(),
    ];
    let plan = "reconnect -c 30 --rooms 3 --presence -r 20 --before 500ms --after 300ms --presence-settle 8s";
    let mut args: Vec<&str> = plan.split(' ').collect();
    args.extend(["--kill-pid", &pid]);
    let (r, j) = run(&with(&targets, &args)).await;
    let human = r.human();
    assert!(r.ok(), "{human}");
    assert_eq!(j["affected"], 15, "{human}");
    assert_eq!(j["resumed"], 15, "{human}");
    assert_eq!(j["lost"], 0, "{human}");
    let p = &j["presence"];
    assert_eq!(p["answers"], 3, "{human}");
    assert_eq!(p["wrong"], 0, "{human}");
    assert_eq!(p["failed"], 0, "{human}");
    assert_eq!(p["expected_users"], 30, "{human}");
    assert_eq!(p["answered_users"], 30, "{human}");
    // Members heard of each other's joins.
    assert!(j["presence_events"].as_u64().unwrap() > 0, "{human}");
}

/// Clients that stop reading around the end of publishing lag; they lose
/// nothing. Cut off by a short `--drain` while they are stalled, the run
/// reports them as lagging (inconclusive), not as losing messages; with a
/// drain that waits, they catch up and the run passes with the lag shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_report_lag_not_loss() {
    let Some(bins) = BinCluster::start() else {
        return;
    };
    let survivor = bins.node().await;
    let (survivor_url, survivor_ops) = (survivor.ws_url(), survivor.ops_url());
    for drain in ["300ms", "60s"] {
        let doomed = bins.node().await;
        let (pid, doomed_url) = (doomed.pid().to_string(), doomed.ws_url());
        let (r, j) = run(&[
            "reconnect",
            "-c",
            "20",
            "-r",
            "50",
            "--kill-pid",
            &pid,
            "--before",
            "300ms",
            "--after",
            "1500ms",
            "--stall-share",
            "0.5",
            "--stall",
            "2s",
            "--idle",
            "4s",
            "--drain",
            drain,
            "--url",
            &doomed_url,
            "--url",
            &survivor_url,
            "--ops-url",
            &survivor_ops,
            "--jwt-secret",
            SECRET,
        ])
        .await;
        let human = r.human();
        assert_eq!(j["resumed"], 10, "{human}");
        assert!(
            j["drain"]["at_start"]["members"].as_u64().unwrap() > 0,
            "{human}"
        );
        assert_eq!(j["lost"], 0, "{human}");
        assert_eq!(j["seq"]["lost"], 0, "{human}");
        assert_eq!(j["seq"]["duplicated"], 0, "{human}");
        if drain == "300ms" {
            assert!(!r.ok(), "{human}");
            assert_eq!(j["drain"]["ended"], "limit", "{human}");
            assert!(j["lagging"].as_u64().unwrap() > 0, "{human}");
            assert!(human.contains("lagging (not counted as lost)"), "{human}");
            assert!(!human.contains("messages lost"), "{human}");
        } else {
            assert!(r.ok(), "{human}");
            assert_eq!(j["drain"]["ended"], "caught_up", "{human}");
            assert_eq!(j["lagging"], 0, "{human}");
            assert_eq!(j["seq"]["behind"], 0, "{human}");
        }
    }
}

/// The soak at a tiny scale over two nodes of the built binary: subscribers,
/// publishers with acks, churners and storms; one node is SIGKILLed once
/// messages flow, its subscribers resume on the other. Every acked message
/// reaches every member that was due it: 0 lost without notice, 0 doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_checks_every_acked_message_across_a_node_kill() {
    let Some(bins) = BinCluster::start() else {
        return;
    };
    let mut doomed = bins.node().await;
    let survivor = bins.node().await;
    let ops = survivor.ops_url();
    let mut args: Vec<String> = [
        "soak",
        "-d",
        "4s",
        "--rooms",
        "3",
        "-s",
        "12",
        "-p",
        "2",
        "-r",
        "20",
        "--storm-every",
        "1s",
        "--storm",
        "20",
        "-c",
        "4",
        "--idle",
        "2s",
        "--drain",
        "30s",
    ]
    .map(String::from)
    .to_vec();
    for url in [doomed.ws_url(), survivor.ws_url()] {
        args.extend(["--url".to_owned(), url]);
    }
    args.extend(["--jwt-secret".to_owned(), SECRET.to_owned()]);
    let soak = tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args).await
    });
    wsgate_testkit::eventually("messages flowing through the survivor", || async {
        let m = wsgate_testkit::metrics(&ops).await;
        (m.value("wsgate_messages_delivered_total", &[]) > 0.0).then_some(())
    })
    .await;
    doomed.kill();
    let (r, j) = soak.await.unwrap();
    let human = r.human();
    eprintln!("{human}");
    assert!(r.ok(), "{human}");
    let v = &j["verdict"];
    assert!(v["acked"].as_u64().unwrap() > 0, "{human}");
    assert!(v["due"].as_u64().unwrap() > 0, "{human}");
    assert_eq!(v["lost_without_notice"], 0, "{human}");
    assert_eq!(v["duplicates"], 0, "{human}");
    assert_eq!(v["conflicts"], 0, "{human}");
    assert!(j["drops"].as_u64().unwrap() > 0, "{human}");
    assert!(j["churn_joins"].as_u64().unwrap() > 0, "{human}");
}

#[test]
fn binary_refuses_bad_flags_and_remote_targets() {
    let bin = env!("CARGO_BIN_EXE_wsgate-bench");
    let out = Command::new(bin)
        .args([
            "fanout",
            "--jwt-secret",
            "s",
            "--url",
            "ws://192.0.2.1:80/ws",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let out = Command::new(bin).args(["idle"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn binary_prints_a_json_line_last() {
    let bin = env!("CARGO_BIN_EXE_wsgate-bench");
    let port = wsgate_testkit::free_port();
    let out = Command::new(bin)
        .args([
            "connect",
            "-n",
            "2",
            "--jwt-secret",
            "s",
            "--connect-timeout",
            "2s",
        ])
        .args(["--url", &format!("ws://127.0.0.1:{port}/ws")])
        .output()
        .unwrap();
    // Nothing listens: the run completes and fails its own check.
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let j: Value = serde_json::from_str(last).unwrap();
    assert_eq!(j["scenario"], "connect");
    assert_eq!(j["ok"], false);
    assert!(stdout.contains("== wsgate-bench connect =="));
}

#[tokio::test]
async fn drain_pid_sends_sigterm() {
    // The signal helper on a harmless child of our own.
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    wsgate_bench::scenario::reconnect::signal(child.id(), "TERM").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(!status.success());
}

/// `wsgate-bench floor-server` as a child process, killed on drop.
struct Floor {
    child: std::process::Child,
    url: String,
}

impl Floor {
    fn start() -> Floor {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate-bench"))
            .args(["floor-server", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let addr = line.trim().strip_prefix("listening ").unwrap().to_owned();
        Floor {
            child,
            url: format!("ws://{addr}/ws"),
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_the_floor_server() {
    let floor = Floor::start();
    let pid = floor.child.id().to_string();
    let (r, j) = run(&[
        "fanout",
        "-s",
        "20",
        "-p",
        "1",
        "-r",
        "100",
        "-d",
        "1s",
        "--warmup",
        "200ms",
        "--url",
        &floor.url,
        "--pid",
        &pid,
        "--jwt-secret",
        "s",
    ])
    .await;
    assert!(r.ok(), "{}", r.human());
    assert_eq!(j["subscribers_setup"]["nodes"]["floor"], 20, "{j}");
    let seq = &j["seq"];
    assert_eq!(seq["lost"], 0);
    assert_eq!(seq["duplicated"], 0);
    assert_eq!(seq["out_of_order"], 0);
    assert!(seq["received"].as_u64().unwrap() >= 20 * 100, "{j}");
    assert_eq!(seq["received"].as_u64().unwrap() % 20, 0, "{j}");
    // Its CPU is read from /proc like a node's.
    assert!(j["server_cpu_us_per_delivery"].is_number(), "{j}");
    assert_eq!(
        j["pids"][0]["pid"].as_u64(),
        Some(u64::from(floor.child.id()))
    );

    // The floor sends plain frames of the wsgate shape: a message with
    // 32 bytes of padding is 140 to 180 bytes on the wire (plus a share of
    // the publisher's ack).
    let wire = j["wire_bytes_per_delivery"].as_f64().unwrap();
    assert!((120.0..260.0).contains(&wire), "{j}");
}

#[test]
fn floor_server_refuses_a_remote_listen_address() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate-bench"))
        .args(["floor-server", "--listen", "192.0.2.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_payload_and_deflate_offer() {
    let cluster = Cluster::start(2).await;
    let flags = cluster.flags();
    let mut reports = Vec::new();
    for deflate in [false, true] {
        let mut args = vec![
            "fanout",
            "-s",
            "10",
            "-p",
            "1",
            "-r",
            "50",
            "-d",
            "1s",
            "--warmup",
            "200ms",
            "--payload-bytes",
            "2048",
        ];
        if deflate {
            args.push("--deflate");
        }
        let (r, j) = run(&with(&flags, &args)).await;
        assert!(r.ok(), "{}", r.human());
        assert_eq!(j["seq"]["lost"], 0);
        assert_eq!(j["seq"]["duplicated"], 0);
        assert!(j["seq"]["received"].as_u64().unwrap() >= 10 * 50, "{j}");
        assert_eq!(j["deflate_offered"], deflate);
        reports.push(j);
    }
    let plain = reports[0]["wire_bytes_per_delivery"].as_f64().unwrap();
    // A ~2 KiB document in a message frame.
    assert!((2000.0..2600.0).contains(&plain), "{}", reports[0]);
    let offered = &reports[1];
    let bytes = offered["wire_bytes_per_delivery"].as_f64().unwrap();
    if offered["deflate_negotiated"] == 0 {
        // The server did not take the extension: frames came plain.
        assert!((2000.0..2600.0).contains(&bytes), "{offered}");
    } else {
        // Every subscriber and publisher negotiated it, and it paid.
        assert_eq!(offered["deflate_negotiated"], 11, "{offered}");
        assert!(bytes < plain / 2.0, "{offered}");
    }
}
