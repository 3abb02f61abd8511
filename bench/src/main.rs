//! testbus-bench: the end-to-end benchmarks of `hack/bench`, each against
//! its baseline in the same run. Every scenario starts a real control
//! plane and real agents in network namespaces (the test harness's
//! `Cluster`; root), prints one JSON object, and ends what it started.
//!
//!   testbus-bench SCENARIO [--smoke]
//!
//! Scenarios: run (one command on one host, against ssh and sh), start
//! (test start latency), throughput (processes/s over many agents), fanout
//! (watch delivery to simulated agents), output (stdout to the CLI), files
//! (a large file to many hosts, and again), idle (resident memory), pools
//! (libvirt guests: warm and cold starts, clean again, guests in parallel),
//! tls (against --insecure), dashboard (overview, live changes and metrics
//! at 10,000 hosts and 1,000 tests).
#![forbid(unsafe_code)]

mod fleet;

use anyhow::{bail, Context};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use testbus_client::Client;
use testbus_proto::states::{HostPhase, ProcessPhase, StepPhase};
use testbus_proto::{phase, Process, ProcessSpec, Resource, Test};
use testbus_tests::{manifest, percentile, rss_bytes, wait_for, Cluster};

/// p50, p99 and every sample (sorted), in milliseconds.
fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    json!({ "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99), "n": ms.len(), "samples_ms": ms })
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn timed(cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !st.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&st.stderr));
    }
    Ok(ms)
}

/// One command on one host: `testbusctl run --host H -- true` against ssh
/// (a fresh connection, and through a ControlMaster) and a local `sh -c
/// true`. All four run from the control plane's namespace; sshd runs in
/// the host's, as a user whose shell is /bin/sh (no rc files).
async fn run_true(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let n = if smoke { 3 } else { 100 };
    let mut c = Cluster::start(1).await;
    let dir = c.dir.path().to_path_buf();
    let user = "tbbench";
    if !Command::new("id").arg(user).stdout(Stdio::null()).stderr(Stdio::null()).status()?.success() {
        let st = Command::new("useradd").args(["-M", "-d", "/nonexistent", "-s", "/bin/sh", user]).status()?;
        anyhow::ensure!(st.success(), "useradd {user}");
    }
    // No password, but not locked: sshd refuses locked accounts.
    let st = Command::new("usermod").args(["-p", "*", user]).status()?;
    anyhow::ensure!(st.success(), "usermod {user}");
    for k in ["host_key", "id"] {
        let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(k)).status()?;
        anyhow::ensure!(st.success(), "ssh-keygen");
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    std::fs::create_dir_all("/run/sshd")?;
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!("Port 2222\nListenAddress 10.77.0.2\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile none\n"),
    )?;
    std::fs::write(
        dir.join("ssh_config"),
        format!("Host h0\n  HostName 10.77.0.2\n  Port 2222\n  User {user}\n  IdentityFile {d}/id\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"),
    )?;
    let sshd_config = dir.join("sshd_config").display().to_string();
    c.spawn_logged(Some("host-0"), "sshd", "/usr/sbin/sshd", &["-D", "-e", "-f", &sshd_config]);
    let ssh_config = dir.join("ssh_config").display().to_string();
    let master = format!("ControlPath={d}/cm");
    let ctl = testbus_tests::bin_dir().join("testbusctl");
    let in_cp = |program: &str| c.command_in("cp", Path::new(program));
    let ssh_fresh = || {
        let mut cmd = in_cp("ssh");
        cmd.args(["-F", &ssh_config, "h0", "true"]);
        cmd
    };
    let ssh_master = || {
        let mut cmd = in_cp("ssh");
        cmd.args([
            "-F",
            &ssh_config,
            "-o",
            "ControlMaster=auto",
            "-o",
            &master,
            "-o",
            "ControlPersist=300",
            "h0",
            "true",
        ]);
        cmd
    };
    let testbus = || {
        let mut cmd = c.command_in("cp", &ctl);
        cmd.args(["--server", "https://10.77.0.1:7780", "run", "--host", "host-0", "--", "true"]);
        cmd.env("TESTBUS_CONFIG", c.dir.path().join("admin.yaml"));
        cmd
    };
    let local = || {
        let mut cmd = in_cp("sh");
        cmd.args(["-c", "true"]);
        cmd
    };
    // Warm up: sshd answering, the master connection, the first claim.
    wait_for(Duration::from_secs(20), "sshd", || async { timed(&mut ssh_fresh()).ok() }).await;
    timed(&mut ssh_master())?;
    timed(&mut testbus())?;
    let ways: [(&str, &dyn Fn() -> Command); 4] =
        [("testbus", &testbus), ("ssh", &ssh_fresh), ("ssh_controlmaster", &ssh_master), ("local_sh", &local)];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    // Interleaved, so that machine noise hits every way alike.
    for _ in 0..n {
        for (i, (_, make)) in ways.iter().enumerate() {
            samples[i].push(timed(&mut make())?);
        }
    }
    let mut out = serde_json::Map::new();
    let mut med = Vec::new();
    for ((name, _), s) in ways.iter().zip(samples) {
        let v = summary(s);
        med.push(v["p50_ms"].as_f64().unwrap_or(0.0));
        out.insert(name.to_string(), v);
    }
    out.insert(
        "ratios".into(),
        json!({
            "testbus_over_controlmaster": med[0] / med[2],
            "ssh_fresh_over_testbus": med[1] / med[0],
        }),
    );
    Ok(serde_json::Value::Object(out))
}

/// Test start latency: a two-role test on three agents, from the create
/// call returning to its last process's start time (agents stamp it).
async fn start(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let n = if smoke { 5 } else { 200 };
    let c = Cluster::start(3).await;
    let client = c.client().await;
    let tests = client.api::<Test>();
    let procs = client.api::<Process>();
    let mut ms = Vec::new();
    for i in 0..n {
        let name = format!("start-{i}");
        let t: Test = testbus_proto::manifest::parse(
            "start.yaml",
            &format!(
                r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  hosts: [{{role: server}}, {{role: client, count: 2}}]
  steps: [{{name: s, on: [server, client], argv: ["true"]}}]
"#
            ),
        )?
        .into_iter()
        .find_map(|o| match o {
            testbus_proto::Object::Test(t) => Some(t),
            _ => None,
        })
        .context("the manifest has a test")?;
        tests.create(t).await?;
        let created = SystemTime::now();
        let done = wait_for(Duration::from_secs(30), "the test to finish", || async {
            let t = tests.get(&name).await.ok()?;
            phase::test_terminal(&t.status().phase).then_some(t)
        })
        .await;
        anyhow::ensure!(done.status().phase == ProcessPhase::Succeeded, "{name}: {:?}", done.status());
        let (ps, _) = procs.list("", &format!("spec.test={name}")).await?;
        let last = ps
            .iter()
            .filter_map(|p| testbus_proto::time::parse(&p.status().start_time))
            .max()
            .context("start times")?;
        ms.push(last.duration_since(created).unwrap_or_default().as_secs_f64() * 1e3);
        tests.delete(&name).await?;
    }
    Ok(json!({ "runs": n, "to_last_running": summary(ms) }))
}

/// Processes completed end to end per second: one test over every agent
/// with parallel steps of `true`, from create to the final status.
async fn throughput(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let (agents, steps, rounds) = if smoke { (3, 2, 1) } else { (50, 20, 5) };
    // TESTBUS_BENCH_AGENT_ARGS: extra agent flags, for A/B runs (e.g.
    // "--containment process-group").
    let extra = std::env::var("TESTBUS_BENCH_AGENT_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let c = Cluster::start_with(agents, &extra).await;
    throughput_on(&c, agents, steps, rounds).await
}

/// Rounds of one test over every agent of `c` with `steps` parallel steps
/// of `true`: processes per second (the median round), and CPU.
async fn throughput_on(c: &Cluster, agents: usize, steps: usize, rounds: usize) -> anyhow::Result<serde_json::Value> {
    let client = c.client().await;
    // An agent's CPU includes its keeper's (the parent of its processes).
    let cpu = |c: &Cluster| {
        let keepers = |i: usize| -> f64 {
            let dir = c.dir.path().join(&c.hosts[i]);
            testbus_tests::keeper_pids(&dir).into_iter().map(|p| cpu_seconds(p as u32)).sum()
        };
        let agents: f64 = (0..agents).map(|i| cpu_seconds(c.agent_pid(i)) + keepers(i)).sum();
        (cpu_seconds(c.control_plane_pid()), agents)
    };
    // Rounds on the same cluster: one run's figure moves by a third from
    // run to run on this machine, so the median of several is reported.
    let mut runs = Vec::new();
    for round in 0..rounds {
        let name = format!("flood-{round}");
        let mut m = format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  hosts: [{{role: w, count: {agents}}}]
  steps:
"#
        );
        for s in 0..steps {
            m.push_str(&format!("    - {{name: s{s}, on: [w], argv: [\"true\"]}}\n"));
        }
        let path = manifest(c, &format!("{name}.yaml"), &m);
        let (cp0, ag0) = cpu(c);
        let t = Instant::now();
        let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "600s"]);
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(out.code == 0, "{out:?}");
        let (cp1, ag1) = cpu(c);
        let (ps, _) = client.api::<Process>().list("", &format!("spec.test={name}")).await?;
        let done = ps.iter().filter(|p| p.status().phase == ProcessPhase::Succeeded).count();
        anyhow::ensure!(done == agents * steps, "{done} of {} processes succeeded", agents * steps);
        runs.push(json!({
            "processes": done, "seconds": secs, "processes_per_s": done as f64 / secs,
            "cp_cpu_seconds": cp1 - cp0, "agents_cpu_seconds": ag1 - ag0,
        }));
    }
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| {
        runs[a]["processes_per_s"]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&runs[b]["processes_per_s"].as_f64().unwrap_or(0.0))
    });
    let median = runs[order[order.len() / 2]].clone();
    let mut out = json!({ "agents": agents, "rounds": runs });
    for (k, v) in median.as_object().into_iter().flatten() {
        out[k] = v.clone();
    }
    Ok(out)
}

/// `testbusctl run --host H -- true` under each containment the agent
/// offers, on the default footing otherwise (TLS, network namespaces, the
/// CLI run from the control plane's): what containment costs one command,
/// and the comparison behind issue 33's two figures (the bench's agents
/// keep the machine's cgroups in view, and contain in cgroups; an agent
/// started through `ip netns exec` sees a /sys of its own, no cgroups, and
/// falls back to process groups).
async fn run_containment(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let n = if smoke { 3 } else { 60 };
    let ctl = testbus_tests::bin_dir().join("testbusctl");
    let mut out = serde_json::Map::new();
    for containment in ["cgroup", "process-group", "pid-namespace"] {
        let c = Cluster::start_with(1, &["--containment", containment]).await;
        let run = || {
            let mut cmd = c.command_in("cp", &ctl);
            cmd.args(["--server", "https://10.77.0.1:7780", "run", "--host", "host-0", "--", "true"]);
            cmd.env("TESTBUS_CONFIG", c.dir.path().join("admin.yaml"));
            cmd
        };
        timed(&mut run())?;
        let mut ms = Vec::new();
        for _ in 0..n {
            ms.push(timed(&mut run())?);
        }
        out.insert(containment.into(), summary(ms));
    }
    Ok(serde_json::Value::Object(out))
}

/// TLS against `--insecure`, on the same footing (every process on
/// loopback, one cluster each): `testbusctl run -- true` through the TCP
/// listener (a new connection, and with TLS a handshake, per command), and
/// throughput (agents hold their connections: one handshake each).
async fn tls(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let n = if smoke { 3 } else { 60 };
    let (agents, steps, rounds) = if smoke { (2, 2, 1) } else { (10, 20, 3) };
    let ctl = testbus_tests::bin_dir().join("testbusctl");
    let mut out = serde_json::Map::new();
    for secure in [false, true] {
        let c = Cluster::start_loopback(agents, secure).await;
        let config = c.dir.path().join("admin.yaml");
        let run = || {
            let mut cmd = Command::new(&ctl);
            cmd.args(["--server", &c.agent_server, "run", "--host", "host-0", "--", "true"]);
            cmd.env("TESTBUS_CONFIG", if secure { config.as_os_str() } else { std::ffi::OsStr::new("") });
            cmd
        };
        timed(&mut run())?;
        let mut ms = Vec::new();
        for _ in 0..n {
            ms.push(timed(&mut run())?);
        }
        let flood = throughput_on(&c, agents, steps, rounds).await?;
        let name = if secure { "tls" } else { "insecure" };
        out.insert(name.into(), json!({ "run_true": summary(ms), "throughput": flood }));
    }
    let p50 = |k: &str| out[k]["run_true"]["p50_ms"].as_f64().unwrap_or(0.0);
    let tput = |k: &str| out[k]["throughput"]["processes_per_s"].as_f64().unwrap_or(0.0);
    let ratios = json!({
        "run_true_tls_over_insecure": p50("tls") / p50("insecure"),
        "throughput_insecure_over_tls": tput("insecure") / tput("tls"),
    });
    out.insert("ratios".into(), ratios);
    Ok(serde_json::Value::Object(out))
}

/// Watch delivery to simulated agents: N watchers of Processes, each for
/// its own host (as agents watch), over N/100 connections; Processes are
/// created one at a time for random hosts and timed to their watcher.
async fn fanout(smoke: bool) -> anyhow::Result<serde_json::Value> {
    use futures::StreamExt;
    let sizes: Vec<usize> = if smoke { vec![10, 100] } else { vec![100, 1_000, 10_000] };
    let events = if smoke { 20 } else { 300 };
    let mut out = Vec::new();
    for &n in &sizes {
        let c = Cluster::start_full(0, &[], &["--no-controllers"]).await;
        let cp = c.control_plane_pid();
        let base = rss_bytes(cp);
        let conns = n.div_ceil(100);
        let mut clients = Vec::new();
        for _ in 0..conns {
            clients.push(Client::connect(&c.server).await?);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
        for i in 0..n {
            let api = clients[i % conns].api::<Process>();
            let tx = tx.clone();
            let mut w = api.watch("", "", &format!("spec.hostName=sim-{i}")).await?;
            tokio::spawn(async move {
                while let Some(Ok(ev)) = w.next().await {
                    if ev.object.is_some() && tx.send((i, Instant::now())).is_err() {
                        return;
                    }
                }
            });
        }
        let rss_watching = rss_bytes(cp);
        let api = clients[0].api::<Process>();
        let mut ms = Vec::new();
        for k in 0..events {
            let target = rand::random_range(0..n);
            let p = Process {
                metadata: Some(testbus_proto::ObjectMeta { name: format!("p-{k}"), ..Default::default() }),
                spec: Some(ProcessSpec {
                    host_name: format!("sim-{target}"),
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            let t = Instant::now();
            api.create(p).await?;
            let (who, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?.context("watchers gone")?;
            anyhow::ensure!(who == target, "the event reached sim-{who}, not sim-{target}");
            ms.push(at.duration_since(t).as_secs_f64() * 1e3);
        }
        // Nobody else heard anything.
        tokio::time::sleep(Duration::from_millis(100)).await;
        anyhow::ensure!(rx.try_recv().is_err(), "an event reached a watcher of another host");
        out.push(json!({
            "agents": n,
            "delivery": summary(ms),
            "cp_rss_bytes_idle": base,
            "cp_rss_bytes_watching": rss_watching,
            "cp_rss_bytes_after": rss_bytes(cp),
        }));
    }
    Ok(json!({ "events_per_size": events, "results": out }))
}

/// MB/s from a process's stdout to the CLI (`run` streams the output as
/// `logs -f` does), to /dev/null.
async fn output(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let bytes: u64 = if smoke { 16 << 20 } else { 1 << 30 };
    let c = Cluster::start_full(1, &[], &["--max-output-bytes", &(2u64 << 30).to_string()]).await;
    let ctl = testbus_tests::bin_dir().join("testbusctl");
    let n = bytes.to_string();
    let mut cmd = Command::new(&ctl);
    cmd.env("TESTBUS_SERVER", &c.server).args(["run", "--host", "host-0", "--", "head", "-c", &n, "/dev/zero"]);
    let ms = timed(&mut cmd)?;
    // The same bytes read again from the server, as `logs` does.
    let client = c.client().await;
    let (ps, _) = client.api::<Process>().list("", "").await?;
    let p = ps.first().context("the process")?;
    anyhow::ensure!(p.status().stdout_bytes == bytes, "{:?}", p.status());
    let mut cmd = Command::new(&ctl);
    cmd.env("TESTBUS_SERVER", &c.server).args(["logs", &format!("process/{}", p.name())]);
    let logs_ms = timed(&mut cmd)?;
    let mb = bytes as f64 / 1e6;
    Ok(json!({ "bytes": bytes, "run_mb_per_s": mb / (ms / 1e3), "logs_mb_per_s": mb / (logs_ms / 1e3) }))
}

/// A large file to many hosts, then a second test with the same file:
/// what moved each time (uploads from the CLI, downloads by agents).
async fn files(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let (hosts, size) = if smoke { (2, 5usize << 20) } else { (8, 100usize << 20) };
    let c = Cluster::start(hosts).await;
    let data: Vec<u8> = (0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    std::fs::write(c.dir.path().join("big.bin"), &data)?;
    // Agents log each blob they fetch; this file is the only blob.
    let fetched = |c: &Cluster| -> u64 {
        let fetches: usize = (0..hosts).map(|i| c.read_log(&format!("host-{i}")).matches("fetched blob").count()).sum();
        fetches as u64 * size as u64
    };
    let mut rounds = Vec::new();
    for round in 0..2 {
        let name = format!("files-{round}");
        let path = manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  files: [{{source: big.bin, path: big.bin}}]
  hosts: [{{role: h, count: {hosts}}}]
  steps: [{{name: s, on: [h], argv: [sha256sum, big.bin]}}]
"#
            ),
        );
        let before = fetched(&c);
        let t = Instant::now();
        let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "600s"]);
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(out.code == 0, "{out:?}");
        rounds.push(json!({ "seconds": secs, "bytes_to_agents": fetched(&c) - before }));
    }
    Ok(json!({ "hosts": hosts, "file_bytes": size, "rounds": rounds }))
}

/// Resident memory of an idle control plane and agent, and of the agent's
/// keeper once it has run a process.
async fn idle(_smoke: bool) -> anyhow::Result<serde_json::Value> {
    let c = Cluster::start(1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cp, agent) = (rss_bytes(c.control_plane_pid()), rss_bytes(c.agent_pid(0)));
    let out = c.ctl(&["run", "--host", "host-0", "--", "true"]);
    anyhow::ensure!(out.code == 0, "{out:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keepers = testbus_tests::keeper_pids(&c.dir.path().join(&c.hosts[0]));
    let keeper: u64 = keepers.iter().map(|&p| rss_bytes(p as u32)).sum();
    Ok(json!({ "cp_rss_bytes": cp, "agent_rss_bytes": agent, "keeper_rss_bytes": keeper }))
}

/// Waiting `recv`s against a store full of other tests' Processes: the
/// cost of a write while they wait, the control plane's CPU while nothing
/// happens, and how long one `send` takes to wake them all.
/// The scheduler with thousands of tests that cannot run waiting: the
/// control plane's CPU while nothing changes, how long a runnable test
/// then takes from create to Running, and how long deleting all of them
/// takes until none is stored; at 1,000, 5,000 and 20,000 waiting tests.
async fn queue(smoke: bool) -> anyhow::Result<serde_json::Value> {
    use futures::StreamExt;
    let sizes: &[usize] = if smoke { &[100] } else { &[1000, 5000, 20_000] };
    let mut rows = Vec::new();
    for &n in sizes {
        let c = Cluster::start(1).await;
        let cp = c.control_plane_pid();
        let client = Client::connect(&c.server).await?;
        let tests = client.api::<Test>();
        let waiting = |i: usize| testbus_tests::test_needing(&format!("w-{i}"), &format!("nfs-sever-{}", i % 50));
        let created = Instant::now();
        let mut made = futures::stream::iter(0..n).map(|i| tests.create(waiting(i))).buffer_unordered(32);
        while let Some(r) = made.next().await {
            r?;
        }
        let create_s = created.elapsed().as_secs_f64();
        // Every one says why it waits: the scheduler has been over them.
        let settled = Instant::now();
        wait_for(Duration::from_secs(600), "every waiting test to say why", || async {
            let (ts, _) = tests.list("", "").await.ok()?;
            ts.iter().all(|t| t.status().conditions.iter().any(|c| c.r#type == "Scheduled")).then_some(())
        })
        .await;
        let settle_s = settled.elapsed().as_secs_f64();
        let cpu0 = cpu_seconds(cp);
        let idle = Duration::from_secs(if smoke { 1 } else { 5 });
        tokio::time::sleep(idle).await;
        let idle_cpu = (cpu_seconds(cp) - cpu0) / idle.as_secs_f64();
        // A test that can run, behind all of them.
        let started = Instant::now();
        let out = c.ctl(&["run", "--host", "host-0", "--", "true"]);
        anyhow::ensure!(out.code == 0, "run behind {n} waiting tests: {out:?}");
        let runnable_s = started.elapsed().as_secs_f64();
        // Deleting all of them.
        let deleting = Instant::now();
        let names: Vec<String> = (0..n).map(|i| format!("w-{i}")).collect();
        let mut gone = futures::stream::iter(&names).map(|name| tests.delete(name)).buffer_unordered(32);
        while let Some(r) = gone.next().await {
            r?;
        }
        wait_for(Duration::from_secs(600), "every waiting test to be gone", || async {
            let (ts, _) = tests.list("", "").await.ok()?;
            ts.iter().all(|t| !t.name().starts_with("w-")).then_some(())
        })
        .await;
        let delete_s = deleting.elapsed().as_secs_f64();
        // Memory given back once they are gone (the watch cache's ring is
        // bounded by bytes; the allocator returns freed pages).
        tokio::time::sleep(Duration::from_secs(if smoke { 1 } else { 5 })).await;
        let rss_after_mib = rss_bytes(cp) as f64 / f64::from(1 << 20);
        eprintln!(
            "queue {n}: settled {settle_s:.1}s, idle cpu {idle_cpu:.3}, runnable {runnable_s:.3}s, deleted {delete_s:.1}s, rss after {rss_after_mib:.0} MiB"
        );
        rows.push(json!({
            "waiting": n, "create_s": create_s, "settle_s": settle_s, "idle_cpu_cores": idle_cpu,
            "runnable_start_s": runnable_s, "delete_all_s": delete_s, "cp_rss_mib_after_delete": rss_after_mib,
        }));
    }
    Ok(json!({ "rows": rows }))
}

async fn sync_waiters(smoke: bool) -> anyhow::Result<serde_json::Value> {
    use testbus_proto::sync_client::SyncClient;
    let (waiters, stored) = if smoke { (10, 100) } else { (200, 3000) };
    let c = Cluster::start_full(0, &[], &["--no-controllers"]).await;
    let cp = c.control_plane_pid();
    let client = Client::connect(&c.server).await?;
    let t = Test {
        metadata: Some(testbus_proto::ObjectMeta { name: "waits".into(), ..Default::default() }),
        spec: Some(testbus_proto::TestSpec {
            hosts: vec![testbus_proto::HostRequirement { role: "r".into(), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = client.api::<Test>().create(t).await?;
    let procs = client.api::<Process>();
    for i in 0..stored {
        let mine = i < waiters;
        let p = Process {
            metadata: Some(testbus_proto::ObjectMeta { name: format!("p-{i}"), ..Default::default() }),
            spec: Some(ProcessSpec {
                host_name: "nowhere".into(),
                test: if mine { "waits".into() } else { format!("other-{i}") },
                test_uid: if mine { t.meta().uid.clone() } else { format!("other-{i}") },
                role: "r".into(),
                argv: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        procs.create(p).await?;
    }
    let mut calls = Vec::new();
    for i in 0..waiters {
        let mut sync = SyncClient::new(client.channel());
        calls.push(tokio::spawn(async move {
            let req = testbus_proto::RecvRequest {
                process: format!("p-{i}"),
                key: "go".into(),
                timeout: "600s".into(),
                ..Default::default()
            };
            sync.recv(req).await.map(|_| Instant::now())
        }));
    }
    // Let them all start waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = cpu_seconds(cp);
    let idle = Duration::from_secs(if smoke { 1 } else { 3 });
    tokio::time::sleep(idle).await;
    let idle_cpu = (cpu_seconds(cp) - cpu0) / idle.as_secs_f64();
    let mut ms = Vec::new();
    for k in 0..if smoke { 10 } else { 50 } {
        let name = format!("p-{}", waiters + k % (stored - waiters));
        let start = Instant::now();
        procs
            .patch_status(&name, |p| {
                p.status_mut().message = format!("write {k}");
                true
            })
            .await?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let sent = Instant::now();
    let send = testbus_proto::SendRequest { process: "p-0".into(), key: "go".into(), value: b"1".to_vec() };
    SyncClient::new(client.channel()).send(send).await?;
    let mut woke = Vec::new();
    for call in calls {
        let at = call.await?.context("recv")?;
        woke.push(at.duration_since(sent).as_secs_f64() * 1e3);
    }
    woke.sort_by(f64::total_cmp);
    Ok(json!({
        "waiters": waiters,
        "stored_processes": stored,
        "write": summary(ms),
        "idle_cpu_cores": idle_cpu,
        "wake_all_ms": woke.last().copied().unwrap_or_default(),
    }))
}

/// Watches that can never deliver (from a revision the store has not
/// reached), opened and left open: what they cost the control plane.
async fn future_watches(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let n = if smoke { 500 } else { 20_000 };
    let c = Cluster::start_full(0, &[], &["--no-controllers"]).await;
    let cp = c.control_plane_pid();
    let client = Client::connect(&c.server).await?;
    let before = rss_bytes(cp);
    let api = client.api::<Test>();
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match api.watch("99999999999", "", "").await {
            Ok(w) => open.push(w),
            Err(_) => refused += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(cp);
    // Watches that could deliver but never do (a selector nothing
    // matches), opened and then cancelled, a connection's worth at a time:
    // the hub used to keep each until an event for it came.
    let mut abandoned = 0;
    while abandoned < n {
        let mut batch = Vec::new();
        for _ in 0..1000.min(n - abandoned) {
            batch.push(api.watch("", "bench=never", "").await?);
        }
        abandoned += batch.len();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_abandoned = rss_bytes(cp);
    Ok(json!({
        "watches": n,
        "refused": refused,
        "rss_before_mib": before as f64 / (1 << 20) as f64,
        "rss_after_mib": after as f64 / (1 << 20) as f64,
        "abandoned": abandoned,
        "rss_after_abandoned_mib": after_abandoned as f64 / (1 << 20) as f64,
    }))
}

/// A test of `count` hosts with capability `cap`, one step of `true` on
/// each.
fn claim_test(name: &str, cap: &str, count: u32) -> anyhow::Result<Test> {
    let text = format!(
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  timeout: 10m\n  \
         hosts: [{{role: m, capabilities: [{cap}], count: {count}}}]\n  steps: [{{name: s, on: [m], argv: [\"true\"]}}]\n"
    );
    testbus_proto::manifest::parse("test.yaml", &text)?
        .into_iter()
        .find_map(|o| match o {
            testbus_proto::Object::Test(t) => Some(t),
            _ => None,
        })
        .context("the manifest has a test")
}

/// Milliseconds from creating `t` until every process of it has started
/// (Running or past it), by this machine's clock (a guest's clock is set
/// to the second only); then the test is deleted.
async fn time_to_running(client: &Client, t: Test) -> anyhow::Result<f64> {
    let (tests, procs) = (client.api::<Test>(), client.api::<Process>());
    let (name, want) =
        (t.name().to_string(), t.spec().hosts.iter().map(|h| h.count.unwrap_or(1)).sum::<u32>() as usize);
    let started = Instant::now();
    tests.create(t).await?;
    wait_for(Duration::from_secs(600), "every process of the test to start", || async {
        let (ps, _) = procs.list("", &format!("spec.test={name}")).await.ok()?;
        let up =
            ps.iter().filter(|p| !p.status().phase.is_empty() && p.status().phase != ProcessPhase::Pending).count();
        (up >= want).then_some(())
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let done = wait_for(Duration::from_secs(120), "the test to finish", || async {
        let t = tests.get(&name).await.ok()?;
        phase::test_terminal(&t.status().phase).then_some(t)
    })
    .await;
    let st = done.status();
    anyhow::ensure!(st.phase == StepPhase::Succeeded, "{name}: {}: {}", st.phase, st.message);
    tests.delete(&name).await?;
    Ok(ms)
}

/// Waits until `n` guests of `pool` are Ready and clean (free for a test).
async fn clean_guests(client: &Client, pool: &str, n: usize) -> Vec<String> {
    let hosts = client.api::<testbus_proto::Host>();
    wait_for(Duration::from_secs(600), "the pool's guests to be clean", || async {
        let (hs, _) = hosts.list(&format!("{}={pool}", testbus_proto::pool::POOL_LABEL), "").await.ok()?;
        let free: Vec<String> = hs
            .iter()
            .filter(|h| {
                h.status().phase == HostPhase::Ready
                    && h.status().claim.is_none()
                    && h.meta().annotations.get(testbus_proto::pool::CLEAN_ANNOTATION).is_some_and(|v| v == "true")
            })
            .map(|h| h.name().to_string())
            .collect();
        (free.len() >= n).then_some(free)
    })
    .await
}

/// HostPools on libvirt (QEMU under TCG here): a test's start on a warm
/// pool and from zero guests, against the same test on a bare agent;
/// release to clean again, against a fresh boot; 1, 4, 8 guests made at
/// once, against one.
async fn pools(smoke: bool) -> anyhow::Result<serde_json::Value> {
    if !testbus_tests::libvirt::ensure() {
        bail!("libvirtd cannot be had here");
    }
    let (rounds, sizes): (usize, &[u32]) = if smoke { (1, &[1, 2]) } else { (5, &[1, 4, 8]) };
    let image = testbus_tests::libvirt::image();
    let c = Cluster::start(1).await;
    let client = c.client().await;
    let pools = client.api::<testbus_proto::HostPool>();
    let apply_pool = |name: &str, extra: &str| {
        let p = manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: {name}}}\nspec:\n  provider: libvirt\n  \
                 image: {}\n  capabilities: [{name}]\n  max: 8\n  idleTimeout: 1h\n{extra}",
                image.display()
            ),
        );
        let out = c.ctl(&["apply", "-f", &p]);
        anyhow::ensure!(out.code == 0, "apply {name}: {out:?}");
        Ok(())
    };
    let delete_pool = |name: String| {
        let pools = &pools;
        async move {
            pools.delete(&name).await?;
            wait_for(Duration::from_secs(300), "the pool and its guests to go", || async {
                let gone = pools.get_opt(&name).await.ok()?.is_none();
                (gone && testbus_tests::libvirt::domains(&format!("{name}-")).is_empty()).then_some(())
            })
            .await;
            anyhow::Ok(())
        }
    };
    let _leftovers = testbus_tests::libvirt::Leftovers { prefix: "bp".into(), networks: vec![] };

    // A bare agent: the baseline of a test's start.
    let mut bare = Vec::new();
    for i in 0..rounds.max(3) {
        bare.push(time_to_running(&client, claim_test(&format!("bare-{i}"), "linux", 1)?).await?);
    }

    // One guest: from zero (a fresh boot), then warm, cleaned between.
    apply_pool("bp-warm", "")?;
    let cold = time_to_running(&client, claim_test("cold", "bp-warm", 1)?).await?;
    let (mut warm, mut clean_again) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        // Released when the test before ended: clean again from then.
        let released = Instant::now();
        clean_guests(&client, "bp-warm", 1).await;
        clean_again.push(released.elapsed().as_secs_f64() * 1e3);
        warm.push(time_to_running(&client, claim_test(&format!("warm-{i}"), "bp-warm", 1)?).await?);
    }
    delete_pool("bp-warm".into()).await?;

    // k guests made at once for one test, from zero each time.
    let mut parallel = serde_json::Map::new();
    for &k in sizes {
        let name = format!("bp-par{k}");
        apply_pool(&name, "")?;
        let ms = time_to_running(&client, claim_test(&format!("par-{k}"), &name, k)?).await?;
        parallel.insert(k.to_string(), json!(ms));
        delete_pool(name).await?;
    }
    let bare = summary(bare);
    let warm = summary(warm);
    Ok(json!({
        "bare_agent_start": bare,
        "warm_pool_start": warm,
        "cold_pool_start_ms": cold,
        "clean_again": summary(clean_again),
        "fresh_boot_ms": cold,
        "parallel_ms": parallel,
    }))
}

/// HostPools of podman containers: a test's start on a warm pool against
/// a bare agent, release to clean again (a new container), 4 containers
/// from zero for one test.
async fn containers(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let Some(storage) = testbus_tests::podman::PodmanStorage::new().await else {
        bail!("podman needs root");
    };
    let rounds = if smoke { 2 } else { 10 };
    let c = Cluster::start_full(1, &[], &["--podman-storage", &storage.path().display().to_string()]).await;
    let client = c.client().await;
    let pools = client.api::<testbus_proto::HostPool>();
    let apply_pool = |name: &str| {
        let p = manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: {name}}}\nspec:\n  provider: podman\n  \
                 image: {}\n  capabilities: [{name}]\n  max: 8\n  idleTimeout: 1h\n",
                testbus_tests::podman::IMAGE
            ),
        );
        let out = c.ctl(&["apply", "-f", &p]);
        anyhow::ensure!(out.code == 0, "apply {name}: {out:?}");
        Ok(())
    };
    let delete_pool = |name: String| {
        let (pools, storage) = (&pools, &storage);
        async move {
            pools.delete(&name).await?;
            wait_for(Duration::from_secs(120), "the pool and its containers to go", || async {
                let gone = pools.get_opt(&name).await.ok()?.is_none();
                (gone && storage.containers(&format!("{name}-")).is_empty()).then_some(())
            })
            .await;
            anyhow::Ok(())
        }
    };
    let mut bare = Vec::new();
    for i in 0..rounds {
        bare.push(time_to_running(&client, claim_test(&format!("bare-{i}"), "linux", 1)?).await?);
    }
    apply_pool("bc-warm")?;
    let cold = time_to_running(&client, claim_test("cold", "bc-warm", 1)?).await?;
    let (mut warm, mut clean_again) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let released = Instant::now();
        clean_guests(&client, "bc-warm", 1).await;
        clean_again.push(released.elapsed().as_secs_f64() * 1e3);
        warm.push(time_to_running(&client, claim_test(&format!("warm-{i}"), "bc-warm", 1)?).await?);
    }
    delete_pool("bc-warm".into()).await?;
    apply_pool("bc-four")?;
    let four = time_to_running(&client, claim_test("four", "bc-four", 4)?).await?;
    delete_pool("bc-four".into()).await?;
    let (bare, warm) = (summary(bare), summary(warm));
    let ratio = warm["p50_ms"].as_f64().unwrap_or(0.0) / bare["p50_ms"].as_f64().unwrap_or(1.0).max(1e-9);
    Ok(json!({
        "bare_agent_start": bare,
        "warm_pool_start": warm,
        "warm_over_bare": ratio,
        "cold_pool_start_ms": cold,
        "clean_again": summary(clean_again),
        "four_from_zero_ms": four,
    }))
}

/// One HTTP/1.1 GET on a new connection to `addr` (host:port): the status,
/// the body, and the milliseconds to its last byte.
async fn http_get(addr: &str, path: &str, headers: &str) -> anyhow::Result<(u16, String, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    Ok((status, text, ms))
}

/// The dashboard and the metrics at scale: hosts and tests written
/// straight to the API (no agents, no controllers; the fan-out tool's way
/// of simulating a lab), then the overview's server time, the delay from
/// a stored change to its `change` event and to the page fragment the
/// browser then fetches, and a metrics scrape.
async fn dashboard(smoke: bool) -> anyhow::Result<serde_json::Value> {
    use futures::StreamExt;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (hosts, tests, n) = if smoke { (100, 10, 3) } else { (10_000, 1_000, 30) };
    let c = Cluster::start_loopback_insecure(0, &["--no-controllers"]).await;
    let addr = c.agent_server.trim_start_matches("http://").to_string();
    let client = Client::connect(&c.server).await?;
    let t = Instant::now();
    let host_api = client.api::<testbus_proto::Host>();
    futures::stream::iter(0..hosts)
        .map(|i| {
            let api = host_api.clone();
            async move {
                let h = testbus_proto::Host {
                    metadata: Some(testbus_proto::ObjectMeta { name: format!("sim-{i:05}"), ..Default::default() }),
                    spec: Some(testbus_proto::HostSpec { capabilities: vec!["linux".into()], ..Default::default() }),
                    ..Default::default()
                };
                api.create(h).await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let test_api = client.api::<Test>();
    let test = |i: usize| {
        let doc = format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: t-{i:04}, labels: {{suite: s{}}}}}\nspec:\n  hosts: [{{role: a}}]\n  steps: [{{name: s, on: [a], argv: [\"true\"]}}]\n",
            i % 10
        );
        testbus_proto::manifest::parse("dashboard.yaml", &doc)?
            .into_iter()
            .find_map(|o| match o {
                testbus_proto::Object::Test(t) => Some(t),
                _ => None,
            })
            .context("the manifest has a test")
    };
    for i in 0..tests {
        test_api.create(test(i)?).await?;
    }
    let populate_s = t.elapsed().as_secs_f64();
    let mut overview = Vec::new();
    let mut size = 0;
    for _ in 0..n {
        let (status, body, ms) = http_get(&addr, "/", "").await?;
        anyhow::ensure!(status == 200, "GET / answered {status}");
        size = body.len();
        overview.push(ms);
    }
    let mut scrape = Vec::new();
    for _ in 0..n {
        let (status, _, ms) = http_get(&addr, "/metrics", "").await?;
        anyhow::ensure!(status == 200, "GET /metrics answered {status}");
        scrape.push(ms);
    }
    // The events of the overview, read line by line.
    let mut events = tokio::net::TcpStream::connect(&addr).await?;
    events.write_all(format!("GET /events?page=overview HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut lines = tokio::io::BufReader::new(events).lines();
    // The response head ends at its first empty line.
    while !lines.next_line().await?.context("the event stream ended")?.is_empty() {}
    let (mut to_event, mut to_visible) = (Vec::new(), Vec::new());
    for k in 0..n {
        let t = Instant::now();
        test_api.create(test(tests + k)?).await?;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await??
                .context("the event stream ended")?;
            if line.contains("event: change") {
                break;
            }
        }
        to_event.push(t.elapsed().as_secs_f64() * 1e3);
        let (status, _, _) = http_get(&addr, "/", "x-testbus-fragment: main\r\n").await?;
        anyhow::ensure!(status == 200, "the fragment answered {status}");
        to_visible.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(json!({
        "hosts": hosts,
        "tests": tests,
        "populate_s": populate_s,
        "overview_bytes": size,
        "overview": summary(overview),
        "change_to_event": summary(to_event),
        "change_to_fragment": summary(to_visible),
        "metrics_scrape": summary(scrape),
    }))
}

/// The Python client (issue 30): `host.run(["true"])` over a held
/// connection, sequentially and 1,000 at once from one process, against
/// `testbusctl run -- true` in the same run (interleaved with the
/// sequential samples' collection, on one TLS cluster, from the control
/// plane's namespace as the `run` scenario's commands).
async fn python(smoke: bool) -> anyhow::Result<serde_json::Value> {
    let n = if smoke { 10 } else { 1000 };
    // The agent's default lease (the harness's 2 s is for fast tests: a
    // thousand processes started at once outlast it in a debug build).
    let mut c = Cluster::start_with(1, &["--lease-duration", "10s"]).await;
    c.ctl_node = Some("cp".into());
    let root = testbus_tests::repo_root();
    let py = testbus_tests::python_venv("python-venv-bench", false);
    let mut admin = testbus_pki::ClientFile::load(&c.dir.path().join("admin.yaml"))?;
    admin.server = "https://10.77.0.1:7780".into();
    let config = c.dir.path().join("python.yaml");
    admin.save(&config)?;
    let out = c
        .command_in("cp", &py)
        .arg(root.join("bench/python/run_true.py"))
        .arg(n.to_string())
        .env("TESTBUS_CONFIG", &config)
        .env_remove("TESTBUS_SERVER")
        .output()?;
    anyhow::ensure!(out.status.success(), "run_true.py: {}", String::from_utf8_lossy(&out.stderr));
    let py_result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // The same command through the CLI, on the same cluster.
    let ctl = testbus_tests::bin_dir().join("testbusctl");
    let mut ctl_ms = Vec::new();
    for _ in 0..(if smoke { 5 } else { 100 }) {
        let mut cmd = c.command_in("cp", &ctl);
        cmd.args(["--server", "https://10.77.0.1:7780", "run", "--host", "host-0", "--", "true"]);
        cmd.env("TESTBUS_CONFIG", c.dir.path().join("admin.yaml"));
        ctl_ms.push(timed(&mut cmd)?);
    }
    let ctl = summary(ctl_ms);
    let ratio = py_result["sequential"]["p50_ms"].as_f64().unwrap_or(0.0) / ctl["p50_ms"].as_f64().unwrap_or(1.0);
    Ok(json!({ "python": py_result, "testbusctl_run": ctl, "python_over_ctl_run": ratio }))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    if !testbus_tests::is_root() {
        eprintln!("testbus-bench: needs root (network namespaces)");
        std::process::exit(2);
    }
    let r = match args.first().map(String::as_str) {
        Some("run") => run_true(smoke).await,
        Some("containment") => run_containment(smoke).await,
        Some("start") => start(smoke).await,
        Some("throughput") => throughput(smoke).await,
        Some("fanout") => fanout(smoke).await,
        Some("output") => output(smoke).await,
        Some("files") => files(smoke).await,
        Some("idle") => idle(smoke).await,
        Some("sync") => sync_waiters(smoke).await,
        Some("watches") => future_watches(smoke).await,
        Some("pools") => pools(smoke).await,
        Some("containers") => containers(smoke).await,
        Some("tls") => tls(smoke).await,
        Some("dashboard") => dashboard(smoke).await,
        Some("queue") => queue(smoke).await,
        Some("python") => python(smoke).await,
        Some("fleet") => fleet::fleet(smoke).await,
        _ => {
            eprintln!(
                "usage: testbus-bench run|containment|start|throughput|fanout|fleet|output|files|idle|sync|watches|pools|containers|tls|dashboard|queue|python [--smoke]"
            );
            std::process::exit(2);
        }
    };
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("testbus-bench: {e:#}");
            std::process::exit(1);
        }
    }
}
