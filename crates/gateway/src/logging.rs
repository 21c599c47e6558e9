//! Logging: JSON lines on stdout when it is not a terminal, pretty text
//! otherwise; filter in `RUST_LOG` syntax from `--log`.
//!
//! Whatever the filter, the WebSocket library's TRACE events are never
//! recorded: they print every received frame, `refresh` tokens and message
//! payloads included, and tokens never appear in logs.

use std::io::IsTerminal;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Whether an event may be recorded at all, whatever `--log` says.
fn never_payloads(meta: &Metadata<'_>) -> bool {
    !(*meta.level() == Level::TRACE && meta.target().starts_with("tungstenite"))
}

/// Install the global subscriber. Fails on a malformed filter.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("invalid --log filter: {e}"))?;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .with(filter_fn(never_payloads))
            .try_init()
    } else {
        builder.finish().with(filter_fn(never_payloads)).try_init()
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}
