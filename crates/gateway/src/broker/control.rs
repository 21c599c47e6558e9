//! The control channel: cluster-wide disconnects and token revocations of
//! the server API (PROTOCOL.md section 8).
//!
//! A `disconnect` call on any node becomes one [`ControlMsg`]. With Redis it
//! travels on the pub/sub channel [`CHANNEL`], to which every node's relay
//! subscribes on every (re)connect; a revocation is also stored in the hash
//! [`REVOKED_KEY`] (field: user, value: the revocation time in Unix
//! seconds), so that nodes started later, or cut off while it was sent,
//! load it. With the in-process broker there is only this node.
//!
//! The same relay connection also subscribes to the node's own channel,
//! [`node_channel`]: the SSE fallback hands a POST to the node holding its
//! stream there ([`ControlMsg::SsePost`]), and that node answers on the
//! sender's channel ([`ControlMsg::SseAnswer`]). Plain (not sharded)
//! channels: on a Redis Cluster a PUBLISH reaches every shard, so each node
//! subscribes once, wherever it is connected.
//!
//! Each node keeps the revocations in memory ([`Control`]): a handshake, a
//! `refresh` or an HTTP call checks them without a Redis round trip.
//! Without `--max-token-lifetime` a revocation is kept for good (one entry
//! per revoked user): a token may live any time, and stays refused until
//! it expires. With it, a revocation is kept for that long plus
//! `--jwt-leeway`, and with `--api-key` set tokens living longer are
//! refused, so that no revoked token outlives its revocation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use wsgate_protocol::close;

use super::{redact_url, BrokerError};
use crate::auth::{AuthError, Claims};
use crate::config::Config;
use crate::outbound::CloseReason;
use crate::sse::Delivery;
use crate::state::Conns;

/// How a connection closed by the server API closes.
pub const DISCONNECTED: CloseReason = CloseReason {
    code: close::DISCONNECTED,
    reason: "disconnected",
};

/// The Redis pub/sub channel of control messages.
pub const CHANNEL: &str = "wsgate:ctl";

/// The Redis pub/sub channel of messages for node `node` alone.
pub fn node_channel(node: &str) -> String {
    format!("{CHANNEL}:node:{node}")
}
/// The Redis hash of revocations: user -> Unix seconds.
pub const REVOKED_KEY: &str = "wsgate:revoked";
/// Record a revocation (keeping the later time). With a retention
/// (ARGV[4] seconds, > 0): drop the ones older than ARGV[3] and renew the
/// hash's TTL, so the hash holds one retention period of revocations at
/// most. Without (0): keep every one, and no TTL (a retention set before
/// is lifted).
static REVOKE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if tonumber(ARGV[4]) == 0 then
  redis.call('PERSIST', KEYS[1])
  return 0
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 0
",
    )
});

/// Bound on a control command to Redis.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A message every node acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlMsg {
    /// Close every connection of `user` with 4003; with `revoked_at`, refuse
    /// the user's tokens issued at or before that time (Unix seconds).
    Disconnect {
        /// The user (`sub`).
        user: String,
        /// The revocation time, when the call asked for `revoke`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revoked_at: Option<u64>,
    },
    /// A POST for the SSE stream `conn`, handed to the node `to` that holds
    /// it; `from` expects a [`ControlMsg::SseAnswer`] with `req`.
    SsePost {
        /// The node holding the stream.
        to: String,
        /// The node that received the POST.
        from: String,
        /// The request number on `from`.
        req: u64,
        /// The stream's connection id.
        conn: String,
        /// The POST's user (`sub` of its token).
        user: String,
        /// The POST's body, checked by `from` (a JSON object or array).
        body: String,
        /// Unix time (ms) after which the holder must not deliver the POST
        /// ([`DELIVER_WITHIN`] after it was sent): `from` has answered 404
        /// by then or is about to, so a late delivery (the holder was
        /// stopped, Redis held the message) would act on a POST its client
        /// was told failed. Absent from older nodes: no limit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deliver_by_ms: Option<u64>,
    },
    /// What became of a handed-over POST.
    SseAnswer {
        /// The node that received the POST.
        to: String,
        /// Its request number.
        req: u64,
        /// The answer.
        delivery: Delivery,
    },
}

impl ControlMsg {
    /// The Redis channel the message travels on.
    pub fn channel(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ControlMsg::Disconnect { .. } => CHANNEL.into(),
            ControlMsg::SsePost { to, .. } | ControlMsg::SseAnswer { to, .. } => {
                node_channel(to).into()
            }
        }
    }
}

/// How long a node waits for the answer to a POST it handed over.
pub const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// How long after it was sent a handed-over POST may still be delivered:
/// half of [`ANSWER_WAIT`], the rest is for the answer's way back (and
/// for clocks a little apart).
pub const DELIVER_WITHIN: Duration = Duration::from_secs(1);

/// This node's side of the control channel: the revocations it knows and
/// the connections it closes.
pub struct Control {
    conns: Arc<Conns>,
    revoked: Mutex<HashMap<Box<str>, u64>>,
    /// How long a revocation is kept; `None`: for good.
    retention: Option<Duration>,
    /// Longest token lifetime accepted, when the server API is enabled.
    max_lifetime: Option<Duration>,
    /// This node's own channel ([`node_channel`]).
    own: String,
    /// Handed-over POSTs waiting for their answer, by request number.
    pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Delivery>>>,
    next_req: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Control {
    /// Control for a node with `config` and the verifier's `leeway`,
    /// closing connections found in `conns`.
    pub fn new(conns: Arc<Conns>, config: &Config, leeway: Duration) -> Control {
        Control {
            conns,
            revoked: Mutex::new(HashMap::new()),
            retention: config.max_token_lifetime.map(|max| max + leeway),
            max_lifetime: config
                .max_token_lifetime
                .filter(|_| config.api_key.is_some()),
            own: node_channel(&config.node_id),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(0),
        }
    }

    /// This node's own channel.
    pub fn own_channel(&self) -> String {
        self.own.clone()
    }

    /// Whether control messages for this node arrive on `channel`.
    pub fn listens_on(&self, channel: &str) -> bool {
        channel == CHANNEL || channel == self.own
    }

    /// A request number for a handed-over POST, and where its answer comes.
    pub fn expect_answer(&self) -> (u64, tokio::sync::oneshot::Receiver<Delivery>) {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending().insert(req, tx);
        (req, rx)
    }

    /// Stop waiting for the answer to `req` (it timed out or was not sent).
    pub fn forget(&self, req: u64) {
        self.pending().remove(&req);
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, tokio::sync::oneshot::Sender<Delivery>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn revoked(&self) -> MutexGuard<'_, HashMap<Box<str>, u64>> {
        self.revoked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Act on a message on this node: for a disconnect, record the
    /// revocation, close the user's connections with 4003 (returns how many
    /// were closed; idempotent, so a message may arrive more than once).
    /// A handed-over POST is delivered here and answered (the answer is
    /// returned, to be sent); an answer goes to the request waiting for it.
    pub fn apply(&self, msg: &ControlMsg) -> (usize, Option<ControlMsg>) {
        let (user, revoked_at) = match msg {
            ControlMsg::Disconnect { user, revoked_at } => (user, revoked_at),
            ControlMsg::SsePost {
                from,
                req,
                conn,
                user,
                body,
                deliver_by_ms,
                ..
            } => {
                let late = deliver_by_ms.is_some_and(|by| crate::session::now_ms() > by);
                let frames = crate::sse::frames(&axum::body::Bytes::from(body.clone()));
                let delivery = match frames {
                    Some(frames) if !late => self.conns.sse.deliver(conn, user, frames),
                    _ => Delivery::NotFound,
                };
                let answer = ControlMsg::SseAnswer {
                    to: from.clone(),
                    req: *req,
                    delivery,
                };
                return (0, Some(answer));
            }
            ControlMsg::SseAnswer { req, delivery, .. } => {
                if let Some(waiting) = self.pending().remove(req) {
                    let _ = waiting.send(*delivery);
                }
                return (0, None);
            }
        };
        if let Some(at) = revoked_at {
            self.revoke(user, *at);
        }
        let conns = self.conns.of_user(user);
        for c in &conns {
            c.close(DISCONNECTED);
        }
        if !conns.is_empty() {
            info!(
                user,
                connections = conns.len(),
                "disconnected by the server API"
            );
        }
        (conns.len(), None)
    }

    /// A message from a control channel (JSON); malformed ones are
    /// ignored. Returns the answer to send, if any.
    pub fn on_message(&self, payload: &[u8]) -> Option<ControlMsg> {
        match serde_json::from_slice::<ControlMsg>(payload) {
            Ok(msg) => self.apply(&msg).1,
            Err(e) => {
                warn!(error = %e, "malformed control message ignored");
                None
            }
        }
    }

    /// The Unix second of the oldest revocation still kept (0: all are).
    fn oldest_kept(&self) -> u64 {
        self.retention
            .map_or(0, |r| unix_now().saturating_sub(r.as_secs()))
    }

    fn revoke(&self, user: &str, at: u64) {
        let mut revoked = self.revoked();
        // Forget what has outlived its retention: memory stays bounded by
        // the revocations of one retention period (without a retention, by
        // the number of users ever revoked).
        let oldest = self.oldest_kept();
        if oldest > 0 {
            revoked.retain(|_, t| *t >= oldest);
        }
        if at >= oldest {
            let entry = revoked.entry(Box::from(user)).or_insert(at);
            *entry = (*entry).max(at);
        }
    }

    /// Refuse a token revoked by the server API, or living longer than
    /// `--max-token-lifetime` when the server API is enabled.
    pub fn check(&self, claims: &Claims) -> Result<(), AuthError> {
        if let Some(max) = self.max_lifetime {
            let from = claims.iat.unwrap_or_else(unix_now);
            if claims.exp.saturating_sub(from) > max.as_secs() {
                return Err(AuthError::LifetimeTooLong);
            }
        }
        let revoked_at = self.revoked().get(claims.sub.as_str()).copied();
        match revoked_at {
            Some(at) if claims.iat.unwrap_or(0) <= at && at >= self.oldest_kept() => {
                Err(AuthError::Revoked)
            }
            _ => Ok(()),
        }
    }

    /// Read every stored revocation from Redis into this node's memory;
    /// false when Redis did not answer (logged; the node keeps what it knew).
    pub async fn reload<C: ConnectionLike + Send>(&self, mut conn: C) -> bool {
        let read = tokio::time::timeout(
            COMMAND_TIMEOUT,
            redis::cmd("HGETALL")
                .arg(REVOKED_KEY)
                .query_async::<HashMap<String, u64>>(&mut conn),
        )
        .await;
        match read {
            Ok(Ok(all)) => {
                for (user, at) in all {
                    self.revoke(&user, at);
                }
                return true;
            }
            Ok(Err(e)) => {
                warn!(error = %redact_url(&e.to_string()), "cannot load revocations from redis")
            }
            Err(_) => warn!("cannot load revocations from redis: timed out"),
        }
        false
    }

    /// Send `msg` to every node through Redis; a revocation is stored first
    /// (kept for the retention period, or for good), so that it also
    /// reaches nodes that start later or miss the message.
    pub async fn broadcast<C: ConnectionLike + Send>(
        &self,
        mut conn: C,
        msg: &ControlMsg,
    ) -> Result<(), BrokerError> {
        let unavailable =
            |e: &dyn std::fmt::Display| BrokerError::Unavailable(redact_url(&e.to_string()));
        let payload = serde_json::to_string(msg).map_err(|e| unavailable(&e))?;
        let work = async {
            if let ControlMsg::Disconnect {
                user,
                revoked_at: Some(at),
            } = msg
            {
                // 0: kept for good (the script's convention).
                let retention = self.retention.map_or(0, |r| r.as_secs().max(1));
                REVOKE_SCRIPT
                    .key(REVOKED_KEY)
                    .arg(user)
                    .arg(*at)
                    .arg(self.oldest_kept())
                    .arg(retention)
                    .invoke_async::<()>(&mut conn)
                    .await?;
            }
            redis::cmd("PUBLISH")
                .arg(&*msg.channel())
                .arg(payload)
                .query_async::<()>(&mut conn)
                .await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, work)
            .await
            .map_err(|_| unavailable(&"redis timed out"))?
            .map_err(|e| unavailable(&e))
    }
}

/// Subscribe the relay's pub/sub connection to the control channel and
/// the node's own.
pub async fn subscribe(
    sink: &mut redis::aio::PubSubSink,
    control: &Control,
) -> redis::RedisResult<()> {
    tokio::time::timeout(
        COMMAND_TIMEOUT,
        sink.subscribe(&[CHANNEL, control.own.as_str()]),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "subscribe timed out")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Grants;

    fn control(api_key: bool) -> Control {
        Control {
            conns: Arc::new(Conns::default()),
            revoked: Mutex::new(HashMap::new()),
            retention: Some(Duration::from_secs(3600)),
            max_lifetime: api_key.then_some(Duration::from_secs(600)),
            own: node_channel("n"),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(0),
        }
    }

    fn claims(sub: &str, iat: Option<u64>, exp: u64) -> Claims {
        Claims {
            sub: sub.to_owned(),
            exp,
            iat,
            rooms: Grants::default(),
            publish: Grants::default(),
        }
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let msg = ControlMsg::Disconnect {
            user: "bob".into(),
            revoked_at: Some(7),
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert_eq!(text, r#"{"op":"disconnect","user":"bob","revoked_at":7}"#);
        let plain: ControlMsg = serde_json::from_str(r#"{"op":"disconnect","user":"a"}"#).unwrap();
        assert_eq!(
            plain,
            ControlMsg::Disconnect {
                user: "a".into(),
                revoked_at: None
            }
        );
        assert!(serde_json::from_str::<ControlMsg>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn revocation_refuses_tokens_issued_at_or_before_it() {
        let c = control(false);
        let now = unix_now();
        let at = now - 10;
        c.apply(&ControlMsg::Disconnect {
            user: "bob".into(),
            revoked_at: Some(at),
        });
        let exp = now + 60;
        assert!(matches!(
            c.check(&claims("bob", Some(at), exp)),
            Err(AuthError::Revoked)
        ));
        assert!(c.check(&claims("bob", Some(at - 1), exp)).is_err());
        assert!(c.check(&claims("bob", None, exp)).is_err(), "no iat = 0");
        assert!(c.check(&claims("bob", Some(at + 1), exp)).is_ok());
        assert!(c.check(&claims("alice", Some(at), exp)).is_ok());
        // A later message with an older time does not move it back.
        c.on_message(
            format!(
                r#"{{"op":"disconnect","user":"bob","revoked_at":{}}}"#,
                at - 5
            )
            .as_bytes(),
        );
        assert!(c.check(&claims("bob", Some(at), exp)).is_err());
        c.on_message(b"not json");
    }

    #[test]
    fn revocations_older_than_the_retention_are_forgotten() {
        let c = control(false);
        let old = unix_now() - 7200;
        c.revoke("bob", old);
        assert!(c.check(&claims("bob", Some(old), unix_now() + 60)).is_ok());
        assert!(c.revoked().is_empty());
    }

    #[test]
    fn without_a_maximum_lifetime_revocations_are_kept_and_any_lifetime_accepted() {
        let mut c = control(true);
        c.retention = None;
        c.max_lifetime = None;
        let now = unix_now();
        let year = 365 * 24 * 3600;
        assert!(c.check(&claims("bob", Some(now), now + year)).is_ok());
        let long_ago = now - 2 * year;
        c.revoke("bob", long_ago);
        c.revoke("alice", now);
        assert!(matches!(
            c.check(&claims("bob", Some(long_ago - 1), now + year)),
            Err(AuthError::Revoked)
        ));
        assert!(c
            .check(&claims("bob", Some(long_ago + 1), now + year))
            .is_ok());
        assert_eq!(c.revoked().len(), 2, "nothing is forgotten");
    }

    #[test]
    fn lifetime_cap_only_with_the_server_api() {
        let now = unix_now();
        let long = claims("a", Some(now), now + 601);
        let ok = claims("a", Some(now), now + 600);
        assert!(control(false).check(&long).is_ok());
        assert!(matches!(
            control(true).check(&long),
            Err(AuthError::LifetimeTooLong)
        ));
        assert!(control(true).check(&ok).is_ok());
        assert!(control(true).check(&claims("a", None, now + 700)).is_err());
    }
}
