//! testbus's podman provider: the guests of a HostPool as podman
//! containers. This crate alone knows podman (its command line: rootful
//! podman is daemonless, and its CLI is its API) and the network plumbing
//! of its containers (`ip`).
//!
//! A guest is a container of the pool's image (a rootfs with the static
//! agent, `hack/guest-image`'s `rootfs.tar` imported with `podman import`)
//! running the agent as its only process. The agent reaches the control
//! plane through a unix socket in the guest's state dir, mounted into the
//! container at `/run/testbus`, where a `testbus-relay` on this machine
//! listens; it joins with a token of its own, written next to it. A guest
//! on a pool network has a network namespace of its own, with a veth into
//! the network's bridge (no address on this machine's side, no
//! forwarding): members reach each other and nothing else. Without a
//! network a container has none (`--network none`), never podman's
//! default bridge, which NATs to the outside.
//!
//! Clean state comes from a new container in place of the old one: a test
//! never sees an earlier test's files.
#![forbid(unsafe_code)]

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use testbus_pool_provider::{
    async_trait, GuestError, GuestSpec, JoinTokens, LinkConfig, LinkStart, Observed, Provider, ProviderKind,
};
use testbus_proto::{HostPool, Resource};

/// How long one podman or ip command may take before it is killed.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// The label every container of a pool carries (its value: the pool).
pub const POOL_LABEL: &str = "testbus.io/pool";

/// The label with a container's address on its pool's network: a
/// restarted control plane gives its next container the same one.
pub const ADDRESS_LABEL: &str = "testbus.io/address";

/// Default per-guest limits.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
pub const DEFAULT_PIDS: u32 = 1024;

/// The longest path a unix socket may have (sun_path, less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where the guest's link dir is mounted in its container.
const IN_CONTAINER: &str = "/run/testbus";

/// How podman is run: the program and the flags every call takes.
#[derive(Debug, Clone)]
pub struct Podman {
    pub program: PathBuf,
    /// `--root`, `--runroot`, `--runtime`, ... before the subcommand.
    pub global: Vec<String>,
}

impl Podman {
    /// Podman as it works rootful without systemd (INFRA.md): runc, cgroupfs,
    /// events to a file; `storage`: a storage of its own (`DIR/root`,
    /// `DIR/run`, and `DIR/tmp` for what podman otherwise keeps in
    /// /run/libpod: another podman resetting its own must not make this
    /// one think the machine rebooted) rather than the machine's.
    pub fn new(storage: Option<&Path>) -> Podman {
        let mut global: Vec<String> =
            ["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"].map(String::from).into();
        if let Some(dir) = storage {
            global.extend(["--root".into(), dir.join("root").display().to_string()]);
            global.extend(["--runroot".into(), dir.join("run").display().to_string()]);
            global.extend(["--tmpdir".into(), dir.join("tmp").display().to_string()]);
        }
        Podman { program: "podman".into(), global }
    }
}

/// `provider: podman`: one provider for every podman pool.
pub struct PodmanKind(pub Podman);

impl ProviderKind for PodmanKind {
    fn key(&self, _pool: &HostPool) -> String {
        String::new()
    }

    fn open(&self, _pool: &HostPool, links: &LinkConfig) -> Arc<dyn Provider> {
        Arc::new(PodmanProvider { podman: self.0.clone(), links: links.clone(), relays: Mutex::default() })
    }
}

/// Podman's containers of every podman pool, and their relays.
pub struct PodmanProvider {
    podman: Podman,
    links: LinkConfig,
    /// Each guest's relay (killed when dropped).
    relays: Mutex<HashMap<String, tokio::process::Child>>,
}

/// What a command said when it failed.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {said}")]
struct Failed {
    command: String,
    said: String,
}

impl From<Failed> for GuestError {
    fn from(f: Failed) -> GuestError {
        GuestError::Substrate(f.to_string())
    }
}

/// Runs `program args`, bounded by COMMAND_DEADLINE; its stdout, or what
/// it said on failure.
async fn run(program: &Path, args: &[String]) -> Result<String, Failed> {
    let command = format!("{} {}", program.display(), args.first().map(String::as_str).unwrap_or(""));
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failed { command: command.clone(), said: e.to_string() })?;
    let out = match tokio::time::timeout(COMMAND_DEADLINE, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(Failed { command, said: e.to_string() }),
        Err(_) => return Err(Failed { command, said: format!("no answer within {}s", COMMAND_DEADLINE.as_secs()) }),
    };
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let said = err.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output").to_string();
    Err(Failed { command, said: format!("{said} ({})", out.status) })
}

impl PodmanProvider {
    async fn podman(&self, args: &[&str]) -> Result<String, Failed> {
        let all: Vec<String> = self.podman.global.iter().cloned().chain(args.iter().map(|a| a.to_string())).collect();
        run(&self.podman.program, &all).await
    }

    async fn podman_owned(&self, args: Vec<String>) -> Result<String, Failed> {
        let all: Vec<String> = self.podman.global.iter().cloned().chain(args).collect();
        run(&self.podman.program, &all).await
    }

    async fn drop_relay(&self, name: &str) {
        let old = self.relays.lock().remove(name);
        if let Some(mut old) = old {
            let _ = old.kill().await;
        }
    }

    /// Starts the guest's relay, listening on the socket its agent dials,
    /// unless it runs already.
    async fn ensure_relay(&self, spec: &GuestSpec) -> Result<(), GuestError> {
        {
            let mut relays = self.relays.lock();
            if let Some(r) = relays.get_mut(&spec.name) {
                if r.try_wait().ok().flatten().is_none() {
                    return Ok(());
                }
            }
        }
        let dir = link_dir(&spec.state_dir);
        std::fs::create_dir_all(&dir).map_err(GuestError::local(dir.display()))?;
        let socket = dir.join("link.sock");
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(GuestError::Unsupported(format!(
                "its relay's socket {} is {len} bytes, over the {MAX_SOCKET_PATH} a unix socket's path may have: \
                 give the control plane a shorter --data-dir",
                socket.display()
            )));
        }
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(spec.state_dir.join("relay.log")).map_err(GuestError::local("relay.log"))?;
        let downstream = format!("unix:{}", socket.display());
        let mut relay = self
            .links
            .relay(&downstream, "podman", log)
            .spawn()
            .map_err(GuestError::local(format!("starting {}", self.links.relay.display())))?;
        // Listening before the agent dials (a relay that cannot listen
        // says why in its log).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            let ended = relay.try_wait().ok().flatten();
            if ended.is_some() || tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(spec.state_dir.join("relay.log")).unwrap_or_default();
                let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("nothing");
                return Err(GuestError::NotUp(format!("its relay did not listen on {} ({last})", socket.display())));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.relays.lock().insert(spec.name.clone(), relay);
        Ok(())
    }

    /// Removes the container (if any) and its network namespace.
    async fn remove_container(&self, name: &str) -> Result<(), GuestError> {
        match self.podman(&["rm", "--force", "--time", "0", "--ignore", name]).await {
            Ok(_) => {}
            Err(f) if f.said.contains("no such container") => {}
            Err(f) => return Err(f.into()),
        }
        // The host's end of its veth goes first, at once (with its
        // namespace it would go later, in the kernel's own time, and the
        // pool's bridge would still have it as a port).
        let ip = Path::new("ip");
        if let Err(f) = run(ip, &["link".into(), "delete".into(), host_end(name)]).await {
            if !f.said.contains("Cannot find device") {
                return Err(f.into());
            }
        }
        let ns = netns_name(name);
        if Path::new("/run/netns").join(&ns).exists() {
            run(Path::new("ip"), &["netns".into(), "delete".into(), ns]).await?;
        }
        Ok(())
    }

    /// Makes the guest's network namespace on the pool network: a veth
    /// whose far end is in the network's bridge (made if missing, with no
    /// address on this machine's side).
    async fn plumb(&self, spec: &GuestSpec, address: &str) -> Result<(), GuestError> {
        let ip = Path::new("ip");
        for step in plumbing(&spec.pool.spec().network, &spec.name, address) {
            match run(ip, &step.args).await {
                // Made here: marked as this provider's.
                Ok(_) if step.may_exist => {
                    let br = step.args[2].clone();
                    run(ip, &["link".into(), "set".into(), br, "alias".into(), BRIDGE_ALIAS.into()]).await?;
                }
                Ok(_) => {}
                Err(f) if step.may_exist && f.said.contains("File exists") => {}
                Err(f) => return Err(f.into()),
            }
        }
        Ok(())
    }

    /// A new container for the guest, its relay listening first (so its
    /// agent's first dial works).
    async fn start(&self, spec: &GuestSpec, join: &dyn JoinTokens) -> Result<(), GuestError> {
        self.remove_container(&spec.name).await?;
        let dir = link_dir(&spec.state_dir);
        std::fs::create_dir_all(&dir).map_err(GuestError::local(dir.display()))?;
        let token = join.token(&spec.name).await?;
        let token_file = dir.join("token");
        let _ = std::fs::remove_file(&token_file);
        if let Some(t) = &token {
            write_private(&token_file, t).map_err(GuestError::local(token_file.display()))?;
        }
        if let Some(address) = &spec.address {
            self.plumb(spec, address).await?;
        }
        self.ensure_relay(spec).await?;
        self.podman_owned(run_args(spec, &dir, token.is_some())).await?;
        Ok(())
    }
}

/// Writes `text` to a file only its owner reads.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

/// The guest's dir mounted into its container: its relay's socket and its
/// join token.
fn link_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("link")
}

pub use testbus_proto::pool::bridge_name;

/// What podman's bridges say they are (`ip link ... alias`): only a bridge
/// this provider made is deleted by it (a libvirt pool's network may have
/// made the bridge, and owns it).
const BRIDGE_ALIAS: &str = "testbus-podman";

/// The network namespace of guest `name`.
pub fn netns_name(name: &str) -> String {
    format!("tbg-{name}")
}

/// The host's end of guest `name`'s veth.
fn host_end(name: &str) -> String {
    testbus_proto::pool::interface_name("tbv", name)
}

/// One `ip` command of a guest's plumbing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IpStep {
    args: Vec<String>,
    /// It fails harmlessly when what it makes exists (the bridge).
    may_exist: bool,
}

/// The `ip` commands that put guest `name` on `network` at `address`
/// (pure).
fn plumbing(network: &str, name: &str, address: &str) -> Vec<IpStep> {
    let (br, ns) = (bridge_name(network), netns_name(name));
    let host_end = host_end(name);
    let step =
        |may_exist: bool, args: &[&str]| IpStep { args: args.iter().map(|a| a.to_string()).collect(), may_exist };
    vec![
        // No address at all on this machine's side, IPv6 link-local
        // included (else root in a container could reach this machine's
        // services on fe80::): addrgenmode none before each is up.
        step(true, &["link", "add", &br, "type", "bridge"]),
        step(false, &["link", "set", &br, "addrgenmode", "none"]),
        step(false, &["link", "set", &br, "up"]),
        step(false, &["netns", "add", &ns]),
        step(false, &["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns]),
        step(false, &["link", "set", &host_end, "addrgenmode", "none"]),
        step(false, &["link", "set", &host_end, "master", &br, "up"]),
        step(false, &["-n", &ns, "addr", "add", address, "dev", "eth0"]),
        step(false, &["-n", &ns, "link", "set", "eth0", "up"]),
        step(false, &["-n", &ns, "link", "set", "lo", "up"]),
    ]
}

/// `podman run` of a guest's container (pure): detached, named as the
/// guest, labelled with its pool, its limits from the pool spec, its link
/// dir mounted, the agent as its command.
fn run_args(spec: &GuestSpec, link_dir: &Path, token: bool) -> Vec<String> {
    let sp = spec.pool.spec();
    let memory = if sp.memory == 0 { DEFAULT_MEMORY_MIB } else { sp.memory };
    let pids = if sp.pids == 0 { DEFAULT_PIDS } else { sp.pids };
    let network = match spec.address {
        Some(_) => format!("ns:/run/netns/{}", netns_name(&spec.name)),
        None => "none".into(),
    };
    let mut a: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        "--name".into(),
        spec.name.clone(),
        "--hostname".into(),
        spec.name.clone(),
        "--label".into(),
        format!("{POOL_LABEL}={}", spec.pool.name()),
        "--label".into(),
        format!("{ADDRESS_LABEL}={}", spec.address.as_deref().unwrap_or("")),
        // Nothing in it gains privileges by exec (setuid binaries).
        "--security-opt".into(),
        "no-new-privileges".into(),
        "--network".into(),
        network,
        "--memory".into(),
        format!("{memory}m"),
        "--cpus".into(),
        sp.cpus.max(1).to_string(),
        "--pids-limit".into(),
        pids.to_string(),
        // Root here lacks CAP_SYS_RESOURCE: podman's default limits fail.
        "--ulimit".into(),
        "nofile=20000:20000".into(),
        "--ulimit".into(),
        format!("nproc={pids}:{pids}"),
        // Read-only: root in the container could otherwise put a symlink
        // where this machine's relay writes (its socket's `.transport`)
        // or where the next token goes. A unix socket is dialed on a
        // read-only mount all the same.
        "--volume".into(),
        format!("{}:{IN_CONTAINER}:ro", link_dir.display()),
        sp.image.clone(),
        "/usr/bin/testbus-agent".into(),
        "--server".into(),
    ];
    let socket = format!("{IN_CONTAINER}/link.sock");
    if token {
        a.extend([format!("unix+tls:{socket}"), "--join-token-file".into(), format!("{IN_CONTAINER}/token")]);
    } else {
        a.push(format!("unix:{socket}"));
    }
    a.extend([
        "--name".into(),
        spec.name.clone(),
        "--data-dir".into(),
        "/var/lib/testbus".into(),
        "--take-over".into(),
    ]);
    a.extend(testbus_proto::pool::agent_args(&spec.pool, false));
    a
}

/// A container as `podman ps --format json` lists it.
#[derive(Debug, serde::Deserialize)]
struct Listed {
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "State", default)]
    state: String,
    #[serde(rename = "ExitCode", default)]
    exit_code: i64,
}

/// What a container's state says of its guest (pure).
fn observed(state: Option<(&str, i64)>, relay_alive: bool) -> Observed {
    match state {
        Some(("running", _)) => Observed::Up { linked: relay_alive },
        Some(("created" | "configured" | "initialized" | "paused" | "stopping", _)) => Observed::Busy,
        Some((s, code)) => Observed::Down(format!("its container is {s} (exit code {code})")),
        None => Observed::Down("its container is gone".into()),
    }
}

#[async_trait]
impl Provider for PodmanProvider {
    async fn reach(&self) -> Result<(), GuestError> {
        self.podman(&["version", "--format", "{{.Client.Version}}"])
            .await
            .map(|_| ())
            .map_err(|e| GuestError::Substrate(format!("cannot run podman: {e}")))
    }

    async fn guests(&self, prefix: &str) -> Result<Vec<String>, GuestError> {
        let out = self.podman(&["ps", "--all", "--filter", &format!("label={POOL_LABEL}"), "--format", "json"]).await?;
        let listed: Vec<Listed> =
            serde_json::from_str(&out).map_err(|e| GuestError::Substrate(format!("podman ps said: {e}")))?;
        let mut names: Vec<String> =
            listed.into_iter().flat_map(|c| c.names).filter(|n| n.starts_with(prefix)).collect();
        names.sort();
        Ok(names)
    }

    async fn create(
        &self,
        spec: &GuestSpec,
        join: &dyn JoinTokens,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), GuestError> {
        progress("starting its container");
        self.start(spec, join).await
    }

    async fn link(&self, spec: &GuestSpec, start: LinkStart, _join: &dyn JoinTokens) -> Result<(), GuestError> {
        // The relay made with the container carries its first link; one
        // that ended (or went with an earlier control plane) is made
        // again, and the agent dials it anew.
        if start == LinkStart::Again {
            self.drop_relay(&spec.name).await;
        }
        self.ensure_relay(spec).await
    }

    async fn observe(&self, spec: &GuestSpec) -> Result<Observed, GuestError> {
        let relay_alive = self.relays.lock().get_mut(&spec.name).is_some_and(|r| r.try_wait().ok().flatten().is_none());
        let out =
            self.podman(&["ps", "--all", "--filter", &format!("name=^{}$", spec.name), "--format", "json"]).await?;
        let listed: Vec<Listed> =
            serde_json::from_str(&out).map_err(|e| GuestError::Substrate(format!("podman ps said: {e}")))?;
        let state = listed.iter().find(|c| c.names.iter().any(|n| n == &spec.name));
        Ok(observed(state.map(|c| (c.state.as_str(), c.exit_code)), relay_alive))
    }

    fn cleans_in_place(&self, _pool: &HostPool) -> bool {
        true
    }

    async fn clean(&self, spec: &GuestSpec, join: &dyn JoinTokens) -> Result<(), GuestError> {
        self.start(spec, join).await
    }

    fn relinkable(&self, _pool: &HostPool) -> Result<(), String> {
        Ok(())
    }

    async fn address(&self, spec: &GuestSpec) -> Result<Option<String>, GuestError> {
        let format = format!("{{{{index .Config.Labels \"{ADDRESS_LABEL}\"}}}}");
        let out = self.podman(&["inspect", "--format", &format, &spec.name]).await?;
        Ok(Some(out.trim().to_string()).filter(|a| !a.is_empty() && a != "<no value>"))
    }

    async fn destroy(&self, spec: &GuestSpec) -> Result<(), GuestError> {
        self.drop_relay(&spec.name).await;
        self.remove_container(&spec.name).await?;
        match std::fs::remove_dir_all(&spec.state_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(GuestError::local(spec.state_dir.display())(e)),
        }
    }

    async fn release_pool(&self, pool: &HostPool) -> Result<(), GuestError> {
        if pool.spec().network.is_empty() {
            return Ok(());
        }
        // The bridge goes once no guest (of any pool on the network) has a
        // port in it.
        let (ip, br) = (Path::new("ip"), bridge_name(&pool.spec().network));
        let Ok(itself) = run(ip, &["-o".into(), "link".into(), "show".into(), br.clone()]).await else {
            return Ok(()); // no such bridge
        };
        if !itself.contains(&format!("alias {BRIDGE_ALIAS}")) {
            return Ok(()); // not made here (a libvirt network's)
        }
        let ports = run(ip, &["-o".into(), "link".into(), "show".into(), "master".into(), br.clone()]).await?;
        if ports.trim().is_empty() {
            run(ip, &["link".into(), "delete".into(), br]).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::HostPoolSpec;

    fn spec(network: bool) -> GuestSpec {
        let mut pool = HostPool::default();
        pool.meta_mut().name = "web".into();
        *pool.spec_mut() = HostPoolSpec {
            provider: "podman".into(),
            image: "localhost/testbus-guest".into(),
            memory: 128,
            cpus: 2,
            pids: 64,
            capabilities: vec!["nginx".into()],
            ..Default::default()
        };
        GuestSpec {
            name: "web-0a1b2".into(),
            pool: Arc::new(pool),
            state_dir: "/d/web-0a1b2".into(),
            address: network.then(|| "10.251.3.10/24".to_string()),
            boot: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_container_has_the_pools_limits_and_runs_the_agent_with_its_token() {
        let a = run_args(&spec(false), Path::new("/d/web-0a1b2/link"), true);
        let after = |flag: &str| a.iter().position(|x| x == flag).map(|i| a[i + 1].as_str());
        assert_eq!(after("--name"), Some("web-0a1b2"));
        assert_eq!(after("--network"), Some("none"), "never podman's default bridge");
        assert_eq!(after("--memory"), Some("128m"));
        assert_eq!(after("--cpus"), Some("2"));
        assert_eq!(after("--pids-limit"), Some("64"));
        assert_eq!(after("--label"), Some("testbus.io/pool=web"));
        assert_eq!(after("--volume"), Some("/d/web-0a1b2/link:/run/testbus:ro"));
        assert_eq!(after("--server"), Some("unix+tls:/run/testbus/link.sock"));
        assert_eq!(after("--join-token-file"), Some("/run/testbus/token"));
        assert_eq!(after("--capability"), Some("nginx"));
        // The image comes before the command, the agent's flags after it.
        let image = a.iter().position(|x| x == "localhost/testbus-guest").unwrap();
        assert_eq!(a[image + 1], "/usr/bin/testbus-agent");
        assert!(a.iter().position(|x| x == "--cpus").unwrap() < image);
        let plain = run_args(&spec(false), Path::new("/l"), false);
        assert!(plain.contains(&"unix:/run/testbus/link.sock".to_string()));
        assert!(!plain.contains(&"--join-token-file".to_string()));
    }

    #[test]
    fn a_guest_on_a_network_has_a_namespace_of_its_own_on_the_networks_bridge() {
        let a = run_args(&spec(true), Path::new("/l"), true);
        let i = a.iter().position(|x| x == "--network").unwrap();
        assert_eq!(a[i + 1], "ns:/run/netns/tbg-web-0a1b2");
        let steps = plumbing("lab", "web-0a1b2", "10.251.3.10/24");
        let br = bridge_name("lab");
        assert!(br.len() <= 15 && host_end("web-0a1b2").len() <= 15);
        assert_eq!(steps[0].args, ["link", "add", &br, "type", "bridge"]);
        assert!(steps[0].may_exist && steps[1..].iter().all(|s| !s.may_exist));
        assert!(steps
            .iter()
            .any(|s| s.args == ["-n", "tbg-web-0a1b2", "addr", "add", "10.251.3.10/24", "dev", "eth0"]));
        // Nothing gives this machine's side an address.
        assert!(!steps.iter().any(|s| s.args.first().is_some_and(|a| a != "-n") && s.args.contains(&"addr".into())));
        assert_ne!(bridge_name("lab"), bridge_name("lab2"));
    }

    #[test]
    fn a_container_that_is_not_running_is_down() {
        assert_eq!(observed(Some(("running", 0)), true), Observed::Up { linked: true });
        assert_eq!(observed(Some(("running", 0)), false), Observed::Up { linked: false });
        assert_eq!(observed(Some(("created", 0)), true), Observed::Busy);
        assert_eq!(
            observed(Some(("exited", 137)), true),
            Observed::Down("its container is exited (exit code 137)".into())
        );
        assert_eq!(observed(None, true), Observed::Down("its container is gone".into()));
    }
}
