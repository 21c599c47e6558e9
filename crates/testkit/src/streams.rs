//! What room members receive: collectors and the checks the failover
//! tests make on message streams.

use crate::Ws;
use std::time::{Duration, Instant};

/// A collector of one member's room messages: (seq, from, data).
pub async fn messages(ws: &mut Ws, n: usize) -> Vec<(u64, String, serde_json::Value)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = ws.json().await;
        if v["type"] == "message" {
            out.push((
                v["seq"].as_u64().unwrap(),
                v["from"].as_str().unwrap().to_owned(),
                v["data"].clone(),
            ));
        }
    }
    out
}

/// Publish with idempotency key `key` until acknowledged (a failover
/// refuses publishes for a while; a `timeout` may have been delivered, the
/// key keeps a retry from doubling it), for at most `limit`; returns the
/// ack. The publisher must not be a member of `room`.
pub async fn publish_acked(
    ws: &mut Ws,
    room: &str,
    data: serde_json::Value,
    key: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let id = ws.id();
        ws.send(serde_json::json!({"type":"publish","room":room,"data":data,"id":id,"key":key}))
            .await;
        let ack = ws.json().await;
        assert_eq!(ack["id"], id.as_str(), "the answer: {ack}");
        if ack["type"] == "ack" {
            return ack;
        }
        assert!(Instant::now() < deadline, "publish never acked: {ack}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a member of one room received, until `count` messages: (epoch,
/// seq, data) in order, the epoch starting at `epoch` and changed by each
/// unsolicited `joined` (which must say `recovered: false`).
pub async fn epoch_stream(
    ws: &mut Ws,
    mut epoch: String,
    count: usize,
) -> Vec<(String, u64, serde_json::Value)> {
    let mut out = Vec::new();
    while out.len() < count {
        let v = ws.json().await;
        match v["type"].as_str() {
            Some("joined") => {
                assert_eq!(v["recovered"], false, "an epoch change: {v}");
                epoch = v["epoch"].as_str().unwrap().to_owned();
            }
            Some("message") => {
                out.push((epoch.clone(), v["seq"].as_u64().unwrap(), v["data"].clone()))
            }
            _ => panic!("unexpected {v}"),
        }
    }
    out
}

/// The failover tests' check of one member's [`epoch_stream`]: it carries
/// `m0`, `m1`... (`total` of them) once, in order; no (epoch, seq) twice;
/// gap-free within an epoch; and a new epoch between message `switch - 1`
/// (the last the old primary took) and `switch` (the first the promoted
/// replica took), whose seqs could otherwise collide.
pub fn assert_failover_stream(
    got: &[(String, u64, serde_json::Value)],
    switch: usize,
    total: usize,
) {
    let mut seen = std::collections::HashMap::new();
    for (e, seq, data) in got {
        if let Some(other) = seen.insert((e.clone(), *seq), data.clone()) {
            panic!("({e}, {seq}) carried {other} and {data}");
        }
    }
    assert_ne!(
        got[switch - 1].0,
        got[switch].0,
        "a new epoch after the failover: {got:?}"
    );
    for pair in got.windows(2) {
        if pair[0].0 == pair[1].0 {
            assert_eq!(
                pair[1].1,
                pair[0].1 + 1,
                "gap-free within an epoch: {got:?}"
            );
        }
    }
    let data: Vec<serde_json::Value> = got.iter().map(|m| m.2.clone()).collect();
    let want: Vec<serde_json::Value> = (0..total)
        .map(|i| serde_json::json!(format!("m{i}")))
        .collect();
    assert_eq!(data, want, "every acknowledged message, once, in order");
}
