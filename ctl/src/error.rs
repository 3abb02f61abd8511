//! Exit codes of the command-line contract:
//! 0 succeeded; 1 the test or command failed (`run`/`exec`: the remote exit
//! code); 2 invalid input or usage; 3 cancelled, error or timed out; 4 the
//! server could not be reached or does not speak testbus; 5 permission
//! denied (no credentials, or not these).
use tonic::{Code, Status};

pub const FAILED: i32 = 1;
pub const USAGE: i32 = 2;
pub const INCOMPLETE: i32 = 3;
pub const UNREACHABLE: i32 = 4;
pub const PERMISSION: i32 = 5;

/// How an answer from something that is not a testbus server starts; the
/// address is put in front of it where it is known.
pub const NOT_TESTBUS: &str = "does not speak testbus (gRPC over HTTP/2)";

#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn usage(m: impl Into<String>) -> Self {
        CliError { code: USAGE, message: m.into() }
    }
    pub fn failed(m: impl Into<String>) -> Self {
        CliError { code: FAILED, message: m.into() }
    }
    pub fn incomplete(m: impl Into<String>) -> Self {
        CliError { code: INCOMPLETE, message: m.into() }
    }
}

/// The status's message and those of its sources, lower-cased.
fn chain(s: &Status) -> Vec<String> {
    let mut texts = vec![s.message().to_ascii_lowercase()];
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        texts.push(format!("{e} {e:?}").to_ascii_lowercase());
        source = e.source();
    }
    texts
}

/// Whether the peer answered, but not as a gRPC server over HTTP/2 would
/// (an HTTP/1 server, an ssh daemon, a plain HTTP/2 site).
fn not_grpc(s: &Status) -> bool {
    const SIGNS: [&str; 5] =
        ["frame with invalid size", "frame_size_error", "protocol_error", "content-type", "invalid http"];
    chain(s).iter().any(|t| SIGNS.iter().any(|sign| t.contains(sign)))
}

/// Whether a status came from the connection rather than the server: tonic
/// reports a connection that broke mid-call (or an HTTP/2 peer that is no
/// testbus server) as Unknown, Internal or Cancelled, not Unavailable. (A
/// Cancelled the server sends has no source.)
fn broken_connection(s: &Status) -> bool {
    match s.code() {
        Code::Unknown | Code::Internal => {}
        Code::Cancelled if std::error::Error::source(s).is_some() => return true,
        _ => return false,
    }
    let texts = chain(s);
    const SIGNS: [&str; 6] =
        ["transport error", "h2 protocol error", "connection", "broken pipe", "error reading a body", "stream closed"];
    texts.iter().any(|t| SIGNS.iter().any(|sign| t.contains(sign)))
}

/// A TLS handshake that failed for a certificate, as a sentence saying
/// whose certificate and what to do (rustls's own words were
/// `Other(OtherError(CaUsedAsEndEntity))` and the like, or "transport
/// error").
fn tls_refusal(s: &Status) -> Option<String> {
    tls_refusal_in(&chain(s).join(" "), &testbus_client::cause(s))
}

/// [`tls_refusal`] of an error's text (lower-cased, sources included);
/// `cause` is its innermost part as said to users.
fn tls_refusal_in(texts: &str, cause: &str) -> Option<String> {
    let has = |sign: &str| texts.contains(sign);
    let remake = "make a new one with `testbus-control-plane user create` where the control plane runs";
    Some(if has("alertreceived(certificateexpired)") {
        format!("the server refused your certificate: it has expired; {remake}")
    } else if has("alertreceived(certificaterevoked)") {
        format!("the server refused your certificate: it was revoked; {remake}")
    } else if ["alertreceived(badcertificate)", "alertreceived(unknownca)", "alertreceived(certificateunknown)"]
        .iter()
        .any(|a| has(a))
    {
        format!("the server refused your certificate (its CA did not issue it, or it was revoked); {remake}")
    } else if has("alertreceived(certificaterequired)") {
        "the server wants a client certificate and your config has none: set TESTBUS_CONFIG to a file from \
         `testbus-control-plane user create`"
            .to_string()
    } else if has("unknownissuer") || has("invalid peer certificate: badsignature") {
        "the server's certificate is not signed by the CA in your config: is it the control plane your config \
         was made for?"
            .to_string()
    } else if has("causedasendentity") {
        "the server presented a CA certificate as its own: is the address a testbus control plane?".to_string()
    } else if has("notvalidforname") {
        "the server's certificate does not name the address you gave: use the address it was made for".to_string()
    } else if has("invalid peer certificate") {
        format!("the server's certificate was refused: {cause}")
    } else {
        return None;
    })
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        if let Some(message) = tls_refusal(&s) {
            return CliError { code: PERMISSION, message };
        }
        let code = match s.code() {
            Code::Unavailable => UNREACHABLE,
            _ if broken_connection(&s) => UNREACHABLE,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange => USAGE,
            Code::DeadlineExceeded | Code::Cancelled => INCOMPLETE,
            Code::PermissionDenied | Code::Unauthenticated => PERMISSION,
            _ => FAILED,
        };
        let message = if code == UNREACHABLE && not_grpc(&s) {
            format!("{NOT_TESTBUS}: {}", s.message())
        } else if code == UNREACHABLE {
            // The innermost cause says what happened ("transport error"
            // said nothing).
            format!("cannot reach the server: {}", testbus_client::cause(&s))
        } else {
            s.message().to_string()
        };
        CliError { code, message }
    }
}

/// What a server that is not plain gRPC answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A TLS alert: it wants TLS (`https://`).
    Tls,
    /// Something else: its first line, as text.
    Text(String),
}

/// For one `http://HOST:PORT` server: what it answers to the start of an
/// HTTP/2 connection, if that is not HTTP/2; None if it speaks HTTP/2,
/// cannot be reached, or is not such an address.
pub fn answers_without_http2(server: &str) -> Option<Answer> {
    use std::io::{Read, Write};
    // `HOST:PORT` without a scheme is plain HTTP/2 too.
    let addr = match server.strip_prefix("http://") {
        Some(a) => a,
        None if !server.contains("://") && !server.starts_with("unix") => server,
        None => return None,
    }
    .trim_end_matches('/');
    if addr.contains(',') {
        return None;
    }
    let addr = std::net::ToSocketAddrs::to_socket_addrs(addr).ok()?.next()?;
    let limit = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    // The client preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    // An HTTP/2 server's first frame is its SETTINGS (type 4).
    if n == 0 || (n >= 4 && buf[3] == 4) {
        return None;
    }
    // A TLS record (an alert, 0x15, or a handshake, 0x16), version 3.x.
    if n >= 2 && matches!(buf[0], 0x15 | 0x16) && buf[1] == 0x03 {
        return Some(Answer::Tls);
    }
    let text = String::from_utf8_lossy(&buf[..n]);
    Some(Answer::Text(text.lines().next().unwrap_or_default().trim().to_string()))
}

impl From<testbus_client::ConnectError> for CliError {
    fn from(e: testbus_client::ConnectError) -> Self {
        if let testbus_client::ConnectError::Unreachable(server, why) = &e {
            if let Some(said) = tls_refusal_in(&why.to_ascii_lowercase(), why) {
                return CliError { code: PERMISSION, message: format!("{server}: {said}") };
            }
        }
        let code = match e {
            testbus_client::ConnectError::InvalidAddress(..) => USAGE,
            testbus_client::ConnectError::Unreachable(..) => UNREACHABLE,
        };
        CliError { code, message: e.to_string() }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::failed(e.to_string())
    }
}

pub type CliResult<T = i32> = Result<T, CliError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_unreachable_not_a_failure() {
        for s in [
            Status::unknown("transport error"),
            Status::internal("h2 protocol error: error reading a body from connection"),
            Status::unavailable("connection refused"),
        ] {
            assert_eq!(CliError::from(s.clone()).code, UNREACHABLE, "{s:?}");
        }
        assert_eq!(CliError::from(Status::internal("store: disk full")).code, FAILED);
        assert_eq!(CliError::from(Status::invalid_argument("spec.x: connection")).code, USAGE);
        assert_eq!(CliError::from(Status::permission_denied("viewer \"a\" may not delete Test")).code, PERMISSION);
        assert_eq!(CliError::from(Status::unauthenticated("no certificate")).code, PERMISSION);
    }
}
