//! The application's handle: [`Client`].

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use wsgate_protocol::is_valid_room;

use crate::config::ClientConfig;
use crate::driver::{Command, Driver};
use crate::error::ClientError;
use crate::event::{EventStream, JoinInfo, PresenceInfo};

/// A cheap, clonable handle on one logical connection to a wsgate cluster.
///
/// The connection itself lives in a background task that reconnects by
/// itself; it stops when [`close`](Client::close) is called or when the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Command>,
}

impl Client {
    /// Connect, waiting for the first `welcome`.
    ///
    /// Tries each URL once (with the backoff's short delays in between); if
    /// all of them fail, returns [`ClientError::Connect`] with the last
    /// failure (a refused token shows as `status: Some(401)`). After that
    /// first success the client never gives up: drops are reported as
    /// [`Event`](crate::Event)s and followed by reconnects.
    ///
    /// Must be called inside a tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<(Client, EventStream), ClientError> {
        config.validate()?;
        let (first_tx, first_rx) = oneshot::channel();
        let (client, events) = Self::spawn(config, Some(first_tx));
        match first_rx.await {
            Ok(Ok(())) => Ok((client, events)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Start connecting in the background and return at once; the outcome
    /// shows up as events ([`Event::Connected`](crate::Event::Connected), or
    /// [`Event::ConnectFailed`](crate::Event::ConnectFailed) and
    /// [`Event::Reconnecting`](crate::Event::Reconnecting) until a node
    /// answers). Requests made before the first connection wait for it
    /// (`join`) or fail with [`ClientError::Disconnected`] (`publish`).
    ///
    /// Must be called inside a tokio runtime.
    pub fn start(config: ClientConfig) -> Result<(Client, EventStream), ClientError> {
        config.validate()?;
        Ok(Self::spawn(config, None))
    }

    fn spawn(
        config: ClientConfig,
        first: Option<oneshot::Sender<Result<(), ClientError>>>,
    ) -> (Client, EventStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        tokio::spawn(Driver::new(config, rx, events_tx, first).run());
        (Client { tx }, EventStream::new(events_rx))
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ClientError>>) -> Command,
    ) -> Result<T, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| ClientError::Closed)?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Join `room`. The client keeps the room joined across reconnects
    /// (re-joining with `since` and `epoch`) until [`leave`](Self::leave).
    ///
    /// While disconnected the join waits for the next connection. Joining a
    /// room already joined answers at once with its current position.
    pub async fn join(&self, room: &str) -> Result<JoinInfo, ClientError> {
        check_room(room)?;
        self.request(|reply| Command::Join {
            room: room.to_owned(),
            resume: None,
            reply,
        })
        .await
    }

    /// Join `room` resuming after `seq` (in `epoch`, when known), for
    /// example a position the application stored: the messages after `seq`
    /// are replayed when the history still has them, and a
    /// [`Event::Gap`](crate::Event::Gap) is reported when it has not.
    pub async fn join_from(
        &self,
        room: &str,
        seq: u64,
        epoch: Option<&str>,
    ) -> Result<JoinInfo, ClientError> {
        check_room(room)?;
        self.request(|reply| Command::Join {
            room: room.to_owned(),
            resume: Some((seq, epoch.map(str::to_owned))),
            reply,
        })
        .await
    }

    /// Leave `room`: no more of its messages are delivered, and it is not
    /// re-joined after a reconnect.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        check_room(room)?;
        self.request(|reply| Command::Leave {
            room: room.to_owned(),
            reply,
        })
        .await
    }

    /// Publish `data` (any JSON-serializable value) to `room`; returns the
    /// message's seq from the server's `ack`.
    ///
    /// Publishing does not require having joined the room. While
    /// disconnected it fails at once with [`ClientError::Disconnected`].
    ///
    /// Every publish carries an idempotency key (unique to this client), so
    /// it is never published twice: when the connection drops before the
    /// `ack`, the client sends it again with the same key after the next
    /// connection's re-joins, and this future resolves with that `ack` (the
    /// first seq when the first send had been taken). A `timeout` answer
    /// (fate unknown) is sent again the same way, up to 3 times. A publish
    /// still unanswered when its key may have expired (about 4.5 minutes
    /// after it was first sent) fails with [`ClientError::PublishExpired`];
    /// beyond 1,000 publishes waiting for a reconnect, a drop fails the
    /// newest with [`ClientError::Disconnected`] (may or may not have been
    /// taken). `unavailable` (or `rate_limited`) to the first send is
    /// returned as it is: the message was not delivered; to a later send it
    /// is not final (an earlier send may have been taken), so the publish is
    /// sent again later with the same key.
    pub async fn publish(&self, room: &str, data: impl Serialize) -> Result<u64, ClientError> {
        check_room(room)?;
        let data = serde_json::value::to_raw_value(&data)?;
        self.publish_raw(room, data).await
    }

    /// Publish an already encoded JSON value.
    pub async fn publish_raw(&self, room: &str, data: Box<RawValue>) -> Result<u64, ClientError> {
        check_room(room)?;
        self.request(|reply| Command::Publish {
            room: room.to_owned(),
            data,
            reply,
        })
        .await
    }

    /// Who is in `room` (v1.1): needs the `rooms` grant, not membership.
    /// While disconnected it fails at once with [`ClientError::Disconnected`].
    pub async fn presence(&self, room: &str) -> Result<PresenceInfo, ClientError> {
        check_room(room)?;
        self.request(|reply| Command::Presence {
            room: room.to_owned(),
            reply,
        })
        .await
    }

    /// The last seq delivered for `room` and its epoch, for storing and a
    /// later [`join_from`](Self::join_from); `None` before the room's first
    /// `joined`.
    pub async fn position(&self, room: &str) -> Option<(u64, String)> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Position {
                room: room.to_owned(),
                reply,
            })
            .ok()?;
        rx.await.ok().flatten()
    }

    /// Close the connection (Close 1000) and stop reconnecting; returns once
    /// the background task has stopped. Requests still waiting fail with
    /// [`ClientError::Closed`]. Calling it again does nothing.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Close { reply }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Whether the client has stopped (closed, or its task ended).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

fn check_room(room: &str) -> Result<(), ClientError> {
    if is_valid_room(room) {
        Ok(())
    } else {
        Err(ClientError::InvalidRoom(room.to_owned()))
    }
}
