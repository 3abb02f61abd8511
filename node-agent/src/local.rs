//! The agent's local socket for one process (`TESTBUS_AGENT_SOCKET`).
//!
//! Each process gets its own unix socket, so the agent knows who is
//! speaking without trusting what the caller says: it overwrites `process`
//! in every request before forwarding it to the control plane. The socket
//! lives as long as the process's runner.
use std::path::{Path, PathBuf};
use testbus_proto::client::Client;
use testbus_proto::sync_client::SyncClient;
use testbus_proto::sync_server::{Sync, SyncServer};
use testbus_proto::{BarrierRequest, BarrierResponse, RecvRequest, RecvResponse, SendRequest, SendResponse};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

struct ProcessSync {
    client: Client,
    process: String,
}

#[tonic::async_trait]
impl Sync for ProcessSync {
    async fn barrier(&self, req: Request<BarrierRequest>) -> Result<Response<BarrierResponse>, Status> {
        let mut r = req.into_inner();
        r.process = self.process.clone();
        SyncClient::new(self.client.channel()).barrier(r).await
    }
    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let mut r = req.into_inner();
        r.process = self.process.clone();
        SyncClient::new(self.client.channel()).send(r).await
    }
    async fn recv(&self, req: Request<RecvRequest>) -> Result<Response<RecvResponse>, Status> {
        let mut r = req.into_inner();
        r.process = self.process.clone();
        SyncClient::new(self.client.channel()).recv(r).await
    }
}

/// A served socket; dropping it stops serving and removes the file.
pub struct LocalSocket {
    pub path: PathBuf,
    _stop: oneshot::Sender<()>,
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn serve(dir: &Path, uid: &str, client: Client, process: String) -> std::io::Result<LocalSocket> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{uid}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = SyncServer::new(ProcessSync { client, process });
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let r = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "local socket stopped");
        }
    });
    Ok(LocalSocket { path, _stop: stop })
}
