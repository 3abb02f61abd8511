//! Isolated guests behind testbus-relay: each guest is a network namespace
//! with loopback only, whose agent reaches the control plane through a
//! relay over a real link — a socat pty pair (a serial line), a noisy line
//! between two pty pairs, OpenSSH, a two-hop chain, unix and tcp links.
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;
use testbus_proto::states::HostPhase;
use testbus_proto::Resource;
use testbus_relay::noise::{copy_noisy, Noise};
use testbus_tests::{manifest, metric_sum, needs_root, wait_for, Cluster};

const CP: &str = "tcp:10.77.0.1:7780";

/// Exits 0 when a vsock connection to CID 1 (loopback) works.
const VSOCK_PROBE: &str = "import socket\ns=socket.socket(socket.AF_VSOCK,socket.SOCK_STREAM)\ns.bind((socket.VMADDR_CID_ANY,17799));s.listen()\nc=socket.socket(socket.AF_VSOCK,socket.SOCK_STREAM);c.settimeout(2);c.connect((1,17799))";

async fn wait_path(p: &Path) {
    wait_for(Duration::from_secs(10), &format!("{} to exist", p.display()), || async { p.exists().then_some(()) })
        .await;
}

/// A linked pty pair made by socat: (one end, the other end, socat's pid).
async fn pty_pair(c: &mut Cluster, name: &str) -> (PathBuf, PathBuf, u32) {
    let a = c.dir.path().join(format!("{name}-a"));
    let b = c.dir.path().join(format!("{name}-b"));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let pid = c.spawn_logged(
        None,
        &format!("socat-{name}"),
        "socat",
        &[&format!("pty,raw,echo=0,link={}", a.display()), &format!("pty,raw,echo=0,link={}", b.display())],
    );
    wait_path(&a).await;
    wait_path(&b).await;
    (a, b, pid)
}

/// An isolated guest `name`: its relay (downstream a unix socket, upstream
/// `upstream`) and its agent, both in a namespace with loopback only.
async fn start_guest(c: &mut Cluster, name: &str, upstream: &str, relay_args: &[&str]) {
    c.isolated_node(name);
    let sock = c.dir.path().join(format!("{name}.sock"));
    let down = format!("unix:{}", sock.display());
    let mut args = vec!["--downstream", &down, "--upstream", upstream];
    args.extend_from_slice(relay_args);
    c.spawn_logged(Some(name), &format!("relay-{name}"), "testbus-relay", &args);
    wait_path(&sock).await;
    let data = c.dir.path().join(name);
    // TLS end to end: the agent joins, and speaks TLS, through the relays,
    // which hold no key.
    let (server, data, etc) =
        (format!("unix+tls:{}", sock.display()), data.display().to_string(), data.join("etc").display().to_string());
    let token = c.join_token.clone();
    c.spawn_logged(
        Some(name),
        name,
        "testbus-agent",
        &[
            "--server",
            &server,
            "--join-token",
            &token,
            "--name",
            name,
            "--data-dir",
            &data,
            "--config-dir",
            &etc,
            "--lease-duration",
            "2s",
            "--capability",
            "linux",
        ],
    );
    c.host_phase(name, HostPhase::Ready.as_str()).await;
}

/// Runs a two-host test between the guest and host-0: a barrier, a 1 MB
/// file to both, and 40,000 lines of output from each; checks that every
/// byte arrived intact both ways.
async fn exchange_through(c: &Cluster, guest: &str, test: &str) {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(c.dir.path().join("blob.bin"), &data).unwrap();
    let digest = hex_sha256(&data);
    let path = manifest(
        c,
        &format!("{test}.yaml"),
        &format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {test}}}
spec:
  files: [{{source: blob.bin, path: blob.bin}}]
  hosts: [{{role: guest, host: {guest}}}, {{role: peer, host: host-0}}]
  steps:
    - name: s
      on: [guest, peer]
      script: |
        testbusctl sync meet --timeout 60s
        sha256sum blob.bin
        seq 1 40000
        echo "transport done $TESTBUS_HOST"
"#
        ),
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "120s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let logs = c.ctl(&["logs", &format!("test/{test}")]).stdout;
    for (role, host) in [("guest", guest), ("peer", "host-0")] {
        let prefix = format!("[{role}/{host}] ");
        let lines: Vec<&str> = logs.lines().filter_map(|l| l.strip_prefix(&prefix)).collect();
        assert_eq!(
            lines.first().copied(),
            Some(format!("{digest}  blob.bin").as_str()),
            "{role}: the file arrived intact"
        );
        let numbers: Vec<String> = (1..=40_000).map(|i| i.to_string()).collect();
        assert!(lines[1..40_001] == numbers[..], "{role}: every line of output, in order");
        assert_eq!(lines[40_001], format!("transport done {host}"));
    }
}

fn hex_sha256(data: &[u8]) -> String {
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_behind_a_serial_line_runs_tests_and_survives_the_line_going_away() {
    if !needs_root("the relay tests") {
        return;
    }
    let mut c = Cluster::start(1).await;
    let (host_end, guest_end, socat) = pty_pair(&mut c, "serial").await;
    let down = format!("serial:{}", host_end.display());
    c.spawn_logged(Some("cp"), "relay-host", "testbus-relay", &["--downstream", &down, "--upstream", CP]);
    start_guest(&mut c, "guest", &format!("serial:{}", guest_end.display()), &[]).await;

    let h = c.host_phase("guest", HostPhase::Ready.as_str()).await;
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "serial");
    let h0 = c.host_phase("host-0", HostPhase::Ready.as_str()).await;
    assert_eq!(h0.status().facts.as_ref().unwrap().transport, "direct");
    let out = c.ctl(&["run", "--host", "guest", "--", "sh", "-c", "echo hello from $TESTBUS_HOST"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "hello from guest\n"), "{out:?}");
    exchange_through(&c, "guest", "serial").await;

    // The line goes away (the pty pair is destroyed, as when a guest
    // reboots): the guest is lost, then back once the line returns.
    c.kill_extra(socat);
    c.host_phase("guest", HostPhase::NotReady.as_str()).await;
    let (_, _, _) = pty_pair(&mut c, "serial").await;
    c.host_phase("guest", HostPhase::Ready.as_str()).await;
    let out = c.ctl(&["run", "--host", "guest", "--", "echo", "back"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "back\n"), "{out:?}");
    assert!(c.read_log("relay-guest").contains("link down"), "the guest's link was rebuilt");
}

fn open_rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_line_delivers_every_byte_intact() {
    if !needs_root("the relay tests") {
        return;
    }
    let mut c = Cluster::start(1).await;
    // host relay ⇄ pty pair 1 ⇄ noise ⇄ pty pair 2 ⇄ guest relay
    let (host_end, noise_a, _) = pty_pair(&mut c, "line1").await;
    let (noise_b, guest_end, _) = pty_pair(&mut c, "line2").await;
    let (a, b) = (open_rw(&noise_a), open_rw(&noise_b));
    let rate = 1e-4;
    // Corruption, loss and duplication, each at `rate` per byte.
    let noise = Noise { corrupt: rate, drop: rate, duplicate: rate, invent: 0.0 };
    let file = |f: std::fs::File| tokio::fs::File::from_std(f);
    tokio::spawn(copy_noisy(file(a.try_clone().unwrap()), file(b.try_clone().unwrap()), noise, 1));
    tokio::spawn(copy_noisy(file(b), file(a), noise, 2));
    let down = format!("serial:{}", host_end.display());
    c.spawn_logged(Some("cp"), "relay-host", "testbus-relay", &["--downstream", &down, "--upstream", CP]);
    let metrics = ["--metrics-listen", "127.0.0.1:9465"];
    start_guest(&mut c, "guest", &format!("serial:{}", guest_end.display()), &metrics).await;
    exchange_through(&c, "guest", "noisy").await;
    // The guest's relay counted what the noise cost it.
    let (status, s) = c.scrape("guest", "http://127.0.0.1:9465/metrics", &[]);
    assert_eq!(status, 200);
    let count = |name: &str| metric_sum(&s, name, &[]);
    assert!(count("testbus_relay_link_frames_sent_total") > 100.0, "{s}");
    assert!(count("testbus_relay_link_retransmissions_total") > 0.0, "{s}");
    assert!(count("testbus_relay_link_frames_rejected_total") > 0.0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_hop_chain_and_socket_links_carry_a_test() {
    if !needs_root("the relay tests") {
        return;
    }
    let mut c = Cluster::start(1).await;
    // guest ─serial─▶ relay A ─mux+tcp─▶ relay B ─tcp─▶ control plane
    let (near, far, _) = pty_pair(&mut c, "hop").await;
    c.spawn_logged(
        Some("cp"),
        "relay-b",
        "testbus-relay",
        &["--downstream", "mux+tcp:10.77.0.1:9100", "--upstream", CP],
    );
    let down = format!("serial:{}", near.display());
    c.spawn_logged(
        Some("cp"),
        "relay-a",
        "testbus-relay",
        &["--downstream", &down, "--upstream", "mux+tcp:10.77.0.1:9100"],
    );
    start_guest(&mut c, "chained", &format!("serial:{}", far.display()), &[]).await;
    exchange_through(&c, "chained", "chain").await;

    // A guest on a unix link: relay C listens on a socket for links.
    let link = c.dir.path().join("link.sock");
    let down = format!("mux+unix:{}", link.display());
    c.spawn_logged(Some("cp"), "relay-c", "testbus-relay", &["--downstream", &down, "--upstream", CP]);
    wait_path(&link).await;
    start_guest(&mut c, "unixguest", &format!("mux+unix:{}", link.display()), &[]).await;
    let h = c.host_phase("unixguest", HostPhase::Ready.as_str()).await;
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "unix");
    let out = c.ctl(&["run", "--host", "unixguest", "--", "echo", "over a unix link"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "over a unix link\n"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reached_over_ssh_runs_tests() {
    if !needs_root("the relay tests") {
        return;
    }
    // Two hosts; host-1's namespace becomes the SSH guest (its own agent
    // is stopped), reachable at 10.77.0.3 only by SSH from the cp side.
    let mut c = Cluster::start(2).await;
    c.kill_agent(1);
    let dir = c.dir.path().to_path_buf();
    let keygen = |path: &Path| {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "ssh-keygen");
    };
    keygen(&dir.join("host_key"));
    keygen(&dir.join("id"));
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let d = dir.display();
    let conf = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).unwrap();
        dir.join(name).display().to_string()
    };
    let sshd_config = conf(
        "sshd_config",
        format!(
            "Port 2222\nListenAddress 10.77.0.3\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nPidFile none\n"
        ),
    );
    c.spawn_logged(Some("host-1"), "sshd", "/usr/sbin/sshd", &["-D", "-e", "-f", &sshd_config]);
    let ssh_config = conf(
        "ssh_config",
        format!(
            "Host guest\n  HostName 10.77.0.3\n  Port 2222\n  User root\n  IdentityFile {d}/id\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        ),
    );
    // The cp side runs ssh; the far relay listens on a unix socket in the
    // guest, where the guest's agent connects.
    let sock = dir.join("ssh-guest.sock");
    let relay_bin = testbus_tests::bin_dir().join("testbus-relay");
    let down = format!("ssh:guest?config={}&relay={}&remote=unix:{}", ssh_config, relay_bin.display(), sock.display());
    c.spawn_logged(Some("cp"), "relay-ssh", "testbus-relay", &["--downstream", &down, "--upstream", CP]);
    wait_for(Duration::from_secs(30), "the far relay's socket", || async { sock.exists().then_some(()) }).await;
    let server = format!("unix+tls:{}", sock.display());
    let data = dir.join("sshguest").display().to_string();
    let etc = dir.join("sshguest/etc").display().to_string();
    let token = c.join_token.clone();
    c.spawn_logged(
        Some("host-1"),
        "sshguest",
        "testbus-agent",
        &[
            "--server",
            &server,
            "--join-token",
            &token,
            "--name",
            "sshguest",
            "--data-dir",
            &data,
            "--config-dir",
            &etc,
            "--lease-duration",
            "2s",
        ],
    );
    let h = c.host_phase("sshguest", HostPhase::Ready.as_str()).await;
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "ssh");
    exchange_through(&c, "sshguest", "ssh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_on_vsock_runs_tests_where_the_kernel_has_vsock_loopback() {
    if !needs_root("the relay tests") {
        return;
    }
    // vsock loopback (CID 1) needs the kernel's vsock_loopback transport;
    // the machines this project runs on lack it (connects time out), so
    // there this test can only say so. README lists it as untested.
    let probe = std::process::Command::new("python3")
        .args(["-c", VSOCK_PROBE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !probe {
        eprintln!("NOT TESTED: this kernel has no vsock loopback; the vsock endpoint was not exercised");
        return;
    }
    let mut c = Cluster::start(1).await;
    c.spawn_logged(
        Some("cp"),
        "relay-vsock-host",
        "testbus-relay",
        &["--downstream", "vsock:any:17781", "--upstream", CP],
    );
    start_guest(&mut c, "vguest", "vsock:1:17781", &[]).await;
    let h = c.host_phase("vguest", HostPhase::Ready.as_str()).await;
    assert_eq!(h.status().facts.as_ref().unwrap().transport, "vsock");
    let out = c.ctl(&["run", "--host", "vguest", "--", "echo", "over vsock"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "over vsock\n"), "{out:?}");
}

/// A relay carries at most --max-clients plain clients at once: one more
/// is closed as soon as it is accepted (code behind a guest's relay cannot
/// use up the control plane's connections), and a freed slot serves the
/// next; 0 is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_carries_at_most_max_clients_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = up.local_addr().unwrap().port();
    // The "control plane": echoes what each connection sends.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = up.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let sock = dir.path().join("relay.sock");
    let relay = testbus_tests::bin_dir().join("testbus-relay");
    let downstream = format!("unix:{}", sock.display());
    let upstream = format!("tcp:127.0.0.1:{port}");
    let _relay = tokio::process::Command::new(&relay)
        .args(["--downstream", &downstream, "--upstream", &upstream, "--max-clients", "2"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    testbus_tests::wait_for(Duration::from_secs(10), "the relay to listen", || async { sock.exists().then_some(()) })
        .await;
    // 1: carried (its byte comes back); 0: closed by the relay.
    async fn echo(c: &mut tokio::net::UnixStream) -> usize {
        if c.write_all(b"x").await.is_err() {
            return 0;
        }
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await.expect("an answer or a close").unwrap_or(0)
    }
    let mut a = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut b = tokio::net::UnixStream::connect(&sock).await.unwrap();
    assert_eq!((echo(&mut a).await, echo(&mut b).await), (1, 1));
    let mut third = tokio::net::UnixStream::connect(&sock).await.unwrap();
    assert_eq!(echo(&mut third).await, 0, "a third client is closed");
    assert_eq!(echo(&mut a).await, 1, "the first two are still carried");
    drop(a);
    testbus_tests::wait_for(Duration::from_secs(10), "a freed slot to serve a new client", || async {
        let mut c = tokio::net::UnixStream::connect(&sock).await.ok()?;
        (echo(&mut c).await == 1).then_some(())
    })
    .await;
    let out = std::process::Command::new(&relay)
        .args(["--downstream", &downstream, "--upstream", &upstream, "--max-clients", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--max-clients"), "{out:?}");

    // Through a link: the far relay (a guest's, whose code could speak the
    // link's framing itself) lets any number through; the near one (the
    // host's) carries two streams at once.
    let link = dir.path().join("link.sock");
    let guest_sock = dir.path().join("guest.sock");
    let _host = tokio::process::Command::new(&relay)
        .args(["--downstream", &format!("mux+unix:{}", link.display()), "--upstream", &upstream, "--max-clients", "2"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    testbus_tests::wait_for(Duration::from_secs(10), "the host relay to listen", || async {
        link.exists().then_some(())
    })
    .await;
    let _guest = tokio::process::Command::new(&relay)
        .args(["--downstream", &format!("unix:{}", guest_sock.display())])
        .args(["--upstream", &format!("mux+unix:{}", link.display()), "--max-clients", "100"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // (The first one waits for the link to come up.)
    let mut first = testbus_tests::wait_for(Duration::from_secs(10), "a stream carried", || async {
        let mut c = tokio::net::UnixStream::connect(&guest_sock).await.ok()?;
        (echo(&mut c).await == 1).then_some(c)
    })
    .await;
    let mut second = tokio::net::UnixStream::connect(&guest_sock).await.unwrap();
    assert_eq!(echo(&mut second).await, 1);
    let mut third = tokio::net::UnixStream::connect(&guest_sock).await.unwrap();
    assert_eq!(echo(&mut third).await, 0, "a third stream is closed by the host's relay");
    assert_eq!((echo(&mut first).await, echo(&mut second).await), (1, 1), "the first two are still carried");
}
