//! What presence (`crate::presence::redis`) uses of the Redis broker: its
//! command connection, each room's relay channel, and the hook by which
//! presence changes relayed on a room's channel reach this node's presence.

use std::sync::{Arc, Weak};

use super::{BrokerError, Conn, Inner, RedisBroker};
use crate::presence::Presence;

/// A relay payload that starts with this byte is a presence change
/// (`!+user` / `!-user`), not a message (`<epoch> <seq> <frame>`; epochs are
/// alphanumeric).
pub(crate) const PRESENCE_MARK: u8 = b'!';

/// Presence's handle on the broker.
#[derive(Clone)]
pub struct Link(Arc<Inner>);

impl RedisBroker {
    /// Presence's handle on this broker.
    pub fn link(&self) -> Link {
        Link(self.inner.clone())
    }
}

impl Link {
    /// The command connection (unless no primary is known yet).
    pub(crate) fn conn(&self) -> Result<Conn, BrokerError> {
        self.0.conn()
    }

    /// The room's relay channel, and the command that publishes on it.
    pub(crate) fn channel(&self, room: &str) -> (String, &'static str) {
        let command = if self.0.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        (self.0.channel(room), command)
    }

    /// Hand presence changes relayed on room channels to `presence`.
    pub(crate) fn attach(&self, presence: Weak<Presence>) {
        let _ = self.0.presence.set(presence);
    }
}

impl Inner {
    /// A presence change relayed on `room`'s channel.
    pub(super) fn on_presence(&self, room: &str, payload: &[u8]) {
        let Some(presence) = self.presence.get().and_then(Weak::upgrade) else {
            return;
        };
        let (joined, user) = match payload {
            [b'+', user @ ..] => (true, user),
            [b'-', user @ ..] => (false, user),
            _ => return,
        };
        if let Ok(user) = std::str::from_utf8(user) {
            presence.on_change(room, user, joined);
        }
    }
}
