//! `fanout` (S subscribers in one room, P publishers at a total rate) and
//! `rooms` (C connections in rooms of K, each publishing at r/s): both
//! publish through a warm-up, measure for a duration, stop publishing, wait
//! for every member to catch up, and report deliveries per second, latency,
//! seq checks and CPU per delivery.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::member::{MemberSpec, PublishSpec};
use super::{round_robin, sleep_with_bar, usage_to_report, Crowd, Ctx};
use crate::cli::{Audience, FanoutArgs, PublisherArgs, RoomsArgs};
use crate::net::{PublishEncoder, Transport};
use crate::pace;
use crate::report::{self, Report};
use crate::stats::LatencySummary;

/// The gateway's default per-connection publish limit (messages/s).
pub const GATEWAY_DEFAULT_PUBLISH_RATE: f64 = 100.0;

/// What a measured phase publishes and for how long.
pub struct Plan {
    /// Publishing before the measurement.
    pub warmup: Duration,
    /// The measurement.
    pub duration: Duration,
    /// Longest catch-up wait after publishing stops.
    pub drain: Duration,
    /// Rate of each publisher.
    pub per_publisher: f64,
    /// Total publish rate.
    pub total_rate: f64,
    /// Deliveries per second expected at that rate.
    pub expected_deliveries: f64,
}

/// Run `fanout`.
pub async fn run_fanout(ctx: &Ctx, args: &FanoutArgs) -> Result<Report> {
    let mut report = Report::new("fanout");
    let shape = FanoutShape {
        audience: &args.audience,
        room: &args.room,
        publisher: &args.publisher,
        total_rate: args.rate,
    };
    let Some(mut crowd) = fanout_crowd(ctx, &mut report, shape).await? else {
        return Ok(report);
    };
    let (subs, publishers) = (args.audience.subscribers, args.audience.publishers);
    let per_publisher = pace::per_sender(args.rate, publishers);
    let plan = Plan {
        warmup: args.window.warmup,
        duration: args.window.duration,
        drain: args.drain,
        per_publisher,
        total_rate: args.rate,
        expected_deliveries: args.rate * subs as f64,
    };
    let payload = match args.publisher.payload_bytes {
        Some(n) => format!("a ~{n} B dashboard payload"),
        None => format!("{} B padding", args.publisher.payload),
    };
    report.line(format!(
        "load: {subs} subscribers in '{}' over {} node URL(s), {} publisher(s) at {} msg/s total ({} msg/s each), {payload}{}",
        args.room,
        ctx.node_urls(),
        publishers,
        args.rate,
        per_publisher,
        if ctx.connector.deflate() { ", permessage-deflate offered" } else { "" }
    ));
    if ctx.connector.transport() == Transport::Sse {
        report.line("subscribers over SSE (GET /sse, join by POST); publishers over WebSocket");
    }
    report.set("transport", ctx.connector.transport());
    measure(ctx, &mut crowd, &plan, &mut report, |i| {
        (i < subs).then_some(0)
    })
    .await;
    Ok(report)
}

/// The shape of a fan-out crowd.
pub struct FanoutShape<'a> {
    /// Subscribers (member indices `0..subscribers`) and publishers (after
    /// them).
    pub audience: &'a Audience,
    /// The room.
    pub room: &'a str,
    /// Padding bytes, and where publishers connect (default: the first URL).
    pub publisher: &'a PublisherArgs,
    /// Total rate (to space the publishers).
    pub total_rate: f64,
}

/// Connect the subscribers, then the publishers; `None` when not all made it
/// (the report says why; the crowd is finished).
pub async fn fanout_crowd(
    ctx: &Ctx,
    report: &mut Report,
    shape: FanoutShape<'_>,
) -> Result<Option<Crowd>> {
    let (subscribers, publishers) = (shape.audience.subscribers, shape.audience.publishers);
    let sub_token: Arc<str> = ctx.tokens.for_user("bench-sub")?.into();
    let pub_token: Arc<str> = ctx.tokens.for_user("bench-pub")?.into();
    let room: Arc<str> = shape.room.into();
    let mut crowd = Crowd::new(1);
    let subs = (0..subscribers)
        .map(|i| MemberSpec {
            index: i,
            url_idx: round_robin(i, ctx.node_urls()),
            token: sub_token.clone(),
            join: Some((room.clone(), 0)),
            presence: false,
            publish: None,
            reconnect: false,
            track_latency: true,
        })
        .collect();
    let setup = crowd.spawn(ctx, subs, "subscribers").await;
    report.line(setup.human("subscribers"));
    report.set("subscribers_setup", &setup);
    if !setup.fail_unless_complete(report, "subscribers did not connect") {
        crowd.finish(Duration::from_secs(10)).await;
        return Ok(None);
    }
    let pub_url = shape
        .publisher
        .publisher_url
        .as_deref()
        .and_then(|u| ctx.url_index(u))
        .unwrap_or(0);
    let encoder = match shape.publisher.payload_bytes {
        Some(n) => PublishEncoder::dashboard(shape.room, n),
        None => PublishEncoder::new(shape.room, shape.publisher.payload),
    };
    let encoder = Arc::new(encoder.keyed(shape.publisher.keys));
    let pubs = (0..publishers)
        .map(|i| MemberSpec {
            index: 0,
            url_idx: pub_url,
            token: pub_token.clone(),
            join: None,
            presence: false,
            publish: Some(PublishSpec {
                encoder: encoder.clone(),
                room_idx: 0,
                phase: pace::phase(shape.total_rate, i),
            }),
            reconnect: false,
            track_latency: false,
        })
        .collect();
    let setup = crowd.spawn(ctx, pubs, "publishers").await;
    report.line(setup.human("publishers"));
    if !setup.fail_unless_complete(report, "publishers did not connect") {
        crowd.finish(Duration::from_secs(10)).await;
        return Ok(None);
    }
    Ok(Some(crowd))
}

/// Run `rooms`.
pub async fn run_rooms(ctx: &Ctx, args: &RoomsArgs) -> Result<Report> {
    let mut report = Report::new("rooms");
    let k = args.room_size;
    let room_count = args.connections.div_ceil(k);
    let token: Arc<str> = ctx.tokens.for_user("bench-chat")?.into();
    let rooms: Vec<Arc<str>> = (0..room_count)
        .map(|r| format!("{}.{r}", args.room).into())
        .collect();
    let encoders: Vec<Arc<PublishEncoder>> = rooms
        .iter()
        .map(|r| Arc::new(PublishEncoder::new(r, args.payload).keyed(args.keys)))
        .collect();
    let period = pace::due_at(args.rate, 1);
    let specs = (0..args.connections)
        .map(|i| MemberSpec {
            index: i,
            url_idx: round_robin(i, ctx.node_urls()),
            token: token.clone(),
            join: Some((rooms[i / k].clone(), i / k)),
            presence: false,
            publish: Some(PublishSpec {
                encoder: encoders[i / k].clone(),
                room_idx: i / k,
                phase: period.mul_f64(rand::random::<f64>()),
            }),
            reconnect: false,
            track_latency: true,
        })
        .collect();
    let mut crowd = Crowd::new(room_count);
    let setup = crowd.spawn(ctx, specs, "connecting").await;
    report.line(setup.human("members"));
    report.set("setup", &setup);
    if !setup.fail_unless_complete(&mut report, "connections did not connect") {
        crowd.finish(Duration::from_secs(10)).await;
        return Ok(report);
    }
    // The last room may be smaller.
    let members_total: f64 = (0..room_count)
        .map(|r| {
            let size = (args.connections - r * k).min(k) as f64;
            size * size
        })
        .sum();
    let plan = Plan {
        warmup: args.window.warmup,
        duration: args.window.duration,
        drain: args.drain,
        per_publisher: args.rate,
        total_rate: args.rate * args.connections as f64,
        expected_deliveries: args.rate * members_total,
    };
    report.line(format!(
        "load: {} connections in {room_count} rooms of {k} over {} node URL(s), each publishing {} msg/s ({} msg/s total), {} B padding",
        args.connections,
        ctx.node_urls(),
        args.rate,
        plan.total_rate,
        args.payload
    ));
    measure(ctx, &mut crowd, &plan, &mut report, |i| Some(i / k)).await;
    Ok(report)
}

/// Publish through the warm-up, measure, drain, tally; fill the report.
pub async fn measure(
    ctx: &Ctx,
    crowd: &mut Crowd,
    plan: &Plan,
    report: &mut Report,
    member_room: impl Fn(usize) -> Option<usize>,
) {
    if plan.per_publisher > GATEWAY_DEFAULT_PUBLISH_RATE {
        report.warn(format!(
            "each publisher sends {} msg/s, above the gateway's default --publish-rate of {GATEWAY_DEFAULT_PUBLISH_RATE}: start the nodes with a higher --publish-rate/--publish-burst or use more --publishers",
            plan.per_publisher
        ));
    }
    let shared = crowd.shared.clone();
    let t0 = Instant::now();
    let from = t0 + plan.warmup;
    let until = from + plan.duration;
    shared.record_window(from, until);
    shared.rate.send_replace(plan.per_publisher);
    sleep_with_bar(from, "warm-up").await;
    let a = ctx.probe.snapshot().await;
    let (delivered_a, sent_a) = (shared.delivered.load(Relaxed), shared.sent.load(Relaxed));
    let rx_a = ctx.connector.rx_bytes.load(Relaxed);
    sleep_with_bar(until, "measuring").await;
    let b = ctx.probe.snapshot().await;
    let (delivered_b, sent_b) = (shared.delivered.load(Relaxed), shared.sent.load(Relaxed));
    let rx_b = ctx.connector.rx_bytes.load(Relaxed);
    shared.rate.send_replace(0.0);
    let drained = crowd.drain(plan.drain, &member_room).await;
    let latency = LatencySummary::of(&shared.latencies.take());

    let usage = usage_to_report(report, &a, &b);
    let wall = usage.wall_s;
    let deliveries = delivered_b.saturating_sub(delivered_a) as f64;
    let per_s = deliveries / wall;
    let publish_per_s = sent_b.saturating_sub(sent_a) as f64 / wall;
    report.line(format!(
        "deliveries/s: {} (expected {}), publishes/s: {} (target {})",
        report::thousands(per_s),
        report::thousands(plan.expected_deliveries),
        report::thousands(publish_per_s),
        report::thousands(plan.total_rate)
    ));
    report.line(format!("latency: {}", latency.human()));
    report.set("deliveries_per_s", per_s);
    report.set("expected_deliveries_per_s", plan.expected_deliveries);
    report.set("publishes_per_s", publish_per_s);
    report.set("target_publishes_per_s", plan.total_rate);
    report.set("latency", latency);
    if deliveries > 0.0 {
        let tool_us = usage.tool_cpu_s * 1e6 / deliveries;
        let mut line = format!("tool CPU per delivery: {tool_us:.3} us");
        if let Some(cpu) = usage.server_cpu_s {
            let server_us = cpu * 1e6 / deliveries;
            line = format!("server CPU per delivery: {server_us:.3} us; {line}");
            report.set("server_cpu_us_per_delivery", server_us);
        }
        report.line(line);
        report.set("tool_cpu_us_per_delivery", tool_us);
        // Everything the tool's sockets read in the window (the publishers'
        // acks too: one per message, shared by all its deliveries).
        let wire = rx_b.saturating_sub(rx_a) as f64 / deliveries;
        let negotiated = ctx.connector.deflate_negotiated.load(Relaxed);
        report.line(format!(
            "bytes on the wire per delivery: {wire:.1} (permessage-deflate {}negotiated on {negotiated} connection(s))",
            if ctx.connector.deflate() { "offered, " } else { "not offered, " }
        ));
        report.set("wire_bytes_per_delivery", wire);
        report.set("deflate_offered", ctx.connector.deflate());
        report.set("deflate_negotiated", negotiated);
    }
    if let (Some(x), Some(y)) = (a.node_sum(|n| n.delivered), b.node_sum(|n| n.delivered)) {
        let server_per_s = (y - x) / wall;
        report.line(format!(
            "server-side wsgate_messages_delivered_total: {}/s",
            report::thousands(server_per_s)
        ));
        report.set("server_deliveries_per_s", server_per_s);
    }
    if publish_per_s < plan.total_rate * 0.95 {
        report.warn(format!(
            "publishers reached {publish_per_s:.0} of {} msg/s",
            plan.total_rate
        ));
    }
    let (limited, errors) = (
        shared.rate_limited.load(Relaxed),
        shared.errors.load(Relaxed),
    );
    if limited > 0 {
        report.fail(format!(
            "{limited} publishes refused with rate_limited (raise the nodes' --publish-rate or use more --publishers)"
        ));
    }
    if errors > 0 {
        report.fail(format!("{errors} error frames received"));
    }
    if !drained {
        report.warn(format!(
            "not every member caught up within --drain {:?}",
            plan.drain
        ));
    }
    let tally = std::mem::replace(crowd, Crowd::new(0))
        .finish(Duration::from_secs(10))
        .await;
    report.line(tally.seq_human());
    report.set("seq", tally.seq);
    report.set("dropped", &tally.dropped);
    tally.check(report);
}
