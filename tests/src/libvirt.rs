//! The real libvirtd and QEMU (TCG) for pool tests, started on demand as
//! INFRA.md says (virtlogd first, then libvirtd, both daemons of the
//! machine: left running for the next test binary), and the golden guest
//! image `hack/guest-image` builds (hack/test builds it before the tests).
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Option<String> {
    let out = Command::new("virsh").arg("-c").arg(URI).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes sure libvirtd answers; false (the test skips) where it cannot be
/// had, which CI does not accept.
pub fn ensure() -> bool {
    // Once per test binary: its tests run concurrently.
    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STARTED.get_or_init(start)
}

fn start() -> bool {
    if !crate::needs_root("pool tests (libvirtd, QEMU)") {
        return false;
    }
    std::fs::create_dir_all("/var/log/libvirt").expect("mkdir /var/log/libvirt");
    let run = |bin: &str| {
        let st = Command::new(bin).arg("-d").status();
        assert!(st.is_ok_and(|s| s.success()), "{bin} -d did not start (run hack/setup)");
    };
    // Each daemon is asked, not its socket file looked for: a machine that
    // was reset leaves the files behind, and libvirtd answers without
    // virtlogd (every guest then fails to start).
    if std::os::unix::net::UnixStream::connect("/run/libvirt/virtlogd-sock").is_err() {
        run("virtlogd");
    }
    if virsh(&["version"]).is_some() {
        return true;
    }
    run("libvirtd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while virsh(&["version"]).is_none() {
        assert!(Instant::now() < deadline, "libvirtd did not answer within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// What a pool test holds while it runs: the guard that removes what its
/// pools left in libvirt (dropped first), and its turn.
pub struct Turn {
    _leftovers: Leftovers,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// Waits for the test's turn, then removes what a crashed earlier run left
/// (domains `PREFIX-*`, the networks). None (the test skips) where libvirtd
/// cannot be had, which CI does not accept.
pub async fn turn(prefix: &str, networks: &[&str]) -> Option<Turn> {
    if !ensure() {
        return None;
    }
    let turn = one_at_a_time().await;
    let leftovers = Leftovers { prefix: prefix.into(), networks: networks.iter().map(|n| n.to_string()).collect() };
    drop(Leftovers { prefix: leftovers.prefix.clone(), networks: leftovers.networks.clone() });
    Some(Turn { _leftovers: leftovers, _turn: turn })
}

/// Held by each pool test while it runs: guests under TCG on two cores
/// boot in seconds alone, but in minutes when several tests boot theirs at
/// once, so pool tests take turns.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    TURN.get_or_init(|| tokio::sync::Mutex::new(())).lock().await
}

/// The golden image hack/guest-image made: where it puts it as root (and
/// the example manifests look), else in target/.
pub fn image() -> PathBuf {
    let system = PathBuf::from("/var/lib/testbus/guest-image");
    let dir = if system.join("golden.qcow2").exists() { system } else { crate::repo_root().join("target/guest-image") };
    assert!(dir.join("golden.qcow2").exists(), "no guest image in {}: run hack/guest-image", dir.display());
    dir
}

/// The defined domains whose names start with `prefix`.
pub fn domains(prefix: &str) -> Vec<String> {
    virsh(&["list", "--all", "--name"])
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect()
}

/// A domain's XML as libvirt has it (empty if it has none).
pub fn dumpxml(domain: &str) -> String {
    virsh(&["dumpxml", domain]).unwrap_or_default()
}

/// The pid of a running guest's QEMU.
pub fn qemu_pid(domain: &str) -> Option<i32> {
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).ok()?;
    pid.trim().parse().ok()
}

/// Removes what a test's pools left in libvirt, should the test fail
/// before deleting them: domains named `PREFIX-*` and the named networks.
pub struct Leftovers {
    pub prefix: String,
    pub networks: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for d in domains(&format!("{}-", self.prefix)) {
            let _ = virsh(&["destroy", &d]);
            let _ = virsh(&["undefine", &d, "--snapshots-metadata"]);
        }
        for n in &self.networks {
            let _ = virsh(&["net-destroy", n]);
            let _ = virsh(&["net-undefine", n]);
        }
    }
}
