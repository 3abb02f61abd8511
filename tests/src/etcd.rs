//! Real etcd members for tests (Debian's etcd-server), each a plain
//! background process with its own data dir, started fast (10 ms
//! heartbeats) and killed by PID with the cluster. Members listen on
//! loopback ports (here or in one network namespace), or each on an address
//! of its own in a namespace of its own (so that a partition can cut one
//! member off).
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    /// The address it listens on.
    ip: String,
    client_port: u16,
    peer_port: u16,
    /// The network namespace it runs in (None: this one).
    netns: Option<String>,
    child: Option<Child>,
}

impl EtcdCluster {
    /// `n` members, all healthy when this returns.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_in(n, None)
    }

    /// Members inside network namespace `netns` (its own loopback).
    pub fn start_in(n: usize, netns: Option<String>) -> EtcdCluster {
        // Every port is held until all are chosen, so none repeats.
        let held: Vec<TcpListener> = (0..2 * n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let port = |i: usize| held[i].local_addr().unwrap().port();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                ip: "127.0.0.1".into(),
                client_port: port(2 * i),
                peer_port: port(2 * i + 1),
                netns: netns.clone(),
                child: None,
            })
            .collect();
        drop(held);
        Self::start_members(members)
    }

    /// One member per `(namespace, address)`, listening on that address's
    /// ports 2379 and 2380 inside that namespace.
    pub fn start_on(nodes: &[(String, String)]) -> EtcdCluster {
        let members = nodes
            .iter()
            .enumerate()
            .map(|(i, (ns, ip))| Member {
                name: format!("m{i}"),
                ip: ip.clone(),
                client_port: 2379,
                peer_port: 2380,
                netns: Some(ns.clone()),
                child: None,
            })
            .collect();
        Self::start_members(members)
    }

    fn start_members(members: Vec<Member>) -> EtcdCluster {
        let n = members.len();
        let mut c = EtcdCluster { dir: tempfile::tempdir().unwrap(), members };
        for i in 0..n {
            c.start_member(i, "new");
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}=http://{}:{}", m.name, m.ip, m.peer_port)).collect::<Vec<_>>().join(",")
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    pub fn start_member(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        // Appended to: a restarted member's log follows its last one.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let mut cmd = match &m.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &format!("http://{}:{}", m.ip, m.peer_port)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}:{}", m.ip, m.peer_port)])
            .args(["--initial-cluster", &self.initial_cluster(), "--initial-cluster-state", state])
            .args([
                "--initial-cluster-token",
                "testbus-test",
                "--heartbeat-interval",
                "10",
                "--election-timeout",
                "100",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        self.members[i].child = Some(child);
    }

    /// SIGKILL, as a crash.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The member's pid, while it runs.
    pub fn member_pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The network namespace member `i` runs in.
    pub fn member_netns(&self, i: usize) -> Option<&str> {
        self.members[i].netns.as_deref()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether member `i` answers its health check now.
    pub fn healthy(&self, i: usize) -> bool {
        let m = &self.members[i];
        health(&m.ip, m.client_port, m.netns.as_deref())
    }

    pub fn restart_member(&mut self, i: usize) {
        self.start_member(i, "existing");
        self.wait_healthy(i);
    }

    /// Where the members' logs are (`m0.log`, ...).
    pub fn log_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// GET /health answers {"health":"true"}.
    pub fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.healthy(i) {
                return;
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.members[i].name)));
                let log = log.unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "etcd member {i} not healthy after 30s; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `etcd://127.0.0.1:P1,...[/prefix]` for every member.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| format!("{}:{}", m.ip, m.client_port)).collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    pub fn client_url(&self, i: usize) -> String {
        self.members[i].client_url()
    }
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }
}

fn health(ip: &str, port: u16, netns: Option<&str>) -> bool {
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else { return false };
    match netns {
        None => health_here(ip, port),
        // setns changes only the calling thread: ask from a thread of its own.
        Some(ns) => {
            let path = format!("/run/netns/{ns}");
            std::thread::spawn(move || {
                let Ok(f) = std::fs::File::open(&path) else { return false };
                if nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                    return false;
                }
                health_here(ip, port)
            })
            .join()
            .unwrap_or(false)
        }
    }
}

fn health_here(ip: std::net::IpAddr, port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
