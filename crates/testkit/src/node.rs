//! Gateway nodes: in-process on free loopback ports, or the built `wsgate`
//! binary as a child process (built first when missing).

use crate::{http_get, metrics, Metrics, SECRET, WAIT};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn parse_serve(args: &[String]) -> wsgate::config::ServeArgs {
    use clap::Parser;
    use wsgate::config::{Cli, Command};
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("bad test flags: {e}"));
    match cli.command {
        Some(Command::Serve(s)) => s,
        _ => cli.serve,
    }
}

/// A gateway node running in this process.
pub struct Node {
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    pub node_id: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

static NODE_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

impl Node {
    /// Start a node with the test secret and these extra `serve` flags.
    pub async fn start(extra: &[&str]) -> Node {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), extra).await
    }

    /// Like [`start`](Self::start), serving on a listener the test bound
    /// itself (to bring "the same node" back on the same port).
    pub async fn start_on(public: TcpListener, extra: &[&str]) -> Node {
        let mut args: Vec<String> = ["wsgate", "serve", "--log", "warn"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let has = |flag: &str| {
            extra
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        if !has("--jwt-secret") && !has("--jwt-public-key") && !has("--jwt-jwks-url") {
            args.extend(["--jwt-secret".into(), SECRET.into()]);
        }
        let node_id = if has("--node-id") {
            let i = extra.iter().position(|a| *a == "--node-id").unwrap();
            extra[i + 1].to_string()
        } else {
            let id = format!(
                "node-{}",
                NODE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            args.extend(["--node-id".into(), id.clone()]);
            id
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let serve = parse_serve(&args);
        let (config, _) = serve
            .into_config()
            .unwrap_or_else(|e| panic!("config: {e}"));
        let resources =
            wsgate::Resources::load(&config).unwrap_or_else(|e| panic!("resources: {e}"));
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = public.local_addr().unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let stop = CancellationToken::new();
        let run_stop = stop.clone();
        let task = tokio::spawn(async move {
            wsgate::run(
                wsgate::Listeners { public, ops },
                config,
                resources,
                run_stop,
            )
            .await
            .unwrap();
        });
        let node = Node {
            addr,
            ops: ops_addr,
            node_id,
            stop,
            task: Some(task),
        };
        node.wait_ready_or_up().await;
        node
    }

    async fn wait_ready_or_up(&self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok((200, _, _)) = http_get(&format!("{}/health", self.ops_url())).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("node did not come up");
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn ops_url(&self) -> String {
        format!("http://{}", self.ops)
    }

    /// Start the graceful drain (as SIGTERM would) without waiting.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// Drain and wait until the node has stopped.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("node stopped in time")
                .expect("node task");
        }
    }

    /// The node's metrics.
    pub async fn metrics(&self) -> Metrics {
        metrics(&self.ops_url()).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `wsgate` binary: `$WSGATE_BIN`, else next to the test executable's
/// target directory (`target/<profile>/wsgate`), built there first when
/// missing (only the gateway's own tests make cargo build it).
pub fn wsgate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WSGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("wsgate");
    if !bin.exists() {
        build_wsgate(dir);
    }
    bin
}

/// `cargo build -p wsgate --bin wsgate` into the target directory `profile_dir`
/// (`<target>/debug` or `<target>/release`) belongs to, once per process
/// (tests run on threads); test processes running at once are serialized by
/// cargo's own lock on the target directory.
fn build_wsgate(profile_dir: &std::path::Path) {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built && profile_dir.join("wsgate").exists() {
        return;
    }
    let target = profile_dir.parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "wsgate",
            "--bin",
            "wsgate",
            "--target-dir",
        ])
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build wsgate: {e}"));
    assert!(
        status.success(),
        "cargo build -p wsgate --bin wsgate failed"
    );
    *built = true;
}

/// The binary as a child process on free loopback ports.
pub struct BinNode {
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl BinNode {
    /// Start `wsgate serve` with the test secret plus `extra`; waits for `/health`.
    pub async fn start(extra: &[&str]) -> BinNode {
        Self::start_with(&wsgate_bin(), extra).await
    }

    pub async fn start_with(bin: &std::path::Path, extra: &[&str]) -> BinNode {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "wsgate-test-{}-{}",
            std::process::id(),
            NODE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let stdout = dir.join("stdout.log");
        let stderr = dir.join("stderr.log");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--ops-listen".into(),
            ops.to_string(),
        ];
        if !extra.iter().any(|a| a.starts_with("--jwt-")) {
            args.extend(["--jwt-secret".into(), SECRET.into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut node = BinNode {
            addr,
            ops,
            child,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _, _)) = http_get(&format!("http://{ops}/health")).await {
                return node;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!(
                    "wsgate exited early ({status}): {}",
                    std::fs::read_to_string(&node.stderr).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "wsgate did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory (`VmRSS` of `/proc/<pid>/status`), KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
    pub fn ops_url(&self) -> String {
        format!("http://{}", self.ops)
    }

    /// Send a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Everything the process logged so far (stdout and stderr).
    pub fn logs(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for BinNode {
    fn drop(&mut self) {
        self.kill();
    }
}
