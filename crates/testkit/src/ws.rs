//! A WebSocket test client (tungstenite) that speaks the protocol.

use crate::{any_token, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate_protocol::ServerFrame;

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
