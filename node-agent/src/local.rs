//! The agent's local socket (`TESTBUS_AGENT_SOCKET`), through which
//! processes reach barriers and messages (`testbusctl sync/send/recv`).
//!
//! One socket serves every process of the agent. Who is speaking comes from
//! the kernel, never from the request: the caller's pid (SO_PEERCRED) leads
//! to its process group, or else to an ancestor, that a runner registered
//! for its Process; the request's `process` is overwritten with that
//! Process's name before it goes to the control plane. A caller that belongs
//! to no process of this agent is refused. (A socket per process would cost
//! a file created and removed for every process, and still let any local
//! program speak for any process by connecting to its socket.) A caller
//! whose ancestry does not lead back to its process — a container that the
//! process had a runtime's daemon start, say — is refused too.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testbus_proto::client::Client;
use testbus_proto::sync_client::SyncClient;
use testbus_proto::sync_server::{Sync, SyncServer};
use testbus_proto::{BarrierRequest, BarrierResponse, RecvRequest, RecvResponse, SendRequest, SendResponse};
use tokio::sync::{oneshot, Notify};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

/// How long a caller is looked for: a process may connect before its
/// runner, back from spawning it, has registered its group.
const REGISTRATION_WAIT: Duration = Duration::from_secs(2);
/// Ancestors followed from the caller before giving up.
const MAX_ANCESTORS: usize = 64;

/// Running processes by process group (the pid of their main process).
#[derive(Default)]
struct Callers {
    by_group: Mutex<HashMap<i32, String>>,
    changed: Notify,
}

impl Callers {
    fn lookup(&self, pid: i32) -> Option<String> {
        let groups = self.by_group.lock().unwrap_or_else(|p| p.into_inner());
        let mut pid = pid;
        for _ in 0..MAX_ANCESTORS {
            if let Some(name) = groups.get(&pid) {
                return Some(name.clone());
            }
            let (ppid, group) = parent_and_group(pid)?;
            if let Some(name) = groups.get(&group) {
                return Some(name.clone());
            }
            if ppid <= 1 {
                return None;
            }
            pid = ppid;
        }
        None
    }

    async fn who(&self, pid: i32) -> Result<String, Status> {
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        loop {
            let changed = self.changed.notified();
            if let Some(name) = self.lookup(pid) {
                return Ok(name);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Status::permission_denied(format!("pid {pid} belongs to no process this agent runs")));
            }
        }
    }
}

/// The parent and process group of `pid`, from /proc/PID/stat.
fn parent_and_group(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start at the last ')'.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    let group = rest.next()?.parse().ok()?;
    Some((ppid, group))
}

struct ProcessSync {
    client: Client,
    callers: Arc<Callers>,
}

impl ProcessSync {
    async fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let pid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid())
            .ok_or_else(|| Status::permission_denied("the caller's pid is unknown"))?;
        self.callers.who(pid).await
    }
}

#[tonic::async_trait]
impl Sync for ProcessSync {
    async fn barrier(&self, req: Request<BarrierRequest>) -> Result<Response<BarrierResponse>, Status> {
        let process = self.caller(&req).await?;
        let r = BarrierRequest { process, ..req.into_inner() };
        SyncClient::new(self.client.channel()).barrier(r).await
    }
    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let process = self.caller(&req).await?;
        let r = SendRequest { process, ..req.into_inner() };
        SyncClient::new(self.client.channel()).send(r).await
    }
    async fn recv(&self, req: Request<RecvRequest>) -> Result<Response<RecvResponse>, Status> {
        let process = self.caller(&req).await?;
        let r = RecvRequest { process, ..req.into_inner() };
        SyncClient::new(self.client.channel()).recv(r).await
    }
}

/// The served socket; dropping it stops serving and removes the file.
pub struct LocalSocket {
    pub path: PathBuf,
    callers: Arc<Callers>,
    _stop: oneshot::Sender<()>,
}

/// A process group speaking for a Process until this is dropped.
pub struct Registration {
    callers: Arc<Callers>,
    group: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.callers.by_group.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.group);
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LocalSocket {
    /// Serves `dir/agent.sock` (replacing what a predecessor left there).
    pub fn serve(dir: &Path, client: Client) -> std::io::Result<LocalSocket> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let callers = Arc::new(Callers::default());
        let svc = SyncServer::new(ProcessSync { client, callers: callers.clone() });
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
        Ok(LocalSocket { path, callers, _stop: stop })
    }

    /// Callers in process group `group` (or descended from its leader)
    /// speak for Process `process`.
    pub fn register(&self, group: i32, process: String) -> Registration {
        self.callers.by_group.lock().unwrap_or_else(|p| p.into_inner()).insert(group, process);
        self.callers.changed.notify_waiters();
        Registration { callers: self.callers.clone(), group }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callers_are_found_by_group_or_ancestor_and_strangers_refused() {
        let callers = Arc::new(Callers::default());
        let me = std::process::id() as i32;
        let (parent, group) = parent_and_group(me).expect("own stat");
        // Registered by our own group: found.
        callers.by_group.lock().unwrap().insert(group, "by-group".into());
        assert_eq!(callers.lookup(me).as_deref(), Some("by-group"));
        callers.by_group.lock().unwrap().clear();
        // Registered by our parent's pid (a process that left its group):
        // found through the ancestry.
        callers.by_group.lock().unwrap().insert(parent, "by-parent".into());
        assert_eq!(callers.lookup(me).as_deref(), Some("by-parent"));
        callers.by_group.lock().unwrap().clear();
        // A caller found only once registered, while it waits.
        let c = callers.clone();
        let waiting = tokio::spawn(async move { c.who(me).await });
        tokio::task::yield_now().await;
        let sock =
            LocalSocket { path: PathBuf::from("/nonexistent"), callers: callers.clone(), _stop: oneshot::channel().0 };
        let reg = sock.register(me, "late".into());
        assert_eq!(waiting.await.unwrap().unwrap(), "late");
        drop(reg);
        assert!(callers.by_group.lock().unwrap().is_empty(), "a registration ends with its process");
        tokio::time::pause();
        let refused = callers.who(me).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
