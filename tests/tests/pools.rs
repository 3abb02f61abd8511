//! HostPools with the real components (issue 18): libvirtd and QEMU under
//! TCG, guests from the golden image that `hack/guest-image` builds, each
//! reaching the control plane only through `testbus-relay` over its serial
//! line. The tests start libvirtd themselves (tests/src/libvirt.rs).
use std::time::Duration;
use testbus_proto::{Host, HostPool, Resource};
use testbus_tests::libvirt;
use testbus_tests::{manifest, metric_sum, wait_for, Cluster};

/// Guests boot under TCG in ~15 s on 2 busy cores; a test waits for them.
const BOOT: Duration = Duration::from_secs(240);

fn pool_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: {name}}}\nspec:\n  provider: libvirt\n  image: {}\n  capabilities: [vm]\n{extra}",
        libvirt::image().display()
    )
}

/// A manifest of test `name`: one host with capability vm, running `cmd`.
fn vm_test(c: &Cluster, name: &str, cmd: &str) -> String {
    manifest(
        c,
        &format!("{name}.yaml"),
        &format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{{role: vm, capabilities: [vm]}}]\n  steps: [{{name: s, on: [vm], argv: [sh, -c, \"{cmd}\"]}}]\n"
        ),
    )
}

async fn pool(c: &Cluster, name: &str) -> HostPool {
    c.client().await.api::<HostPool>().get(name).await.unwrap()
}

/// Deletes a pool and waits until it is gone, with nothing of it left in
/// libvirt.
async fn delete_pool(c: &Cluster, name: &str) {
    assert_eq!(c.ctl(&["delete", &format!("hostpool/{name}")]).code, 0);
    let client = c.client().await;
    wait_for(Duration::from_secs(120), &format!("pool {name} and its guests to go"), || async {
        let gone = client.api::<HostPool>().get_opt(name).await.ok()?.is_none();
        (gone && libvirt::domains(&format!("{name}-")).is_empty()).then_some(())
    })
    .await;
}

/// From zero guests to one for a test, the guest cleaned between tests (a
/// file the first test wrote is gone for the second), destroyed when idle
/// past idleTimeout, and everything gone from libvirt with the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_makes_guests_on_demand_cleans_them_and_removes_them() {
    let Some(_turn) = libvirt::turn("tbt-a", &[]).await else { return };
    let c = Cluster::start(0).await;
    let p = manifest(
        &c,
        "pool.yaml",
        &pool_yaml("tbt-a", "  min: 0\n  max: 2\n  idleTimeout: 2s\n  env: {POOL_MODE: from-pool}\n"),
    );
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let test = |name: &str, cmd: &str| vm_test(&c, name, cmd);
    let timeout = format!("{}s", BOOT.as_secs());
    let out = c.ctl(&[
        "apply",
        "-f",
        &test("first", "echo secret > /root/leftover; hostname"),
        "--wait",
        "--timeout",
        &timeout,
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let guest = c
        .ctl(&["logs", "test/first"])
        .stdout
        .trim()
        .trim_start_matches(|ch| ch != ']')
        .trim_start_matches("] ")
        .to_string();
    assert!(guest.starts_with("tbt-a-"), "{guest:?}");
    let client = c.client().await;
    let h = client.api::<Host>().get(&guest).await.unwrap();
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "serial", "its only link is the serial line");
    assert_eq!(testbus_proto::pool::pool_of(&h), Some("tbt-a"));
    assert!(libvirt::domains("tbt-a-").contains(&guest));
    // Its agent joined with the token the pool gave it (TLS end to end
    // through the serial relays), and under its own name only.
    let joined = |log: &str| log.lines().filter(|l| l.contains("an agent joined") && l.contains(&guest)).count();
    assert!(joined(&c.read_log("control-plane")) >= 1, "{}", c.read_log("control-plane"));
    let out = c.ctl(&[
        "apply",
        "-f",
        &test("second", "hostname; test ! -e /root/leftover && test $POOL_MODE = from-pool"),
        "--wait",
        "--timeout",
        &timeout,
    ]);
    assert_eq!(out.code, 0, "{out:?} {}", c.ctl(&["logs", "test/second"]).stdout);
    assert!(c.ctl(&["logs", "test/second"]).stdout.contains(&guest), "the guest was reused");
    let cleanings = pool(&c, "tbt-a").await.status().guests.iter().map(|g| g.cleanings).sum::<u32>();
    assert!(cleanings >= 1, "{:?}", pool(&c, "tbt-a").await.status());
    // Back at its clean snapshot the guest had no certificate: it joined
    // again, with a new token from the new go.
    assert!(joined(&c.read_log("control-plane")) >= 2, "{}", c.read_log("control-plane"));
    // The control plane's metrics timed the create and the clean.
    let admin = testbus_pki::ClientFile::load(&c.dir.path().join("admin.yaml")).unwrap();
    let (status, samples) = c.scrape("cp", "https://10.77.0.1:7780/metrics", &c.pem_files("admin", &admin));
    assert_eq!(status, 200);
    let timed = |op: &str| {
        let labels = [("pool", "tbt-a"), ("operation", op)];
        metric_sum(&samples, "testbus_pool_guest_operation_duration_seconds_count", &labels)
    };
    assert!(timed("create") >= 1.0, "{samples}");
    assert!(timed("revert") >= 1.0 && timed("clean") >= 1.0, "{samples}");

    // Idle past idleTimeout above min 0: destroyed, with its Host.
    wait_for(Duration::from_secs(120), "the idle guest to be destroyed", || async {
        let p = client.api::<HostPool>().get("tbt-a").await.ok()?;
        let host_gone = client.api::<Host>().get_opt(&guest).await.ok()?.is_none();
        (p.status().guests.is_empty() && host_gone && libvirt::domains("tbt-a-").is_empty()).then_some(())
    })
    .await;

    // Demand again, then the pool is deleted with a guest in it: nothing
    // is left in libvirt, nor on disk.
    let out = c.ctl(&["apply", "-f", &test("third", "true"), "--wait", "--timeout", &timeout]);
    assert_eq!(out.code, 0, "{out:?}");
    // One guest for one test. (Once, in CI, two domains were seen right
    // after the test; what the pool then was is printed, and the count
    // must settle to one: an extra guest is idle past 2 s and goes.)
    let domains = libvirt::domains("tbt-a-");
    if domains.len() != 1 {
        eprintln!("two guests for one test? {domains:?} {:?}", pool(&c, "tbt-a").await.status());
    }
    wait_for(Duration::from_secs(60), "one guest for one test", || async {
        (libvirt::domains("tbt-a-").len() == 1).then_some(())
    })
    .await;
    delete_pool(&c, "tbt-a").await;
    let (hosts, _) = client.api::<Host>().list("testbus.io/pool=tbt-a", "").await.unwrap();
    assert!(hosts.is_empty(), "{hosts:?}");
    let guests_dir = c.dir.path().join("cp/guests");
    let left: Vec<_> =
        std::fs::read_dir(&guests_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// A test whose roles mix a bare agent (in a network namespace) and two
/// pool guests that talk over the pool's isolated network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_talk_over_the_pool_network_beside_a_bare_host() {
    let Some(_turn) = libvirt::turn("tbt-n", &["tbt-net"]).await else { return };
    let c = Cluster::start(1).await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbt-n", "  max: 2\n  network: tbt-net\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let t = manifest(
        &c,
        "net.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: net}
spec:
  hosts:
    - {role: server, capabilities: [vm]}
    - {role: client, capabilities: [vm]}
    - {role: bare, host: host-0}
  steps:
    - {name: serve, on: [server], background: true, argv: [sh, -c, "while :; do echo pong | nc -l -p 7000; done"]}
    - name: ask
      on: [client]
      after: [serve]
      argv: [sh, -c, "for i in $(seq 1 100); do nc ${host_server_ipv4addr} 7000 </dev/null && exit 0; sleep 0.2; done; exit 1"]
    - {name: here, on: [bare], argv: [sh, -c, "echo bare on $TESTBUS_HOST"]}
"#,
    );
    let out = c.ctl(&["apply", "-f", &t, "--wait", "--timeout", &format!("{}s", BOOT.as_secs())]);
    assert_eq!(out.code, 0, "{out:?}\n{}", c.ctl(&["logs", "test/net"]).stdout);
    let logs = c.ctl(&["logs", "test/net"]).stdout;
    assert!(logs.contains("pong"), "{logs}");
    assert!(logs.contains("bare on host-0"), "{logs}");
    let t = c.test("net").await;
    let server = &t.status().claims["server"];
    let addr = c.client().await.api::<Host>().get(server).await.unwrap().status().vars["ipv4addr"].clone();
    assert!(addr.starts_with("10.251."), "the pool network's address: {addr}");
    delete_pool(&c, "tbt-n").await;
}

/// kill -9 of a guest's QEMU: the guest is lost like any host (its test
/// ends in Error naming it) and the pool replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_whose_qemu_is_killed_is_lost_and_replaced() {
    let Some(_turn) = libvirt::turn("tbt-k", &[]).await else { return };
    let c = Cluster::start(0).await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbt-k", "  min: 1\n  max: 2\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let t = manifest(
        &c,
        "long.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: long}\nspec:\n  hosts: [{role: vm, capabilities: [vm]}]\n  steps: [{name: s, on: [vm], argv: [sleep, \"600\"]}]\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &t]).code, 0);
    c.running_pids("long", 1).await;
    let guest = c.test("long").await.status().claims["vm"].clone();
    let pid = libvirt::qemu_pid(&guest).expect("the guest's QEMU pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = wait_for(Duration::from_secs(120), "the test to end in Error", || async {
        let t = c.test("long").await;
        (t.status().phase == "Error").then_some(t)
    })
    .await;
    assert!(t.status().message.contains(&guest), "{:?}", t.status());
    let client = c.client().await;
    let replacement = wait_for(BOOT, "a replacement guest to be Ready", || async {
        let p = client.api::<HostPool>().get("tbt-k").await.ok()?;
        let g = p.status().guests.iter().find(|g| g.name != guest && g.phase == "Ready")?;
        (p.status().guests.len() == 1).then(|| g.name.clone())
    })
    .await;
    assert_eq!(libvirt::domains("tbt-k-"), [replacement]);
    assert!(client.api::<Host>().get_opt(&guest).await.unwrap().is_none(), "the lost guest's Host is gone");
    delete_pool(&c, "tbt-k").await;
}

/// Snapshots of a pool guest through the CLI (the control plane calls
/// libvirt): created, reverted (the guest is linked again, with the disk
/// of the snapshot), listed and deleted; a bare host has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_guest_are_created_listed_and_deleted() {
    let Some(_turn) = libvirt::turn("tbt-s", &[]).await else { return };
    let c = Cluster::start(1).await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbt-s", "  max: 1\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let out = c.ctl(&["create", "test", "snap", "--claim", "vm=vm", "--timeout", "10m", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let guest = c.test("snap").await.status().claims["vm"].clone();
    // What the pool has, where users look (it said "0 guests").
    wait_for(Duration::from_secs(30), "the pool to say it has its guest", || async {
        let wide = c.ctl(&["get", "hostpools", "-o", "wide"]).stdout;
        wide.contains("1 guest: 1 Ready (1 in use)").then_some(())
    })
    .await;
    assert!(c.ctl(&["describe", "hostpool", "tbt-s"]).stdout.contains("1 guest: 1 Ready (1 in use)"));
    assert_eq!(c.ctl(&["exec", "snap", "--", "sh", "-c", "echo one > /root/marker"]).code, 0);
    let out = c.ctl(&["snapshot", "create", &guest, "s1"]);
    assert_eq!((out.code, out.stdout.clone()), (0, format!("snapshot s1 of host/{guest} created\n")), "{out:?}");
    assert_eq!(c.ctl(&["exec", "snap", "--", "sh", "-c", "echo two > /root/marker"]).code, 0);
    // A guest that floods its console fills no disk: virtlogd keeps the
    // log to 2 MiB and three older files.
    let flood = "head -c 12582912 /dev/zero | tr '\\0' x > /dev/ttyS0";
    let out = c.ctl(&["exec", "snap", "--timeout", "5m", "--", "sh", "-c", flood]);
    assert_eq!(out.code, 0, "{out:?}");
    let state = c.dir.path().join("cp/guests").join(&guest);
    let logged: u64 = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("console.log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!((1 << 20..=9 << 20).contains(&logged), "12 MiB written to the console, {logged} bytes kept");
    // Back to s1: memory and disk as they were; the guest is linked again.
    let out = c.ctl(&["snapshot", "revert", &guest, "s1"]);
    assert_eq!(out.code, 0, "{out:?}");
    // The reverted agent is back at s1's revision, and so is its journal:
    // the Processes run since (`echo two`, the flood) must not run again.
    // (A watch resumed from that revision replayed them as Pending, and
    // they did: the marker read "two", or empty while being rewritten.)
    let marker = wait_for(BOOT, "the reverted guest to answer", || async {
        let out = c.ctl(&["exec", "snap", "--timeout", "20s", "--", "cat", "/root/marker"]);
        (out.code == 0).then_some(out.stdout)
    })
    .await;
    assert_eq!(marker, "one\n", "the reverted guest's marker");
    let out = c.ctl(&["snapshot", "list", &guest]);
    assert_eq!(out.stdout, "s1\ntestbus-clean\n", "{out:?}");
    assert_eq!(c.ctl(&["snapshot", "delete", &guest, "s1"]).code, 0);
    assert_eq!(c.ctl(&["snapshot", "list", &guest]).stdout, "testbus-clean\n");
    for (args, says) in [
        (vec!["snapshot", "create", "host-0", "x"], "not a pool guest"),
        (vec!["snapshot", "create", guest.as_str(), "testbus-clean"], "the pool's own"),
        (vec!["snapshot", "revert", guest.as_str(), "nope"], "nope"),
        (vec!["snapshot", "create", guest.as_str(), "Bad_Name"], "name:"),
        (vec!["snapshot", "revert", guest.as_str()], "give HOST NAME"),
    ] {
        let out = c.ctl(&args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {out:?}");
    }
    assert_eq!(c.ctl(&["finish", "snap"]).code, 0);
    delete_pool(&c, "tbt-s").await;
}

/// The example manifests, applied as they are (the image where
/// hack/guest-image puts it as root): the pool, and a client and server on
/// two of its guests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_examples_run_as_they_are() {
    let Some(_turn) = libvirt::turn("vms", &["testbus-vms"]).await else { return };
    let image = std::path::Path::new("/var/lib/testbus/guest-image");
    assert!(image.join("golden.qcow2").exists(), "run hack/guest-image as root: the examples use {}", image.display());
    let c = Cluster::start(0).await;
    let ex = |name: &str| testbus_tests::repo_root().join("manifests/examples").join(name).display().to_string();
    assert_eq!(c.ctl(&["apply", "-f", &ex("pool-vms.yaml")]).code, 0);
    let out =
        c.ctl(&["apply", "-f", &ex("pool-client-server.yaml"), "--wait", "--timeout", &format!("{}s", BOOT.as_secs())]);
    assert_eq!(out.code, 0, "{out:?}");
    let name = out.stdout.split_whitespace().next().unwrap().trim_start_matches("test/").to_string();
    let logs = c.ctl(&["logs", &format!("test/{name}"), "--step", "greet"]).stdout;
    assert!(logs.contains("hello from vms-"), "{logs}");
    delete_pool(&c, "vms").await;
}

/// What goes wrong lands on the pool's condition, in libvirt's own words
/// where libvirt said it: an address where no libvirtd answers, an image
/// that is not there. Nothing hangs; the pool keeps trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_errors_and_a_missing_image_land_on_the_pool() {
    if !libvirt::ensure() {
        return;
    }
    let c = Cluster::start(0).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = format!(
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-u}}\nspec:\n  provider: libvirt\n  uri: qemu+tcp://127.0.0.1:{port}/system\n  image: /nonexistent\n  min: 1\n"
    );
    let missing = "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {name: tbt-m}\nspec:\n  provider: libvirt\n  image: /nonexistent/image\n  min: 1\n";
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "u.yaml", &unreachable)]).code, 0);
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "m.yaml", missing)]).code, 0);
    let client = c.client().await;
    let condition = |name: &'static str| {
        let client = client.clone();
        async move {
            let p = client.api::<HostPool>().get(name).await.ok()?;
            let cond = p.status().conditions.iter().find(|c| c.r#type == "Available")?.clone();
            (cond.status == "False").then_some(cond)
        }
    };
    let u = wait_for(Duration::from_secs(60), "tbt-u to say libvirt is unreachable", || condition("tbt-u")).await;
    assert_eq!(u.reason, "LibvirtUnreachable", "{u:?}");
    assert!(u.message.contains(&format!("127.0.0.1:{port}")) || u.message.to_lowercase().contains("connect"), "{u:?}");
    let m = wait_for(Duration::from_secs(60), "tbt-m to say its image is missing", || condition("tbt-m")).await;
    assert_eq!(m.reason, "GuestsFailing", "{m:?}");
    assert!(m.message.contains("image /nonexistent/image: no vmlinuz (build it with hack/guest-image)"), "{m:?}");
    assert!(libvirt::domains("tbt-m-").is_empty(), "nothing was defined");
    // Both can still be deleted (the unreachable one's guests are unknown
    // to libvirt, so nothing holds it).
    assert_eq!(c.ctl(&["delete", "hostpool/tbt-m"]).code, 0);
    wait_for(Duration::from_secs(60), "tbt-m to go", || async {
        client.api::<HostPool>().get_opt("tbt-m").await.ok()?.is_none().then_some(())
    })
    .await;
}

/// A proxy of libvirtd's socket that the test can take away and bring
/// back: libvirt unreachable, without touching the machine's libvirtd.
struct LibvirtProxy {
    socket: std::path::PathBuf,
    socat: Option<std::process::Child>,
}

impl LibvirtProxy {
    fn new(dir: &std::path::Path) -> Self {
        let mut p = LibvirtProxy { socket: dir.join("libvirt-proxy.sock"), socat: None };
        p.up();
        p
    }

    fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.socket.display())
    }

    fn up(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("socat")
            .arg(format!("UNIX-LISTEN:{},fork", self.socket.display()))
            .arg("UNIX-CONNECT:/run/libvirt/libvirt-sock")
            .process_group(0)
            .spawn()
            .expect("socat (hack/setup installs it)");
        self.socat = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            assert!(std::time::Instant::now() < deadline, "socat did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the proxy and every connection through it (socat's children,
    /// in the process group it leads).
    fn down(&mut self) {
        if let Some(mut c) = self.socat.take() {
            let pgid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for LibvirtProxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// libvirtd unreachable: the pool says so on its condition, its guest
/// keeps serving tests (its link is not libvirt's), nothing hangs, and it
/// recovers when libvirtd is back, with the same guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_says_libvirt_is_unreachable_and_recovers() {
    let Some(_turn) = libvirt::turn("tbt-r", &[]).await else { return };
    let c = Cluster::start(0).await;
    let mut proxy = LibvirtProxy::new(c.dir.path());
    let p =
        manifest(&c, "pool.yaml", &pool_yaml("tbt-r", &format!("  uri: \"{}\"\n  min: 1\n  max: 1\n", proxy.uri())));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let client = c.client().await;
    let available = |want: &'static str| {
        let client = client.clone();
        async move {
            let p = client.api::<HostPool>().get("tbt-r").await.ok()?;
            let cond = p.status().conditions.iter().find(|c| c.r#type == "Available")?.clone();
            let ready: Vec<String> =
                p.status().guests.iter().filter(|g| g.phase == "Ready").map(|g| g.name.clone()).collect();
            (cond.status == want && (want == "False" || ready.len() == 1)).then_some((cond, ready))
        }
    };
    let (_, ready) = wait_for(BOOT, "a Ready guest", || available("True")).await;
    let guest = ready[0].clone();

    proxy.down();
    let (cond, _) =
        wait_for(Duration::from_secs(60), "the pool to say libvirt is unreachable", || available("False")).await;
    assert_eq!(cond.reason, "LibvirtUnreachable", "{cond:?}");
    assert!(cond.message.contains("cannot reach libvirt"), "{cond:?}");
    // Nothing hangs: the CLI answers, and the guest still runs a test.
    let out = c.ctl(&["describe", "hostpool/tbt-r"]);
    assert!(out.code == 0 && out.stdout.contains("LibvirtUnreachable"), "{out:?}");
    let out = c.ctl(&["run", "--capability", "vm", "--timeout", "2m", "--", "hostname"]);
    assert_eq!((out.code, out.stdout.trim()), (0, guest.as_str()), "{out:?}");

    proxy.up();
    let (cond, ready) = wait_for(BOOT, "the pool to recover", || available("True")).await;
    assert_eq!(ready, std::slice::from_ref(&guest), "the same guest, cleaned: {cond:?}");
    assert_eq!(libvirt::domains("tbt-r-"), [guest]);
    delete_pool(&c, "tbt-r").await;
}

/// A guest that does not come up within bootTimeout (an image whose initrd
/// is garbage: the kernel panics) is destroyed and tried again with
/// backoff, the reason on the pool; nothing piles up in libvirt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_does_not_boot_in_time_is_retried_with_backoff() {
    let Some(_turn) = libvirt::turn("tbt-b", &[]).await else { return };
    let c = Cluster::start(0).await;
    let image = c.dir.path().join("broken-image");
    std::fs::create_dir(&image).unwrap();
    for part in ["vmlinuz", "golden.qcow2"] {
        std::os::unix::fs::symlink(libvirt::image().join(part), image.join(part)).unwrap();
    }
    std::fs::write(image.join("initrd.img"), b"not an initramfs").unwrap();
    let p = manifest(
        &c,
        "pool.yaml",
        &format!(
            "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-b}}\nspec:\n  provider: libvirt\n  image: {}\n  capabilities: [vm]\n  min: 1\n  max: 1\n  bootTimeout: 5s\n",
            image.display()
        ),
    );
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let client = c.client().await;
    let most = std::sync::atomic::AtomicUsize::new(0);
    let cond = wait_for(BOOT, "two boots in a row to fail", || async {
        most.fetch_max(libvirt::domains("tbt-b-").len(), std::sync::atomic::Ordering::Relaxed);
        let p = client.api::<HostPool>().get("tbt-b").await.ok()?;
        let cond = p.status().conditions.iter().find(|c| c.r#type == "Available")?.clone();
        (cond.reason == "GuestsFailing" && cond.message.starts_with("2 guests failed in a row")).then_some(cond)
    })
    .await;
    assert!(cond.message.contains("did not boot within 5s (console: "), "{cond:?}");
    assert!(cond.message.contains("creating again in"), "{cond:?}");
    let most = most.into_inner();
    assert!(most <= 1, "at most max guests at a time, failed ones destroyed first: {most}");
    delete_pool(&c, "tbt-b").await;
}

/// A pool whose guests' only link is vsock (virtio-vsock served by
/// vhost-device-vsock; no second serial line), from its example as it is:
/// a test runs on a guest whose agent says it came over vsock, and the next
/// test gets a new guest (vsock guests cannot be snapshotted, so clean
/// means made anew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_linked_only_over_vsock_runs_tests() {
    let Some(_turn) = libvirt::turn("vsock-vms", &[]).await else { return };
    let mut c = Cluster::start(0).await;
    let example = testbus_tests::repo_root().join("manifests/examples/pool-vsock.yaml").display().to_string();
    let out = c.ctl(&["apply", "-f", &example, "--wait", "--timeout", &format!("{}s", BOOT.as_secs())]);
    assert_eq!(out.code, 0, "{out:?}");
    let test = out.stdout.lines().find(|l| l.starts_with("test/")).unwrap().split_whitespace().next().unwrap();
    let logs = c.ctl(&["logs", test]).stdout;
    assert!(logs.contains("came in over vsock"), "{logs}");
    let run = |cmd: &str| {
        let out = c.ctl(&["run", "--capability", "vsock-vm", "--timeout", "4m", "--", "sh", "-c", cmd]);
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout.trim().to_string()
    };
    // Held by an open test while its domain is looked at: a used vsock
    // guest is destroyed as soon as its test ends (it cannot be reverted).
    let out = c.ctl(&["create", "test", "look", "--claim", "vm=vsock-vm", "--timeout", "10m", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let first = c.test("look").await.status().claims["vm"].clone();
    assert!(first.starts_with("vsock-vms-"), "{first:?}");
    let client = c.client().await;
    let h = client.api::<Host>().get(&first).await.unwrap();
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "vsock", "its agent came over vsock");
    let xml = libvirt::dumpxml(&first);
    assert!(xml.contains("vhost-user-vsock-pci") && !xml.contains("type='pty'"), "vsock is its only link: {xml}");
    let out = c.ctl(&["exec", "look", "--", "sh", "-c", "echo secret > /root/leftover"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(c.ctl(&["finish", "test/look"]).code, 0);

    let second = run("hostname; test ! -e /root/leftover");
    assert!(second.starts_with("vsock-vms-") && second != first, "a new guest: {first} then {second}");
    assert!(!libvirt::domains("vsock-vms-").contains(&first), "the used guest was destroyed");

    // A control plane killed while a guest is held: the guest's device
    // dies with it (it is no child of anything else, and nothing else
    // would end it).
    let dir = c.dir.path().display().to_string();
    let devices = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .filter(|cmd| cmd.contains("vhost-device-vsock") && cmd.contains(&dir) && !cmd.starts_with("setpriv"))
            .collect()
    };
    let out = c.ctl(&["create", "test", "hold", "--claim", "vm=vsock-vm", "--timeout", "10m", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    // One guest, one device (the device of the guest used last may still
    // be going).
    wait_for(Duration::from_secs(30), "one device, the held guest's", || async {
        (devices().len() == 1).then_some(())
    })
    .await;
    c.kill_control_plane();
    wait_for(Duration::from_secs(10), "the device to die with the control plane", || async {
        devices().is_empty().then_some(())
    })
    .await;
    c.start_control_plane().await;
    assert_eq!(c.ctl(&["delete", "test/hold"]).code, 0);
    delete_pool(&c, "vsock-vms").await;
    let guests_dir = c.dir.path().join("cp/guests");
    let left: Vec<_> =
        std::fs::read_dir(&guests_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // Each guest's device went with it.
    assert!(devices().is_empty(), "{:?}", devices());
}

/// The control plane killed while one guest is Ready and another still
/// boots: the next control plane links the Ready guest again (its Host
/// and test keep working) and replaces the one that never registered;
/// nothing is left behind in libvirt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_finds_its_guests_again() {
    let Some(_turn) = libvirt::turn("tbt-c", &[]).await else { return };
    let mut c = Cluster::start(0).await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbt-c", "  min: 1\n  max: 2\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let client = c.client().await;
    let first = wait_for(BOOT, "a Ready guest", || async {
        let (hs, _) = client.api::<Host>().list("testbus.io/pool=tbt-c", "").await.ok()?;
        hs.iter().find(|h| h.status().phase == "Ready").map(|h| h.name().to_string())
    })
    .await;
    // A test of two guests: a second one is made for it.
    let t = manifest(
        &c,
        "two.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: two}\nspec:\n  hosts: [{role: vm, capabilities: [vm], count: 2}]\n  steps: [{name: s, on: [vm], argv: [hostname]}]\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &t]).code, 0);
    let booting = wait_for(BOOT, "a second guest defined and not yet registered", || async {
        let hosts = client.api::<Host>();
        for d in libvirt::domains("tbt-c-") {
            if d != first && hosts.get_opt(&d).await.ok()?.is_none() {
                return Some(d);
            }
        }
        None
    })
    .await;
    c.kill_control_plane();
    c.start_control_plane().await;
    let client = c.client().await;
    let done = wait_for(BOOT, "the test to finish", || async {
        let t = client.api::<testbus_proto::Test>().get("two").await.ok()?;
        testbus_proto::phase::test_terminal(&t.status().phase).then_some(t)
    })
    .await;
    assert_eq!(done.status().phase, "Succeeded", "{:?}", done.status());
    let claimed: Vec<&String> = done.status().claims.values().collect();
    assert!(claimed.contains(&&first), "the Ready guest was linked again and used: {claimed:?}");
    assert!(!claimed.contains(&&booting), "the half-made guest was replaced: {claimed:?}");
    wait_for(Duration::from_secs(60), "the half-made guest to be destroyed", || async {
        (!libvirt::domains("tbt-c-").contains(&booting)).then_some(())
    })
    .await;
    delete_pool(&c, "tbt-c").await;
}

/// A pool on a remote testbed host (kvm-compose's multi-host testbeds):
/// its URI is qemu+ssh://, to a libvirtd behind an sshd in a namespace of
/// its own whose files, ptys and image directory this machine cannot see
/// (tests/scripts/remote-testbed.sh). Guests are made, linked, cleaned,
/// snapshotted and removed through libvirt alone: the disk a volume made
/// by libvirt, the console and the link console streams over the ssh
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_a_remote_testbed_host_works_over_ssh() {
    let Some(_turn) = libvirt::turn("tbt-rm", &[]).await else { return };
    let mut c = Cluster::start(0).await;
    let tb = libvirt::RemoteTestbed::start(&c);
    // The control plane's ssh reaches the testbed as an admin's ssh config
    // would make it: a wrapper first on its PATH (a pool's URI may name no
    // program: `command=` is refused).
    c.stop_control_plane(Duration::from_secs(10)).await;
    let path = format!("{}:{}", tb.ssh_dir().display(), std::env::var("PATH").unwrap_or_default());
    c.cp_env.push(("PATH".into(), path));
    c.start_control_plane().await;
    let here = |p: &std::path::Path| std::fs::read_dir(p).unwrap().count();
    assert_eq!(here(&tb.image()), 0, "the image is on the testbed only");
    // An image directory the testbed does not have: the pool says so, in
    // libvirt's words, and nothing is defined there.
    let missing = format!(
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-rmx}}\nspec:\n  provider: libvirt\n  uri: \"{}\"\n  image: /nonexistent/image\n  min: 1\n",
        tb.uri()
    );
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "missing.yaml", &missing)]).code, 0);
    let client = c.client().await;
    let failing = wait_for(Duration::from_secs(60), "tbt-rmx to say its image is missing", || async {
        let p = client.api::<HostPool>().get("tbt-rmx").await.ok()?;
        let cond = p.status().conditions.iter().find(|c| c.r#type == "Available")?.clone();
        (cond.reason == "GuestsFailing").then_some(cond)
    })
    .await;
    assert!(failing.message.contains("image /nonexistent/image: "), "{failing:?}");
    assert!(failing.message.contains("build it with hack/guest-image"), "{failing:?}");
    assert_eq!(tb.virsh(&["list", "--all", "--name"]).unwrap_or_default().trim(), "");
    delete_pool(&c, "tbt-rmx").await;
    let p = manifest(
        &c,
        "pool.yaml",
        &format!(
            "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: tbt-rm}}\nspec:\n  provider: libvirt\n  uri: \"{}\"\n  image: {}\n  capabilities: [vm]\n  max: 1\n",
            tb.uri(),
            tb.image().display()
        ),
    );
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let test = |name: &str, cmd: &str| vm_test(&c, name, cmd);
    let timeout = format!("{}s", BOOT.as_secs());
    let out = c.ctl(&["apply", "-f", &test("first", "echo secret > /root/leftover"), "--wait", "--timeout", &timeout]);
    assert_eq!(out.code, 0, "{out:?} {:?}", pool(&c, "tbt-rm").await.status());
    let guest = c.test("first").await.status().claims["vm"].clone();
    // The guest runs on the testbed, not here; its disk and console log
    // are volumes there, nothing of them here.
    assert_eq!(tb.virsh(&["list", "--name"]).unwrap_or_default().trim(), guest);
    assert!(libvirt::domains("tbt-rm-").is_empty());
    let image_pool = tb.virsh(&["pool-list", "--name"]).unwrap_or_default().trim().to_string();
    assert!(image_pool.starts_with("testbus"), "{image_pool:?}");
    assert!(tb.virsh(&["pool-refresh", &image_pool]).is_some());
    let volumes = tb.virsh(&["vol-list", "--pool", &image_pool]).unwrap_or_default();
    assert!(volumes.contains(&format!("{guest}.qcow2")), "{volumes}");
    assert!(volumes.contains(&format!("{guest}.console.log")), "{volumes}");
    assert_eq!(here(&tb.image()), 0);
    let h = client.api::<Host>().get(&guest).await.unwrap();
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "serial");

    // Cleaned between tests (its clean snapshot loaded through the remote
    // daemon, linked again over a new stream).
    let out = c.ctl(&["apply", "-f", &test("second", "test ! -e /root/leftover"), "--wait", "--timeout", &timeout]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(c.test("second").await.status().claims["vm"], guest, "the guest was reused");
    // What a clean took over ssh (shown with --nocapture).
    for l in c.read_log("control-plane").lines().filter(|l| l.contains("guest clean again")) {
        eprintln!("{l}");
    }

    // Snapshots through the API, kept by the remote daemon.
    let out = c.ctl(&["create", "test", "snap", "--claim", "vm=vm", "--timeout", "10m", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(c.ctl(&["snapshot", "create", &guest, "s1"]).code, 0);
    assert_eq!(c.ctl(&["snapshot", "list", &guest]).stdout, "s1\ntestbus-clean\n");
    let listed = tb.virsh(&["snapshot-list", &guest, "--name"]).unwrap_or_default();
    assert!(listed.contains("s1"), "{listed}");
    assert_eq!(c.ctl(&["snapshot", "delete", &guest, "s1"]).code, 0);
    assert_eq!(c.ctl(&["finish", "snap"]).code, 0);

    // Deleted: nothing is left on the testbed but the image.
    delete_pool(&c, "tbt-rm").await;
    assert_eq!(tb.virsh(&["list", "--all", "--name"]).unwrap_or_default().trim(), "");
    let pools = tb.virsh(&["pool-list", "--all", "--name"]).unwrap_or_default();
    assert_eq!(pools.trim(), "", "libvirt's view of the image directory went with the last guest");
    let private = tb.image().with_file_name("image-private");
    let mut left: Vec<String> =
        std::fs::read_dir(private).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["golden.qcow2", "initrd.img", "vmlinuz"]);
}

/// The pytest plugin on pool guests (issue 30): tests of one topology share
/// a claim, but on pool guests each gets clean machines: a file the first
/// test wrote is gone for the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pytest_plugin_gives_each_test_a_clean_guest() {
    let Some(_turn) = libvirt::turn("tbt-py", &[]).await else { return };
    let c = Cluster::start(0).await;
    let p = manifest(&c, "pool.yaml", &pool_yaml("tbt-py", "  min: 1\n  max: 1\n"));
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let cases = manifest(
        &c,
        "test_guests.py",
        r#"import pytest

VM = dict(name="vm", vm="vm")


@pytest.mark.topology(**VM)
def test_a_leaves_a_mark(vm):
    vm.run("touch /tmp/left-by-a")


@pytest.mark.topology(**VM)
def test_b_finds_a_clean_guest(vm):
    assert vm.run(["test", "-e", "/tmp/left-by-a"], check=False).rc == 1
"#,
    );
    let py = testbus_tests::python_venv("python-venv", false);
    let server = format!("--testbus-server={}", c.server);
    let out = std::process::Command::new(&py)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            &server,
            "--rootdir",
            &c.dir.path().display().to_string(),
        ])
        .arg(&cases)
        .env("TESTBUS_CONFIG", c.dir.path().join("admin.yaml"))
        .env_remove("TESTBUS_SERVER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2 passed"), "{stdout}");
    delete_pool(&c, "tbt-py").await;
}
