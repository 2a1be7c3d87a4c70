//! Counters of the running node and their Prometheus text exposition (0.0.4), served by
//! [`super::http`]. Every layer counts here; no patient data is ever a label or a value.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

/// Upper bounds (seconds) of the C-STORE latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The node's counters; one set per process ([`global`]).
#[derive(Debug, Default)]
pub struct Metrics {
    pub associations_open: AtomicI64,
    pub associations_total: AtomicU64,
    pub associations_rejected: AtomicU64,
    /// Connections closed before an association request: over their source's rate, evicted
    /// from the pending pool, or silent past the ARTIM timeout.
    pub connections_dropped: AtomicU64,
    pub instances_stored: AtomicU64,
    pub instances_duplicate: AtomicU64,
    pub instances_failed: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub object_store_errors: AtomicU64,
    /// Bytes of incoming data sets held in memory now (see `node.max_bytes_in_flight`).
    pub bytes_in_flight: AtomicI64,
    store_buckets: [AtomicU64; BUCKETS.len()],
    store_count: AtomicU64,
    store_micros: AtomicU64,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

impl Metrics {
    /// Records the time from a C-STORE-RQ to its response.
    pub fn observe_store(&self, d: Duration) {
        // The count first: `render` reads the buckets first, so a scrape in between never shows
        // a finite bucket above +Inf (= the count).
        self.store_count.fetch_add(1, Relaxed);
        self.store_micros.fetch_add(d.as_micros() as u64, Relaxed);
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.store_buckets[i].fetch_add(1, Relaxed);
            }
        }
    }

    /// The Prometheus text exposition, with the ledger's size and checkpoint age.
    pub fn render(
        &self,
        ledger_entries: u64,
        checkpoint_age: Option<f64>,
        uncheckpointed: u64,
    ) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        let c = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric(
            "dicomchain_associations_open",
            "gauge",
            "Associations being served now.",
            self.associations_open.load(Relaxed).to_string(),
        );
        metric(
            "dicomchain_associations_total",
            "counter",
            "Associations accepted since start.",
            c(&self.associations_total),
        );
        metric(
            "dicomchain_associations_rejected_total",
            "counter",
            "Association requests rejected since start.",
            c(&self.associations_rejected),
        );
        metric(
            "dicomchain_connections_dropped_total",
            "counter",
            "Connections closed before an association request (rate limit, pending pool full, ARTIM timeout).",
            c(&self.connections_dropped),
        );
        metric(
            "dicomchain_instances_stored_total",
            "counter",
            "Instances stored (new instances and new versions).",
            c(&self.instances_stored),
        );
        metric(
            "dicomchain_instances_duplicate_total",
            "counter",
            "Identical instances received again (acknowledged, not stored twice).",
            c(&self.instances_duplicate),
        );
        metric(
            "dicomchain_instances_failed_total",
            "counter",
            "C-STORE requests answered with a failure status.",
            c(&self.instances_failed),
        );
        metric(
            "dicomchain_bytes_received_total",
            "counter",
            "PDU bytes received on DICOM associations.",
            c(&self.bytes_in),
        );
        metric(
            "dicomchain_bytes_sent_total",
            "counter",
            "PDU bytes sent on DICOM associations.",
            c(&self.bytes_out),
        );
        metric(
            "dicomchain_bytes_in_flight",
            "gauge",
            "Bytes of incoming data sets held in memory across associations.",
            self.bytes_in_flight.load(Relaxed).to_string(),
        );
        metric(
            "dicomchain_object_store_errors_total",
            "counter",
            "C-STORE requests failed by the object store.",
            c(&self.object_store_errors),
        );
        metric(
            "dicomchain_ledger_entries",
            "gauge",
            "Entries in the ledger's hash chain.",
            ledger_entries.to_string(),
        );
        if let Some(age) = checkpoint_age {
            metric(
                "dicomchain_checkpoint_age_seconds",
                "gauge",
                "Seconds since the newest entry the newest signed checkpoint covers (grows on an idle node: alert on the uncovered entries instead).",
                format!("{age:.3}"),
            );
        }
        metric(
            "dicomchain_entries_not_checkpointed",
            "gauge",
            "Ledger entries no signed checkpoint covers yet.",
            uncheckpointed.to_string(),
        );
        out += "# HELP dicomchain_store_duration_seconds Time from C-STORE-RQ to C-STORE-RSP.\n";
        out += "# TYPE dicomchain_store_duration_seconds histogram\n";
        for (i, bound) in BUCKETS.iter().enumerate() {
            out += &format!(
                "dicomchain_store_duration_seconds_bucket{{le=\"{bound}\"}} {}\n",
                self.store_buckets[i].load(Relaxed)
            );
        }
        let count = self.store_count.load(Relaxed);
        out += &format!("dicomchain_store_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n");
        out += &format!(
            "dicomchain_store_duration_seconds_sum {:.6}\n",
            self.store_micros.load(Relaxed) as f64 / 1e6
        );
        out += &format!("dicomchain_store_duration_seconds_count {count}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_prometheus_text() {
        let m = Metrics::default();
        m.instances_stored.fetch_add(3, Relaxed);
        m.observe_store(Duration::from_millis(3));
        m.observe_store(Duration::from_millis(300));
        let text = m.render(42, Some(1.5), 2);
        assert!(text.contains("# TYPE dicomchain_instances_stored_total counter\ndicomchain_instances_stored_total 3\n"));
        assert!(text.contains("dicomchain_ledger_entries 42\n"));
        assert!(text.contains("dicomchain_checkpoint_age_seconds 1.500\n"));
        assert!(text.contains("dicomchain_entries_not_checkpointed 2\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_count 2\n"));
        // Every sample line is `name value` or `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("dicomchain_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
