//! `connect`: open N connections as fast as allowed (connect, upgrade with a
//! JWT, `welcome`), `--concurrency` handshakes in flight; report handshakes
//! per second and failures by status. Connections stay open until all are
//! done, then close.

use std::time::Duration;

use anyhow::Result;

use super::member::MemberSpec;
use super::{round_robin, usage_to_report, Crowd, Ctx};
use crate::cli::ConnectArgs;
use crate::report::{self, Report};

/// Run the scenario.
pub async fn run(ctx: &Ctx, args: &ConnectArgs) -> Result<Report> {
    let mut report = Report::new("connect");
    let token: std::sync::Arc<str> = ctx.tokens.for_user("bench-connect")?.into();
    let specs = (0..args.connections)
        .map(|i| MemberSpec {
            index: i,
            url_idx: round_robin(i, ctx.node_urls()),
            token: token.clone(),
            join: None,
            presence: false,
            publish: None,
            reconnect: false,
            track_latency: false,
        })
        .collect();
    let mut crowd = Crowd::new(0);
    let before = ctx.probe.snapshot().await;
    let setup = crowd.spawn(ctx, specs, "connecting").await;
    let after = ctx.probe.snapshot().await;
    report.line(setup.human("handshakes"));
    report.line(format!(
        "handshakes/s: {} (connect + upgrade + JWT + welcome; {} in flight)",
        report::thousands(setup.per_s),
        ctx.common.concurrency
    ));
    report.line(format!("handshake time: {}", setup.latency.human()));
    let usage = usage_to_report(&mut report, &before, &after);
    if setup.connected > 0 {
        report.line(format!(
            "tool CPU per handshake: {:.1} us",
            usage.tool_cpu_s * 1e6 / setup.connected as f64
        ));
        if let Some(cpu) = usage.server_cpu_s {
            report.line(format!(
                "server CPU per handshake: {:.1} us",
                cpu * 1e6 / setup.connected as f64
            ));
            report.set(
                "server_cpu_us_per_handshake",
                cpu * 1e6 / setup.connected as f64,
            );
        }
    }
    report.set("handshakes_per_s", setup.per_s);
    report.set("setup", &setup);
    setup.fail_unless_complete(&mut report, "connections failed");
    let tally = crowd.finish(Duration::from_secs(10)).await;
    if !tally.dropped.is_empty() {
        tally.check(&mut report);
    }
    Ok(report)
}
