//! The scenarios, and what they share: the run context, spawning a crowd of
//! member tasks and waiting for them to connect, draining and tallying.
//!
//! # Layout
//! - [`member`]: one connection's task.
//! - [`connect`], [`idle`], [`fanout`] (also `rooms`), [`ramp`],
//!   [`reconnect`], [`soak`]: one scenario each.

pub mod connect;
pub mod fanout;
pub mod idle;
pub mod member;
pub mod ramp;
pub mod reconnect;
pub mod soak;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::cli::{Common, PresenceArgs, Scenario};
use crate::net::{Connector, OpsTarget, Target};
use crate::probe::{Probe, Snapshot, Usage};
use crate::report::{self, Report};
use crate::stats::{new_histogram, LatencySummary, SeqTotals};
use crate::token::Tokens;
use member::{Live, Member, MemberResult, MemberSpec, Shared};

/// What every scenario works with.
pub struct Ctx {
    /// The `--url` targets.
    pub targets: Arc<Vec<Target>>,
    /// Opens connections.
    pub connector: Arc<Connector>,
    /// Tokens for the connections.
    pub tokens: Tokens,
    /// Server figures.
    pub probe: Probe,
    /// The common flags.
    pub common: Common,
}

impl Ctx {
    /// Build the context from validated flags; `extra` is a URL used besides
    /// the `--url` list (a publisher URL), appended when not in it; tokens
    /// live at least `ttl`.
    pub fn new(common: &Common, extra: Option<&str>, ttl: Duration) -> Result<Ctx> {
        let mut urls = common.urls.clone();
        if let Some(extra) = extra.filter(|e| !urls.iter().any(|u| u == e)) {
            urls.push(extra.to_owned());
        }
        let targets = urls
            .iter()
            .map(|u| Target::parse(u, common.allow_remote))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!(e))?;
        let ops = common
            .ops_urls
            .iter()
            .map(|u| OpsTarget::parse(u, common.allow_remote))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!(e))?;
        let connector = Connector::new(
            common.source_ips.clone(),
            common.connect_timeout,
            common.read_buffer,
            common.origin.as_deref(),
        )
        .map_err(|e| anyhow!(e))?
        .with_deflate(common.deflate)
        .with_transport(common.transport);
        Ok(Ctx {
            targets: Arc::new(targets),
            connector: Arc::new(connector),
            tokens: Tokens::from_flags(common, ttl)?,
            probe: Probe::new(ops, common.pids.clone()),
            common: common.clone(),
        })
    }

    /// Index of `url` among the targets.
    pub fn url_index(&self, url: &str) -> Option<usize> {
        self.targets.iter().position(|t| t.url == url)
    }

    /// Number of `--url` targets (an extra URL comes after them).
    pub fn node_urls(&self) -> usize {
        self.common.urls.len()
    }
}

/// Run a validated scenario.
pub async fn run(scenario: &Scenario) -> Result<Report> {
    let extra = match scenario {
        Scenario::Fanout(a) => a.publisher.publisher_url.as_deref(),
        Scenario::Ramp(a) => a.publisher.publisher_url.as_deref(),
        _ => None,
    };
    let ttl = scenario.deadline() + Duration::from_secs(600);
    let ctx = Ctx::new(scenario.common(), extra, ttl)?;
    match scenario {
        Scenario::Connect(a) => connect::run(&ctx, a).await,
        Scenario::Idle(a) => idle::run(&ctx, a).await,
        Scenario::Fanout(a) => fanout::run_fanout(&ctx, a).await,
        Scenario::Rooms(a) => fanout::run_rooms(&ctx, a).await,
        Scenario::Reconnect(a) => reconnect::run(&ctx, a).await,
        Scenario::Ramp(a) => ramp::run(&ctx, a).await,
        Scenario::Soak(a) => soak::run(&ctx, a).await,
    }
}

/// How connecting a group of members went.
#[derive(Debug, Clone, Serialize)]
pub struct SetupSummary {
    /// Members that tried.
    pub attempted: usize,
    /// Members connected (and joined).
    pub connected: usize,
    /// Failures by kind (`http_503`, `timeout`, ...).
    pub failures: BTreeMap<String, u64>,
    /// Members per node id (from `welcome`).
    pub nodes: BTreeMap<String, u64>,
    /// Wall time from the first attempt to the last outcome, seconds.
    pub wall_s: f64,
    /// Successful set-ups per second.
    pub per_s: f64,
    /// Set-up time of one member.
    pub latency: LatencySummary,
    /// Outcomes that never came before the set-up budget ran out.
    pub missing: usize,
}

impl SetupSummary {
    /// One human line.
    pub fn human(&self, what: &str) -> String {
        let mut line = format!(
            "{what}: {}/{} connected in {:.2} s ({}/s)",
            self.connected,
            self.attempted,
            self.wall_s,
            report::thousands(self.per_s)
        );
        if !self.failures.is_empty() {
            line.push_str(&format!("; failures {}", join_counts(&self.failures)));
        }
        if self.missing > 0 {
            line.push_str(&format!("; {} still pending", self.missing));
        }
        if self.nodes.len() > 1 {
            line.push_str(&format!("; per node {}", join_counts(&self.nodes)));
        }
        line
    }

    /// Every member connected.
    pub fn complete(&self) -> bool {
        self.connected == self.attempted
    }

    /// When not every member connected, fail `report` with "`missing` of
    /// `attempted` `what`" (e.g. `what` = "subscribers did not connect");
    /// whether every member connected.
    pub fn fail_unless_complete(&self, report: &mut Report, what: &str) -> bool {
        if self.complete() {
            return true;
        }
        report.fail(format!(
            "{} of {} {what}",
            self.attempted - self.connected,
            self.attempted
        ));
        false
    }
}

/// `k: v, k: v, ...`.
fn join_counts(counts: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    parts.join(", ")
}

/// The member tasks of a run.
pub struct Crowd {
    /// State every member shares.
    pub shared: Arc<Shared>,
    /// Each member's live state, by member index.
    pub lives: Vec<Arc<Live>>,
    handles: Vec<JoinHandle<MemberResult>>,
}

impl Crowd {
    /// An empty crowd over `rooms` rooms.
    pub fn new(rooms: usize) -> Crowd {
        Crowd {
            shared: Shared::new(rooms),
            lives: Vec::new(),
            handles: Vec::new(),
        }
    }

    /// Members so far.
    pub fn len(&self) -> usize {
        self.lives.len()
    }

    /// No members yet.
    pub fn is_empty(&self) -> bool {
        self.lives.is_empty()
    }

    /// Spawn one task per spec (their `index` is set here) and wait, at most
    /// the set-up budget for that many members, until each has connected or
    /// failed.
    pub async fn spawn(&mut self, ctx: &Ctx, specs: Vec<MemberSpec>, what: &str) -> SetupSummary {
        let attempted = specs.len();
        let budget = ctx.common.setup_budget(attempted);
        let gate = Arc::new(Semaphore::new(ctx.common.concurrency));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bar = report::counter(attempted as u64, what);
        let started = Instant::now();
        for mut spec in specs {
            spec.index = self.lives.len();
            let live = Arc::new(Live::default());
            self.lives.push(live.clone());
            let member = Member::new(
                spec,
                self.shared.clone(),
                live,
                ctx.connector.clone(),
                ctx.targets.clone(),
            );
            self.handles
                .push(tokio::spawn(member.run(gate.clone(), tx.clone())));
        }
        drop(tx);
        let deadline = tokio::time::Instant::from_std(started + budget);
        let mut summary = SetupSummary {
            attempted,
            connected: 0,
            failures: BTreeMap::new(),
            nodes: BTreeMap::new(),
            wall_s: 0.0,
            per_s: 0.0,
            latency: LatencySummary::of(&new_histogram()),
            missing: 0,
        };
        let mut took = new_histogram();
        let mut seen = 0;
        let mut last = started;
        while seen < attempted {
            let outcome = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(o)) => o,
                Ok(None) | Err(_) => break,
            };
            seen += 1;
            last = Instant::now();
            bar.inc(1);
            took.saturating_record(
                u64::try_from(outcome.took.as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
            match outcome.result {
                Ok(node) => {
                    summary.connected += 1;
                    *summary.nodes.entry(node).or_default() += 1;
                }
                Err(e) => *summary.failures.entry(e.kind()).or_default() += 1,
            }
        }
        bar.finish_and_clear();
        summary.missing = attempted - seen;
        summary.wall_s = last.saturating_duration_since(started).as_secs_f64();
        summary.per_s = summary.connected as f64 / summary.wall_s.max(1e-9);
        summary.latency = LatencySummary::of(&took);
        summary
    }

    /// Stop every member, wait (at most `limit`) for them to close, and
    /// collect their results.
    pub async fn finish(self, limit: Duration) -> Tally {
        self.shared.stop.cancel();
        let deadline = tokio::time::Instant::now() + limit;
        let mut tally = Tally::default();
        for handle in self.handles {
            let abort = handle.abort_handle();
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(result)) => {
                    if let Some(t) = &result.tracker {
                        let last = result.room_idx.map(|i| self.shared.room_last(i));
                        tally.seq += t.totals(last.filter(|&l| l > 0));
                        tally.trackers += 1;
                    }
                    if let Some(why) = result.dropped {
                        *tally.dropped.entry(why).or_default() += 1;
                    }
                    tally.downtimes_ns.extend(result.downtimes_ns);
                }
                Ok(Err(_)) => tally.unfinished += 1,
                Err(_) => {
                    abort.abort();
                    tally.unfinished += 1;
                }
            }
        }
        tally
    }

    /// Wait, polling, until `done` holds or `limit` passes; whether it held.
    pub async fn wait_for(&self, limit: Duration, mut done: impl FnMut(&Crowd) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait until every publish has been answered (ack or error) and every
    /// member of room `member_room(i)` has seen that room's last acked seq;
    /// whether that happened within `limit`.
    pub async fn drain(
        &self,
        limit: Duration,
        member_room: impl Fn(usize) -> Option<usize>,
    ) -> bool {
        self.catch_up(limit, limit, member_room).await.ended == DrainEnd::CaughtUp
    }

    /// Connected members behind their room's last acked seq, and by how much.
    pub fn behind(&self, member_room: impl Fn(usize) -> Option<usize>) -> Behind {
        let mut b = Behind::default();
        for (i, live) in self.lives.iter().enumerate() {
            if let Some(room) = member_room(i).filter(|_| live.connected.load(Relaxed)) {
                let n = self
                    .shared
                    .room_last(room)
                    .saturating_sub(live.max_seq.load(Relaxed));
                if n > 0 {
                    b.members += 1;
                    b.messages += n;
                    b.max = b.max.max(n);
                }
            }
        }
        b
    }

    /// [`Crowd::drain`], telling lag from loss: wait until every publish has
    /// been answered and every member has caught up, or no member has
    /// received anything for `idle` (what is missing then never came), or
    /// `limit` passes (members still receiving: lag).
    pub async fn catch_up(
        &self,
        limit: Duration,
        idle: Duration,
        member_room: impl Fn(usize) -> Option<usize>,
    ) -> CatchUp {
        let started = Instant::now();
        let at_start = self.behind(&member_room);
        let progress = |c: &Crowd| -> u64 {
            c.lives
                .iter()
                .map(|l| l.max_seq.load(Relaxed))
                .fold(0, u64::wrapping_add)
        };
        let mut seen = progress(self);
        let mut moved = started;
        let mut ended = DrainEnd::Limit;
        self.wait_for(limit, |c| {
            let s = &c.shared;
            let answered =
                s.acks.load(Relaxed) + s.rate_limited.load(Relaxed) + s.errors.load(Relaxed)
                    >= s.sent.load(Relaxed);
            if answered && c.behind(&member_room).members == 0 {
                ended = DrainEnd::CaughtUp;
                return true;
            }
            let now = progress(c);
            if now != seen {
                (seen, moved) = (now, Instant::now());
            } else if moved.elapsed() >= idle {
                ended = DrainEnd::Idle;
                return true;
            }
            false
        })
        .await;
        CatchUp {
            ended,
            took_s: started.elapsed().as_secs_f64(),
            at_start,
            at_end: self.behind(&member_room),
        }
    }
}

/// How a [`Crowd::catch_up`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainEnd {
    /// Every member had every acked message.
    CaughtUp,
    /// No member received anything for the idle time: nothing was in flight.
    Idle,
    /// The limit passed while members were still receiving.
    Limit,
}

/// Members behind their room's last acked seq.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Behind {
    /// Members behind.
    pub members: u64,
    /// Messages they miss, summed.
    pub messages: u64,
    /// The most one of them misses.
    pub max: u64,
}

/// What a [`Crowd::catch_up`] saw.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CatchUp {
    /// Why it ended.
    pub ended: DrainEnd,
    /// Seconds from its start to its end.
    pub took_s: f64,
    /// Behind when it started (publishing had just stopped): the lag.
    pub at_start: Behind,
    /// Behind when it ended.
    pub at_end: Behind,
}

/// Results of a crowd after it finished.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    /// Seq checks summed over members.
    pub seq: SeqTotals,
    /// Members that tracked a room.
    pub trackers: u64,
    /// Members whose connection ended unasked, by why.
    pub dropped: BTreeMap<String, u64>,
    /// Drop-to-resume times.
    #[serde(skip)]
    pub downtimes_ns: Vec<u64>,
    /// Members that did not end within the limit (aborted) or panicked.
    pub unfinished: u64,
}

impl Tally {
    /// One human line about seqs.
    pub fn seq_human(&self) -> String {
        format!(
            "seq check over {} subscriptions: {} received, {} lost, {} not received by the end, {} duplicated, {} out of order{}",
            self.trackers,
            report::thousands(self.seq.received as f64),
            self.seq.lost,
            self.seq.behind,
            self.seq.duplicated,
            self.seq.out_of_order,
            if self.seq.resyncs > 0 {
                format!(", {} history resets", self.seq.resyncs)
            } else {
                String::new()
            }
        )
    }

    /// Add failures for loss, messages not received by the end (lag or
    /// loss), duplicates and disorder.
    pub fn check_seq(&self, report: &mut Report) {
        if self.seq.lost > 0 {
            report.fail(format!("{} messages lost", self.seq.lost));
        }
        if self.seq.behind > 0 {
            report.fail(format!(
                "{} messages not received by the end of the drain (lag or loss)",
                self.seq.behind
            ));
        }
        if self.seq.duplicated > 0 {
            report.fail(format!("{} messages duplicated", self.seq.duplicated));
        }
        if self.seq.out_of_order > 0 {
            report.fail(format!("{} messages out of order", self.seq.out_of_order));
        }
    }

    /// Add failures for loss, disorder, drops and stuck members.
    pub fn check(&self, report: &mut Report) {
        self.check_seq(report);
        if !self.dropped.is_empty() {
            report.fail(format!(
                "connections dropped by the server: {}",
                join_counts(&self.dropped)
            ));
        }
        if self.unfinished > 0 {
            report.warn(format!(
                "{} connections did not close in time",
                self.unfinished
            ));
        }
    }
}

/// Add the server and tool figures between two snapshots to a report.
pub fn usage_to_report(report: &mut Report, a: &Snapshot, b: &Snapshot) -> Usage {
    usage_to_report_except(report, a, b, None)
}

/// [`usage_to_report`], where process `gone` is expected to have ended.
pub fn usage_to_report_except(
    report: &mut Report,
    a: &Snapshot,
    b: &Snapshot,
    gone: Option<u32>,
) -> Usage {
    let usage = Usage::between(a, b);
    report.line(format!("cpu: {}", usage.human()));
    for n in b
        .nodes
        .iter()
        .filter_map(|n| n.error.as_ref().map(|e| (n, e)))
    {
        let text = format!("cannot read {}: {}", n.0.url, n.1);
        if gone.is_some() {
            // The node the fault hit is expected to be unreachable.
            report.line(text);
        } else {
            report.warn(text);
        }
    }
    for p in b
        .pids
        .iter()
        .filter(|p| p.cpu_seconds.is_none() && Some(p.pid) != gone)
    {
        report.warn(format!("cannot read /proc/{} (gone?)", p.pid));
    }
    if !b.from_pids() && usage.server_cpu_s.is_some() {
        report.warn("server CPU from /metrics process_cpu_seconds_total, which counts whole seconds: give --pid for each server process for exact figures");
    }
    if usage.tool_core_busy > 0.9 && usage.wall_s >= 1.0 {
        report.warn(format!(
            "the load tool used {:.0} % of a core: it may be the bottleneck",
            usage.tool_core_busy * 100.0
        ));
    }
    report.set("usage", usage);
    report.set("nodes", &b.nodes);
    report.set("pids", &b.pids);
    usage
}

/// Sleep until `at` with a time bar, when the span is long enough to show one.
pub async fn sleep_with_bar(until: Instant, what: &str) {
    let span = until.saturating_duration_since(Instant::now());
    let bar = report::timer(span, what);
    let started = Instant::now();
    while Instant::now() < until {
        let step = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        tokio::time::sleep(step).await;
        bar.set_position((started.elapsed().as_millis() / 100) as u64);
    }
    bar.finish_and_clear();
}

/// The tokens of `n` connections: one per connection when `presence` makes
/// every connection its own user, otherwise one for all (`default` is the
/// scenario's user id, or prefix).
pub fn member_tokens(
    ctx: &Ctx,
    presence: &PresenceArgs,
    default: &str,
    n: usize,
) -> Result<Vec<Arc<str>>> {
    let count = if presence.distinct() { n } else { 1 };
    (0..count)
        .map(|i| Ok(ctx.tokens.for_user(&presence.user(default, i))?.into()))
        .collect()
}

/// `n` room names: `prefix` alone for one room, `<prefix>.0`, `<prefix>.1`,
/// ... for several.
pub fn room_names(prefix: &str, n: usize) -> Vec<Arc<str>> {
    (0..n)
        .map(|r| {
            if n == 1 {
                prefix.into()
            } else {
                format!("{prefix}.{r}").into()
            }
        })
        .collect()
}

/// Spread index `i` over `n` URLs.
pub fn round_robin(i: usize, n: usize) -> usize {
    i % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_spreads() {
        let v: Vec<usize> = (0..5).map(|i| round_robin(i, 2)).collect();
        assert_eq!(v, [0, 1, 0, 1, 0]);
        assert_eq!(round_robin(3, 0), 0);
    }

    #[test]
    fn tally_checks() {
        let mut r = Report::new("x");
        Tally::default().check(&mut r);
        assert!(r.ok());
        let mut t = Tally::default();
        t.seq.lost = 2;
        t.dropped.insert("closed_1008".into(), 1);
        t.check(&mut r);
        assert!(!r.ok());
        assert!(r.human().contains("2 messages lost"));
        assert!(r.human().contains("closed_1008: 1"));
    }
}
