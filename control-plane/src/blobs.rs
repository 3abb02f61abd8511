//! The blob store: immutable, content-addressed files under
//! `DATA_DIR/blobs/sha256/<hex>`. An upload is written to a temporary file
//! while it is hashed, checked against the digest the client announced, and
//! only then renamed into place, so a blob file always holds exactly the
//! bytes its name promises.
use futures::stream::BoxStream;
use futures::StreamExt;
use std::path::{Path, PathBuf};
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
}

fn io_err(e: std::io::Error) -> Status {
    Status::unavailable(format!("blob store: {e}"))
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
        Ok(BlobStore { dir: dir.to_path_buf(), min_free })
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

#[tonic::async_trait]
impl Blobs for BlobStore {
    async fn upload(&self, req: Request<Streaming<UploadRequest>>) -> Result<Response<BlobRef>, Status> {
        let mut stream = req.into_inner();
        crate::store::embedded::check_free_space(&self.dir, self.min_free)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
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
                h.update(&msg.data);
                f.write_all(&msg.data).await.map_err(io_err)?;
            }
            f.sync_all().await.map_err(io_err)
        }
        .await;
        if let Err(e) = result {
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
        Ok(Response::new(BlobRef { digest, size }))
    }

    async fn stat(&self, req: Request<StatBlobRequest>) -> Result<Response<StatBlobResponse>, Status> {
        let d = req.into_inner().digest;
        if !blob::valid_digest(&d) {
            return Err(bad_digest("digest", &d));
        }
        let size = self.size(&d).await;
        Ok(Response::new(StatBlobResponse { exists: size.is_some(), size: size.unwrap_or(0) }))
    }

    type DownloadStream = BoxStream<'static, Result<BlobChunk, Status>>;

    async fn download(&self, req: Request<DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let d = req.into_inner().digest;
        let path = self.path(&d).ok_or_else(|| bad_digest("digest", &d))?;
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
