//! The agent's own Prometheus metrics, served at `/metrics` on
//! `--metrics-listen` (off by default): processes running, spawn latency,
//! output bytes, processes ended by phase.
//!
//! One registry for the process, reached through [`metrics()`]: the
//! runner counts where things happen; nothing else writes.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stream {
    pub stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: String,
}

pub struct AgentMetrics {
    pub registry: Arc<Registry>,
    pub running: Gauge,
    pub spawn_seconds: Histogram,
    pub output_bytes: Family<Stream, Counter>,
    pub ended: Family<Phase, Counter>,
}

pub fn metrics() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut r = Registry::with_prefix("testbus_agent");
        let running = Gauge::default();
        // 100 µs to ~3 s.
        let spawn_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        let (output_bytes, ended) = (Family::default(), Family::default());
        r.register("processes_running", "Processes running now", running.clone());
        r.register(
            "spawn_duration_seconds",
            "From a process's command being ready to the child running",
            spawn_seconds.clone(),
        );
        r.register("output_bytes", "Output bytes sent to the control plane, by stream", output_bytes.clone());
        r.register("processes_ended", "Processes that ended, by phase", ended.clone());
        AgentMetrics { registry: Arc::new(r), running, spawn_seconds, output_bytes, ended }
    })
}

/// Counts a process as running while it lives.
pub struct Running(());

impl Running {
    pub fn start() -> Running {
        metrics().running.inc();
        Running(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics().running.dec();
    }
}
