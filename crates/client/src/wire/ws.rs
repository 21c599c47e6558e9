//! The WebSocket wire: TCP (+ TLS), the upgrade (offering
//! permessage-deflate), `welcome`, and a writer task.

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate_protocol::Welcome;

use super::{refusal, welcome, Failure, Incoming, Outbound, Wire};
use crate::config::{ClientConfig, Transport};
use crate::inflate::Inflating;

type WsStream = WebSocketStream<Inflating<MaybeTlsStream<TcpStream>>>;

/// TCP (+TLS), upgrade, `welcome` (the caller bounds the time).
pub(super) async fn establish(
    cfg: &ClientConfig,
    token: &str,
    url: &str,
) -> Result<(Wire, Welcome), Failure> {
    let mut req = url
        .into_client_request()
        .map_err(|e| Failure::new(format!("bad URL: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| Failure::new("the token is not a valid header value"))?;
    req.headers_mut().insert("authorization", bearer);
    if let Some(origin) = &cfg.origin {
        let origin =
            HeaderValue::from_str(origin).map_err(|_| Failure::new("bad origin header value"))?;
        req.headers_mut().insert("origin", origin);
    }
    let (mut ws, _) = connect(cfg, req).await.map_err(|e| match e {
        WsError::Http(resp) => refusal("upgrade", resp.status(), resp.body().as_deref()),
        e => Failure::new(e.to_string()),
    })?;
    let first = loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => break welcome(text.as_str())?,
            Some(Ok(WsMessage::Close(frame))) => {
                let (code, reason) = close_parts(frame);
                return Err(Failure::new(format!(
                    "closed before welcome: {code} {reason}"
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                return Err(Failure::new(format!(
                    "connection error before welcome: {e}"
                )))
            }
            None => return Err(Failure::new("connection ended before welcome")),
        }
    };
    let compressed = ws.get_ref().negotiated();
    let (sink, stream) = ws.split();
    let (out, out_rx) = mpsc::unbounded_channel();
    let incoming = stream
        .map(|msg| match msg {
            Ok(WsMessage::Text(text)) => Ok(Incoming::Frame(text.as_str().to_owned())),
            Ok(WsMessage::Close(frame)) => {
                let (code, reason) = close_parts(frame);
                Ok(Incoming::Close(code, reason))
            }
            Ok(_) => Ok(Incoming::Alive),
            Err(e) => Err(format!("connection error: {e}")),
        })
        .boxed();
    let wire = Wire {
        incoming,
        out,
        writer: tokio::spawn(write_loop(sink, out_rx)),
        compressed,
        transport: Transport::WebSocket,
    };
    Ok((wire, first))
}

fn close_parts(frame: Option<CloseFrame>) -> (u16, String) {
    frame.map_or((1005, String::new()), |f| {
        (u16::from(f.code), f.reason.to_string())
    })
}

/// Writes queued frames, one flush per batch, until the queue closes or a
/// write fails.
async fn write_loop(mut sink: SplitSink<WsStream, WsMessage>, mut rx: UnboundedReceiver<Outbound>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 64).await > 0 {
        for m in batch.drain(..) {
            let m = match m {
                Outbound::Frame(text) => WsMessage::text(text),
                Outbound::Close => WsMessage::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "client closing".into(),
                })),
                Outbound::Token(_) => continue,
            };
            if sink.feed(m).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

type Request = tokio_tungstenite::tungstenite::handshake::client::Request;
type Response = tokio_tungstenite::tungstenite::handshake::client::Response;
type WsError = tokio_tungstenite::tungstenite::Error;

/// TCP (+ TLS for `wss://`), then the upgrade, offering permessage-deflate
/// unless `cfg.compression` is off. The TLS layer is set up here rather
/// than by tokio-tungstenite so that the inflating adapter sits between it
/// and the WebSocket protocol (see `inflate.rs`).
async fn connect(cfg: &ClientConfig, mut req: Request) -> Result<(WsStream, Response), WsError> {
    use tokio_tungstenite::tungstenite::error::UrlError;
    let uri = req.uri();
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err(WsError::Url(UrlError::UnsupportedUrlScheme)),
    };
    let host = uri
        .host()
        .ok_or(WsError::Url(UrlError::NoHostName))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let stream = if tls {
        tls_stream(cfg, &host, tcp).await?
    } else {
        MaybeTlsStream::Plain(tcp)
    };
    if cfg.compression {
        req.headers_mut().insert(
            "sec-websocket-extensions",
            HeaderValue::from_static(crate::inflate::OFFER),
        );
    }
    tokio_tungstenite::client_async_with_config(req, Inflating::new(stream), None).await
}

#[cfg(feature = "tls")]
async fn tls_stream(
    cfg: &ClientConfig,
    host: &str,
    tcp: TcpStream,
) -> Result<MaybeTlsStream<TcpStream>, WsError> {
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::error::TlsError;
    let config = match &cfg.tls {
        Some(c) => c.clone(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(WsError::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no native root CA certificates found",
                )));
            }
            roots.add_parsable_certificates(found.certs);
            Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| WsError::Tls(TlsError::InvalidDnsName))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(MaybeTlsStream::Rustls(tls))
}

#[cfg(not(feature = "tls"))]
async fn tls_stream(
    _cfg: &ClientConfig,
    _host: &str,
    _tcp: TcpStream,
) -> Result<MaybeTlsStream<TcpStream>, WsError> {
    Err(WsError::Url(
        tokio_tungstenite::tungstenite::error::UrlError::TlsFeatureNotEnabled,
    ))
}
