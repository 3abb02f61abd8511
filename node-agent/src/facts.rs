//! Host facts and the default published vars.
use std::collections::BTreeMap;
use testbus_proto::HostFacts;

pub fn facts(transport: &str) -> HostFacts {
    let uts = nix::sys::utsname::uname().ok();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string())))
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    HostFacts {
        os,
        kernel: uts.as_ref().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        memory_bytes,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        transport: transport.to_string(),
        hostname: hostname(),
    }
}

/// How the agent reaches the control plane: as told, else what a local
/// testbus-relay wrote next to its socket, else "direct".
pub fn transport(told: Option<&str>, server: &str) -> String {
    if let Some(t) = told {
        return t.to_string();
    }
    server
        .strip_prefix("unix:")
        .or_else(|| server.strip_prefix("unix+tls:"))
        .and_then(|path| std::fs::read_to_string(format!("{path}.transport")).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty() && t.len() <= 16 && t.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "direct".into())
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// `hostname`, `fqdn`, `ipv4addr`, `ipv6addr`, `addresses`: the first
/// non-loopback addresses of this network namespace (loopback when there is
/// nothing else, so a single-machine setup still works).
pub fn default_vars() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let host = hostname();
    v.insert("hostname".into(), host.split('.').next().unwrap_or(&host).to_string());
    v.insert("fqdn".into(), host);
    let ifs = if_addrs::get_if_addrs().unwrap_or_default();
    let usable: Vec<std::net::IpAddr> = ifs
        .iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| match ip {
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            _ => true,
        })
        .collect();
    let v4 = usable.iter().find(|ip| ip.is_ipv4()).map(|ip| ip.to_string()).unwrap_or_else(|| "127.0.0.1".into());
    let v6 = usable.iter().find(|ip| ip.is_ipv6()).map(|ip| ip.to_string()).unwrap_or_else(|| "::1".into());
    let all: Vec<String> = usable.iter().map(|ip| ip.to_string()).collect();
    v.insert("ipv4addr".into(), v4.clone());
    v.insert("ipv6addr".into(), v6);
    v.insert("addresses".into(), if all.is_empty() { v4 } else { all.join(" ") });
    v
}
