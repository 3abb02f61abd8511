//! How pool guests are marked on their Hosts. A guest's agent registers
//! its Host with the pool's label; the pool controller marks it clean once
//! it has been brought back to its clean state, and a claim takes the mark
//! away in the same write. A pool host without the mark is never free:
//! no test sees what an earlier one left behind.
use crate::{Host, Resource};

/// Label every pool guest's Host carries: the pool's name.
pub const POOL_LABEL: &str = "testbus.io/pool";

/// Annotation of a pool guest's Host that is clean (never used since its
/// last clean state): "true".
pub const CLEAN_ANNOTATION: &str = "testbus.io/clean";

/// Annotation of a guest's Host: a snapshot request (JSON
/// [`SnapshotOrder`]), written by the API's `HostPools.Snapshot` and
/// carried out by the pool controller, in turn with the guest's other work.
pub const SNAPSHOT_REQUEST: &str = "testbus.io/snapshot-request";
/// Annotation of a guest's Host: what the last request came to (JSON
/// [`SnapshotOutcome`]), written by the pool controller.
pub const SNAPSHOT_RESULT: &str = "testbus.io/snapshot-result";

/// What a snapshot request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotAction {
    Create,
    Revert,
    Delete,
    List,
}

impl SnapshotAction {
    pub const ALL: [SnapshotAction; 4] =
        [SnapshotAction::Create, SnapshotAction::Revert, SnapshotAction::Delete, SnapshotAction::List];

    /// As the wire and the command line say it.
    pub const fn as_str(self) -> &'static str {
        match self {
            SnapshotAction::Create => "create",
            SnapshotAction::Revert => "revert",
            SnapshotAction::Delete => "delete",
            SnapshotAction::List => "list",
        }
    }
}

impl std::str::FromStr for SnapshotAction {
    type Err = crate::states::Unknown;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SnapshotAction::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| crate::states::Unknown {
            what: "snapshot action",
            value: s.to_string(),
            known: SnapshotAction::ALL.iter().map(|a| a.as_str()).collect(),
        })
    }
}

/// A snapshot request, as desired state on the guest's Host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotOrder {
    pub id: String,
    pub action: SnapshotAction,
    /// The snapshot's name; empty for list.
    #[serde(default)]
    pub name: String,
}

/// What a snapshot request came to.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SnapshotOutcome {
    /// The request's id.
    pub id: String,
    /// Empty when it was carried out.
    #[serde(default)]
    pub error: String,
    /// The guest's snapshots after it.
    #[serde(default)]
    pub snapshots: Vec<String>,
}

/// The request on `h` not carried out yet, if any (one that cannot be read
/// is none: the API writes only readable ones).
pub fn pending_snapshot(h: &Host) -> Option<SnapshotOrder> {
    let order: SnapshotOrder = serde_json::from_str(h.meta().annotations.get(SNAPSHOT_REQUEST)?).ok()?;
    let done = snapshot_outcome(h).is_some_and(|o| o.id == order.id);
    (!done).then_some(order)
}

/// What the last request on `h` came to.
pub fn snapshot_outcome(h: &Host) -> Option<SnapshotOutcome> {
    serde_json::from_str(h.meta().annotations.get(SNAPSHOT_RESULT)?).ok()
}

/// Whether a libvirt URI names a daemon on another machine: it has a host
/// (`qemu+ssh://user@host/system`, `qemu+tls://host/system`), where a local
/// one has none (`qemu:///system`, `qemu+unix:///system`).
pub fn is_remote_uri(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(_, rest)| !rest.starts_with('/') && !rest.is_empty())
}

/// The libvirt transports a pool's `uri` may name: none (a local daemon),
/// unix, ssh, libssh, libssh2, tls, tcp. Never `ext`, which runs a program
/// of the URI's choosing as the control plane's user.
const TRANSPORTS: &[&str] = &["", "unix", "ssh", "libssh", "libssh2", "tls", "tcp"];
/// The URI parameters testbus supports: how to reach and authenticate to
/// the daemon. Never `command` (the program libvirt runs instead of ssh).
const URI_PARAMS: &[&str] = &[
    "socket",
    "keyfile",
    "known_hosts",
    "known_hosts_verify",
    "sshauth",
    "no_tty",
    "no_verify",
    "pkipath",
    "mode",
    "proxy",
    "netcat",
    "name",
];

/// What is wrong with a pool's libvirt URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("{uri:?} is not a libvirt URI: {URI_FORM}")]
    NotUri { uri: String },
    #[error("driver {driver:?}: pools run QEMU guests (qemu://...); {URI_FORM}")]
    Driver { driver: String },
    #[error("transport ext runs a program of the URI's choosing: not supported (ssh, tls, tcp or unix)")]
    ExtTransport,
    #[error("transport {transport:?} is not one of ssh, libssh, libssh2, tls, tcp, unix")]
    Transport { transport: String },
    #[error("path {path:?}: /system or /session; {URI_FORM}")]
    Path { path: String },
    #[error("a fragment (#...) is not part of a libvirt URI")]
    Fragment,
    #[error(
        "parameter command runs a program of the URI's choosing instead of ssh: not supported (put ssh options in \
         the control plane's user's ~/.ssh/config)"
    )]
    CommandParameter,
    #[error("parameter {key:?} is not supported (supported: {})", URI_PARAMS.join(", "))]
    Parameter { key: String },
}

const URI_FORM: &str = "expected qemu[+TRANSPORT]://[USER@HOST[:PORT]]/system[?PARAM=VALUE&...]";

/// Checks a podman or kubernetes pool's image: an image reference
/// (`localhost/testbus-guest`, `registry/name:tag`, `name@sha256:...`),
/// never a flag.
pub fn check_image_name(image: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/:@-".contains(&b);
    if image.is_empty() {
        Err("required: an image with testbus-agent, e.g. localhost/testbus-guest (hack/guest-image's rootfs.tar, imported)"
            .into())
    } else if image.len() > 255 || !image.bytes().all(ok) || !image.as_bytes()[0].is_ascii_alphanumeric() {
        Err(format!("{image:?} is not an image name: at most 255 of [a-z0-9._/:@-], starting with a letter or digit"))
    } else {
        Ok(())
    }
}

/// The bridge of pool network `network` on the machine its guests run on,
/// whatever their provider: a libvirt pool's network and a podman pool's
/// containers on the same network name share it (one L2 segment, no
/// address on the host). At most 15 bytes (an interface name).
pub fn bridge_name(network: &str) -> String {
    interface_name("tbn", network)
}

/// A network interface's name for `of`: `prefix` and 8 hex digits of a
/// hash (FNV-1a) of it, short enough for an interface (15 bytes) with a
/// prefix of up to 7.
pub fn interface_name(prefix: &str, of: &str) -> String {
    let h = of.bytes().fold(0xcbf2_9ce4_8422_2325u64, |a, b| (a ^ u64::from(b)).wrapping_mul(0x1000_0000_01b3));
    format!("{prefix}{:08x}", h as u32)
}

/// The name of the agent's container in a kubernetes pool's pods.
pub const AGENT_CONTAINER: &str = "testbus-agent";

/// Largest pod template, in bytes.
pub const MAX_POD_TEMPLATE: usize = 64 * 1024;

/// Checks a kubernetes pool's pod template (a PodTemplateSpec, YAML or
/// JSON): a mapping that leaves the pod's name, its restart policy, the
/// agent's container and the volumes testbus adds to testbus. What is
/// wrong, said.
pub fn check_pod_template(text: &str) -> Result<(), String> {
    use serde_json::Value;
    if text.len() > MAX_POD_TEMPLATE {
        return Err(format!("at most {MAX_POD_TEMPLATE} bytes"));
    }
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not a pod template: {e}"))?;
    let Value::Object(top) = &v else { return Err("not a pod template: a mapping (metadata, spec)".into()) };
    if let Some(k) = top.keys().find(|k| !matches!(k.as_str(), "metadata" | "spec")) {
        return Err(format!("{k}: a pod template has only metadata and spec"));
    }
    let meta = top.get("metadata").and_then(Value::as_object);
    if let Some(k) = meta
        .and_then(|m| ["name", "generateName", "namespace", "ownerReferences"].into_iter().find(|k| m.contains_key(*k)))
    {
        return Err(format!("metadata.{k}: set by testbus for each pod"));
    }
    let Some(spec) = top.get("spec") else { return Ok(()) };
    let Value::Object(spec) = spec else { return Err("spec: a mapping (a PodSpec)".into()) };
    if spec.get("restartPolicy").is_some_and(|p| p != "Never") {
        return Err(
            "spec.restartPolicy: testbus's pods never restart (an agent that ended is a lost host); leave it out"
                .into(),
        );
    }
    for list in ["containers", "initContainers"] {
        for (i, c) in spec.get(list).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            if name == AGENT_CONTAINER {
                return Err(format!("spec.{list}[{i}].name: {AGENT_CONTAINER} is testbus's own container (its command, image and mounts are the pool's)"));
            }
            for (j, m) in c.get("volumeMounts").and_then(Value::as_array).into_iter().flatten().enumerate() {
                if m.get("name").and_then(Value::as_str).is_some_and(|n| n.starts_with("testbus-")) {
                    return Err(format!("spec.{list}[{i}].volumeMounts[{j}].name: testbus-* volumes are testbus's"));
                }
            }
        }
    }
    for (i, vol) in spec.get("volumes").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if vol.get("name").and_then(Value::as_str).is_some_and(|n| n.starts_with("testbus-")) {
            return Err(format!("spec.volumes[{i}].name: testbus-* volumes are testbus's"));
        }
    }
    Ok(())
}

/// Checks where a kubernetes pool's agents reach the control plane:
/// HOST:PORT.
pub fn check_address(address: &str) -> Result<(), String> {
    let bad =
        || format!("{address:?} is not HOST:PORT (where the pods' agents reach the control plane's TLS listener)");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    // An IPv6 address is bracketed ([fd00::1]:7780), as in a URL.
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b))
        }
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// Checks a pool's libvirt URI: `qemu[+TRANSPORT]://[USER@][HOST[:PORT]]/system`
/// (or `/session`), with only the parameters above. What is wrong, said.
pub fn check_uri(uri: &str) -> Result<(), UriError> {
    let not_uri = || UriError::NotUri { uri: uri.into() };
    if uri.len() > 1024 || uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(not_uri());
    }
    let (scheme, rest) = uri.split_once("://").ok_or_else(not_uri)?;
    let (driver, transport) = scheme.split_once('+').unwrap_or((scheme, ""));
    if driver != "qemu" {
        return Err(UriError::Driver { driver: driver.into() });
    }
    if transport == "ext" {
        return Err(UriError::ExtTransport);
    }
    if !TRANSPORTS.contains(&transport) {
        return Err(UriError::Transport { transport: transport.into() });
    }
    let (authority_path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = authority_path.find('/').map(|i| &authority_path[i..]).unwrap_or("");
    if !matches!(path, "/system" | "/session") {
        return Err(UriError::Path { path: path.into() });
    }
    if authority_path.contains('#') || query.contains('#') {
        return Err(UriError::Fragment);
    }
    for param in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let key = param.split_once('=').map_or(param, |(k, _)| k);
        if key == "command" {
            return Err(UriError::CommandParameter);
        }
        if !URI_PARAMS.contains(&key) {
            return Err(UriError::Parameter { key: key.into() });
        }
    }
    Ok(())
}

/// Bytes a guest's agent flags may take on its kernel command line (the
/// kernel takes 2,048 in all; the rest is the console, name, address and
/// link).
pub const MAX_KERNEL_ARGS: usize = 1536;

/// The flags a pool's guest agent gets from the pool's spec: its pool's
/// label, its capabilities, labels and vars (and a longer lease where
/// guests are emulated).
pub fn agent_args(pool: &crate::HostPool, emulated: bool) -> Vec<String> {
    use crate::Resource;
    let sp = pool.spec();
    let mut args = vec!["--label".to_string(), format!("{POOL_LABEL}={}", pool.name())];
    if emulated {
        args.extend(["--lease-duration".into(), EMULATED_LEASE.into()]);
    }
    for c in &sp.capabilities {
        args.extend(["--capability".into(), c.clone()]);
    }
    for (k, v) in &sp.labels {
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    for (k, v) in &sp.vars {
        args.extend(["--var".into(), format!("{k}={v}")]);
    }
    args
}

/// Agents of emulated guests hold leases this long (10 s under KVM, the
/// agent's default): eight TCG guests on two cores starve one of them
/// past 10 s now and then, and it would be lost though it works.
pub const EMULATED_LEASE: &str = "30s";

/// Agent flags as one word of a kernel command line: each flag
/// percent-encoded (every byte but `[A-Za-z0-9._/:=@+-]`), joined by
/// commas. The guest's init splits at the commas and decodes each flag,
/// so a value with spaces, commas or `init=` stays one value of one flag.
pub fn kernel_args(args: &[String]) -> String {
    let enc = |a: &String| {
        a.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'/' | b':' | b'=' | b'@' | b'+' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    args.iter().map(enc).collect::<Vec<_>>().join(",")
}

/// Whether `name` is how the pool controller names a guest of `pool`: the
/// pool's name, a dash and five hex digits (pool `a`'s guests are not
/// pool `a-b`'s).
pub fn is_guest_of(pool: &str, name: &str) -> bool {
    name.strip_prefix(pool)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|id| id.len() == 5 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pool a Host is a guest of, if any.
pub fn pool_of(h: &Host) -> Option<&str> {
    h.meta().labels.get(POOL_LABEL).map(String::as_str)
}

/// Whether a Host may be claimed as far as pools go: any host outside a
/// pool, a pool guest only when marked clean.
pub fn clean_enough(h: &Host) -> bool {
    pool_of(h).is_none() || h.meta().annotations.get(CLEAN_ANNOTATION).is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_template_may_place_and_resource_the_pod_but_not_take_the_agent() {
        let good = "metadata: {labels: {team: qa}, annotations: {a: b}}\nspec:\n  nodeSelector: {disk: ssd}\n  \
                    tolerations: [{key: lab, operator: Exists}]\n  restartPolicy: Never\n  \
                    containers: [{name: sidecar, image: busybox, volumeMounts: [{name: scratch, mountPath: /s}]}]\n  \
                    volumes: [{name: scratch, emptyDir: {}}]\n";
        assert_eq!(check_pod_template(good), Ok(()));
        assert_eq!(check_pod_template("{}"), Ok(()));
        let refused = |t: &str| check_pod_template(t).unwrap_err();
        assert!(refused("spec: {initContainers: [{name: testbus-agent}]}").starts_with("spec.initContainers[0].name"));
        assert!(refused("spec: {containers: [{name: s, volumeMounts: [{name: testbus-link}]}]}")
            .starts_with("spec.containers[0].volumeMounts[0].name"));
        assert!(refused("metadata: {ownerReferences: []}").starts_with("metadata.ownerReferences"));
        assert!(refused("kind: Pod").starts_with("kind: a pod template has only"));
        assert!(refused("spec: [1]").starts_with("spec: a mapping"));
        assert!(refused(&"x".repeat(MAX_POD_TEMPLATE + 1)).starts_with("at most"));
    }

    #[test]
    fn an_address_is_host_and_port() {
        for ok in ["cp:7780", "10.0.0.1:7780", "[fd00::1]:7780", "cp.lab.example:443"] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in ["cp", "cp:", ":7780", "cp:0", "cp:70000", "c p:1", "https://cp:7780", "fd00::1:7780", "[cp]:7780"] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_actions_round_trip_and_unknown_ones_are_named() {
        for a in SnapshotAction::ALL {
            assert_eq!(a.as_str().parse::<SnapshotAction>(), Ok(a));
        }
        let e = "undo".parse::<SnapshotAction>().unwrap_err();
        assert_eq!(e.to_string(), "\"undo\" is not a snapshot action (one of create, revert, delete, list)");
    }

    #[test]
    fn pool_uris_name_only_what_testbus_supports() {
        for ok in [
            "qemu:///system",
            "qemu+unix:///system?socket=/run/x.sock",
            "qemu+ssh://root@lab2/system",
            "qemu+ssh://root@lab2:2222/system?keyfile=/k&no_tty=1",
            "qemu+tls://lab2/system?pkipath=/etc/pki",
            "qemu+tcp://127.0.0.1:16509/system",
            "qemu:///session",
        ] {
            assert_eq!(check_uri(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("qemu+ext:///system?command=/tmp/x", "transport ext"),
            ("qemu+ssh://h/system?command=/tmp/x", "parameter command"),
            ("qemu+ssh://h/system?keyfile=/k&command=/tmp/x", "parameter command"),
            ("qemu+ssh://h/system?comm%61nd=/tmp/x", "not supported"),
            ("qemu+ssh://h/system;command=/tmp/x", "path"),
            ("qemu+ssh://h/system?name=1;command=/tmp/x", "parameter command"),
            ("qemu:///embed?root=/tmp", "path"),
            ("lxc:///system", "driver"),
            ("qemu+tcp+ext:///system", "transport"),
            ("qemu system", "not a libvirt URI"),
            ("qemu:///system#x", "path"),
            ("qemu:///system?name=a#x", "fragment"),
        ] {
            let e = check_uri(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn agent_flags_are_one_word_each_value_one_flag() {
        let args: Vec<String> =
            ["--var", "a=a b,--take-over testbus.name=victim init=/bin/sh", "--x", "100%\\"].map(String::from).to_vec();
        let word = kernel_args(&args);
        assert!(!word.contains(' ') && word.split(',').count() == 4, "{word}");
        assert_eq!(word, "--var,a=a%20b%2C--take-over%20testbus.name=victim%20init=/bin/sh,--x,100%25%5C");
        // What the guest's init does: split at commas, decode.
        let decoded: Vec<String> = word
            .split(',')
            .map(|a| {
                let mut out = Vec::new();
                let b = a.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' {
                        out.push(u8::from_str_radix(&a[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        out.push(b[i]);
                        i += 1;
                    }
                }
                String::from_utf8(out).unwrap()
            })
            .collect();
        assert_eq!(decoded, args);
    }

    #[test]
    fn guest_names_are_matched_exactly() {
        assert!(is_guest_of("vms", "vms-0a1b2"));
        for not in ["vms-x-0a1b2", "vms-0a1b", "vms-0a1b23", "vms0a1b2", "vms-0a1bz", "vmsx-0a1b2", "vms-"] {
            assert!(!is_guest_of("vms", not), "{not}");
        }
    }

    #[test]
    fn a_uri_with_a_host_is_remote() {
        for remote in ["qemu+ssh://root@10.77.0.9/system", "qemu+tls://lab2/system", "qemu+ssh://h/system?keyfile=/k"] {
            assert!(is_remote_uri(remote), "{remote}");
        }
        for local in ["qemu:///system", "qemu+unix:///system", "test:///default", "qemu:///session", "qemu", "qemu://"]
        {
            assert!(!is_remote_uri(local), "{local}");
        }
    }
}
