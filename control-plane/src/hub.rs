//! Watch fan-out from one cache.
//!
//! The hub owns the only watch on the store. Each store event is decoded
//! once and offered to the watchers that can want it: those watching the
//! whole kind, and those indexed by the object's index value (Processes by
//! host), so an agent's watch costs O(its own events), not O(all events).
//! The last `capacity` events are kept in a ring so that a watch from a
//! recent revision is served without touching the store; an older revision
//! gets `Compacted` and the client lists again.
//!
//! Ownership: the follower task (`follow`) is the single writer of the ring
//! and the only task that sends into watcher channels; it holds the hub
//! weakly and ends when the hub is dropped (a drop guard the hub owns). A watcher that cannot keep up (its
//! channel is full) is dropped; its stream then ends with `Compacted`.
use crate::store::{Event, Revision, Store, StoreError};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use testbus_client::EventType;
use testbus_proto::selector::{FieldSelector, LabelSelector};
use testbus_proto::{Host, Kind, Object, Process, Resource, Test};
use tokio::sync::mpsc;

pub const REGISTRY_PREFIX: &str = "/registry/";

/// One decoded store event.
#[derive(Debug)]
pub struct HubEvent {
    pub kind: EventType,
    pub object: Object,
    pub revision: Revision,
}

/// What a watcher wants besides its kind.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, o: &Object) -> bool {
        self.labels.matches(&o.meta().labels) && self.fields.matches(o)
    }
}

struct Watcher {
    tx: mpsc::Sender<Arc<HubEvent>>,
    filter: Filter,
    /// Events at or below this revision were already delivered (or listed).
    after: Revision,
}

#[derive(Default)]
struct State {
    revision: Revision,
    /// History is complete for revisions > floor.
    floor: Revision,
    ring: VecDeque<Arc<HubEvent>>,
    /// The stored size of each event in `ring`, in step with it, and their
    /// sum: the ring is bounded by bytes too (a burst of large objects
    /// would otherwise keep hundreds of MB decoded long after).
    ring_sizes: VecDeque<usize>,
    ring_bytes: usize,
    next_id: u64,
    by_kind: HashMap<Kind, HashMap<u64, Watcher>>,
    by_index: HashMap<(Kind, String), HashMap<u64, Watcher>>,
}

/// The watch cache's ring holds at most this many bytes of stored objects
/// (besides at most `capacity` events): a watcher further behind relists.
/// Decoded, they take about eight times as much: at 8 MiB, the ring was
/// 65 MiB of the 221 MiB a control plane kept after 5,000 tests were made
/// and deleted (`hack/bench queue`); at 2 MiB it holds about two thousand
/// events of a test's size.
pub const MAX_RING_BYTES: usize = 2 << 20;

pub struct Hub {
    state: Mutex<State>,
    capacity: usize,
    /// Ends the task that follows the store when the hub is dropped (the
    /// task holds the hub only weakly)...
    _follower: tokio_util::sync::DropGuard,
    /// ...or when `stop` is called, which also joins it.
    stop: tokio_util::sync::CancellationToken,
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("resource version {requested} is older than the watch cache (oldest: {floor}); list again")]
pub struct TooOld {
    pub requested: Revision,
    pub floor: Revision,
}

/// Where a watcher is registered.
enum Slot {
    Kind(Kind),
    Index(Kind, String),
}

/// One watcher's events. The hub keeps the watcher exactly as long as this
/// lives: dropping it (a client that cancelled its watch, a log follower
/// that ended) unregisters it at once, whether or not an event for it ever
/// comes. The stream ends when the hub dropped the watcher (too slow, or
/// the hub restarted).
pub struct Subscription {
    rx: mpsc::Receiver<Arc<HubEvent>>,
    hub: std::sync::Weak<Hub>,
    id: u64,
    slot: Slot,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Arc<HubEvent>> {
        self.rx.recv().await
    }
}

impl futures::Stream for Subscription {
    type Item = Arc<HubEvent>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.unregister(self.id, &self.slot);
        }
    }
}

/// Key of an object in the store.
pub fn key(kind: Kind, name: &str) -> String {
    format!("{REGISTRY_PREFIX}{}/{name}", kind.plural())
}

pub fn prefix(kind: Kind) -> String {
    format!("{REGISTRY_PREFIX}{}/", kind.plural())
}

/// Decodes a stored value of the kind its key names, with resourceVersion
/// set from the store revision.
pub fn decode(key: &str, value: &[u8], revision: Revision) -> Option<Object> {
    let rest = key.strip_prefix(REGISTRY_PREFIX)?;
    let plural = rest.split('/').next()?;
    let kind = Kind::ALL.into_iter().find(|k| k.plural() == plural)?;
    let obj = match kind {
        Kind::Host => Object::Host(Host::from_stored(value, revision).ok()?),
        Kind::Test => Object::Test(Test::from_stored(value, revision).ok()?),
        Kind::Process => Object::Process(Process::from_stored(value, revision).ok()?),
        Kind::HostPool => Object::HostPool(testbus_proto::HostPool::from_stored(value, revision).ok()?),
    };
    Some(obj)
}

fn index_of(o: &Object) -> Option<(Kind, String)> {
    match o {
        Object::Process(p) => p.index_value().map(|h| (Kind::Process, h.to_string())),
        _ => None,
    }
}

/// Dispatches store events after `from`, until the hub is dropped (`stop`
/// is its drop guard's token; the hub is held weakly in between events).
///
/// When the store watch breaks (a connection lost, an etcd member without
/// a leader, a lagging embedded watcher), following resumes after the last
/// revision dispatched: every event is dispatched once, in order, and the
/// watchers keep their place. Only when the store no longer has that
/// history (compacted) does the hub restart from the current revision,
/// dropping its watchers so that their clients list again. (It used to
/// watch again from the revision it had *started* at after a failed
/// restart, replaying every event since to its watchers a second time and
/// out of order, so that caches went back to old states.)
async fn follow(
    hub: std::sync::Weak<Hub>,
    store: Arc<dyn Store>,
    mut from: Revision,
    stop: tokio_util::sync::CancellationToken,
) {
    let follow = async {
        let mut backoff = RESUME_BACKOFF_MIN;
        loop {
            match store.watch(REGISTRY_PREFIX, from).await {
                Ok(mut stream) => {
                    while let Some(ev) = stream.next().await {
                        let Some(hub) = hub.upgrade() else { return };
                        match ev {
                            Ok(ev) => {
                                from = from.max(ev.revision());
                                backoff = RESUME_BACKOFF_MIN;
                                hub.dispatch(ev);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, after = from, "hub: store watch broke; resuming");
                                break;
                            }
                        }
                    }
                }
                Err(StoreError::Compacted { .. }) => match store.revision().await {
                    Ok(rev) => {
                        tracing::warn!(
                            after = from,
                            now = rev,
                            "hub: the store's history after the last event seen is gone; every watcher lists again"
                        );
                        let Some(hub) = hub.upgrade() else { return };
                        hub.restart_at(rev);
                        from = rev;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "hub: cannot read the store revision"),
                },
                Err(e) => tracing::warn!(error = %e, after = from, "hub: store watch failed; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RESUME_BACKOFF_MAX);
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = follow => {}
    }
}

/// How soon the hub watches the store again after its watch broke, at
/// first and at most (doubling in between).
const RESUME_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const RESUME_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl Hub {
    /// Reads the store's current revision, then follows the store in the
    /// background. Watches may be registered as soon as this returns.
    pub async fn start(capacity: usize, store: Arc<dyn Store>) -> Result<Arc<Hub>, StoreError> {
        let rev = store.revision().await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let hub = Arc::new(Hub {
            state: Mutex::new(State { revision: rev, floor: rev, ..Default::default() }),
            capacity: capacity.max(16),
            _follower: stop.clone().drop_guard(),
            stop: stop.clone(),
            follower: Mutex::new(None),
        });
        let task = tokio::spawn(follow(Arc::downgrade(&hub), store, rev, stop));
        *hub.follower.lock() = Some(task);
        Ok(hub)
    }

    /// Stops following the store and waits until the follower (and its
    /// hold on the store) is gone. Watchers get no more events.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.follower.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// After the store lost the history the hub had not seen yet: the ring
    /// no longer joins up with the store, so every watcher is dropped (its
    /// client relists) and the hub starts again from `rev`.
    fn restart_at(&self, rev: Revision) {
        let mut st = self.lock();
        st.ring.clear();
        st.ring_sizes.clear();
        st.ring_bytes = 0;
        st.by_kind.clear();
        st.by_index.clear();
        st.revision = rev;
        st.floor = rev;
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module;
        // recover the state rather than poisoning every watch.
        self.state.lock()
    }

    fn dispatch(&self, ev: Event) {
        let (kind, kv) = match &ev {
            Event::Put(kv) if kv.create_revision == kv.mod_revision => (EventType::Added, kv),
            Event::Put(kv) => (EventType::Modified, kv),
            Event::Delete(kv) => (EventType::Deleted, kv),
        };
        let Some(object) = decode(&kv.key, &kv.value, kv.mod_revision) else {
            tracing::warn!(key = %kv.key, "hub: undecodable object skipped");
            return;
        };
        let hev = Arc::new(HubEvent { kind, object, revision: kv.mod_revision });
        let mut st = self.lock();
        st.revision = st.revision.max(hev.revision);
        st.ring.push_back(hev.clone());
        let size = kv.key.len() + kv.value.len();
        st.ring_sizes.push_back(size);
        st.ring_bytes += size;
        while st.ring.len() > self.capacity || (st.ring_bytes > MAX_RING_BYTES && st.ring.len() > 1) {
            if let Some(old) = st.ring.pop_front() {
                st.floor = st.floor.max(old.revision);
            }
            let gone = st.ring_sizes.pop_front().unwrap_or(0);
            st.ring_bytes -= gone;
        }
        let okind = hev.object.kind();
        let deliver = |ws: &mut HashMap<u64, Watcher>| {
            ws.retain(|_, w| {
                if hev.revision <= w.after || !w.filter.matches(&hev.object) {
                    return true;
                }
                // Full or closed: drop the watcher; its client relists.
                w.tx.try_send(hev.clone()).is_ok()
            });
        };
        if let Some(ws) = st.by_kind.get_mut(&okind) {
            deliver(ws);
        }
        if let Some(ix) = index_of(&hev.object) {
            if let Some(ws) = st.by_index.get_mut(&ix) {
                deliver(ws);
                if ws.is_empty() {
                    st.by_index.remove(&ix);
                }
            }
        }
    }

    /// Registers a watcher of `kind` for events after `after` (None: from
    /// now). With `index`, only objects with that index value are offered.
    pub fn watch(
        self: &Arc<Self>,
        kind: Kind,
        after: Option<Revision>,
        index: Option<String>,
        filter: Filter,
    ) -> Result<Subscription, TooOld> {
        let mut st = self.lock();
        let after = after.unwrap_or(st.revision);
        if after < st.floor {
            return Err(TooOld { requested: after, floor: st.floor });
        }
        let backlog: Vec<Arc<HubEvent>> = st
            .ring
            .iter()
            .filter(|e| {
                e.revision > after
                    && e.object.kind() == kind
                    && index.as_ref().is_none_or(|ix| index_of(&e.object).is_some_and(|(_, v)| &v == ix))
                    && filter.matches(&e.object)
            })
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(backlog.len() + 1024);
        for e in backlog {
            let _ = tx.try_send(e);
        }
        let id = st.next_id;
        st.next_id += 1;
        let w = Watcher { tx, filter, after };
        let slot = match index {
            Some(ix) => {
                st.by_index.entry((kind, ix.clone())).or_default().insert(id, w);
                Slot::Index(kind, ix)
            }
            None => {
                st.by_kind.entry(kind).or_default().insert(id, w);
                Slot::Kind(kind)
            }
        };
        Ok(Subscription { rx, hub: Arc::downgrade(self), id, slot })
    }

    /// Forgets watcher `id` (its subscription was dropped).
    fn unregister(&self, id: u64, slot: &Slot) {
        let mut st = self.lock();
        match slot {
            Slot::Kind(k) => {
                if let Some(ws) = st.by_kind.get_mut(k) {
                    ws.remove(&id);
                }
            }
            Slot::Index(k, ix) => {
                let key = (*k, ix.clone());
                if let Some(ws) = st.by_index.get_mut(&key) {
                    ws.remove(&id);
                    if ws.is_empty() {
                        st.by_index.remove(&key);
                    }
                }
            }
        }
    }

    /// The newest store revision the hub has seen.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// Number of registered watchers (for tests and metrics).
    pub fn watchers(&self) -> usize {
        let st = self.lock();
        st.by_kind.values().map(HashMap::len).sum::<usize>() + st.by_index.values().map(HashMap::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Op, Store};
    use testbus_proto::Resource;

    /// A store whose watch streams end with an error when told to, and
    /// whose revision can be made unreadable (a partitioned etcd member).
    struct BreakingStore {
        inner: Arc<dyn Store>,
        /// Each bump ends every watch stream made before it.
        breaks: tokio::sync::watch::Sender<u64>,
        revision_fails: std::sync::atomic::AtomicBool,
        watched_after: Mutex<Vec<Revision>>,
    }

    #[tonic::async_trait]
    impl Store for BreakingStore {
        async fn get(&self, key: &str) -> Result<Option<crate::store::KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<crate::store::KeyValue>, Revision), StoreError> {
            self.inner.list(prefix).await
        }
        async fn txn(
            &self,
            compares: Vec<crate::store::Compare>,
            ops: Vec<Op>,
        ) -> Result<crate::store::TxnOutcome, StoreError> {
            self.inner.txn(compares, ops).await
        }
        async fn watch(&self, prefix: &str, after: Revision) -> Result<crate::store::EventStream, StoreError> {
            self.watched_after.lock().push(after);
            let mut breaks = self.breaks.subscribe();
            breaks.mark_unchanged();
            let inner = self.inner.watch(prefix, after).await?;
            let cut = futures::stream::once(async move {
                let _ = breaks.changed().await;
                Err(StoreError::Backend("etcdserver: no leader".into()))
            });
            let events = futures::stream::select(inner, cut).scan(false, |ended, ev| {
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = ev.is_err();
                futures::future::ready(Some(ev))
            });
            Ok(events.boxed())
        }
        async fn revision(&self) -> Result<Revision, StoreError> {
            if self.revision_fails.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Backend("timeout expired".into()));
            }
            self.inner.revision().await
        }
    }

    async fn put_test(store: &dyn Store, name: &str) -> Revision {
        let mut t = testbus_proto::Test::default();
        t.meta_mut().name = name.into();
        store.txn(vec![], vec![Op::Put(key(Kind::Test, name), t.to_stored())]).await.unwrap().revision
    }

    /// Chaos found a test whose processes were never all started: a
    /// replica's hub, after its etcd watch broke and it could not read the
    /// store's revision, watched again from the revision it had started
    /// at, and sent every event since to its watchers a second time, old
    /// states after new ones. Now a broken watch resumes after the last
    /// event dispatched, whatever else fails: each event reaches a watcher
    /// once and in order, and the watcher keeps its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_store_watch_resumes_after_the_last_event_dispatched() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb"), 100_000).unwrap());
        let store = Arc::new(BreakingStore {
            inner,
            breaks: tokio::sync::watch::channel(0).0,
            revision_fails: false.into(),
            watched_after: Mutex::new(Vec::new()),
        });
        let hub = Hub::start(1000, store.clone()).await.unwrap();
        let mut sub = hub.watch(Kind::Test, None, None, Filter::default()).unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut seen = Vec::new();
        let mut expect = Vec::new();
        for round in 0..4 {
            for i in 0..5 {
                let name = format!("t{round}-{i}");
                put_test(store.as_ref(), &name).await;
                expect.push(name);
            }
            while seen.len() < expect.len() {
                let ev = tokio::time::timeout_at(deadline, sub.recv()).await.expect("events stopped coming");
                let ev = ev.expect("the watcher was dropped: its client would have relisted");
                seen.push(ev.object.meta().name.clone());
            }
            // The watch breaks; on odd rounds the revision is unreadable too.
            store.revision_fails.store(round % 2 == 1, std::sync::atomic::Ordering::SeqCst);
            let watches = store.watched_after.lock().len();
            store.breaks.send_modify(|g| *g += 1);
            while store.watched_after.lock().len() == watches {
                assert!(tokio::time::Instant::now() < deadline, "the hub never watched again");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        assert_eq!(seen, expect, "each event once, in order");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), sub.recv()).await.is_err(),
            "nothing more was sent"
        );
        let after = store.watched_after.lock().clone();
        assert!(after.windows(2).all(|w| w[0] < w[1]), "each watch resumed after the last event: {after:?}");
        hub.stop().await;
    }

    /// A burst of large objects leaves the ring at most MAX_RING_BYTES of
    /// them: the oldest go (a watcher that far behind relists), and memory
    /// is given back rather than held until 100,000 more events come.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ring_is_bounded_by_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::embedded::EmbeddedStore::open_with_reserve(&dir.path().join("s.redb"), 100_000, 0).unwrap(),
        );
        let hub = Hub::start(100_000, store.clone()).await.unwrap();
        let big = "x".repeat(MAX_RING_BYTES / 32);
        let mut last = 0;
        for i in 0..64 {
            let mut t = testbus_proto::Test::default();
            t.meta_mut().name = format!("t{i}");
            t.meta_mut().annotations.insert("big".into(), big.clone());
            let out = store.txn(vec![], vec![Op::Put(key(Kind::Test, &format!("t{i}")), t.to_stored())]).await.unwrap();
            last = out.revision;
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while hub.revision() < last {
            assert!(tokio::time::Instant::now() < deadline, "the hub never caught up");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        {
            let st = hub.lock();
            assert!(st.ring_bytes <= MAX_RING_BYTES, "{} bytes kept", st.ring_bytes);
            assert!(st.ring.len() < 64 && st.ring.len() >= 16, "{} events kept", st.ring.len());
            assert_eq!(st.ring_sizes.iter().sum::<usize>(), st.ring_bytes);
            assert!(st.floor > 0, "a watch from before the oldest kept event relists");
        }
        hub.stop().await;
    }
}
