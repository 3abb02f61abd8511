//! Real podman for pool tests (rootful, with runc: INFRA.md), each test
//! with a storage of its own in a temporary directory: its image is
//! `hack/guest-image`'s `rootfs.tar`, imported; what its containers left
//! is removed when the [`PodmanStorage`] is dropped. Podman is daemonless:
//! the control plane under test runs it as the test does, with
//! `--podman-storage` naming the same directory.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The image the tests' pools name.
pub const IMAGE: &str = "localhost/testbus-guest";

pub struct PodmanStorage {
    pub dir: tempfile::TempDir,
    /// Pool tests take turns (containers start in a fraction of a second,
    /// but two control planes reconciling pools at once on two cores slow
    /// each other's guests past their deadlines).
    _turn: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl PodmanStorage {
    /// A storage with the guest image imported; None (the test skips)
    /// without root, which CI does not accept.
    pub async fn new() -> Option<PodmanStorage> {
        if !crate::needs_root("podman pool tests") {
            return None;
        }
        Some(Self::with_turn(Some(crate::libvirt::one_at_a_time().await)))
    }

    /// A storage for a test that already holds the pool tests' turn (a
    /// libvirt one); root only.
    pub fn without_turn() -> PodmanStorage {
        Self::with_turn(None)
    }

    fn with_turn(turn: Option<tokio::sync::MutexGuard<'static, ()>>) -> PodmanStorage {
        let s = PodmanStorage { dir: tempfile::Builder::new().prefix("tb-podman").tempdir().unwrap(), _turn: turn };
        let rootfs = crate::libvirt::image().join("rootfs.tar");
        assert!(rootfs.exists(), "no {}: run hack/guest-image", rootfs.display());
        let out = s.podman(&["import", &rootfs.display().to_string(), IMAGE]);
        assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
        s
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// podman with this storage (as the control plane runs it).
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--root"])
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"));
        c
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run podman")
    }

    /// The containers (any state) whose names start with `prefix`.
    pub fn containers(&self, prefix: &str) -> Vec<String> {
        let out = self.podman(&["ps", "--all", "--format", "{{.Names}}"]);
        assert!(out.status.success(), "podman ps: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter(|n| n.starts_with(prefix)).map(String::from).collect()
    }

    /// `podman inspect` of a container, as JSON.
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let out = self.podman(&["inspect", name]);
        assert!(out.status.success(), "podman inspect {name}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0].clone()
    }

    /// Where the control plane keeps a guest's dir.
    pub fn guest_dir(cp_data: &Path, guest: &str) -> PathBuf {
        cp_data.join("guests").join(guest)
    }
}

impl Drop for PodmanStorage {
    fn drop(&mut self) {
        // Containers first (their mounts and network namespaces), then the
        // storage itself.
        let listed = self.command().args(["ps", "--all", "--format", "{{.Names}}"]).output();
        let names = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for c in names.lines() {
            let _ = self.command().args(["rm", "--force", "--time", "0", c]).output();
            let _ = Command::new("ip").args(["netns", "delete", &format!("tbg-{c}")]).output();
        }
        let _ = self.command().args(["rmi", "--all", "--force"]).output();
    }
}
