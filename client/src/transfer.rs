//! Moving blobs to and from the server: upload unless it has the digest
//! already, download through a temporary file whose digest is checked
//! before it takes its name.
use futures::StreamExt;
use std::path::Path;
use testbus_proto::blob::{digest_file, Hasher, CHUNK};
use testbus_proto::blobs_client::BlobsClient;
use testbus_proto::{BlobRef, DownloadRequest, StatBlobRequest, UploadRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Rpc(#[from] Status),
    #[error("downloaded {got} but expected {want}: the blob is corrupt")]
    Mismatch { want: String, got: String },
}

/// Uploads a local file unless the server has it already; returns its ref.
pub async fn upload_file(ch: Channel, path: &Path) -> Result<BlobRef, BlobError> {
    let io = |e| BlobError::Io(path.display().to_string(), e);
    let (digest, size) = digest_file(path).await.map_err(io)?;
    let mut client = BlobsClient::new(ch);
    let stat = client.stat(StatBlobRequest { digest: digest.clone() }).await?.into_inner();
    if stat.exists {
        return Ok(BlobRef { digest, size });
    }
    let mut f = tokio::fs::File::open(path).await.map_err(io)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadRequest>(4);
    let first = digest.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut first = Some(first);
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 && first.is_none() {
                return Ok::<(), std::io::Error>(());
            }
            let msg = UploadRequest { digest: first.take().unwrap_or_default(), data: buf[..n].to_vec() };
            if tx.send(msg).await.is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let r = client.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    reader.await.map_err(|e| BlobError::Io(path.display().to_string(), std::io::Error::other(e)))?.map_err(io)?;
    Ok(r?.into_inner())
}

/// Downloads a blob to `dest` (through a temporary file beside it),
/// verifying its digest before the file appears.
pub async fn download_to(ch: Channel, digest: &str, dest: &Path) -> Result<u64, BlobError> {
    let tmp = dest.with_extension(format!("part-{}", std::process::id()));
    let io = |e| BlobError::Io(dest.display().to_string(), e);
    let mut stream = BlobsClient::new(ch)
        .max_decoding_message_size(4 * CHUNK)
        .download(DownloadRequest { digest: digest.to_string() })
        .await?
        .into_inner();
    let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut h = Hasher::default();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        h.update(&chunk.data);
        size += chunk.data.len() as u64;
        f.write_all(&chunk.data).await.map_err(io)?;
    }
    f.sync_all().await.map_err(io)?;
    let got = h.finish();
    if got != digest {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(BlobError::Mismatch { want: digest.to_string(), got });
    }
    tokio::fs::rename(&tmp, dest).await.map_err(io)?;
    Ok(size)
}
