//! The `wsgate-bench` binary: parse and check the flags, raise the open-file
//! limit, run one scenario under a hard deadline, print the summary and the
//! JSON line.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use wsgate_bench::cli::{Cli, Command, Scenario};
use wsgate_bench::report::Report;
use wsgate_bench::{clock, floor, scenario};

/// Descriptors kept free besides the connections (listeners, /proc, HTTP probes).
const SPARE_FDS: u64 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let scenario = match cli.command {
        Command::Scenario(s) => s,
        Command::FloorServer(args) => {
            if let Err(e) = args.validate() {
                eprintln!("wsgate-bench: error: {e}");
                return ExitCode::from(2);
            }
            // One descriptor per subscriber: as many as this process may open.
            let _ = rlimit::increase_nofile_limit(u64::MAX);
            if let Err(e) = floor::serve(args.listen) {
                eprintln!("wsgate-bench: error: {e:#}");
                return ExitCode::from(2);
            }
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = scenario.validate() {
        eprintln!("wsgate-bench: error: {e}");
        return ExitCode::from(2);
    }
    clock::base();
    if let Err(e) = check_limits(&scenario) {
        eprintln!("wsgate-bench: error: {e}");
        return ExitCode::from(2);
    }
    let common = scenario.common();
    let threads = common
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // One core: a current-thread runtime skips the work-stealing machinery.
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate-bench: error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = scenario.deadline();
    let outcome =
        runtime.block_on(async { tokio::time::timeout(deadline, scenario::run(&scenario)).await });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(Ok(report)) => {
            print_report(&report, common.json);
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Ok(Err(e)) => {
            eprintln!("wsgate-bench: error: {e:#}");
            let mut report = Report::new(scenario.name());
            report.fail(format!("{e:#}"));
            print_report(&report, true);
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!("wsgate-bench: error: hard deadline of {deadline:?} reached");
            let mut report = Report::new(scenario.name());
            report.fail(format!("hard deadline of {deadline:?} reached"));
            print_report(&report, true);
            ExitCode::from(3)
        }
    }
}

#[allow(clippy::print_stdout)]
fn print_report(report: &Report, json_only: bool) {
    if !json_only {
        print!("{}", report.human());
    }
    println!("{}", report.json_line());
}

/// Raise RLIMIT_NOFILE to the hard limit and check the run fits in it and in
/// the ephemeral port range.
fn check_limits(scenario: &Scenario) -> Result<(), String> {
    let n = scenario.connections() as u64;
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-file limit: {e}"))?;
    if n + SPARE_FDS > limit {
        return Err(format!(
            "{n} connections need about {} open files, this process may open {limit}: \
             run several wsgate-bench processes with fewer connections each (see the README)",
            n + SPARE_FDS
        ));
    }
    let common = scenario.common();
    if let Some(ports) = ephemeral_ports() {
        // Bound sockets take a port per source address; unbound ones per destination.
        let per = if common.source_ips.is_empty() {
            n.div_ceil(common.urls.len() as u64)
        } else {
            n.div_ceil(common.source_ips.len() as u64)
        };
        if per > ports {
            return Err(format!(
                "{per} connections per {} but only {ports} ephemeral ports: add --source-ips 127.0.0.2,127.0.0.3,...",
                if common.source_ips.is_empty() { "target" } else { "source address" }
            ));
        }
    }
    Ok(())
}

fn ephemeral_ports() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}
