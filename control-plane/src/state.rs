//! What every service of the API shares: the store, the watch hub, the
//! blob store, the credentials, the metrics and the watch quota. The
//! services (`api`, `auth`, `blobs`, `output`, `sync`, the dashboard)
//! depend on this, not on each other: `auth` once reached into `api` for
//! it, and `api` into `auth`.
use crate::hub::{self, Hub};
use crate::store::Store;
use std::sync::Arc;
use testbus_proto::Resource;
use tonic::Status;

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub blobs: crate::blobs::BlobStore,
    /// Credentials; None when serving without TLS.
    pub pki: Option<Arc<crate::auth::Pki>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Watches one identity may hold at once.
    pub watch_quota: Arc<crate::quota::Quota>,
    /// Keeps a lease renewal and a claim of one host apart on this replica.
    pub host_locks: Arc<HostLocks>,
}

/// Locks on Host writes of this replica that must not interleave: a lease
/// renewal (every agent, every few seconds) and a claim of that host. A
/// claim compares every claimed host's revision in its transaction, and
/// with renewals in between, a claim of hundreds of hosts conflicted at
/// every try, for ever (issue 33's fleet: a 1,000-host test never started
/// among 1,000 renewing agents). A claim holds the locks of its hosts from
/// reading them to its commit; a renewal waits that long (milliseconds).
/// Sharded by the host's name: renewals of different hosts do not wait for
/// each other. Replicas do not share these: renewals that reach another
/// replica can still conflict with a claim (it is retried by the
/// scheduler's next pass).
pub struct HostLocks {
    shards: Vec<tokio::sync::Mutex<()>>,
}

impl Default for HostLocks {
    fn default() -> Self {
        HostLocks { shards: (0..256).map(|_| tokio::sync::Mutex::new(())).collect() }
    }
}

impl HostLocks {
    fn shard(&self, host: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        host.hash(&mut h);
        h.finish() as usize % self.shards.len()
    }

    /// The lock of one host.
    pub async fn one(&self, host: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.shards[self.shard(host)].lock().await
    }

    /// The locks of all `hosts`, taken in one order (no deadlock between
    /// two claims).
    pub async fn all<'a>(&self, hosts: impl Iterator<Item = &'a str>) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let shards: std::collections::BTreeSet<usize> = hosts.map(|h| self.shard(h)).collect();
        let mut held = Vec::with_capacity(shards.len());
        for i in shards {
            held.push(self.shards[i].lock().await);
        }
        held
    }
}

/// Watches one identity may hold at once (about 8 KiB each): a viewer's
/// dashboards and scripts, an agent's one. The local socket (the
/// controllers) is not counted.
pub const MAX_WATCHES_PER_IDENTITY: usize = 1024;

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        blobs: crate::blobs::BlobStore,
        pki: Option<Arc<crate::auth::Pki>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> ApiState {
        let watch_quota = crate::quota::Quota::new("watches", MAX_WATCHES_PER_IDENTITY);
        ApiState { store, hub, blobs, pki, metrics, watch_quota, host_locks: Arc::default() }
    }

    /// The stored object of kind `K` named `name`, with its revision.
    pub async fn load<K: Resource>(&self, name: &str) -> Result<(K, u64), Status> {
        let key = hub::key(K::KIND, name);
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(|e| Status::from(crate::error::ApiError::from(e)))?
            .ok_or_else(|| Status::not_found(format!("{} {name:?} not found", K::KIND)))?;
        let o =
            K::from_stored(&kv.value, kv.mod_revision).map_err(|e| Status::data_loss(format!("{}: {e}", kv.key)))?;
        Ok((o, kv.mod_revision))
    }
}
