//! Test kit shared by the workspace's integration tests: real gateway nodes
//! (in-process on `127.0.0.1:0`, or the built binary as a child process), a
//! private `redis-server` on a free port, tokens signed with the test secret,
//! a raw WebSocket test client, a small HTTP/1.1 client and a Prometheus text
//! reader. Everything talks to loopback only, and every wait is bounded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity,
    missing_docs
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use wsgate_protocol::ServerFrame;

/// The HMAC secret every test node uses.
pub const SECRET: &str = "wsgate-test-secret";

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A token for `sub` with these grants, valid for `ttl`.
pub fn token(sub: &str, rooms: &[&str], publish: &[&str], ttl: Duration) -> String {
    let rooms: Vec<String> = rooms.iter().map(|s| s.to_string()).collect();
    let publish: Vec<String> = publish.iter().map(|s| s.to_string()).collect();
    wsgate::auth::mint_hs256(
        SECRET.as_bytes(),
        &wsgate::auth::MintRequest {
            sub,
            rooms: &rooms,
            publish: &publish,
            ttl,
            issuer: None,
            audience: None,
        },
    )
    .unwrap()
}

/// A token that may join and publish to every room for an hour.
pub fn any_token(sub: &str) -> String {
    token(sub, &["*"], &["*"], Duration::from_secs(3600))
}

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
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = public.local_addr().unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let stop = CancellationToken::new();
        let run_stop = stop.clone();
        let task = tokio::spawn(async move {
            wsgate::run(wsgate::Listeners { public, ops }, config, run_stop)
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

/// An HTTP response: status, headers (lower-case names), body.
pub type HttpResponse = (u16, Vec<(String, String)>, String);

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`).
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let rest = url.strip_prefix("http://").expect("http:// URL");
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fut = async {
        let mut s = TcpStream::connect(host).await?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        s.write_all(body).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(WAIT, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "http timeout"))??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// `GET url`.
pub async fn http_get(url: &str) -> std::io::Result<HttpResponse> {
    http("GET", url, &[], b"").await
}

/// Header value from an [`HttpResponse`].
pub fn header<'a>(resp: &'a HttpResponse, name: &str) -> Option<&'a str> {
    resp.1
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Parsed Prometheus text exposition: `(name, labels, value)` samples.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: Vec<(String, Vec<(String, String)>, f64)>,
}

impl Metrics {
    /// Parse the text format (comments skipped; label values unescaped).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match name_labels.find('{') {
                Some(i) => {
                    let inner = name_labels[i + 1..].trim_end_matches('}');
                    let mut labels = Vec::new();
                    let mut rest = inner;
                    while let Some(eq) = rest.find("=\"") {
                        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
                        let mut val = String::new();
                        let mut chars = rest[eq + 2..].char_indices();
                        let mut end = 0;
                        while let Some((j, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    if let Some((_, n)) = chars.next() {
                                        val.push(if n == 'n' { '\n' } else { n });
                                    }
                                }
                                '"' => {
                                    end = eq + 2 + j + 1;
                                    break;
                                }
                                c => val.push(c),
                            }
                        }
                        labels.push((key, val));
                        rest = &rest[end..];
                    }
                    (name_labels[..i].to_owned(), labels)
                }
                None => (name_labels.to_owned(), Vec::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// The value of `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// Like [`get`](Self::get), 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// Fetch and parse `/metrics` from an ops base URL.
pub async fn metrics(ops_url: &str) -> Metrics {
    let (status, _, body) = http_get(&format!("{ops_url}/metrics")).await.unwrap();
    assert_eq!(status, 200);
    Metrics::parse(&body)
}

/// Poll `check` every 20 ms until it returns `Some`, at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_for(what, WAIT, check).await
}

/// A raw WebSocket test client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

/// Why an upgrade was refused: the HTTP status and headers.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// How a connection ended, seen by the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A Close frame with this code.
    Close(u16),
    /// The TCP connection ended without a Close frame.
    Dropped,
}

impl Ws {
    /// Connect with an optional token (header) and Origin.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Ws, Refused> {
        let mut req = url.into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        if let Some(o) = origin {
            req.headers_mut()
                .insert("origin", HeaderValue::from_str(o).unwrap());
        }
        let connected = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect timed out");
        match connected {
            Ok((stream, _)) => Ok(Ws { stream, next_id: 0 }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Refused {
                status: resp.status().as_u16(),
                headers: resp
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                    .collect(),
            }),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    /// Connect with a token that may do everything, and read `welcome`.
    pub async fn open(url: &str, sub: &str) -> (Ws, wsgate_protocol::Welcome) {
        Self::open_with(url, &any_token(sub)).await
    }

    /// Connect with `token` and read `welcome`.
    pub async fn open_with(url: &str, token: &str) -> (Ws, wsgate_protocol::Welcome) {
        let mut ws = Ws::connect(url, Some(token), None)
            .await
            .unwrap_or_else(|r| panic!("refused: {r:?}"));
        match ws.frame().await {
            ServerFrame::Welcome(w) => (ws, w),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Send a text frame.
    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(WAIT, self.stream.send(Message::text(text)))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// Send a JSON value as a text frame.
    pub async fn send(&mut self, v: serde_json::Value) {
        self.send_text(&v.to_string()).await;
    }

    /// A fresh request id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// The next text frame as JSON (Ping/Pong skipped).
    pub async fn json(&mut self) -> serde_json::Value {
        let text = self.text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}"))
    }

    /// The next text frame (Ping/Pong skipped); panics on close.
    pub async fn text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("no frame within the wait")
                .expect("stream ended")
                .expect("read error");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame, parsed.
    pub async fn frame(&mut self) -> ServerFrame {
        let text = self.text().await;
        ServerFrame::parse(&text).unwrap_or_else(|e| panic!("bad frame {text:?}: {e}"))
    }

    /// Join and return the `joined` answer (as JSON).
    pub async fn join(&mut self, room: &str) -> serde_json::Value {
        let id = self.id();
        self.send(serde_json::json!({"type":"join","room":room,"id":id}))
            .await;
        let v = self.json().await;
        assert_eq!(v["type"], "joined", "join {room}: {v}");
        assert_eq!(v["id"], id.as_str());
        v
    }

    /// Publish and return the answer (an `ack` or an `error`).
    pub async fn publish(&mut self, room: &str, data: serde_json::Value) -> serde_json::Value {
        let id = self.id();
        self.send(serde_json::json!({"type":"publish","room":room,"data":data,"id":id}))
            .await;
        // Skip room messages until the direct answer arrives.
        loop {
            let v = self.json().await;
            if v["id"] == id.as_str() {
                return v;
            }
            assert_eq!(v["type"], "message", "unexpected frame {v}");
        }
    }

    /// Read until the connection ends; the close code if a Close frame came.
    pub async fn ended(&mut self) -> Ended {
        loop {
            let next = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("connection did not end within the wait");
            match next {
                Some(Ok(Message::Close(Some(f)))) => return Ended::Close(u16::from(f.code)),
                Some(Ok(Message::Close(None))) => return Ended::Close(1005),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }

    /// Send a Close frame with `code`.
    pub async fn close(&mut self, code: u16) {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.stream.send(Message::Close(Some(frame))).await;
    }
}

/// A TCP forwarder on a free loopback port, to cut one client off a server
/// (for example one node off Redis) while the server keeps running.
pub struct TcpProxy {
    pub port: u16,
    enabled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// While true, bytes from the target are held back from the client.
    held: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Forward 127.0.0.1:`port` to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let enabled = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let held = Arc::new(tokio::sync::watch::channel(false).0);
        let (en, gen, hold) = (enabled.clone(), generation.clone(), held.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !en.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen.subscribe();
                let mut held = hold.subscribe();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_read, mut in_write) = inbound.split();
                    let (mut out_read, mut out_write) = outbound.split();
                    let up = tokio::io::copy(&mut in_read, &mut out_write);
                    // Target to client, each chunk waiting while held.
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match out_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if held.wait_for(|h| !*h).await.is_err()
                                        || in_write.write_all(&buf[..n]).await.is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy {
            port,
            enabled,
            generation,
            held,
            task,
        }
    }

    /// Stop passing bytes from the target to the client (the client's bytes
    /// still reach the target), on open and new connections, until
    /// [`restore`](Self::restore): for example to lose a server's answer.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Drop every forwarded connection and refuse new ones.
    pub fn cut(&self) {
        self.enabled
            .store(false, std::sync::atomic::Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forward again (both ways).
    pub fn restore(&self) {
        self.held.send_replace(false);
        self.enabled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A redis:// URL through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A collector of one member's room messages: (seq, from, data).
pub async fn messages(ws: &mut Ws, n: usize) -> Vec<(u64, String, serde_json::Value)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = ws.json().await;
        if v["type"] == "message" {
            out.push((
                v["seq"].as_u64().unwrap(),
                v["from"].as_str().unwrap().to_owned(),
                v["data"].clone(),
            ));
        }
    }
    out
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub` that may join and publish everywhere, issued now,
/// valid for an hour; edit the returned object to make a bad token.
pub fn claims(sub: &str) -> serde_json::Value {
    let now = now_secs();
    serde_json::json!({
        "sub": sub,
        "iat": now,
        "exp": now + 3600,
        "rooms": ["*"],
        "publish": ["*"],
    })
}

/// Sign `claims` as a compact JWT with `alg` (`"HS256"`, `"RS256"`,
/// `"ES256"`, ...): `key` is the HMAC secret for HS*, else a PEM private key.
pub fn sign(alg: &str, key: &[u8], claims: &serde_json::Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let alg: Algorithm = alg.parse().unwrap();
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(key),
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            EncodingKey::from_rsa_pem(key).unwrap()
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key).unwrap(),
        other => panic!("sign: unsupported algorithm {other:?}"),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
}

/// Sign `claims` with HS256 and the test secret.
pub fn sign_hs256(claims: &serde_json::Value) -> String {
    sign("HS256", SECRET.as_bytes(), claims)
}

/// An unsigned token (`alg: none`, empty signature).
pub fn unsigned(claims: &serde_json::Value) -> String {
    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// WebSocket opcodes, for [`RawWs`].
pub mod opcode {
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A WebSocket client written by hand over TCP, for what a real client
/// refuses to do: send unmasked frames or invalid UTF-8, never answer a
/// Ping, never read. It does not answer anything by itself.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrade `GET /ws` on `addr` with `token` (header); panics unless 101.
    pub async fn connect(addr: SocketAddr, token: &str) -> RawWs {
        Self::connect_with(addr, token, None).await
    }

    /// Like [`connect`](Self::connect), with a small socket receive buffer
    /// (`SO_RCVBUF`) when given, so that a client that does not read backs
    /// the server up quickly.
    pub async fn connect_with(addr: SocketAddr, token: &str, rcvbuf: Option<u32>) -> RawWs {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect timed out")
            .unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed during the upgrade");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("no upgrade response within the wait");
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        buf.drain(..head_end);
        RawWs { stream, buf }
    }

    /// Send one frame (FIN set), masked or not.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37u8, 0xfa, 0x21, 0x3d];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        tokio::time::timeout(WAIT, self.stream.write_all(&frame))
            .await
            .expect("send timed out")
            .unwrap();
    }

    /// Send a masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(opcode::TEXT, text.as_bytes(), true).await;
    }

    async fn fill(&mut self, want: usize) -> bool {
        while self.buf.len() < want {
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("no data within the wait");
            match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The next frame as (opcode, payload); `None` when the TCP connection
    /// ended. Panics if nothing arrives within [`WAIT`].
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        if !self.fill(2).await {
            return None;
        }
        let op = self.buf[0] & 0x0f;
        let masked = self.buf[1] & 0x80 != 0;
        let (len, at) = match self.buf[1] & 0x7f {
            126 => {
                if !self.fill(4).await {
                    return None;
                }
                (
                    usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    4,
                )
            }
            127 => {
                if !self.fill(10).await {
                    return None;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        assert!(!masked, "server frames are never masked");
        if !self.fill(at + len).await {
            return None;
        }
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some((op, payload))
    }

    /// The next text frame as JSON, skipping Pings and Pongs; panics on
    /// anything else.
    pub async fn json(&mut self) -> serde_json::Value {
        loop {
            match self.read_frame().await {
                Some((opcode::TEXT, p)) => return serde_json::from_slice(&p).unwrap(),
                Some((opcode::PING | opcode::PONG, _)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Read until the connection ends: the close code if a Close frame came
    /// (1005 for one without a code), else [`Ended::Dropped`]. Every other
    /// frame is skipped, and nothing is answered.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match self.read_frame().await {
                None => return Ended::Dropped,
                Some((opcode::CLOSE, p)) if p.len() >= 2 => {
                    return Ended::Close(u16::from_be_bytes([p[0], p[1]]))
                }
                Some((opcode::CLOSE, _)) => return Ended::Close(1005),
                Some(_) => continue,
            }
        }
    }

    /// After [`ended`](Self::ended) saw a Close frame: whether the server
    /// then dropped the TCP connection (EOF) without waiting for our reply.
    pub async fn dropped(&mut self) -> bool {
        loop {
            match self.read_frame().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }
}

/// A self-signed end-entity certificate for `localhost` / 127.0.0.1, made
/// with the openssl CLI: (dir, cert, key); `None` (with a note) without openssl.
pub fn self_signed_cert() -> Option<(PathBuf, PathBuf, PathBuf)> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED: the openssl CLI is not installed; TLS is not tested");
        return None;
    }
    let dir =
        std::env::temp_dir().join(format!("wsgate-tls-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:P-256")
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // An end-entity certificate (webpki refuses a CA as the server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((dir, cert, key))
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

/// [`eventually`] with its own bound, for waits longer than [`WAIT`] (a
/// Redis failover): poll `check` every 20 ms, at most `limit`.
pub async fn eventually_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish with idempotency key `key` until acknowledged (a failover
/// refuses publishes for a while; a `timeout` may have been delivered, the
/// key keeps a retry from doubling it), for at most `limit`; returns the
/// ack. The publisher must not be a member of `room`.
pub async fn publish_acked(
    ws: &mut Ws,
    room: &str,
    data: serde_json::Value,
    key: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let id = ws.id();
        ws.send(serde_json::json!({"type":"publish","room":room,"data":data,"id":id,"key":key}))
            .await;
        let ack = ws.json().await;
        assert_eq!(ack["id"], id.as_str(), "the answer: {ack}");
        if ack["type"] == "ack" {
            return ack;
        }
        assert!(Instant::now() < deadline, "publish never acked: {ack}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a member of one room received, until `count` messages: (epoch,
/// seq, data) in order, the epoch starting at `epoch` and changed by each
/// unsolicited `joined` (which must say `recovered: false`).
pub async fn epoch_stream(
    ws: &mut Ws,
    mut epoch: String,
    count: usize,
) -> Vec<(String, u64, serde_json::Value)> {
    let mut out = Vec::new();
    while out.len() < count {
        let v = ws.json().await;
        match v["type"].as_str() {
            Some("joined") => {
                assert_eq!(v["recovered"], false, "an epoch change: {v}");
                epoch = v["epoch"].as_str().unwrap().to_owned();
            }
            Some("message") => {
                out.push((epoch.clone(), v["seq"].as_u64().unwrap(), v["data"].clone()))
            }
            _ => panic!("unexpected {v}"),
        }
    }
    out
}

/// The failover tests' check of one member's [`epoch_stream`]: it carries
/// `m0`, `m1`... (`total` of them) once, in order; no (epoch, seq) twice;
/// gap-free within an epoch; and a new epoch between message `switch - 1`
/// (the last the old primary took) and `switch` (the first the promoted
/// replica took), whose seqs could otherwise collide.
pub fn assert_failover_stream(
    got: &[(String, u64, serde_json::Value)],
    switch: usize,
    total: usize,
) {
    let mut seen = std::collections::HashMap::new();
    for (e, seq, data) in got {
        if let Some(other) = seen.insert((e.clone(), *seq), data.clone()) {
            panic!("({e}, {seq}) carried {other} and {data}");
        }
    }
    assert_ne!(
        got[switch - 1].0,
        got[switch].0,
        "a new epoch after the failover: {got:?}"
    );
    for pair in got.windows(2) {
        if pair[0].0 == pair[1].0 {
            assert_eq!(
                pair[1].1,
                pair[0].1 + 1,
                "gap-free within an epoch: {got:?}"
            );
        }
    }
    let data: Vec<serde_json::Value> = got.iter().map(|m| m.2.clone()).collect();
    let want: Vec<serde_json::Value> = (0..total)
        .map(|i| serde_json::json!(format!("m{i}")))
        .collect();
    assert_eq!(data, want, "every acknowledged message, once, in order");
}
