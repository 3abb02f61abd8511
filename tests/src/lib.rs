//! The end-to-end harness: a [`Cluster`] is a real control plane and real
//! agents, started from the built binaries. As root (always in CI) every
//! process runs in its own network namespace on a private bridge
//! (`hack/netns`), so each host has its own address; otherwise they run as
//! local processes on loopback.
//!
//! Ownership: the cluster owns every process it starts and kills them (by
//! PID) and its namespaces when dropped.
#![forbid(unsafe_code)]

pub mod chaos;
pub mod etcd;
pub mod history;
pub mod libvirt;
pub mod podman;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use testbus_client::Client;
use testbus_proto::states::{HostPhase, ProcessPhase};
use testbus_proto::{Host, Resource, Test};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Where the workspace's binaries were built.
/// The value at fraction `p` (0–1) of sorted samples; 0 when there are
/// none. For benchmarks.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Whether a test that needs network namespaces can run: as root it must;
/// as a normal user it says it skipped, and CI (root) never lets it.
pub fn needs_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "{what} need root in CI");
    eprintln!("skipped: {what} need network namespaces (root)");
    false
}

/// Where the workspace's binaries are: next to the running executable (a
/// benchmark in target/release), or one level up (a test in
/// target/debug/deps).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable dir");
    if dir.join("testbus-agent").exists() {
        return dir.to_path_buf();
    }
    dir.parent().expect("target dir").to_path_buf()
}

/// The sum of the samples `name` of a [`Cluster::scrape`] that carry every
/// label of `labels` with its value (every sample, for none).
pub fn metric_sum(samples: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples[name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name} in {samples}"))
        .iter()
        .filter(|s| labels.iter().all(|(k, v)| s[0][*k] == *v))
        .map(|s| s[1].as_f64().unwrap_or(0.0))
        .sum()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// TESTBUS_CONFIG for a config file: empty (none) where there is none (a
/// cluster without TLS has no users).
fn config_env(config: &Path) -> &std::ffi::OsStr {
    if config.exists() {
        config.as_os_str()
    } else {
        std::ffi::OsStr::new("")
    }
}

/// Where a cluster's processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// Network namespaces as root, else loopback; TLS.
    Auto,
    /// Loopback, with or without TLS.
    Loopback { tls: bool },
}

/// How [`Cluster::partition`] cuts a node off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Healed: link up, nothing dropped.
    None,
    /// Link down: nothing in, nothing out.
    Both,
    /// It sends, but hears nothing.
    Inbound,
    /// It hears, but what it sends is lost.
    Outbound,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    netns: Option<String>,
    /// Address agents reach the control plane at (its TLS listener).
    pub agent_server: String,
    /// The token agents join with (made once the control plane is up).
    pub join_token: String,
    listen: String,
    /// Address the CLI and the test use (the control plane's unix socket).
    pub server: String,
    cp: Option<Child>,
    agents: Vec<Option<Child>>,
    pub hosts: Vec<String>,
    /// Extra agent flags.
    pub agent_args: Vec<String>,
    /// Other processes started by a test (relays, extra agents).
    extra: Vec<Child>,
    /// Extra control-plane flags.
    pub cp_args: Vec<String>,
    /// Extra control-plane environment (PATH with an ssh wrapper, ...).
    pub cp_env: Vec<(String, String)>,
    /// A tmpfs mounted over the control plane's data dir (small-disk tests).
    tmpfs: Option<PathBuf>,
    /// etcd the control plane stores its state in, in its namespace.
    pub etcd: Option<etcd::EtcdCluster>,
    /// The node whose namespace testbusctl runs in (None: this one), so that
    /// it can reach TCP addresses inside the namespaces.
    pub ctl_node: Option<String>,
}

impl Cluster {
    /// A control plane and `n` agents named host-0 .. host-{n-1}, all Ready.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    pub async fn start_with(n: usize, agent_args: &[&str]) -> Cluster {
        Self::start_full(n, agent_args, &[]).await
    }

    /// With extra agent and control-plane flags.
    pub async fn start_full(n: usize, agent_args: &[&str], cp_args: &[&str]) -> Cluster {
        Self::start_disk(n, agent_args, cp_args, None, 0, Net::Auto).await
    }

    /// Every process on loopback, whoever runs it, with TLS or without
    /// (`--insecure`, which serves loopback only): for benchmarks that
    /// compare the two on the same footing.
    pub async fn start_loopback(n: usize, tls: bool) -> Cluster {
        Self::start_disk(n, &[], &[], None, 0, Net::Loopback { tls }).await
    }

    /// [`Cluster::start_loopback`] with TLS and `cp_args`: the control
    /// plane in this machine's own network namespace (where libvirt makes
    /// its networks).
    pub async fn start_loopback_with(n: usize, cp_args: &[&str]) -> Cluster {
        Self::start_disk(n, &[], cp_args, None, 0, Net::Loopback { tls: true }).await
    }

    /// [`Cluster::start_loopback`] without TLS, with `cp_args`.
    pub async fn start_loopback_insecure(n: usize, cp_args: &[&str]) -> Cluster {
        Self::start_disk(n, &[], cp_args, None, 0, Net::Loopback { tls: false }).await
    }

    /// The control plane's data dir on a tmpfs of `mb` MiB (root only).
    pub async fn start_small_disk(n: usize, cp_args: &[&str], mb: u32) -> Cluster {
        Self::start_disk(n, &[], cp_args, Some(mb), 0, Net::Auto).await
    }

    /// The control plane on an etcd of `members` members, each in a
    /// network namespace of its own (`etcd0`, ... at 10.77.0.201, ...) as
    /// root, else on loopback here.
    pub async fn start_on_etcd(n: usize, members: usize) -> Cluster {
        Self::start_on_etcd_with(n, members, &[]).await
    }

    /// [`Cluster::start_on_etcd`] with extra control-plane flags.
    pub async fn start_on_etcd_with(n: usize, members: usize, cp_args: &[&str]) -> Cluster {
        Self::start_disk(n, &[], cp_args, None, members, Net::Auto).await
    }

    async fn start_disk(
        n: usize,
        agent_args: &[&str],
        cp_args: &[&str],
        tmpfs_mb: Option<u32>,
        etcd_members: usize,
        net: Net,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts: Vec<String> = (0..n).map(|i| format!("host-{i}")).collect();
        let insecure = net == Net::Loopback { tls: false };
        let (netns, listen, agent_server) = if is_root() && net == Net::Auto {
            let id = format!("tbt{}n{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::SeqCst));
            let mut args = vec!["up".to_string(), id.clone(), "cp".into()];
            args.extend(hosts.iter().cloned());
            let st = Command::new(repo_root().join("hack/netns")).args(&args).stdout(Stdio::null()).status();
            assert!(st.is_ok_and(|s| s.success()), "hack/netns up failed");
            (Some(id), "10.77.0.1:7780".to_string(), "https://10.77.0.1:7780".to_string())
        } else {
            assert!(
                std::env::var("CI").is_err() || net != Net::Auto,
                "end-to-end tests run as root in CI (network namespaces); refusing to fall back"
            );
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let scheme = if insecure { "http" } else { "https" };
            (None, format!("127.0.0.1:{port}"), format!("{scheme}://127.0.0.1:{port}"))
        };
        let server = format!("unix:{}", dir.path().join("cp/api.sock").display());
        let mut c = Cluster {
            dir,
            bin: bin_dir(),
            netns,
            agent_server,
            join_token: String::new(),
            listen,
            server,
            cp: None,
            agents: (0..n).map(|_| None).collect(),
            hosts,
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            extra: Vec::new(),
            cp_args: cp_args.iter().map(|s| s.to_string()).chain(insecure.then(|| "--insecure".to_string())).collect(),
            cp_env: Vec::new(),
            tmpfs: None,
            etcd: None,
            ctl_node: None,
        };
        if etcd_members > 0 {
            // With namespaces, each member in one of its own (10.77.0.201,
            // ...), so that a partition can cut one off.
            let e = match c.netns.is_some() {
                true => etcd::EtcdCluster::start_on(
                    &(0..etcd_members).map(|i| c.add_node(&format!("etcd{i}"), 201 + i as u8)).collect::<Vec<_>>(),
                ),
                false => etcd::EtcdCluster::start_in(etcd_members, None),
            };
            c.cp_args.extend(["--store".to_string(), e.url("/testbus")]);
            c.etcd = Some(e);
        }
        if let Some(mb) = tmpfs_mb {
            let dir = c.dir.path().join("cp");
            std::fs::create_dir_all(&dir).unwrap();
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(st.success(), "mount tmpfs");
            c.tmpfs = Some(dir);
        }
        c.start_control_plane().await;
        if !insecure {
            c.join_token = c.create_token("1h").await;
            c.write_user_config("admin", "admin");
        }
        for i in 0..n {
            c.start_agent(i);
        }
        c.wait_hosts_ready(n).await;
        c
    }

    /// Adds a network namespace `node` on the cluster's bridge with address
    /// 10.77.0.N (as root, with namespaces): its name, and its address.
    pub fn add_node(&self, node: &str, n: u8) -> (String, String) {
        let id = self.netns.as_ref().expect("add_node needs the cluster's network namespaces (root)");
        let st = Command::new(repo_root().join("hack/netns"))
            .args(["add", id, node, &n.to_string()])
            .stdout(Stdio::null())
            .status();
        assert!(st.is_ok_and(|s| s.success()), "hack/netns add failed");
        (format!("{id}-{node}"), format!("10.77.0.{n}"))
    }

    /// `program` to run in `node`'s network namespace (here without
    /// namespaces). Only the network namespace is entered: unlike `ip netns
    /// exec`, which remounts /sys in a mount namespace of its own, this
    /// keeps the machine's cgroup hierarchy in view, where agents contain
    /// their processes.
    pub fn command_in(&self, node: &str, program: &Path) -> Command {
        match &self.netns {
            Some(id) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{id}-{node}")).arg("--").arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{name}.log"))).unwrap()
    }

    pub async fn start_control_plane(&mut self) {
        self.spawn_control_plane();
        // Ready when the API answers on its socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = Client::connect(&self.server).await {
                if c.api::<Host>().list("", "").await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "control plane did not come up; log:\n{}",
                self.read_log("control-plane")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the control plane without waiting for it.
    pub fn spawn_control_plane(&mut self) {
        assert!(self.cp.is_none(), "control plane already running");
        let mut cmd = self.command_in("cp", &self.bin.join("testbus-control-plane"));
        // A short grace unless the test chose one.
        let grace =
            if self.cp_args.iter().any(|a| a == "--lease-grace") { vec![] } else { vec!["--lease-grace", "1s"] };
        cmd.args(["--listen", &self.listen, "--data-dir"])
            .arg(self.dir.path().join("cp"))
            .args(grace)
            .args(&self.cp_args)
            .envs(self.cp_env.iter().map(|(k, v)| (k, v)))
            .stdout(self.log("control-plane"))
            .stderr(self.log("control-plane"));
        self.cp = Some(cmd.spawn().expect("start control plane"));
    }

    /// A join token for agents, made through the control plane's socket.
    pub async fn create_token(&self, ttl: &str) -> String {
        let r = self
            .client()
            .await
            .auth()
            .create_token(testbus_proto::CreateTokenRequest {
                ttl: ttl.into(),
                pool: String::new(),
                host_name: String::new(),
                ..Default::default()
            })
            .await
            .expect("create a join token");
        r.into_inner().token
    }

    /// The testbusctl config of a user `name` in `role` (admin or viewer),
    /// made by `testbus-control-plane user create` into the cluster's dir;
    /// returns its path. "admin" is what [`Cluster::ctl`] runs with.
    pub fn write_user_config(&self, name: &str, role: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.yaml"));
        let out = Command::new(self.bin.join("testbus-control-plane"))
            .args(["user", "create", name, "--role", role, "--server", &self.agent_server, "--out"])
            .arg(&path)
            .arg("--data-dir")
            .arg(self.dir.path().join("cp"))
            .output()
            .expect("run testbus-control-plane user create");
        assert!(out.status.success(), "user create: {}", String::from_utf8_lossy(&out.stderr));
        path
    }

    /// A user's credentials as PEM files for other clients (Python's):
    /// the CA, the certificate and the key, by path.
    pub fn pem_files(&self, name: &str, f: &testbus_pki::ClientFile) -> [String; 3] {
        let write = |file: String, text: &str| {
            let p = self.dir.path().join(file);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        [
            write(format!("{name}-ca.pem"), &f.certificate_authority),
            write(format!("{name}.crt"), &f.client_certificate),
            write(format!("{name}.key"), &f.client_key),
        ]
    }

    /// Scrapes Prometheus metrics at `url` from `node`'s namespace with
    /// Prometheus's own parser (tests/scripts/scrape.py); `creds` are the
    /// CA, and a certificate and key if any. The HTTP status, and the
    /// samples by name as `[labels, value]` pairs.
    pub fn scrape(&self, node: &str, url: &str, creds: &[String]) -> (i64, serde_json::Value) {
        let out = self
            .command_in(node, Path::new("/usr/bin/python3"))
            .arg(repo_root().join("tests/scripts/scrape.py"))
            .arg(url)
            .args(creds)
            .output()
            .expect("python3");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        (v["status"].as_i64().unwrap_or(0), v["samples"].clone())
    }

    /// Agent `host`'s certificate and key, by path.
    pub fn agent_pem_files(&self, host: &str) -> [String; 2] {
        let dir = self.dir.path().join(host).join("tls");
        [dir.join("agent.crt").display().to_string(), dir.join("agent.key").display().to_string()]
    }

    /// The TLS settings of agent `host`'s certificate, read from its data
    /// dir (to call the API as that agent).
    pub fn agent_tls(&self, host: &str) -> testbus_client::Tls {
        let dir = self.dir.path().join(host).join("tls");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("the agent's credentials");
        let cfg = testbus_pki::client_config(&read("ca.crt"), Some((&read("agent.crt"), &read("agent.key"))));
        testbus_client::Tls::new(cfg.expect("the agent's credentials"))
    }

    /// SIGTERM, as a service manager stops it; waits up to `within` for it
    /// to exit and returns how it did (None: it was still running, and was
    /// then killed).
    pub async fn stop_control_plane(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.cp.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the control plane");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(st) = c.try_wait().expect("wait for the control plane") {
                return Some(st);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill_control_plane(&mut self) {
        if let Some(mut c) = self.cp.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_binary(i, &self.bin.join("testbus-agent"));
    }

    /// The workspace's testbus-agent binary.
    pub fn agent_binary(&self) -> PathBuf {
        self.bin.join("testbus-agent")
    }

    /// Starts agent `i` from `binary` (another build of it: an upgrade).
    pub fn start_agent_binary(&mut self, i: usize, binary: &Path) {
        assert!(self.agents[i].is_none(), "agent {i} already running");
        let name = self.hosts[i].clone();
        let mut cmd = self.command_in(&name, binary);
        let lease = if self.agent_args.iter().any(|a| a == "--lease-duration") {
            vec![]
        } else {
            vec!["--lease-duration", "2s"]
        };
        // Without a token, the agent uses the certificate in its data dir.
        let token = if self.join_token.is_empty() { vec![] } else { vec!["--join-token", &self.join_token] };
        cmd.args(["--server", &self.agent_server, "--name", &name])
            .args(token)
            .args(lease)
            .arg("--data-dir")
            .arg(self.dir.path().join(&name))
            .arg("--config-dir")
            .arg(self.dir.path().join(&name).join("etc"))
            .args(["--capability", "linux", "--label", &format!("index={i}")])
            .args(&self.agent_args)
            .stdout(self.log(&name))
            .stderr(self.log(&name));
        self.agents[i] = Some(cmd.spawn().expect("start agent"));
    }

    /// Runs `f` on a thread of its own inside `node`'s network namespace
    /// (here without namespaces), on a runtime of its own: the sockets it
    /// makes reach what that node reaches.
    pub fn in_node<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        let ns = self.netns.as_ref().map(|id| format!("/run/netns/{id}-{node}"));
        std::thread::spawn(move || {
            if let Some(ns) = ns {
                let fd = std::fs::File::open(&ns).expect("open the namespace");
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(f())
        })
        .join()
        .expect("the thread in the namespace")
    }

    /// A namespace `node` with loopback only (no route anywhere): an
    /// isolated guest that reaches the control plane only through a relay.
    /// Deleted with the cluster.
    pub fn isolated_node(&self, node: &str) {
        let id = self.netns.as_ref().expect("isolated guests need network namespaces (root)");
        let ns = format!("{id}-{node}");
        for args in [vec!["netns", "add", &ns], vec!["-n", &ns, "link", "set", "lo", "up"]] {
            let st = Command::new("ip").args(&args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        }
    }

    /// Starts one of the workspace's binaries inside `node`'s namespace
    /// (e.g. "host-0"); it is killed with the cluster.
    pub fn spawn_in(&mut self, node: &str, binary: &str, args: &[&str]) {
        self.spawn_logged(Some(node), binary, binary, args);
    }

    /// Starts `program` (one of the workspace's binaries, or a command on
    /// PATH) in `node`'s namespace, or here with None, logging to
    /// `NAME.log`; killed with the cluster. Returns its pid.
    pub fn spawn_logged(&mut self, node: Option<&str>, name: &str, program: &str, args: &[&str]) -> u32 {
        let ours = self.bin.join(program);
        let path = if ours.exists() { ours } else { PathBuf::from(program) };
        let mut cmd = match node {
            Some(n) => self.command_in(n, &path),
            None => Command::new(&path),
        };
        cmd.args(args).stdout(self.log(name)).stderr(self.log(name)).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {program}: {e}"));
        let pid = child.id();
        self.extra.push(child);
        pid
    }

    /// SIGKILL of a process started by `spawn_logged`/`spawn_in`, by pid.
    pub fn kill_extra(&mut self, pid: u32) {
        if let Some(i) = self.extra.iter().position(|c| c.id() == pid) {
            let mut c = self.extra.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn control_plane_pid(&self) -> u32 {
        self.cp.as_ref().expect("control plane running").id()
    }

    pub fn agent_pid(&self, i: usize) -> u32 {
        self.agents[i].as_ref().expect("agent running").id()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) an agent: alive but silent.
    pub fn freeze_agent(&self, i: usize, frozen: bool) {
        use nix::sys::signal::{kill, Signal};
        let sig = if frozen { Signal::SIGSTOP } else { Signal::SIGCONT };
        kill(nix::unistd::Pid::from_raw(self.agent_pid(i) as i32), sig).expect("signal the agent");
    }

    /// Cuts (or restores) a node's link inside its namespace: packets are
    /// silently lost, as in a partition. Needs the namespaces (root).
    pub fn set_link(&self, node: &str, up: bool) {
        let id = self.netns.as_ref().expect("partitions need network namespaces (root)");
        let st = Command::new("ip")
            .args(["-n", &format!("{id}-{node}"), "link", "set", "eth0", if up { "up" } else { "down" }])
            .status()
            .unwrap();
        assert!(st.success(), "ip link set failed");
    }

    /// Cuts `node` off one way or both, or heals it ([`Cut::None`]): link
    /// down for both ways, else packets dropped as they arrive (inbound) or
    /// leave (outbound) on its eth0. Needs the namespaces (root).
    pub fn partition(&self, node: &str, cut: Cut) {
        let id = self.netns.as_ref().expect("partitions need network namespaces (root)");
        let ns = format!("{id}-{node}");
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(["netns", "exec", &ns]).args(args).status().unwrap();
            assert!(st.success(), "ip netns exec {ns} {args:?} failed");
        };
        match cut {
            Cut::None => {
                self.set_link(node, true);
                run(&["iptables", "-w", "-F"]);
            }
            Cut::Both => self.set_link(node, false),
            Cut::Inbound => run(&["iptables", "-w", "-A", "INPUT", "-i", "eth0", "-j", "DROP"]),
            Cut::Outbound => run(&["iptables", "-w", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP"]),
        }
    }

    /// SIGTERM to agent `i`; waits for it to exit (30 s at most, then
    /// SIGKILL) and returns how it exited.
    pub fn stop_agent(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.agents[i].take().expect("agent running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the agent");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().expect("wait for the agent") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                panic!("agent {i} did not stop within 30s of SIGTERM: {:?}", c.wait());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.server).await.expect("connect to the control plane")
    }

    /// Runs testbusctl against this cluster.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        self.ctl_stdin(args, None)
    }

    /// testbusctl as the CLI runs it: inside `ctl_node`'s namespace when set.
    fn ctl_command(&self) -> Command {
        match &self.ctl_node {
            Some(node) => self.command_in(node, &self.bin.join("testbusctl")),
            None => Command::new(self.bin.join("testbusctl")),
        }
    }

    pub fn ctl_stdin(&self, args: &[&str], stdin: Option<&str>) -> CtlOutput {
        self.ctl_with(&self.dir.path().join("admin.yaml"), args, stdin)
    }

    /// testbusctl with the config file `config` (TESTBUS_CONFIG), toward
    /// the control plane's socket unless `args` name a --server.
    pub fn ctl_with(&self, config: &Path, args: &[&str], stdin: Option<&str>) -> CtlOutput {
        use std::io::Write;
        let mut child = self
            .ctl_command()
            .args(args)
            .env("TESTBUS_SERVER", &self.server)
            .env("TESTBUS_CONFIG", config_env(config))
            .current_dir(repo_root())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run testbusctl");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().expect("testbusctl output");
        CtlOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs testbusctl in the background (for concurrent applies).
    pub fn ctl_spawn(&self, args: &[&str]) -> Child {
        self.ctl_command()
            .args(args)
            .env("TESTBUS_SERVER", &self.server)
            .env("TESTBUS_CONFIG", config_env(&self.dir.path().join("admin.yaml")))
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run testbusctl")
    }

    /// Waits until the output of `target` (test/NAME or process/NAME)
    /// contains `text`.
    pub async fn wait_output(&self, target: &str, text: &str) {
        wait_for(Duration::from_secs(30), &format!("{target} to print {text:?}"), || async {
            self.ctl(&["logs", target]).stdout.contains(text).then_some(())
        })
        .await
    }

    /// Waits for a host to reach a phase; returns it.
    pub async fn host_phase(&self, name: &str, want: &str) -> Host {
        let client = self.client().await;
        wait_for(Duration::from_secs(60), &format!("host {name} to be {want}"), || async {
            let h = client.api::<Host>().get(name).await.ok()?;
            (h.status().phase == want).then_some(h)
        })
        .await
    }

    pub async fn wait_hosts_ready(&self, n: usize) {
        let c = self.client().await;
        wait_for(Duration::from_secs(30), "hosts to be Ready", || async {
            let (hosts, _) = c.api::<Host>().list("", "").await.ok()?;
            (hosts.iter().filter(|h| h.status().phase == HostPhase::Ready).count() >= n).then_some(())
        })
        .await;
    }

    /// Waits until `n` processes of `test` run; returns their pids.
    pub async fn running_pids(&self, test: &str, n: usize) -> Vec<i64> {
        let c = self.client().await;
        wait_for(Duration::from_secs(20), &format!("{n} running processes of {test}"), || async {
            let (ps, _) = c.api::<testbus_proto::Process>().list("", &format!("spec.test={test}")).await.ok()?;
            let pids: Vec<i64> =
                ps.iter().filter(|p| p.status().phase == ProcessPhase::Running).map(|p| p.status().pid).collect();
            (pids.len() == n).then_some(pids)
        })
        .await
    }

    /// The only test in the cluster, by name.
    pub async fn test(&self, name: &str) -> Test {
        self.client().await.api::<Test>().get(name).await.expect("get test")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut c in self.extra.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for a in self.agents.iter_mut() {
            if let Some(mut c) = a.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.kill_control_plane();
        self.etcd = None;
        end_agent_cgroups(self.dir.path());
        if let Some(dir) = &self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(dir).status();
        }
        if let Some(id) = &self.netns {
            let _ = Command::new(repo_root().join("hack/netns")).args(["down", id]).status();
        }
        if std::thread::panicking() {
            let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".log")).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            for name in names {
                eprintln!("---- {name}.log (tail) ----");
                let log = self.read_log(&name);
                let lines: Vec<&str> = log.lines().collect();
                for l in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Ends what agents killed outright left: their keepers (each names its
/// pid and start time in `DATA_DIR/keepers/ID/pid`), and what is in their
/// cgroups (each agent names its cgroup in `DATA_DIR/cgroup`), removing the
/// cgroups, so that test runs leave nothing running and no cgroup behind.
pub fn end_agent_cgroups(dir: &Path) {
    let data_dirs = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
    for data_dir in data_dirs {
        end_keepers(&data_dir);
        let Ok(root) = std::fs::read_to_string(data_dir.join("cgroup")) else { continue };
        let root = PathBuf::from(root.trim());
        if !root.starts_with("/sys/fs/cgroup") || !root.to_string_lossy().contains("testbus-agent.") {
            continue;
        }
        for child in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let p = child.path();
            if !child.file_name().to_string_lossy().starts_with("p-") {
                continue;
            }
            let _ = std::fs::write(p.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(p.join("cgroup.events")).is_ok_and(|e| e.contains("populated 1"))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = std::fs::remove_dir(&p);
        }
        let _ = std::fs::remove_dir(&root);
    }
}

/// The live keepers of the agent whose data dir is `data_dir`, with their
/// dirs: each names its pid and start time in `keepers/ID/pid`, and counts
/// only while a process of that pid started then.
pub fn keepers_of(data_dir: &Path) -> Vec<(PathBuf, i32)> {
    let mut out = Vec::new();
    for k in std::fs::read_dir(data_dir.join("keepers")).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(k.path().join("pid")) else { continue };
        let Some((pid, ticks)) = text.trim().split_once(' ') else { continue };
        let (Ok(pid), Ok(ticks)) = (pid.parse::<i32>(), ticks.parse::<u64>()) else { continue };
        if pid > 1 && start_ticks(pid) == Some(ticks) {
            out.push((k.path(), pid));
        }
    }
    out
}

/// The pids of [`keepers_of`].
pub fn keeper_pids(data_dir: &Path) -> Vec<i32> {
    keepers_of(data_dir).into_iter().map(|(_, pid)| pid).collect()
}

/// SIGKILLs the keepers of the agent whose data dir is `data_dir`.
pub fn end_keepers(data_dir: &Path) {
    for pid in keeper_pids(data_dir) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of its
/// stat).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// The resident set of process `pid` in bytes (0 when it cannot be read).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Polls `f` until it returns Some, or panics after `limit` naming `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes a manifest into the cluster's directory and returns its path.
/// A clean venv in `target/NAME` with the Python package installed from
/// its wheel (`hack/python-venv`; `lowest`: the lowest supported runtime
/// versions); its python.
pub fn python_venv(name: &str, lowest: bool) -> PathBuf {
    let dir = repo_root().join("target").join(name);
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("hack/python-venv"));
    if lowest {
        cmd.arg("--lowest");
    }
    let out = cmd.arg(&dir).current_dir(repo_root()).output().expect("run hack/python-venv");
    assert!(out.status.success(), "hack/python-venv: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn manifest(c: &Cluster, name: &str, text: &str) -> String {
    let p = c.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// True if `pid` is a live process (a zombie waiting for its parent to reap
/// it has already ended).
pub fn process_alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()).is_some_and(|r| !r.starts_with('Z')),
        Err(_) => false,
    }
}

/// Peak resident memory of a process, in bytes (VmHWM).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Requests and responses as bytes: calls any gRPC method with any body
/// (garbage, or a message built by hand).
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// A one-role test named `name` whose role needs `capability` and whose one
/// step runs `true`: with a capability no host offers, a test that waits
/// (the queue's tests and benchmark).
pub fn test_needing(name: &str, capability: &str) -> testbus_proto::Test {
    testbus_proto::Test {
        metadata: Some(testbus_proto::ObjectMeta { name: name.into(), ..Default::default() }),
        spec: Some(testbus_proto::TestSpec {
            hosts: vec![testbus_proto::HostRequirement {
                role: "r".into(),
                capabilities: vec![capability.into()],
                ..Default::default()
            }],
            steps: vec![testbus_proto::Step {
                name: "s".into(),
                on: vec!["r".into()],
                argv: vec!["true".into()],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
