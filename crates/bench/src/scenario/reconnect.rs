//! `reconnect`: C clients in one room spread over several nodes while a
//! publisher (on the last `--url`) sends messages; then the node behind the
//! FIRST `--url` is killed (`--kill-pid`, SIGKILL) or drained (`--drain-pid`,
//! SIGTERM). Each of its clients reconnects to the next URL and joins with
//! `since` + `epoch`. Reported: the time from the signal until every client
//! of that node has resumed with `recovered: true`, each client's downtime,
//! and lost / duplicated seqs over the whole run (0 when history covers the
//! gap).
//!
//! Lag is told from loss: after publishing stops, the drain waits until
//! every client has every acked message, or until no client has received
//! anything for `--idle` (nothing is in flight: what is missing is lost), or
//! until `--drain` runs out (clients still receiving: lag, reported apart
//! and failing the run as inconclusive, never as loss).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use wsgate_protocol::MAX_PRESENCE_USERS;

use super::member::{MemberSpec, PublishSpec};
use super::{
    member_tokens, room_names, round_robin, sleep_with_bar, usage_to_report_except, CatchUp, Crowd,
    Ctx, DrainEnd,
};
use crate::cli::{PresenceArgs, ReconnectArgs};
use crate::clock;
use crate::net::{self, PublishEncoder, Transport};
use crate::report::Report;
use crate::stats::{new_histogram, LatencySummary, SeqTotals};

/// Send `signal` (`KILL` or `TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

/// The URL client `i` of `clients` starts on: `share` of them on the first
/// URL and the rest round-robin over the others, or all round-robin.
pub fn placement(i: usize, clients: usize, urls: usize, share: Option<f64>) -> usize {
    match share {
        Some(f) if urls > 1 => {
            let first = (f * clients as f64).round() as usize;
            if i < first {
                0
            } else {
                1 + (i - first) % (urls - 1)
            }
        }
        _ => round_robin(i, urls),
    }
}

/// Run the scenario.
pub async fn run(ctx: &Ctx, args: &ReconnectArgs) -> Result<Report> {
    let mut report = Report::new("reconnect");
    let (pid, sig) = match (args.kill_pid, args.drain_pid) {
        (Some(p), _) => (p, "KILL"),
        (None, Some(p)) => (p, "TERM"),
        (None, None) => bail!("give --kill-pid or --drain-pid"),
    };
    let n_urls = ctx.node_urls();
    let n_rooms = args.rooms;
    let rooms = room_names(&args.room, n_rooms);
    let tokens = member_tokens(ctx, &args.presence, "bench-client", args.clients)?;
    let pub_token: Arc<str> = ctx.tokens.for_user("bench-pub")?.into();
    let clients = args.clients;
    let specs = (0..clients)
        .map(|i| MemberSpec {
            index: i,
            url_idx: placement(i, clients, n_urls, args.first_share),
            token: tokens[i % tokens.len()].clone(),
            join: Some((rooms[i % n_rooms].clone(), i % n_rooms)),
            presence: args.presence.presence,
            publish: None,
            reconnect: true,
            track_latency: true,
        })
        .collect();
    let mut crowd = Crowd::new(n_rooms);
    let setup = crowd.spawn(ctx, specs, "clients").await;
    report.line(setup.human("clients"));
    report.set("setup", &setup);
    // One publisher per room, their sends spread over one period.
    let publishers = (0..n_rooms)
        .map(|r| MemberSpec {
            index: 0,
            url_idx: n_urls - 1,
            token: pub_token.clone(),
            join: None,
            presence: false,
            publish: Some(PublishSpec {
                encoder: Arc::new(PublishEncoder::new(&rooms[r], args.payload)),
                room_idx: r,
                phase: Duration::from_secs_f64(r as f64 / n_rooms as f64 / args.rate),
            }),
            reconnect: true,
            track_latency: false,
        })
        .collect();
    let pub_setup = crowd.spawn(ctx, publishers, "publishers").await;
    if !setup.complete() || !pub_setup.complete() {
        report.fail("not every client connected");
        crowd.finish(Duration::from_secs(10)).await;
        return Ok(report);
    }
    let shared = crowd.shared.clone();
    let t0 = Instant::now();
    shared.record_window(t0, t0 + Duration::from_secs(86_400 * 365));
    shared.rate.send_replace(args.rate);
    sleep_with_bar(t0 + args.before, "before").await;

    // Clients of the first URL's address: the node the fault hits.
    let dead = ctx.targets[0].addr;
    let affected: Vec<usize> = (0..clients)
        .filter(|&i| {
            let l = &crowd.lives[i];
            l.connected.load(Relaxed) && ctx.targets[l.url_idx.load(Relaxed)].addr == dead
        })
        .collect();
    let a = ctx.probe.snapshot().await;
    let fault_ns = clock::now_ns();
    signal(pid, sig)?;
    report.line(format!(
        "fault: kill -{sig} {pid} (node of {}) with {} of {clients} clients on it, {} msg/s flowing",
        ctx.targets[0].url,
        affected.len(),
        args.rate
    ));
    let all_back = crowd
        .wait_for(args.resume_timeout, |c| {
            affected.iter().all(|&i| {
                let l = &c.lives[i];
                l.connected.load(Relaxed)
                    && l.resumes.load(Relaxed) + l.failed_resumes.load(Relaxed) >= 1
            })
        })
        .await;
    let resumed: Vec<usize> = affected
        .iter()
        .copied()
        .filter(|&i| crowd.lives[i].resumes.load(Relaxed) >= 1)
        .collect();
    let failed_resumes: u32 = crowd
        .lives
        .iter()
        .map(|l| l.failed_resumes.load(Relaxed))
        .sum();
    let last_ns = resumed
        .iter()
        .map(|&i| crowd.lives[i].resumed_ns.load(Relaxed))
        .max()
        .unwrap_or(fault_ns);
    let all_resumed_s = last_ns.saturating_sub(fault_ns) as f64 / 1e9;
    let mut since_fault = new_histogram();
    for &i in &resumed {
        let ns = crowd.lives[i]
            .resumed_ns
            .load(Relaxed)
            .saturating_sub(fault_ns);
        since_fault.saturating_record(ns.max(1));
    }
    let since_fault = LatencySummary::of(&since_fault);
    let mut hit = vec![false; clients];
    for &i in &affected {
        hit[i] = true;
    }
    let others_dropped = (0..clients)
        .filter(|&i| !hit[i] && crowd.lives[i].disconnects.load(Relaxed) > 0)
        .count();
    let stop_at = Instant::now() + args.after;
    if !args.stall.is_zero() {
        sleep_with_bar(stop_at - args.stall / 2, "after").await;
        let stalled = (args.stall_share * clients as f64).round() as usize;
        shared
            .stall_until_ns
            .store(clock::now_ns() + duration_ns(args.stall), Relaxed);
        shared.stall_members.store(stalled, Relaxed);
    }
    sleep_with_bar(stop_at, "after").await;
    let b = ctx.probe.snapshot().await;
    shared.rate.send_replace(0.0);
    let drain = crowd
        .catch_up(args.drain, args.idle, |i| {
            (i < clients).then_some(i % n_rooms)
        })
        .await;
    let presence = if args.presence.distinct() {
        let at = Instant::now()
            + Duration::from_nanos(
                (fault_ns + duration_ns(args.presence_settle)).saturating_sub(clock::now_ns()),
            );
        sleep_with_bar(at, "presence settling").await;
        Some(check_presence(ctx, &crowd, clients, &rooms, &args.presence, dead).await)
    } else {
        None
    };
    let presence_events = shared.presence_events.load(Relaxed);
    let latency = LatencySummary::of(&shared.latencies.take());
    let tally = crowd.finish(Duration::from_secs(10)).await;
    let mut downtime = new_histogram();
    for &ns in &tally.downtimes_ns {
        downtime.saturating_record(ns.max(1));
    }
    let downtime = LatencySummary::of(&downtime);

    report.line(format!(
        "resumed: {} of {} clients of the node, every one within {all_resumed_s:.3} s of the signal{}",
        resumed.len(),
        affected.len(),
        if all_back { "" } else { " (TIMED OUT)" }
    ));
    report.line(format!(
        "time from signal to resume: {}",
        since_fault.human()
    ));
    report.line(format!(
        "client downtime (drop to resume): {}",
        downtime.human()
    ));
    report.line(format!("latency over the run: {}", latency.human()));
    usage_to_report_except(&mut report, &a, &b, Some(pid));
    report.line(tally.seq_human());
    let verdict = LagOrLoss::of(&tally.seq, &drain);
    report.line(verdict.human(&drain, args));
    report.set("drain", drain);
    report.set("lost", verdict.lost);
    report.set("lagging", verdict.lagging);
    report.set("affected", affected.len());
    report.set("resumed", resumed.len());
    report.set("failed_resumes", failed_resumes);
    report.set("all_resumed_s", all_resumed_s);
    report.set("resume_since_fault", since_fault);
    report.set("downtime", downtime);
    report.set("latency", latency);
    report.set("seq", tally.seq);
    report.set("signal", sig);
    if affected.is_empty() {
        report.fail("no client was on the first --url's node");
    }
    if !all_back || resumed.len() < affected.len() {
        report.fail(format!(
            "{} of {} clients did not resume with recovered:true within {:?}",
            affected.len() - resumed.len(),
            affected.len(),
            args.resume_timeout
        ));
    }
    if failed_resumes > 0 {
        report.fail(format!(
            "{failed_resumes} resumes came back recovered:false"
        ));
    }
    if others_dropped > 0 {
        report.warn(format!(
            "{others_dropped} clients of other nodes dropped too"
        ));
    }
    verdict.check(&tally.seq, args, &mut report);
    if let Some(p) = presence {
        report.line(p.human(args.presence_settle));
        if !p.correct() {
            report.fail(format!(
                "presence wrong in {} of {} answers after the storm",
                p.wrong, p.answers
            ));
        }
        report.set("presence", p);
        report.set("presence_events", presence_events);
    }
    Ok(report)
}

/// The presence check after the storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PresenceCheck {
    /// Answers compared (rooms x surviving nodes).
    pub answers: usize,
    /// Answers whose count or users differ from the clients connected.
    pub wrong: usize,
    /// Queries that failed (no answer, error frame, connection refused).
    pub failed: usize,
    /// Present users expected, summed over rooms.
    pub expected_users: u64,
    /// Present users answered, summed over the answers of the first node.
    pub answered_users: u64,
    /// Up to 5 wrong answers: room, node URL, expected and answered count.
    pub samples: Vec<String>,
}

impl PresenceCheck {
    /// Every answer was there and right.
    pub fn correct(&self) -> bool {
        self.answers > 0 && self.wrong == 0 && self.failed == 0
    }

    /// One human line.
    pub fn human(&self, settle: Duration) -> String {
        let mut line = format!(
            "presence {settle:?} after the fault: {} answers (rooms x surviving nodes), {} wrong, {} failed; {} users expected present, {} answered{}",
            self.answers,
            self.wrong,
            self.failed,
            self.expected_users,
            self.answered_users,
            if self.correct() { ": correct" } else { "" }
        );
        for s in &self.samples {
            line.push_str("; ");
            line.push_str(s);
        }
        line
    }
}

/// Ask every room's presence on every node but the dead one's address and
/// compare each answer with the users of the clients connected in that room.
async fn check_presence(
    ctx: &Ctx,
    crowd: &Crowd,
    clients: usize,
    rooms: &[Arc<str>],
    presence: &PresenceArgs,
    dead: std::net::SocketAddr,
) -> PresenceCheck {
    let mut expected: Vec<BTreeSet<String>> = vec![BTreeSet::new(); rooms.len()];
    for (i, live) in crowd.lives.iter().enumerate().take(clients) {
        if live.connected.load(Relaxed) {
            expected[i % rooms.len()].insert(presence.user("bench-client", i));
        }
    }
    let mut check = PresenceCheck {
        expected_users: expected.iter().map(|e| e.len() as u64).sum(),
        ..PresenceCheck::default()
    };
    let mut seen = BTreeSet::new();
    let probe_token: Arc<str> = match ctx.tokens.for_user("bench-presence-probe") {
        Ok(t) => t.into(),
        Err(e) => {
            check.failed += 1;
            check.samples.push(format!("no token: {e}"));
            return check;
        }
    };
    let mut first = true;
    for target in ctx.targets.iter().filter(|t| t.addr != dead) {
        if !seen.insert(target.addr) {
            continue;
        }
        let opened = ctx
            .connector
            .open_conn(target, &probe_token, Transport::Ws)
            .await;
        let mut ws = match opened {
            Ok((ws, _)) => ws,
            Err(e) => {
                check.failed += rooms.len();
                check.samples.push(format!("{}: {e}", target.url));
                continue;
            }
        };
        for (r, room) in rooms.iter().enumerate() {
            match ctx.connector.presence(&mut ws, room, r as u64 + 1).await {
                Ok(p) => {
                    check.answers += 1;
                    if first {
                        check.answered_users += p.count;
                    }
                    let want = &expected[r];
                    let listed: Vec<&String> = want.iter().take(MAX_PRESENCE_USERS).collect();
                    let users: Vec<&String> = p.users.iter().collect();
                    if p.count != want.len() as u64 || users != listed {
                        check.wrong += 1;
                        if check.samples.len() < 5 {
                            check.samples.push(format!(
                                "{room} on {}: {} present, {} expected",
                                target.url,
                                p.count,
                                want.len()
                            ));
                        }
                    }
                }
                Err(e) => {
                    check.failed += 1;
                    if check.samples.len() < 5 {
                        check.samples.push(format!("{room} on {}: {e}", target.url));
                    }
                }
            }
        }
        first = false;
        net::close_conn(&mut ws, Duration::from_secs(2)).await;
    }
    check
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The messages clients did not get, split by what the drain saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagOrLoss {
    /// Never delivered: holes (a later seq came), unrecovered gaps, and
    /// whatever was still missing once the servers had gone idle or every
    /// other client had caught up.
    pub lost: u64,
    /// Still arriving when `--drain` ran out: lag, not loss.
    pub lagging: u64,
}

impl LagOrLoss {
    /// Split the seq totals by how the drain ended.
    pub fn of(seq: &SeqTotals, drain: &CatchUp) -> LagOrLoss {
        match drain.ended {
            DrainEnd::Limit => LagOrLoss {
                lost: seq.lost,
                lagging: seq.behind,
            },
            DrainEnd::CaughtUp | DrainEnd::Idle => LagOrLoss {
                lost: seq.lost + seq.behind,
                lagging: 0,
            },
        }
    }

    /// One human line: the lag when publishing stopped, how the drain ended.
    pub fn human(&self, drain: &CatchUp, args: &ReconnectArgs) -> String {
        let lag = format!(
            "lag when publishing stopped: {} clients behind by {} messages in all (at most {})",
            drain.at_start.members, drain.at_start.messages, drain.at_start.max
        );
        let end = match drain.ended {
            DrainEnd::CaughtUp => format!("every client caught up {:.3} s later", drain.took_s),
            DrainEnd::Idle => format!(
                "no message arrived for --idle {:?} with {} clients still behind: {} messages never arrived (lost)",
                args.idle, drain.at_end.members, self.lost
            ),
            DrainEnd::Limit => format!(
                "--drain {:?} ran out with {} clients still receiving: {} messages still lagging (not counted as lost)",
                args.drain, drain.at_end.members, self.lagging
            ),
        };
        format!("{lag}; {end}")
    }

    /// Fail on loss, duplicates and disorder; a run that ended lagging
    /// measured overload, not recovery: fail it as inconclusive.
    pub fn check(&self, seq: &SeqTotals, args: &ReconnectArgs, report: &mut Report) {
        if self.lost > 0 {
            report.fail(format!("{} messages lost", self.lost));
        }
        if self.lagging > 0 {
            report.fail(format!(
                "inconclusive: {} messages still arriving when --drain {:?} ran out (lag, not loss): lower the load or raise --drain",
                self.lagging, args.drain
            ));
        }
        if seq.duplicated > 0 {
            report.fail(format!("{} messages duplicated", seq.duplicated));
        }
        if seq.out_of_order > 0 {
            report.fail(format!("{} messages out of order", seq.out_of_order));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_puts_a_share_on_the_first_node() {
        let spread: Vec<usize> = (0..6).map(|i| placement(i, 6, 3, None)).collect();
        assert_eq!(spread, [0, 1, 2, 0, 1, 2]);
        let share: Vec<usize> = (0..6).map(|i| placement(i, 6, 3, Some(0.5))).collect();
        assert_eq!(share, [0, 0, 0, 1, 2, 1]);
        let on_first = (0..15_000)
            .filter(|&i| placement(i, 15_000, 3, Some(2.0 / 3.0)) == 0)
            .count();
        assert_eq!(on_first, 10_000);
        assert_eq!(placement(5, 6, 1, Some(0.5)), 0);
    }

    fn drain(ended: DrainEnd) -> CatchUp {
        CatchUp {
            ended,
            took_s: 1.0,
            at_start: Default::default(),
            at_end: Default::default(),
        }
    }

    #[test]
    fn missing_tail_is_lag_only_when_the_drain_ran_out_while_receiving() {
        let seq = SeqTotals {
            lost: 2,
            behind: 5,
            ..SeqTotals::default()
        };
        let limit = LagOrLoss::of(&seq, &drain(DrainEnd::Limit));
        assert_eq!(
            limit,
            LagOrLoss {
                lost: 2,
                lagging: 5
            }
        );
        for ended in [DrainEnd::Idle, DrainEnd::CaughtUp] {
            assert_eq!(
                LagOrLoss::of(&seq, &drain(ended)),
                LagOrLoss {
                    lost: 7,
                    lagging: 0
                }
            );
        }
    }
}
