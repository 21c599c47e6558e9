//! What a run prints: a human summary, then one JSON line (always the last
//! line on stdout), and progress bars on stderr when it is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

/// A scenario's result.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    ok: bool,
    lines: Vec<String>,
    problems: Vec<String>,
    warnings: Vec<String>,
    fields: Map<String, Value>,
}

impl Report {
    /// An empty, passing report.
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            ok: true,
            lines: Vec::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
            fields: Map::new(),
        }
    }

    /// Add a human line.
    pub fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// Set a JSON field.
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.fields.insert(key.to_owned(), value);
    }

    /// The run did not meet its own checks (loss, failures); exit status 1.
    pub fn fail(&mut self, why: impl Into<String>) {
        self.ok = false;
        self.problems.push(why.into());
    }

    /// Something that may make the figures wrong, without failing the run.
    pub fn warn(&mut self, why: impl Into<String>) {
        self.warnings.push(why.into());
    }

    /// Whether the run passed its own checks.
    pub fn ok(&self) -> bool {
        self.ok
    }

    /// The human summary.
    pub fn human(&self) -> String {
        let mut out = format!("== wsgate-bench {} ==\n", self.scenario);
        for line in &self.lines {
            out.push_str(line);
            out.push('\n');
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        for p in &self.problems {
            out.push_str(&format!("FAILED: {p}\n"));
        }
        out.push_str(if self.ok {
            "result: ok\n"
        } else {
            "result: FAILED\n"
        });
        out
    }

    /// The JSON line: `scenario`, `ok`, `problems`, `warnings` and the fields.
    pub fn json_line(&self) -> String {
        let mut all = Map::new();
        all.insert("scenario".to_owned(), Value::from(self.scenario));
        all.insert("ok".to_owned(), Value::from(self.ok));
        all.insert("problems".to_owned(), Value::from(self.problems.clone()));
        all.insert("warnings".to_owned(), Value::from(self.warnings.clone()));
        for (k, v) in &self.fields {
            all.insert(k.clone(), v.clone());
        }
        Value::Object(all).to_string()
    }
}

/// Whether progress bars are drawn: only when stderr is a terminal.
pub fn progress_enabled() -> bool {
    std::io::stderr().is_terminal()
}

fn target() -> ProgressDrawTarget {
    if progress_enabled() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A counting bar (`connecting 1200/5000`).
pub fn counter(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target());
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// A bar over a time span, in tenths of a second (`fanout [====  ] 4.2/10 s`).
pub fn timer(span: Duration, what: &str) -> ProgressBar {
    let tenths = (span.as_millis() / 100).max(1) as u64;
    let bar = ProgressBar::with_draw_target(Some(tenths), target());
    if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {elapsed} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_owned());
    bar
}

/// Format a rate with thousands separators (`123,456`).
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_the_fixed_fields_and_is_one_line() {
        let mut r = Report::new("fanout");
        r.line("deliveries/s 100");
        r.set("deliveries_per_s", 100.5);
        r.warn("tool busy");
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["scenario"], "fanout");
        assert_eq!(v["ok"], true);
        assert_eq!(v["deliveries_per_s"], 100.5);
        assert_eq!(v["warnings"][0], "tool busy");
        assert!(r.human().contains("result: ok"));
        r.fail("3 lost");
        assert!(!r.ok());
        let v: Value = serde_json::from_str(&r.json_line()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["problems"][0], "3 lost");
        assert!(r.human().contains("FAILED: 3 lost"));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(-1234.0), "-1,234");
    }
}
