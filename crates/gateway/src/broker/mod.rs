//! The broker: assigns each room's seq, keeps its history, and relays
//! messages to every node subscribed to the room.
//!
//! Two implementations: [`memory::MemoryBroker`] for a single node, and
//! [`redis::RedisBroker`] for a cluster. Both push the messages they relay
//! into the [`Delivery`] sink the node's rooms gave them; they do not know
//! who is in a room, only whether it has local members.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use wsgate_protocol::MessageParts;

pub mod control;
pub mod memory;
pub mod redis;

pub use crate::rooms::Delivery;
use control::ControlMsg;

/// A boxed, sendable future (the trait is used as `dyn Broker`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The broker could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker is down or unreachable, or refused the request: it had no
    /// effect (a publish was not, and will not be, delivered).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request was sent but not confirmed in time: its fate is unknown.
    /// A publish answered so is delivered at most once (PROTOCOL.md's
    /// `timeout`): the publish script refuses to run after its deadline.
    #[error("broker did not confirm in time: {0}")]
    Timeout(String),
    /// The broker has the message, but fewer replicas than
    /// `--redis-min-replicas` confirmed it in time: answered `unavailable`
    /// (PROTOCOL.md section 10), and it may still be delivered.
    #[error("broker unavailable: {0}")]
    Unconfirmed(String),
}

/// A room's position and, for a resume, the messages after it.
#[derive(Debug, Clone)]
pub struct RoomHistory {
    /// The room's history epoch.
    pub epoch: Arc<str>,
    /// The room's latest seq (0 for a room with no messages).
    pub latest: u64,
    /// For a resume: whether `frames` covers every seq in `(since, latest]`.
    pub recovered: bool,
    /// For a recovered resume: the first page of (seq, frame) with seq in
    /// `(since, latest]`, in order; [`Broker::replay_page`] reads the rest,
    /// so that a replay never holds a whole history in memory.
    pub frames: Vec<(u64, Utf8Bytes)>,
}

/// What a publish got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message's seq (for a duplicate: the first publish's).
    pub seq: u64,
    /// The idempotency key was already used: nothing was published.
    pub duplicate: bool,
}

/// How long an idempotency key is remembered per room (PROTOCOL.md
/// section 11).
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// A page of a room's history (server API).
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The room's history epoch.
    pub epoch: Arc<str>,
    /// The room's latest seq (0 for a room with no messages).
    pub latest: u64,
    /// Message frames, oldest first.
    pub frames: Vec<Utf8Bytes>,
}

/// A resume request: after seq `since`, seen in `epoch` when given.
#[derive(Debug, Clone, Copy)]
pub struct Since<'a> {
    /// The last seq the client saw.
    pub seq: u64,
    /// The epoch it saw it in.
    pub epoch: Option<&'a str>,
}

/// What the gateway needs from a broker.
pub trait Broker: Send + Sync + 'static {
    /// Assign the next seq of `room`, keep the frame in the room's history
    /// and deliver it to every subscribed node. Returns the seq only once
    /// the broker has the message. With an idempotency `key` already used
    /// in the room within [`IDEMPOTENCY_WINDOW`], nothing is published and
    /// the first publish's seq is returned (`duplicate`), atomically across
    /// nodes.
    fn publish<'a>(
        &'a self,
        room: &'a str,
        parts: MessageParts,
        key: Option<&'a str>,
    ) -> BoxFut<'a, Result<Published, BrokerError>>;

    /// Start receiving the messages of `room` on this node. Called only by
    /// [`Rooms`](crate::rooms::Rooms), when the room gets its first local
    /// member; [`unsubscribe`](Self::unsubscribe) follows when its last one
    /// leaves. The two are called in order per room, never under a lock of
    /// the rooms (a broker may call its [`Delivery`] under its own locks).
    fn subscribe(&self, room: &str);

    /// Resolves once messages of `room` (subscribed) are being received, or
    /// fails when the broker cannot receive them in time.
    fn ready<'a>(&'a self, room: &'a str) -> BoxFut<'a, Result<(), BrokerError>>;

    /// End this node's subscription to `room`: its last local member left.
    fn unsubscribe(&self, room: &str);

    /// The room's epoch and latest seq, and with `since` the messages after it.
    fn history<'a>(
        &'a self,
        room: &'a str,
        since: Option<Since<'a>>,
    ) -> BoxFut<'a, Result<RoomHistory, BrokerError>>;

    /// The next page of a replay: the messages of `epoch` with seq in
    /// `(after, upto]`, in order, at most a page of them (see
    /// [`REPLAY_PAGE_MESSAGES`], [`REPLAY_PAGE_BYTES`]). A page that does
    /// not start at `after + 1` (history trimmed past it, or the epoch
    /// changed) means the replay cannot be completed.
    fn replay_page<'a>(
        &'a self,
        room: &'a str,
        epoch: &'a str,
        after: u64,
        upto: u64,
    ) -> BoxFut<'a, Result<Vec<(u64, Utf8Bytes)>, BrokerError>>;

    /// Up to `limit` messages of `room` with seq > `since`, oldest first,
    /// with the room's epoch and latest seq. Reads at most `limit` entries.
    fn range<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFut<'a, Result<HistoryPage, BrokerError>>;

    /// Deliver a control message to every other node (a revocation is also
    /// stored for nodes that start later); the caller applies it on this
    /// node itself.
    fn control<'a>(&'a self, msg: &'a ControlMsg) -> BoxFut<'a, Result<(), BrokerError>>;

    /// Whether the broker is reachable now.
    fn is_up(&self) -> bool;
}

/// Most messages one history read returns (a replay page, a gap fill).
pub const REPLAY_PAGE_MESSAGES: usize = 64;
/// Most frame bytes one history read returns (at least one message).
pub const REPLAY_PAGE_BYTES: usize = 1 << 20;

/// Whether a resume from `since` is covered by a history that holds seqs
/// `oldest..=latest` in `epoch`.
pub fn covers(since: Since<'_>, epoch: &str, oldest: Option<u64>, latest: u64) -> bool {
    if since.epoch.is_some_and(|e| e != epoch) || since.seq > latest {
        return false;
    }
    since.seq == latest || oldest.is_some_and(|o| o <= since.seq + 1)
}

/// A random epoch name.
pub fn new_epoch() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..10)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Hide the password of a URL (or an error message containing one).
pub fn redact_url(text: &str) -> String {
    // redis://user:password@host -> redis://user:***@host
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_rules_of_protocol_resuming() {
        let s = |seq, epoch| Since { seq, epoch };
        assert!(covers(s(5, None), "e", Some(1), 9));
        assert!(covers(s(9, Some("e")), "e", Some(5), 9), "since == latest");
        assert!(covers(s(0, None), "e", Some(1), 3));
        assert!(covers(s(0, None), "e", None, 0), "empty room, since 0");
        assert!(!covers(s(10, None), "e", Some(1), 9), "since above latest");
        assert!(!covers(s(3, None), "e", Some(5), 9), "history too short");
        assert!(!covers(s(5, Some("old")), "e", Some(1), 9), "other epoch");
    }

    #[test]
    fn epochs_are_distinct_and_non_empty() {
        let a = new_epoch();
        assert_eq!(a.len(), 10);
        assert_ne!(a, new_epoch());
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("redis://:hunter2@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://u:p@h"), "redis://u:***@h");
        assert_eq!(redact_url("redis://h:1/"), "redis://h:1/");
        assert_eq!(
            redact_url("bad url redis://tok@h x"),
            "bad url redis://***@h x"
        );
    }
}
