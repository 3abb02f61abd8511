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

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::Unavailable => UNREACHABLE,
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
