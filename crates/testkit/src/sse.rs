//! An SSE test client (PROTOCOL.md section 7) over a raw TCP connection:
//! `GET /sse` read as a chunked event stream, `POST /sse/{conn}` with the
//! minimal HTTP client. Every read is bounded by [`WAIT`].

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{any_token, http, HttpResponse, Refused, WAIT};

/// What the stream carried.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    /// An event: its `data` parsed as JSON.
    Event(serde_json::Value),
    /// A comment line (the heartbeat).
    Comment,
}

/// An open SSE stream and what is needed to POST to it.
pub struct Sse {
    stream: TcpStream,
    /// Bytes read and not yet decoded from the chunked body.
    raw: Vec<u8>,
    /// Decoded body bytes not yet parsed into events.
    body: Vec<u8>,
    /// The last chunk was read.
    done: bool,
    /// The token of the stream (also used for POSTs).
    pub token: String,
    /// The conn id of `welcome`.
    pub conn: String,
    /// `http://host:port` of the node.
    pub base: String,
    /// The response head.
    pub head: Vec<(String, String)>,
    next_id: u64,
}

impl Sse {
    /// Open a stream of `sub` (a token for every room) and read `welcome`.
    pub async fn open(addr: SocketAddr, sub: &str) -> (Sse, serde_json::Value) {
        Self::open_with(addr, &any_token(sub)).await
    }

    /// Open a stream with `token` and read `welcome`.
    pub async fn open_with(addr: SocketAddr, token: &str) -> (Sse, serde_json::Value) {
        let auth = format!("Authorization: Bearer {token}\r\n");
        let mut sse = Self::connect(addr, &auth, token, None)
            .await
            .expect("stream refused");
        let welcome = sse.json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        sse.conn = welcome["conn"].as_str().expect("conn").to_owned();
        (sse, welcome)
    }

    /// `GET /sse` with these extra header lines (`Name: value\r\n`), and a
    /// small socket receive buffer when given. `token` is kept for POSTs.
    pub async fn connect(
        addr: SocketAddr,
        headers: &str,
        token: &str,
        rcvbuf: Option<u32>,
    ) -> Result<Sse, Refused> {
        let mut stream = crate::raw::connect_tcp(addr, rcvbuf).await;
        let req = format!(
            "GET /sse HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{headers}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("response head timed out")
                .expect("read");
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let rest = raw[end + 4..].to_vec();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let head: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        if status != 200 {
            return Err(Refused {
                status,
                headers: head,
            });
        }
        Ok(Sse {
            stream,
            raw: rest,
            body: Vec::new(),
            done: false,
            token: token.to_owned(),
            conn: String::new(),
            base: format!("http://{addr}"),
            head,
            next_id: 0,
        })
    }

    /// A response header of the stream.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Decode complete chunks from `raw` into `body`.
    fn dechunk(&mut self) {
        loop {
            let Some(i) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..i]).to_string();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            if self.raw.len() < i + 2 + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[i + 2..i + 2 + size]);
            self.raw.drain(..i + 2 + size + 2);
            if size == 0 {
                self.done = true;
                return;
            }
        }
    }

    /// Parse one complete item from `body`.
    fn parse(&mut self) -> Option<SseItem> {
        let end = self.body.windows(2).position(|w| w == b"\n\n")?;
        let block = String::from_utf8(self.body[..end].to_vec()).expect("UTF-8 event");
        self.body.drain(..end + 2);
        let data: Vec<&str> = block
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            assert!(block.lines().all(|l| l.starts_with(':')), "{block:?}");
            return Some(SseItem::Comment);
        }
        let json = data.join("\n");
        Some(SseItem::Event(
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}")),
        ))
    }

    /// The next item, or `None` when the response ended (or the
    /// connection did).
    pub async fn next(&mut self) -> Option<SseItem> {
        loop {
            self.dechunk();
            if let Some(item) = self.parse() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            let mut buf = [0u8; 16384];
            // A read error (a reset) ends the stream like its end.
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .expect("no event within the wait")
                .unwrap_or_default();
            if n == 0 {
                return None;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The next event, skipping heartbeat comments.
    pub async fn json(&mut self) -> serde_json::Value {
        loop {
            match self.next().await {
                Some(SseItem::Event(v)) => return v,
                Some(SseItem::Comment) => continue,
                None => panic!("stream ended"),
            }
        }
    }

    /// Events until the response ends: every event, in order.
    pub async fn rest(&mut self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Some(item) = self.next().await {
            if let SseItem::Event(v) = item {
                out.push(v);
            }
        }
        out
    }

    /// POST `body` to this stream with its token; the answer.
    pub async fn post_raw(&self, body: &str) -> HttpResponse {
        let auth = format!("Bearer {}", self.token);
        http(
            "POST",
            &format!("{}/sse/{}", self.base, self.conn),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        )
        .await
        .expect("POST")
    }

    /// POST one frame (or an array) and expect 202.
    pub async fn send(&self, v: serde_json::Value) {
        let resp = self.post_raw(&v.to_string()).await;
        assert_eq!(resp.0, 202, "{resp:?}");
    }

    /// A fresh frame id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("s{}", self.next_id)
    }

    /// Join `room` and return `joined`.
    pub async fn join(&mut self, room: &str) -> serde_json::Value {
        let id = self.id();
        self.send(serde_json::json!({"type": "join", "room": room, "id": id}))
            .await;
        self.answer(&id).await
    }

    /// The answer with `id`, skipping other events (room messages).
    pub async fn answer(&mut self, id: &str) -> serde_json::Value {
        loop {
            let v = self.json().await;
            if v["id"] == id {
                return v;
            }
        }
    }
}
