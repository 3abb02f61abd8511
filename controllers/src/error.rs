//! What a reconcile could not do: the controllers' one error type. The
//! worker logs it and, after failures in a row, says it on the object's
//! `Reconciled` condition; a lost compare-and-swap is routine (read again
//! and retried).
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API failed: what the controller was doing, and the
    /// server's answer.
    #[error("{what}: {}", .status.message())]
    Api {
        what: &'static str,
        #[source]
        status: Status,
    },
}

impl Error {
    /// The API's answer, for a caller that decides on its code.
    pub fn status(&self) -> &Status {
        match self {
            Error::Api { status, .. } => status,
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        Error::Api { what: "calling the API", status }
    }
}

/// Says what a call to the API was for, when it fails.
pub trait Doing<T> {
    fn doing(self, what: &'static str) -> Result<T, Error>;
}

impl<T> Doing<T> for Result<T, Status> {
    fn doing(self, what: &'static str) -> Result<T, Error> {
        self.map_err(|status| Error::Api { what, status })
    }
}

impl crate::runtime::ReconcileError for Error {
    fn routine(&self) -> bool {
        self.status().code() == tonic::Code::Aborted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ReconcileError;

    #[test]
    fn an_error_says_what_failed_and_a_lost_race_is_routine() {
        let e = Err::<(), _>(Status::aborted("conflict: Test \"t\" was modified")).doing("writing the test's status");
        let e = e.unwrap_err();
        assert_eq!(e.to_string(), "writing the test's status: conflict: Test \"t\" was modified");
        assert!(e.routine());
        let e = Error::from(Status::unavailable("the store is down"));
        assert_eq!(e.to_string(), "calling the API: the store is down");
        assert!(!e.routine());
    }
}
