//! Endpoints of a relay: where clients come from (downstream) and where
//! their bytes go (upstream).
//!
//! Two families: *plain* endpoints carry one client connection per
//! connection (`tcp:`, `unix:` — clients on the downstream side, the
//! control plane upstream), and *links* carry every client connection
//! multiplexed over one byte stream toward another relay (`serial:`,
//! `vsock:`, `ssh:`, `stdio`, and `mux+tcp:` / `mux+unix:` for a link over a
//! socket).
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// HOST:PORT; `mux`: a link to another relay.
    Tcp {
        addr: String,
        mux: bool,
    },
    Unix {
        path: PathBuf,
        mux: bool,
    },
    /// This process's stdin/stdout as a link (the far end of `ssh:`).
    Stdio,
    Serial {
        path: PathBuf,
        baud: u32,
    },
    /// `serial:stdio`: the serial link's framing on this process's
    /// stdin/stdout, for a line another process carries (the control plane
    /// pumps a remote guest's serial line to it through libvirt). Like
    /// `stdio`, it cannot be reopened: the relay ends with it.
    SerialStdio,
    Vsock {
        cid: u32,
        port: u32,
    },
    /// OpenSSH to `target` (`[user@]host`), which runs `relay` with the
    /// mirror-image link on stdio and `remote` as its other endpoint.
    /// `config`: an ssh_config file (`ssh -F`) instead of ~/.ssh/config.
    Ssh {
        target: String,
        port: Option<u16>,
        relay: String,
        remote: Option<String>,
        config: Option<PathBuf>,
    },
}

impl Endpoint {
    /// Whether this endpoint is a multiplexed link to another relay.
    pub fn is_link(&self) -> bool {
        match self {
            Endpoint::Tcp { mux, .. } | Endpoint::Unix { mux, .. } => *mux,
            _ => true,
        }
    }

    /// How an agent behind this link reaches the control plane (a Host
    /// fact): the link's kind.
    pub fn transport(&self) -> &'static str {
        match self {
            Endpoint::Tcp { .. } => "tcp",
            Endpoint::Unix { .. } => "unix",
            Endpoint::Stdio => "stdio",
            Endpoint::Serial { .. } | Endpoint::SerialStdio => "serial",
            Endpoint::Vsock { .. } => "vsock",
            Endpoint::Ssh { .. } => "ssh",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid endpoint {input:?}: {reason} (expected tcp:HOST:PORT, unix:/PATH, mux+tcp:HOST:PORT, mux+unix:/PATH, \
     serial:/DEV[?baud=N], serial:stdio, vsock:CID|any:PORT, ssh:[USER@]HOST[:PORT][?relay=PATH&remote=ENDPOINT&config=FILE] \
     or stdio)"
)]
pub struct EndpointError {
    pub input: String,
    pub reason: String,
}

/// `path?k=v&k2=v2` → path and options.
fn options(s: &str) -> (&str, Vec<(&str, &str)>) {
    match s.split_once('?') {
        Some((p, q)) => {
            (p, q.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, ""))).collect())
        }
        None => (s, Vec::new()),
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        let err = |reason: &str| EndpointError { input: s.to_string(), reason: reason.to_string() };
        match s {
            "stdio" => return Ok(Endpoint::Stdio),
            "serial:stdio" => return Ok(Endpoint::SerialStdio),
            _ => {}
        }
        let (scheme, rest) = s.split_once(':').ok_or_else(|| err("no link type"))?;
        let (scheme, mux) = match scheme.strip_prefix("mux+") {
            Some(inner @ ("tcp" | "unix")) => (inner, true),
            Some(_) => return Err(err("mux+ applies to tcp and unix only")),
            None => (scheme, false),
        };
        match scheme {
            "tcp" => match rest.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Endpoint::Tcp { addr: rest.into(), mux })
                }
                _ => Err(err("tcp needs HOST:PORT")),
            },
            "unix" if !rest.is_empty() => Ok(Endpoint::Unix { path: rest.into(), mux }),
            "unix" => Err(err("unix needs a path")),
            "serial" => {
                let (path, opts) = options(rest);
                if path.is_empty() {
                    return Err(err("serial needs a device path"));
                }
                let mut baud = 115_200;
                for (k, v) in opts {
                    match k {
                        "baud" => {
                            baud = v.parse().ok().filter(|&b| b > 0).ok_or_else(|| err("baud: a positive number"))?
                        }
                        other => return Err(err(&format!("unknown serial option {other:?}"))),
                    }
                }
                Ok(Endpoint::Serial { path: path.into(), baud })
            }
            "vsock" => match rest.split_once(':') {
                Some((cid, port)) => match (if cid == "any" { Ok(u32::MAX) } else { cid.parse() }, port.parse()) {
                    (Ok(cid), Ok(port)) => Ok(Endpoint::Vsock { cid, port }),
                    _ => Err(err("vsock needs CID:PORT, both numbers")),
                },
                None => Err(err("vsock needs CID:PORT")),
            },
            "ssh" => {
                let (target, opts) = options(rest);
                let (target, port) = match target.rsplit_once(':') {
                    Some((t, p)) => (t, Some(p.parse::<u16>().map_err(|_| err("ssh port: a number"))?)),
                    None => (target, None),
                };
                if target.is_empty() || target.starts_with('-') || target.ends_with('@') {
                    return Err(err("ssh needs [USER@]HOST"));
                }
                let (mut relay, mut remote, mut config) = ("testbus-relay".to_string(), None, None);
                for (k, v) in opts {
                    match k {
                        "relay" if !v.is_empty() => relay = v.to_string(),
                        "remote" if !v.is_empty() => {
                            v.parse::<Endpoint>().map_err(|e| err(&format!("remote: {}", e.reason)))?;
                            remote = Some(v.to_string())
                        }
                        "config" if !v.is_empty() => config = Some(PathBuf::from(v)),
                        other => return Err(err(&format!("unknown or empty ssh option {other:?}"))),
                    }
                }
                Ok(Endpoint::Ssh { target: target.into(), port, relay, remote, config })
            }
            _ => Err(err("unknown link type")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = |mux: &bool| if *mux { "mux+" } else { "" };
        match self {
            Endpoint::Tcp { addr, mux } => write!(f, "{}tcp:{addr}", m(mux)),
            Endpoint::Unix { path, mux } => write!(f, "{}unix:{}", m(mux), path.display()),
            Endpoint::Stdio => f.write_str("stdio"),
            Endpoint::Serial { path, baud } => write!(f, "serial:{}?baud={baud}", path.display()),
            Endpoint::SerialStdio => f.write_str("serial:stdio"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Ssh { target, port, .. } => match port {
                Some(p) => write!(f, "ssh:{target}:{p}"),
                None => write!(f, "ssh:{target}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_specs() {
        let tcp = |a: &str, mux| Endpoint::Tcp { addr: a.into(), mux };
        assert_eq!("tcp:127.0.0.1:7780".parse(), Ok(tcp("127.0.0.1:7780", false)));
        assert_eq!("tcp:[::1]:7780".parse(), Ok(tcp("[::1]:7780", false)));
        assert_eq!("mux+tcp:10.0.0.1:9000".parse(), Ok(tcp("10.0.0.1:9000", true)));
        assert_eq!("unix:/run/x.sock".parse(), Ok(Endpoint::Unix { path: "/run/x.sock".into(), mux: false }));
        assert_eq!("stdio".parse(), Ok(Endpoint::Stdio));
        assert_eq!(
            "serial:/dev/ttyS1?baud=9600".parse(),
            Ok(Endpoint::Serial { path: "/dev/ttyS1".into(), baud: 9600 })
        );
        assert_eq!("serial:/dev/pts/3".parse(), Ok(Endpoint::Serial { path: "/dev/pts/3".into(), baud: 115_200 }));
        assert_eq!("serial:stdio".parse(), Ok(Endpoint::SerialStdio));
        assert_eq!(Endpoint::SerialStdio.transport(), "serial");
        assert_eq!("vsock:2:7780".parse(), Ok(Endpoint::Vsock { cid: 2, port: 7780 }));
        assert_eq!("vsock:any:7780".parse(), Ok(Endpoint::Vsock { cid: u32::MAX, port: 7780 }));
        assert_eq!(
            "ssh:tester@guest:2222?relay=/opt/testbus-relay&remote=unix:/run/tb.sock".parse(),
            Ok(Endpoint::Ssh {
                target: "tester@guest".into(),
                port: Some(2222),
                relay: "/opt/testbus-relay".into(),
                remote: Some("unix:/run/tb.sock".into()),
                config: None,
            })
        );
        for bad in [
            "tcp:nohost",
            "tcp::1",
            "unix:",
            "carrier-pigeon:x",
            "serial:",
            "serial:/dev/ttyS1?baud=fast",
            "serial:/dev/ttyS1?parity=odd",
            "vsock:x:1",
            "vsock:3",
            "ssh:",
            "ssh:-oProxyCommand=x",
            "ssh:host:port",
            "ssh:host?remote=bogus",
            "mux+serial:/dev/ttyS1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert!("serial:/dev/x".parse::<Endpoint>().unwrap().is_link());
        assert!(!"tcp:a:1".parse::<Endpoint>().unwrap().is_link());
    }
}
