//! Replicas: two control planes on one three-member etcd cluster, inside
//! network namespaces. Agents and the CLI are given both addresses and fail
//! over between them; blobs and output are readable from either replica.
use std::path::PathBuf;
use std::time::Duration;
use testbus_client::Client;
use testbus_proto::{blob, Host, HostPool, Process, Resource, Test};
use testbus_tests::{bin_dir, libvirt, manifest, needs_root, wait_for, Cluster};

const A: &str = "https://10.77.0.1:7780";
const B: &str = "https://10.77.0.1:7781";
const BOTH: &str = "https://10.77.0.1:7780,https://10.77.0.1:7781";

fn leads(log: &str) -> bool {
    log.contains("elected leader")
}

/// Replica A (the harness's control plane, which leads) and replica B on a
/// three-member etcd; agents given both addresses, A first; testbusctl runs
/// in host-0's namespace so that it reaches both. Returns B's socket.
async fn start_replicas(hosts: usize) -> (Cluster, PathBuf) {
    start_replicas_with(hosts, "testbus-control-plane", &[]).await
}

/// [`start_replicas`], replica B started from `b_program` (a path, or the
/// workspace's binary), the agents with `agent_args` too.
async fn start_replicas_with(hosts: usize, b_program: &str, agent_args: &[&str]) -> (Cluster, PathBuf) {
    let mut c = Cluster::start_on_etcd(hosts, 3).await;
    wait_for(Duration::from_secs(20), "replica A to lead", || async {
        leads(&c.read_log("control-plane")).then_some(())
    })
    .await;
    let url = c.etcd.as_ref().unwrap().url("/testbus");
    let b_dir = c.dir.path().join("cp-b");
    let b_data = b_dir.display().to_string();
    // The replicas share A's CA: its key is copied, never stored in etcd.
    std::fs::create_dir_all(b_dir.join("pki")).unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(c.dir.path().join("cp/pki").join(f), b_dir.join("pki").join(f)).unwrap();
    }
    c.spawn_logged(
        Some("cp"),
        "testbus-control-plane",
        b_program,
        &["--listen", "10.77.0.1:7781", "--data-dir", &b_data, "--store", &url, "--lease-grace", "1s"],
    );
    let b_sock = b_dir.join("api.sock");
    wait_for(Duration::from_secs(20), "replica B", || async {
        let c = Client::connect(&format!("unix:{}", b_sock.display())).await.ok()?;
        c.api::<Host>().list("", "").await.ok()
    })
    .await;
    assert!(!leads(&c.read_log("testbus-control-plane")), "only one replica leads");
    c.agent_server = BOTH.into();
    c.agent_args.extend(agent_args.iter().map(|a| a.to_string()));
    for i in 0..hosts {
        c.kill_agent(i);
        c.start_agent(i);
    }
    // Ready as the agents that know both replicas left it, not as the
    // first ones did.
    let registered = format!("server=\"{BOTH}\"");
    for i in 0..hosts {
        wait_for(Duration::from_secs(30), &format!("host-{i}'s agent to register with both replicas"), || async {
            c.read_log(&format!("host-{i}")).contains(&registered).then_some(())
        })
        .await;
    }
    c.wait_hosts_ready(hosts).await;
    c.ctl_node = Some("host-0".into());
    (c, b_sock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_and_output_are_readable_from_either_replica() {
    if !needs_root("the replica tests") {
        return;
    }
    let (c, b_sock) = start_replicas(2).await;
    // A file only A receives: B copies it from A when asked for it.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(c.dir.path().join("data.bin"), &data).unwrap();
    let gate = c.dir.path().join("gate");
    let path = manifest(
        &c,
        "out.yaml",
        &format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: out}}
spec:
  files: [{{source: data.bin, path: data.bin}}]
  hosts: [{{role: r, count: 2}}]
  steps:
    - name: s
      on: [r]
      script: |
        sha256sum data.bin
        for i in $(seq 1 500); do echo early $i; done
        while [ ! -e {gate} ]; do sleep 0.05; done
        for i in $(seq 1 500); do echo late $i; echo err $i >&2; done
"#,
            gate = gate.display()
        ),
    );
    let out = c.ctl(&["--server", A, "apply", "-f", &path]);
    assert_eq!(out.code, 0, "{out:?}");
    c.running_pids("out", 2).await;
    // Follow through B while the processes run on A's side.
    let follow = c.ctl_spawn(&["--server", B, "logs", "test/out", "-f"]);
    std::fs::write(&gate, "").unwrap();
    assert_eq!(c.ctl(&["--server", BOTH, "wait", "test/out", "--timeout", "60s"]).code, 0);
    let followed = follow.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let followed = (text(&followed.stdout), text(&followed.stderr));
    let read = |server| {
        let out = c.ctl(&["--server", server, "logs", "test/out"]);
        assert_eq!(out.code, 0, "{out:?}");
        (out.stdout, out.stderr)
    };
    let (via_a, via_b) = (read(A), read(B));
    let digest = blob::digest_of(&data);
    for (stdout, stderr) in [&via_a, &via_b, &followed] {
        for m in ["r0", "r1"] {
            assert_eq!(stdout.matches(&format!("[{m}/")).count(), 1 + 500 + 500, "{m}: {stdout}");
            assert_eq!(stderr.matches(&format!("[{m}/")).count(), 500, "{m}: {stderr}");
        }
        assert_eq!(stdout.matches(&format!("{}  data.bin", &digest[7..])).count(), 2, "{stdout}");
        assert_eq!(stdout.matches("late 500\n").count(), 2, "{stdout}");
        assert_eq!(stderr.matches("err 500\n").count(), 2, "{stderr}");
    }
    // The three readings hold the same lines (processes interleave).
    let sorted = |(o, e): &(String, String)| {
        let mut v: Vec<&str> = o.lines().chain(e.lines()).collect();
        v.sort_unstable();
        v.join("\n")
    };
    assert!(sorted(&via_a) == sorted(&via_b), "A and B disagree");
    assert!(sorted(&via_a) == sorted(&followed), "the follow through B missed lines");

    // The blob through B: copied from A, digest checked, same bytes.
    assert!(!c.read_log("testbus-control-plane").contains("copied from a peer"));
    let b = Client::connect(&format!("unix:{}", b_sock.display())).await.unwrap();
    let dest = c.dir.path().join("via-b.bin");
    let size = testbus_client::transfer::download_to(b.channel(), &digest, &dest).await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(c.read_log("testbus-control-plane").contains("blob copied from a peer replica"));
    // A blob no replica has is "not found", from either.
    let missing = blob::digest_of(b"nobody has this");
    let err = testbus_client::transfer::download_to(b.channel(), &missing, &c.dir.path().join("x")).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    // Host-1's agent revoked through B is refused by A within moments
    // (the replicas follow each other's revocations in etcd).
    let revoke = std::process::Command::new(testbus_tests::bin_dir().join("testbus-control-plane"))
        .args(["agent", "revoke", "host-1", "--data-dir"])
        .arg(b_sock.parent().unwrap())
        .output()
        .unwrap();
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    let tls = c.agent_tls("host-1");
    let refused = c.in_node("host-0", move || async move {
        let a = Client::connect_with(A, Some(tls)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match a.api::<Process>().list("", "spec.hostName=host-1").await {
                Err(s) if s.code() == tonic::Code::PermissionDenied => return s.message().to_string(),
                r => assert!(std::time::Instant::now() < deadline, "A still serves a revoked agent: {r:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(refused.contains("revoked"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_survives_the_leader_and_an_etcd_member_dying() {
    if !needs_root("the replica tests") {
        return;
    }
    let (mut c, b_sock) = start_replicas(3).await;
    let runs = c.dir.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    std::fs::write(c.dir.path().join("payload.txt"), "payload for every host\n").unwrap();
    let gate = c.dir.path().join("gate");
    let path = manifest(
        &c,
        "failover.yaml",
        &format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: failover}}
spec:
  files: [{{source: payload.txt, path: payload.txt}}]
  hosts: [{{role: server}}, {{role: client, count: 2}}]
  steps:
    - name: work
      on: [server, client]
      script: |
        echo run >> {runs}/$TESTBUS_STEP-$TESTBUS_ROLE
        cat payload.txt
        for i in $(seq 1 300); do echo before $i; done
        while [ ! -e {gate} ]; do sleep 0.05; done
        for i in $(seq 1 300); do echo after $i; done
        testbusctl sync done --timeout 60s
        echo synced
    - name: check
      on: [server]
      after: [work]
      script: |
        echo run >> {runs}/$TESTBUS_STEP-$TESTBUS_ROLE
        cat payload.txt
"#,
            runs = runs.display(),
            gate = gate.display()
        ),
    );
    let out = c.ctl(&["--server", BOTH, "apply", "-f", &path]);
    assert_eq!(out.code, 0, "{out:?}");
    c.running_pids("failover", 3).await;
    let client = c.client().await;
    let (before, _) = client.api::<Process>().list("", "").await.unwrap();
    drop(client);

    // The leading replica dies; B takes over the controllers and the agents.
    c.kill_control_plane();
    c.server = format!("unix:{}", b_sock.display());
    wait_for(Duration::from_secs(30), "replica B to lead", || async {
        leads(&c.read_log("testbus-control-plane")).then_some(())
    })
    .await;
    // Then an etcd member dies: two of three keep the quorum.
    c.etcd.as_mut().unwrap().kill_member(0);
    std::fs::write(&gate, "").unwrap();

    let out = c.ctl(&["--server", BOTH, "wait", "test/failover", "--timeout", "120s"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", c.ctl(&["--server", BOTH, "describe", "test", "failover"]).stdout);
    let logs = c.ctl(&["--server", BOTH, "logs", "test/failover"]).stdout;
    for m in ["work server", "work client0", "work client1"] {
        let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with(&format!("[{m}/"))).collect();
        assert_eq!(lines.len(), 1 + 300 + 300 + 1, "{m}: every line once");
        for i in [1, 300] {
            assert!(lines.iter().any(|l| l.ends_with(&format!(" before {i}"))), "{m} before {i}");
            assert!(lines.iter().any(|l| l.ends_with(&format!(" after {i}"))), "{m} after {i}");
        }
    }
    assert_eq!(logs.lines().filter(|l| l.starts_with("[check server/")).count(), 1, "{logs}");
    assert_eq!(logs.matches("payload for every host").count(), 4, "{logs}");
    assert_eq!(logs.matches("synced").count(), 3, "{logs}");
    // Each process ran exactly once.
    for (step, role) in [("work", "server"), ("work", "client0"), ("work", "client1"), ("check", "server")] {
        let f = runs.join(format!("{step}-{role}"));
        assert_eq!(std::fs::read_to_string(&f).unwrap_or_default(), "run\n", "{step} on {role} ran once");
    }
    // Nothing was lost: every process from before is still there, and the
    // test, its four processes and the three hosts.
    let client = c.client().await;
    let (after, _) = client.api::<Process>().list("", "").await.unwrap();
    for p in &before {
        assert!(after.iter().any(|q| q.meta().uid == p.meta().uid), "process {} lost", p.name());
    }
    assert_eq!(after.len(), 4, "{after:?}");
    assert_eq!(client.api::<Test>().list("", "").await.unwrap().0.len(), 1);
    assert_eq!(client.api::<Host>().list("", "").await.unwrap().0.len(), 3);
}

/// The pids of `parent`'s children named `comm`.
fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // pid (comm) state ppid …; comm may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(") ")?;
            let name = head.split_once(" (")?.1;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && name == comm).then_some(pid)
        })
        .collect()
}

/// A leader deposed while one of its guests boots (issue 27, item 18):
/// its guest work ends with its controllers, at once. The guest tasks used
/// to have a token of their own, so a deposed leader went on with the
/// boot: it snapshotted the guest, linked it and wrote its Host. Replica B
/// runs from a copy of the binary with no testbus-relay beside it, so it
/// takes no part in pools: whatever happens to the guest after A's
/// deposition would be A's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_guest_work_ends_with_its_term() {
    let Some(_turn) = libvirt::turn("tbt-d", &[]).await else { return };
    let lone = tempfile::tempdir().unwrap();
    let lone_cp = lone.path().join("testbus-control-plane");
    std::fs::copy(bin_dir().join("testbus-control-plane"), &lone_cp).unwrap();
    let (c, _b_sock) = start_replicas_with(1, lone_cp.to_str().unwrap(), &[]).await;
    let pool = manifest(
        &c,
        "pool.yaml",
        &format!(
            "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-d}}\nspec:\n  provider: libvirt\n  image: {}\n  min: 1\n  max: 1\n  bootTimeout: 10m\n",
            libvirt::image().display()
        ),
    );
    let out = c.ctl(&["--server", A, "apply", "-f", &pool]);
    assert_eq!(out.code, 0, "{out:?}");
    let a = c.control_plane_pid();
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill").args([sig, &a.to_string()]).status().unwrap();
        assert!(st.success(), "kill {sig} {a}");
    };
    // As soon as the guest runs (it boots for seconds more), A stops
    // answering etcd: its lease runs out and B is elected.
    let guest = wait_for(Duration::from_secs(120), "A to start a guest", || async {
        libvirt::domains("tbt-d-").into_iter().next()
    })
    .await;
    signal("-STOP");
    wait_for(Duration::from_secs(30), "replica B to lead", || async {
        leads(&c.read_log("testbus-control-plane")).then_some(())
    })
    .await;
    signal("-CONT");
    wait_for(Duration::from_secs(30), "A's guest work to stop with its term", || async {
        let log = c.read_log("control-plane");
        (log.contains("lost leadership") && log.contains("guest work stopped with the controllers")).then_some(())
    })
    .await;
    // B leads the pools now, and says why it makes no guests.
    let client = Client::connect(&format!("unix:{}", c.dir.path().join("cp/api.sock").display())).await.unwrap();
    wait_for(Duration::from_secs(60), "B to say it cannot link guests", || async {
        let p = client.api::<HostPool>().get("tbt-d").await.ok()?;
        let cond = p.status().conditions.iter().find(|c| c.r#type == "Available")?.clone();
        (cond.reason == "RelayMissing" && cond.message.contains("testbus-relay is missing")).then_some(())
    })
    .await;
    // The guest boots on to where it waits for its go, and nobody gives
    // it: no clean snapshot, no link, no Host.
    let console = c.dir.path().join("cp/guests").join(&guest).join("console.log");
    wait_for(Duration::from_secs(300), "the guest to wait for its go", || async {
        std::fs::read_to_string(&console).ok()?.contains("testbus-guest: waiting for go").then_some(())
    })
    .await;
    assert!(children_named(a, "testbus-relay").is_empty(), "A linked the guest after its term");
    let snapshots = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "snapshot-list", "--name", &guest])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&snapshots.stdout).trim().is_empty(), "A snapshotted the guest after its term");
    assert!(client.api::<Host>().get_opt(&guest).await.unwrap().is_none(), "the guest registered");
}

/// A replica that stops answering (here SIGSTOP; a one-way cut is the
/// same) keeps its connections looking alive until HTTP/2's keepalive gives
/// up, 20 s later: its agents' lease renewals waited on it, longer than a
/// short lease, and the other replica, leading then, found every host lost
/// (chaos runs did, seeds 22 and 23). An agent whose renewal is not
/// answered within a renewal period moves to the next replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_through_another_replica_when_theirs_stops_answering() {
    if !needs_root("the replica tests") {
        return;
    }
    let (c, b_sock) = start_replicas_with(2, "testbus-control-plane", &["--lease-duration", "2s"]).await;
    let b = Client::connect(&format!("unix:{}", b_sock.display())).await.unwrap();
    let a = nix::unistd::Pid::from_raw(c.control_plane_pid() as i32);
    nix::sys::signal::kill(a, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let check = async {
        wait_for(Duration::from_secs(30), "replica B to lead", || async {
            leads(&c.read_log("testbus-control-plane")).then_some(())
        })
        .await;
        // Leading, B judges the leases: for 8 s (four lease terms), every
        // host stays Ready.
        let until = tokio::time::Instant::now() + Duration::from_secs(8);
        while tokio::time::Instant::now() < until {
            let (hosts, _) = b.api::<Host>().list("", "").await.unwrap();
            let lost: Vec<String> = hosts
                .iter()
                .filter(|h| h.status().phase != "Ready")
                .map(|h| format!("{}: {} {}", h.name(), h.status().phase, h.status().message))
                .collect();
            if !lost.is_empty() {
                return Err(lost);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    };
    let r = check.await;
    nix::sys::signal::kill(a, nix::sys::signal::Signal::SIGCONT).unwrap();
    if let Err(lost) = r {
        panic!("hosts were lost while replica B answered: {lost:?}\n{}", c.read_log("host-0"));
    }
}
