//! Connecting to the gateway, and the frames the tool sends and peeks at.
//!
//! Targets are `ws://host:port/path` URLs checked to be loopback (unless the
//! user allows remote ones). A client socket may be bound to one of several
//! source addresses before connecting, to get past the ~28k ephemeral ports
//! one address has towards one server port.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{
    HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_EXTENSIONS,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use wsgate_protocol::{Joined, Presence, ServerFrame, Welcome};

use crate::sse::{self, PostTarget, Sse};
use crate::wire::{counted, wire_stream, WireStream, DEFLATE_OFFER};

/// A client WebSocket over plain TCP (through [`WireStream`]: byte count, inflate).
pub type Ws = WebSocketStream<WireStream>;

/// A member's connection: a WebSocket, or an SSE stream with POSTs
/// (PROTOCOL.md section 7). Both read as a stream of text messages.
pub enum Conn {
    /// `/ws`.
    Ws(Box<Ws>),
    /// `/sse` + `POST /sse/{conn}`.
    Sse(Box<Sse>),
}

impl Stream for Conn {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Conn::Ws(ws) => ws.poll_next_unpin(cx),
            Conn::Sse(sse) => sse.poll_next_unpin(cx),
        }
    }
}

/// Which transport members read over (`--transport`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket (`/ws`).
    #[default]
    Ws,
    /// Server-Sent Events (`/sse`) with `POST /sse/{conn}` for client frames.
    Sse,
}

fn split_host_port(authority: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| format!("bad address '{authority}'"))?;
        let port = rest[end + 1..].strip_prefix(':').unwrap_or("");
        (&rest[..end], port)
    } else {
        authority.rsplit_once(':').unwrap_or((authority, ""))
    };
    if port.is_empty() {
        return Err(format!("'{authority}' has no port: give host:port"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("bad port in '{authority}'"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("bad address '{authority}'"));
    }
    Ok((host, port))
}

fn resolve(host: &str, port: u16, allow_remote: bool) -> Result<SocketAddr, String> {
    let addr = if host.eq_ignore_ascii_case("localhost") {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        SocketAddr::new(ip, port)
    } else if allow_remote {
        (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{host}': {e}"))?
            .next()
            .ok_or_else(|| format!("'{host}' has no address"))?
    } else {
        return Err(format!(
            "'{host}' is not a loopback address (use an IP in 127.0.0.0/8, ::1 or localhost, or --allow-remote)"
        ));
    };
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(format!(
            "'{host}' is not a loopback address (use --allow-remote to load another machine)"
        ));
    }
    Ok(addr)
}

/// A gateway WebSocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// The address connected to.
    pub addr: SocketAddr,
    /// `host:port` for the Host header of `/sse` requests.
    pub host: String,
}

impl Target {
    /// Parse `ws://host:port/path`; non-loopback hosts need `allow_remote`.
    pub fn parse(url: &str, allow_remote: bool) -> Result<Target, String> {
        if url.starts_with("wss://") {
            return Err(format!(
                "{url}: wss:// is not supported by the load tool; measure the plain listener"
            ));
        }
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: the URL must start with ws://"))?;
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let (host, port) = split_host_port(authority).map_err(|e| format!("{url}: {e}"))?;
        let addr = resolve(host, port, allow_remote).map_err(|e| format!("{url}: {e}"))?;
        Ok(Target {
            url: url.to_owned(),
            addr,
            host: authority.to_owned(),
        })
    }
}

/// A node's operations listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsTarget {
    /// The URL as given.
    pub url: String,
    /// The address connected to.
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub host: String,
    /// Path prefix (empty, or `/something` without a trailing slash).
    pub base: String,
}

impl OpsTarget {
    /// Parse `http://host:port[/prefix]`; non-loopback hosts need `allow_remote`.
    pub fn parse(url: &str, allow_remote: bool) -> Result<OpsTarget, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: the ops URL must start with http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = split_host_port(authority).map_err(|e| format!("{url}: {e}"))?;
        let addr = resolve(host, port, allow_remote).map_err(|e| format!("{url}: {e}"))?;
        Ok(OpsTarget {
            url: url.to_owned(),
            addr,
            host: authority.to_owned(),
            base: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The upgrade was answered with this HTTP status.
    Status(u16),
    /// The limit on connect + upgrade + welcome passed.
    Timeout,
    /// Nothing listens there.
    Refused,
    /// Another socket error (its kind).
    Io(String),
    /// The WebSocket handshake or stream failed otherwise.
    Protocol(String),
    /// The connection closed before `welcome` (or the join answer).
    Closed(Option<u16>),
    /// The server answered the join with an error frame.
    Refusal(String),
}

impl ConnectError {
    /// A short stable name, for counting failures: `http_503`, `timeout`, ...
    pub fn kind(&self) -> String {
        match self {
            ConnectError::Status(s) => format!("http_{s}"),
            ConnectError::Timeout => "timeout".to_owned(),
            ConnectError::Refused => "refused".to_owned(),
            ConnectError::Io(k) => format!("io_{k}"),
            ConnectError::Protocol(_) => "protocol".to_owned(),
            ConnectError::Closed(Some(code)) => format!("closed_{code}"),
            ConnectError::Closed(None) => "closed".to_owned(),
            ConnectError::Refusal(code) => format!("error_{code}"),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Protocol(m) => write!(f, "protocol: {m}"),
            other => f.write_str(&other.kind()),
        }
    }
}

impl std::error::Error for ConnectError {}

fn io_kind(e: &io::Error) -> ConnectError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::TimedOut => ConnectError::Timeout,
        kind => {
            let name = format!("{kind:?}");
            let mut snake = String::with_capacity(name.len() + 4);
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            ConnectError::Io(snake)
        }
    }
}

impl From<WsError> for ConnectError {
    fn from(e: WsError) -> ConnectError {
        match e {
            WsError::Http(resp) => ConnectError::Status(resp.status().as_u16()),
            WsError::Io(e) => io_kind(&e),
            WsError::ConnectionClosed | WsError::AlreadyClosed => ConnectError::Closed(None),
            other => ConnectError::Protocol(other.to_string()),
        }
    }
}

/// Opens client connections: source address, timeouts, headers, buffers.
pub struct Connector {
    source_ips: Vec<IpAddr>,
    next_source: AtomicUsize,
    timeout: Duration,
    config: WebSocketConfig,
    origin: Option<HeaderValue>,
    deflate: bool,
    transport: Transport,
    /// Bytes read off the wire by every connection (before any inflate).
    pub rx_bytes: Arc<AtomicU64>,
    /// Connections whose handshake the server answered with permessage-deflate.
    pub deflate_negotiated: AtomicU64,
}

impl Connector {
    /// A connector; `read_buffer` is each connection's read buffer in bytes.
    pub fn new(
        source_ips: Vec<IpAddr>,
        timeout: Duration,
        read_buffer: usize,
        origin: Option<&str>,
    ) -> Result<Connector, String> {
        let origin = origin
            .map(|o| HeaderValue::from_str(o).map_err(|_| format!("bad --origin '{o}'")))
            .transpose()?;
        let config = WebSocketConfig::default()
            .read_buffer_size(read_buffer)
            // Publishers feed a burst of frames and flush once: one write.
            .write_buffer_size(16 << 10)
            .max_message_size(Some(16 << 20))
            .max_frame_size(Some(16 << 20));
        Ok(Connector {
            source_ips,
            next_source: AtomicUsize::new(0),
            timeout,
            config,
            origin,
            deflate: false,
            transport: Transport::Ws,
            rx_bytes: Arc::new(AtomicU64::new(0)),
            deflate_negotiated: AtomicU64::new(0),
        })
    }

    /// Offer permessage-deflate (RFC 7692, no context takeover either way)
    /// on every connection; compressed messages are inflated by [`WireStream`].
    pub fn with_deflate(mut self, deflate: bool) -> Connector {
        self.deflate = deflate;
        self
    }

    /// Whether connections offer permessage-deflate.
    pub fn deflate(&self) -> bool {
        self.deflate
    }

    /// The transport of members that only read ([`Connector::open_conn`]).
    pub fn with_transport(mut self, transport: Transport) -> Connector {
        self.transport = transport;
        self
    }

    /// The transport of members that only read.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The limit on one connect (and on one join).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn tcp(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.source_ips.is_empty() {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.source_ips.len();
            // Lets a bound port be reused while an earlier run's socket on it
            // is in TIME_WAIT (connect still refuses an identical 4-tuple).
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::new(self.source_ips[i], 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Connect, upgrade with `token`, and read the `welcome`, all within the timeout.
    pub async fn open(&self, target: &Target, token: &str) -> Result<(Ws, Welcome), ConnectError> {
        tokio::time::timeout(self.timeout, self.open_inner(target, token))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn open_inner(
        &self,
        target: &Target,
        token: &str,
    ) -> Result<(Ws, Welcome), ConnectError> {
        let mut request = target.url.as_str().into_client_request()?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ConnectError::Protocol("token is not a valid header value".to_owned()))?;
        request.headers_mut().insert(AUTHORIZATION, bearer);
        if let Some(origin) = &self.origin {
            request.headers_mut().insert(ORIGIN, origin.clone());
        }
        if self.deflate {
            request.headers_mut().insert(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_static(DEFLATE_OFFER),
            );
        }
        let stream = self.tcp(target.addr).await.map_err(|e| io_kind(&e))?;
        let stream = wire_stream(stream, self.rx_bytes.clone());
        let (mut ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(self.config)).await?;
        if ws.get_ref().negotiated() {
            self.deflate_negotiated.fetch_add(1, Ordering::Relaxed);
        }
        match next_frame(&mut ws).await? {
            ServerFrame::Welcome(w) => Ok((ws, w)),
            other => Err(ConnectError::Protocol(format!(
                "expected welcome, got {}",
                other.to_json()
            ))),
        }
    }

    /// Open a connection over `transport` (see [`Connector::open`]); an SSE
    /// stream's `welcome` is read off the stream, within the timeout.
    pub async fn open_conn(
        &self,
        target: &Target,
        token: &Arc<str>,
        transport: Transport,
    ) -> Result<(Conn, Welcome), ConnectError> {
        match transport {
            Transport::Ws => {
                let (ws, welcome) = self.open(target, token).await?;
                Ok((Conn::Ws(Box::new(ws)), welcome))
            }
            Transport::Sse => tokio::time::timeout(self.timeout, self.open_sse(target, token))
                .await
                .map_err(|_| ConnectError::Timeout)?,
        }
    }

    async fn open_sse(
        &self,
        target: &Target,
        token: &Arc<str>,
    ) -> Result<(Conn, Welcome), ConnectError> {
        let mut stream = self.tcp(target.addr).await.map_err(|e| io_kind(&e))?;
        let origin = self.origin.as_ref().and_then(|o| o.to_str().ok());
        stream
            .write_all(sse::get_request(&target.host, token, origin).as_bytes())
            .await
            .map_err(|e| io_kind(&e))?;
        let (head, rest) = sse::read_head(&mut stream).await?;
        if head.status != 200 {
            return Err(ConnectError::Status(head.status));
        }
        let post = PostTarget {
            addr: target.addr,
            host: target.host.clone(),
            token: token.clone(),
            conn: String::new(),
        };
        let sse = Sse::new(
            counted(stream, self.rx_bytes.clone()),
            &rest,
            head.chunked,
            post,
        )
        .map_err(|e| io_kind(&e))?;
        let mut conn = Conn::Sse(Box::new(sse));
        match next_frame(&mut conn).await? {
            ServerFrame::Welcome(w) => {
                if let Conn::Sse(sse) = &mut conn {
                    sse.post_target().conn = w.conn.clone();
                }
                Ok((conn, w))
            }
            other => Err(ConnectError::Protocol(format!(
                "expected welcome, got {}",
                other.to_json()
            ))),
        }
    }

    /// `POST /sse/{conn}` one client frame for an SSE stream; anything but
    /// `202` is a refusal.
    async fn post(&self, post: &PostTarget, frame: &str) -> Result<(), ConnectError> {
        let mut stream = self.tcp(post.addr).await.map_err(|e| io_kind(&e))?;
        match sse::send_post(&mut stream, &sse::post_request(post, frame)).await? {
            202 => Ok(()),
            status => Err(ConnectError::Status(status)),
        }
    }

    /// Join `room` (resuming after `since` in `epoch` when given; asking for
    /// presence events when `presence`) and wait for `joined`, within the
    /// timeout. Frames of other rooms before it are skipped.
    pub async fn join(
        &self,
        ws: &mut Conn,
        room: &str,
        since: Option<(u64, &str)>,
        presence: bool,
    ) -> Result<Joined, ConnectError> {
        self.request(ws, join_frame(room, since, presence), |f| match f {
            ServerFrame::Joined(j) if j.room == room => Some(j),
            _ => None,
        })
        .await
    }

    /// Ask who is present in `room` (request id `id`) and wait for the
    /// answer, within the timeout; other frames before it are skipped.
    pub async fn presence(
        &self,
        ws: &mut Conn,
        room: &str,
        id: u64,
    ) -> Result<Presence, ConnectError> {
        let want = id.to_string();
        self.request(ws, presence_frame(room, id), |f| match f {
            ServerFrame::Presence(p)
                if p.id.as_ref().map(ToString::to_string) == Some(want.clone()) =>
            {
                Some(p)
            }
            _ => None,
        })
        .await
    }

    /// Send `frame` and wait, within the timeout, for the first frame `pick`
    /// takes (an `error` frame fails it).
    async fn request<T>(
        &self,
        ws: &mut Conn,
        frame: String,
        pick: impl Fn(ServerFrame) -> Option<T>,
    ) -> Result<T, ConnectError> {
        match ws {
            Conn::Ws(ws) => ws.send(Message::text(frame)).await?,
            Conn::Sse(sse) => self.post(sse.post_target(), &frame).await?,
        }
        tokio::time::timeout(self.timeout, async {
            loop {
                match next_frame(ws).await? {
                    ServerFrame::Error(e) => {
                        return Err(ConnectError::Refusal(e.code.as_str().to_owned()))
                    }
                    other => {
                        if let Some(t) = pick(other) {
                            return Ok(t);
                        }
                    }
                }
            }
        })
        .await
        .map_err(|_| ConnectError::Timeout)?
    }
}

/// The next protocol frame (control frames are skipped; tungstenite answers pings).
pub async fn next_frame<S>(ws: &mut S) -> Result<ServerFrame, ConnectError>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match ws.next().await {
            None => return Err(ConnectError::Closed(None)),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(text))) => {
                return ServerFrame::parse(text.as_str())
                    .map_err(|e| ConnectError::Protocol(format!("bad frame: {e}")))
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(ConnectError::Closed(frame.map(|f| u16::from(f.code))))
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// Close a member's connection: a WebSocket politely ([`close`]), an SSE
/// stream by dropping it.
pub async fn close_conn(conn: &mut Conn, limit: Duration) {
    if let Conn::Ws(ws) = conn {
        close(ws, limit).await;
    }
}

/// Close politely (1000), waiting at most `limit` for the server's answer.
pub async fn close(ws: &mut Ws, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A `join` frame, with `since` and `epoch` when resuming, and
/// `"presence":true` when asking for presence events (PROTOCOL.md section 6).
pub fn join_frame(room: &str, since: Option<(u64, &str)>, presence: bool) -> String {
    let mut frame = format!(r#"{{"type":"join","room":{}"#, json_str(room));
    if let Some((seq, epoch)) = since {
        frame.push_str(&format!(r#","since":{seq},"epoch":{}"#, json_str(epoch)));
    }
    if presence {
        frame.push_str(r#","presence":true"#);
    }
    frame.push('}');
    frame
}

/// A `presence` query frame (PROTOCOL.md section 6) with request id `id`.
pub fn presence_frame(room: &str, id: u64) -> String {
    format!(
        r#"{{"type":"presence","room":{},"id":{id}}}"#,
        json_str(room)
    )
}

/// Builds `publish` frames whose `data` is `{"t":<send ns>,"p":"<padding>"}`,
/// with an idempotency `key` (`k<send ns>`) when [`keyed`](Self::keyed).
#[derive(Debug, Clone)]
pub struct PublishEncoder {
    head: String,
    tail: String,
    keyed: bool,
}

impl PublishEncoder {
    /// Frames for `room` with `padding` bytes of padding.
    pub fn new(room: &str, padding: usize) -> PublishEncoder {
        PublishEncoder {
            head: format!(
                r#"{{"type":"publish","room":{},"data":{{"t":"#,
                json_str(room)
            ),
            tail: format!(r#","p":"{}"}}"#, "x".repeat(padding)),
            keyed: false,
        }
    }

    /// Frames for `room` whose `data` is a dashboard-like JSON document of
    /// about `bytes` bytes: metric series with names, hosts, regions, values
    /// and units, as a monitoring dashboard pushes them (it compresses like
    /// real JSON, not like a run of one letter). The values come from a fixed
    /// generator: every run sends the same document.
    pub fn dashboard(room: &str, bytes: usize) -> PublishEncoder {
        const METRICS: [(&str, &str); 8] = [
            ("cpu.user", "percent"),
            ("cpu.system", "percent"),
            ("mem.used", "bytes"),
            ("disk.read", "bytes_per_s"),
            ("net.rx", "bytes_per_s"),
            ("http.requests", "per_s"),
            ("http.p99", "ms"),
            ("queue.depth", "count"),
        ];
        const STATUS: [&str; 3] = ["ok", "ok", "warn"];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            // xorshift64: a fixed, dependency-free sequence.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // `{"t":` + 19 digits before this tail.
        let mut tail = String::from(r#","series":["#);
        let mut i = 0u64;
        while 24 + tail.len() < bytes.saturating_sub(3) && i < 100_000 {
            let (name, unit) = METRICS[(i % 8) as usize];
            let r = next();
            if i > 0 {
                tail.push(',');
            }
            tail.push_str(&format!(
                r#"{{"id":{i},"metric":"{name}","host":"web-{:02}","region":"{}","value":{}.{:02},"unit":"{unit}","status":"{}"}}"#,
                r % 24,
                ["eu-west-1", "us-east-1", "ap-south-1"][(r >> 8) as usize % 3],
                (r >> 16) % 10_000,
                (r >> 32) % 100,
                STATUS[(r >> 40) as usize % 3]
            ));
            i += 1;
        }
        tail.push_str("]}");
        PublishEncoder {
            head: format!(
                r#"{{"type":"publish","room":{},"data":{{"t":"#,
                json_str(room)
            ),
            tail,
            keyed: false,
        }
    }

    /// Give every frame an idempotency key (PROTOCOL.md section 11), to
    /// measure what the broker's key check costs.
    pub fn keyed(mut self, keyed: bool) -> PublishEncoder {
        self.keyed = keyed;
        self
    }

    /// The frame carrying send time `sent_ns`.
    pub fn frame(&self, sent_ns: u64) -> String {
        let mut out = String::with_capacity(self.head.len() + 48 + self.tail.len());
        let ns = itoa(sent_ns, &mut [0u8; 20]).to_owned();
        out.push_str(&self.head);
        out.push_str(&ns);
        out.push_str(&self.tail);
        if self.keyed {
            out.push_str(r#","key":"k"#);
            out.push_str(&ns);
            out.push('"');
        }
        out.push('}');
        out
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

const SENT_MARK: &str = r#","data":{"t":"#;

/// The send timestamp in a `message` frame whose `data` this tool published
/// (`..."data":{"t":123,...`), read without parsing the frame.
#[inline]
pub fn peek_sent_ns(frame: &str) -> Option<u64> {
    let at = frame.find(SENT_MARK)? + SENT_MARK.len();
    let digits = &frame.as_bytes()[at..];
    let mut n: u64 = 0;
    let mut len = 0;
    for &b in digits.iter().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        len += 1;
    }
    (len > 0).then_some(n)
}

/// An `ack` frame, recognized without parsing: its seq.
#[inline]
pub fn peek_ack_seq(frame: &str) -> Option<u64> {
    let rest = frame.strip_prefix(r#"{"type":"ack""#)?;
    let at = rest.find(r#""seq":"#)? + 6;
    let digits = rest[at..].bytes().take_while(u8::is_ascii_digit).count();
    rest[at..at + digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use wsgate_protocol::MessageParts;

    #[test]
    fn targets_parse() {
        let t = Target::parse("ws://127.0.0.1:8080/ws", false).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        let t = Target::parse("ws://127.0.0.5:1/ws?x=1", false).unwrap();
        assert_eq!(t.addr.port(), 1);
        let t = Target::parse("ws://localhost:9/ws", false).unwrap();
        assert_eq!(t.addr, "127.0.0.1:9".parse().unwrap());
        let t = Target::parse("ws://[::1]:9/ws", false).unwrap();
        assert_eq!(t.addr, "[::1]:9".parse().unwrap());
        let t = Target::parse("ws://127.0.0.1:9", false).unwrap();
        assert_eq!(t.addr.port(), 9);
        for bad in [
            "ws://10.0.0.1:80/ws",
            "ws://example.com:80/ws",
            "http://127.0.0.1:80/ws",
            "wss://127.0.0.1:80/ws",
            "ws://127.0.0.1/ws",
            "ws://127.0.0.1:0/ws",
            "ws://127.0.0.1:x/ws",
            "ws://:80/ws",
            "ws://[::1/ws",
        ] {
            assert!(Target::parse(bad, false).is_err(), "{bad}");
        }
        assert!(Target::parse("ws://10.0.0.1:80/ws", true).is_ok());
    }

    #[test]
    fn ops_targets_parse() {
        let o = OpsTarget::parse("http://127.0.0.1:9090", false).unwrap();
        assert_eq!(o.host, "127.0.0.1:9090");
        assert_eq!(o.base, "");
        let o = OpsTarget::parse("http://127.0.0.1:9090/x/", false).unwrap();
        assert_eq!(o.base, "/x");
        assert!(OpsTarget::parse("https://127.0.0.1:9090", false).is_err());
        assert!(OpsTarget::parse("http://1.2.3.4:9090", false).is_err());
    }

    #[test]
    fn publish_frames_are_valid_and_peekable() {
        let enc = PublishEncoder::new("lobby", 5);
        let frame = enc.frame(1_234_567_890_123);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "publish");
        assert_eq!(v["room"], "lobby");
        assert_eq!(v["data"]["t"], 1_234_567_890_123u64);
        assert_eq!(v["data"]["p"], "xxxxx");
        assert!(wsgate_protocol::parse_client_frame(&frame).is_ok());
        let keyed = PublishEncoder::new("lobby", 5).keyed(true).frame(42);
        let v: serde_json::Value = serde_json::from_str(&keyed).unwrap();
        assert_eq!(v["key"], "k42");
        assert!(wsgate_protocol::parse_client_frame(&keyed).is_ok());
        assert_eq!(enc.frame(0).matches("\"t\":0,").count(), 1);
        assert_eq!(
            enc.frame(u64::MAX).matches(&u64::MAX.to_string()).count(),
            1
        );

        // As the gateway delivers it.
        let raw = frame.split_once(r#""data":"#).unwrap().1;
        let data = RawValue::from_string(raw[..raw.len() - 1].to_owned()).unwrap();
        let message = MessageParts::new("lobby", "bench-pub", &data, 1_764_043_200_123).frame(58);
        assert_eq!(wsgate_protocol::peek_message(&message), Some(("lobby", 58)));
        assert_eq!(peek_sent_ns(&message), Some(1_234_567_890_123));
    }

    #[test]
    fn dashboard_payloads_are_valid_json_of_the_asked_size() {
        for bytes in [64usize, 2048, 16_384] {
            let enc = PublishEncoder::dashboard("lobby", bytes);
            let frame = enc.frame(1_764_043_200_123_456_789);
            let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
            assert!(wsgate_protocol::parse_client_frame(&frame).is_ok());
            let data = serde_json::to_string(&v["data"]).unwrap();
            assert!(
                data.len() + 200 > bytes && data.len() < bytes + 200,
                "{bytes}: {}",
                data.len()
            );
            assert_eq!(peek_sent_ns(&frame), Some(1_764_043_200_123_456_789));
            assert!(!v["data"]["series"].as_array().unwrap().is_empty());
        }
        // Not a run of one letter: it compresses like JSON does (2x to 10x).
        let d = PublishEncoder::dashboard("r", 2048).frame(1);
        let distinct = d.bytes().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct > 30, "{distinct}");
    }

    #[test]
    fn peeks_refuse_other_text() {
        assert_eq!(
            peek_sent_ns(r#"{"type":"message","data":{"text":"hi"}}"#),
            None
        );
        assert_eq!(peek_sent_ns(r#","data":{"t":x"#), None);
        assert_eq!(
            peek_sent_ns(r#","data":{"t":99999999999999999999999"#),
            None
        );
        assert_eq!(
            peek_ack_seq(r#"{"type":"ack","room":"a","seq":42}"#),
            Some(42)
        );
        assert_eq!(
            peek_ack_seq(r#"{"type":"ack","id":"c1","room":"a","seq":7}"#),
            Some(7)
        );
        assert_eq!(
            peek_ack_seq(r#"{"type":"joined","room":"a","seq":42}"#),
            None
        );
    }

    #[test]
    fn join_frames() {
        assert_eq!(
            join_frame("a", None, false),
            r#"{"type":"join","room":"a"}"#
        );
        let f = join_frame("a", Some((41, "k\"3")), false);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["since"], 41);
        assert_eq!(v["epoch"], "k\"3");
        assert!(v.get("presence").is_none());
        for since in [None, Some((3, "e"))] {
            let f = join_frame("a", since, true);
            assert!(wsgate_protocol::parse_client_frame(&f).is_ok(), "{f}");
            let v: serde_json::Value = serde_json::from_str(&f).unwrap();
            assert_eq!(v["presence"], true);
        }
        let q = presence_frame("a.1", 9);
        assert!(wsgate_protocol::parse_client_frame(&q).is_ok(), "{q}");
    }

    #[test]
    fn error_kinds_are_stable() {
        assert_eq!(ConnectError::Status(503).kind(), "http_503");
        assert_eq!(ConnectError::Closed(Some(1008)).kind(), "closed_1008");
        assert_eq!(
            io_kind(&io::Error::from(io::ErrorKind::AddrNotAvailable)).kind(),
            "io_addr_not_available"
        );
        assert_eq!(
            io_kind(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            ConnectError::Refused
        );
    }
}
