//! `wsgate client`: connect, join rooms, print every event as one JSON line
//! on stdout, and publish each line read from stdin.
//!
//! Input lines are `ROOM JSON` (publish `JSON` to `ROOM`) or plain `JSON`
//! (publish to the first `--room`); empty lines are skipped. Each publish is
//! answered by an `ack` line (`{"event":"ack","line":N,"room":..,"seq":..}`)
//! or an `error` line carrying the input line number. The tool reconnects by
//! itself (printing `disconnected`, `reconnecting`, `connected`, `resumed`
//! and `gap` events) and stops on SIGINT or SIGTERM, or, with
//! `--exit-on-eof`, once stdin ends and every publish is answered.
//!
//! ```text
//! $ wsgate client --url ws://127.0.0.1:8080/ws --token "$TOKEN" --room lobby
//! {"event":"connected","url":"ws://127.0.0.1:8080/ws","node":"n1","conn":"c-1a0","user":"alice","heartbeat_ms":30000,"compressed":true,"transport":"ws"}
//! {"event":"joined","room":"lobby","seq":0,"epoch":"k3Xb","recovered":null}
//! {"text":"hi"}
//! {"event":"ack","line":1,"room":"lobby","seq":1}
//! {"event":"message","room":"lobby","seq":1,"from":"alice","data":{"text":"hi"},"ts":1764043200123}
//! ```

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;

use crate::{Backoff, Client, ClientConfig, ClientError, Event, TokenSource, Transport};
use wsgate_protocol::close;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// Flags of `wsgate client`.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// WebSocket URL of a node's /ws endpoint; repeat (or comma-separate)
    /// for fail-over, tried round-robin.
    #[arg(
        long = "url",
        env = "WSGATE_URL",
        value_delimiter = ',',
        required = true,
        value_name = "URL"
    )]
    pub urls: Vec<String>,
    /// The JWT, sent as `Authorization: Bearer`.
    #[arg(
        long,
        env = "WSGATE_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_command"
    )]
    pub token: Option<String>,
    /// A shell command that prints a fresh JWT; run at connect, before
    /// reconnecting after the token expired (4001), and before `exp` to
    /// refresh the open connection.
    #[arg(long, env = "WSGATE_TOKEN_COMMAND", conflicts_with = "token")]
    pub token_command: Option<String>,
    /// Room to join; repeat (or comma-separate) for several. Plain JSON
    /// input lines are published to the first.
    #[arg(
        long = "room",
        env = "WSGATE_ROOM",
        value_delimiter = ',',
        value_name = "ROOM"
    )]
    pub rooms: Vec<String>,
    /// `Origin` header to send (when the gateway requires one).
    #[arg(long, env = "WSGATE_ORIGIN")]
    pub origin: Option<String>,
    /// `ws` (WebSocket), `sse` (Server-Sent Events + POST, for networks
    /// that block the upgrade) or `auto` (WebSocket, SSE when it cannot
    /// open). An `http(s)://` URL is always SSE.
    #[arg(long, env = "WSGATE_TRANSPORT", value_enum, default_value = "ws")]
    pub transport: Transport,
    /// First reconnect delay ceiling (full jitter below it).
    #[arg(long, env = "WSGATE_BACKOFF_BASE", default_value = "500ms", value_parser = duration)]
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    #[arg(long, env = "WSGATE_BACKOFF_CAP", default_value = "30s", value_parser = duration)]
    pub backoff_cap: Duration,
    /// PEM file of extra root certificates for wss:// (for example a
    /// private CA or a self-signed development certificate).
    #[cfg(feature = "tls")]
    #[arg(long, env = "WSGATE_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Close and exit once stdin ends and every publish is answered
    /// (default: keep printing events until SIGINT or SIGTERM).
    #[arg(long, env = "WSGATE_EXIT_ON_EOF")]
    pub exit_on_eof: bool,
}

impl ClientArgs {
    /// The client configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<ClientConfig> {
        let token = match (&self.token, &self.token_command) {
            (_, Some(cmd)) => command_token_source(cmd.clone()),
            (Some(t), None) => TokenSource::Static(t.trim().to_owned()),
            (None, None) => anyhow::bail!("give --token or --token-command"),
        };
        let mut config = ClientConfig::new(self.urls.clone(), token);
        config.origin = self.origin.clone();
        config.transport = self.transport;
        config.backoff = Backoff::new(self.backoff_base, self.backoff_cap);
        #[cfg(feature = "tls")]
        if let Some(path) = &self.ca_cert {
            config.tls = Some(tls_config(path)?);
        }
        config.validate()?;
        for room in &self.rooms {
            if !wsgate_protocol::is_valid_room(room) {
                return Err(ClientError::InvalidRoom(room.clone()).into());
            }
        }
        Ok(config)
    }
}

/// A token source running `sh -c CMD` and taking its trimmed stdout.
fn command_token_source(cmd: String) -> TokenSource {
    let cmd = Arc::new(cmd);
    TokenSource::callback(move || {
        let cmd = cmd.clone();
        async move {
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(cmd.as_str())
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
                .await?;
            if !out.status.success() {
                return Err(format!("--token-command exited with {}", out.status).into());
            }
            let token = String::from_utf8(out.stdout)?.trim().to_owned();
            if token.is_empty() {
                return Err("--token-command printed nothing".into());
            }
            Ok(token)
        }
    })
}

#[cfg(feature = "tls")]
fn tls_config(path: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls::pki_types::CertificateDer<'static> =
            cert.with_context(|| format!("bad PEM in {}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("unusable certificate in {}", path.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in {}", path.display());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What to publish for one input line.
#[derive(Debug)]
enum Input {
    Skip,
    Publish { room: String, data: Box<RawValue> },
}

/// `ROOM JSON`, or plain `JSON` for `default_room`.
fn parse_line(line: &str, default_room: Option<&str>) -> Result<Input, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Input::Skip);
    }
    if let Ok(data) = serde_json::from_str::<Box<RawValue>>(line) {
        let room = default_room
            .ok_or("no --room given: write `ROOM JSON` to choose the room")?
            .to_owned();
        return Ok(Input::Publish { room, data });
    }
    let Some((room, rest)) = line.split_once(char::is_whitespace) else {
        return Err("expected `ROOM JSON` or a JSON value".into());
    };
    if !wsgate_protocol::is_valid_room(room) {
        return Err(format!(
            "not JSON, and {room:?} is not a room name (expected `ROOM JSON` or a JSON value)"
        ));
    }
    let data = serde_json::from_str::<Box<RawValue>>(rest.trim())
        .map_err(|e| format!("invalid JSON after room {room:?}: {e}"))?;
    Ok(Input::Publish {
        room: room.to_owned(),
        data,
    })
}

/// Run `wsgate client` on stdin and stdout until SIGINT/SIGTERM (or the end
/// of stdin with `--exit-on-eof`).
///
/// Stdin is read on a plain thread of its own (not tokio's blocking pool,
/// which a runtime waits for when it shuts down: a read blocked on a
/// terminal or an idle pipe would keep the process alive after SIGTERM).
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let (tx, lines) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("wsgate-client-stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                let failed = line.is_err();
                if tx.send(line).is_err() || failed {
                    break;
                }
            }
        })
        .context("cannot start the stdin reader")?;
    run_lines(args, lines, std::io::stdout(), shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Like [`run`], with the input, output and stop signal given (for tests
/// and embedding).
pub async fn run_with<R, W, S>(args: ClientArgs, input: R, out: W, stop: S) -> anyhow::Result<()>
where
    R: AsyncBufRead + Unpin + Send + 'static,
    W: Write,
    S: Future<Output = ()>,
{
    let (tx, lines) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut input = input.lines();
        while let Some(line) = input.next_line().await.transpose() {
            let failed = line.is_err();
            if tx.send(line).is_err() || failed {
                break;
            }
        }
    });
    let result = run_lines(args, lines, out, stop).await;
    reader.abort();
    result
}

/// The tool on a channel of input lines (closed at the end of input).
async fn run_lines<W, S>(
    args: ClientArgs,
    input: mpsc::UnboundedReceiver<std::io::Result<String>>,
    mut out: W,
    stop: S,
) -> anyhow::Result<()>
where
    W: Write,
    S: Future<Output = ()>,
{
    let config = args.config()?;
    let (client, mut events) = Client::connect(config).await?;
    let mut emit = |line: String| -> anyhow::Result<()> {
        writeln!(out, "{line}").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")
    };
    // Events (the `connected` one first) go out before the join answers.
    while let Some(event) = events.try_next() {
        emit(serde_json::to_string(&event)?)?;
    }
    for room in &args.rooms {
        match client.join(room).await {
            Ok(info) => emit(
                Line {
                    room: Some(&info.room),
                    seq: Some(info.seq),
                    epoch: Some(&info.epoch),
                    recovered: info.recovered,
                    ..Line::new("joined")
                }
                .json(),
            )?,
            Err(e) => emit(Line::error(None, Some(room), &e))?,
        }
    }
    // Publishing runs beside the event loop; its answers come back here so
    // that one writer prints every line.
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<String>();
    let publisher = tokio::spawn(publish_lines(
        client.clone(),
        input,
        args.rooms.first().cloned(),
        answers_tx,
    ));
    let mut input_done = false;
    tokio::pin!(stop);
    let static_token = args.token_command.is_none();
    let mut dead_token = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => {
                    emit(serde_json::to_string(&event)?)?;
                    if static_token {
                        dead_token = dead_static_token(&event);
                        if dead_token.is_some() {
                            break;
                        }
                    }
                }
                None => break,
            },
            answer = answers.recv(), if !input_done => match answer {
                Some(line) => emit(line)?,
                None => {
                    input_done = true;
                    if args.exit_on_eof {
                        break;
                    }
                }
            },
            _ = &mut stop => break,
        }
    }
    publisher.abort();
    client.close().await;
    while let Some(event) = events.try_next() {
        emit(serde_json::to_string(&event)?)?;
    }
    match dead_token {
        Some(why) => Err(anyhow::anyhow!(
            "{why}; a static --token cannot be renewed: mint a new one, or use --token-command to get a fresh token at every connect"
        )),
        None => Ok(()),
    }
}

/// With a static token, retrying cannot help once the server refused it
/// (401) or closed the connection because it expired (4001): say why.
fn dead_static_token(event: &Event) -> Option<String> {
    match event {
        Event::ConnectFailed {
            status: Some(401),
            reason,
            ..
        } => Some(format!("the server refused the token ({reason})")),
        Event::Disconnected {
            code: Some(close::TOKEN_EXPIRED),
            ..
        } => Some("the token expired (close 4001)".to_owned()),
        _ => None,
    }
}

/// Publish every input line in order, each after the previous one's answer.
async fn publish_lines(
    client: Client,
    mut input: mpsc::UnboundedReceiver<std::io::Result<String>>,
    default_room: Option<String>,
    answers: mpsc::UnboundedSender<String>,
) {
    let mut n: u64 = 0;
    loop {
        let line = match input.recv().await {
            Some(Ok(line)) => line,
            None => break,
            Some(Err(e)) => {
                let message = format!("cannot read stdin: {e}");
                let _ = answers.send(
                    Line {
                        code: Some("bad_input"),
                        message: Some(&message),
                        ..Line::new("error")
                    }
                    .json(),
                );
                break;
            }
        };
        n += 1;
        let answer = match parse_line(&line, default_room.as_deref()) {
            Ok(Input::Skip) => continue,
            Ok(Input::Publish { room, data }) => match client.publish_raw(&room, data).await {
                Ok(seq) => Line {
                    line: Some(n),
                    room: Some(&room),
                    seq: Some(seq),
                    ..Line::new("ack")
                }
                .json(),
                Err(e) => Line::error(Some(n), Some(&room), &e),
            },
            Err(message) => Line {
                line: Some(n),
                code: Some("bad_input"),
                message: Some(&message),
                ..Line::new("error")
            }
            .json(),
        };
        if answers.send(answer).is_err() {
            break;
        }
    }
}

/// An output line that is not an [`crate::Event`]: `joined`, `ack`, `error`.
#[derive(serde::Serialize)]
struct Line<'a> {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl<'a> Line<'a> {
    fn new(event: &'static str) -> Line<'a> {
        Line {
            event,
            line: None,
            room: None,
            seq: None,
            epoch: None,
            recovered: None,
            code: None,
            message: None,
        }
    }

    /// An `error` line; a server error keeps its own code and message.
    fn error(line: Option<u64>, room: Option<&'a str>, e: &ClientError) -> String {
        let text = e.to_string();
        let (code, message) = match e {
            ClientError::Server { code, message } => (code.as_str(), message.as_str()),
            ClientError::Disconnected => ("disconnected", text.as_str()),
            ClientError::Timeout => ("timeout", text.as_str()),
            ClientError::Closed | ClientError::Cancelled => ("closed", text.as_str()),
            _ => ("client_error", text.as_str()),
        };
        Line {
            line,
            room,
            code: Some(code),
            message: Some(message),
            ..Line::new("error")
        }
        .json()
    }

    fn json(&self) -> String {
        // Plain strings and numbers: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ClientArgs,
    }

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_repeated_and_comma_separated_flags() {
        let cli = Cli::try_parse_from([
            "client",
            "--url",
            "ws://a/ws,ws://b/ws",
            "--url",
            "ws://c/ws",
            "--token",
            "t",
            "--room",
            "lobby",
            "--room",
            "x,y",
            "--backoff-base",
            "100ms",
        ])
        .unwrap();
        assert_eq!(cli.args.urls, ["ws://a/ws", "ws://b/ws", "ws://c/ws"]);
        assert_eq!(cli.args.rooms, ["lobby", "x", "y"]);
        assert_eq!(cli.args.backoff_base, Duration::from_millis(100));
        let config = cli.args.config().unwrap();
        assert_eq!(config.urls.len(), 3);
        assert_eq!(config.backoff.base(), Duration::from_millis(100));
        assert_eq!(config.transport, Transport::WebSocket);
        let with_transport = |flag| {
            Cli::try_parse_from([
                "client",
                "--url",
                "ws://a/ws",
                "--token",
                "t",
                "--transport",
                flag,
            ])
        };
        for (flag, transport) in [
            ("sse", Transport::Sse),
            ("auto", Transport::Auto),
            ("ws", Transport::WebSocket),
        ] {
            let cli = with_transport(flag).unwrap();
            assert_eq!(cli.args.config().unwrap().transport, transport);
        }
        assert!(with_transport("carrier-pigeon").is_err());
    }

    #[test]
    fn needs_a_url_and_a_token() {
        assert!(Cli::try_parse_from(["client", "--token", "t"]).is_err());
        assert!(Cli::try_parse_from(["client", "--url", "ws://a/ws"]).is_err());
        assert!(Cli::try_parse_from([
            "client",
            "--url",
            "ws://a/ws",
            "--token",
            "t",
            "--token-command",
            "echo t"
        ])
        .is_err());
        let bad_room = Cli::try_parse_from([
            "client",
            "--url",
            "ws://a/ws",
            "--token",
            "t",
            "--room",
            "a b",
        ])
        .unwrap();
        assert!(bad_room.args.config().is_err());
        let bad_url = Cli::try_parse_from(["client", "--url", "ftp://a", "--token", "t"]).unwrap();
        assert!(bad_url.args.config().is_err());
    }

    fn publish(line: &str, default: Option<&str>) -> (String, String) {
        match parse_line(line, default).unwrap() {
            Input::Publish { room, data } => (room, data.get().to_owned()),
            Input::Skip => panic!("skipped {line:?}"),
        }
    }

    #[test]
    fn input_lines() {
        assert_eq!(
            publish(r#"{"text":"hi"}"#, Some("lobby")),
            ("lobby".into(), r#"{"text":"hi"}"#.into())
        );
        assert_eq!(
            publish(r#"  team.1 {"a": [1, 2]} "#, Some("lobby")),
            ("team.1".into(), r#"{"a": [1, 2]}"#.into())
        );
        assert_eq!(publish("r 42", None), ("r".into(), "42".into()));
        assert_eq!(
            publish(r#""just text""#, Some("l")),
            ("l".into(), r#""just text""#.into())
        );
        assert!(matches!(parse_line("   ", None).unwrap(), Input::Skip));
        assert!(parse_line(r#"{"a":1}"#, None).is_err(), "no default room");
        assert!(parse_line("lobby", Some("l")).is_err());
        assert!(parse_line("lobby hello there", Some("l")).is_err());
        assert!(parse_line("bad/room {}", Some("l")).is_err());
    }
}
