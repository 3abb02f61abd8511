//! The testbus wire contract.
//!
//! This is the only crate that knows protobuf. It holds the generated types
//! and services, the YAML/JSON mapping of manifests, the validation shared by
//! the server and the CLI, and the typed client every other crate uses.
#![forbid(unsafe_code)]

#[allow(clippy::all, missing_docs)]
mod pb {
    tonic::include_proto!("testbus.v1");
}
pub use pb::*;

pub mod blob;
pub mod client;
pub mod duration;
pub mod fuzzing;
pub mod manifest;
pub mod process;
pub mod resource;
pub mod selector;
pub mod steps;
pub mod subst;
pub mod time;
pub mod validate;

pub use resource::{DecodeError, Kind, Object, Resource};

/// The encoded FileDescriptorSet of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testbus_descriptor.bin"));

pub const API_VERSION: &str = "testbus/v1";

/// The finalizer the server puts on every Test; the test controller removes
/// it once the test's processes have ended and its hosts are released.
pub const TEST_FINALIZER: &str = "testbus.io/cleanup";

/// Process phases.
pub mod phase {
    pub const PENDING: &str = "Pending";
    pub const FETCHING: &str = "Fetching";
    pub const RUNNING: &str = "Running";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const KILLED: &str = "Killed";
    pub const LOST: &str = "Lost";
    pub const CANCELLED: &str = "Cancelled";
    pub const ERROR: &str = "Error";
    pub const READY: &str = "Ready";
    pub const NOT_READY: &str = "NotReady";
    pub const WAITING: &str = "Waiting";
    pub const SKIPPED: &str = "Skipped";

    /// Terminal phases of a Process.
    pub fn process_terminal(p: &str) -> bool {
        matches!(p, SUCCEEDED | FAILED | KILLED | LOST)
    }
    /// Terminal phases of a Test.
    pub fn test_terminal(p: &str) -> bool {
        matches!(p, SUCCEEDED | FAILED | CANCELLED | ERROR)
    }
}
