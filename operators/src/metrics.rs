//! Counters and gauges the runtime exposes on `/metrics` (Prometheus text format).
//!
//! Metric names are the constants below, never strings scattered around.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const ROWS_IN: &str = "ledgerflow_operator_rows_in_total";
pub const ROWS_OUT: &str = "ledgerflow_operator_rows_out_total";
pub const BUSY_SECONDS: &str = "ledgerflow_operator_busy_seconds_total";
pub const REJECTIONS: &str = "ledgerflow_rejections_total";
pub const CONSUMER_LAG: &str = "ledgerflow_consumer_lag_messages";
pub const SOURCE_BYTES: &str = "ledgerflow_source_bytes_total";
pub const CHECKPOINTS: &str = "ledgerflow_checkpoints_total";
pub const CHECKPOINT_SECONDS: &str = "ledgerflow_checkpoint_duration_seconds_total";
pub const CHECKPOINT_LAST_SECONDS: &str = "ledgerflow_checkpoint_last_duration_seconds";
pub const COMMITTED_ROWS: &str = "ledgerflow_committed_rows_total";
pub const PII_MASKED: &str = "ledgerflow_pii_masked_total";
pub const PENALTY_POINTS: &str = "ledgerflow_penalty_points_total";
pub const STATE_BYTES: &str = "ledgerflow_state_bytes";
pub const SIGNATURES: &str = "ledgerflow_signatures_checked_total";

const HELP: &[(&str, &str, &str)] = &[
    (ROWS_IN, "counter", "Rows received by an operator."),
    (ROWS_OUT, "counter", "Rows emitted by an operator."),
    (
        BUSY_SECONDS,
        "counter",
        "Seconds an operator spent processing.",
    ),
    (REJECTIONS, "counter", "Rows refused, by stage and reason."),
    (
        CONSUMER_LAG,
        "gauge",
        "Messages between the consumer position and the high watermark.",
    ),
    (
        SOURCE_BYTES,
        "counter",
        "Bytes of record values read from a source.",
    ),
    (CHECKPOINTS, "counter", "Checkpoints committed."),
    (
        CHECKPOINT_SECONDS,
        "counter",
        "Seconds spent committing checkpoints.",
    ),
    (
        CHECKPOINT_LAST_SECONDS,
        "gauge",
        "Duration of the last checkpoint commit.",
    ),
    (
        COMMITTED_ROWS,
        "counter",
        "Rows committed into stored tables.",
    ),
    (
        PII_MASKED,
        "counter",
        "E-mail addresses, phone numbers and IP addresses masked, by kind.",
    ),
    (
        PENALTY_POINTS,
        "counter",
        "Penalty points charged to contributors, by reason.",
    ),
    (
        SIGNATURES,
        "counter",
        "Signatures checked, by how: `batch` (a known key, in a batch) or `recovery` (one by one).",
    ),
    (
        STATE_BYTES,
        "gauge",
        "Bytes of the job's state store on disk.",
    ),
];

/// A metric value: counters and gauges share one atomic (f64 bits for fractional values).
#[derive(Debug, Default)]
pub struct Value(AtomicU64);

impl Value {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Fractional seconds, kept as whole microseconds.
pub fn micros(d: std::time::Duration) -> u64 {
    d.as_micros() as u64
}

type Key = (&'static str, Vec<(&'static str, String)>);

/// The process's metrics. Cheap to clone; look a series up once and keep its handle.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    series: Arc<Mutex<BTreeMap<Key, Arc<Value>>>>,
}

impl Registry {
    /// The series `name{labels}`, created at zero on first use.
    pub fn series(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Arc<Value> {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        );
        let mut map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_default().clone()
    }

    /// Sum of every series of `name` whose labels include `filter`.
    pub fn total(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        let map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|((n, labels), _)| {
                *n == name
                    && filter
                        .iter()
                        .all(|(fk, fv)| labels.iter().any(|(k, v)| k == fk && v == fv))
            })
            .map(|(_, v)| v.get())
            .sum()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), value) in map.iter() {
            if *name != last {
                if let Some((_, kind, help)) = HELP.iter().find(|(n, _, _)| n == name) {
                    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                }
                last = name;
            }
            out.push_str(name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let _ = write!(out, "{k}=\"{v}\"");
                }
                out.push('}');
            }
            let v = value.get();
            if name.contains("seconds") {
                let _ = writeln!(out, " {}", v as f64 / 1e6);
            } else {
                let _ = writeln!(out, " {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        r.series(ROWS_IN, &[("stage", "decode")]).add(3);
        r.series(REJECTIONS, &[("stage", "decode"), ("reason", "malformed")])
            .add(1);
        let text = r.render();
        assert!(text.contains("# TYPE ledgerflow_operator_rows_in_total counter"));
        assert!(text.contains("ledgerflow_operator_rows_in_total{stage=\"decode\"} 3"));
        assert_eq!(r.total(REJECTIONS, &[("reason", "malformed")]), 1);
    }
}
