//! Broker failover (PROTOCOL.md section 10) against real redis-server
//! processes: a primary, a replica and three Sentinels; and Redis over TLS.
//!
//! The failover test makes the replica miss the primary's last writes (it is
//! frozen while they happen), kills the primary, and checks that after the
//! promotion no (room, epoch, seq) is handed out twice: the room starts a
//! new epoch, announced to every member, and nothing is lost without notice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wsgate_testkit::{
    assert_failover_stream, epoch_stream, eventually, free_port, http_get, publish_acked,
    wsgate_bin, Node, Ws,
};

/// A redis-server (or Sentinel) child, killed on drop.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start(args: &[&str], port: u16) -> Server {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let server = Server { port, child };
        server.wait_up();
        server
    }

    fn plain(port: u16, extra: &[&str]) -> Server {
        let p = port.to_string();
        let mut args = vec![
            "--port",
            &p,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        args.extend_from_slice(extra);
        Server::start(&args, port)
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.query::<String>(&redis::cmd("PING")).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis on {} did not start", self.port);
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).ok()?;
        let mut c = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        cmd.query(&mut c).ok()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsgate-{name}-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Three Sentinels watching `primary` as `mymaster` (quorum 2, down after
/// 1 s).
fn sentinels(primary: u16, dir: &Path) -> Vec<Server> {
    (0..3)
        .map(|i| {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                     sentinel monitor mymaster 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 4000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            Server::start(&[conf.to_str().unwrap(), "--sentinel"], port)
        })
        .collect()
}

async fn ready(node: &Node) {
    let url = format!("{}/ready", node.ops_url());
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}

/// Publish `m<i>` with key `k<i>` until acknowledged.
async fn publish(ws: &mut Ws, room: &str, i: usize) {
    let limit = Duration::from_secs(30);
    publish_acked(ws, room, json!(format!("m{i}")), &format!("k{i}"), limit).await;
}

#[tokio::test]
async fn a_sentinel_failover_never_reuses_a_seq_and_loses_nothing_silently() {
    let dir = temp_dir("sentinel");
    let primary = Server::plain(free_port(), &[]);
    let replica_port = free_port();
    let p = primary.port.to_string();
    let replica = Server::plain(replica_port, &["--replicaof", "127.0.0.1", &p]);
    let sentinels = sentinels(primary.port, &dir);
    // The Sentinels know the replica before anything else happens.
    eventually("sentinels see the replica", || async {
        let n = sentinels[0]
            .query::<Vec<redis::Value>>(redis::cmd("SENTINEL").arg("replicas").arg("mymaster"))
            .map_or(0, |v| v.len());
        (n == 1).then_some(())
    })
    .await;
    let url = format!(
        "redis+sentinel://{}/mymaster",
        sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let a = Node::start(&["--redis-url", &url]).await;
    let b = Node::start(&["--redis-url", &url]).await;
    ready(&a).await;
    ready(&b).await;
    let (mut on_a, _) = Ws::open(&a.ws_url(), "m-a").await;
    let (mut on_b, _) = Ws::open(&b.ws_url(), "m-b").await;
    let epoch = on_a.join("fo").await["epoch"].as_str().unwrap().to_owned();
    on_b.join("fo").await;
    let (mut publisher, _) = Ws::open(&a.ws_url(), "p").await;
    for i in 0..5 {
        publish(&mut publisher, "fo", i).await;
    }
    eventually("replica has seq 5", || async {
        let seq: Option<String> = replica.query(redis::cmd("GET").arg("wsgate:{fo}:seq"));
        (seq.as_deref() == Some("5")).then_some(())
    })
    .await;
    // The replica misses the next three writes, then the primary dies.
    replica.signal("STOP");
    for i in 5..8 {
        publish(&mut publisher, "fo", i).await;
    }
    drop(primary);
    replica.signal("CONT");
    eventually("sentinel promoted the replica", || async {
        let addr: Option<Vec<String>> = sentinels[0].query(
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg("mymaster"),
        );
        (addr.and_then(|a| a.get(1).cloned()) == Some(replica_port.to_string())).then_some(())
    })
    .await;
    ready(&a).await;
    ready(&b).await;
    for i in 8..11 {
        publish(&mut publisher, "fo", i).await;
    }
    for member in [&mut on_a, &mut on_b] {
        let got = epoch_stream(member, epoch.clone(), 11).await;
        // The messages the replica never got (m5..m7) and the first ones
        // the promoted replica took (m8..) are in different epochs.
        assert_failover_stream(&got, 8, 11);
    }
    drop(replica);
    drop(sentinels);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn min_replicas_answers_unavailable_when_the_replica_does_not_confirm() {
    let primary = Server::plain(free_port(), &[]);
    let p = primary.port.to_string();
    let replica = Server::plain(free_port(), &["--replicaof", "127.0.0.1", &p]);
    eventually("replica linked", || async {
        let info: Option<String> = primary.query(redis::cmd("INFO").arg("replication"));
        info.is_some_and(|i| i.contains("connected_slaves:1") && i.contains("state=online"))
            .then_some(())
    })
    .await;
    let url = format!("redis://127.0.0.1:{}/", primary.port);
    let node = Node::start(&["--redis-url", &url, "--redis-min-replicas", "1"]).await;
    ready(&node).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "u").await;
    let first = ws.publish("mr", json!(1)).await;
    assert_eq!(first["type"], "ack", "{first}");
    replica.signal("STOP");
    let answer = ws.publish("mr", json!(2)).await;
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("replicas"),
        "{answer}"
    );
    replica.signal("CONT");
    // Confirmed again once the replica catches up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = ws.publish("mr", json!(3)).await;
        if answer["type"] == "ack" {
            break;
        }
        assert!(Instant::now() < deadline, "never confirmed again: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A private CA and a server certificate it signed for 127.0.0.1.
fn certificates(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
    )
    .ok()?;
    let ok = run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    ok.then(|| {
        (
            dir.join("ca.pem"),
            dir.join("server.pem"),
            dir.join("server.key"),
        )
    })
}

#[tokio::test]
async fn rediss_with_a_private_ca_relays_and_a_wrong_ca_stops_the_start() {
    let dir = temp_dir("rediss");
    let (ca, cert, key) = certificates(&dir).expect("openssl makes the test certificates");
    let port = free_port();
    let p = port.to_string();
    let _tls = {
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &p,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                ca.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        Server { port, child }
    };
    let url = format!("rediss://127.0.0.1:{port}/");
    let a = Node::start(&["--redis-url", &url, "--redis-ca-cert", ca.to_str().unwrap()]).await;
    let b = Node::start(&["--redis-url", &url, "--redis-ca-cert", ca.to_str().unwrap()]).await;
    ready(&a).await;
    ready(&b).await;
    let (mut member, _) = Ws::open(&b.ws_url(), "m").await;
    member.join("tls").await;
    let (mut p, _) = Ws::open(&a.ws_url(), "p").await;
    assert_eq!(p.publish("tls", json!("over tls")).await["seq"], 1);
    let got = wsgate_testkit::messages(&mut member, 1).await;
    assert_eq!(got[0].2, json!("over tls"));

    // Another CA: the binary refuses to start, with one line on stderr.
    let other = temp_dir("rediss-other");
    let (wrong_ca, _, _) = certificates(&other).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(wsgate_bin())
            .args([
                "serve",
                "--jwt-secret",
                "s3cret",
                "--listen",
                "127.0.0.1:0",
                "--ops-listen",
                "127.0.0.1:0",
                "--redis-url",
                &url,
                "--redis-ca-cert",
                wrong_ca.to_str().unwrap(),
            ])
            .output(),
    )
    .await
    .expect("wsgate exits")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one clear line: {stderr}");
    assert!(lines[0].contains("TLS"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other);
}
