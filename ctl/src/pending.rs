//! Why a test waits, said to a person: once, and again each time the
//! reason changes. `run`, `wait` and `logs -f` share it (it was in
//! `progress`, which made `logs` and `progress` depend on each other).
use testbus_proto::states::TestPhase;
use testbus_proto::{Resource, Test};

/// Says why a test waits for hosts: once, and again each time the reason
/// changes (a person watching `run` or `wait` is not left in silence).
#[derive(Default)]
pub struct PendingNote {
    said: String,
}

impl PendingNote {
    pub fn line(&mut self, t: &Test) -> Option<String> {
        let s = t.status();
        if s.phase != TestPhase::Pending || s.message.is_empty() || s.message == self.said {
            return None;
        }
        self.said = s.message.clone();
        Some(format!("test/{}: Pending: {}", t.name(), s.message))
    }
}
