//! The `Store`: a revisioned key-value store with compare-and-swap, multi-key
//! transactions and watch from a revision. Only this crate knows it exists;
//! everybody else talks to the API.
//!
//! Semantics (shared by every implementation, checked by the conformance
//! tests in `conformance.rs`):
//! - one global revision, incremented by every transaction that writes;
//!   every write of a transaction carries that revision;
//! - `Compare::ModRevision(key, 0)` means "the key does not exist";
//! - `watch(prefix, after)` yields every event with revision > `after`, in
//!   revision order, or `StoreError::Compacted` when `after` is older than
//!   the retained history (the caller lists again).
use futures::stream::BoxStream;

#[cfg(test)]
mod conformance;
pub mod embedded;
pub mod etcd;

pub type Revision = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// The last value of the deleted key; `mod_revision` is the revision of
    /// the delete.
    Delete(KeyValue),
}

impl Event {
    pub fn kv(&self) -> &KeyValue {
        match self {
            Event::Put(kv) | Event::Delete(kv) => kv,
        }
    }
    pub fn revision(&self) -> Revision {
        self.kv().mod_revision
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals the given one (0: the key is absent).
    ModRevision(String, Revision),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The revision of the transaction when it succeeded and wrote; else the
    /// store's current revision.
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("revision {requested} has been compacted (oldest retained: {oldest}); list again")]
    Compacted { requested: Revision, oldest: Revision },
    #[error("value of {key} is {size} bytes, more than the store accepts ({limit})")]
    TooLarge { key: String, size: usize, limit: usize },
    #[error("store: {0}")]
    Backend(String),
    /// Too little disk space: writes are refused, reads go on.
    #[error("disk full: {0}")]
    Full(String),
}

pub type EventStream = BoxStream<'static, Result<Event, StoreError>>;

#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key under `prefix`, in key order, with the revision they were
    /// read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Applies `ops` atomically if every compare holds.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;
    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream, StoreError>;
    async fn revision(&self) -> Result<Revision, StoreError>;
    /// Releases what the store holds (the embedded store's file lock),
    /// waiting for calls in flight; later calls fail. Handles that late
    /// tasks still hold cannot keep the store open past this.
    async fn close(&self) {}
}
