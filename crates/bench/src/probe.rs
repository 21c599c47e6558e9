//! Server figures before and after a measurement: each node's `/metrics`
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `wsgate_*`), other processes' `/proc/PID/stat` and `/proc/PID/status`
//! (Redis), and the tool's own CPU time and memory.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::OpsTarget;

/// Clock ticks per second in `/proc/PID/stat` (USER_HZ; 100 on Linux).
pub const CLK_TCK: f64 = 100.0;
/// Largest `/metrics` answer read.
const MAX_BODY: u64 = 32 << 20;

/// Sum of every sample of metric `name` (over all label sets), from
/// Prometheus text exposition; `None` when it has no sample.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.as_bytes().first() {
            Some(b' ') => rest,
            Some(b'{') => skip_labels(rest)?,
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// `rest` starts with `{`: the text after the matching `}` (quotes respected).
fn skip_labels(rest: &str) -> Option<&str> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(&rest[i + 1..]),
            _ => {}
        }
    }
    None
}

/// The body of a raw HTTP/1.x response with status 200 (chunked or not).
pub fn parse_http_response(raw: &[u8]) -> Result<String, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP response")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "bad HTTP header")?;
    let body = &raw[split + 4..];
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or("bad HTTP status line")?;
    if status != "200" {
        return Err(format!("HTTP {status}"));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    String::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len());
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&raw[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err("truncated chunk".to_owned());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// GET `path` from `target` (HTTP/1.0, connection closed after), within `limit`.
pub async fn http_get(target: &OpsTarget, path: &str, limit: Duration) -> Result<String, String> {
    let fetch = async {
        let mut stream = TcpStream::connect(target.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET {}{path} HTTP/1.0\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            target.base, target.host
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::with_capacity(16 << 10);
        stream
            .take(MAX_BODY)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_http_response(&raw)
    };
    tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{}{path}: {e}", target.url))
}

/// CPU ticks (user + system) from the text of `/proc/PID/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory in bytes from the text of `/proc/PID/status`.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds of a process (`self` or a pid).
pub fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat).map(|t| t as f64 / CLK_TCK)
}

/// Resident memory of a process (`self` or a pid), bytes.
pub fn proc_rss(pid: &str) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// CPU seconds this process has used.
pub fn self_cpu_seconds() -> f64 {
    proc_cpu_seconds("self").unwrap_or(0.0)
}

/// One node's figures from its `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeSample {
    /// The ops URL.
    pub url: String,
    /// Why the metrics could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: Option<f64>,
    /// `process_resident_memory_bytes`.
    pub rss_bytes: Option<f64>,
    /// `wsgate_connections_active`.
    pub connections_active: Option<f64>,
    /// `wsgate_messages_delivered_total`.
    pub delivered: Option<f64>,
    /// `wsgate_slow_consumer_closes_total`.
    pub slow_consumer_closes: Option<f64>,
}

/// One process's figures from `/proc`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PidSample {
    /// The pid.
    pub pid: u32,
    /// CPU seconds (user + system); `None` when the process is gone.
    pub cpu_seconds: Option<f64>,
    /// Resident memory.
    pub rss_bytes: Option<u64>,
}

/// Everything measured at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When.
    pub at: Instant,
    /// Per ops URL.
    pub nodes: Vec<NodeSample>,
    /// Per `--pid`.
    pub pids: Vec<PidSample>,
    /// The tool's CPU seconds.
    pub tool_cpu: f64,
    /// The tool's resident memory.
    pub tool_rss: u64,
}

impl Snapshot {
    /// Whether server CPU and memory come from `/proc` (some `--pid` given)
    /// rather than from the nodes' `/metrics`.
    pub fn from_pids(&self) -> bool {
        !self.pids.is_empty()
    }

    /// CPU seconds of every server process: the `--pid` processes when any
    /// are given, else the nodes' `process_cpu_seconds_total`.
    pub fn server_cpu(&self) -> f64 {
        if self.from_pids() {
            self.pids.iter().filter_map(|p| p.cpu_seconds).sum::<f64>()
        } else {
            self.nodes.iter().filter_map(|n| n.cpu_seconds).sum::<f64>()
        }
    }

    /// Resident memory of every server process (same sources as [`Snapshot::server_cpu`]).
    pub fn server_rss(&self) -> f64 {
        if self.from_pids() {
            self.pids
                .iter()
                .filter_map(|p| p.rss_bytes)
                .map(|b| b as f64)
                .sum::<f64>()
        } else {
            self.nodes.iter().filter_map(|n| n.rss_bytes).sum::<f64>()
        }
    }

    /// Sum of a node metric over the nodes that report it.
    pub fn node_sum(&self, f: impl Fn(&NodeSample) -> Option<f64>) -> Option<f64> {
        self.nodes.iter().filter_map(f).reduce(|a, b| a + b)
    }

    /// Whether any server figure is available.
    pub fn has_server(&self) -> bool {
        if self.from_pids() {
            self.pids.iter().any(|p| p.cpu_seconds.is_some())
        } else {
            self.nodes.iter().any(|n| n.cpu_seconds.is_some())
        }
    }
}

/// Figures between two snapshots.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Wall time between them, seconds.
    pub wall_s: f64,
    /// Server CPU seconds used (all nodes and pids); `None` without any.
    pub server_cpu_s: Option<f64>,
    /// Server CPU as a fraction of one core.
    pub server_core_busy: Option<f64>,
    /// The tool's CPU seconds.
    pub tool_cpu_s: f64,
    /// The tool's CPU as a fraction of one core.
    pub tool_core_busy: f64,
}

impl Usage {
    /// Usage from `a` to `b`.
    pub fn between(a: &Snapshot, b: &Snapshot) -> Usage {
        let wall_s = b.at.saturating_duration_since(a.at).as_secs_f64().max(1e-9);
        let server_cpu_s = (a.has_server() && b.has_server()).then(|| cpu_delta(a, b));
        let tool_cpu_s = (b.tool_cpu - a.tool_cpu).max(0.0);
        Usage {
            wall_s,
            server_cpu_s,
            server_core_busy: server_cpu_s.map(|c| c / wall_s),
            tool_cpu_s,
            tool_core_busy: tool_cpu_s / wall_s,
        }
    }

    /// Human line: `server 0.25 core (2.5 s CPU), tool 0.6 core (6.0 s CPU)`.
    pub fn human(&self) -> String {
        let server = match (self.server_core_busy, self.server_cpu_s) {
            (Some(busy), Some(cpu)) => {
                format!("server {:.1} % of a core ({cpu:.2} s CPU)", busy * 100.0)
            }
            _ => "server CPU unknown (give --ops-url / --pid)".to_owned(),
        };
        format!(
            "{server}; tool {:.1} % of a core ({:.2} s CPU) over {:.1} s",
            self.tool_core_busy * 100.0,
            self.tool_cpu_s,
            self.wall_s
        )
    }
}

/// CPU used between two snapshots by the server processes present in both
/// (a process killed in between is left out rather than counted negative).
pub fn cpu_delta(a: &Snapshot, b: &Snapshot) -> f64 {
    fn pairs(a: &[Option<f64>], b: &[Option<f64>]) -> f64 {
        a.iter()
            .zip(b)
            .filter_map(|(x, y)| Some((y.as_ref()? - x.as_ref()?).max(0.0)))
            .sum()
    }
    if b.from_pids() {
        let cpu = |s: &Snapshot| s.pids.iter().map(|p| p.cpu_seconds).collect::<Vec<_>>();
        pairs(&cpu(a), &cpu(b))
    } else {
        let cpu = |s: &Snapshot| s.nodes.iter().map(|n| n.cpu_seconds).collect::<Vec<_>>();
        pairs(&cpu(a), &cpu(b))
    }
}

/// Reads server figures.
pub struct Probe {
    ops: Vec<OpsTarget>,
    pids: Vec<u32>,
    limit: Duration,
}

impl Probe {
    /// A probe of these ops listeners and processes.
    pub fn new(ops: Vec<OpsTarget>, pids: Vec<u32>) -> Probe {
        Probe {
            ops,
            pids,
            limit: Duration::from_secs(5),
        }
    }

    /// Read everything now.
    pub async fn snapshot(&self) -> Snapshot {
        let nodes = futures_util::future::join_all(self.ops.iter().map(|t| self.node(t))).await;
        let pids = self
            .pids
            .iter()
            .map(|&pid| PidSample {
                pid,
                cpu_seconds: proc_cpu_seconds(&pid.to_string()),
                rss_bytes: proc_rss(&pid.to_string()),
            })
            .collect();
        Snapshot {
            at: Instant::now(),
            nodes,
            pids,
            tool_cpu: self_cpu_seconds(),
            tool_rss: proc_rss("self").unwrap_or(0),
        }
    }

    async fn node(&self, target: &OpsTarget) -> NodeSample {
        match http_get(target, "/metrics", self.limit).await {
            Ok(text) => NodeSample {
                url: target.url.clone(),
                error: None,
                cpu_seconds: metric_sum(&text, "process_cpu_seconds_total"),
                rss_bytes: metric_sum(&text, "process_resident_memory_bytes"),
                connections_active: metric_sum(&text, "wsgate_connections_active"),
                delivered: metric_sum(&text, "wsgate_messages_delivered_total"),
                slow_consumer_closes: metric_sum(&text, "wsgate_slow_consumer_closes_total"),
            },
            Err(e) => NodeSample {
                url: target.url.clone(),
                error: Some(e),
                ..NodeSample::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str =
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
# TYPE process_cpu_seconds_total counter\n\
process_cpu_seconds_total{node=\"n1\"} 12.5\n\
process_resident_memory_bytes{node=\"n1\"} 1.048576e+07\n\
wsgate_handshake_rejections_total{node=\"n1\",reason=\"a } b\"} 3\n\
wsgate_handshake_rejections_total{node=\"n1\",reason=\"bad\"} 4 1700000000000\n\
wsgate_connections_active 7\n\
wsgate_connections_active_peak 99\n";

    #[test]
    fn metric_sums() {
        assert_eq!(metric_sum(METRICS, "process_cpu_seconds_total"), Some(12.5));
        assert_eq!(
            metric_sum(METRICS, "process_resident_memory_bytes"),
            Some(10_485_760.0)
        );
        assert_eq!(
            metric_sum(METRICS, "wsgate_handshake_rejections_total"),
            Some(7.0)
        );
        assert_eq!(metric_sum(METRICS, "wsgate_connections_active"), Some(7.0));
        assert_eq!(metric_sum(METRICS, "wsgate_nothing"), None);
    }

    #[test]
    fn http_responses() {
        let plain = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nhello";
        assert_eq!(parse_http_response(plain).unwrap(), "hello");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(chunked).unwrap(), "hello world");
        assert!(parse_http_response(b"HTTP/1.0 503 No\r\n\r\n")
            .unwrap_err()
            .contains("503"));
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab"
        )
        .is_err());
    }

    #[test]
    fn proc_parsing() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
        let status = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(proc_cpu_seconds("self").is_some());
        assert!(proc_rss("self").unwrap() > 0);
    }

    #[test]
    fn usage_between_snapshots() {
        let at = Instant::now();
        let snap = |dt: u64, cpu: f64, tool: f64| Snapshot {
            at: at + Duration::from_secs(dt),
            nodes: vec![NodeSample {
                cpu_seconds: Some(cpu),
                ..NodeSample::default()
            }],
            pids: vec![PidSample {
                pid: 1,
                cpu_seconds: Some(cpu / 2.0),
                rss_bytes: Some(10),
            }],
            tool_cpu: tool,
            tool_rss: 0,
        };
        let u = Usage::between(&snap(0, 10.0, 1.0), &snap(10, 12.0, 6.0));
        // The pids win over the nodes' metrics.
        assert_eq!(u.server_cpu_s, Some(1.0));
        assert!((u.server_core_busy.unwrap() - 0.1).abs() < 1e-9);
        assert!((u.tool_core_busy - 0.5).abs() < 1e-9);
        assert!(u.human().contains("10.0 %"), "{}", u.human());
        let mut a = snap(0, 10.0, 1.0);
        let mut b = snap(10, 12.0, 6.0);
        a.pids.clear();
        b.pids.clear();
        assert_eq!(Usage::between(&a, &b).server_cpu_s, Some(2.0));
        assert_eq!(b.server_rss(), 0.0);
        // A process gone in between is left out.
        let a = snap(0, 10.0, 1.0);
        let mut b = snap(10, 12.0, 6.0);
        b.pids[0].cpu_seconds = None;
        b.pids.push(PidSample {
            pid: 2,
            cpu_seconds: Some(1.0),
            rss_bytes: None,
        });
        assert_eq!(cpu_delta(&a, &b), 0.0);
        let none = Snapshot {
            at,
            nodes: vec![],
            pids: vec![],
            tool_cpu: 0.0,
            tool_rss: 0,
        };
        assert_eq!(Usage::between(&none, &none).server_cpu_s, None);
    }
}
