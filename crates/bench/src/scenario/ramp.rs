//! `ramp`: a fan-out whose publish rate rises step by step (times
//! `--factor`) until a step's p99 passes `--p99-limit`, a message is lost or
//! a connection dropped, the gateway rate-limits, or the publishers cannot
//! keep the rate; the figure is the highest passing step's deliveries/s.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::fanout::{fanout_crowd, FanoutShape};
use super::{sleep_with_bar, Ctx};
use crate::cli::RampArgs;
use crate::pace;
use crate::probe::Usage;
use crate::report::{self, Report};
use crate::stats::LatencySummary;

/// One step's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Target total publish rate.
    pub rate: f64,
    /// Publishes per second reached.
    pub publishes_per_s: f64,
    /// Deliveries per second.
    pub deliveries_per_s: f64,
    /// Latency over the step (after its first fifth).
    pub latency: LatencySummary,
    /// Server and tool CPU.
    pub usage: Usage,
    /// Seqs skipped during the step.
    pub lost: u64,
    /// Connections dropped during the step.
    pub dropped: u64,
    /// Why the step failed, if it did.
    pub failed: Option<String>,
}

/// Whether a step passes: the reason when it does not.
pub fn verdict(
    rate: f64,
    publishes_per_s: f64,
    latency: &LatencySummary,
    p99_limit: Duration,
    lost: u64,
    dropped: u64,
    rate_limited: u64,
) -> Option<String> {
    let limit_ms = p99_limit.as_secs_f64() * 1e3;
    if lost > 0 {
        Some(format!("{lost} messages lost"))
    } else if dropped > 0 {
        Some(format!("{dropped} connections dropped"))
    } else if rate_limited > 0 {
        Some(format!(
            "{rate_limited} publishes rate-limited by the gateway"
        ))
    } else if latency.count == 0 {
        Some("no deliveries".to_owned())
    } else if latency.p99_ms > limit_ms {
        Some(format!("p99 {:.3} ms above {limit_ms} ms", latency.p99_ms))
    } else if publishes_per_s < rate * 0.9 {
        Some(format!(
            "publishers reached {publishes_per_s:.0} of {rate:.0} msg/s"
        ))
    } else {
        None
    }
}

/// The rate of step `i` (0-based), capped at `max`.
pub fn step_rate(start: f64, factor: f64, i: usize, max: f64) -> f64 {
    (start * factor.powi(i32::try_from(i).unwrap_or(i32::MAX))).min(max)
}

/// Run the scenario.
pub async fn run(ctx: &Ctx, args: &RampArgs) -> Result<Report> {
    let mut report = Report::new("ramp");
    let shape = FanoutShape {
        audience: &args.audience,
        room: &args.room,
        publisher: &args.publisher,
        total_rate: args.max_rate,
    };
    let Some(crowd) = fanout_crowd(ctx, &mut report, shape).await? else {
        return Ok(report);
    };
    let (subs, publishers) = (args.audience.subscribers, args.audience.publishers);
    report.line(format!(
        "load: {subs} subscribers over {} node URL(s), {} publisher(s); rate from {} msg/s x{} per {:?} step up to {} msg/s; p99 limit {:?}",
        ctx.node_urls(),
        publishers,
        args.start_rate,
        args.factor,
        args.step,
        args.max_rate,
        args.p99_limit
    ));
    let shared = crowd.shared.clone();
    shared.record_window(
        Instant::now(),
        Instant::now() + Duration::from_secs(86_400 * 365),
    );
    let mut steps: Vec<Step> = Vec::new();
    let mut prev_rate = 0.0;
    for i in 0..args.max_steps {
        let rate = step_rate(args.start_rate, args.factor, i, args.max_rate);
        if rate <= prev_rate {
            break;
        }
        prev_rate = rate;
        shared.rate.send_replace(pace::per_sender(rate, publishers));
        let start = Instant::now();
        sleep_with_bar(start + args.step / 5, &format!("{rate:.0}/s")).await;
        let _ = shared.latencies.take();
        let a = ctx.probe.snapshot().await;
        let count = |s: &super::member::Shared| {
            (
                s.delivered.load(Relaxed),
                s.sent.load(Relaxed),
                s.gaps.load(Relaxed),
                s.dropped.load(Relaxed),
                s.rate_limited.load(Relaxed),
            )
        };
        let ca = count(&shared);
        sleep_with_bar(start + args.step, &format!("{rate:.0}/s")).await;
        let latency = LatencySummary::of(&shared.latencies.take());
        let b = ctx.probe.snapshot().await;
        let cb = count(&shared);
        let usage = Usage::between(&a, &b);
        let publishes_per_s = cb.1.saturating_sub(ca.1) as f64 / usage.wall_s;
        let lost = cb.2 - ca.2;
        let dropped = cb.3 - ca.3;
        let failed = verdict(
            rate,
            publishes_per_s,
            &latency,
            args.p99_limit,
            lost,
            dropped,
            cb.4 - ca.4,
        );
        let step = Step {
            rate,
            publishes_per_s,
            deliveries_per_s: cb.0.saturating_sub(ca.0) as f64 / usage.wall_s,
            latency,
            usage,
            lost,
            dropped,
            failed,
        };
        report.line(step_line(&step));
        let stop = step.failed.is_some();
        steps.push(step);
        if stop {
            break;
        }
    }
    shared.rate.send_replace(0.0);
    crowd
        .drain(Duration::from_secs(5), |i| (i < subs).then_some(0))
        .await;
    let tally = crowd.finish(Duration::from_secs(10)).await;
    report.line(tally.seq_human());
    let best = steps.iter().rev().find(|s| s.failed.is_none());
    match best {
        Some(b) => {
            report.line(format!(
                "highest sustained: {} deliveries/s at {} msg/s (p99 {:.3} ms; {})",
                report::thousands(b.deliveries_per_s),
                report::thousands(b.rate),
                b.latency.p99_ms,
                b.usage.human()
            ));
            report.set("best_deliveries_per_s", b.deliveries_per_s);
            report.set("best_rate", b.rate);
            report.set("best", b);
        }
        None => report.fail("no step passed"),
    }
    if steps.last().is_some_and(|s| s.failed.is_none()) {
        report.warn("the last step passed: raise --max-rate or --max-steps to find the limit");
    }
    report.set("steps", &steps);
    report.set("seq", tally.seq);
    Ok(report)
}

fn step_line(s: &Step) -> String {
    format!(
        "step {:>9.0} msg/s: {:>11} deliveries/s, p50 {:.3} ms p99 {:.3} ms max {:.3} ms, server {} tool {:.0} % -> {}",
        s.rate,
        report::thousands(s.deliveries_per_s),
        s.latency.p50_ms,
        s.latency.p99_ms,
        s.latency.max_ms,
        s.usage
            .server_core_busy
            .map_or("?".to_owned(), |b| format!("{:.0} %", b * 100.0)),
        s.usage.tool_core_busy * 100.0,
        s.failed.as_deref().unwrap_or("pass")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(p99_ms: f64, count: u64) -> LatencySummary {
        LatencySummary {
            count,
            mean_ms: 0.0,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms,
            p999_ms: 0.0,
            max_ms: 0.0,
        }
    }

    #[test]
    fn verdicts() {
        let limit = Duration::from_millis(50);
        assert_eq!(verdict(100.0, 100.0, &lat(10.0, 5), limit, 0, 0, 0), None);
        assert!(verdict(100.0, 100.0, &lat(50.5, 5), limit, 0, 0, 0)
            .unwrap()
            .contains("p99"));
        assert!(verdict(100.0, 100.0, &lat(1.0, 5), limit, 1, 0, 0)
            .unwrap()
            .contains("lost"));
        assert!(verdict(100.0, 100.0, &lat(1.0, 5), limit, 0, 2, 0)
            .unwrap()
            .contains("dropped"));
        assert!(verdict(100.0, 100.0, &lat(1.0, 5), limit, 0, 0, 3)
            .unwrap()
            .contains("rate-limited"));
        assert!(verdict(100.0, 80.0, &lat(1.0, 5), limit, 0, 0, 0)
            .unwrap()
            .contains("publishers"));
        assert!(verdict(100.0, 100.0, &lat(1.0, 0), limit, 0, 0, 0)
            .unwrap()
            .contains("no deliveries"));
    }

    #[test]
    fn step_rates_grow_and_cap() {
        assert_eq!(step_rate(20.0, 1.5, 0, 1e6), 20.0);
        assert_eq!(step_rate(20.0, 1.5, 2, 1e6), 45.0);
        assert_eq!(step_rate(20.0, 2.0, 20, 1000.0), 1000.0);
    }
}
