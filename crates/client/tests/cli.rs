//! `wsgate client` logic (`wsgate_client::cli`) against a real node, with
//! in-memory stdin and stdout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use wsgate_client::cli::{run_with, ClientArgs};
use wsgate_testkit::{eventually, token, Node, Ws, WAIT};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ClientArgs,
}

fn args(list: &[&str]) -> ClientArgs {
    let mut argv = vec!["client"];
    argv.extend_from_slice(list);
    Cli::try_parse_from(argv).unwrap().args
}

/// A stdout that the test can read while the tool writes.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON {l:?}: {e}")))
            .collect()
    }
}

#[tokio::test]
async fn publishes_stdin_lines_and_prints_answers_as_json_lines() {
    let node = Node::start(&[]).await;
    let tok = token("op", &["*"], &["lobby", "team.*"], Duration::from_secs(600));
    let url = node.ws_url();
    let args = args(&[
        "--url",
        &url,
        "--token",
        &tok,
        "--room",
        "lobby",
        "--exit-on-eof",
    ]);
    let input: &'static [u8] =
        b"{\"n\":1}\n\nteam.1 {\"n\":2}\nnot json\nsecret {\"x\":1}\n\"three\"\n";
    let out = Shared::default();
    tokio::time::timeout(
        WAIT,
        run_with(args, input, out.clone(), std::future::pending()),
    )
    .await
    .expect("the tool exits after stdin ends")
    .unwrap();
    let lines = out.lines();
    assert_eq!(lines[0]["event"], "connected", "{lines:?}");
    assert_eq!(lines[0]["node"], node.node_id.as_str());
    assert_eq!(lines[1]["event"], "joined");
    assert_eq!(lines[1]["room"], "lobby");
    let answers: Vec<Value> = lines
        .iter()
        .filter(|l| l["event"] == "ack" || l["event"] == "error")
        .cloned()
        .collect();
    assert_eq!(answers.len(), 5, "{answers:?}");
    assert_eq!(
        answers[0],
        json!({"event": "ack", "line": 1, "room": "lobby", "seq": 1})
    );
    assert_eq!(
        answers[1],
        json!({"event": "ack", "line": 3, "room": "team.1", "seq": 1})
    );
    assert_eq!(
        (&answers[2]["line"], &answers[2]["code"]),
        (&json!(4), &json!("bad_input"))
    );
    assert!(answers[2]["message"]
        .as_str()
        .unwrap()
        .starts_with("invalid JSON after room \"not\""));
    assert_eq!(answers[3]["line"], 5);
    assert_eq!(answers[3]["code"], "forbidden");
    assert_eq!(answers[3]["room"], "secret");
    assert_eq!(
        answers[4],
        json!({"event": "ack", "line": 6, "room": "lobby", "seq": 2})
    );
}

#[tokio::test]
async fn prints_room_messages_until_stopped() {
    let node = Node::start(&[]).await;
    let tok = token("watcher", &["*"], &[], Duration::from_secs(600));
    let url = node.ws_url();
    let args = args(&["--url", &url, "--token", &tok, "--room", "a,b"]);
    // Stdin stays open (an operator watching); the stop signal ends it.
    let (_stdin_writer, stdin) = tokio::io::duplex(64);
    let stdin = tokio::io::BufReader::new(stdin);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let out = Shared::default();
    let tool = tokio::spawn(run_with(args, stdin, out.clone(), async {
        let _ = stop_rx.await;
    }));
    let joined = |out: &Shared| {
        out.lines()
            .iter()
            .filter(|l| l["event"] == "joined")
            .count()
    };
    eventually("both rooms joined", || async {
        (joined(&out) == 2).then_some(())
    })
    .await;
    let (mut publisher, _) = Ws::open(&node.ws_url(), "bob").await;
    publisher.publish("a", json!({"text": "one"})).await;
    publisher.publish("b", json!("two")).await;
    publisher.publish("c", json!("not joined")).await;
    publisher.publish("a", json!(3)).await;
    let messages = eventually("three messages printed", || async {
        let msgs: Vec<Value> = out
            .lines()
            .into_iter()
            .filter(|l| l["event"] == "message")
            .collect();
        (msgs.len() == 3).then_some(msgs)
    })
    .await;
    let brief: Vec<(String, u64, Value)> = messages
        .iter()
        .map(|m| {
            assert_eq!(m["from"], "bob");
            assert!(m["ts"].as_u64().unwrap() > 0);
            (
                m["room"].as_str().unwrap().to_owned(),
                m["seq"].as_u64().unwrap(),
                m["data"].clone(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        [
            ("a".into(), 1, json!({"text": "one"})),
            ("b".into(), 1, json!("two")),
            ("a".into(), 2, json!(3)),
        ]
    );
    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, tool)
        .await
        .expect("stops on the signal")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_refused_token_is_an_error_exit() {
    let node = Node::start(&[]).await;
    let url = node.ws_url();
    let args = args(&["--url", &url, "--token", "garbage", "--room", "x"]);
    let out = Shared::default();
    let err = run_with(args, &b""[..], out, std::future::pending())
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("401"), "{text}");
}
