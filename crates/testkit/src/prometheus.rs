//! A reader of the Prometheus text exposition (`/metrics`).

use crate::http_get;

/// Parsed Prometheus text exposition: `(name, labels, value)` samples.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: Vec<(String, Vec<(String, String)>, f64)>,
}

impl Metrics {
    /// Parse the text format (comments skipped; label values unescaped).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match name_labels.find('{') {
                Some(i) => {
                    let inner = name_labels[i + 1..].trim_end_matches('}');
                    let mut labels = Vec::new();
                    let mut rest = inner;
                    while let Some(eq) = rest.find("=\"") {
                        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
                        let mut val = String::new();
                        let mut chars = rest[eq + 2..].char_indices();
                        let mut end = 0;
                        while let Some((j, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    if let Some((_, n)) = chars.next() {
                                        val.push(if n == 'n' { '\n' } else { n });
                                    }
                                }
                                '"' => {
                                    end = eq + 2 + j + 1;
                                    break;
                                }
                                c => val.push(c),
                            }
                        }
                        labels.push((key, val));
                        rest = &rest[end..];
                    }
                    (name_labels[..i].to_owned(), labels)
                }
                None => (name_labels.to_owned(), Vec::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// The value of `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// Like [`get`](Self::get), 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// Fetch and parse `/metrics` from an ops base URL.
pub async fn metrics(ops_url: &str) -> Metrics {
    let (status, _, body) = http_get(&format!("{ops_url}/metrics")).await.unwrap();
    assert_eq!(status, 200);
    Metrics::parse(&body)
}
