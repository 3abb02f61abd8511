//! Commands used inside a test process: `sync`, `send`, `recv`. They speak
//! to the agent's socket for this process (`TESTBUS_AGENT_SOCKET`), which
//! adds who is speaking and forwards to the control plane.
use crate::error::{CliError, CliResult};
use std::io::{Read, Write};
use testbus_client::Client;
use testbus_proto::sync_client::SyncClient;
use testbus_proto::{BarrierRequest, RecvRequest, SendRequest};
use tonic::Code;

async fn local() -> CliResult<SyncClient<tonic::transport::Channel>> {
    let path = std::env::var("TESTBUS_AGENT_SOCKET")
        .map_err(|_| CliError::usage("TESTBUS_AGENT_SOCKET is not set: this command runs inside a testbus process"))?;
    let c = Client::connect(&format!("unix:{path}")).await?;
    Ok(SyncClient::new(c.channel()))
}

/// A participant or sender that died is the test's failure (exit 1).
fn sync_err(s: tonic::Status) -> CliError {
    match s.code() {
        Code::FailedPrecondition => CliError::failed(s.message().to_string()),
        _ => s.into(),
    }
}

pub async fn sync(name: String, roles: Vec<String>, timeout: Option<String>) -> CliResult {
    let req = BarrierRequest { process: String::new(), name, timeout: timeout.unwrap_or_default(), roles };
    local().await?.barrier(req).await.map_err(sync_err)?;
    Ok(0)
}

pub async fn send(key: String, value: Option<String>) -> CliResult {
    let value = match value.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
        Some(v) => v.as_bytes().to_vec(),
        None => Vec::new(),
    };
    local().await?.send(SendRequest { process: String::new(), key, value }).await.map_err(sync_err)?;
    Ok(0)
}

pub async fn recv(key: String, from: Option<String>, timeout: Option<String>) -> CliResult {
    let req = RecvRequest {
        process: String::new(),
        key,
        from: from.unwrap_or_default(),
        timeout: timeout.unwrap_or_default(),
    };
    let resp = local().await?.recv(req).await.map_err(sync_err)?.into_inner();
    let mut out = std::io::stdout().lock();
    // One value: exactly its bytes. Several (a role of count n): one line each.
    if resp.messages.len() == 1 {
        out.write_all(&resp.messages[0].value)?;
    } else {
        for m in &resp.messages {
            out.write_all(&m.value)?;
            if !m.value.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    Ok(0)
}
