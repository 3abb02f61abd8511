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
        ApiState { store, hub, blobs, pki, metrics, watch_quota }
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
