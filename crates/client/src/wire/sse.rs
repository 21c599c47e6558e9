//! The Server-Sent Events wire (protocol v1.1 section 7), for networks that
//! block the WebSocket upgrade: `GET /sse` is an event stream whose `data:`
//! lines are the server's frames, and the client's frames go as
//! `POST /sse/{conn}` (one at a time, so they arrive in order; frames queued
//! meanwhile go together as a JSON array). Answers come on the stream.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use reqwest::header::{ACCEPT, CONTENT_TYPE, ORIGIN, RETRY_AFTER};
use reqwest::{Client as Http, Response, StatusCode, Url};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::oneshot;
use wsgate_protocol::Welcome;

use super::{refusal, welcome, Failure, Incoming, Outbound, Wire};
use crate::config::{ClientConfig, Transport};

/// A line or event longer than this ends the connection instead of growing
/// the buffer: a gateway's frames are far smaller.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One POST carries at most about this much (several frames as an array).
const POST_BATCH_BYTES: usize = 64 * 1024;

/// A POST answered 503 (the stream's inbox is full) is sent again this
/// many times, after its `Retry-After` (1 to 5 s), before the connection is
/// given up.
const BUSY_RETRIES: u32 = 3;

/// What a finished event-stream line gives.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseItem {
    /// An event's data (its `data:` lines joined with `\n`).
    Data(String),
    /// A comment line (the server's heartbeat).
    Comment,
}

/// Incremental `text/event-stream` parser (the WHATWG rules for the fields
/// wsgate uses): feed it bytes in chunks of any size. Lines end with `\n`,
/// `\r\n` or `\r`, also across chunks; a blank line ends an event; only
/// `data` fields make one (`event`, `id`, `retry` are ignored).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    /// The data of the event being read, and how many `data` lines it had.
    data: String,
    data_lines: usize,
    /// The last chunk ended with `\r`: a leading `\n` belongs to it.
    skip_lf: bool,
}

impl SseParser {
    /// Parse `chunk`, appending what it completes to `out`. Fails when a
    /// line or an event grows past 16 MiB.
    pub(crate) fn push(&mut self, mut chunk: &[u8], out: &mut Vec<SseItem>) -> Result<(), String> {
        if std::mem::take(&mut self.skip_lf) && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&chunk[..end]);
            let line = std::mem::take(&mut self.line);
            self.finish_line(&line, out)?;
            let crlf = chunk[end] == b'\r' && chunk.get(end + 1) == Some(&b'\n');
            if chunk[end] == b'\r' && end + 1 == chunk.len() {
                self.skip_lf = true;
            }
            chunk = &chunk[end + if crlf { 2 } else { 1 }..];
        }
        self.line.extend_from_slice(chunk);
        if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(format!(
                "event-stream event longer than {MAX_EVENT_BYTES} bytes"
            ));
        }
        Ok(())
    }

    fn finish_line(&mut self, line: &[u8], out: &mut Vec<SseItem>) -> Result<(), String> {
        if line.is_empty() {
            if std::mem::take(&mut self.data_lines) > 0 {
                out.push(SseItem::Data(std::mem::take(&mut self.data)));
            }
            return Ok(());
        }
        if line[0] == b':' {
            out.push(SseItem::Comment);
            return Ok(());
        }
        // `\r` and `\n` never occur inside a UTF-8 sequence: a line is whole.
        let line = String::from_utf8_lossy(line);
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        if field != "data" {
            return Ok(());
        }
        let value = value.strip_prefix(' ').unwrap_or(value);
        if self.data_lines > 0 {
            self.data.push('\n');
        }
        self.data_lines += 1;
        self.data.push_str(value);
        if self.data.len() > MAX_EVENT_BYTES {
            return Err(format!(
                "event-stream event longer than {MAX_EVENT_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// The `/sse` URL for `url`: `http(s)://` URLs as they are, `ws(s)://.../ws`
/// with `http(s)` and the last `/ws` replaced by `/sse`.
pub(crate) fn sse_url(url: &str) -> Result<Url, Failure> {
    let mut u = Url::parse(url).map_err(|e| Failure::new(format!("bad URL: {e}")))?;
    let scheme = match u.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        other => return Err(Failure::new(format!("unsupported URL scheme {other:?}"))),
    };
    u.set_scheme(scheme)
        .map_err(|()| Failure::new("cannot use http(s) for this URL"))?;
    let path = u.path().to_owned();
    if let Some(base) = path.strip_suffix("/ws") {
        u.set_path(&format!("{base}/sse"));
    } else if !path.ends_with("/sse") {
        u.set_path(&format!("{}/sse", path.trim_end_matches('/')));
    }
    Ok(u)
}

/// The HTTP client of one connection (its POSTs reuse its connections).
fn http_client(cfg: &ClientConfig) -> Result<Http, Failure> {
    let builder = Http::builder()
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true);
    #[cfg(feature = "tls")]
    let builder = match &cfg.tls {
        Some(tls) => builder.use_preconfigured_tls((**tls).clone()),
        None => builder,
    };
    builder
        .build()
        .map_err(|e| Failure::new(format!("cannot set up the HTTP client: {e}")))
}

/// `GET /sse` (the caller bounds the time), its `welcome`, and the POST
/// writer for its `conn`.
pub(super) async fn establish(
    cfg: &ClientConfig,
    token: &str,
    url: &str,
) -> Result<(Wire, Welcome), Failure> {
    let url = sse_url(url)?;
    let http = http_client(cfg)?;
    let mut req = http
        .get(url.clone())
        .bearer_auth(token)
        .header(ACCEPT, "text/event-stream");
    if let Some(origin) = &cfg.origin {
        req = req.header(ORIGIN, origin);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Failure::new(format!("GET {url} failed: {e}")))?;
    let status = resp.status();
    if status != StatusCode::OK {
        let body = resp.bytes().await.ok();
        return Err(refusal("event stream", status, body.as_deref()));
    }
    let is_stream = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_stream {
        return Err(Failure::new(format!(
            "GET {url} did not answer with an event stream"
        )));
    }
    let mut reader = EventReader {
        resp,
        parser: SseParser::default(),
        ready: VecDeque::new(),
    };
    let first = loop {
        match reader.next().await {
            Some(Ok(Incoming::Frame(text))) => break welcome(&text)?,
            Some(Ok(Incoming::Alive)) => continue,
            Some(Ok(Incoming::Close(code, reason))) => {
                return Err(Failure::new(format!(
                    "closed before welcome: {code} {reason}"
                )))
            }
            Some(Err(e)) => return Err(Failure::new(e)),
            None => return Err(Failure::new("event stream ended before welcome")),
        }
    };
    let mut post_url = url;
    post_url
        .path_segments_mut()
        .map_err(|()| Failure::new("cannot add the connection id to the URL"))?
        .push(&first.conn);
    let (out, out_rx) = mpsc::unbounded_channel();
    let (failed_tx, failed_rx) = oneshot::channel();
    let poster = Poster {
        http,
        url: post_url,
        token: token.to_owned(),
        origin: cfg.origin.clone(),
        timeout: cfg.request_timeout,
    };
    let wire = Wire {
        incoming: incoming(reader, failed_rx),
        out,
        writer: tokio::spawn(poster.run(out_rx, failed_tx)),
        compressed: false,
        transport: Transport::Sse,
    };
    Ok((wire, first))
}

/// Reads the event stream into [`Incoming`] items.
struct EventReader {
    resp: Response,
    parser: SseParser,
    ready: VecDeque<Incoming>,
}

impl EventReader {
    /// The next item; `None` when the response ended.
    async fn next(&mut self) -> Option<Result<Incoming, String>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(Ok(item));
            }
            let chunk = match self.resp.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return None,
                Err(e) => return Some(Err(format!("event stream failed: {e}"))),
            };
            let mut items = Vec::new();
            if let Err(e) = self.parser.push(&chunk, &mut items) {
                return Some(Err(e));
            }
            self.ready.extend(items.into_iter().map(|item| match item {
                SseItem::Data(data) => close_event(&data).unwrap_or(Incoming::Frame(data)),
                SseItem::Comment => Incoming::Alive,
            }));
        }
    }
}

/// The stream's last event, `{"type":"close","code":N,"reason":"..."}`, as
/// the WebSocket Close it stands for.
fn close_event(data: &str) -> Option<Incoming> {
    #[derive(serde::Deserialize)]
    struct Close {
        #[serde(rename = "type")]
        kind: String,
        code: u16,
        #[serde(default)]
        reason: String,
    }
    // Cheap test first: most events are not the close.
    if !data.contains("\"close\"") {
        return None;
    }
    let c: Close = serde_json::from_str(data).ok()?;
    (c.kind == "close").then_some(Incoming::Close(c.code, c.reason))
}

/// The items of `reader`, ended early by what the POST writer reports when
/// the gateway refused a POST (the stream itself may stay open then).
fn incoming(
    reader: EventReader,
    failed: oneshot::Receiver<Result<Incoming, String>>,
) -> futures_util::stream::BoxStream<'static, Result<Incoming, String>> {
    struct State {
        reader: EventReader,
        failed: Option<oneshot::Receiver<Result<Incoming, String>>>,
        done: bool,
    }
    let state = State {
        reader,
        failed: Some(failed),
        done: false,
    };
    stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let item = match st.failed.as_mut() {
            Some(failed) => tokio::select! {
                item = st.reader.next() => item,
                report = failed => match report {
                    Ok(item) => {
                        st.done = true;
                        Some(item)
                    }
                    // The writer ended without a failure (the session is ending).
                    Err(_) => {
                        st.failed = None;
                        st.reader.next().await
                    }
                },
            },
            None => st.reader.next().await,
        };
        item.map(|i| (i, st))
    })
    .boxed()
}

/// Sends the session's frames as POSTs.
struct Poster {
    http: Http,
    url: Url,
    token: String,
    origin: Option<String>,
    timeout: Duration,
}

impl Poster {
    /// POST queued frames in order until the queue closes, `Close` comes,
    /// or the gateway refuses one (reported on `failed`).
    async fn run(
        mut self,
        mut rx: UnboundedReceiver<Outbound>,
        failed: oneshot::Sender<Result<Incoming, String>>,
    ) {
        let mut batch = Vec::new();
        let mut frames = Vec::new();
        while rx.recv_many(&mut batch, 64).await > 0 {
            let mut closing = false;
            for m in batch.drain(..) {
                match m {
                    Outbound::Frame(text) => frames.push(text),
                    // Frames queued before the new token go with the old one.
                    Outbound::Token(token) => {
                        if let Err(report) = self.post_all(&mut frames).await {
                            let _ = failed.send(report);
                            return;
                        }
                        self.token = token;
                    }
                    Outbound::Close => closing = true,
                }
            }
            if let Err(report) = self.post_all(&mut frames).await {
                let _ = failed.send(report);
                return;
            }
            if closing {
                return;
            }
        }
    }

    /// POST `frames` (emptied), in order, as few requests of at most about
    /// [`POST_BATCH_BYTES`] as they fit in.
    async fn post_all(&self, frames: &mut Vec<String>) -> Result<(), Result<Incoming, String>> {
        let mut rest = frames.drain(..).peekable();
        while let Some(first) = rest.next() {
            let mut group = vec![first];
            let mut size = group[0].len();
            while let Some(next) = rest.next_if(|n| size + n.len() < POST_BATCH_BYTES) {
                size += next.len() + 1;
                group.push(next);
            }
            let body = if group.len() == 1 {
                group.swap_remove(0)
            } else {
                format!("[{}]", group.join(","))
            };
            self.post(body).await?;
        }
        Ok(())
    }

    /// POST one body; a 503 (the stream's inbox is full) is sent again
    /// after its `Retry-After`, a few times.
    async fn post(&self, body: String) -> Result<(), Result<Incoming, String>> {
        let mut busy = 0;
        let status = loop {
            let mut req = self
                .http
                .post(self.url.clone())
                .bearer_auth(&self.token)
                .header(CONTENT_TYPE, "application/json")
                .timeout(self.timeout)
                .body(body.clone());
            if let Some(origin) = &self.origin {
                req = req.header(ORIGIN, origin);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => return Err(Err(format!("POST {} failed: {e}", self.url.path()))),
            };
            if resp.status() != StatusCode::SERVICE_UNAVAILABLE || busy == BUSY_RETRIES {
                break resp.status();
            }
            busy += 1;
            let wait = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 5);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        };
        let why = || format!("POST {} answered {status}", self.url.path());
        match status {
            StatusCode::ACCEPTED | StatusCode::OK => Ok(()),
            // As the WebSocket would have been closed.
            StatusCode::UNAUTHORIZED => Err(Ok(Incoming::Close(
                wsgate_protocol::close::TOKEN_EXPIRED,
                why(),
            ))),
            StatusCode::PAYLOAD_TOO_LARGE => Err(Ok(Incoming::Close(1009, why()))),
            _ => Err(Err(why())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Result<Vec<SseItem>, String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out)?;
        }
        Ok(out)
    }

    fn data(s: &str) -> SseItem {
        SseItem::Data(s.to_owned())
    }

    #[test]
    fn events_comments_and_multi_line_data() {
        let got = parse(&[b": hb\n\ndata: {\"type\":\"welcome\"}\n\ndata:a\ndata: b\n\ndata\n\n"]);
        assert_eq!(
            got.unwrap(),
            vec![
                SseItem::Comment,
                data("{\"type\":\"welcome\"}"),
                data("a\nb"),
                data("")
            ]
        );
    }

    #[test]
    fn every_line_ending_split_anywhere() {
        let text = "data: 1\r\n\r\ndata: 2\r\rdata: 3\n\ndata: {\"x\":\"\u{e9}\u{1F600}\"}\r\n\r\n"
            .as_bytes();
        let whole = parse(&[text]).unwrap();
        assert_eq!(
            whole,
            vec![
                data("1"),
                data("2"),
                data("3"),
                data("{\"x\":\"\u{e9}\u{1F600}\"}")
            ]
        );
        for cut in 1..text.len() {
            assert_eq!(
                parse(&[&text[..cut], &text[cut..]]).unwrap(),
                whole,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse(&bytes).unwrap(), whole);
    }

    #[test]
    fn other_fields_and_an_unfinished_event_are_ignored() {
        let got = parse(&[b"event: x\nid: 7\nretry: 10\n\ndata: no blank line yet\n"]);
        assert_eq!(got.unwrap(), vec![]);
    }

    #[test]
    fn an_endless_line_is_an_error_not_a_growing_buffer() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let chunk = vec![b'x'; 1024 * 1024];
        let failed = (0..20).any(|_| p.push(&chunk, &mut out).is_err());
        assert!(failed);
    }

    #[test]
    fn the_close_event_and_only_it_becomes_a_close() {
        assert!(matches!(
            close_event(r#"{"type":"close","code":1001,"reason":"shutting down"}"#),
            Some(Incoming::Close(1001, r)) if r == "shutting down"
        ));
        assert!(close_event(
            r#"{"type":"message","room":"r","seq":1,"from":"a","data":"close","ts":1}"#
        )
        .is_none());
    }

    #[test]
    fn sse_urls() {
        let u = |s: &str| sse_url(s).map(|u| u.to_string()).map_err(|f| f.reason);
        assert_eq!(
            u("ws://127.0.0.1:8080/ws").unwrap(),
            "http://127.0.0.1:8080/sse"
        );
        assert_eq!(
            u("wss://gw.example/chat/ws").unwrap(),
            "https://gw.example/chat/sse"
        );
        assert_eq!(
            u("https://gw.example/sse").unwrap(),
            "https://gw.example/sse"
        );
        assert_eq!(u("http://gw.example").unwrap(), "http://gw.example/sse");
        assert!(u("ftp://gw.example/ws").is_err());
    }
}
