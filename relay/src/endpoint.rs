//! Endpoints of a relay: where clients come from (downstream) and where
//! their bytes go (upstream).
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
    /// This process's stdin/stdout: one connection.
    Stdio,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid endpoint {input:?}: {reason} (expected tcp:HOST:PORT, unix:/PATH or stdio)")]
pub struct EndpointError {
    pub input: String,
    pub reason: &'static str,
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        let err = |reason| EndpointError { input: s.to_string(), reason };
        if s == "stdio" {
            return Ok(Endpoint::Stdio);
        }
        match s.split_once(':') {
            Some(("tcp", rest)) => match rest.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Endpoint::Tcp(rest.into())),
                _ => Err(err("tcp needs HOST:PORT")),
            },
            Some(("unix", path)) if !path.is_empty() => Ok(Endpoint::Unix(path.into())),
            Some(("unix", _)) => Err(err("unix needs a path")),
            Some(("serial" | "vsock" | "ssh", _)) => Err(err("this link type is not available in this version")),
            _ => Err(err("unknown link type")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Stdio => f.write_str("stdio"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_specs() {
        assert_eq!("tcp:127.0.0.1:7780".parse(), Ok(Endpoint::Tcp("127.0.0.1:7780".into())));
        assert_eq!("tcp:[::1]:7780".parse(), Ok(Endpoint::Tcp("[::1]:7780".into())));
        assert_eq!("unix:/run/x.sock".parse(), Ok(Endpoint::Unix("/run/x.sock".into())));
        assert_eq!("stdio".parse(), Ok(Endpoint::Stdio));
        for bad in ["tcp:nohost", "tcp::1", "unix:", "carrier-pigeon:x", "serial:/dev/ttyS1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
