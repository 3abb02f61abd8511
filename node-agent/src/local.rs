//! The agent's local socket (`TESTBUS_AGENT_SOCKET`), through which
//! processes reach barriers and messages (`testbusctl sync/send/recv`).
//!
//! One socket serves every process of the agent. Who is speaking comes from
//! the kernel, never from the request: the caller's pid (SO_PEERCRED) leads
//! to the Process a runner registered, and the request's `process` is
//! overwritten with that Process's name before it goes to the control
//! plane. Where processes run in cgroups of their own (see `containment`),
//! the caller's cgroup names its Process: a process cannot leave it, so one
//! that escaped its process group or session still speaks only for its own
//! Process, and nothing can speak for a Process once it has ended. Without
//! cgroups, the caller's process group, or else an ancestor, is looked up:
//! weaker, since a process may join another group of its session. A caller
//! that belongs to no process of this agent is refused. (A socket per
//! process would cost a file created and removed for every process, and
//! still let any local program speak for any process by connecting to its
//! socket.) A caller that its process had a runtime's daemon start (a
//! container) is refused too.
use crate::containment::Containment;
use crate::journal::ProcStat;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use testbus_client::Client;
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

/// What identifies the processes of a Process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// The uid that names its cgroup.
    Cgroup(String),
    /// Its process group (the pid of its main process).
    Group(i32),
    /// A caller's PID namespace (the inode of its `ns/pid`); looked up
    /// among the registered relays' namespaces.
    PidNamespace(u64),
    /// The relay whose PID namespace holds it (see `pidns`).
    Relay(i32),
}

/// Running processes by what identifies them.
struct Callers {
    by_key: Mutex<HashMap<Key, String>>,
    changed: Notify,
    containment: Containment,
}

impl Callers {
    fn new(containment: Containment) -> Callers {
        Callers { by_key: Mutex::default(), changed: Notify::new(), containment }
    }

    fn lookup(&self, pid: i32) -> Option<String> {
        let exact = match &self.containment {
            Containment::Cgroup(root) => Key::Cgroup(root.uid_of(pid)?),
            Containment::PidNamespace { .. } => Key::PidNamespace(crate::pidns::namespace_of(pid)?),
            Containment::ProcessGroup => return self.lookup_by_group(pid),
        };
        let keys = self.by_key.lock();
        if let Key::PidNamespace(ns) = exact {
            // A relay's namespace exists only once it has forked its init,
            // which may be after it was registered: looked at now, while
            // the caller keeps it alive.
            return keys.iter().find_map(|(k, name)| match k {
                Key::Relay(pid) => (crate::pidns::children_namespace(*pid) == Some(ns)).then(|| name.clone()),
                _ => None,
            });
        }
        keys.get(&exact).cloned()
    }

    /// The weak lookup, without containment: the caller's group, or an
    /// ancestor's.
    fn lookup_by_group(&self, pid: i32) -> Option<String> {
        let keys = self.by_key.lock();
        let mut pid = pid;
        for _ in 0..MAX_ANCESTORS {
            if let Some(name) = keys.get(&Key::Group(pid)) {
                return Some(name.clone());
            }
            let stat = ProcStat::read(pid)?;
            if let Some(name) = keys.get(&Key::Group(stat.pgrp)) {
                return Some(name.clone());
            }
            if stat.ppid <= 1 {
                return None;
            }
            pid = stat.ppid;
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

/// A Process's processes speaking for it until this is dropped.
pub struct Registration {
    callers: Arc<Callers>,
    key: Key,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.callers.by_key.lock().remove(&self.key);
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LocalSocket {
    /// Serves `dir/agent.sock` (replacing what a predecessor left there).
    pub fn serve(dir: &Path, client: Client, containment: Containment) -> std::io::Result<LocalSocket> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let callers = Arc::new(Callers::new(containment));
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

    /// Callers in the cgroup of Process `uid` (with cgroups), or in the PID
    /// namespace the relay `group` made (with PID namespaces), or else in
    /// process group `group` or descended from its leader, speak for
    /// Process `process`.
    pub fn register(&self, group: i32, uid: &str, process: String) -> Registration {
        let key = match &self.callers.containment {
            Containment::Cgroup(_) => Key::Cgroup(uid.to_string()),
            Containment::PidNamespace { .. } => Key::Relay(group),
            Containment::ProcessGroup => Key::Group(group),
        };
        self.callers.by_key.lock().insert(key.clone(), process);
        self.callers.changed.notify_waiters();
        Registration { callers: self.callers.clone(), key }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callers_are_found_by_group_or_ancestor_and_strangers_refused() {
        let callers = Arc::new(Callers::new(Containment::ProcessGroup));
        let me = std::process::id() as i32;
        let stat = ProcStat::read(me).expect("own stat");
        // Registered by our own group: found.
        callers.by_key.lock().insert(Key::Group(stat.pgrp), "by-group".into());
        assert_eq!(callers.lookup(me).as_deref(), Some("by-group"));
        callers.by_key.lock().clear();
        // Registered by our parent's pid (a process that left its group):
        // found through the ancestry.
        callers.by_key.lock().insert(Key::Group(stat.ppid), "by-parent".into());
        assert_eq!(callers.lookup(me).as_deref(), Some("by-parent"));
        callers.by_key.lock().clear();
        // A caller found only once registered, while it waits.
        let c = callers.clone();
        let waiting = tokio::spawn(async move { c.who(me).await });
        tokio::task::yield_now().await;
        let sock =
            LocalSocket { path: PathBuf::from("/nonexistent"), callers: callers.clone(), _stop: oneshot::channel().0 };
        let reg = sock.register(me, "uid", "late".into());
        assert_eq!(waiting.await.unwrap().unwrap(), "late");
        drop(reg);
        assert!(callers.by_key.lock().is_empty(), "a registration ends with its process");
        tokio::time::pause();
        let refused = callers.who(me).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
