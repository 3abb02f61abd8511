//! HostPools of podman containers with real podman (issue 31): rootful,
//! runc, a storage of each test's own (tests/src/podman.rs), the image
//! `hack/guest-image`'s rootfs.tar imported. Each container's agent reaches
//! the control plane through a relay's unix socket mounted into it, and
//! joins with a token of its own; containers on a pool network have
//! network namespaces of their own on the network's bridge.
use std::time::Duration;
use testbus_proto::{Host, HostPool, Resource};
use testbus_tests::podman::{PodmanStorage, IMAGE};
use testbus_tests::{manifest, wait_for, Cluster};

/// A container's agent registers in a second or two; a loaded CI machine
/// takes longer.
const UP: Duration = Duration::from_secs(120);

fn pool_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: {name}}}\nspec:\n  provider: podman\n  image: {IMAGE}\n  capabilities: [ctr]\n{extra}"
    )
}

async fn cluster(storage: &PodmanStorage) -> Cluster {
    Cluster::start_full(0, &[], &["--podman-storage", &storage.path().display().to_string()]).await
}

/// A test of one container host running `cmd`.
fn ctr_test(c: &Cluster, name: &str, cmd: &str) -> String {
    manifest(
        c,
        &format!("{name}.yaml"),
        &format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{{role: c, capabilities: [ctr]}}]\n  steps: [{{name: s, on: [c], argv: [sh, -c, \"{cmd}\"]}}]\n"
        ),
    )
}

/// The interfaces of the control plane's network namespace.
fn cp_links(c: &Cluster) -> String {
    let out = c.command_in("cp", std::path::Path::new("ip")).args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes a pool and waits until it is gone with all it made: containers,
/// network namespaces, the bridge.
async fn delete_pool(c: &Cluster, storage: &PodmanStorage, name: &str) {
    assert_eq!(c.ctl(&["delete", &format!("hostpool/{name}")]).code, 0);
    let client = c.client().await;
    wait_for(Duration::from_secs(60), &format!("pool {name} and its containers to go"), || async {
        let gone = client.api::<HostPool>().get_opt(name).await.ok()?.is_none();
        (gone && storage.containers(&format!("{name}-")).is_empty()).then_some(())
    })
    .await;
    let netns = std::fs::read_dir("/run/netns").map(|d| d.count()).unwrap_or(0);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("tbg-{name}-")))
        .collect();
    assert!(left.is_empty(), "network namespaces left: {left:?} (of {netns})");
}

/// Two containers on a pool network talk to each other by address; each
/// has the pool's limits, joined with a token no one else can read, and
/// runs a second test in a new container (nothing of the first is left);
/// deleting the pool leaves nothing in podman, no namespace, no bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_pool_talk_on_its_network_and_are_new_for_each_test() {
    let Some(storage) = PodmanStorage::new().await else { return };
    let c = cluster(&storage).await;
    let p = manifest(
        &c,
        "pool.yaml",
        &pool_yaml(
            "tbc-a",
            "  max: 2\n  network: tbc-net\n  memory: 128\n  cpus: 1\n  pids: 200\n  idleTimeout: 10m\n",
        ),
    );
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0, "{}", c.ctl(&["apply", "-f", &p]).stderr);
    let t = manifest(
        &c,
        "net.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: net}
spec:
  hosts:
    - {role: server, capabilities: [ctr]}
    - {role: client, capabilities: [ctr]}
  steps:
    - {name: serve, on: [server], background: true, argv: [sh, -c, "echo secret > /root/leftover; while :; do echo pong | nc -l -p 7000; done"]}
    - name: ask
      on: [client]
      after: [serve]
      argv: [sh, -c, "echo secret > /root/leftover; for i in $(seq 1 100); do nc ${host_server_ipv4addr} 7000 </dev/null && exit 0; sleep 0.2; done; exit 1"]
"#,
    );
    let out = c.ctl(&["apply", "-f", &t, "--wait", "--timeout", "2m"]);
    assert_eq!(out.code, 0, "{out:?}\n{}\n{}", c.ctl(&["logs", "test/net"]).stdout, c.read_log("control-plane"));
    assert!(c.ctl(&["logs", "test/net"]).stdout.contains("pong"));
    let net = c.test("net").await;
    let client = c.client().await;
    let server = net.status().claims["server"].clone();
    let h = client.api::<Host>().get(&server).await.unwrap();
    assert!(h.status().vars["ipv4addr"].starts_with("10.251."), "{:?}", h.status().vars);
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "podman");
    assert_eq!(testbus_proto::pool::pool_of(&h), Some("tbc-a"));

    // A test holding a container: a new one (nothing the first test
    // wrote), with the pool's limits, joined with a token only on a
    // private file (never on the command line or in the environment
    // podman shows).
    let out = c.ctl(&["create", "test", "hold", "--claim", "c=ctr", "--timeout", "10m", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let held = c.test("hold").await.status().claims["c"].clone();
    assert!(net.status().claims.values().any(|g| g == &held), "a guest was reused: {held}");
    let out = c.ctl(&["exec", "hold", "--", "sh", "-c", "test ! -e /root/leftover && hostname"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&held), "{out:?}");
    // Its link dir is read-only inside: nothing there can point this
    // machine's relay (root here) at a file of its own.
    let out = c.ctl(&[
        "exec",
        "hold",
        "--",
        "sh",
        "-c",
        "rm -f /run/testbus/link.sock.transport && ln -s /etc/passwd /run/testbus/link.sock.transport",
    ]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("Read-only") || out.stdout.contains("Read-only"), "{out:?}");
    let inspected = storage.inspect(&held);
    let hc = &inspected["HostConfig"];
    assert_eq!(hc["Memory"], 128 << 20, "{hc}");
    assert_eq!(hc["PidsLimit"], 200, "{hc}");
    assert_eq!(hc["NanoCpus"], 1_000_000_000u64, "{hc}");
    assert_eq!(hc["NetworkMode"], format!("ns:/run/netns/tbg-{held}"), "{hc}");
    let shown = format!("{} {}", inspected["Config"]["Cmd"], inspected["Config"]["Env"]);
    assert!(shown.contains("--join-token-file") && !shown.contains("--join-token\""), "{shown}");
    let token = c.dir.path().join("cp/guests").join(&held).join("link/token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token).unwrap().permissions().mode() & 0o077, 0, "{}", token.display());
    let cleaned = |p: &HostPool| p.status().guests.iter().find(|g| g.name == held).map_or(0, |g| g.cleanings);
    let before = cleaned(&client.api::<HostPool>().get("tbc-a").await.unwrap());
    assert_eq!(c.ctl(&["finish", "test/hold"]).code, 0);
    let deadline = std::time::Instant::now() + UP;
    loop {
        let pool = client.api::<HostPool>().get("tbc-a").await.unwrap();
        if cleaned(&pool) > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never counted its cleanings: {:?}\n{}",
            pool.status(),
            diagnose(&c, &storage)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let bridge = testbus_proto::pool::bridge_name("tbc-net");
    assert!(cp_links(&c).contains(&bridge), "{}", cp_links(&c));
    // No address on this machine's side, IPv6 link-local included.
    let out =
        c.command_in("cp", std::path::Path::new("ip")).args(["-o", "addr", "show", "dev", &bridge]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty(), "{out:?}");
    delete_pool(&c, &storage, "tbc-a").await;
    assert!(!cp_links(&c).contains(&bridge), "the bridge went with the pool: {}", cp_links(&c));
}

/// What podman and the guests' relays say, for a failure's message.
fn diagnose(c: &Cluster, storage: &PodmanStorage) -> String {
    let mut out = String::from_utf8_lossy(&storage.podman(&["ps", "--all"]).stdout).into_owned();
    for name in storage.containers("") {
        let logs = storage.podman(&["logs", "--tail", "20", &name]);
        out +=
            &format!("--- {name}:\n{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        let relay = c.dir.path().join("cp/guests").join(&name).join("relay.log");
        out += &format!("--- relay:\n{}", std::fs::read_to_string(relay).unwrap_or_default());
    }
    out
}

/// A control plane killed outright finds its containers again (their
/// agents redial the new relays), runs a test on one, and removes them all
/// with the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_relinks_its_containers_and_leaves_nothing() {
    let Some(storage) = PodmanStorage::new().await else { return };
    let mut c = cluster(&storage).await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbc-r", "  min: 1\n  max: 1\n  network: tbc-rnet\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let client = c.client().await;
    let (guest, address) = wait_for(UP, "a Ready container", || async {
        let p = client.api::<HostPool>().get("tbc-r").await.ok()?;
        p.status().guests.iter().find(|g| g.phase == "Ready").map(|g| (g.name.clone(), g.address.clone()))
    })
    .await;
    assert!(address.starts_with("10.251."), "{address}");
    c.kill_control_plane();
    let restarted = std::time::SystemTime::now();
    c.start_control_plane().await;
    let client = c.client().await;
    // Its agent renews its lease through the new relay.
    wait_for(UP, "the container's agent to come back", || async {
        let h = client.api::<Host>().get(&guest).await.ok()?;
        let renewed = testbus_proto::time::parse(&h.status().lease_renew_time)?;
        (renewed > restarted && h.status().phase == "Ready").then_some(())
    })
    .await;
    let out = c.ctl(&["apply", "-f", &ctr_test(&c, "after", "hostname"), "--wait", "--timeout", "2m"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(c.ctl(&["logs", "test/after"]).stdout.contains(&guest), "the same container served it");
    // Its next container (after the clean) keeps its address and network.
    let check = format!("ip -4 addr show eth0 | grep -q {}", address.split('/').next().unwrap());
    let out = c.ctl(&["apply", "-f", &ctr_test(&c, "again", &check), "--wait", "--timeout", "2m"]);
    assert_eq!(out.code, 0, "{out:?} {}", c.ctl(&["logs", "test/again"]).stdout);
    let p = client.api::<HostPool>().get("tbc-r").await.unwrap();
    assert_eq!(p.status().guests.iter().map(|g| g.address.as_str()).collect::<Vec<_>>(), [address.as_str()]);
    assert_eq!(storage.containers("tbc-r-").len(), 1, "{:?}", storage.containers("tbc-r-"));
    delete_pool(&c, &storage, "tbc-r").await;
}

/// Podman that cannot run: the reason is on the pool's condition, and the
/// pool recovers once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_says_podman_cannot_run() {
    let Some(storage) = PodmanStorage::new().await else { return };
    let mut c = cluster(&storage).await;
    c.kill_control_plane();
    // A podman that fails, first on the control plane's PATH.
    let bin = c.dir.path().join("badbin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("podman"), "#!/bin/sh\necho 'cannot connect to podman: broken on purpose' >&2\nexit 125\n")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("podman"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    c.cp_env.push(("PATH".into(), path));
    c.start_control_plane().await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbc-u", "  min: 1\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let client = c.client().await;
    let cond = wait_for(Duration::from_secs(30), "the pool to say podman is unreachable", || async {
        let p = client.api::<HostPool>().get("tbc-u").await.ok()?;
        p.status().conditions.iter().find(|c| c.reason == "PodmanUnreachable").cloned()
    })
    .await;
    assert!(cond.message.contains("broken on purpose"), "{cond:?}");
    assert!(storage.containers("tbc-u-").is_empty());
    // Podman works again: the pool makes its guest.
    c.kill_control_plane();
    c.cp_env.clear();
    c.start_control_plane().await;
    let client = c.client().await;
    wait_for(UP, "a Ready container once podman runs", || async {
        let p = client.api::<HostPool>().get("tbc-u").await.ok()?;
        p.status().guests.iter().any(|g| g.phase == "Ready").then_some(())
    })
    .await;
    delete_pool(&c, &storage, "tbc-u").await;
}

/// The example manifests, applied as they are: the pool of containers, and
/// a client and server on two of them, talking over its network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_examples_run_as_they_are() {
    let Some(storage) = PodmanStorage::new().await else { return };
    let c = cluster(&storage).await;
    let ex = |name: &str| testbus_tests::repo_root().join("manifests/examples").join(name).display().to_string();
    assert_eq!(c.ctl(&["apply", "-f", &ex("pool-containers.yaml")]).code, 0);
    let out = c.ctl(&["apply", "-f", &ex("pool-container-client-server.yaml"), "--wait", "--timeout", "2m"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", diagnose(&c, &storage));
    let name = out.stdout.split_whitespace().next().unwrap().trim_start_matches("test/").to_string();
    let logs = c.ctl(&["logs", &format!("test/{name}"), "--step", "greet"]).stdout;
    assert!(logs.contains("hello from containers-"), "{logs}");
    delete_pool(&c, &storage, "containers").await;
}

/// A provider whose API hangs holds up its own pools only: a kubernetes
/// pool whose API server accepts connections and never answers (its
/// reconcile waits out the provider deadline) does not keep a podman pool
/// in the same control plane from making its container meanwhile; then it
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_provider_does_not_hold_up_other_pools() {
    let Some(storage) = PodmanStorage::new().await else { return };
    let mut c = cluster(&storage).await;
    c.kill_control_plane();
    // An "API server" in the control plane's namespace that takes
    // connections and says nothing.
    let port = 17443;
    // (One process, which holds every connection: killed with the cluster.)
    let mute = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', {port}))\ns.listen(64)\nheld = []\nwhile True:\n    held.append(s.accept())\n"
    );
    c.spawn_logged(Some("cp"), "mute", "python3", &["-c", &mute]);
    c.in_node("cp", move || async move {
        wait_for(Duration::from_secs(10), "the mute API server to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await
    });
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    c.cp_env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    c.start_control_plane().await;
    let kube = "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {name: tbc-k}\nspec:\n  provider: kubernetes\n  image: localhost/testbus-guest\n  address: 10.77.0.1:7780\n  min: 1\n";
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "k.yaml", kube)]).code, 0);
    let client = c.client().await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbc-h", "  min: 1\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    wait_for(UP, "the podman pool's container to be Ready", || async {
        let p = client.api::<HostPool>().get("tbc-h").await.ok()?;
        p.status().guests.iter().any(|g| g.phase == "Ready").then_some(())
    })
    .await;
    // Meanwhile the kubernetes pool's reconcile was still waiting on its
    // API server: it has said nothing yet.
    let k = client.api::<HostPool>().get("tbc-k").await.unwrap();
    assert!(k.status().conditions.is_empty(), "{:?}", k.status());
    let cond = wait_for(Duration::from_secs(60), "the kubernetes pool to say its API does not answer", || async {
        let p = client.api::<HostPool>().get("tbc-k").await.ok()?;
        p.status().conditions.iter().find(|c| c.reason == "KubernetesUnreachable").cloned()
    })
    .await;
    assert!(cond.message.contains("no answer within 15s"), "{cond:?}");
    delete_pool(&c, &storage, "tbc-h").await;
}
