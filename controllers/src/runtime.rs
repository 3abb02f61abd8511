//! The controller runtime: `watcher → cache → queue → reconcile(name) →
//! Action`, as kube-runtime does it.
//!
//! - A [`Cache`] is fed by one [`watcher`] stream and holds the latest
//!   object of each name. Reconcilers read current state from caches, never
//!   from the event that woke them.
//! - The [`Queue`] holds names. A name is never handed out twice at once:
//!   if it is added while being reconciled, it is queued again when the
//!   running reconcile is done. Delayed requeues collapse into the earliest.
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use testbus_client::{watcher, Api, ApiResource, WatcherEvent};
use testbus_proto::states::{ConditionStatus, ConditionType};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the object (or something it depends on) changes.
    AwaitChange,
    /// Reconcile again after this long, even without a change.
    Requeue(Duration),
}

/// The latest object of each name, from a watch.
pub struct Cache<K> {
    objects: RwLock<HashMap<String, Arc<K>>>,
    synced: Notify,
    is_synced: std::sync::atomic::AtomicBool,
    /// Its reflector has ended: it will never sync now.
    closed: std::sync::atomic::AtomicBool,
}

/// A cache whose reflector ended before its first listing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {0} watch ended before the cache was synced")]
pub struct NeverSynced(pub &'static str);

/// A change seen by a cache: the previous and the new object (None when
/// absent). A relist reports every object that changed.
pub type Change<K> = (Option<Arc<K>>, Option<Arc<K>>);

impl<K: ApiResource> Cache<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(Cache {
            objects: RwLock::new(HashMap::new()),
            synced: Notify::new(),
            is_synced: false.into(),
            closed: false.into(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<K>> {
        self.objects.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<K>> {
        self.objects.read().values().cloned().collect()
    }

    pub fn filter(&self, f: impl Fn(&K) -> bool) -> Vec<Arc<K>> {
        self.objects.read().values().filter(|o| f(o)).cloned().collect()
    }

    /// Waits for the first complete listing; an error if the reflector
    /// ended first (stopped, or its watch gave up).
    pub async fn wait_synced(&self) -> Result<(), NeverSynced> {
        loop {
            let n = self.synced.notified();
            if self.is_synced.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(());
            }
            if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(NeverSynced(std::any::type_name::<K>().rsplit("::").next().unwrap_or("object")));
            }
            n.await;
        }
    }

    /// The reflector is done: waiters are told.
    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        self.synced.notify_waiters();
    }

    /// Applies one watcher event and returns the changes it made.
    fn apply(&self, ev: WatcherEvent<K>) -> Vec<Change<K>> {
        let mut map = self.objects.write();
        let mut changes = Vec::new();
        match ev {
            WatcherEvent::Restarted(items) => {
                let mut fresh: HashMap<String, Arc<K>> =
                    items.into_iter().map(|o| (o.name().to_string(), Arc::new(o))).collect();
                for (name, old) in map.drain() {
                    match fresh.get(&name) {
                        Some(new) if new.resource_version() == old.resource_version() => {}
                        Some(new) => changes.push((Some(old), Some(new.clone()))),
                        None => changes.push((Some(old), None)),
                    }
                }
                for (name, new) in &fresh {
                    if !changes.iter().any(|(o, n)| {
                        o.as_ref().is_some_and(|o| o.name() == name) || n.as_ref().is_some_and(|n| n.name() == name)
                    }) {
                        changes.push((None, Some(new.clone())));
                    }
                }
                *map = std::mem::take(&mut fresh);
                drop(map);
                self.is_synced.store(true, std::sync::atomic::Ordering::Release);
                self.synced.notify_waiters();
            }
            WatcherEvent::Applied(o) => {
                let new = Arc::new(o);
                let old = map.insert(new.name().to_string(), new.clone());
                changes.push((old, Some(new)));
            }
            WatcherEvent::Deleted(o) => {
                let old = map.remove(o.name());
                changes.push((old.or_else(|| Some(Arc::new(o))), None));
            }
        }
        changes
    }
}

/// Feeds `cache` from a watch and calls `on_change` for every change, until
/// `stop` is cancelled (or the watch ends). The cache is closed when it
/// returns, so nobody waits for it to sync forever.
pub async fn reflect<K: ApiResource>(
    api: Api<K>,
    cache: Arc<Cache<K>>,
    mut on_change: impl FnMut(&Change<K>) + Send,
    stop: CancellationToken,
) {
    let stream = watcher(api, String::new(), String::new());
    futures::pin_mut!(stream);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            ev = stream.next() => match ev {
                Some(ev) => for c in cache.apply(ev) { on_change(&c) },
                None => break,
            }
        }
    }
    cache.close();
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    delayed: BTreeMap<(Instant, u64), String>,
    due: HashMap<String, Instant>,
    seq: u64,
    active: HashSet<String>,
    again: HashSet<String>,
}

/// Names waiting to be reconciled.
#[derive(Default)]
pub struct Queue {
    st: Mutex<QueueState>,
    wake: Notify,
}

impl Queue {
    pub fn new() -> Arc<Self> {
        Arc::new(Queue::default())
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, QueueState> {
        self.st.lock()
    }

    pub fn add(&self, name: &str) {
        let mut st = self.lock();
        if st.active.contains(name) {
            st.again.insert(name.to_string());
        } else if st.queued.insert(name.to_string()) {
            st.ready.push_back(name.to_string());
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Queues `name` after `delay`, unless it is due earlier already.
    pub fn add_after(&self, name: &str, delay: Duration) {
        let at = Instant::now() + delay;
        let mut st = self.lock();
        if let Some(&cur) = st.due.get(name) {
            if cur <= at {
                return;
            }
            st.delayed.retain(|_, n| n != name);
        }
        st.seq += 1;
        let seq = st.seq;
        st.delayed.insert((at, seq), name.to_string());
        st.due.insert(name.to_string(), at);
        drop(st);
        self.wake.notify_one();
    }

    /// The next name to reconcile; it is active until [`Queue::done`].
    pub async fn next(&self) -> String {
        loop {
            let wake = self.wake.notified();
            let sleep_until = {
                let mut st = self.lock();
                let now = Instant::now();
                while let Some(entry) = st.delayed.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let name = entry.remove();
                    st.due.remove(&name);
                    if st.active.contains(&name) {
                        st.again.insert(name);
                    } else if st.queued.insert(name.clone()) {
                        st.ready.push_back(name);
                    }
                }
                if let Some(name) = st.ready.pop_front() {
                    st.queued.remove(&name);
                    st.active.insert(name.clone());
                    return name;
                }
                st.delayed.keys().next().map(|k| k.0)
            };
            match sleep_until {
                Some(t) => {
                    tokio::select! {
                        _ = wake => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => wake.await,
            }
        }
    }

    pub fn done(&self, name: &str) {
        let again = {
            let mut st = self.lock();
            st.active.remove(name);
            st.again.remove(name)
        };
        if again {
            self.add(name);
        }
    }
}

/// Runs `reconcile` for queued names until shutdown. Errors are logged and
/// retried with a per-name exponential backoff.
/// What a worker tells its controller about an object whose reconcile
/// keeps failing, so the object itself can say so (a stuck object must say
/// why in its conditions, not only in a log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    /// The reconcile failed `count` times in a row, the last time with
    /// `error`. Sent at the 3rd failure and every 50th after.
    Failing { error: String, count: u32 },
    /// It succeeded again after having been reported failing.
    Recovered { after: u32 },
}

/// The condition an object's `Trouble` is written as: `Reconciled`, False
/// with reason `ReconcileFailed` while it keeps failing, True again once
/// it recovered.
pub fn trouble_condition(trouble: &Trouble) -> testbus_proto::Condition {
    let (status, reason, message) = match trouble {
        Trouble::Failing { error, count } => (
            ConditionStatus::False,
            "ReconcileFailed",
            format!("the controller failed {count} times in a row: {error}"),
        ),
        Trouble::Recovered { after } => {
            (ConditionStatus::True, "Recovered", format!("reconciled again after {after} failures"))
        }
    };
    testbus_proto::Condition::new(ConditionType::Reconciled, status, reason, message)
}

/// Writes `trouble` on object `name` as its `Reconciled` condition
/// (`conditions` finds its list). A write that fails is logged: the object
/// may be what cannot be written.
pub async fn report_trouble<K: testbus_client::ApiResource>(
    api: testbus_client::Api<K>,
    name: &str,
    trouble: Trouble,
    conditions: fn(&mut K) -> &mut Vec<testbus_proto::Condition>,
) {
    let c = trouble_condition(&trouble);
    let r = api
        .patch_status(name, |o| {
            let conds = conditions(o);
            conds.retain(|x| x.r#type != c.r#type);
            conds.push(c.clone());
            true
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(%name, error = %e, "cannot write the Reconciled condition");
    }
}

/// Failures in a row before the object is told.
pub const REPORT_AFTER: u32 = 3;

/// Whether the `n`th failure in a row is reported on the object.
fn reported(n: u32) -> bool {
    n == REPORT_AFTER || (n > REPORT_AFTER && n.is_multiple_of(50))
}

/// Whether the `n`th failure in a row is logged at warn (the rest at
/// debug): the first ones, then ever more rarely.
/// Whether the `n`th failure in a row is a warning (else debug): the first
/// few and then ever more rarely; a routine one (a lost compare-and-swap)
/// only once it keeps happening.
fn warned(n: u32, routine: bool) -> bool {
    if routine {
        n > REPORT_AFTER && n.is_power_of_two()
    } else {
        n <= REPORT_AFTER || n.is_power_of_two()
    }
}

/// A reconcile's error, as the worker logs it.
pub trait ReconcileError: std::fmt::Display {
    /// Part of the normal course of things: a write that lost a
    /// compare-and-swap to another (it is read again and retried), worth
    /// no warning the first times.
    fn routine(&self) -> bool {
        false
    }
}

impl ReconcileError for &str {}
impl ReconcileError for String {}

pub async fn run_worker<F, Fut, E, R, RFut>(queue: Arc<Queue>, mut reconcile: F, mut report: R, stop: CancellationToken)
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Action, E>>,
    E: ReconcileError,
    R: FnMut(String, Trouble) -> RFut,
    RFut: std::future::Future<Output = ()>,
{
    let mut failures: HashMap<String, u32> = HashMap::new();
    loop {
        let name = tokio::select! {
            // Biased: a worker started after the stop never takes a name.
            biased;
            _ = stop.cancelled() => return,
            n = queue.next() => n,
        };
        let result = reconcile(name.clone()).await;
        match result {
            Ok(action) => {
                if let Some(n) = failures.remove(&name).filter(|&n| n >= REPORT_AFTER) {
                    tracing::info!(%name, after = n, "reconcile succeeds again");
                    report(name.clone(), Trouble::Recovered { after: n }).await;
                }
                if let Action::Requeue(d) = action {
                    queue.add_after(&name, d);
                }
            }
            Err(e) => {
                let n = failures.entry(name.clone()).or_insert(0);
                *n += 1;
                let n = *n;
                let delay = Duration::from_millis(20u64 << n.min(8)).min(Duration::from_secs(5));
                if warned(n, e.routine()) {
                    tracing::warn!(%name, error = %e, failures = n, retry_in = ?delay, "reconcile failed");
                } else {
                    tracing::debug!(%name, error = %e, failures = n, retry_in = ?delay, "reconcile failed");
                }
                if reported(n) {
                    report(name.clone(), Trouble::Failing { error: e.to_string(), count: n }).await;
                }
                queue.add_after(&name, delay);
            }
        }
        queue.done(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routine compare-and-swap conflicts were WARN lines in every run.
    #[test]
    fn routine_conflicts_warn_only_when_they_keep_happening() {
        let warns = |routine| (1..=16).filter(|&n| warned(n, routine)).collect::<Vec<u32>>();
        assert_eq!(warns(false), [1, 2, 3, 4, 8, 16]);
        assert_eq!(warns(true), [4, 8, 16]);
        use crate::error::Error;
        assert!(
            Error::from(tonic::Status::aborted("conflict")).routine()
                && !Error::from(tonic::Status::internal("disk")).routine()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_that_keeps_failing_is_told_and_told_again_when_it_recovers() {
        let q = Queue::new();
        let stop = CancellationToken::new();
        let reports = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (r, a) = (reports.clone(), attempts.clone());
        let worker = tokio::spawn(run_worker(
            q.clone(),
            move |_name| {
                let a = a.clone();
                async move {
                    // Fails four times, then succeeds.
                    match a.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                        0..4 => Err("status too large"),
                        _ => Ok(Action::AwaitChange),
                    }
                }
            },
            move |name, trouble| {
                r.lock().push((name, trouble));
                async {}
            },
            stop.clone(),
        ));
        q.add("t");
        while attempts.load(std::sync::atomic::Ordering::SeqCst) < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.cancel();
        worker.await.unwrap();
        assert_eq!(
            *reports.lock(),
            vec![
                ("t".to_string(), Trouble::Failing { error: "status too large".into(), count: 3 }),
                ("t".to_string(), Trouble::Recovered { after: 4 }),
            ]
        );
        assert!(reported(3) && !reported(4) && reported(50) && !reported(51));
    }

    /// With a broadcast stop, a worker subscribed after the stop was sent
    /// never saw it. A cancelled token is seen by every worker, whenever it
    /// starts.
    #[tokio::test(start_paused = true)]
    async fn a_worker_started_after_the_stop_stops_at_once() {
        let q = Queue::new();
        q.add("t");
        let stop = CancellationToken::new();
        stop.cancel();
        let reconciled = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let r = reconciled.clone();
        let worker = run_worker(
            q,
            move |_| {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, String>(Action::AwaitChange) }
            },
            |_, _| async {},
            stop.child_token(),
        );
        tokio::time::timeout(Duration::from_secs(1), worker).await.expect("the worker stopped");
        assert_eq!(reconciled.load(std::sync::atomic::Ordering::SeqCst), 0, "it took a name after the stop");
    }

    /// A cache whose watch ends before it synced used to leave its waiters
    /// waiting forever; they now get an error.
    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_cache_that_will_never_sync_is_an_error() {
        let cache: Arc<Cache<testbus_proto::Host>> = Cache::new();
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.wait_synced().await }
        });
        let api = testbus_client::Client::lazy("unix:/nonexistent/testbus.sock").unwrap().api();
        let stop = CancellationToken::new();
        let reflector = tokio::spawn(reflect(api, cache.clone(), |_| {}, stop.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "not synced, not yet closed");
        stop.cancel();
        reflector.await.unwrap();
        assert_eq!(waiter.await.unwrap(), Err(NeverSynced("Host")));
        assert_eq!(cache.wait_synced().await, Err(NeverSynced("Host")), "and for whoever asks later");
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_never_handed_out_twice_at_once() {
        let q = Queue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.next().await, "a");
        // Added again while active: held back until done.
        q.add("a");
        assert_eq!(q.next().await, "b");
        let pending = tokio::time::timeout(Duration::from_secs(1), q.next()).await;
        assert!(pending.is_err(), "a must wait while active");
        q.done("a");
        assert_eq!(q.next().await, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_requeues_collapse_to_the_earliest() {
        let q = Queue::new();
        q.add_after("a", Duration::from_secs(10));
        q.add_after("a", Duration::from_secs(2));
        q.add_after("a", Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(q.next().await, "a");
        assert_eq!(start.elapsed().as_secs(), 2);
        q.done("a");
        assert!(tokio::time::timeout(Duration::from_secs(60), q.next()).await.is_err(), "no duplicate");
    }
}
