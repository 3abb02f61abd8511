//! The libvirt [`Provider`]: a pool's guests as domains of one libvirt
//! daemon (per URI), linked by a `testbus-relay` on their second serial
//! line's pty (a console stream for a remote daemon), or over virtio-vsock
//! through a `vhost-device-vsock` of their own.
//!
//! Ownership: [`LibvirtProvider`] holds its connection (reopened when it
//! dies) and, per guest, the host side of its link: the relay, the QEMU run
//! it was made for, and a vsock guest's device. They are killed when the
//! guest is destroyed or the provider dropped (with the controllers).
use crate::{
    go_line, vsock_socket, Console, GuestLink, GuestState, Libvirt, LineStream, ProviderError, CLEAN_SNAPSHOT,
    VSOCK_MARK, VSOCK_PORT, WAITING_MARK,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use testbus_pool_provider::{
    async_trait, GuestError, GuestSpec, JoinTokens, LinkConfig, LinkStart, Observed, Provider, ProviderKind,
};
use testbus_proto::pool::SnapshotAction;
use testbus_proto::{HostPool, Resource};

/// How long a guest may take from starting to having its link pty.
pub const PTY_DEADLINE: Duration = Duration::from_secs(60);

/// `provider: libvirt`; one [`LibvirtProvider`] per URI.
pub struct LibvirtKind;

impl ProviderKind for LibvirtKind {
    fn key(&self, pool: &HostPool) -> String {
        uri(pool)
    }

    fn open(&self, pool: &HostPool, links: &LinkConfig) -> Arc<dyn Provider> {
        Arc::new(LibvirtProvider {
            uri: uri(pool),
            links: links.clone(),
            conn: Mutex::new(None),
            guests: Mutex::default(),
        })
    }
}

/// The pool's libvirt URI (`qemu:///system` unless it says).
fn uri(pool: &HostPool) -> String {
    match pool.spec().uri.as_str() {
        "" => "qemu:///system".into(),
        u => u.into(),
    }
}

fn is_vsock(pool: &HostPool) -> bool {
    pool.spec().link == "vsock"
}

/// The host side of one guest's link.
#[derive(Default)]
struct GuestLinks {
    relay: Option<tokio::process::Child>,
    /// The QEMU run the relay was made for (a revert starts a new one).
    linked_run: Option<u32>,
    /// A vsock guest's vhost-device-vsock.
    device: Option<tokio::process::Child>,
}

pub struct LibvirtProvider {
    uri: String,
    links: LinkConfig,
    conn: Mutex<Option<Arc<Libvirt>>>,
    guests: Mutex<HashMap<String, GuestLinks>>,
}

impl From<ProviderError> for GuestError {
    fn from(e: ProviderError) -> GuestError {
        GuestError::Substrate(e.to_string())
    }
}

/// Runs a blocking libvirt call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, GuestError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(GuestError::from),
        Err(e) => Err(GuestError::Substrate(format!("a libvirt call panicked: {e}"))),
    }
}

impl LibvirtProvider {
    /// The connection, opened again if it died.
    async fn conn(&self) -> Result<Arc<Libvirt>, GuestError> {
        if let Some(c) = self.conn.lock().as_ref().filter(|c| c.alive()) {
            return Ok(c.clone());
        }
        let u = self.uri.clone();
        let c = Arc::new(blocking(move || Libvirt::open(&u)).await?);
        *self.conn.lock() = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` on the connection on a blocking thread.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Libvirt) -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, GuestError> {
        let lv = self.conn().await?;
        blocking(move || f(&lv)).await
    }

    /// Kills the guest's relay (before a new one opens its pty: the old
    /// one holds a lock on it).
    async fn drop_relay(&self, name: &str) {
        let old = self.guests.lock().get_mut(name).and_then(|g| g.relay.take());
        if let Some(mut old) = old {
            let _ = old.kill().await;
        }
    }

    /// Starts a vsock guest's device (vhost-device-vsock, which QEMU
    /// connects to), and waits until it listens.
    async fn start_device(&self, state_dir: &Path) -> Result<tokio::process::Child, GuestError> {
        let device = &self.links.vsock_device;
        std::fs::create_dir_all(state_dir).map_err(GuestError::local(state_dir.display()))?;
        let socket = state_dir.join("vhost.sock");
        let _ = std::fs::remove_file(&socket);
        let log =
            std::fs::File::create(state_dir.join("vsock-device.log")).map_err(GuestError::local("vsock-device.log"))?;
        // It has no way of its own to notice the control plane's death (the
        // relays end with their stdin): setpriv (util-linux) has the kernel
        // kill it when the thread that started it ends. That is a runtime
        // worker thread (this is async code), which ends only with the
        // runtime, as the control plane exits (a task's panic is caught; it
        // does not end the thread).
        let mut child = tokio::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(device)
            .args(["--guest-cid", "3", "--socket"])
            .arg(&socket)
            .arg("--uds-path")
            .arg(state_dir.join("vsock.sock"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(GuestError::local(format!(
                "starting setpriv --pdeathsig KILL -- {} (hack/setup installs it)",
                device.display()
            )))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(GuestError::NotUp(format!("{} exited ({st}) before it listened", device.display())));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(GuestError::NotUp(format!("{} did not listen within 10s", device.display())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(child)
    }

    /// Waits until QEMU runs with the line the link attaches to (a guest
    /// being reverted has no pty until its new QEMU is up: waited for,
    /// never taken for dead).
    async fn link_target(&self, spec: &GuestSpec, remote: bool) -> Result<(LinkTarget, u32), GuestError> {
        let vsock = is_vsock(&spec.pool);
        let deadline = tokio::time::Instant::now() + PTY_DEADLINE;
        loop {
            let n = spec.name.clone();
            let (pty, state) = self.call(move |l| Ok((l.link_pty(&n)?, l.state(&n)?))).await?;
            match link_target(remote, vsock, pty, state, &spec.state_dir) {
                LinkPlan::Attach(target, run) => return Ok((target, run)),
                LinkPlan::Down(why) => return Err(GuestError::NotUp(why)),
                LinkPlan::Wait if tokio::time::Instant::now() > deadline => {
                    return Err(GuestError::NotUp(format!(
                        "it has no serial pty {}s after starting (is it running?)",
                        PTY_DEADLINE.as_secs()
                    )));
                }
                LinkPlan::Wait => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The relay of a remote guest: the pty is on the libvirt host, so the
    /// line comes through libvirt and this machine's relay speaks the
    /// serial framing over it. (Opened, written and dropped on blocking
    /// threads: a remote connection's calls, its close included, wait on
    /// the network.)
    async fn remote_relay(
        &self,
        name: &str,
        go: Option<Option<String>>,
        log: std::fs::File,
    ) -> Result<tokio::process::Child, GuestError> {
        let n = name.to_string();
        let line = self
            .call(move |l| {
                let line = l.open_line(&n, 1)?;
                if let Some(token) = go {
                    let text = go_line(SystemTime::now(), token.as_deref());
                    line.write_all(text.as_bytes()).map_err(|e| ProviderError::Image(format!("giving the go: {e}")))?;
                }
                Ok(line)
            })
            .await?;
        let spawned = tokio::process::Command::new(&self.links.relay)
            .args(["--downstream", "serial:stdio", "--upstream", &self.links.upstream, "--transport", "serial"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(GuestError::local(format!("starting {}", self.links.relay.display())));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tokio::task::spawn_blocking(move || drop(line));
                return Err(e);
            }
        };
        carry_line(line, &mut child).map_err(GuestError::local("carrying the link"))?;
        Ok(child)
    }
}

/// Where the host side of a link attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkTarget {
    /// The pty of its second serial line on this machine.
    Pty(PathBuf),
    /// Its second serial line through libvirt (a remote daemon).
    Stream,
    /// Where vhost-device-vsock brings the guest's connections to the
    /// host's VSOCK_PORT (the guest's relay retries until it listens).
    Vsock(PathBuf),
}

/// What to do about a link now, from what libvirt says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkPlan {
    /// Attach to the target, made for QEMU run N.
    Attach(LinkTarget, u32),
    /// QEMU is (re)starting and has no pty yet: look again.
    Wait,
    /// It stopped: no link can be made.
    Down(String),
}

/// Decides where a guest's link attaches (pure).
fn link_target(remote: bool, vsock: bool, pty: Option<PathBuf>, state: GuestState, state_dir: &Path) -> LinkPlan {
    match (state, pty) {
        (GuestState::Running(run), _) if vsock => {
            LinkPlan::Attach(LinkTarget::Vsock(vsock_socket(state_dir, VSOCK_PORT)), run)
        }
        (GuestState::Running(run), Some(_)) if remote => LinkPlan::Attach(LinkTarget::Stream, run),
        (GuestState::Running(run), Some(pty)) => LinkPlan::Attach(LinkTarget::Pty(pty), run),
        (GuestState::Stopped(why), _) => LinkPlan::Down(why),
        (GuestState::Running(_) | GuestState::Starting, _) => LinkPlan::Wait,
    }
}

/// The relay's downstream endpoint and transport for a local target.
fn relay_downstream(target: &LinkTarget) -> Option<(String, &'static str)> {
    match target {
        LinkTarget::Pty(pty) => Some((format!("serial:{}", pty.display()), "serial")),
        LinkTarget::Vsock(socket) => Some((format!("mux+unix:{}", socket.display()), "vsock")),
        LinkTarget::Stream => None,
    }
}

/// What a guest whose domain libvirt reports is doing (pure): `linked`
/// when its relay still runs and was made for this QEMU run.
fn observed(state: GuestState, relay_alive: bool, linked_run: Option<u32>) -> Observed {
    match state {
        GuestState::Running(run) => Observed::Up { linked: relay_alive && linked_run == Some(run) },
        GuestState::Starting => Observed::Busy,
        GuestState::Stopped(why) => Observed::Down(format!("{why} (QEMU ended)")),
    }
}

#[async_trait]
impl Provider for LibvirtProvider {
    async fn reach(&self) -> Result<(), GuestError> {
        self.conn().await.map(|_| ()).map_err(|e| GuestError::Substrate(format!("cannot reach libvirt: {e}")))
    }

    async fn guests(&self, prefix: &str) -> Result<Vec<String>, GuestError> {
        let p = prefix.to_string();
        self.call(move |l| l.guests(&p)).await
    }

    async fn create(
        &self,
        spec: &GuestSpec,
        join: &dyn JoinTokens,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), GuestError> {
        let lv = self.conn().await?;
        let sp = spec.pool.spec();
        if spec.address.is_some() {
            let n = sp.network.clone();
            self.call(move |l| l.ensure_network(&n)).await?;
        }
        let vsock = is_vsock(&spec.pool);
        let mut g = crate::GuestSpec {
            name: spec.name.clone(),
            image: sp.image.clone().into(),
            state_dir: spec.state_dir.clone(),
            memory_mib: if sp.memory == 0 { 256 } else { sp.memory },
            cpus: sp.cpus.max(1),
            agent_args: testbus_proto::pool::agent_args(&spec.pool, lv.emulated()),
            network: spec.address.clone().map(|a| (sp.network.clone(), a)),
            link: GuestLink::Serial,
            token: None,
        };
        if vsock {
            // Its token is on its kernel command line: it gets no go line.
            g.link = GuestLink::Vsock { vhost_socket: spec.state_dir.join("vhost.sock") };
            g.token = join.token(&spec.name).await?;
            let device = self.start_device(&spec.state_dir).await?;
            self.guests.lock().entry(spec.name.clone()).or_default().device = Some(device);
        }
        let console = blocking(move || lv.create_guest(&g)).await?;
        progress("booting");
        let mark = if vsock { VSOCK_MARK } else { WAITING_MARK };
        let boot = spec.boot;
        match console {
            Console::File(log) => wait_for_mark(&log, mark, boot).await?,
            Console::Stream(line) => {
                let waited = tokio::task::spawn_blocking(move || line.wait_for(mark, boot)).await;
                let waited = waited.map_err(|e| GuestError::NotUp(format!("waiting for its boot: {e}")))?;
                waited.map_err(|why| {
                    GuestError::NotUp(format!("did not boot within {}: {why}", testbus_proto::duration::format(boot)))
                })?
            }
        }
        if !vsock {
            let n = spec.name.clone();
            self.call(move |l| l.snapshot(&n, CLEAN_SNAPSHOT)).await?;
        }
        Ok(())
    }

    async fn link(&self, spec: &GuestSpec, start: LinkStart, join: &dyn JoinTokens) -> Result<(), GuestError> {
        let name = spec.name.as_str();
        self.drop_relay(name).await;
        let remote = self.conn().await?.is_remote();
        let (target, run) = self.link_target(spec, remote).await?;
        let log = std::fs::File::create(spec.state_dir.join("relay.log")).map_err(GuestError::local("relay.log"))?;
        let go = start == LinkStart::Go && !is_vsock(&spec.pool);
        let relay = match relay_downstream(&target) {
            None => {
                let go = if go { Some(join.token(name).await?) } else { None };
                self.remote_relay(name, go, log).await?
            }
            Some((downstream, transport)) => {
                if let LinkTarget::Pty(pty) = &target {
                    // The pty is raw (no echo, no line editing) before
                    // anything crosses it.
                    let stty =
                        tokio::process::Command::new("stty").arg("-F").arg(pty).args(["raw", "-echo"]).status().await;
                    if !stty.is_ok_and(|s| s.success()) {
                        return Err(GuestError::NotUp(format!("cannot set {} raw", pty.display())));
                    }
                    if go {
                        let token = join.token(name).await?;
                        tokio::fs::write(pty, go_line(SystemTime::now(), token.as_deref()))
                            .await
                            .map_err(GuestError::local(format!("giving the go on {}", pty.display())))?;
                    }
                }
                self.links
                    .relay(&downstream, transport, log)
                    .spawn()
                    .map_err(GuestError::local(format!("starting {}", self.links.relay.display())))?
            }
        };
        let mut guests = self.guests.lock();
        let g = guests.entry(name.to_string()).or_default();
        g.relay = Some(relay);
        g.linked_run = Some(run);
        Ok(())
    }

    async fn observe(&self, spec: &GuestSpec) -> Result<Observed, GuestError> {
        let (device_ended, relay_alive, linked_run) = {
            let mut guests = self.guests.lock();
            let g = guests.entry(spec.name.clone()).or_default();
            let ended = |c: &mut Option<tokio::process::Child>| {
                c.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
            };
            let device_ended = ended(&mut g.device);
            let relay_alive = g.relay.is_some() && !ended(&mut g.relay);
            (device_ended, relay_alive, g.linked_run)
        };
        if device_ended {
            return Ok(Observed::Down("its vsock device (vhost-device-vsock) ended".into()));
        }
        let n = spec.name.clone();
        let state = self.call(move |l| l.state(&n)).await?;
        Ok(observed(state, relay_alive, linked_run))
    }

    fn cleans_in_place(&self, pool: &HostPool) -> bool {
        // A vsock guest cannot be snapshotted (vhost-user-vsock cannot be
        // migrated): it is cleaned by making a new one.
        !is_vsock(pool)
    }

    async fn clean(&self, spec: &GuestSpec, _join: &dyn JoinTokens) -> Result<(), GuestError> {
        self.drop_relay(&spec.name).await;
        let n = spec.name.clone();
        self.call(move |l| l.load_in_place(&n, CLEAN_SNAPSHOT)).await
    }

    fn relinkable(&self, pool: &HostPool) -> Result<(), String> {
        // A vsock guest's device went with the control plane that started it.
        match is_vsock(pool) {
            true => Err("its vsock device is gone".into()),
            false => Ok(()),
        }
    }

    async fn address(&self, spec: &GuestSpec) -> Result<Option<String>, GuestError> {
        let n = spec.name.clone();
        self.call(move |l| l.guest_address(&n)).await
    }

    async fn destroy(&self, spec: &GuestSpec) -> Result<(), GuestError> {
        self.drop_relay(&spec.name).await;
        let (n, dir, image) = (spec.name.clone(), spec.state_dir.clone(), PathBuf::from(&spec.pool.spec().image));
        self.call(move |l| l.destroy_guest(&n, &dir, &image)).await?;
        // QEMU is gone: its vsock device may go too.
        let device = self.guests.lock().remove(&spec.name).and_then(|g| g.device);
        if let Some(mut device) = device {
            let _ = device.kill().await;
        }
        Ok(())
    }

    async fn snapshot(&self, spec: &GuestSpec, action: SnapshotAction, name: &str) -> Result<Vec<String>, GuestError> {
        let (n, s) = (spec.name.clone(), name.to_string());
        self.call(move |l| {
            match action {
                SnapshotAction::Create => l.snapshot(&n, &s)?,
                SnapshotAction::Revert => l.revert(&n, &s)?,
                SnapshotAction::Delete => l.delete_snapshot(&n, &s)?,
                SnapshotAction::List => {}
            }
            l.snapshots(&n)
        })
        .await
    }

    async fn release_pool(&self, pool: &HostPool) -> Result<(), GuestError> {
        let image = PathBuf::from(&pool.spec().image);
        if let Err(e) = self.call(move |l| l.forget_image(&image)).await {
            tracing::warn!(pool = pool.name(), error = %e, "cannot drop libvirt's view of the image directory");
        }
        if !pool.spec().network.is_empty() {
            let net = pool.spec().network.clone();
            self.call(move |l| l.delete_network(&net)).await?;
        }
        Ok(())
    }
}

/// Waits until the guest's console log says `mark` (it waits for its go,
/// or links over vsock).
async fn wait_for_mark(log: &Path, mark: &str, within: Duration) -> Result<(), GuestError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(mark)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("nothing");
            let within = testbus_proto::duration::format(within);
            return Err(GuestError::NotUp(format!("did not boot within {within} (console: {last})")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Carries a remote guest's link line to its relay's stdin and back, on
/// two threads of their own (libvirt's stream calls block). Each ends when
/// its side does and ends the other: the relay exiting (or killed, as a
/// new link replaces it) closes its stdout, and the sender aborts the
/// stream; the guest's QEMU ending ends the stream, and the receiver
/// closes the relay's stdin, which ends the relay. If the control plane
/// dies, so do the threads and the pipes: the relay ends.
fn carry_line(line: LineStream, relay: &mut tokio::process::Child) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let missing = || std::io::Error::other("the relay has no pipes");
    let mut to_relay = std::fs::File::from(relay.stdin.take().ok_or_else(missing)?.into_owned_fd()?);
    let mut from_relay = std::fs::File::from(relay.stdout.take().ok_or_else(missing)?.into_owned_fd()?);
    let (rx, tx) = (line.clone(), line.clone());
    pump("link-from-guest", move |b| rx.read(b), move |b| to_relay.write_all(b), line.clone())?;
    pump("link-to-guest", move |b| from_relay.read(b), move |b| tx.write_all(b), line)?;
    Ok(())
}

/// Copies from `read` to `write` on a thread of its own until either
/// fails or `read` ends, then aborts `line` (which ends the other pump).
fn pump(
    name: &str,
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize> + Send + 'static,
    mut write: impl FnMut(&[u8]) -> std::io::Result<()> + Send + 'static,
    line: LineStream,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n @ 1..) = read(&mut buf) {
            if write(&buf[..n]).is_err() {
                break;
            }
        }
        line.abort();
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_attaches_to_what_the_guest_runs_with() {
        let dir = Path::new("/g");
        let pty = || Some(PathBuf::from("/dev/pts/7"));
        let run = GuestState::Running(3);
        assert_eq!(
            link_target(false, false, pty(), run.clone(), dir),
            LinkPlan::Attach(LinkTarget::Pty("/dev/pts/7".into()), 3)
        );
        // A remote guest's pty is on the other machine: its line comes
        // through libvirt.
        assert_eq!(link_target(true, false, pty(), run.clone(), dir), LinkPlan::Attach(LinkTarget::Stream, 3));
        // A vsock guest has no pty and needs none.
        assert_eq!(
            link_target(false, true, None, run.clone(), dir),
            LinkPlan::Attach(LinkTarget::Vsock("/g/vsock.sock_7780".into()), 3)
        );
        // QEMU restarting (a revert) has no pty yet: waited for, never
        // taken for dead.
        assert_eq!(link_target(false, false, None, run, dir), LinkPlan::Wait);
        assert_eq!(link_target(false, false, None, GuestState::Starting, dir), LinkPlan::Wait);
        assert_eq!(link_target(false, true, None, GuestState::Starting, dir), LinkPlan::Wait);
        assert_eq!(
            link_target(false, false, pty(), GuestState::Stopped("shut off".into()), dir),
            LinkPlan::Down("shut off".into())
        );
    }

    #[test]
    fn each_local_target_has_its_relay_endpoint() {
        assert_eq!(
            relay_downstream(&LinkTarget::Pty("/dev/pts/7".into())),
            Some(("serial:/dev/pts/7".to_string(), "serial"))
        );
        assert_eq!(
            relay_downstream(&LinkTarget::Vsock("/g/vsock.sock_7780".into())),
            Some(("mux+unix:/g/vsock.sock_7780".to_string(), "vsock"))
        );
        assert_eq!(relay_downstream(&LinkTarget::Stream), None);
    }

    #[test]
    fn a_guest_is_linked_only_by_a_live_relay_made_for_its_run() {
        assert_eq!(observed(GuestState::Running(2), true, Some(2)), Observed::Up { linked: true });
        // A revert started QEMU again: a new pty, a new link.
        assert_eq!(observed(GuestState::Running(3), true, Some(2)), Observed::Up { linked: false });
        assert_eq!(observed(GuestState::Running(2), false, Some(2)), Observed::Up { linked: false });
        assert_eq!(observed(GuestState::Running(2), true, None), Observed::Up { linked: false });
        assert_eq!(observed(GuestState::Starting, true, Some(2)), Observed::Busy);
        assert_eq!(
            observed(GuestState::Stopped("its domain is gone".into()), true, Some(2)),
            Observed::Down("its domain is gone (QEMU ended)".into())
        );
    }
}
