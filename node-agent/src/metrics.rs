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
use std::sync::OnceLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stream {
    pub stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: String,
}

pub struct AgentMetrics {
    registry: Registry,
    pub running: Gauge,
    pub spawn_seconds: Histogram,
    pub output_bytes: Family<Stream, Counter>,
    pub ended: Family<Phase, Counter>,
}

pub fn metrics() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::with_prefix("testbus_agent");
        let m = AgentMetrics {
            running: Gauge::default(),
            // 100 µs to ~3 s.
            spawn_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            output_bytes: Family::default(),
            ended: Family::default(),
            registry: Registry::default(),
        };
        registry.register("processes_running", "Processes running now", m.running.clone());
        registry.register(
            "spawn_duration_seconds",
            "From a process's command being ready to the child running",
            m.spawn_seconds.clone(),
        );
        registry.register("output_bytes", "Output bytes sent to the control plane, by stream", m.output_bytes.clone());
        registry.register("processes_ended", "Processes that ended, by phase", m.ended.clone());
        AgentMetrics { registry, ..m }
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

impl AgentMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on `addr` until `stop`. Plain HTTP: bind it to
/// loopback or a management network.
pub async fn serve(addr: std::net::SocketAddr, stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    let lis = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
    tracing::info!(%addr, "serving metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics().render())
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(lis, app).with_graceful_shutdown(stop.cancelled_owned()).await {
            tracing::warn!(error = %e, "the metrics listener failed");
        }
    });
    Ok(())
}
