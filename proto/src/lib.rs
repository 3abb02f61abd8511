//! The testbus wire contract.
//!
//! It holds the generated types and services, the YAML/JSON mapping of
//! manifests and the validation shared by the server and the CLI. The typed
//! client (connections, failover, TLS) is `testbus-client`, built on it.
#![forbid(unsafe_code)]

#[allow(clippy::all, missing_docs)]
mod pb {
    tonic::include_proto!("testbus.v1");
}
pub use pb::*;

pub mod blob;
pub mod duration;
pub mod fuzzing;
pub mod manifest;
pub mod pool;
pub mod process;
pub mod rerun;
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

/// Phases as the wire carries them: code compares them as the enums of
/// [`states`] (`t.status().phase == TestPhase::Running`); these two judge a
/// raw field, whatever it holds.
pub mod phase {
    use crate::states::{ProcessPhase, TestPhase};

    /// Terminal phases of a Process.
    pub fn process_terminal(p: &str) -> bool {
        p.parse::<ProcessPhase>().is_ok_and(ProcessPhase::is_terminal)
    }
    /// Terminal phases of a Test.
    pub fn test_terminal(p: &str) -> bool {
        p.parse::<TestPhase>().is_ok_and(TestPhase::is_terminal)
    }
}
