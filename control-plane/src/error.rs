//! The API's one error boundary: what can go wrong below a call (the store,
//! the disk) as an [`ApiError`], and the one place where it becomes a gRPC
//! status. Every service maps through `From<ApiError> for Status`, so the
//! same failure is the same code whichever call met it: a full disk is
//! RESOURCE_EXHAUSTED everywhere, an unreachable store UNAVAILABLE.
use crate::store::StoreError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The store failed; `what` names what was being done ("output store",
    /// "blob locations"), empty for the objects themselves.
    #[error("{}{source}", prefix(what))]
    Store { what: &'static str, source: StoreError },
    /// A file of the control plane's own (blobs, output) failed.
    #[error("{}{source}", prefix(what))]
    Io { what: &'static str, source: std::io::Error },
    /// The caller may not do this (see `authz`).
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller proved no identity, and must.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller holds as much of something as one caller may.
    #[error("{0}")]
    ResourceExhausted(String),
}

fn prefix(what: &str) -> String {
    if what.is_empty() {
        String::new()
    } else {
        format!("{what}: ")
    }
}

impl ApiError {
    pub fn store(what: &'static str, source: StoreError) -> ApiError {
        ApiError::Store { what, source }
    }

    pub fn io(what: &'static str, source: std::io::Error) -> ApiError {
        ApiError::Io { what, source }
    }
}

impl From<StoreError> for ApiError {
    fn from(source: StoreError) -> ApiError {
        ApiError::Store { what: "", source }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Store { source: StoreError::TooLarge { .. }, .. } => Status::invalid_argument(msg),
            ApiError::Store { source: StoreError::Compacted { .. }, .. } => Status::out_of_range(msg),
            ApiError::Store { source: StoreError::Full(_), .. } | ApiError::ResourceExhausted(_) => {
                Status::resource_exhausted(msg)
            }
            ApiError::Store { source: StoreError::Backend(_), .. } => Status::unavailable(msg),
            ApiError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
                Status::resource_exhausted(msg)
            }
            ApiError::Io { .. } => Status::unavailable(msg),
            ApiError::PermissionDenied(_) => Status::permission_denied(msg),
            ApiError::Unauthenticated(_) => Status::unauthenticated(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// Four mappings used to disagree: a full disk was RESOURCE_EXHAUSTED
    /// for objects and UNAVAILABLE for blobs, output and sync.
    #[test]
    fn one_failure_is_one_code_wherever_it_happens() {
        let full = || StoreError::Full("1 byte free".into());
        for what in ["", "output store", "blob locations", "sync"] {
            let s = Status::from(ApiError::store(what, full()));
            assert_eq!(s.code(), Code::ResourceExhausted, "{what}");
            assert!(s.message().ends_with("disk full: 1 byte free"), "{s:?}");
        }
        let code = |e: ApiError| Status::from(e).code();
        assert_eq!(code(StoreError::Backend("down".into()).into()), Code::Unavailable);
        assert_eq!(code(StoreError::Compacted { requested: 1, oldest: 5 }.into()), Code::OutOfRange);
        assert_eq!(code(StoreError::TooLarge { key: "k".into(), size: 2, limit: 1 }.into()), Code::InvalidArgument);
        let enospc = std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
        assert_eq!(code(ApiError::io("blob store", enospc)), Code::ResourceExhausted);
        assert_eq!(code(ApiError::io("blob store", std::io::Error::other("EIO"))), Code::Unavailable);
        assert_eq!(Status::from(ApiError::io("blob store", std::io::Error::other("EIO"))).message(), "blob store: EIO");
    }
}
