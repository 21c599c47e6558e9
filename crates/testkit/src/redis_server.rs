//! A private `redis-server` on a free port, and a private Redis Cluster
//! (with replicas for failover tests).

use crate::{free_port, WAIT};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private redis-server on a free port, without persistence.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)start on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Send a signal (`STOP`, `CONT`, ...) to the server.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .args([format!("-{sig}"), c.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill -{sig} redis-server");
        }
    }

    /// Kill the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run one command on a fresh connection.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut c = redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(WAIT)
            .unwrap();
        cmd.query(&mut c).unwrap()
    }

    /// `PUBSUB NUMSUB channel`: subscribers of a channel.
    pub fn numsub(&self, channel: &str) -> i64 {
        let v: Vec<redis::Value> = self.query(redis::cmd("PUBSUB").arg("NUMSUB").arg(channel));
        match v.get(1) {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("unexpected NUMSUB reply {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private Redis Cluster: `n` masters (no replicas) on free ports, slots
/// assigned with `redis-cli --cluster create`; killed on drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        RedisCluster::start_with(n, 0)
    }

    /// `shards` primaries with `replicas` replicas each. With replicas, a
    /// short `cluster-node-timeout` (2 s) and no replica validity limit, so
    /// that a killed primary's replica takes over within a few seconds.
    pub fn start_with(shards: usize, replicas: usize) -> RedisCluster {
        let n = shards * (replicas + 1);
        let dir = std::env::temp_dir().join(format!(
            "wsgate-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for port in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(if replicas > 0 {
                    &[
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-replica-validity-factor",
                        "0",
                    ][..]
                } else {
                    &[][..]
                })
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            children.push(child);
        }
        let cluster = RedisCluster {
            ports,
            children,
            dir,
        };
        for port in &cluster.ports {
            let url = format!("redis://127.0.0.1:{port}/");
            let deadline = Instant::now() + WAIT;
            while redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "cluster node {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node must agree that the cluster is up.
        for port in &cluster.ports {
            let url = format!("redis://127.0.0.1:{port}/");
            let deadline = Instant::now() + WAIT;
            loop {
                let info: String = redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if replicas > 0 {
            cluster.wait_replicated(shards * replicas);
        }
        cluster
    }

    /// Seed URLs, comma-separated (as `--redis-url` takes them with `--redis-cluster`).
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `cmd` on the server that answers it (the one owning its key; the
    /// others answer `MOVED`), or `None` when none does.
    pub fn query_any<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        self.ports
            .iter()
            .find_map(|&port| Self::query(port, std::slice::from_ref(cmd)))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A replicated cluster's parts, for failover tests.
impl RedisCluster {
    fn query<T: redis::FromRedisValue>(port: u16, cmds: &[redis::Cmd]) -> Option<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
        let mut c = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        let (last, before) = cmds.split_last()?;
        for cmd in before {
            cmd.query::<redis::Value>(&mut c).ok()?;
        }
        last.query(&mut c).ok()
    }

    /// `CLUSTER NODES` as one server sees it: (port, flags, primary id or
    /// "-", own id, slot ranges) per node.
    fn nodes(port: u16) -> Option<Vec<(u16, String, String, String, Vec<(u16, u16)>)>> {
        let text: String = Self::query(port, &[redis::cmd("CLUSTER").arg("NODES").clone()])?;
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let node_port = f[1]
                .split(['@', ','])
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let slots = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| match r.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => r.parse().ok().map(|s| (s, s)),
                })
                .collect();
            out.push((
                node_port,
                f[2].to_owned(),
                f[3].to_owned(),
                f[0].to_owned(),
                slots,
            ));
        }
        Some(out)
    }

    /// Until every server sees `n` replicas and every replica is in sync.
    fn wait_replicated(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        for port in &self.ports {
            loop {
                let nodes = Self::nodes(*port).unwrap_or_default();
                let replicas = nodes.iter().filter(|n| n.1.contains("slave")).count();
                let me = nodes.iter().find(|n| n.1.contains("myself"));
                let synced = me.is_some_and(|me| !me.1.contains("slave"))
                    || Self::query::<String>(
                        *port,
                        &[redis::cmd("INFO").arg("replication").clone()],
                    )
                    .is_some_and(|i| i.contains("master_link_status:up"));
                if replicas == n && synced {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster replicas did not sync");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The slot of a key (`CLUSTER KEYSLOT`).
    pub fn slot(&self, key: &str) -> u16 {
        self.ports
            .iter()
            .find_map(|p| Self::query(*p, &[redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).clone()]))
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the primary serving `slot` and of its replicas, as the
    /// first answering server sees it.
    pub fn shard(&self, slot: u16) -> (u16, Vec<u16>) {
        let nodes = self
            .ports
            .iter()
            .find_map(|p| Self::nodes(*p))
            .expect("CLUSTER NODES");
        let (port, _, _, id, _) = nodes
            .iter()
            .find(|n| n.1.contains("master") && n.4.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .expect("a primary for the slot");
        let replicas = nodes.iter().filter(|n| &n.2 == id).map(|n| n.0).collect();
        (*port, replicas)
    }

    /// Whether the server on `port` says it is a primary serving `slot`.
    pub fn serves(&self, port: u16, slot: u16) -> bool {
        Self::nodes(port).is_some_and(|nodes| {
            nodes.iter().any(|n| {
                n.0 == port
                    && n.1.contains("myself")
                    && n.1.contains("master")
                    && n.4.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
        })
    }

    /// `GET key` on one server (a replica too: `READONLY` first).
    pub fn get_on(&self, port: u16, key: &str) -> Option<String> {
        Self::query(
            port,
            &[redis::cmd("READONLY"), redis::cmd("GET").arg(key).clone()],
        )
    }

    /// Send a signal (`STOP`, `CONT`, `KILL`...) to the server on `port`.
    pub fn signal(&self, port: u16, sig: &str) {
        let i = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a port of the cluster");
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.children[i].id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {port}");
    }
}
