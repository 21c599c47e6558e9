//! Per-room seq and epoch bookkeeping, free of I/O.
//!
//! The connection task feeds it every `joined` and `message` frame; it says
//! which messages reach the application (never a seq twice within an epoch)
//! and which gaps to report (never hidden).

use std::collections::BTreeMap;

use wsgate_protocol::{Joined, Message};

use crate::event::{Gap, GapReason};

/// Where a room's stream stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RoomState {
    /// The epoch of `last_seq`.
    epoch: Option<String>,
    /// The last seq delivered to the application (or the room's seq when it
    /// was joined without a resume point).
    last_seq: Option<u64>,
    /// Whether the current connection has had a `joined` for the room.
    joined: bool,
    /// Whether the join in flight carried `since`.
    asked_since: bool,
}

/// What a `joined` frame means for the application.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct JoinedEffect {
    /// `Some(recovered)` when the join resumed from a known seq.
    pub resumed: Option<bool>,
    /// A gap to report.
    pub gap: Option<Gap>,
}

/// What a `message` frame means for the application.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MessageEffect {
    /// Deliver it (false for a duplicate or a room not tracked).
    pub deliver: bool,
    /// Seqs were skipped before this one.
    pub gap: Option<Gap>,
}

/// The rooms the application wants, with their resume points.
#[derive(Debug, Default)]
pub(crate) struct RoomTracker {
    rooms: BTreeMap<String, RoomState>,
}

impl RoomTracker {
    /// Start tracking `room` (keeps its state when already tracked); a
    /// `resume` point `(seq, epoch)` replaces the state.
    pub fn want(&mut self, room: &str, resume: Option<(u64, Option<String>)>) {
        let st = self.rooms.entry(room.to_owned()).or_default();
        if let Some((seq, epoch)) = resume {
            st.last_seq = Some(seq);
            st.epoch = epoch;
        }
    }

    /// Stop tracking `room`; whether it was tracked.
    pub fn unwant(&mut self, room: &str) -> bool {
        self.rooms.remove(room).is_some()
    }

    /// Whether `room` is tracked.
    pub fn has(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Whether `room` has been joined on the current connection.
    pub fn is_joined(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|s| s.joined)
    }

    /// Whether `room` was ever joined (it has a position in some epoch).
    pub fn has_position(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|s| s.last_seq.is_some())
    }

    /// Tracked room names, sorted.
    pub fn rooms(&self) -> Vec<String> {
        self.rooms.keys().cloned().collect()
    }

    /// `(last_seq, epoch)` of a room.
    pub fn position(&self, room: &str) -> Option<(Option<u64>, Option<String>)> {
        self.rooms.get(room).map(|s| (s.last_seq, s.epoch.clone()))
    }

    /// The `since` and `epoch` for a join of `room` now (and remember that
    /// the join asked for a resume).
    pub fn join_args(&mut self, room: &str) -> (Option<u64>, Option<String>) {
        let st = self.rooms.entry(room.to_owned()).or_default();
        st.asked_since = st.last_seq.is_some();
        (st.last_seq, st.last_seq.and(st.epoch.clone()))
    }

    /// The connection ended: every room must be joined again.
    pub fn disconnected(&mut self) {
        for st in self.rooms.values_mut() {
            st.joined = false;
            st.asked_since = false;
        }
    }

    /// A `joined` frame: an answer to a join, or unsolicited after an epoch
    /// change.
    pub fn on_joined(&mut self, f: &Joined) -> JoinedEffect {
        let Some(st) = self.rooms.get_mut(&f.room) else {
            return JoinedEffect::default();
        };
        let asked = std::mem::take(&mut st.asked_since);
        let prev_epoch = st.epoch.clone();
        let prev_seq = st.last_seq;
        let gap = |reason| {
            Some(Gap {
                room: f.room.clone(),
                reason,
                expected_after: prev_seq.unwrap_or(0),
                got: f.seq,
                epoch: f.epoch.clone(),
                previous_epoch: prev_epoch.clone(),
            })
        };
        let mut effect = JoinedEffect {
            resumed: asked.then_some(f.recovered.unwrap_or(false)),
            gap: None,
        };
        match (prev_seq, f.recovered) {
            (Some(_), _) if prev_epoch.as_ref().is_some_and(|e| *e != f.epoch) => {
                effect.gap = gap(GapReason::EpochChanged);
                st.last_seq = Some(f.seq);
            }
            (Some(_), Some(false)) => {
                effect.gap = gap(GapReason::NotRecovered);
                st.last_seq = Some(f.seq);
            }
            // The replay of (last_seq, f.seq] follows.
            (Some(_), Some(true)) => {}
            (Some(last), None) => {
                if f.seq > last {
                    // No replay was asked for, so none is coming.
                    effect.gap = gap(GapReason::NotRecovered);
                    st.last_seq = Some(f.seq);
                }
            }
            (None, _) => st.last_seq = Some(f.seq),
        }
        st.epoch = Some(f.epoch.clone());
        st.joined = true;
        effect
    }

    /// A `message` frame.
    pub fn on_message(&mut self, m: &Message) -> MessageEffect {
        let Some(st) = self.rooms.get_mut(&m.room) else {
            return MessageEffect::default();
        };
        let Some(last) = st.last_seq else {
            st.last_seq = Some(m.seq);
            return MessageEffect {
                deliver: true,
                gap: None,
            };
        };
        if m.seq <= last {
            return MessageEffect::default();
        }
        let gap = (m.seq > last + 1).then(|| Gap {
            room: m.room.clone(),
            reason: GapReason::SeqJump,
            expected_after: last,
            got: m.seq,
            epoch: st.epoch.clone().unwrap_or_default(),
            previous_epoch: st.epoch.clone(),
        });
        st.last_seq = Some(m.seq);
        MessageEffect { deliver: true, gap }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn joined(room: &str, seq: u64, epoch: &str, recovered: Option<bool>) -> Joined {
        Joined {
            room: room.into(),
            seq,
            epoch: epoch.into(),
            recovered,
            id: None,
        }
    }

    fn msg(room: &str, seq: u64) -> Message {
        Message {
            room: room.into(),
            seq,
            from: "a".into(),
            data: RawValue::from_string("1".into()).unwrap(),
            ts: 0,
        }
    }

    #[test]
    fn fresh_join_then_messages_in_order() {
        let mut t = RoomTracker::default();
        t.want("r", None);
        assert_eq!(t.join_args("r"), (None, None));
        let e = t.on_joined(&joined("r", 5, "E", None));
        assert_eq!(e, JoinedEffect::default());
        assert!(t.is_joined("r"));
        for seq in 6..9 {
            assert_eq!(
                t.on_message(&msg("r", seq)),
                MessageEffect {
                    deliver: true,
                    gap: None
                }
            );
        }
        assert_eq!(t.position("r"), Some((Some(8), Some("E".into()))));
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut t = RoomTracker::default();
        t.want("r", None);
        t.on_joined(&joined("r", 0, "E", None));
        assert!(t.on_message(&msg("r", 1)).deliver);
        assert!(t.on_message(&msg("r", 2)).deliver);
        assert!(!t.on_message(&msg("r", 2)).deliver);
        assert!(!t.on_message(&msg("r", 1)).deliver);
        assert!(t.on_message(&msg("r", 3)).deliver);
    }

    #[test]
    fn resume_replays_without_duplicates() {
        let mut t = RoomTracker::default();
        t.want("r", None);
        t.join_args("r");
        t.on_joined(&joined("r", 0, "E", None));
        for seq in 1..=4 {
            t.on_message(&msg("r", seq));
        }
        t.disconnected();
        assert!(!t.is_joined("r"));
        assert_eq!(t.join_args("r"), (Some(4), Some("E".into())));
        let e = t.on_joined(&joined("r", 7, "E", Some(true)));
        assert_eq!(e.resumed, Some(true));
        assert_eq!(e.gap, None);
        // The new node replays 3..=7 (an overlap): 3 and 4 are dropped.
        let delivered: Vec<u64> = (3..=9)
            .filter(|s| {
                let m = t.on_message(&msg("r", *s));
                assert_eq!(m.gap, None);
                m.deliver
            })
            .collect();
        assert_eq!(delivered, [5, 6, 7, 8, 9]);
    }

    #[test]
    fn not_recovered_is_a_gap() {
        let mut t = RoomTracker::default();
        t.want("r", Some((10, Some("E".into()))));
        assert_eq!(t.join_args("r"), (Some(10), Some("E".into())));
        let e = t.on_joined(&joined("r", 50, "E", Some(false)));
        assert_eq!(e.resumed, Some(false));
        let gap = e.gap.unwrap();
        assert_eq!(gap.reason, GapReason::NotRecovered);
        assert_eq!((gap.expected_after, gap.got), (10, 50));
        // Live messages follow after the joined seq.
        assert!(t.on_message(&msg("r", 51)).gap.is_none());
    }

    #[test]
    fn epoch_change_is_a_gap_even_when_seq_is_lower() {
        let mut t = RoomTracker::default();
        t.want("r", None);
        t.on_joined(&joined("r", 0, "E1", None));
        for seq in 1..=20 {
            t.on_message(&msg("r", seq));
        }
        // Unsolicited joined after Redis restarted empty.
        let e = t.on_joined(&joined("r", 0, "E2", Some(false)));
        assert_eq!(e.resumed, None, "not a resume: nothing was asked");
        let gap = e.gap.unwrap();
        assert_eq!(gap.reason, GapReason::EpochChanged);
        assert_eq!(gap.expected_after, 20);
        assert_eq!(gap.got, 0);
        assert_eq!(gap.previous_epoch.as_deref(), Some("E1"));
        assert_eq!(gap.epoch, "E2");
        // Seq 1 of the new epoch is delivered, not dropped as a duplicate.
        assert!(t.on_message(&msg("r", 1)).deliver);
    }

    #[test]
    fn seq_jump_is_reported_and_delivered() {
        let mut t = RoomTracker::default();
        t.want("r", None);
        t.on_joined(&joined("r", 3, "E", None));
        let m = t.on_message(&msg("r", 7));
        assert!(m.deliver);
        let gap = m.gap.unwrap();
        assert_eq!(gap.reason, GapReason::SeqJump);
        assert_eq!((gap.expected_after, gap.got), (3, 7));
    }

    #[test]
    fn untracked_rooms_are_ignored() {
        let mut t = RoomTracker::default();
        assert!(!t.on_message(&msg("x", 1)).deliver);
        assert_eq!(
            t.on_joined(&joined("x", 1, "E", None)),
            JoinedEffect::default()
        );
        t.want("x", None);
        assert!(t.unwant("x"));
        assert!(!t.unwant("x"));
        assert!(!t.has("x"));
    }

    #[test]
    fn rejoin_without_since_after_a_seq_reports_the_skip() {
        let mut t = RoomTracker::default();
        t.want("r", None);
        t.on_joined(&joined("r", 2, "E", None));
        let e = t.on_joined(&joined("r", 9, "E", None));
        assert_eq!(e.gap.unwrap().reason, GapReason::NotRecovered);
        let same = t.on_joined(&joined("r", 9, "E", None));
        assert_eq!(same.gap, None);
    }
}
