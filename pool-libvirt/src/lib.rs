//! testbus's libvirt provider: the guests of a HostPool as libvirt domains.
//! This crate alone knows libvirt (through the `virt` crate); the pool
//! controller asks it for guests by name and never sees XML.
//!
//! A guest is a qcow2 linked clone of the image's `golden.qcow2` (made by
//! `hack/guest-image`), booted directly from the image's kernel and initrd
//! with a command line that tells it its name and agent flags. Its first
//! serial line is logged by virtlogd (bounded); its second is a pty that
//! carries the relay link to the control plane (or, for a vsock guest,
//! there is none and virtio-vsock carries it). Every call blocks: callers run them
//! on a blocking thread.
//!
//! A daemon on another machine (a URI with a host, `qemu+ssh://user@host/
//! system`: a remote testbed) shares no files with this one, so everything
//! of its guests goes through libvirt: the disk is a volume made next to
//! the golden image by the storage API (a directory pool on the image), the
//! console is read and the link carried over console streams
//! (`virDomainOpenConsole`), and destroying a guest deletes its volumes.
//! `spec.image` then names the image directory on that machine.
#![forbid(unsafe_code)]

mod provider;
pub use provider::{LibvirtKind, LibvirtProvider};

use std::path::{Path, PathBuf};
use std::process::Command;
use virt::connect::Connect;

/// Where a guest's QEMU is, as libvirt says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestState {
    /// Running, as QEMU run N (a new N each time QEMU starts, a revert
    /// included).
    Running(u32),
    /// Busy with a snapshot: between two QEMU runs (a revert), or paused
    /// by libvirt while it takes or loads one.
    Starting,
    /// Not running, and why.
    Stopped(String),
}
use virt::domain::Domain;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// What libvirt said, as it said it.
    #[error("libvirt ({uri}): {message}")]
    Libvirt { uri: String, message: String },
    /// The image directory lacks a part, or a disk could not be made.
    #[error("{0}")]
    Image(String),
    /// No such guest.
    #[error("no guest {0}")]
    NoGuest(String),
}

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

pub use testbus_proto::pool::is_remote_uri;

/// The name of the snapshot every guest gets while it waits for its go:
/// reverting to it gives a machine that never ran a test.
pub const CLEAN_SNAPSHOT: &str = "testbus-clean";

/// What the guest's console says once it waits for the host's go on its
/// second serial line.
pub const WAITING_MARK: &str = "testbus-guest: waiting for go";

/// The go a guest waits for: one line with the host's clock (seconds since
/// the epoch), which the guest sets its own to, 32 random bytes it mixes
/// into its entropy pool (every guest brought back to the same snapshot
/// would otherwise go on from the same random state), and the join token
/// its agent gets its certificate with ("-": none, the control plane
/// serves without TLS). The line break before it ends whatever an earlier
/// link left on the line.
pub fn go_line(now: std::time::SystemTime, token: Option<&str>) -> String {
    let secs = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let seed: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    format!("\ngo {secs} {seed} {}\n", token.unwrap_or("-"))
}

/// What the console of a vsock guest says once it links (it has no go to
/// wait for: it is never snapshotted, and its clock comes from the RTC).
pub const VSOCK_MARK: &str = "testbus-guest: linking over vsock";

/// The host port a vsock guest's relay connects to (CID 2, the host).
pub const VSOCK_PORT: u32 = 7780;

/// How a guest's agent reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLink {
    /// Its second serial line, a pty on the host; the go comes over it.
    Serial,
    /// virtio-vsock, served in user space by a vhost-device-vsock that
    /// listens on `vhost_socket`; the guest's connections to the host's
    /// port P reach the unix socket `vsock_socket(state_dir, P)`.
    Vsock { vhost_socket: PathBuf },
}

/// Where vhost-device-vsock puts a vsock guest's connections to host port
/// `port` (its `--uds-path` is `state_dir/vsock.sock`).
pub fn vsock_socket(state_dir: &Path, port: u32) -> PathBuf {
    state_dir.join(format!("vsock.sock_{port}"))
}

/// One guest to make.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    /// The directory `hack/guest-image` made.
    pub image: PathBuf,
    /// Where the guest's disk and console log go (removed with the guest).
    pub state_dir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The agent's extra flags (`--capability`, `--label`, `--var`).
    pub agent_args: Vec<String>,
    /// The pool network and the guest's address on it (ADDR/PREFIX).
    pub network: Option<(String, String)>,
    pub link: GuestLink,
    /// A vsock guest's join token (on its kernel command line: it gets no
    /// go line). Serial guests get theirs with the go.
    pub token: Option<String>,
}

/// A connection to one libvirt daemon.
pub struct Libvirt {
    conn: Connect,
    uri: String,
    /// `kvm` where it works, else `qemu` (TCG).
    domain_type: &'static str,
    /// The daemon is on another machine: guests' files are made, read and
    /// removed through libvirt only.
    remote: bool,
    /// Held while volumes of an image directory are made or deleted: its
    /// pool refuses a refresh while it builds a volume ("asynchronous jobs
    /// running"), and must not be dropped under a guest being made.
    volumes: parking_lot::Mutex<()>,
}

/// Where the guest's console (its first serial line) can be read.
pub enum Console {
    /// The file virtlogd writes on this machine.
    File(PathBuf),
    /// A stream from libvirt (a remote guest), opened before the guest ran
    /// its first instruction: nothing it printed is missed.
    Stream(LineStream),
}

/// One serial line of a guest, opened through libvirt as a console
/// stream: the same whether the daemon is local or remote. Reads and writes
/// block; `abort` (from any thread) ends both, and so does the guest's QEMU
/// ending. libvirt serves one stream per line: opening it again takes it
/// over (the earlier stream ends).
#[derive(Clone)]
pub struct LineStream {
    stream: std::sync::Arc<virt::stream::Stream>,
    what: String,
}

fn err(uri: &str) -> impl Fn(virt::error::Error) -> ProviderError + '_ {
    move |e| ProviderError::Libvirt { uri: uri.to_string(), message: e.message().to_string() }
}

fn is_missing(e: &virt::error::Error) -> bool {
    use virt::error::ErrorNumber;
    matches!(
        e.code(),
        virt::enumutil::Enum::Known(ErrorNumber::NoDomain | ErrorNumber::NoNetwork | ErrorNumber::NoDomainSnapshot)
    )
}

/// Whether hardware virtualisation can be trusted on the daemon's machine:
/// libvirt offers kvm and that machine is not itself a guest (its host CPU,
/// as libvirt reports it, has the hypervisor flag; nested KVM hangs guests
/// on some hypervisors). TCG always works, slower.
fn kvm_works(capabilities: &str) -> bool {
    let offered = capabilities.contains("<domain type='kvm'");
    let host_cpu = capabilities.split("</cpu>").next().unwrap_or("");
    let nested = host_cpu.contains("<feature name='hypervisor'/>");
    offered && !nested
}

impl Libvirt {
    pub fn open(uri: &str) -> Result<Libvirt> {
        let conn = Connect::open(Some(uri)).map_err(err(uri))?;
        let caps = conn.capabilities().map_err(err(uri))?;
        let domain_type = if kvm_works(&caps) { "kvm" } else { "qemu" };
        let remote = is_remote_uri(uri);
        Ok(Libvirt { conn, uri: uri.to_string(), domain_type, remote, volumes: Default::default() })
    }

    /// Whether the daemon is on another machine (see the crate's docs).
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// Whether guests are emulated (TCG) rather than run by KVM: several
    /// of them on a few cores are slow enough to miss a 10 s lease.
    pub fn emulated(&self) -> bool {
        self.domain_type == "qemu"
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the daemon still answers.
    pub fn alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    fn domain(&self, name: &str) -> Result<Domain> {
        self.conn.lookup_domain_by_name(name).map_err(|e| {
            if is_missing(&e) {
                ProviderError::NoGuest(name.to_string())
            } else {
                err(&self.uri)(e)
            }
        })
    }

    /// Makes sure the isolated network `name` exists and runs: a bridge
    /// with no address, no forwarding, no DHCP or DNS (so no dnsmasq and no
    /// firewall rules): its guests reach each other and nothing else, with
    /// the addresses their command lines give them. The bridge has the
    /// name every provider gives the network (`testbus_proto::pool::
    /// bridge_name`), so a podman pool on the same network shares it; if
    /// one made it first here, the network uses it as it is.
    pub fn ensure_network(&self, name: &str) -> Result<()> {
        let net = match self.conn.lookup_network_by_name(name) {
            Ok(n) => n,
            Err(e) if is_missing(&e) => {
                let bridge = testbus_proto::pool::bridge_name(name);
                let exists = !self.remote && Path::new("/sys/class/net").join(&bridge).exists();
                let xml = network_xml(name, &bridge, exists);
                self.conn.define_network_xml(&xml).map_err(err(&self.uri))?
            }
            Err(e) => return Err(err(&self.uri)(e)),
        };
        if !net.is_active().map_err(err(&self.uri))? {
            net.create().map_err(err(&self.uri))?;
        }
        Ok(())
    }

    /// Stops and removes the network `name`, if it exists.
    pub fn delete_network(&self, name: &str) -> Result<()> {
        match self.conn.lookup_network_by_name(name) {
            Ok(n) => {
                if n.is_active().unwrap_or(false) {
                    n.destroy().map_err(err(&self.uri))?;
                }
                n.undefine().map_err(err(&self.uri))
            }
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(err(&self.uri)(e)),
        }
    }

    /// Makes the guest's disk (a linked clone of the golden image), defines
    /// the domain and starts it; where its console can be read.
    pub fn create_guest(&self, g: &GuestSpec) -> Result<Console> {
        std::fs::create_dir_all(&g.state_dir)
            .map_err(|e| ProviderError::Image(format!("{}: {e}", g.state_dir.display())))?;
        if self.remote {
            return self.create_remote_guest(g);
        }
        for part in IMAGE_PARTS {
            if !g.image.join(part).is_file() {
                return Err(missing_part(&g.image, part));
            }
        }
        let disk = g.state_dir.join("disk.qcow2");
        let _ = std::fs::remove_file(&disk);
        let golden = g.image.join("golden.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&golden)
            .arg(&disk)
            .output()
            .map_err(|e| ProviderError::Image(format!("qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(ProviderError::Image(format!(
                "qemu-img create (a linked clone of {}): {}",
                golden.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let console = console_log(&g.state_dir);
        let _ = std::fs::remove_file(&console);
        let files = GuestFiles { disk, console: console.clone(), console_stream: false };
        let dom = self.conn.define_domain_xml(&domain_xml(g, self.domain_type, &files)).map_err(err(&self.uri))?;
        if let Err(e) = dom.create() {
            let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA);
            return Err(err(&self.uri)(e));
        }
        Ok(Console::File(console))
    }

    /// A guest of a remote daemon: its disk a volume next to the golden
    /// image, its console a stream opened while the guest is still paused
    /// at its start.
    fn create_remote_guest(&self, g: &GuestSpec) -> Result<Console> {
        if matches!(g.link, GuestLink::Vsock { .. }) {
            return Err(ProviderError::Image(
                "a vsock guest needs vhost-device-vsock on this machine: its libvirt must be local".into(),
            ));
        }
        let disk = {
            let _volumes = self.volumes.lock();
            let pool = self.image_pool(&g.image)?;
            let mut golden = None;
            for part in IMAGE_PARTS {
                match pool.lookup_storage_vol_by_name(part) {
                    Ok(v) if part == "golden.qcow2" => golden = Some(v),
                    Ok(_) => {}
                    Err(_) => return Err(missing_part(&g.image, part)),
                }
            }
            let golden = golden.expect("golden.qcow2 is one of IMAGE_PARTS");
            self.delete_volumes(&pool, &g.name)?;
            let capacity = golden.info().map_err(err(&self.uri))?.capacity;
            let golden_path = golden.path().map_err(err(&self.uri))?;
            let xml = format!(
                "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
                 <target><format type='qcow2'/></target>\
                 <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
                escape(&disk_volume(&g.name)),
                escape(&golden_path)
            );
            let disk = virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0).map_err(err(&self.uri))?;
            disk.path().map_err(err(&self.uri))
        };
        let started = disk.and_then(|disk| {
            let files =
                GuestFiles { disk: disk.into(), console: g.image.join(console_volume(&g.name)), console_stream: true };
            let dom = self.conn.define_domain_xml(&domain_xml(g, self.domain_type, &files)).map_err(err(&self.uri))?;
            dom.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)
                .map_err(err(&self.uri))
                .and_then(|()| {
                    let console = self.open_line(&g.name, 0)?;
                    dom.resume().map_err(err(&self.uri))?;
                    Ok(console)
                })
                .inspect_err(|_| {
                    let _ = dom.destroy();
                    let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA);
                })
        });
        match started {
            Ok(console) => Ok(Console::Stream(console)),
            Err(e) => {
                // Nothing of it is left: its disk (made or half made) goes.
                let _volumes = self.volumes.lock();
                if let Ok(pool) = self.image_pool(&g.image) {
                    let _ = self.delete_volumes(&pool, &g.name);
                }
                Err(e)
            }
        }
    }

    /// The directory storage pool on the image directory (transient: a
    /// view of the directory, gone when libvirtd restarts), refreshed.
    fn image_pool(&self, image: &Path) -> Result<virt::storage_pool::StoragePool> {
        let path = image.display().to_string();
        let pool = match self.conn.lookup_storage_pool_by_target_path(&path) {
            Ok(p) => p,
            Err(_) => {
                // Readable, and told apart by a hash of the whole path
                // (`/a/b.c` and `/a/b-c` read alike). Only its creation
                // uses the name: it is found by its path.
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                path.hash(&mut h);
                let tail: String = path
                    .chars()
                    .rev()
                    .take(40)
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
                    .collect::<Vec<char>>()
                    .into_iter()
                    .rev()
                    .collect();
                let name = format!("{IMAGE_POOL_PREFIX}{:016x}{tail}", h.finish());
                let xml = format!(
                    "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
                    escape(&name),
                    escape(&path)
                );
                match self.conn.create_storage_pool_xml(&xml, 0) {
                    Ok(p) => p,
                    // Made by another guest's creation meanwhile, or the
                    // directory is not there.
                    Err(e) => self.conn.lookup_storage_pool_by_target_path(&path).map_err(|_| {
                        ProviderError::Image(format!("image {path}: {} (build it with hack/guest-image)", e.message()))
                    })?,
                }
            }
        };
        pool.refresh(0).map_err(err(&self.uri))?;
        Ok(pool)
    }

    /// Deletes a remote guest's disk and console logs (virtlogd keeps
    /// rotated ones as NAME.console.log.N).
    fn delete_volumes(&self, pool: &virt::storage_pool::StoragePool, name: &str) -> Result<()> {
        let disk = disk_volume(name);
        let console = console_volume(name);
        for vol in pool.list_all_volumes(0).map_err(err(&self.uri))? {
            let Ok(v) = vol.name() else { continue };
            if v == disk || v.starts_with(&console) {
                vol.delete(0).map_err(err(&self.uri))?;
            }
        }
        Ok(())
    }

    /// A remote daemon's view of the image directory goes once no guest's
    /// volume is left in it, if testbus made it (transient, named by
    /// testbus; a pool an administrator defined there stays). Another
    /// HostPool on the same image makes it again when it needs it.
    pub fn forget_image(&self, image: &Path) -> Result<()> {
        if !self.remote {
            return Ok(());
        }
        let _volumes = self.volumes.lock();
        let Ok(pool) = self.conn.lookup_storage_pool_by_target_path(&image.display().to_string()) else {
            return Ok(());
        };
        let ours = pool.name().is_ok_and(|n| n.starts_with(IMAGE_POOL_PREFIX)) && !pool.is_persistent().unwrap_or(true);
        if !ours {
            return Ok(());
        }
        pool.refresh(0).map_err(err(&self.uri))?;
        let names: Vec<String> = pool.list_volumes().map_err(err(&self.uri))?;
        if names.iter().all(|n| IMAGE_PARTS.contains(&n.as_str()) || n == "kernel-version") {
            pool.destroy().map_err(err(&self.uri))?;
        }
        Ok(())
    }

    /// Opens serial line `port` of the running guest (0: its console, 1:
    /// its link), taking it over from any earlier stream.
    pub fn open_line(&self, name: &str, port: u32) -> Result<LineStream> {
        let conn = Connect::open(Some(&self.uri)).map_err(err(&self.uri))?;
        let dom = conn.lookup_domain_by_name(name).map_err(err(&self.uri))?;
        let stream = virt::stream::Stream::new(&conn, 0).map_err(err(&self.uri))?;
        let dev = format!("serial{port}");
        dom.open_console(Some(&dev), &stream, virt::sys::VIR_DOMAIN_CONSOLE_FORCE).map_err(err(&self.uri))?;
        Ok(LineStream { stream: std::sync::Arc::new(stream), what: format!("{name}'s {dev}") })
    }

    /// Whether the guest runs, and as which QEMU run: one libvirt call.
    pub fn state(&self, name: &str) -> Result<GuestState> {
        use virt::domain::{DomainShutoffReason as S, DomainState as D, DomainStateReason as R};
        use virt::enumutil::Enum::{Known, Unknown};
        let dom = match self.domain(name) {
            Ok(d) => d,
            Err(ProviderError::NoGuest(_)) => return Ok(GuestState::Stopped("its domain is gone".into())),
            Err(e) => return Err(e),
        };
        let (state, reason) = dom.state().map_err(err(&self.uri))?;
        Ok(match (state, reason) {
            (Known(D::Running), _) => match dom.id() {
                Some(run) => GuestState::Running(run),
                None => GuestState::Starting,
            },
            // A revert stops QEMU ("from snapshot") and starts it paused
            // while it loads the snapshot; a snapshot pauses it while it
            // is written. testbus pauses guests for nothing else, and one
            // paused by hand loses its lease like any stuck host.
            (Known(D::Shutoff), Known(R::Shutoff(Known(S::FromSnapshot)))) | (Known(D::Paused | D::NoState), _) => {
                GuestState::Starting
            }
            (Known(D::Shutoff), Known(R::Shutoff(Known(why)))) => {
                GuestState::Stopped(format!("its domain is shut off ({why:?})").to_lowercase())
            }
            (Known(state), _) => GuestState::Stopped(format!("its domain is {state:?}").to_lowercase()),
            (Unknown(state), _) => GuestState::Stopped(format!("its domain is in state {state}")),
        })
    }

    /// The host side of the guest's link: the pty of its second serial
    /// line (a new one each time QEMU starts, a revert included). None
    /// while the domain has none: it does not run, or its QEMU is still
    /// starting (a revert restarts it, and the pty comes with the new one).
    pub fn link_pty(&self, name: &str) -> Result<Option<PathBuf>> {
        let xml = self.domain(name)?.xml_desc(0).map_err(err(&self.uri))?;
        // <serial type='pty'> <source path='/dev/pts/N'/> <target ... port='1'>
        Ok(xml.split("<serial type='pty'>").skip(1).find_map(|s| {
            let end = s.find("</serial>")?;
            let s = &s[..end];
            let path = s.split("<source path='").nth(1)?.split('\'').next()?;
            Some(PathBuf::from(path))
        }))
    }

    /// The pool-network address the guest was made with (its kernel
    /// command line's `testbus.ip=`), if any.
    pub fn guest_address(&self, name: &str) -> Result<Option<String>> {
        let xml = self.domain(name)?.xml_desc(0).map_err(err(&self.uri))?;
        Ok(address_on_cmdline(&xml))
    }

    /// Takes a snapshot of the running guest, memory included.
    pub fn snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        let dom = self.domain(name)?;
        let xml = format!("<domainsnapshot><name>{snapshot}</name></domainsnapshot>");
        dom.create_snapshot_xml(&xml, 0).map(|_| ()).map_err(err(&self.uri))
    }

    /// Brings the guest back to a snapshot (QEMU restarts: its link pty
    /// changes).
    pub fn revert(&self, name: &str, snapshot: &str) -> Result<()> {
        let dom = self.domain(name)?;
        let snap = Domain::lookup_snapshot_by_name(&dom, snapshot, 0).map_err(err(&self.uri))?;
        snap.revert(0).map_err(err(&self.uri))
    }

    /// Brings the running guest back to an internal snapshot in place:
    /// QEMU's own `loadvm`, without the new QEMU (and pty) libvirt's
    /// revert starts: ~0.2 s against ~2.2 s here. libvirt's snapshot
    /// records do not change (the domain is marked "custom monitor").
    pub fn load_in_place(&self, name: &str, snapshot: &str) -> Result<()> {
        let dom = self.domain(name)?;
        let hmp = virt::sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP;
        let out = dom.qemu_monitor_command(&format!("loadvm {snapshot}"), hmp).map_err(err(&self.uri))?;
        // HMP answers an error as text, and nothing on success.
        match out.trim() {
            "" => Ok(()),
            said => {
                Err(ProviderError::Libvirt { uri: self.uri.clone(), message: format!("loadvm {snapshot}: {said}") })
            }
        }
    }

    /// The guest's snapshots, by name.
    pub fn snapshots(&self, name: &str) -> Result<Vec<String>> {
        let dom = self.domain(name)?;
        let all = dom.list_all_snapshots(0).map_err(err(&self.uri))?;
        let mut names: Vec<String> = all.iter().filter_map(|s| s.name().ok()).collect();
        names.sort();
        Ok(names)
    }

    pub fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        let dom = self.domain(name)?;
        let snap = Domain::lookup_snapshot_by_name(&dom, snapshot, 0).map_err(err(&self.uri))?;
        snap.delete(0).map_err(err(&self.uri))
    }

    /// Stops and removes the guest: its domain, snapshots, disk and
    /// console log (on a remote daemon, the volumes next to `image`). A
    /// guest that is already gone is fine.
    pub fn destroy_guest(&self, name: &str, state_dir: &Path, image: &Path) -> Result<()> {
        match self.domain(name) {
            Ok(dom) => {
                if dom.is_active().unwrap_or(false) {
                    if let Err(e) = dom.destroy() {
                        if !is_missing(&e) {
                            return Err(err(&self.uri)(e));
                        }
                    }
                }
                if let Err(e) = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA) {
                    if !is_missing(&e) {
                        return Err(err(&self.uri)(e));
                    }
                }
            }
            Err(ProviderError::NoGuest(_)) => {}
            Err(e) => return Err(e),
        }
        if self.remote {
            let _volumes = self.volumes.lock();
            match self.image_pool(image) {
                Ok(pool) => self.delete_volumes(&pool, name)?,
                // No image directory there: nothing of the guest either.
                Err(ProviderError::Image(_)) => {}
                Err(e) => return Err(e),
            }
        }
        match std::fs::remove_dir_all(state_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Image(format!("{}: {e}", state_dir.display()))),
        }
    }

    /// The names of the defined domains that start with `prefix`.
    pub fn guests(&self, prefix: &str) -> Result<Vec<String>> {
        let all = self.conn.list_all_domains(0).map_err(err(&self.uri))?;
        let mut names: Vec<String> =
            all.iter().filter_map(|d| d.name().ok()).filter(|n| n.starts_with(prefix)).collect();
        names.sort();
        Ok(names)
    }
}

/// How testbus's view of an image directory on a remote daemon is named.
const IMAGE_POOL_PREFIX: &str = "testbus-image-";

/// What an image directory holds (`hack/guest-image` makes them).
const IMAGE_PARTS: [&str; 3] = ["vmlinuz", "initrd.img", "golden.qcow2"];

fn missing_part(image: &Path, part: &str) -> ProviderError {
    ProviderError::Image(format!("image {}: no {part} (build it with hack/guest-image)", image.display()))
}

/// A remote guest's disk, a volume in the image directory.
fn disk_volume(name: &str) -> String {
    format!("{name}.qcow2")
}

/// Where virtlogd logs a remote guest's console, in the image directory.
fn console_volume(name: &str) -> String {
    format!("{name}.console.log")
}

/// Where a guest's disk and console log are, on the daemon's machine.
struct GuestFiles {
    disk: PathBuf,
    console: PathBuf,
    /// The console is also a pty, for a console stream (a remote guest).
    console_stream: bool,
}

impl LineStream {
    /// Reads what the line carries: 0 once it ended.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.recv(buf).map(|n| n.max(0) as usize).map_err(|e| self.io_error(e))
    }

    pub fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = self.stream.send(data).map_err(|e| self.io_error(e))?;
            if n <= 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, format!("{}: closed", self.what)));
            }
            data = &data[n as usize..];
        }
        Ok(())
    }

    /// Ends the stream: a read or write blocked on it returns.
    pub fn abort(&self) {
        let _ = (*self.stream).clone().abort();
    }

    fn io_error(&self, e: virt::error::Error) -> std::io::Error {
        std::io::Error::other(format!("{}: {}", self.what, e.message()))
    }

    /// Reads the line until it has said `mark`, for at most `within`; on
    /// failure, why (with the last line it said).
    pub fn wait_for(&self, mark: &str, within: std::time::Duration) -> Result<(), ConsoleWaitError> {
        let (done, stop) = std::sync::mpsc::channel::<()>();
        let watchdog = {
            let line = self.clone();
            std::thread::spawn(move || {
                if stop.recv_timeout(within) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    line.abort();
                }
            })
        };
        // The last 4 KiB read: the mark may straddle two reads.
        let mut seen: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        let result = loop {
            match self.read(&mut buf) {
                Ok(0) => break Err(None),
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&seen).contains(mark) {
                        break Ok(());
                    }
                    let cut = seen.len().saturating_sub(4096);
                    seen.drain(..cut);
                }
                Err(e) => break Err(Some(e)),
            }
        };
        drop(done);
        let _ = watchdog.join();
        result.map_err(|error| {
            let text = String::from_utf8_lossy(&seen);
            let last = text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("nothing").to_string();
            match error {
                None => ConsoleWaitError::Ended { last },
                Some(error) => ConsoleWaitError::Read { error, last },
            }
        })
    }
}

/// Why a console did not say what was waited for; `last` is the last line
/// it did say. (A wait past its time ends as a read of an aborted stream.)
#[derive(Debug, thiserror::Error)]
pub enum ConsoleWaitError {
    #[error("its console ended (console: {last})")]
    Ended { last: String },
    #[error("{error} (console: {last})")]
    Read { error: std::io::Error, last: String },
}

/// Where a guest's console (its first serial line) is logged, through
/// virtlogd: a guest that floods its console fills no disk (virtlogd keeps
/// 2 MiB and three older files, as its max_size and max_backups say).
pub fn console_log(state_dir: &Path) -> PathBuf {
    state_dir.join("console.log")
}

/// `testbus.ip=ADDR` on the `<cmdline>` of a domain's XML.
fn address_on_cmdline(xml: &str) -> Option<String> {
    let cmdline = xml.split("<cmdline>").nth(1)?.split("</cmdline>").next()?;
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("testbus.ip=")).map(String::from)
}

/// A pool network's XML: isolated (libvirt makes the bridge, with no
/// address and no forwarding), or on a bridge another provider made.
fn network_xml(name: &str, bridge: &str, bridge_exists: bool) -> String {
    let (name, bridge) = (escape(name), escape(bridge));
    if bridge_exists {
        format!("<network><name>{name}</name><forward mode='bridge'/><bridge name='{bridge}'/></network>")
    } else {
        format!("<network><name>{name}</name><bridge name='{bridge}' stp='off' delay='0'/></network>")
    }
}

/// Characters that may appear in XML text and attributes unescaped here:
/// names, paths and flags are checked by the pool's validation, and
/// anything else is escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn domain_xml(g: &GuestSpec, domain_type: &str, files: &GuestFiles) -> String {
    let image = |part: &str| escape(&g.image.join(part).display().to_string());
    let mut cmdline = format!("console=ttyS0 quiet testbus.name={}", g.name);
    if !g.agent_args.is_empty() {
        // One word on the kernel command line: flags percent-encoded and
        // joined by commas (the guest's init decodes them).
        cmdline.push_str(&format!(" testbus.args={}", testbus_proto::pool::kernel_args(&g.agent_args)));
    }
    // A vsock guest: vhost-user-vsock (QEMU has no domain XML for it in
    // libvirt 9), which needs the guest's memory shared with the device.
    let (mut qemu_ns, mut memory_backing, mut link_serial, mut qemu_args) =
        ("", "", "<serial type='pty'><target port='1'/></serial>".to_string(), String::new());
    if let GuestLink::Vsock { vhost_socket } = &g.link {
        cmdline.push_str(&format!(" testbus.link=vsock:2:{VSOCK_PORT}"));
        if let Some(t) = &g.token {
            cmdline.push_str(&format!(" testbus.token={t}"));
        }
        qemu_ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'";
        memory_backing = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>";
        link_serial.clear();
        // QEMU's option syntax: a comma in a value is doubled.
        qemu_args = format!(
            "<qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=testbus-vsock,path={}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='vhost-user-vsock-pci,chardev=testbus-vsock,bus=pci.0,addr=0x1f'/>
  </qemu:commandline>",
            escape(&vhost_socket.display().to_string().replace(',', ",,"))
        );
    }
    let mut iface = String::new();
    if let Some((net, addr)) = &g.network {
        cmdline.push_str(&format!(" testbus.ip={addr}"));
        iface =
            format!("<interface type='network'><source network='{}'/><model type='virtio'/></interface>", escape(net));
    }
    format!(
        "<domain type='{domain_type}'{qemu_ns}>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  {memory_backing}
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <genid/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {iface}
    <serial type='{console_type}'><log file='{console}' append='off'/><target port='0'/></serial>
    {link_serial}
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  {qemu_args}
</domain>",
        name = escape(&g.name),
        mem = g.memory_mib,
        cpus = g.cpus,
        kernel = image("vmlinuz"),
        initrd = image("initrd.img"),
        cmdline = escape(&cmdline),
        disk = escape(&files.disk.display().to_string()),
        console = escape(&files.console.display().to_string()),
        console_type = if files.console_stream { "pty" } else { "null" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guests_address_is_read_back_from_its_command_line() {
        let xml = "<domain><os><cmdline>console=ttyS0 quiet testbus.name=p-1 testbus.ip=10.251.3.11/24</cmdline></os></domain>";
        assert_eq!(address_on_cmdline(xml).as_deref(), Some("10.251.3.11/24"));
        assert_eq!(address_on_cmdline("<domain><os><cmdline>console=ttyS0</cmdline></os></domain>"), None);
        assert_eq!(address_on_cmdline("<domain/>"), None);
    }

    #[test]
    fn a_pool_network_is_isolated_on_the_bridge_every_provider_names_it_by() {
        let br = testbus_proto::pool::bridge_name("lab");
        let own = network_xml("lab", &br, false);
        assert!(own.contains(&format!("<bridge name='{br}' stp='off'")) && !own.contains("<forward"), "{own}");
        assert!(!own.contains("<ip"), "no address on the host: {own}");
        // A podman pool made it first: used as it is, still with no address.
        let shared = network_xml("lab", &br, true);
        assert!(shared.contains("<forward mode='bridge'/>") && !shared.contains("<ip"), "{shared}");
        assert!(network_xml("a'b", &br, false).contains("<name>a&apos;b</name>"));
    }

    #[test]
    fn kvm_only_where_offered_on_a_machine_that_is_no_guest() {
        let caps = |cpu: &str, kvm: bool| {
            format!(
                "<capabilities><host><cpu><arch>x86_64</arch>{cpu}</cpu></host><guest><arch name='x86_64'>\
                 <domain type='qemu'/>{}</arch></guest></capabilities>",
                if kvm { "<domain type='kvm'/>" } else { "" }
            )
        };
        assert!(kvm_works(&caps("<feature name='vmx'/>", true)));
        assert!(!kvm_works(&caps("<feature name='vmx'/><feature name='hypervisor'/>", true)), "nested");
        assert!(!kvm_works(&caps("<feature name='vmx'/>", false)), "not offered");
    }

    #[test]
    fn the_domain_boots_the_image_with_its_link_and_console() {
        let g = GuestSpec {
            name: "vms-ab12c".into(),
            image: "/img".into(),
            state_dir: "/state/vms-ab12c".into(),
            memory_mib: 256,
            cpus: 1,
            agent_args: vec!["--capability".into(), "vm".into()],
            network: Some(("vmnet".into(), "10.251.0.11/24".into())),
            link: GuestLink::Serial,
            token: Some("tbjoin.t".into()),
        };
        let local = |g: &GuestSpec| GuestFiles {
            disk: g.state_dir.join("disk.qcow2"),
            console: console_log(&g.state_dir),
            console_stream: false,
        };
        let xml = domain_xml(&g, "qemu", &local(&g));
        assert!(xml.starts_with("<domain type='qemu'>"));
        assert!(xml.contains("<kernel>/img/vmlinuz</kernel>") && xml.contains("<initrd>/img/initrd.img</initrd>"));
        assert!(xml.contains(
            "<cmdline>console=ttyS0 quiet testbus.name=vms-ab12c testbus.args=--capability,vm testbus.ip=10.251.0.11/24</cmdline>"
        ));
        assert!(xml.contains("<source file='/state/vms-ab12c/disk.qcow2'/>"));
        assert!(xml.contains("<serial type='pty'><target port='1'/></serial>"));
        assert!(xml.contains("<serial type='null'><log file='/state/vms-ab12c/console.log' append='off'/>"));
        assert!(xml.contains("<source network='vmnet'/>"));
        // Escaped, not interpreted.
        let odd = GuestSpec { name: "a'b<c".into(), network: None, ..g.clone() };
        assert!(domain_xml(&odd, "qemu", &local(&odd)).contains("<name>a&apos;b&lt;c</name>"));

        // Over vsock: no second serial line; the device, its socket and
        // shared memory; the guest told where to link.
        let v = GuestSpec { link: GuestLink::Vsock { vhost_socket: "/state/a,b/vhost.sock".into() }, ..g.clone() };
        let xml = domain_xml(&v, "qemu", &local(&v));
        assert!(xml.starts_with("<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"));
        assert!(!xml.contains("<serial type='pty'>"));
        assert!(xml.contains("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"));
        assert!(xml.contains("<qemu:arg value='socket,id=testbus-vsock,path=/state/a,,b/vhost.sock'/>"));
        assert!(xml.contains("<qemu:arg value='vhost-user-vsock-pci,chardev=testbus-vsock,bus=pci.0,addr=0x1f'/>"));
        assert!(xml.contains(" testbus.link=vsock:2:7780 testbus.token=tbjoin.t"), "{xml}");

        // On a remote daemon: the files it was given, and a console that
        // is a pty too (read as a stream) besides its log.
        let files = GuestFiles {
            disk: "/img/vms-ab12c.qcow2".into(),
            console: "/img/vms-ab12c.console.log".into(),
            console_stream: true,
        };
        let xml = domain_xml(&g, "qemu", &files);
        assert!(xml.contains("<source file='/img/vms-ab12c.qcow2'/>"));
        assert!(
            xml.contains("<serial type='pty'><log file='/img/vms-ab12c.console.log' append='off'/><target port='0'/>")
        );
    }
}
