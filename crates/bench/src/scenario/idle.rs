//! `idle`: open N connections, each joined to a room, hold them, and report
//! the server's memory per connection: resident memory (from `/metrics` or
//! `/proc/PID/status`) after minus before, over the connections held.
//!
//! One process may open at most its open-file limit (20,000 here): for more,
//! run several `wsgate-bench idle` processes at once (see the README).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::member::MemberSpec;
use super::{member_tokens, room_names, round_robin, sleep_with_bar, usage_to_report, Crowd, Ctx};
use crate::cli::IdleArgs;
use crate::report::Report;

/// Run the scenario.
pub async fn run(ctx: &Ctx, args: &IdleArgs) -> Result<Report> {
    let mut report = Report::new("idle");
    let tokens = member_tokens(ctx, &args.presence, "bench-idle", args.connections)?;
    let rooms = room_names(&args.room, args.rooms);
    let specs = (0..args.connections)
        .map(|i| MemberSpec {
            index: i,
            url_idx: round_robin(i, ctx.node_urls()),
            token: tokens[i % tokens.len()].clone(),
            join: Some((rooms[i % rooms.len()].clone(), i % rooms.len())),
            presence: args.presence.presence,
            publish: None,
            reconnect: false,
            track_latency: false,
        })
        .collect();
    let before = ctx.probe.snapshot().await;
    let mut crowd = Crowd::new(rooms.len());
    let setup = crowd.spawn(ctx, specs, "connecting").await;
    report.line(setup.human("connections"));
    sleep_with_bar(Instant::now() + args.hold, "holding").await;
    let after = ctx.probe.snapshot().await;
    let held = crowd
        .lives
        .iter()
        .filter(|l| l.connected.load(Relaxed))
        .count();
    report.line(format!("held: {held} connections for {:?}", args.hold));
    usage_to_report(&mut report, &before, &after);

    let server_delta = after.server_rss() - before.server_rss();
    if after.has_server() && held > 0 {
        let per_conn = server_delta / held as f64;
        report.line(format!(
            "server memory: {:.1} MiB before, {:.1} MiB after: {:.2} KiB per connection",
            before.server_rss() / 1048576.0,
            after.server_rss() / 1048576.0,
            per_conn / 1024.0
        ));
        report.set("server_bytes_per_connection", per_conn);
        report.set("server_kib_per_connection", per_conn / 1024.0);
    } else {
        report.warn("no server memory figures: give --ops-url or --pid");
    }
    if let (Some(a), Some(b)) = (
        before.node_sum(|n| n.connections_active),
        after.node_sum(|n| n.connections_active),
    ) {
        report.line(format!("wsgate_connections_active: {a} before, {b} after"));
        if (b - a) < held as f64 {
            report.warn(format!(
                "the nodes count {} new connections, the tool holds {held}",
                b - a
            ));
        }
    }
    let tool_delta = after.tool_rss.saturating_sub(before.tool_rss) as f64;
    report.line(format!(
        "tool memory: {:.2} KiB per connection",
        tool_delta / held.max(1) as f64 / 1024.0
    ));
    report.set("held", held);
    report.set("presence", args.presence.presence);
    report.set("transport", ctx.connector.transport());
    report.set("distinct_users", args.presence.distinct());
    let events = crowd.shared.presence_events.load(Relaxed);
    if args.presence.presence {
        report.line(format!("presence events received: {events}"));
    }
    report.set("presence_events", events);
    report.set("setup", &setup);
    report.set("tool_bytes_per_connection", tool_delta / held.max(1) as f64);
    if !setup.complete() || held < setup.attempted {
        report.fail(format!("held {held} of {} connections", setup.attempted));
    }
    let tally = crowd.finish(Duration::from_secs(20)).await;
    tally.check(&mut report);
    Ok(report)
}
