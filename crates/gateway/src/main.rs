//! The `wsgate` binary: parses flags, sets up logging, binds the listeners
//! and runs the gateway library until SIGTERM or SIGINT.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use clap::Subcommand;
use tokio_util::sync::CancellationToken;
use wsgate::auth::{mint_hs256, MintRequest};
use wsgate::config::{Command, CommandLine, ServeArgs, ServeCommand, TokenArgs};
use wsgate::{logging, Listeners};

/// jemalloc instead of glibc's malloc: an SSE stream, whose join comes
/// through a short-lived HTTP connection with 8 KiB buffers, costs 2.13
/// instead of 4.19 KiB idle (glibc's heap stays fragmented by those
/// buffers), and an idle WebSocket 2.23 instead of 2.41 KiB
/// (docs/benchmarks.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The library's command line with `client` added: it lives here so that
/// the gateway library does not depend on the client SDK.
type Cli = CommandLine<BinCommand>;

/// The library's subcommands, then `client`.
// Parsed once at start-up: the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum BinCommand {
    #[command(flatten)]
    Gateway(Command),
    /// Connect as a client: join rooms, print events as JSON lines, publish stdin lines.
    Client(wsgate_client::cli::ClientArgs),
}

impl ServeCommand for BinCommand {
    fn serve_mut(&mut self) -> Option<&mut ServeArgs> {
        match self {
            BinCommand::Gateway(command) => command.serve_mut(),
            BinCommand::Client(_) => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::parse_with_dev_defaults(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Some(BinCommand::Gateway(Command::Token(args))) => token(&args),
        Some(BinCommand::Client(args)) => client(args),
        Some(BinCommand::Gateway(Command::Serve(args))) => serve(args),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            say(&format!("wsgate: error: {message}"));
            ExitCode::from(2)
        }
    }
}

/// One line on stderr. Unlike `eprintln!`, never panics: when stderr is a
/// closed pipe (`wsgate client ... 2>&1 | head -1`) there is no one to tell.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether an error comes from writing to a closed pipe (EPIPE): the reader
/// went away, which ends a CLI quietly.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `--help` and `--version` print as clap does; a bad flag or value is one
/// line on stderr (OPERATING.md), not clap's multi-line report.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // The first paragraph holds the message (and, for missing arguments,
    // their names on the following lines); usage and tips follow it.
    let text = e.to_string();
    let message = text
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    say(&format!("wsgate: error: {message} (see --help)"));
    ExitCode::from(2)
}

fn client(args: wsgate_client::cli::ClientArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    match runtime.block_on(wsgate_client::cli::run(args)) {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        result => result.map_err(|e| format!("{e:#}")),
    }
}

fn token(args: &TokenArgs) -> Result<(), String> {
    use std::io::Write;
    if args.ttl.is_zero() {
        return Err(
            "invalid --ttl: must be greater than 0 (the token would be expired at once)".into(),
        );
    }
    let token = mint_hs256(
        args.jwt_secret.as_bytes(),
        &MintRequest {
            sub: &args.sub,
            rooms: &args.rooms,
            publish: &args.publish,
            ttl: args.ttl,
            issuer: args.jwt_issuer.as_deref(),
            audience: args.jwt_audience.as_deref(),
        },
    )
    .map_err(|e| e.to_string())?;
    match writeln!(std::io::stdout(), "{token}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let (listen, ops_listen) = (args.listen, args.ops_listen);
    let (log_format, log_filter) = (args.log_format, args.log.clone());
    let (mut config, notes) = args.into_config().map_err(|e| e.to_string())?;
    let resources = wsgate::Resources::load(&config).map_err(|e| e.to_string())?;
    logging::init(log_format, &log_filter)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let public = wsgate::listener::bind(listen)
            .map_err(|e| format!("cannot bind --listen {listen}: {e}"))?;
        let ops = wsgate::listener::bind(ops_listen)
            .map_err(|e| format!("cannot bind --ops-listen {ops_listen}: {e}"))?;
        if config.dev {
            let page = public
                .local_addr()
                .map(|addr| DevPage::new(addr, config.tls.is_some()));
            if let Ok(page) = &page {
                for origin in &page.origins {
                    config.origins.allow(origin);
                }
            }
            dev_banner(&config, notes.generated_secret, page.ok().as_ref());
        }
        let stop = CancellationToken::new();
        tokio::spawn(wsgate::shutdown::on_signal(stop.clone()));
        wsgate::run(Listeners { public, ops }, config, resources, stop)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Where dev mode's chat page is: the URL to print, and the origins a
/// browser that opens it (by that URL or by the IP address) sends.
struct DevPage {
    url: String,
    origins: Vec<String>,
}

impl DevPage {
    fn new(addr: SocketAddr, tls: bool) -> DevPage {
        let scheme = if tls { "https" } else { "http" };
        let port = addr.port();
        let ip = match addr.ip() {
            // Every interface: a browser on this machine reaches it on loopback.
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let literal = SocketAddr::new(ip, port);
        let by_ip = format!("{scheme}://{literal}");
        // `localhost` only where it reaches this listener (127.0.0.1 or ::1).
        if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST) {
            let by_name = format!("{scheme}://localhost:{port}");
            DevPage {
                url: format!("{by_name}/"),
                origins: vec![by_name, by_ip],
            }
        } else {
            DevPage {
                url: format!("{by_ip}/"),
                origins: vec![by_ip],
            }
        }
    }
}

/// Dev mode: say what was made up, where the page is, and print a ready
/// token on stderr.
fn dev_banner(config: &wsgate::Config, generated: bool, page: Option<&DevPage>) {
    if generated {
        tracing::warn!(
            "dev mode: no JWT key configured, using a random HMAC secret for this process"
        );
    }
    if let Some(page) = page {
        say(&format!(
            "wsgate dev mode: chat page at {} (origins allowed: {})",
            page.url,
            page.origins.join(", ")
        ));
    }
    let Some(secret) = &config.hmac_secret else {
        return;
    };
    let all = ["*".to_owned()];
    match mint_hs256(secret, &wsgate::http::dev_mint_request("dev", &all, config)) {
        Ok(token) => {
            say(&format!(
                "wsgate dev mode: token (sub \"dev\", all rooms, 1 h):\n{token}"
            ));
        }
        Err(e) => tracing::warn!(error = %e, "dev mode: could not mint a token"),
    }
}
