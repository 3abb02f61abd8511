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
#![forbid(unsafe_code)]

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

/// Whether hardware virtualisation can be trusted here: libvirt offers
/// kvm and this machine is not itself a guest (nested KVM hangs guests on
/// some hypervisors; TCG always works, slower).
fn kvm_works(capabilities: &str) -> bool {
    let offered = capabilities.contains("<domain type='kvm'");
    let nested = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" hypervisor"));
    offered && !nested
}

impl Libvirt {
    pub fn open(uri: &str) -> Result<Libvirt> {
        let conn = Connect::open(Some(uri)).map_err(err(uri))?;
        let caps = conn.capabilities().map_err(err(uri))?;
        let domain_type = if kvm_works(&caps) { "kvm" } else { "qemu" };
        Ok(Libvirt { conn, uri: uri.to_string(), domain_type })
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
    /// the addresses their command lines give them.
    pub fn ensure_network(&self, name: &str) -> Result<()> {
        let net = match self.conn.lookup_network_by_name(name) {
            Ok(n) => n,
            Err(e) if is_missing(&e) => {
                let xml = format!("<network><name>{}</name><bridge stp='off' delay='0'/></network>", escape(name));
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
    /// the domain and starts it.
    pub fn create_guest(&self, g: &GuestSpec) -> Result<()> {
        for part in ["vmlinuz", "initrd.img", "golden.qcow2"] {
            if !g.image.join(part).is_file() {
                return Err(ProviderError::Image(format!(
                    "image {}: no {part} (build it with hack/guest-image)",
                    g.image.display()
                )));
            }
        }
        std::fs::create_dir_all(&g.state_dir)
            .map_err(|e| ProviderError::Image(format!("{}: {e}", g.state_dir.display())))?;
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
        let dom = self.conn.define_domain_xml(&domain_xml(g, self.domain_type)).map_err(err(&self.uri))?;
        if let Err(e) = dom.create() {
            let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA);
            return Err(err(&self.uri)(e));
        }
        Ok(())
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
    /// console log. A guest that is already gone is fine.
    pub fn destroy_guest(&self, name: &str, state_dir: &Path) -> Result<()> {
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

/// Where a guest's console (its first serial line) is logged, through
/// virtlogd: a guest that floods its console fills no disk (virtlogd keeps
/// 2 MiB and three older files, as its max_size and max_backups say).
pub fn console_log(state_dir: &Path) -> PathBuf {
    state_dir.join("console.log")
}

/// Characters that may appear in XML text and attributes unescaped here:
/// names, paths and flags are checked by the pool's validation, and
/// anything else is escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn domain_xml(g: &GuestSpec, domain_type: &str) -> String {
    let image = |part: &str| escape(&g.image.join(part).display().to_string());
    let mut cmdline = format!("console=ttyS0 quiet testbus.name={}", g.name);
    if !g.agent_args.is_empty() {
        // One word on the kernel command line: flags joined by commas.
        cmdline.push_str(&format!(" testbus.args={}", g.agent_args.join(",")));
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
    <serial type='null'><log file='{console}' append='off'/><target port='0'/></serial>
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
        disk = escape(&g.state_dir.join("disk.qcow2").display().to_string()),
        console = escape(&console_log(&g.state_dir).display().to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let xml = domain_xml(&g, "qemu");
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
        assert!(domain_xml(&odd, "qemu").contains("<name>a&apos;b&lt;c</name>"));

        // Over vsock: no second serial line; the device, its socket and
        // shared memory; the guest told where to link.
        let v = GuestSpec { link: GuestLink::Vsock { vhost_socket: "/state/a,b/vhost.sock".into() }, ..g };
        let xml = domain_xml(&v, "qemu");
        assert!(xml.starts_with("<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"));
        assert!(!xml.contains("<serial type='pty'>"));
        assert!(xml.contains("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"));
        assert!(xml.contains("<qemu:arg value='socket,id=testbus-vsock,path=/state/a,,b/vhost.sock'/>"));
        assert!(xml.contains("<qemu:arg value='vhost-user-vsock-pci,chardev=testbus-vsock,bus=pci.0,addr=0x1f'/>"));
        assert!(xml.contains(" testbus.link=vsock:2:7780 testbus.token=tbjoin.t"), "{xml}");
    }
}
