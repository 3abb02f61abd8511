//! Real etcd members for tests (Debian's etcd-server), each a plain
//! background process with its own data dir and loopback ports, started
//! fast (10 ms heartbeats) and killed by PID with the cluster.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// The network namespace the members run in (None: this one).
    netns: Option<String>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// `n` members, all healthy when this returns.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_in(n, None)
    }

    /// Members inside network namespace `netns` (its own loopback).
    pub fn start_in(n: usize, netns: Option<String>) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        // Every port is held until all are chosen, so none repeats.
        let held: Vec<TcpListener> = (0..2 * n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let port = |i: usize| held[i].local_addr().unwrap().port();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: port(2 * i),
                peer_port: port(2 * i + 1),
                child: None,
            })
            .collect();
        drop(held);
        let mut c = EtcdCluster { dir, members, netns };
        for i in 0..n {
            c.start_member(i, "new");
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    pub fn start_member(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).unwrap();
        let mut cmd = match &self.netns {
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
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", m.client_port)])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", m.client_port)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer_port)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer_port)])
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

    pub fn restart_member(&mut self, i: usize) {
        self.start_member(i, "existing");
        self.wait_healthy(i);
    }

    /// GET /health answers {"health":"true"}.
    pub fn wait_healthy(&self, i: usize) {
        let port = self.members[i].client_port;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if health(port, self.netns.as_deref()) {
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
        let hosts: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.client_port)).collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    pub fn client_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }
}

fn health(port: u16, netns: Option<&str>) -> bool {
    match netns {
        None => health_here(port),
        // setns changes only the calling thread: ask from a thread of its own.
        Some(ns) => {
            let path = format!("/run/netns/{ns}");
            std::thread::spawn(move || {
                let Ok(f) = std::fs::File::open(&path) else { return false };
                if nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                    return false;
                }
                health_here(port)
            })
            .join()
            .unwrap_or(false)
        }
    }
}

fn health_here(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
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
