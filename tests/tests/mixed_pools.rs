//! Mixed substrates in one test (issue 31): a bare agent in a network
//! namespace of the test's own, a libvirt guest and a podman container,
//! claimed together, on one pool network. The libvirt pool's network
//! makes the bridge (`testbus_proto::pool::bridge_name`); the podman
//! pool's containers and the bare agent's namespace are plugged into it.
//! The control plane runs in this machine's own network namespace, where
//! libvirtd makes the bridge; nothing on it has an address here.
use std::process::Command;
use std::time::Duration;
use testbus_proto::{HostPool, Resource};
use testbus_tests::podman::{PodmanStorage, IMAGE};
use testbus_tests::{libvirt, manifest, wait_for, Cluster};

const NETWORK: &str = "tbt-mix";

/// The bare agent's namespace and its veth, removed when dropped.
struct BareNode {
    ns: String,
    veth: String,
}

impl Drop for BareNode {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "delete", &self.veth]).output();
        let _ = Command::new("ip").args(["netns", "delete", &self.ns]).output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A server on a bare agent, clients on a libvirt guest and a podman
/// container, all on one pool network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_agent_a_vm_and_a_container_talk_on_one_network() {
    let Some(_turn) = libvirt::turn("tbt-mv", &[NETWORK]).await else { return };
    // (libvirt's turn is held: the podman storage takes no turn of its own.)
    let storage = PodmanStorage::without_turn();
    let mut c = Cluster::start_loopback_with(0, &["--podman-storage", &storage.path().display().to_string()]).await;
    let vm_pool = format!(
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-mv}}\nspec:\n  provider: libvirt\n  image: {}\n  capabilities: [vm]\n  min: 1\n  max: 1\n  network: {NETWORK}\n",
        libvirt::image().display()
    );
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "vm.yaml", &vm_pool)]).code, 0);
    let client = c.client().await;
    // The libvirt network (and its bridge) first: its guest Ready.
    let vm_address = wait_for(Duration::from_secs(240), "the libvirt guest to be Ready", || async {
        let p = client.api::<HostPool>().get("tbt-mv").await.ok()?;
        p.status().guests.iter().find(|g| g.phase == "Ready").map(|g| g.address.clone())
    })
    .await;
    let bridge = testbus_proto::pool::bridge_name(NETWORK);
    assert!(std::path::Path::new("/sys/class/net").join(&bridge).exists(), "libvirt made {bridge}");
    let ctr_pool = format!(
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-mc}}\nspec:\n  provider: podman\n  image: {IMAGE}\n  capabilities: [ctr]\n  max: 1\n  network: {NETWORK}\n"
    );
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "ctr.yaml", &ctr_pool)]).code, 0);

    // The bare agent: a namespace of the test's own on the same bridge,
    // its address in the network's /24, reaching the control plane through
    // a relay's unix socket (its namespace has no route to this machine's
    // loopback).
    let subnet = vm_address.rsplit_once('.').unwrap().0.to_string();
    let node = BareNode {
        ns: format!("tbt-mix-{}", std::process::id()),
        veth: format!("tbm{}", std::process::id() % 1_000_000),
    };
    ip(&["netns", "add", &node.ns]);
    ip(&["link", "add", &node.veth, "type", "veth", "peer", "name", "eth0", "netns", &node.ns]);
    ip(&["link", "set", &node.veth, "addrgenmode", "none"]);
    ip(&["link", "set", &node.veth, "master", &bridge, "up"]);
    ip(&["-n", &node.ns, "addr", "add", &format!("{subnet}.250/24"), "dev", "eth0"]);
    ip(&["-n", &node.ns, "link", "set", "eth0", "up"]);
    ip(&["-n", &node.ns, "link", "set", "lo", "up"]);
    let sock = c.dir.path().join("bare-relay.sock");
    let upstream = format!("tcp:{}", c.agent_server.trim_start_matches("https://"));
    c.spawn_logged(
        None,
        "bare-relay",
        "testbus-relay",
        &["--downstream", &format!("unix:{}", sock.display()), "--upstream", &upstream],
    );
    let agent = testbus_tests::bin_dir().join("testbus-agent");
    let data = c.dir.path().join("bare");
    let token = c.join_token.clone();
    c.spawn_logged(
        None,
        "bare",
        "nsenter",
        &[
            &format!("--net=/run/netns/{}", node.ns),
            "--",
            &agent.display().to_string(),
            "--server",
            &format!("unix+tls:{}", sock.display()),
            "--join-token",
            &token,
            "--name",
            "mix-bare",
            "--data-dir",
            &data.display().to_string(),
            "--capability",
            "bare",
        ],
    );

    let t = manifest(
        &c,
        "mixed.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: mixed}
spec:
  timeout: 5m
  hosts:
    - {role: server, capabilities: [bare]}
    - {role: vm, capabilities: [vm]}
    - {role: ctr, capabilities: [ctr]}
  steps:
    - {name: serve, on: [server], background: true, argv: [sh, -c, "while :; do echo pong from $TESTBUS_HOST | busybox nc -l -p 7000; done"]}
    - name: ask
      on: [vm, ctr]
      after: [serve]
      argv: [sh, -c, "for i in $(seq 1 150); do nc ${host_server_ipv4addr} 7000 </dev/null && exit 0; sleep 0.2; done; exit 1"]
"#,
    );
    let out = c.ctl(&["apply", "-f", &t, "--wait", "--timeout", "5m"]);
    let logs = c.ctl(&["logs", "test/mixed"]).stdout;
    assert_eq!(out.code, 0, "{out:?}\n{logs}\n{}", c.read_log("control-plane"));
    assert_eq!(
        logs.matches("pong from mix-bare").count(),
        2,
        "the vm and the container reached the bare agent: {logs}"
    );
    let mixed = c.test("mixed").await;
    let claims = &mixed.status().claims;
    assert_eq!(claims["server"], "mix-bare");
    assert!(claims["vm"].starts_with("tbt-mv-") && claims["ctr"].starts_with("tbt-mc-"), "{claims:?}");

    // Both pools go, each with what it made: the container's namespace and
    // veth, the libvirt network and its bridge (the podman pool leaves a
    // bridge it did not make).
    for pool in ["tbt-mc", "tbt-mv"] {
        assert_eq!(c.ctl(&["delete", &format!("hostpool/{pool}")]).code, 0);
        wait_for(Duration::from_secs(120), &format!("pool {pool} to go"), || async {
            client.api::<HostPool>().get_opt(pool).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    assert!(storage.containers("tbt-mc-").is_empty());
    assert!(libvirt::domains("tbt-mv-").is_empty());
    drop(node);
    assert!(!std::path::Path::new("/sys/class/net").join(&bridge).exists(), "{bridge} went with the libvirt network");
}
