//! What waiting `recv`s and barriers need to know, kept once for the whole
//! control plane: every Process by test (its phase, role, host and message),
//! whether each host is Ready, and a wake-up per test.
//!
//! One task feeds it: the hub's watches of Processes and Hosts (no store
//! watch of its own for those) and one store watch of the `/sync/` keys.
//! A waiter is woken only when something of its own test changes (one of
//! its processes, a host one of them runs on, one of its sync keys), and
//! reads the test's processes here instead of listing every stored Process.
//! When a feed ends (a watcher dropped as too slow, the store watch lost) the
//! index lists again and wakes every waiter.
use crate::hub::{self, HubEvent};
use crate::state::ApiState;
use crate::store::Revision;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use testbus_client::EventType;
use testbus_proto::states::HostPhase;
use testbus_proto::{Host, Kind, Object, Process, Resource};
use tokio::sync::watch;

/// What a waiter needs of a Process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub name: String,
    pub role: String,
    pub host: String,
    pub phase: String,
    pub message: String,
    revision: Revision,
}

#[derive(Default)]
struct State {
    /// test uid → process name → what a waiter needs of it.
    by_test: HashMap<String, HashMap<String, ProcInfo>>,
    /// process name → its test uid (to remove it on delete).
    test_of: HashMap<String, String>,
    /// host → Ready, and the revision that said so.
    hosts: HashMap<String, (bool, Revision)>,
    /// host → the tests with a process on it.
    tests_on: HashMap<String, HashSet<String>>,
    /// test uid → its waiters' wake-up; removed when none is left.
    wake: HashMap<String, watch::Sender<u64>>,
}

impl State {
    fn bump(&mut self, uid: &str) {
        if let Some(w) = self.wake.get(uid) {
            w.send_modify(|n| *n += 1);
            if w.receiver_count() == 0 {
                self.wake.remove(uid);
            }
        }
    }

    fn bump_all(&mut self) {
        self.wake.retain(|_, w| {
            w.send_modify(|n| *n += 1);
            w.receiver_count() > 0
        });
    }

    fn put_process(&mut self, p: &Process, revision: Revision) {
        let uid = p.spec().test_uid.clone();
        if uid.is_empty() {
            return;
        }
        let info = ProcInfo {
            name: p.name().to_string(),
            role: p.spec().role.clone(),
            host: p.spec().host_name.clone(),
            phase: p.status().phase.clone(),
            message: p.status().message.clone(),
            revision,
        };
        let procs = self.by_test.entry(uid.clone()).or_default();
        if procs.get(&info.name).is_some_and(|old| old.revision >= revision) {
            return;
        }
        self.tests_on.entry(info.host.clone()).or_default().insert(uid.clone());
        self.test_of.insert(info.name.clone(), uid.clone());
        procs.insert(info.name.clone(), info);
        self.bump(&uid);
    }

    fn delete_process(&mut self, name: &str) {
        let Some(uid) = self.test_of.remove(name) else { return };
        if let Some(procs) = self.by_test.get_mut(&uid) {
            if let Some(info) = procs.remove(name) {
                if !procs.values().any(|p| p.host == info.host) {
                    if let Some(ts) = self.tests_on.get_mut(&info.host) {
                        ts.remove(&uid);
                    }
                }
            }
            if procs.is_empty() {
                self.by_test.remove(&uid);
            }
        }
        self.bump(&uid);
    }

    fn put_host(&mut self, h: &Host, revision: Revision, deleted: bool) {
        let ready = !deleted && h.status().phase == HostPhase::Ready;
        let old = self.hosts.get(h.name()).copied();
        if old.is_some_and(|(_, r)| r >= revision) {
            return;
        }
        self.hosts.insert(h.name().to_string(), (ready, revision));
        // Lease renewals change nothing a waiter looks at: only a change
        // of readiness wakes the tests on the host.
        if old.map(|(r, _)| r) != Some(ready) {
            let uids: Vec<String> = self.tests_on.get(h.name()).into_iter().flatten().cloned().collect();
            for uid in uids {
                self.bump(&uid);
            }
        }
    }
}

#[derive(Clone)]
pub struct SyncIndex {
    state: Arc<Mutex<State>>,
    /// Set once the first listing is in.
    synced: watch::Receiver<bool>,
}

/// A waiter's view of its test's changes.
pub struct Wakeup(watch::Receiver<u64>);

impl Wakeup {
    /// Resolves at the next change of the test (or a resync).
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            // The index went away (shutdown): never wake again.
            std::future::pending::<()>().await;
        }
    }
}

impl SyncIndex {
    /// Starts the task that feeds the index; it runs until `stop`.
    pub fn start(st: ApiState, stop: tokio_util::sync::CancellationToken) -> (SyncIndex, tokio::task::JoinHandle<()>) {
        let (synced_tx, synced) = watch::channel(false);
        let index = SyncIndex { state: Default::default(), synced };
        let feed = index.clone();
        let task = tokio::spawn(async move {
            let follow = async {
                loop {
                    if let Err(e) = feed.follow(&st, &synced_tx).await {
                        tracing::warn!(error = %e, "sync index: feed failed; listing again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = follow => {}
            }
        });
        (index, task)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Waits until the index has its first listing.
    pub async fn synced(&self) {
        let mut s = self.synced.clone();
        let _ = s.wait_for(|v| *v).await;
    }

    /// The wake-up of test `uid`'s waiters; subscribe before looking at
    /// state, so no change between the look and the wait is missed.
    pub fn subscribe(&self, uid: &str) -> Wakeup {
        let mut st = self.lock();
        let w = st.wake.entry(uid.to_string()).or_insert_with(|| watch::channel(0).0);
        Wakeup(w.subscribe())
    }

    /// The processes of test `uid`.
    pub fn processes(&self, uid: &str) -> Vec<ProcInfo> {
        self.lock().by_test.get(uid).map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Whether host `name` is Ready (as far as the index knows).
    pub fn host_ready(&self, name: &str) -> bool {
        self.lock().hosts.get(name).is_some_and(|(r, _)| *r)
    }

    /// Lists, then follows the feeds until one ends.
    async fn follow(&self, st: &ApiState, synced: &watch::Sender<bool>) -> anyhow::Result<()> {
        // Watches first, then the listing: what changes in between is seen
        // twice, and the revisions keep the newer.
        let mut procs = st.hub.watch(Kind::Process, None, None, Default::default())?;
        let mut hosts = st.hub.watch(Kind::Host, None, None, Default::default())?;
        let rev = st.store.revision().await?;
        let mut keys = st.store.watch("/sync/", rev).await?;
        let (pkvs, _) = st.store.list(&hub::prefix(Kind::Process)).await?;
        let (hkvs, _) = st.store.list(&hub::prefix(Kind::Host)).await?;
        {
            let mut s = self.lock();
            let wake = std::mem::take(&mut s.wake);
            *s = State { wake, ..Default::default() };
            for kv in pkvs.iter().chain(&hkvs) {
                match hub::decode(&kv.key, &kv.value, kv.mod_revision) {
                    Some(Object::Process(p)) => s.put_process(&p, kv.mod_revision),
                    Some(Object::Host(h)) => s.put_host(&h, kv.mod_revision, false),
                    _ => {}
                }
            }
            s.bump_all();
        }
        synced.send_replace(true);
        loop {
            tokio::select! {
                ev = procs.recv() => self.apply(ev.ok_or_else(|| anyhow::anyhow!("process watch dropped"))?),
                ev = hosts.recv() => self.apply(ev.ok_or_else(|| anyhow::anyhow!("host watch dropped"))?),
                ev = keys.next() => {
                    let ev = ev.ok_or_else(|| anyhow::anyhow!("sync key watch ended"))??;
                    // /sync/<test uid>/...
                    if let Some(uid) = ev.kv().key.strip_prefix("/sync/").and_then(|r| r.split('/').next()) {
                        self.lock().bump(uid);
                    }
                }
            }
        }
    }

    fn apply(&self, ev: Arc<HubEvent>) {
        let deleted = ev.kind == EventType::Deleted;
        let mut s = self.lock();
        match &ev.object {
            Object::Process(p) if deleted => s.delete_process(p.name()),
            Object::Process(p) => s.put_process(p, ev.revision),
            Object::Host(h) => s.put_host(h, ev.revision, deleted),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::states::ProcessPhase;
    use testbus_proto::{HostStatus, ObjectMeta, ProcessSpec, ProcessStatus};

    fn process(name: &str, uid: &str, host: &str, phase: &str) -> Process {
        Process {
            metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
            spec: Some(ProcessSpec {
                test_uid: uid.into(),
                host_name: host.into(),
                role: "r".into(),
                ..Default::default()
            }),
            status: Some(ProcessStatus { phase: phase.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn host(name: &str, phase: &str) -> Host {
        Host {
            metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
            status: Some(HostStatus { phase: phase.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_waiters_own_test_wakes_it() {
        let mut s = State::default();
        let a = s.wake.entry("A".into()).or_insert_with(|| watch::channel(0).0).subscribe();
        let b = s.wake.entry("B".into()).or_insert_with(|| watch::channel(0).0).subscribe();
        s.put_process(&process("pa", "A", "h1", ProcessPhase::Running.as_str()), 10);
        s.put_process(&process("pb", "B", "h2", ProcessPhase::Running.as_str()), 11);
        assert_eq!((*a.borrow(), *b.borrow()), (1, 1));
        // Another test's process: B is not woken.
        s.put_process(&process("pa", "A", "h1", ProcessPhase::Failed.as_str()), 12);
        assert_eq!((*a.borrow(), *b.borrow()), (2, 1));
        // An older event changes nothing.
        s.put_process(&process("pa", "A", "h1", ProcessPhase::Running.as_str()), 11);
        assert_eq!(s.by_test["A"]["pa"].phase, ProcessPhase::Failed);
        // A lease renewal (same readiness) wakes no one; h2 going down wakes B.
        s.put_host(&host("h2", HostPhase::Ready.as_str()), 20, false);
        let before = *b.borrow();
        s.put_host(&host("h2", HostPhase::Ready.as_str()), 21, false);
        assert_eq!(*b.borrow(), before);
        s.put_host(&host("h2", HostPhase::NotReady.as_str()), 22, false);
        assert_eq!((*a.borrow(), *b.borrow()), (2, before + 1));
        // Deleting the last process forgets the test.
        s.delete_process("pb");
        assert!(!s.by_test.contains_key("B") && !s.tests_on["h2"].contains("B"));
        // A test without waiters keeps no wake-up.
        drop(a);
        s.bump("A");
        assert!(!s.wake.contains_key("A"));
    }
}
