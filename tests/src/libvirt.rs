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

/// A remote testbed host for `qemu+ssh://` pools: its own libvirtd,
/// virtlogd and sshd in a network namespace on the cluster's bridge, and a
/// PID and mount namespace of their own (tests/scripts/remote-testbed.sh
/// says what it hides from the control plane). Dropped: the namespace's
/// processes are killed, its mounts go with them.
pub struct RemoteTestbed {
    dir: tempfile::TempDir,
    /// `unshare`, whose death kills the PID namespace (`--kill-child`).
    unshare: std::process::Child,
    /// The control plane's network namespace, where virsh reaches it from.
    cp_netns: String,
    pub address: String,
}

impl RemoteTestbed {
    /// Starts it as host 10.77.0.200 of the cluster's network, and waits
    /// until its libvirtd answers over ssh.
    pub fn start(c: &crate::Cluster) -> RemoteTestbed {
        assert!(ensure(), "the remote testbed needs root and libvirt");
        let (ns, address) = c.add_node("testbed", 200);
        let cp_netns = ns.replace("-testbed", "-cp");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let keygen = |name: &str| {
            let st =
                Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join(name)).status();
            assert!(st.is_ok_and(|s| s.success()), "ssh-keygen");
        };
        keygen("id");
        keygen("host_key");
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
        let host_key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        std::fs::write(d.join("known_hosts"), format!("{address} {}\n", host_key.join(" "))).unwrap();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress {address}\nPort 22\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nPidFile /run/sshd.pid\n",
                d.join("host_key").display(),
                d.join("authorized_keys").display()
            ),
        )
        .unwrap();
        // The control plane's ssh: this key and this host key only, and
        // nothing written to root's ~/.ssh.
        std::fs::write(
            d.join("ssh_config"),
            format!(
                "Host *\n  IdentityFile {}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  \
                 ConnectTimeout 5\n",
                d.join("id").display(),
                d.join("known_hosts").display()
            ),
        )
        .unwrap();
        std::fs::create_dir(d.join("bin")).unwrap();
        let ssh = d.join("bin/ssh");
        std::fs::write(&ssh, format!("#!/bin/sh\nexec /usr/bin/ssh -F {} \"$@\"\n", d.join("ssh_config").display()))
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The image, seen at DIR/image inside the testbed only.
        std::fs::create_dir(d.join("image")).unwrap();
        std::fs::create_dir(d.join("image-private")).unwrap();
        for part in ["vmlinuz", "initrd.img", "golden.qcow2"] {
            let (from, to) = (image().join(part), d.join("image-private").join(part));
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).expect("copying the image");
            }
        }
        let log = std::fs::File::create(d.join("testbed.log")).unwrap();
        let unshare = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["--", "unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "sh"])
            .arg(crate::repo_root().join("tests/scripts/remote-testbed.sh"))
            .arg(d)
            .arg(c.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the remote testbed");
        let tb = RemoteTestbed { dir, unshare, cp_netns, address };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tb.virsh(&["version"]).is_none() {
            assert!(
                Instant::now() < deadline,
                "the remote testbed's libvirtd did not answer over ssh within 60 s: {}",
                std::fs::read_to_string(tb.dir.path().join("testbed.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        tb
    }

    /// The pool's URI for it: plain qemu+ssh:// (a pool's URI names no
    /// program); the control plane's ssh is the wrapper [`Self::ssh_dir`]
    /// puts first on its PATH.
    pub fn uri(&self) -> String {
        format!("qemu+ssh://root@{}/system", self.address)
    }

    /// A dir whose `ssh` runs ssh with this testbed's config (its key and
    /// known hosts): first on the control plane's PATH, as an admin's
    /// ~/.ssh/config would be.
    pub fn ssh_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// The URI virsh uses here (its own ssh command).
    fn virsh_uri(&self) -> String {
        format!("qemu+ssh://root@{}/system?command={}", self.address, self.ssh_dir().join("ssh").display())
    }

    /// The image directory: the golden image there, an empty directory
    /// here.
    pub fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    /// virsh on the testbed, over ssh from the control plane's namespace.
    pub fn virsh(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.cp_netns))
            .args(["--", "virsh", "-c", &self.virsh_uri()])
            .args(args)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RemoteTestbed {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
