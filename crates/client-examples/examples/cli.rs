//! `wsgate client` without the gateway binary: the same flags and output
//! (`wsgate_client::cli`), for trying the tool from this crate alone.
//!
//! ```text
//! cargo run -p wsgate-client-examples --example cli -- --url ws://127.0.0.1:8080/ws --room lobby
//! ```

use clap::Parser;

/// Connect to wsgate, join rooms, print events as JSON lines, publish stdin lines.
#[derive(Parser)]
#[command(name = "wsgate-client")]
struct Cli {
    #[command(flatten)]
    args: wsgate_client::cli::ClientArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match wsgate_client::cli::run(cli.args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate client: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
