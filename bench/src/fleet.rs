//! `testbus-bench fleet`: N agent identities in this one process, each as
//! a real agent is to the control plane: it joins with a token (a key and
//! a CSR of its own, a certificate back), holds a TLS connection of its
//! own with that certificate, registers its Host, renews a lease (10 s)
//! every third of it, and watches its Processes (marking each Running as
//! it appears: they run nothing). Measured at each size: the control
//! plane's CPU and memory while the fleet only renews, renewal latency,
//! and a test over 1,000 of the hosts from create to every process
//! Running.
//!
//! Bounds: sizes and rounds are fixed below, every wait has a deadline,
//! and everything listens and connects on loopback only.
use crate::cpu_seconds;
use anyhow::Context;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testbus_client::{Client, Tls};
use testbus_proto::states::ProcessPhase;
use testbus_proto::{Host, HostSpec, HostStatus, ObjectMeta, Process, Resource, Test};
use testbus_tests::percentile;
use testbus_tests::{rss_bytes, Cluster};

/// p50, p99, max and count (a fleet's samples are too many to keep).
fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    json!({ "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99), "max_ms": ms.last().copied().unwrap_or(0.0), "n": ms.len() })
}

/// How long a round's test may take to have every process Running.
const ROUND_LIMIT: Duration = Duration::from_secs(30);
/// How long the fleet renews untouched while the control plane's CPU is
/// measured.
const IDLE_WINDOW: Duration = Duration::from_secs(15);

/// What every identity records.
#[derive(Default)]
struct Records {
    renew_ms: Vec<f64>,
    /// Failed renewals by what failed them (a status code, or "timeout").
    renew_errors: std::collections::BTreeMap<String, u64>,
    /// Per process marked Running: (test, when).
    running: Vec<(String, Instant)>,
    mark_errors: u64,
}

struct Identity {
    name: String,
    client: Client,
}

/// Joins `n` identities with `token` (at most `parallel` at once) and
/// connects each with its own certificate.
async fn join_all(c: &Cluster, token: &str, n: usize, parallel: usize) -> anyhow::Result<Vec<Identity>> {
    let token: testbus_pki::JoinToken = token.parse().map_err(|e| anyhow::anyhow!("join token: {e}"))?;
    let pinned = Tls::new(testbus_pki::pinned_client_config(&token.ca)?);
    // Joins go over a few shared connections (the real agent's join is
    // one call on a connection it then drops).
    let joiners: Vec<Client> = futures::future::try_join_all(
        (0..parallel.min(8)).map(|_| Client::connect_with(&c.agent_server, Some(pinned.clone()))),
    )
    .await?;
    // The TCP listener agents use (c.server is the local socket).
    let server = c.agent_server.clone();
    let token = token.to_string();
    let out = futures::stream::iter(0..n)
        .map(|i| {
            let (joiner, server, token) = (joiners[i % joiners.len()].clone(), server.clone(), token.clone());
            async move {
                let name = format!("fleet-{i}");
                let (csr, key) = testbus_pki::new_csr(&name)?;
                let req = testbus_proto::JoinRequest { token, host_name: name.clone(), csr, take_over: false };
                let r = joiner.auth().join(req).await.with_context(|| format!("{name}: join"))?.into_inner();
                let tls = Tls::new(testbus_pki::client_config(&r.certificate_authority, Some((&r.certificate, &key)))?);
                let client =
                    Client::connect_with(&server, Some(tls)).await.with_context(|| format!("{name}: connect"))?;
                anyhow::Ok(Identity { name, client })
            }
        })
        .buffer_unordered(parallel)
        .collect::<Vec<_>>()
        .await;
    out.into_iter().collect()
}

/// Registers, then renews every third of the lease (the first renewal
/// spread over one period, as agents started at different times are) and
/// watches its Processes, until `stop`.
async fn run_identity(
    id: Identity,
    lease: Duration,
    rec: Arc<Mutex<Records>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let agent_id = format!("fleet-agent-{}", id.name);
    let host = Host {
        metadata: Some(ObjectMeta { name: id.name.clone(), ..Default::default() }),
        spec: Some(HostSpec::default()),
        status: Some(HostStatus {
            agent_id: agent_id.clone(),
            lease_duration_seconds: lease.as_secs() as u32,
            lease_renew_time: testbus_proto::time::now(),
            capabilities: vec!["fleet".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Err(e) = id.client.api::<Host>().create(host).await {
        eprintln!("fleet: {}: register: {e}", id.name);
        *rec.lock().renew_errors.entry(format!("register: {:?}", e.code())).or_default() += 1;
        return;
    }
    let every = lease / 3;
    let renew = {
        let (client, name, rec, agent_id) = (id.client.clone(), id.name.clone(), rec.clone(), agent_id.clone());
        async move {
            tokio::time::sleep(every.mul_f64(rand::random::<f64>())).await;
            let mut hosts = client.hosts();
            loop {
                let t = Instant::now();
                let req =
                    testbus_proto::RenewLeaseRequest { name: name.clone(), agent_id: agent_id.clone(), release: false };
                let r = tokio::time::timeout(every, hosts.renew_lease(req)).await;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                match r {
                    Ok(Ok(_)) => rec.lock().renew_ms.push(ms),
                    Ok(Err(s)) => *rec.lock().renew_errors.entry(format!("{:?}", s.code())).or_default() += 1,
                    Err(_) => *rec.lock().renew_errors.entry("timeout".into()).or_default() += 1,
                }
                tokio::time::sleep(every.saturating_sub(t.elapsed())).await;
            }
        }
    };
    let watch = {
        let api = id.client.api::<Process>();
        let selector = format!("spec.hostName={}", id.name);
        async move {
            let mut w = std::pin::pin!(testbus_client::watcher_with(
                api.clone(),
                String::new(),
                selector,
                testbus_client::Reconnect::Relist
            ));
            while let Some(ev) = w.next().await {
                let ps = match ev {
                    testbus_client::WatcherEvent::Applied(p) => vec![p],
                    testbus_client::WatcherEvent::Restarted(ps) => ps,
                    testbus_client::WatcherEvent::Deleted(_) => continue,
                };
                for p in
                    ps.iter().filter(|p| p.spec().stop && !testbus_proto::phase::process_terminal(&p.status().phase))
                {
                    // Stopped (its test deleted): it ends at once, as a
                    // `true` would.
                    let r = api
                        .patch_status_from(p.name(), Some(p.clone()), |p| {
                            if testbus_proto::phase::process_terminal(&p.status().phase) {
                                return false;
                            }
                            let s = p.status_mut();
                            s.phase = ProcessPhase::Killed.into();
                            s.reason = testbus_proto::states::ProcessReason::Stopped.into();
                            s.finish_time = testbus_proto::time::now();
                            true
                        })
                        .await;
                    if r.is_err() {
                        rec.lock().mark_errors += 1;
                    }
                }
                for p in ps.into_iter().filter(|p| !p.spec().stop && p.status().phase == ProcessPhase::Pending) {
                    let test = p.spec().test.clone();
                    let r = api
                        .patch_status_from(p.name(), Some(p.clone()), |p| {
                            if p.status().phase != ProcessPhase::Pending {
                                return false;
                            }
                            let s = p.status_mut();
                            s.phase = ProcessPhase::Running.into();
                            s.start_time = testbus_proto::time::now();
                            true
                        })
                        .await;
                    let mut r2 = rec.lock();
                    match r {
                        Ok(_) => r2.running.push((test, Instant::now())),
                        Err(_) => r2.mark_errors += 1,
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = renew => {}
        _ = watch => {}
        _ = stop.cancelled() => {}
    }
}

/// One size: the fleet joined and connected, idle, then tests over
/// `test_hosts` of its hosts.
async fn one_size(
    c: &Cluster,
    n: usize,
    lease: Duration,
    test_hosts: usize,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let cp = c.control_plane_pid();
    let rss_before = rss_bytes(cp);
    let token = {
        let r = c
            .client()
            .await
            .auth()
            .create_token(testbus_proto::CreateTokenRequest { ttl: "1h".into(), ..Default::default() })
            .await?;
        r.into_inner().token
    };
    let t = Instant::now();
    let ids = join_all(c, &token, n, 64).await?;
    let joined_s = t.elapsed().as_secs_f64();
    let rec = Arc::new(Mutex::new(Records::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        tasks.spawn(run_identity(id, lease, rec.clone(), stop.clone()));
    }
    let admin = c.client().await;
    // Registered: every Host Ready.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (hosts, _) = admin.api::<Host>().list("", "").await?;
        let ready = hosts.iter().filter(|h| h.status().phase == testbus_proto::states::HostPhase::Ready).count();
        if ready >= n {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{ready} of {n} hosts Ready after 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let registered_s = t.elapsed().as_secs_f64();
    // A period for the renewals to spread, then the idle window.
    tokio::time::sleep(lease / 3).await;
    rec.lock().renew_ms.clear();
    let cpu0 = cpu_seconds(cp);
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu = (cpu_seconds(cp) - cpu0) / IDLE_WINDOW.as_secs_f64();
    let rss_idle = rss_bytes(cp);
    let renew = std::mem::take(&mut rec.lock().renew_ms);

    let mut per_process = Vec::new();
    let mut all_running = Vec::new();
    // Rounds whose processes were not all Running within ROUND_LIMIT.
    let mut not_running = Vec::new();
    for round in 0..rounds {
        let name = format!("wide-{n}-{round}");
        let test = wide_test(&name, test_hosts);
        let t = Instant::now();
        admin.api::<Test>().create(test).await?;
        let deadline = t + ROUND_LIMIT;
        let mut timed_out = None;
        loop {
            let done = rec.lock().running.iter().filter(|(tn, _)| *tn == name).count();
            if done >= test_hosts {
                break;
            }
            if Instant::now() > deadline {
                // Recorded, not fatal: what breaks first is the finding.
                let t = admin.api::<Test>().get(&name).await?;
                timed_out = Some(json!({
                    "test": name, "running": done, "phase": t.status().phase.to_string(),
                    "claimed": !t.status().claims.is_empty(),
                }));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(v) = timed_out {
            not_running.push(v);
        }
        let times: Vec<f64> = rec
            .lock()
            .running
            .iter()
            .filter(|(tn, _)| *tn == name)
            .map(|(_, at)| at.duration_since(t).as_secs_f64() * 1e3)
            .collect();
        if times.len() >= test_hosts {
            all_running.push(times.iter().copied().fold(0.0, f64::max));
        }
        per_process.extend(times);
        admin.api::<Test>().delete(&name).await?;
        // Its processes gone before the next round claims the hosts again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (ps, _) = admin.api::<Process>().list("", &format!("spec.test={name}")).await?;
            if ps.is_empty() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{name}: {} processes left 60 s after its delete", ps.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (renew_errors, mark_errors) = {
        let r = rec.lock();
        (r.renew_errors.clone(), r.mark_errors)
    };
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(json!({
        "agents": n,
        "lease_seconds": lease.as_secs(),
        "join_and_connect_s": joined_s,
        "all_registered_s": registered_s,
        "cp_idle_cpu_cores": idle_cpu,
        "cp_rss_bytes_before": rss_before,
        "cp_rss_bytes_idle": rss_idle,
        "renewal": summary(renew),
        "renewal_errors": renew_errors,
        "test_hosts": test_hosts,
        "create_to_running": summary(per_process),
        "create_to_all_running_ms": all_running,
        "mark_running_errors": mark_errors,
        "rounds_not_all_running": not_running,
    }))
}

fn wide_test(name: &str, count: usize) -> Test {
    let mut t = testbus_tests::test_needing(name, "fleet");
    t.spec_mut().hosts[0].role = "w".into();
    t.spec_mut().hosts[0].count = Some(count as u32);
    t.spec_mut().steps[0].on = vec!["w".into()];
    t
}

/// Raises this process's open-file limit (each identity holds a socket),
/// and with it the control plane's, which inherits it: past the hard limit
/// to 65,536 where that is allowed (CAP_SYS_RESOURCE), else to the hard
/// limit. The control plane serves at most three quarters of its limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    let want = hard.max(65_536);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

pub async fn fleet(smoke: bool) -> anyhow::Result<serde_json::Value> {
    // TESTBUS_BENCH_FLEET: sizes to run instead ("1000,10000"), with
    // TESTBUS_BENCH_FLEET_LEASE seconds (10).
    let lease = std::env::var("TESTBUS_BENCH_FLEET_LEASE").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let runs: Vec<(usize, u64)> = match std::env::var("TESTBUS_BENCH_FLEET") {
        Ok(s) => s.split(',').filter_map(|v| v.trim().parse().ok()).map(|n| (n, lease)).collect(),
        Err(_) if smoke => vec![(20, 10)],
        // The last: what a fleet of 10,000 should be configured with.
        Err(_) => vec![(1_000, 10), (10_000, 10), (10_000, 30)],
    };
    let rounds = if smoke { 1 } else { 3 };
    let nofile = raise_nofile();
    let mut out = Vec::new();
    for &(n, lease) in &runs {
        anyhow::ensure!(nofile as usize > n + 1_000, "fleet of {n}: the open-file limit is {nofile}");
        // One address holds every identity's connection here: the per-peer
        // cap is raised to the fleet's size (a real fleet has an address
        // per host).
        let cap = (n + 100).to_string();
        let c = Cluster::start_loopback_with(0, &["--max-connections-per-peer", &cap]).await;
        let test_hosts = n.min(1_000);
        let r = one_size(&c, n, Duration::from_secs(lease), test_hosts, rounds).await;
        if r.is_err() {
            // The control plane's side of it, for whoever reads the error.
            let _ = std::fs::write("/tmp/testbus-bench-fleet-control-plane.log", c.read_log("control-plane"));
        }
        out.push(r.with_context(|| format!("fleet of {n}"))?);
    }
    Ok(json!({ "results": out }))
}
