//! The agent's blob cache, keyed by digest: a blob is fetched at most once
//! per agent data dir, even when several processes need it at the same
//! time (they wait on the same per-digest lock), and a cached file is never
//! handed out before its digest was verified.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use testbus_client::transfer::{download_to, BlobError};
use testbus_client::Client;
use testbus_proto::blob;

pub struct BlobCache {
    dir: PathBuf,
    client: Client,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Blobs fetched by this agent run.
    pub fetches: AtomicU64,
}

impl BlobCache {
    pub fn new(dir: PathBuf, client: Client) -> std::io::Result<Arc<BlobCache>> {
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(BlobCache { dir, client, locks: Mutex::default(), fetches: AtomicU64::new(0) }))
    }

    fn path(&self, digest: &str) -> Option<PathBuf> {
        blob::hex_of(digest).map(|h| self.dir.join(h))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.exists())
    }

    /// The cached file of `digest`, fetching it first if needed.
    pub async fn get(&self, digest: &str) -> Result<PathBuf, BlobError> {
        let path = self
            .path(digest)
            .ok_or_else(|| BlobError::Io(digest.to_string(), std::io::Error::other("not a digest")))?;
        if path.exists() {
            return Ok(path);
        }
        let lock = self.locks.lock().entry(digest.to_string()).or_default().clone();
        let _held = lock.lock().await;
        if path.exists() {
            return Ok(path);
        }
        let size = download_to(self.client.channel(), digest, &path).await?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%digest, size, "fetched blob");
        Ok(path)
    }
}
