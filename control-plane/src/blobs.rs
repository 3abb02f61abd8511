//! The blob store: immutable, content-addressed files under
//! `DATA_DIR/blobs/sha256/<hex>`. An upload is written to a temporary file
//! while it is hashed, checked against the digest the client announced, and
//! only then renamed into place, so a blob file always holds exactly the
//! bytes its name promises.
//!
//! With several replicas (a shared store), each keeps the blobs it received
//! and records where they are: `/blobs/<hex>/<replica id>` holds the address
//! other replicas reach it at. A replica asked for a blob it lacks fetches
//! it from a replica that has it (checking the digest), keeps it and records
//! itself as a holder too, then serves it. Blobs are immutable, so a copy is
//! as good as the original; a blob is lost only when every holder is.
use crate::authz::Verb;
use crate::error::ApiError;
use crate::store::{Op, Store};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use testbus_client::Client;
use testbus_proto::blob::{self, Hasher};
use testbus_proto::blobs_server::Blobs;
use testbus_proto::{BlobChunk, BlobRef, DownloadRequest, StatBlobRequest, StatBlobResponse, UploadRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

/// Largest blob accepted.
pub const MAX_BLOB: u64 = 4 << 30;

#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
    min_free: u64,
    peers: Option<Peers>,
    pki: Option<Arc<crate::auth::Pki>>,
}

/// How this replica finds blobs held by the others.
#[derive(Clone)]
pub struct Peers {
    pub store: Arc<dyn Store>,
    /// This replica's id, kept in its data dir across restarts.
    pub id: String,
    /// The address other replicas reach this one at.
    pub advertise: String,
    /// This replica's TLS toward the others (None: they serve insecure).
    pub tls: Option<testbus_client::Tls>,
}

const LOCATION_PREFIX: &str = "/blobs/";

fn locations_prefix(digest: &str) -> String {
    format!("{LOCATION_PREFIX}{}/", blob::hex_of(digest).unwrap_or_default())
}

/// The id of the replica whose data dir this is: made on first start.
pub fn replica_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("replica-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            let tmp = data_dir.join("replica-id.tmp");
            std::fs::write(&tmp, &id)?;
            std::fs::rename(&tmp, &path)?;
            Ok(id)
        }
    }
}

fn io_err(e: std::io::Error) -> Status {
    ApiError::io("blob store", e).into()
}

fn store_err(e: crate::store::StoreError) -> Status {
    ApiError::store("blob locations", e).into()
}

/// The free-space reserve, checked before and during an upload.
fn check_reserve(dir: &std::path::Path, min_free: u64) -> Result<(), Status> {
    crate::store::embedded::check_free_space(dir, min_free).map_err(|e| ApiError::store("blob store", e).into())
}

fn bad_digest(field: &str, d: &str) -> Status {
    Status::invalid_argument(format!("{field}: {d:?} is not a digest (sha256: and 64 lower-case hex digits)"))
}

impl BlobStore {
    pub fn open(dir: &Path, min_free: u64) -> std::io::Result<BlobStore> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        // Partial uploads from before a crash are garbage.
        for e in std::fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(BlobStore { dir: dir.to_path_buf(), min_free, peers: None, pki: None })
    }

    /// Checks callers with these credentials (without: every caller is
    /// admitted as `authz` admits the local socket's).
    pub fn with_pki(mut self, pki: Option<Arc<crate::auth::Pki>>) -> Self {
        self.pki = pki;
        self
    }

    /// Shares blobs with the other replicas on the same store.
    pub fn with_peers(mut self, peers: Peers) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Whether a blob can be served: held here or by another replica.
    pub async fn available(&self, digest: &str) -> Result<bool, Status> {
        if self.size(digest).await.is_some() {
            return Ok(true);
        }
        Ok(!self.holders(digest).await?.is_empty())
    }

    /// The other replicas recorded as holding a blob: (id, address).
    async fn holders(&self, digest: &str) -> Result<Vec<(String, String)>, Status> {
        let Some(p) = &self.peers else { return Ok(Vec::new()) };
        let (kvs, _) = p.store.list(&locations_prefix(digest)).await.map_err(store_err)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let id = kv.key.rsplit('/').next()?.to_string();
                (id != p.id).then(|| (id, String::from_utf8_lossy(&kv.value).into_owned()))
            })
            .collect())
    }

    /// Records this replica as a holder of a blob.
    async fn record(&self, digest: &str) -> Result<(), Status> {
        let Some(p) = &self.peers else { return Ok(()) };
        let key = format!("{}{}", locations_prefix(digest), p.id);
        p.store.txn(vec![], vec![Op::Put(key, p.advertise.clone().into_bytes())]).await.map_err(store_err)?;
        Ok(())
    }

    /// Makes sure a blob is held here, fetching it from another replica if
    /// needed; its size, or None when no replica has it.
    pub async fn ensure(&self, digest: &str) -> Result<Option<u64>, Status> {
        if let Some(size) = self.size(digest).await {
            return Ok(Some(size));
        }
        let mut errors = Vec::new();
        for (id, addr) in self.holders(digest).await? {
            match self.fetch(digest, &addr).await {
                Ok(size) => {
                    self.record(digest).await?;
                    tracing::info!(%digest, from = %addr, size, "blob copied from a peer replica");
                    return Ok(Some(size));
                }
                Err(e) => errors.push(format!("replica {id} at {addr}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(None)
        } else {
            Err(Status::unavailable(format!(
                "blob {digest}: no replica holding it could serve it: {}",
                errors.join("; ")
            )))
        }
    }

    async fn fetch(&self, digest: &str, addr: &str) -> anyhow::Result<u64> {
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            Client::connect_with(addr, self.peers.as_ref().and_then(|p| p.tls.clone())),
        )
        .await??;
        let tmp = self.dir.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let size = testbus_client::transfer::download_to(client.channel(), digest, &tmp).await;
        let size = match size {
            Ok(s) => s,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e.into());
            }
        };
        let dest = self.path(digest).ok_or_else(|| anyhow::anyhow!("bad digest"))?;
        tokio::fs::rename(&tmp, &dest).await?;
        Ok(size)
    }

    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        blob::hex_of(digest).map(|h| self.dir.join("sha256").join(h))
    }

    /// The size of a stored blob.
    pub async fn size(&self, digest: &str) -> Option<u64> {
        let p = self.path(digest)?;
        tokio::fs::metadata(p).await.ok().map(|m| m.len())
    }
}

/// Bytes of an upload between two checks of the free-space reserve.
const FREE_CHECK_EVERY: u64 = 8 << 20;

#[tonic::async_trait]
impl Blobs for BlobStore {
    async fn upload(&self, req: Request<Streaming<UploadRequest>>) -> Result<Response<BlobRef>, Status> {
        crate::auth::authorize(self.pki.as_deref(), &req, Verb::UploadBlob, crate::authz::Target::Blobs)?;
        let mut stream = req.into_inner();
        check_reserve(&self.dir, self.min_free)?;
        let tmp = self.dir.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
        let mut h = Hasher::default();
        let mut size = 0u64;
        let mut expected = None;
        let result: Result<(), Status> = async {
            while let Some(msg) = stream.next().await {
                let msg = msg?;
                if expected.is_none() {
                    if !msg.digest.is_empty() && !blob::valid_digest(&msg.digest) {
                        return Err(bad_digest("digest", &msg.digest));
                    }
                    expected = Some(msg.digest.clone());
                }
                size += msg.data.len() as u64;
                if size > MAX_BLOB {
                    return Err(Status::invalid_argument(format!("data: blob larger than {MAX_BLOB} bytes")));
                }
                // The reserve is checked as the blob grows, not only when it
                // starts: a large upload must not eat the space the store
                // needs. statvfs is cheap, but once per 8 MiB is enough when
                // each check leaves room for the next 8 MiB.
                if size / FREE_CHECK_EVERY != (size - msg.data.len() as u64) / FREE_CHECK_EVERY {
                    check_reserve(&self.dir, self.min_free.saturating_add(FREE_CHECK_EVERY))?;
                }
                h.update(&msg.data);
                f.write_all(&msg.data).await.map_err(io_err)?;
            }
            f.sync_all().await.map_err(io_err)
        }
        .await;
        if let Err(e) = result {
            // A tokio File's last write may still be under way on the
            // blocking pool, holding the file open: an unlinked file keeps
            // its space until closed, and the caller must find the space
            // back when told the upload failed (CI once did not).
            let _ = f.flush().await;
            drop(f);
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let digest = h.finish();
        if let Some(want) = expected.filter(|w| !w.is_empty()) {
            if want != digest {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(Status::data_loss(format!("digest: received {digest}, announced {want}; upload again")));
            }
        }
        let dest = self.path(&digest).ok_or_else(|| Status::internal("digest"))?;
        tokio::fs::rename(&tmp, &dest).await.map_err(io_err)?;
        // Until the location is recorded other replicas cannot find the
        // blob: fail the upload, which the client repeats.
        self.record(&digest).await?;
        Ok(Response::new(BlobRef { digest, size }))
    }

    async fn stat(&self, req: Request<StatBlobRequest>) -> Result<Response<StatBlobResponse>, Status> {
        crate::auth::authorize(self.pki.as_deref(), &req, Verb::ReadBlob, crate::authz::Target::Blobs)?;
        let d = req.into_inner().digest;
        if !blob::valid_digest(&d) {
            return Err(bad_digest("digest", &d));
        }
        // "Not here" when no live replica has it: the client uploads again.
        let size = self.ensure(&d).await.unwrap_or_else(|e| {
            tracing::warn!(digest = %d, error = %e.message(), "blob: no copy reachable");
            None
        });
        Ok(Response::new(StatBlobResponse { exists: size.is_some(), size: size.unwrap_or(0) }))
    }

    type DownloadStream = BoxStream<'static, Result<BlobChunk, Status>>;

    async fn download(&self, req: Request<DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        crate::auth::authorize(self.pki.as_deref(), &req, Verb::ReadBlob, crate::authz::Target::Blobs)?;
        let d = req.into_inner().digest;
        let path = self.path(&d).ok_or_else(|| bad_digest("digest", &d))?;
        self.ensure(&d).await?;
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!("blob {d} not found")))
            }
            Err(e) => return Err(io_err(e)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut buf = vec![0u8; blob::CHUNK];
            loop {
                match f.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(Ok(BlobChunk { data: buf[..n].to_vec() })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io_err(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx).boxed()))
    }
}
