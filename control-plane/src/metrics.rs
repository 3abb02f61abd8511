//! The control plane's Prometheus metrics (prometheus-client), served at
//! `/metrics` on the same listeners as the API.
//!
//! Two kinds: counters and histograms the code bumps as things happen (API
//! calls by a tower layer around every service; store writes by
//! [`CountedStore`]; watches, claims, processes, output by their
//! handlers), and gauges of what is stored (tests and hosts by phase, the
//! pending queue, pool guests), computed from the store when scraped.
//! Every label takes values from a bounded set: a method the server does
//! not have is "unknown", so no request can grow the label space.
use crate::store::{Compare, EventStream, KeyValue, Op, Revision, Store, StoreError, TxnOutcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use testbus_proto::states::TestPhase;
use testbus_proto::{phase, Object, Resource};
use tokio::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    pub service: String,
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    pub service: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub phase: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolPhase {
    pub pool: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolWork {
    pub pool: String,
    /// create, revert or clean.
    pub operation: String,
}

fn guest_histogram() -> Histogram {
    // 50 ms to ~7 min: a revert is a fraction of a second, a boot under
    // TCG minutes.
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

fn seconds_histogram() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Call, Counter>,
    request_seconds: Family<Method, Histogram, fn() -> Histogram>,
    pub watches: Gauge,
    pub watch_events: Counter,
    store_writes: Counter,
    store_write_seconds: Histogram,
    pub claim_seconds: Histogram,
    pub processes_started: Counter,
    pub processes_ended: Family<Outcome, Counter>,
    pub output_bytes: Counter,
    tests: Family<Phase, Gauge>,
    hosts: Family<Phase, Gauge>,
    pending: Gauge,
    oldest_pending: Gauge<f64, AtomicU64>,
    guests: Family<PoolPhase, Gauge>,
    guest_seconds: Family<PoolWork, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("testbus");
        let m = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(seconds_histogram),
            watches: Gauge::default(),
            watch_events: Counter::default(),
            store_writes: Counter::default(),
            store_write_seconds: seconds_histogram(),
            claim_seconds: seconds_histogram(),
            processes_started: Counter::default(),
            processes_ended: Family::default(),
            output_bytes: Counter::default(),
            tests: Family::default(),
            hosts: Family::default(),
            pending: Gauge::default(),
            oldest_pending: Gauge::default(),
            guests: Family::default(),
            guest_seconds: Family::new_with_constructor(guest_histogram),
            registry: Registry::default(),
        };
        r.register("api_requests", "API calls by service, method and gRPC code", m.requests.clone());
        r.register_with_unit(
            "api_request_duration",
            "Time to the response's headers (a whole unary call; a stream's start)",
            Unit::Seconds,
            m.request_seconds.clone(),
        );
        r.register("watch_connections", "Watches open now", m.watches.clone());
        r.register("watch_events_sent", "Events sent to watches", m.watch_events.clone());
        r.register("store_writes", "Store transactions that wrote", m.store_writes.clone());
        r.register_with_unit(
            "store_write_duration",
            "Time of each store transaction",
            Unit::Seconds,
            m.store_write_seconds.clone(),
        );
        r.register_with_unit("claim_duration", "Time of each gang claim", Unit::Seconds, m.claim_seconds.clone());
        r.register("processes_started", "Processes that started running", m.processes_started.clone());
        r.register("processes_ended", "Processes that ended, by phase and reason", m.processes_ended.clone());
        r.register_with_unit("output", "Process output received", Unit::Bytes, m.output_bytes.clone());
        r.register("tests", "Tests by phase", m.tests.clone());
        r.register("hosts", "Hosts by phase", m.hosts.clone());
        r.register("pending_tests", "Tests waiting for hosts", m.pending.clone());
        r.register_with_unit(
            "oldest_pending_test_age",
            "How long the oldest pending test has waited",
            Unit::Seconds,
            m.oldest_pending.clone(),
        );
        r.register("pool_guests", "HostPool guests by pool and phase", m.guests.clone());
        r.register_with_unit(
            "pool_guest_operation_duration",
            "Time a pool took to create a guest, revert one to its clean snapshot, or make it ready again",
            Unit::Seconds,
            m.guest_seconds.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// What the pool controller reports guest work to.
    pub fn guest_timings(&self) -> testbus_controllers::pools::GuestTimings {
        let family = self.guest_seconds.clone();
        testbus_controllers::pools::GuestTimings::new(move |pool, work, took| {
            let labels = PoolWork { pool: pool.to_string(), operation: work.as_str().to_string() };
            family.get_or_create(&labels).observe(took.as_secs_f64());
        })
    }

    /// One API call, from the path it was made to and the gRPC status its
    /// response headers carry (absent: OK, or an error after the first
    /// message of a stream).
    pub fn record_call(&self, path: &str, grpc_status: Option<&str>, took: std::time::Duration) {
        let code = grpc_status.and_then(|s| s.parse::<i32>().ok()).unwrap_or(0);
        let (service, method) = match path.trim_start_matches('/').split_once('/') {
            // Unimplemented: a method (or service) the server does not
            // have, which a client may name at will.
            Some(_) if code == tonic::Code::Unimplemented as i32 => ("unknown", "unknown"),
            Some((s, m)) if s.contains('.') => (s, m),
            _ => ("http", if path == "/metrics" { "/metrics" } else { "other" }),
        };
        let code = format!("{:?}", tonic::Code::from_i32(code));
        self.requests.get_or_create(&Call { service: service.into(), method: method.into(), code }).inc();
        self.request_seconds
            .get_or_create(&Method { service: service.into(), method: method.into() })
            .observe(took.as_secs_f64());
    }

    /// Whether a Process's status change is a start (it got a start time:
    /// a short process may be written Running and ended at once) or an
    /// end, counted.
    pub fn process_transition(&self, old: &testbus_proto::ProcessStatus, new: &testbus_proto::ProcessStatus) {
        if old.start_time.is_empty() && !new.start_time.is_empty() {
            self.processes_started.inc();
        }
        if old.phase != new.phase && phase::process_terminal(&new.phase) {
            // Reasons are a closed set: one an agent made up is "other",
            // so no writer grows the label set.
            let reason = match new.reason.parse::<testbus_proto::states::ProcessReason>() {
                Ok(r) => r.to_string(),
                Err(_) if new.reason.is_empty() => String::new(),
                Err(_) => "other".into(),
            };
            self.processes_ended.get_or_create(&Outcome { phase: new.phase.clone(), reason }).inc();
        }
    }

    /// The text exposition, with the gauges of what is stored now.
    pub async fn render(&self, store: &dyn Store) -> Result<String, StoreError> {
        self.refresh(store).await?;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| StoreError::Backend(format!("encoding metrics: {e}")))?;
        Ok(out)
    }

    async fn refresh(&self, store: &dyn Store) -> Result<(), StoreError> {
        let objects = |kvs: Vec<KeyValue>| {
            kvs.into_iter().filter_map(|kv| crate::hub::decode(&kv.key, &kv.value, kv.mod_revision)).collect::<Vec<_>>()
        };
        let (tests, _) = store.list(&crate::hub::prefix(testbus_proto::Kind::Test)).await?;
        let (hosts, _) = store.list(&crate::hub::prefix(testbus_proto::Kind::Host)).await?;
        let (pools, _) = store.list(&crate::hub::prefix(testbus_proto::Kind::HostPool)).await?;
        self.tests.clear();
        self.hosts.clear();
        self.guests.clear();
        // Every phase, zeros included: an alert on `testbus_hosts{phase=
        // "NotReady"} > 0` needs the series before the first host fails.
        for p in testbus_proto::states::TestPhase::ALL {
            let _ = self.tests.get_or_create(&Phase { phase: p.as_str().into() });
        }
        for p in testbus_proto::states::HostPhase::ALL {
            let _ = self.hosts.get_or_create(&Phase { phase: p.as_str().into() });
        }
        let (mut pending, mut oldest) = (0, 0.0f64);
        for o in objects(tests) {
            if let Object::Test(t) = o {
                let p =
                    if t.status().phase.is_empty() { TestPhase::Pending.to_string() } else { t.status().phase.clone() };
                if p == TestPhase::Pending {
                    pending += 1;
                    oldest = oldest.max(testbus_proto::time::since(&t.meta().creation_timestamp).as_secs_f64());
                }
                self.tests.get_or_create(&Phase { phase: p }).inc();
            }
        }
        for o in objects(hosts) {
            if let Object::Host(h) = o {
                self.hosts.get_or_create(&Phase { phase: h.status().phase.clone() }).inc();
            }
        }
        for o in objects(pools) {
            if let Object::HostPool(p) = o {
                for g in &p.status().guests {
                    self.guests.get_or_create(&PoolPhase { pool: p.name().into(), phase: g.phase.clone() }).inc();
                }
            }
        }
        self.pending.set(pending);
        self.oldest_pending.set(oldest);
        Ok(())
    }
}

/// A store that counts its writes and times its transactions.
pub struct CountedStore {
    pub inner: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl Store for CountedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let t = Instant::now();
        let writes = !ops.is_empty();
        let r = self.inner.txn(compares, ops).await;
        self.metrics.store_write_seconds.observe(t.elapsed().as_secs_f64());
        if writes && r.as_ref().is_ok_and(|o| o.succeeded) {
            self.metrics.store_writes.inc();
        }
        r
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream, StoreError> {
        self.inner.watch(prefix, after).await
    }
    async fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// The tower layer that counts and times every call to the server.
#[derive(Clone)]
pub struct CallsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for CallsLayer {
    type Service = Calls<S>;
    fn layer(&self, inner: S) -> Calls<S> {
        Calls { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Calls<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<tonic::codegen::http::Request<B>> for Calls<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let call = self.inner.call(req);
        Box::pin(async move {
            let r = call.await;
            if let Ok(resp) = &r {
                let status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok());
                metrics.record_call(&path, status, started.elapsed());
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_a_client_makes_up_do_not_grow_the_labels() {
        let m = Metrics::new();
        let d = std::time::Duration::from_millis(1);
        m.record_call("/testbus.v1.Hosts/List", None, d);
        m.record_call("/testbus.v1.Hosts/List", Some("7"), d);
        for i in 0..100 {
            m.record_call(&format!("/testbus.v1.Hosts/Made{i}"), Some("12"), d);
            m.record_call(&format!("/junk{i}"), None, d);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("testbus_api_requests_total")).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(out.contains(
            r#"testbus_api_requests_total{service="testbus.v1.Hosts",method="List",code="PermissionDenied"} 1"#
        ));
        assert!(
            out.contains(r#"testbus_api_requests_total{service="unknown",method="unknown",code="Unimplemented"} 100"#)
        );
        assert!(out.contains(r#"testbus_api_requests_total{service="http",method="other",code="Ok"} 100"#));
    }

    #[test]
    fn reasons_an_agent_makes_up_do_not_grow_the_labels() {
        let m = Metrics::new();
        let running = testbus_proto::ProcessStatus { phase: "Running".into(), ..Default::default() };
        for i in 0..50 {
            let ended = testbus_proto::ProcessStatus {
                phase: "Failed".into(),
                reason: format!("Made{i}"),
                ..Default::default()
            };
            m.process_transition(&running, &ended);
        }
        let ended =
            testbus_proto::ProcessStatus { phase: "Failed".into(), reason: "NonZeroExit".into(), ..Default::default() };
        m.process_transition(&running, &ended);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("testbus_processes_ended_total{")).collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(out.contains(r#"testbus_processes_ended_total{phase="Failed",reason="other"} 50"#), "{out}");
        assert!(out.contains(r#"testbus_processes_ended_total{phase="Failed",reason="NonZeroExit"} 1"#), "{out}");
    }
}
