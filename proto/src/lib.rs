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
pub mod pool;
pub mod process;
pub mod resource;
pub mod selector;
pub mod states;
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

/// The phases' wire strings, for code that compares raw status fields.
/// Each is its enum's `as_str()` (see [`states`]): one source for both.
pub mod phase {
    use crate::states::{HostPhase, ProcessPhase, StepPhase, TestPhase};
    pub const PENDING: &str = ProcessPhase::Pending.as_str();
    pub const FETCHING: &str = ProcessPhase::Fetching.as_str();
    pub const RUNNING: &str = ProcessPhase::Running.as_str();
    pub const SUCCEEDED: &str = ProcessPhase::Succeeded.as_str();
    pub const FAILED: &str = ProcessPhase::Failed.as_str();
    pub const KILLED: &str = ProcessPhase::Killed.as_str();
    pub const LOST: &str = ProcessPhase::Lost.as_str();
    pub const CANCELLED: &str = TestPhase::Cancelled.as_str();
    pub const ERROR: &str = TestPhase::Error.as_str();
    pub const READY: &str = HostPhase::Ready.as_str();
    pub const NOT_READY: &str = HostPhase::NotReady.as_str();
    pub const WAITING: &str = StepPhase::Waiting.as_str();
    pub const SKIPPED: &str = StepPhase::Skipped.as_str();

    /// Terminal phases of a Process.
    pub fn process_terminal(p: &str) -> bool {
        p.parse::<ProcessPhase>().is_ok_and(ProcessPhase::is_terminal)
    }
    /// Terminal phases of a Test.
    pub fn test_terminal(p: &str) -> bool {
        p.parse::<TestPhase>().is_ok_and(TestPhase::is_terminal)
    }
}
