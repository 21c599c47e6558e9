//! What permessage-deflate costs per message: the wire size of a 2 KiB JSON
//! dashboard message compressed the way the gateway compresses it, and the
//! time of one compression (done once per message per node) and of one
//! inflation (per compressed client message). docs/benchmarks.md quotes it:
//!
//! ```sh
//! cargo run --release -p wsgate --example deflate_cost
//! ```

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use wsgate::deflate::{compress, inflate};

/// A `message` frame whose `data` is a dashboard of host metrics.
fn dashboard(n: usize) -> Vec<u8> {
    let mut s =
        String::from(r#"{"type":"message","room":"dashboard","seq":1234,"from":"svc","data":["#);
    let mut i = 0usize;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"cpu":{},"mem":{},"host":"node-{}"}},"#,
            i % 97,
            i * 31 % 1000,
            i % 7
        ));
        i += 1;
    }
    s.push_str(r#"{}],"ts":1796363634707}"#);
    s.into_bytes()
}

fn main() {
    let rounds = 20_000;
    for size in [256, 2048, 16 * 1024] {
        let payload = dashboard(size);
        let start = Instant::now();
        let mut wire = Vec::new();
        for _ in 0..rounds {
            wire = compress(&payload);
        }
        let deflate_us = start.elapsed().as_secs_f64() / f64::from(rounds) * 1e6;
        let start = Instant::now();
        for _ in 0..rounds {
            assert_eq!(inflate(&wire, payload.len()).unwrap().len(), payload.len());
        }
        let inflate_us = start.elapsed().as_secs_f64() / f64::from(rounds) * 1e6;
        println!(
            "{} bytes -> {} on the wire ({:.1}x smaller); compress {deflate_us:.1} us, inflate {inflate_us:.1} us",
            payload.len(),
            wire.len(),
            payload.len() as f64 / wire.len() as f64
        );
    }
}
