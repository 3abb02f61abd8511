//! Exit codes of the command-line contract:
//! 0 succeeded; 1 the test or command failed (`run`/`exec`: the remote exit
//! code); 2 invalid input or usage; 3 cancelled, error or timed out; 4 the
//! server could not be reached.
use tonic::{Code, Status};

pub const FAILED: i32 = 1;
pub const USAGE: i32 = 2;
pub const INCOMPLETE: i32 = 3;
pub const UNREACHABLE: i32 = 4;

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

/// Whether a status came from the connection rather than the server: tonic
/// reports a connection that broke mid-call (or an HTTP/2 peer that is no
/// testbus server) as Unknown or Internal, not Unavailable.
fn broken_connection(s: &Status) -> bool {
    if !matches!(s.code(), Code::Unknown | Code::Internal) {
        return false;
    }
    let mut texts = vec![s.message().to_string()];
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        texts.push(e.to_string());
        source = e.source();
    }
    const SIGNS: [&str; 6] =
        ["transport error", "h2 protocol error", "connection", "broken pipe", "error reading a body", "stream closed"];
    texts.iter().any(|t| {
        let t = t.to_ascii_lowercase();
        SIGNS.iter().any(|sign| t.contains(sign))
    })
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::Unavailable => UNREACHABLE,
            _ if broken_connection(&s) => UNREACHABLE,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange => USAGE,
            Code::DeadlineExceeded | Code::Cancelled => INCOMPLETE,
            _ => FAILED,
        };
        let message = if code == UNREACHABLE {
            format!("cannot reach the server: {}", s.message())
        } else {
            s.message().to_string()
        };
        CliError { code, message }
    }
}

impl From<testbus_proto::client::ConnectError> for CliError {
    fn from(e: testbus_proto::client::ConnectError) -> Self {
        let code = match e {
            testbus_proto::client::ConnectError::InvalidAddress(..) => USAGE,
            testbus_proto::client::ConnectError::Unreachable(..) => UNREACHABLE,
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
    }
}
