//! The gRPC resource services. All verbs live once, in [`ResourceService`],
//! generic over the kind; the macro at the bottom binds them to each
//! generated service trait. Kind-specific rules are in [`Policy`].
use crate::authz::{Scope, Verb};
use crate::hub::{self, Filter, HubEvent};
use crate::state::ApiState;
use crate::store::{Compare, Op, StoreError};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use testbus_client::{EventType, WatchEvent};
use testbus_proto::selector::{FieldSelector, LabelSelector};
use testbus_proto::states::{HostPhase, ProcessPhase, TestPhase};
use testbus_proto::validate::Validate;
use testbus_proto::{
    phase, ClaimRequest, DeleteRequest, FinishRequest, GetRequest, Host, HostClaim, HostEvent, HostList, HostPool,
    HostPoolEvent, HostPoolList, Kind, ListRequest, Object, Process, ProcessEvent, ProcessList, RecordResultRequest,
    RenewLeaseRequest, Resource, SetEnvRequest, Test, TestEvent, TestList, WatchRequest,
};
use tonic::{Request, Response, Status};

mod exec;
mod rerun;

/// Finalizer the server puts on every Test: the test controller removes it
pub use testbus_proto::TEST_FINALIZER;

fn store_err(e: StoreError) -> Status {
    crate::error::ApiError::from(e).into()
}

/// How a lease renewal by an agent that lost its host to another begins.
pub const TAKEN_OVER: &str = "taken over";

/// Kind-specific rules.
pub trait Policy: Resource + Validate {
    fn from_object(o: &Object) -> Option<&Self>;
    /// Server-side defaults on create.
    fn on_create(&mut self) {}
    /// May the spec change from `old` to `new`?
    fn check_update(_old: &Self, _new: &Self) -> Result<(), Status> {
        Ok(())
    }
    /// May the status go from `old`'s to `new`'s? Only transitions the
    /// controllers and agents could make are taken: `UpdateStatus` is no
    /// back door around the claim or the lifecycle.
    fn check_status_update(_old: &Self, _new: &Self) -> Result<(), Status> {
        Ok(())
    }
    /// Does the change from `old` to `new` take away a finalizer that only
    /// its controller may remove (checked against the store by the caller)?
    fn drops_guarded_finalizer(_old: &Self, _new: &Self) -> bool {
        false
    }
    /// The file references in the spec, with their field paths.
    fn file_refs(&self) -> Vec<(String, &testbus_proto::FileRef)> {
        Vec::new()
    }
    /// A status write went through: what it counts in the metrics.
    fn status_written(_old: &Self, _new: &Self, _m: &crate::metrics::Metrics) {}
    /// Whether a caller admitted with `scope` may `verb` this object (as
    /// stored); the rules are `authz`'s.
    fn in_scope(&self, scope: &Scope, verb: Verb) -> Result<(), Status> {
        scope.host(verb, "") // an agent touches no object of other kinds
    }
    /// What an agent (`scope`) may put in an object it creates, besides
    /// [`Policy::in_scope`]: metadata of its own only.
    fn agent_create(&mut self, scope: &Scope) -> Result<(), Status> {
        let what = format!("{} {:?}", Self::KIND, self.name());
        scope.created_metadata(|| what.clone(), self.meta_mut())
    }
    /// What of the status an agent (`scope`) may change, besides
    /// [`Policy::check_status_update`]: all of it, unless the kind says.
    fn agent_status(_scope: &Scope, _old: &Self, _new: &Self) -> Result<(), Status> {
        Ok(())
    }
}

/// An agent's write of `field` refused: the controllers own it.
fn not_the_agents(scope: &Scope, field: &str, what: String) -> Status {
    crate::error::ApiError::PermissionDenied(format!(
        "agent {:?} may not write {field} of {what}: the controllers and the claim write it, agents do not",
        scope.agent_host().unwrap_or_default()
    ))
    .into()
}

impl Policy for Host {
    fn from_object(o: &Object) -> Option<&Self> {
        match o {
            Object::Host(h) => Some(h),
            _ => None,
        }
    }
    fn in_scope(&self, scope: &Scope, verb: Verb) -> Result<(), Status> {
        scope.host(verb, self.name())
    }
    /// An agent registers its Host with its own labels, status fields of
    /// its own and an empty spec (the spec is an admin's: capabilities
    /// granted, cordons, the pool's layer).
    fn agent_create(&mut self, scope: &Scope) -> Result<(), Status> {
        let what = format!("Host {:?}", self.name());
        scope.created_metadata(|| what.clone(), self.meta_mut())?;
        if scope.agent_host().is_none() {
            return Ok(());
        }
        if self.spec() != &testbus_proto::HostSpec::default() {
            return Err(not_the_agents(scope, "spec", what));
        }
        match crate::authz::host_status_not_agents(&Default::default(), self.status()) {
            Some(field) => Err(not_the_agents(scope, field, what)),
            None => Ok(()),
        }
    }
    fn agent_status(scope: &Scope, old: &Self, new: &Self) -> Result<(), Status> {
        if scope.agent_host().is_none() {
            return Ok(());
        }
        match crate::authz::host_status_not_agents(old.status(), new.status()) {
            Some(field) => Err(not_the_agents(scope, field, format!("Host {:?}", old.name()))),
            None => Ok(()),
        }
    }
    /// A host is born free: only `Tests.Claim` claims it.
    fn on_create(&mut self) {
        self.status_mut().claim = None;
    }
    fn file_refs(&self) -> Vec<(String, &testbus_proto::FileRef)> {
        self.spec().files.iter().enumerate().map(|(i, f)| (format!("spec.files[{i}]"), f)).collect()
    }
    fn check_status_update(old: &Self, new: &Self) -> Result<(), Status> {
        // A claim is made only by Tests.Claim, all hosts at once; a status
        // write may keep or release it, never make or move one.
        let held = |h: &Self| h.status().claim.clone();
        match held(new) {
            None => Ok(()),
            Some(c) if Some(&c) == held(old).as_ref() => Ok(()),
            Some(_) => Err(Status::failed_precondition(format!(
                "status.claim: Host {:?} is claimed only through a test's claim (Tests.Claim)",
                old.name()
            ))),
        }
    }
}

impl Policy for Test {
    fn from_object(o: &Object) -> Option<&Self> {
        match o {
            Object::Test(t) => Some(t),
            _ => None,
        }
    }
    fn in_scope(&self, scope: &Scope, verb: Verb) -> Result<(), Status> {
        scope.test(verb, self)
    }
    fn on_create(&mut self) {
        *self.status_mut() = Default::default();
        self.status_mut().phase = TestPhase::Pending.into();
        let fin = &mut self.meta_mut().finalizers;
        if !fin.iter().any(|f| f == TEST_FINALIZER) {
            fin.push(TEST_FINALIZER.into());
        }
    }
    fn check_update(old: &Self, new: &Self) -> Result<(), Status> {
        if old.spec() != new.spec() {
            return Err(Status::invalid_argument(format!(
                "spec: the spec of Test {:?} is immutable once created; create a new test",
                old.name()
            )));
        }
        Ok(())
    }
    fn file_refs(&self) -> Vec<(String, &testbus_proto::FileRef)> {
        testbus_proto::validate::file_refs_of_test(self)
    }
    fn check_status_update(old: &Self, new: &Self) -> Result<(), Status> {
        let (from, to) = (old.status().phase.as_str(), new.status().phase.as_str());
        if phase::test_terminal(from) {
            return Err(Status::failed_precondition(format!(
                "status: Test {:?} has finished ({from}); finished tests are immutable",
                old.name(),
            )));
        }
        // The one way back: a running attempt that failed for the
        // infrastructure's sake (its controller marked it Retrying, after
        // releasing its hosts) returns to the queue without its claims.
        let retrying = from == TestPhase::Running
            && testbus_proto::states::unclaimed(to)
            && new.status().claims.is_empty()
            && old.status().conditions.iter().any(|c| {
                c.is(testbus_proto::states::ConditionType::Retrying, testbus_proto::states::ConditionStatus::True)
            });
        if old.status().claims != new.status().claims && !retrying {
            return Err(Status::failed_precondition(
                "status.claims: set only by the test's claim (Tests.Claim), which claims its hosts with it",
            ));
        }
        let pending = testbus_proto::states::unclaimed;
        if pending(from) && to == TestPhase::Running {
            return Err(Status::failed_precondition(
                "status.phase: a test becomes Running only through its claim (Tests.Claim)",
            ));
        }
        if from == TestPhase::Running && pending(to) && !retrying {
            return Err(Status::failed_precondition("status.phase: a running test cannot go back to Pending"));
        }
        Ok(())
    }
    fn drops_guarded_finalizer(old: &Self, new: &Self) -> bool {
        let has = |t: &Self| t.meta().finalizers.iter().any(|f| f == TEST_FINALIZER);
        has(old) && !has(new)
    }
}

impl Policy for HostPool {
    fn from_object(o: &Object) -> Option<&Self> {
        match o {
            Object::HostPool(p) => Some(p),
            _ => None,
        }
    }
    /// A pool starts with no guests; its controller says what it does.
    fn on_create(&mut self) {
        *self.status_mut() = Default::default();
    }
    fn file_refs(&self) -> Vec<(String, &testbus_proto::FileRef)> {
        self.spec().files.iter().enumerate().map(|(i, f)| (format!("spec.files[{i}]"), f)).collect()
    }
}

impl Policy for Process {
    fn from_object(o: &Object) -> Option<&Self> {
        match o {
            Object::Process(p) => Some(p),
            _ => None,
        }
    }
    fn in_scope(&self, scope: &Scope, verb: Verb) -> Result<(), Status> {
        scope.process(verb, self)
    }
    fn status_written(old: &Self, new: &Self, m: &crate::metrics::Metrics) {
        m.process_transition(old.status(), new.status());
    }
    fn on_create(&mut self) {
        *self.status_mut() = Default::default();
        self.status_mut().phase = ProcessPhase::Pending.into();
    }
    fn check_update(old: &Self, new: &Self) -> Result<(), Status> {
        let mut a = old.spec().clone();
        a.stop = new.spec().stop;
        a.released = new.spec().released;
        a.stdin_closed = new.spec().stdin_closed;
        // Why it is stopped, and how long it has to end, may be said with
        // the stop, and only then.
        if new.spec().stop && !old.spec().stop {
            a.stop_reason = new.spec().stop_reason.clone();
            a.stop_grace = new.spec().stop_grace.clone();
        }
        if &a != new.spec() {
            return Err(Status::invalid_argument(
                "spec: only spec.stop (with spec.stopReason and spec.stopGrace), spec.released and \
                 spec.stdinClosed of a Process may change",
            ));
        }
        if new.spec().stop_reason.len() > testbus_proto::validate::MAX_VALUE_BYTES {
            return Err(Status::invalid_argument("spec.stopReason: too long"));
        }
        if old.spec().stop && !new.spec().stop {
            return Err(Status::invalid_argument("spec.stop: a stopped Process cannot be started again"));
        }
        if old.spec().stdin_closed && !new.spec().stdin_closed {
            return Err(Status::invalid_argument("spec.stdinClosed: a closed stdin cannot be opened again"));
        }
        if old.spec().released && !new.spec().released {
            return Err(Status::invalid_argument("spec.released: a released Process cannot be gated again"));
        }
        Ok(())
    }
    fn check_status_update(old: &Self, new: &Self) -> Result<(), Status> {
        let (from, to) = (old.status().phase.as_str(), new.status().phase.as_str());
        if phase::process_terminal(from) {
            return Err(Status::failed_precondition(format!(
                "status: Process {:?} has finished ({from}); its status is final",
                old.name(),
            )));
        }
        // A process only moves forward: Pending, Fetching, Ready, Running,
        // then one final phase.
        let rank = |p: &str| match p {
            "" => Some(0),
            p => p.parse::<testbus_proto::states::ProcessPhase>().ok().map(|p| p.rank()),
        };
        match (rank(from), rank(to)) {
            (_, None) => Err(Status::invalid_argument(format!("status.phase: {to:?} is not a Process phase"))),
            (Some(a), Some(b)) if b < a => {
                Err(Status::failed_precondition(format!("status.phase: a Process cannot go from {from} back to {to}")))
            }
            _ => Ok(()),
        }
    }
}

pub struct ResourceService<K> {
    st: ApiState,
    _k: std::marker::PhantomData<fn() -> K>,
}

impl<K> ResourceService<K> {
    pub fn new(st: ApiState) -> Self {
        ResourceService { st, _k: std::marker::PhantomData }
    }
}

fn parse_rv(field: &str, rv: &str) -> Result<u64, Status> {
    // Digits only: u64's parser would also take "+389".
    let bad = || Status::invalid_argument(format!("{field}: {rv:?} is not a resource version"));
    if rv.is_empty() || rv.len() > 20 || !rv.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    rv.parse::<u64>().map_err(|_| bad())
}

fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

impl<K: Policy> ResourceService<K> {
    fn key(name: &str) -> String {
        hub::key(K::KIND, name)
    }

    fn decode(kv: &crate::store::KeyValue) -> Result<K, Status> {
        K::from_stored(&kv.value, kv.mod_revision).map_err(|e| Status::data_loss(format!("{}: {e}", kv.key)))
    }

    fn encode(o: &K) -> Vec<u8> {
        o.to_stored()
    }

    fn not_found(name: &str) -> Status {
        Status::not_found(format!("{} {name:?} not found", K::KIND))
    }

    /// `requested` is the resourceVersion the request named.
    fn conflict(name: &str, current: u64, requested: &str) -> Status {
        Status::aborted(format!(
            "conflict: {} {name:?} was modified (resourceVersion {current}, request had {requested}); read it again and retry",
            K::KIND,
        ))
    }

    pub async fn load(&self, name: &str) -> Result<(K, u64), Status> {
        self.st.load(name).await
    }

    /// Every file an object names must have been uploaded.
    async fn check_files(&self, obj: &K) -> Result<(), Status> {
        for (path, f) in obj.file_refs() {
            if !f.source.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{path}.source: local file {:?} must be uploaded first and named by digest \
                     (testbusctl apply does this)",
                    f.source
                )));
            }
            if !self.st.blobs.available(&f.digest).await? {
                return Err(Status::invalid_argument(format!("{path}.digest: no blob {} (upload it first)", f.digest)));
            }
        }
        Ok(())
    }

    /// A test's cleanup finalizer goes only once nothing of it is left: no
    /// process of it still running, no host still claimed by it. (Taken
    /// away earlier, deleting the test would orphan its processes on
    /// hosts released under them.)
    async fn check_cleaned_up(&self, test: &K) -> Result<(), Status> {
        let refused = |what: String| {
            Status::failed_precondition(format!(
                "metadata.finalizers: {TEST_FINALIZER} is removed by the test controller once the test is cleaned up; {what}"
            ))
        };
        let (kvs, _) = self.st.store.list(&hub::prefix(Kind::Process)).await.map_err(store_err)?;
        for kv in &kvs {
            if let Some(Object::Process(p)) = hub::decode(&kv.key, &kv.value, kv.mod_revision) {
                if p.spec().test_uid == test.meta().uid && !phase::process_terminal(&p.status().phase) {
                    return Err(refused(format!("process {} still runs", p.name())));
                }
            }
        }
        let (kvs, _) = self.st.store.list(&hub::prefix(Kind::Host)).await.map_err(store_err)?;
        for kv in &kvs {
            if let Some(Object::Host(h)) = hub::decode(&kv.key, &kv.value, kv.mod_revision) {
                if h.status().claim.as_ref().is_some_and(|c| c.test_uid == test.meta().uid) {
                    return Err(refused(format!("host {} is still claimed by it", h.name())));
                }
            }
        }
        Ok(())
    }

    pub async fn create(&self, scope: &Scope, mut obj: K) -> Result<K, Status> {
        obj.in_scope(scope, Verb::Create)?;
        obj.agent_create(scope)?;
        obj = obj.with_type_meta();
        obj.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_files(&obj).await?;
        {
            let m = obj.meta_mut();
            m.uid = uuid::Uuid::new_v4().to_string();
            m.creation_timestamp = testbus_proto::time::now();
            m.deletion_timestamp.clear();
            m.generation = 1;
            m.resource_version.clear();
        }
        obj.on_create();
        let generated = obj.meta().name.is_empty();
        for _ in 0..8 {
            if generated {
                obj.meta_mut().name = format!("{}{}", obj.meta().generate_name, random_suffix());
            }
            let key = Self::key(obj.name());
            let out = self
                .st
                .store
                .txn(vec![Compare::ModRevision(key.clone(), 0)], vec![Op::Put(key, Self::encode(&obj))])
                .await
                .map_err(store_err)?;
            if out.succeeded {
                obj.meta_mut().resource_version = out.revision.to_string();
                return Ok(obj);
            }
            if !generated {
                return Err(Status::already_exists(format!("{} {:?} already exists", K::KIND, obj.name())));
            }
        }
        Err(Status::already_exists("could not generate a unique name; try again"))
    }

    pub async fn get(&self, scope: &Scope, req: GetRequest) -> Result<K, Status> {
        let o = self.load(&req.name).await?.0;
        o.in_scope(scope, Verb::Get)?;
        Ok(o)
    }

    pub async fn list(&self, scope: &Scope, req: ListRequest) -> Result<(Vec<K>, String), Status> {
        let filter = filter(&req.label_selector, &req.field_selector)?;
        scope.processes_selector(Verb::List, &filter.fields)?;
        let (kvs, rev) = self.st.store.list(&hub::prefix(K::KIND)).await.map_err(store_err)?;
        let mut items = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let o = Self::decode(kv)?;
            if filter.labels.matches(&o.meta().labels) && filter.fields.matches(&o.clone().into_object()) {
                items.push(o);
            }
        }
        Ok((items, rev.to_string()))
    }

    pub async fn watch(
        &self,
        scope: &Scope,
        req: WatchRequest,
    ) -> Result<BoxStream<'static, Result<WatchEvent<K>, Status>>, Status> {
        let filter = filter(&req.label_selector, &req.field_selector)?;
        scope.processes_selector(Verb::Watch, &filter.fields)?;
        let after = if req.resource_version.is_empty() {
            None
        } else {
            Some(parse_rv("resourceVersion", &req.resource_version)?)
        };
        // A watch from a revision the store has not reached would deliver
        // nothing and never end: refused. (Ahead of the hub alone is only
        // the hub's lag behind the store.)
        if let Some(a) = after.filter(|&a| a > self.st.hub.revision()) {
            let (_, now) = self.st.store.list("/none/").await.map_err(store_err)?;
            if a > now {
                return Err(Status::out_of_range(format!(
                    "resourceVersion: {a} is in the future (the store is at {now}); watch from a revision a list returned"
                )));
            }
        }
        // Processes watched by host use the host index.
        let index = match K::KIND {
            Kind::Process => filter.fields.host_name.clone(),
            _ => None,
        };
        let compacted = |rv: String| WatchEvent { kind: EventType::Compacted, object: None, resource_version: rv };
        let rx = match self.st.hub.watch(K::KIND, after, index, filter) {
            Ok(rx) => rx,
            Err(e) => {
                let ev = compacted(e.floor.to_string());
                return Ok(futures::stream::iter([Ok(ev)]).boxed());
            }
        };
        // Counted open while the stream lives (the guard goes with it).
        let open = WatchOpen::new(self.st.metrics.clone());
        let events = rx.map(move |e: Arc<HubEvent>| {
            open.metrics.watch_events.inc();
            let object = K::from_object(&e.object).cloned();
            Ok(WatchEvent { kind: e.kind, object, resource_version: e.revision.to_string() })
        });
        // The hub closes a watcher's channel only when it dropped it (too
        // slow, or the hub restarted): tell the client to relist.
        Ok(events.chain(futures::stream::iter([Ok(compacted(String::new()))])).boxed())
    }

    async fn cas_put(&self, obj: &K, expected: u64) -> Result<K, Status> {
        let key = Self::key(obj.name());
        let out = self
            .st
            .store
            .txn(vec![Compare::ModRevision(key.clone(), expected)], vec![Op::Put(key, Self::encode(obj))])
            .await
            .map_err(store_err)?;
        if !out.succeeded {
            let current = self.st.store.get(&Self::key(obj.name())).await.map_err(store_err)?;
            return Err(match current {
                Some(kv) => Self::conflict(obj.name(), kv.mod_revision, obj.resource_version()),
                None => Self::not_found(obj.name()),
            });
        }
        let mut o = obj.clone();
        o.meta_mut().resource_version = out.revision.to_string();
        Ok(o)
    }

    async fn cas_delete(&self, obj: &K, expected: u64) -> Result<K, Status> {
        let key = Self::key(obj.name());
        let out = self
            .st
            .store
            .txn(vec![Compare::ModRevision(key.clone(), expected)], vec![Op::Delete(key)])
            .await
            .map_err(store_err)?;
        if !out.succeeded {
            return Err(Self::conflict(obj.name(), expected, obj.resource_version()));
        }
        Ok(obj.clone())
    }

    /// An update that names a uid is for that object only: one of the
    /// same name made since (a test's next attempt names its Processes
    /// alike) is another object, and the one updated is gone. As
    /// Kubernetes' uid precondition; an update without a uid is for
    /// whatever has the name. (Checked after the revision: a stale copy is
    /// a routine conflict; this catches a fresh revision put on an old
    /// object.)
    fn same_object(current: &K, new: &K) -> Result<(), Status> {
        let (had, has) = (&new.meta().uid, &current.meta().uid);
        if had.is_empty() || had == has {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "metadata.uid: {} {:?} with uid {had} is gone (the one of that name now has uid {has})",
            K::KIND,
            current.name()
        )))
    }

    fn expect_rv(obj: &K) -> Result<u64, Status> {
        if obj.resource_version().is_empty() {
            return Err(Status::invalid_argument(
                "metadata.resourceVersion: required (every update is a compare-and-swap)",
            ));
        }
        parse_rv("metadata.resourceVersion", obj.resource_version())
    }

    pub async fn update(&self, scope: &Scope, new: K) -> Result<K, Status> {
        let want = Self::expect_rv(&new)?;
        let (current, rev) = self.load(new.name()).await?;
        current.in_scope(scope, Verb::Update)?;
        new.in_scope(scope, Verb::Update)?;
        let what = || format!("{} {:?}", K::KIND, current.name());
        scope.spec_change(what, new.spec() != current.spec())?;
        scope.metadata(what, current.meta(), new.meta())?;
        if rev != want {
            return Err(Self::conflict(new.name(), rev, new.resource_version()));
        }
        Self::same_object(&current, &new)?;
        K::check_update(&current, &new)?;
        let mut next = current.clone();
        *next.spec_mut() = new.spec().clone();
        {
            let (m, n) = (next.meta_mut(), new.meta());
            m.labels = n.labels.clone();
            m.annotations = n.annotations.clone();
            m.finalizers = n.finalizers.clone();
            m.owner_references = n.owner_references.clone();
        }
        if !current.meta().deletion_timestamp.is_empty()
            && next.meta().finalizers.len() > current.meta().finalizers.len()
        {
            return Err(Status::failed_precondition("metadata.finalizers: cannot add finalizers while deleting"));
        }
        if K::drops_guarded_finalizer(&current, &next) {
            self.check_cleaned_up(&current).await?;
        }
        next.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        if next.spec() != current.spec() {
            self.check_files(&next).await?;
            next.meta_mut().generation += 1;
        }
        if !next.meta().deletion_timestamp.is_empty() && next.meta().finalizers.is_empty() {
            return self.cas_delete(&next, rev).await;
        }
        self.cas_put(&next, rev).await
    }

    pub async fn update_status(&self, scope: &Scope, new: K) -> Result<K, Status> {
        let want = Self::expect_rv(&new)?;
        let (current, rev) = self.load(new.name()).await?;
        current.in_scope(scope, Verb::UpdateStatus)?;
        K::agent_status(scope, &current, &new)?;
        if rev != want {
            return Err(Self::conflict(new.name(), rev, new.resource_version()));
        }
        Self::same_object(&current, &new)?;
        K::check_status_update(&current, &new)?;
        let mut next = current.clone();
        *next.status_mut() = new.status().clone();
        next.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The write and what it counts go together in a task of their own:
        // a caller that goes away drops this future (an agent aborts its
        // late Running report once the process has ended), and a write that
        // commits after that must still be counted, or a start is lost.
        let this = ResourceService::<K>::new(self.st.clone());
        tokio::spawn(async move {
            let written = this.cas_put(&next, rev).await?;
            K::status_written(&current, &written, &this.st.metrics);
            Ok(written)
        })
        .await
        .map_err(|e| Status::internal(format!("writing the status: {e}")))?
    }

    pub async fn delete(&self, scope: &Scope, req: DeleteRequest) -> Result<K, Status> {
        loop {
            let (mut current, rev) = self.load(&req.name).await?;
            current.in_scope(scope, Verb::Delete)?;
            if !req.resource_version.is_empty() && parse_rv("resourceVersion", &req.resource_version)? != rev {
                return Err(Self::conflict(current.name(), rev, &req.resource_version));
            }
            let res = if current.meta().finalizers.is_empty() {
                self.cas_delete(&current, rev).await
            } else if current.meta().deletion_timestamp.is_empty() {
                current.meta_mut().deletion_timestamp = testbus_proto::time::now();
                self.cas_put(&current, rev).await
            } else {
                return Ok(current); // already being deleted
            };
            match res {
                Err(s) if s.code() == tonic::Code::Aborted && req.resource_version.is_empty() => continue,
                r => return r,
            }
        }
    }
}

/// One open watch in the metrics, for as long as it is held.
struct WatchOpen {
    metrics: Arc<crate::metrics::Metrics>,
}

impl WatchOpen {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> WatchOpen {
        metrics.watches.inc();
        WatchOpen { metrics }
    }
}

impl Drop for WatchOpen {
    fn drop(&mut self) {
        self.metrics.watches.dec();
    }
}

fn filter(labels: &str, fields: &str) -> Result<Filter, Status> {
    Ok(Filter {
        labels: LabelSelector::parse(labels).map_err(|e| Status::invalid_argument(format!("labelSelector: {e}")))?,
        fields: FieldSelector::parse(fields).map_err(|e| Status::invalid_argument(format!("fieldSelector: {e}")))?,
    })
}

impl ResourceService<Host> {
    pub async fn renew_lease(&self, scope: &Scope, req: RenewLeaseRequest) -> Result<Host, Status> {
        scope.host(Verb::RenewLease, &req.name)?;
        let _apart_from_claims = self.st.host_locks.one(&req.name).await;
        loop {
            let (mut h, rev) = self.load(&req.name).await?;
            let holder = &h.status().agent_id;
            if !req.agent_id.is_empty() && !holder.is_empty() && *holder != req.agent_id {
                return Err(Status::failed_precondition(format!(
                    "{TAKEN_OVER}: host {:?} is now held by agent {holder} (this is agent {})",
                    req.name, req.agent_id
                )));
            }
            h.status_mut().lease_renew_time = testbus_proto::time::now();
            if req.release {
                h.status_mut().lease_duration_seconds = 0;
            }
            match self.cas_put(&h, rev).await {
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                r => return r,
            }
        }
    }
}

impl ResourceService<Test> {
    /// The gang claim: all hosts and the test in one transaction, or nothing.
    pub async fn claim(&self, _scope: &Scope, req: ClaimRequest) -> Result<Test, Status> {
        let (mut test, test_rev) = self.load(&req.test).await?;
        if parse_rv("testResourceVersion", &req.test_resource_version)? != test_rev {
            return Err(Self::conflict(test.name(), test_rev, test.resource_version()));
        }
        if !testbus_proto::states::waits_for_hosts(&test) {
            return Err(Status::failed_precondition(format!("Test {:?} is not pending", req.test)));
        }
        if req.assignments.is_empty() {
            return Err(Status::invalid_argument("assignments: at least one host is required"));
        }
        // No renewal of these hosts on this replica from here to the commit
        // (taken after the cheap refusals above).
        let _apart_from_renewals = self.st.host_locks.all(req.assignments.iter().map(|a| a.host.as_str())).await;
        let hosts = ResourceService::<Host>::new(self.st.clone());
        let mut compares = vec![Compare::ModRevision(Self::key(&req.test), test_rev)];
        let mut ops = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // Which requirement each member is of; made only if a host changed.
        let mut member_of: Option<std::collections::HashMap<String, usize>> = None;
        for (i, a) in req.assignments.iter().enumerate() {
            if !seen.insert(a.host.as_str()) {
                return Err(Status::invalid_argument(format!("assignments[{i}].host: {:?} assigned twice", a.host)));
            }
            let (mut h, rev) = hosts.load(&a.host).await?;
            if parse_rv(&format!("assignments[{i}].hostResourceVersion"), &a.host_resource_version)? != rev {
                // Changed since the scheduler chose it. Its agent renews its
                // lease every few seconds, which is a write: requiring the
                // very version chosen made a claim of hundreds of hosts
                // conflict for ever (issue 33's fleet). It is still the
                // member's if it still fits the member's requirement; the
                // rest (free, Ready) is checked below as for any host, and
                // the transaction compares the version read here.
                let member_of = member_of.get_or_insert_with(|| {
                    test.spec()
                        .hosts
                        .iter()
                        .enumerate()
                        .flat_map(|(r, h)| testbus_proto::validate::members(h).into_iter().map(move |m| (m, r)))
                        .collect()
                });
                let fits = member_of
                    .get(&a.role)
                    .is_some_and(|&r| testbus_controllers::schedule::fits(&test.spec().hosts[r], &h));
                if !fits {
                    return Err(Status::aborted(format!("conflict: Host {:?} changed since it was chosen", a.host)));
                }
            }
            let s = h.status();
            if s.phase != HostPhase::Ready
                || h.spec().unschedulable
                || s.claim.as_ref().is_some()
                || !testbus_proto::pool::clean_enough(&h)
            {
                return Err(Status::aborted(format!("conflict: Host {:?} is no longer free", a.host)));
            }
            // A pool guest is used from now on: it is cleaned before any
            // other test may claim it.
            h.meta_mut().annotations.remove(testbus_proto::pool::CLEAN_ANNOTATION);
            h.status_mut().claim = Some(HostClaim {
                test: test.name().to_string(),
                test_uid: test.meta().uid.clone(),
                role: a.role.clone(),
            });
            compares.push(Compare::ModRevision(hub::key(Kind::Host, &a.host), rev));
            ops.push(Op::Put(hub::key(Kind::Host, &a.host), ResourceService::<Host>::encode(&h)));
        }
        test.status = Some(req.status.unwrap_or_default());
        test.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        ops.push(Op::Put(Self::key(&req.test), Self::encode(&test)));
        let out = self.st.store.txn(compares, ops).await.map_err(store_err)?;
        if !out.succeeded {
            return Err(Status::aborted("conflict: a host or the test changed during the claim; retry"));
        }
        test.meta_mut().resource_version = out.revision.to_string();
        Ok(test)
    }
}

/// Outcomes `testbusctl result` records.
const OUTCOMES: [&str; 3] = ["pass", "fail", "skip"];

/// A recorded result's path: dot-separated segments, the last its name and
/// the rest its group (JUnit's class). Besides `[A-Za-z0-9_-]`, a segment
/// may hold what pytest puts in its ids' parameters (`[]+=:,@`), so a
/// pytest node id maps onto one path (`tests.test_nfs.test_mount[nfs]`).
fn result_path(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 253
        && p.split('.')
            .all(|seg| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_[]+=:,@".contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a result path (dot-separated segments of [A-Za-z0-9_-] and []+=:,@, e.g. users.verify-name)"
        ))
    }
}

impl ResourceService<Test> {
    /// Read-modify-write of a running test's status, retried on conflict.
    async fn mutate_running(
        &self,
        name: &str,
        mut f: impl FnMut(&mut Test) -> Result<(), Status>,
    ) -> Result<Test, Status> {
        loop {
            let (mut t, rev) = self.load(name).await?;
            if phase::test_terminal(&t.status().phase) || !t.meta().deletion_timestamp.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "Test {name:?} has finished ({}); finished tests are immutable",
                    t.status().phase
                )));
            }
            if testbus_proto::states::Verdict::decided(&t.status().conditions) {
                return Err(Status::failed_precondition(format!("Test {name:?} is finishing")));
            }
            f(&mut t)?;
            t.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
            match self.cas_put(&t, rev).await {
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                r => return r,
            }
        }
    }

    pub async fn set_env(&self, _scope: &Scope, req: SetEnvRequest) -> Result<Test, Status> {
        for (k, v) in &req.env {
            testbus_proto::validate::env_name(k).map_err(|e| Status::invalid_argument(format!("env.{k}: {e}")))?;
            if v.contains('\0') {
                return Err(Status::invalid_argument(format!("env.{k}: must not contain NUL")));
            }
        }
        self.mutate_running(&req.test, |t| {
            if t.status().phase != TestPhase::Running {
                return Err(Status::failed_precondition(format!("Test {:?} has not claimed its hosts yet", req.test)));
            }
            t.status_mut().env.extend(req.env.clone());
            Ok(())
        })
        .await
    }

    pub async fn record_result(&self, _scope: &Scope, req: RecordResultRequest) -> Result<Test, Status> {
        result_path(&req.path).map_err(|e| Status::invalid_argument(format!("path: {e}")))?;
        if !OUTCOMES.contains(&req.outcome.as_str()) {
            return Err(Status::invalid_argument(format!("outcome: {:?} must be pass, fail or skip", req.outcome)));
        }
        if req.message.len() > testbus_proto::validate::MAX_VALUE_BYTES {
            return Err(Status::invalid_argument("message: too long"));
        }
        self.mutate_running(&req.test, |t| {
            let r = testbus_proto::TestResult {
                path: req.path.clone(),
                outcome: req.outcome.clone(),
                message: req.message.clone(),
                time: testbus_proto::time::now(),
            };
            let results = &mut t.status_mut().results;
            // Results are facts: the same one again is a retry, a different
            // one is refused (a later pass silently overwrote a failure).
            match results.iter().find(|x| x.path == r.path) {
                Some(x) if x.outcome == r.outcome && x.message == r.message => return Ok(()),
                Some(x) => {
                    return Err(Status::already_exists(format!(
                        "path: {} already has a result ({} at {}); a recorded result cannot be changed",
                        x.path, x.outcome, x.time
                    )))
                }
                None => results.push(r),
            }
            if results.len() > 10_000 {
                return Err(Status::invalid_argument("path: more than 10000 results in one test"));
            }
            Ok(())
        })
        .await
    }

    /// Records the verdict that ends a test (`who` asked: a cancel says so).
    pub async fn finish(&self, _scope: &Scope, req: FinishRequest, who: &str) -> Result<Test, Status> {
        self.mutate_running(&req.test, |t| {
            let failed: Vec<String> =
                t.status().results.iter().filter(|r| r.outcome == "fail").map(|r| r.path.clone()).collect();
            use testbus_proto::states::{TestReason, Verdict};
            let verdict = if req.cancel {
                if req.failed {
                    return Err(Status::invalid_argument("cancel: a cancelled test is not also failed"));
                }
                let message = match req.message.as_str() {
                    "" => format!("cancelled by {who}"),
                    m => format!("cancelled by {who}: {m}"),
                };
                Verdict::new(TestReason::Cancelled, message)
            } else if req.failed {
                let message = if req.message.is_empty() { "finished as failed" } else { req.message.as_str() };
                Verdict::new(TestReason::FinishedFailed, message)
            } else if !failed.is_empty() {
                Verdict::new(TestReason::ResultFailed, format!("recorded results failed: {}", failed.join(", ")))
            } else {
                Verdict::new(TestReason::Finished, req.message.clone())
            };
            // The controller concludes from this verdict: stops processes,
            // writes the final status, releases the hosts.
            t.status_mut().conditions.push(verdict.condition(testbus_proto::time::now()));
            Ok(())
        })
        .await
    }
}

macro_rules! bind_service {
    ($module:ident :: $trait:ident, $ty:ident, $list:ident, $event:ident, { $($extra:tt)* }) => {
        #[tonic::async_trait]
        impl testbus_proto::$module::$trait for ResourceService<$ty> {
            async fn create(&self, req: Request<$ty>) -> Result<Response<$ty>, Status> {
                let id = self.st.authorize(&req, Verb::Create, <$ty as Resource>::KIND.into())?;
                self.create(&id, req.into_inner()).await.map(Response::new)
            }
            async fn get(&self, req: Request<GetRequest>) -> Result<Response<$ty>, Status> {
                let id = self.st.authorize(&req, Verb::Get, <$ty as Resource>::KIND.into())?;
                ResourceService::get(self, &id, req.into_inner()).await.map(Response::new)
            }
            async fn list(&self, req: Request<ListRequest>) -> Result<Response<$list>, Status> {
                let id = self.st.authorize(&req, Verb::List, <$ty as Resource>::KIND.into())?;
                let (items, resource_version) = ResourceService::list(self, &id, req.into_inner()).await?;
                Ok(Response::new($list { items, resource_version }))
            }
            type WatchStream = BoxStream<'static, Result<$event, Status>>;
            async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
                let id = self.st.authorize(&req, Verb::Watch, <$ty as Resource>::KIND.into())?;
                // Held for as long as the stream lives.
                let held = self.st.watch_quota.take(&crate::authz::Caller::of(&req))?;
                let s = ResourceService::watch(self, &id, req.into_inner()).await?;
                Ok(Response::new(
                    s.map(move |r| {
                        let _held = &held;
                        r.map(|e| $event {
                            r#type: e.kind.as_str().to_string(),
                            object: e.object,
                            resource_version: e.resource_version,
                        })
                    })
                    .boxed(),
                ))
            }
            async fn update(&self, req: Request<$ty>) -> Result<Response<$ty>, Status> {
                let id = self.st.authorize(&req, Verb::Update, <$ty as Resource>::KIND.into())?;
                ResourceService::update(self, &id, req.into_inner()).await.map(Response::new)
            }
            async fn update_status(&self, req: Request<$ty>) -> Result<Response<$ty>, Status> {
                let id = self.st.authorize(&req, Verb::UpdateStatus, <$ty as Resource>::KIND.into())?;
                ResourceService::update_status(self, &id, req.into_inner()).await.map(Response::new)
            }
            async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<$ty>, Status> {
                let id = self.st.authorize(&req, Verb::Delete, <$ty as Resource>::KIND.into())?;
                ResourceService::delete(self, &id, req.into_inner()).await.map(Response::new)
            }
            $($extra)*
        }
    };
}

bind_service!(hosts_server::Hosts, Host, HostList, HostEvent, {
    async fn renew_lease(&self, req: Request<RenewLeaseRequest>) -> Result<Response<Host>, Status> {
        let id = self.st.authorize(&req, Verb::RenewLease, Kind::Host.into())?;
        ResourceService::renew_lease(self, &id, req.into_inner()).await.map(Response::new)
    }
});
bind_service!(tests_server::Tests, Test, TestList, TestEvent, {
    async fn claim(&self, req: Request<ClaimRequest>) -> Result<Response<Test>, Status> {
        let id = self.st.authorize(&req, Verb::Claim, Kind::Test.into())?;
        let started = tokio::time::Instant::now();
        let r = ResourceService::claim(self, &id, req.into_inner()).await.map(Response::new);
        self.st.metrics.claim_seconds.observe(started.elapsed().as_secs_f64());
        r
    }
    async fn set_env(&self, req: Request<SetEnvRequest>) -> Result<Response<Test>, Status> {
        let id = self.st.authorize(&req, Verb::SetEnv, Kind::Test.into())?;
        ResourceService::set_env(self, &id, req.into_inner()).await.map(Response::new)
    }
    async fn record_result(&self, req: Request<RecordResultRequest>) -> Result<Response<Test>, Status> {
        let id = self.st.authorize(&req, Verb::RecordResult, Kind::Test.into())?;
        ResourceService::record_result(self, &id, req.into_inner()).await.map(Response::new)
    }
    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<Test>, Status> {
        let id = self.st.authorize(&req, Verb::Finish, Kind::Test.into())?;
        let who = crate::authz::Caller::of(&req).describe();
        ResourceService::finish(self, &id, req.into_inner(), &who).await.map(Response::new)
    }
    async fn exec(
        &self,
        req: Request<testbus_proto::ExecRequest>,
    ) -> Result<Response<testbus_proto::ExecResponse>, Status> {
        let id = self.st.authorize(&req, Verb::Exec, Kind::Test.into())?;
        ResourceService::exec(self, &id, req.into_inner()).await.map(Response::new)
    }
    async fn rerun(&self, req: Request<testbus_proto::RerunRequest>) -> Result<Response<Test>, Status> {
        let id = self.st.authorize(&req, Verb::Create, Kind::Test.into())?;
        ResourceService::rerun(self, &id, req.into_inner()).await.map(Response::new)
    }
});
bind_service!(processes_server::Processes, Process, ProcessList, ProcessEvent, {});
bind_service!(host_pools_server::HostPools, HostPool, HostPoolList, HostPoolEvent, {
    async fn snapshot(
        &self,
        req: Request<testbus_proto::SnapshotRequest>,
    ) -> Result<Response<testbus_proto::SnapshotResponse>, Status> {
        let id = self.st.authorize(&req, Verb::Snapshot, Kind::HostPool.into())?;
        ResourceService::snapshot(self, &id, req.into_inner()).await.map(Response::new)
    }
});

/// How long `HostPools.Snapshot` waits for the pool controller.
pub const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

impl ResourceService<HostPool> {
    /// Snapshots of a pool guest, as desired state: the request is written
    /// on the guest's Host (`testbus.io/snapshot-request`) and the pool
    /// controller carries it out in turn with the guest's other work (a
    /// clean, a relink), on the replica that leads; this waits for its
    /// outcome (`testbus.io/snapshot-result`). After a revert the
    /// controller sees the guest's link end and links it again.
    pub async fn snapshot(
        &self,
        _scope: &Scope,
        req: testbus_proto::SnapshotRequest,
    ) -> Result<testbus_proto::SnapshotResponse, Status> {
        use testbus_proto::pool::{SnapshotAction, SnapshotOrder, SNAPSHOT_REQUEST};
        const CLEAN_SNAPSHOT: &str = "testbus-clean";
        let action: SnapshotAction = req
            .action
            .parse()
            .map_err(|e: testbus_proto::states::Unknown| Status::invalid_argument(format!("action: {e}")))?;
        if action != SnapshotAction::List {
            testbus_proto::validate::dns_label(&req.name)
                .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
            if req.name == CLEAN_SNAPSHOT {
                return Err(Status::invalid_argument(format!(
                    "name: {CLEAN_SNAPSHOT} is the pool's own (every test starts from it)"
                )));
            }
        }
        let hosts = ResourceService::<Host>::new(self.st.clone());
        let order = SnapshotOrder {
            id: uuid::Uuid::new_v4().to_string(),
            action,
            name: if action == SnapshotAction::List { String::new() } else { req.name.clone() },
        };
        let text = serde_json::to_string(&order).map_err(|e| Status::internal(e.to_string()))?;
        // Written by compare-and-swap; one request at a time per guest.
        let written = loop {
            let (mut host, rev) = hosts.load(&req.host).await?;
            let Some(pool_name) = testbus_proto::pool::pool_of(&host).map(String::from) else {
                return Err(Status::failed_precondition(format!(
                    "host: {:?} is not a pool guest (only HostPool guests have snapshots)",
                    req.host
                )));
            };
            self.load(&pool_name).await?;
            if let Some(other) = testbus_proto::pool::pending_snapshot(&host) {
                return Err(Status::failed_precondition(format!(
                    "host: {:?} has a snapshot request in progress ({:?} {}); try again when it is done",
                    req.host, other.action, other.name
                )));
            }
            host.meta_mut().annotations.insert(SNAPSHOT_REQUEST.into(), text.clone());
            match hosts.cas_put(&host, rev).await {
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                r => break r?,
            }
        };
        let after = parse_rv("resourceVersion", written.resource_version())?;
        let fields = FieldSelector { name: Some(req.host.clone()), ..Default::default() };
        let mut events = self
            .st
            .hub
            .watch(Kind::Host, Some(after.saturating_sub(1)), None, Filter { fields, ..Default::default() })
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let outcome = tokio::time::timeout(SNAPSHOT_WAIT, async {
            while let Some(e) = events.next().await {
                if let Object::Host(h) = &e.object {
                    if let Some(o) = testbus_proto::pool::snapshot_outcome(h).filter(|o| o.id == order.id) {
                        return Ok(o);
                    }
                }
                if e.kind == EventType::Deleted {
                    return Err(Status::not_found(format!("Host {:?} was deleted", req.host)));
                }
            }
            Err(Status::unavailable("the watch cache restarted; ask again"))
        })
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "the pool controller did not carry out the snapshot request within {}s (do the controllers run?)",
                SNAPSHOT_WAIT.as_secs()
            ))
        })??;
        if outcome.error.is_empty() {
            Ok(testbus_proto::SnapshotResponse { snapshots: outcome.snapshots })
        } else {
            Err(Status::failed_precondition(outcome.error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::Store;
    use testbus_proto::{HostRequirement, ProcessSpec, TestSpec};

    async fn state(dir: &tempfile::TempDir) -> ApiState {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 1000).unwrap());
        let hub = Hub::start(1000, store.clone()).await.unwrap();
        let blobs = crate::blobs::BlobStore::open(&dir.path().join("blobs"), 0).unwrap();
        ApiState::new(store, hub, blobs, None, Default::default())
    }

    fn admin() -> Scope {
        Scope::All
    }

    fn test_obj(name: &str) -> Test {
        Test {
            metadata: Some(testbus_proto::ObjectMeta { name: name.into(), ..Default::default() }),
            spec: Some(TestSpec {
                hosts: vec![HostRequirement { role: "a".into(), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn process_on(name: &str, host: &str) -> Process {
        Process {
            metadata: Some(testbus_proto::ObjectMeta { name: name.into(), ..Default::default() }),
            spec: Some(ProcessSpec { host_name: host.into(), argv: vec!["true".into()], ..Default::default() }),
            ..Default::default()
        }
    }

    /// `spec.stopReason` (which the agent of the process's own host may
    /// write too, through Update) comes with the stop and only then, once,
    /// and bounded.
    #[test]
    fn a_stop_reason_comes_with_the_stop_and_only_then() {
        let old = process_on("p", "h");
        let with = |f: &dyn Fn(&mut ProcessSpec)| {
            let mut p = old.clone();
            f(p.spec_mut());
            p
        };
        let reason_only = with(&|s| s.stop_reason = "x".into());
        assert!(<Process as Policy>::check_update(&old, &reason_only).is_err());
        let stopped = with(&|s| (s.stop, s.stop_reason) = (true, "its test ended".into()));
        assert!(<Process as Policy>::check_update(&old, &stopped).is_ok());
        let mut rewritten = stopped.clone();
        rewritten.spec_mut().stop_reason = "something else".into();
        assert!(<Process as Policy>::check_update(&stopped, &rewritten).is_err());
        let long =
            with(&|s| (s.stop, s.stop_reason) = (true, "x".repeat(testbus_proto::validate::MAX_VALUE_BYTES + 1)));
        let e = <Process as Policy>::check_update(&old, &long).unwrap_err();
        assert!(e.message().contains("spec.stopReason"), "{e:?}");
    }

    /// A store whose writes wait for a permit, and say when one waits.
    struct GatedStore {
        inner: Arc<dyn Store>,
        permits: Arc<tokio::sync::Semaphore>,
        waiting: Arc<tokio::sync::Notify>,
    }

    #[tonic::async_trait]
    impl Store for GatedStore {
        async fn get(&self, key: &str) -> Result<Option<crate::store::KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<crate::store::KeyValue>, u64), StoreError> {
            self.inner.list(prefix).await
        }
        async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<crate::store::TxnOutcome, StoreError> {
            let (inner, permits) = (self.inner.clone(), self.permits.clone());
            self.waiting.notify_one();
            // Like a store's own write, it goes on when its caller is gone.
            tokio::spawn(async move {
                permits.acquire().await.unwrap().forget();
                inner.txn(compares, ops).await
            })
            .await
            .unwrap()
        }
        async fn watch(&self, prefix: &str, after: u64) -> Result<crate::store::EventStream, StoreError> {
            self.inner.watch(prefix, after).await
        }
        async fn revision(&self) -> Result<u64, StoreError> {
            self.inner.revision().await
        }
    }

    /// An update names the uid it was read with: a Process deleted and made
    /// again under its name (a test's next attempt) is another object, and
    /// a late write for the first (its agent was cut off meanwhile) is
    /// refused, not applied to the second; as Kubernetes' uid precondition.
    #[tokio::test]
    async fn an_update_for_a_uid_that_is_gone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&dir).await;
        let procs = ResourceService::<Process>::new(st);
        let old = procs.create(&admin(), process_on("p", "host-a")).await.unwrap();
        procs.delete(&admin(), DeleteRequest { name: "p".into(), resource_version: String::new() }).await.unwrap();
        let new = procs.create(&admin(), process_on("p", "host-a")).await.unwrap();
        assert_ne!(old.meta().uid, new.meta().uid);
        let mut late = old.clone();
        late.meta_mut().resource_version = new.resource_version().into();
        late.status_mut().phase = ProcessPhase::Running.into();
        let e = procs.update_status(&admin(), late.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("metadata.uid") && e.message().contains("is gone"), "{e:?}");
        late.spec_mut().stop = true;
        let e = procs.update(&admin(), late).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        // Without a uid, an update is for whatever has the name.
        let mut any = new.clone();
        any.meta_mut().uid = String::new();
        any.status_mut().phase = ProcessPhase::Running.into();
        procs.update_status(&admin(), any).await.unwrap();
    }

    /// CI once saw a finished process never counted as started: the agent
    /// aborted its Running report while the write was under way, the write
    /// committed, and the count after it was dropped with the call.
    #[tokio::test]
    async fn a_status_write_is_counted_even_when_its_caller_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = state(&dir).await;
        let mut p =
            ResourceService::<Process>::new(st.clone()).create(&admin(), process_on("p", "host-a")).await.unwrap();
        let (permits, waiting) = (Arc::new(tokio::sync::Semaphore::new(0)), Arc::new(tokio::sync::Notify::new()));
        st.store = Arc::new(GatedStore { inner: st.store.clone(), permits: permits.clone(), waiting: waiting.clone() });
        let metrics = st.metrics.clone();
        let procs = ResourceService::<Process>::new(st);
        p.status_mut().phase = ProcessPhase::Running.into();
        p.status_mut().start_time = testbus_proto::time::now();
        {
            let scope = admin();
            let call = procs.update_status(&scope, p);
            tokio::pin!(call);
            tokio::select! {
                _ = &mut call => panic!("the write went through without a permit"),
                _ = waiting.notified() => {}
            }
        } // the caller goes away while its write waits
        permits.add_permits(1);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while metrics.processes_started.get() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the start was never counted");
            tokio::task::yield_now().await;
        }
        assert_eq!(procs.load("p").await.unwrap().0.status().phase, ProcessPhase::Running);
    }

    #[tokio::test]
    async fn updates_are_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let tests = ResourceService::<Test>::new(state(&dir).await);
        let t = tests.create(&admin(), test_obj("t")).await.unwrap();
        assert_eq!(t.status().phase, TestPhase::Pending);
        assert!(t.meta().finalizers.contains(&TEST_FINALIZER.to_string()));
        let mut a = t.clone();
        a.status_mut().message = "first".into();
        let a = tests.update_status(&admin(), a).await.unwrap();
        let mut stale = t.clone();
        stale.status_mut().message = "second".into();
        let err = tests.update_status(&admin(), stale).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert_eq!(tests.load("t").await.unwrap().0.status().message, "first");
        // No resourceVersion: refused, not applied blindly.
        let mut blind = a.clone();
        blind.meta_mut().resource_version.clear();
        assert_eq!(tests.update_status(&admin(), blind).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        // The spec of a test cannot change.
        let mut changed = a.clone();
        changed.spec_mut().priority = 5;
        let err = tests.update(&admin(), changed).await.unwrap_err();
        assert!(err.message().starts_with("spec:"), "{}", err.message());
    }

    #[tokio::test]
    async fn conflicts_name_both_revisions_and_revisions_are_digits() {
        let dir = tempfile::tempdir().unwrap();
        let tests = ResourceService::<Test>::new(state(&dir).await);
        let t = tests.create(&admin(), test_obj("t")).await.unwrap();
        let current = t.resource_version().to_string();
        let req = DeleteRequest { name: "t".into(), resource_version: "999999".into() };
        let err = tests.delete(&admin(), req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(
            err.message().contains(&format!("resourceVersion {current}, request had 999999)")),
            "{}",
            err.message()
        );
        for bad in ["+389", "-1", " 1", "1e3", "99999999999999999999999"] {
            assert!(parse_rv("r", bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_rv("r", "389").unwrap(), 389);
    }

    #[tokio::test]
    async fn finished_tests_are_immutable_and_finalizers_hold_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let tests = ResourceService::<Test>::new(state(&dir).await);
        let t = tests.create(&admin(), test_obj("t")).await.unwrap();
        let mut done = t.clone();
        done.status_mut().phase = ProcessPhase::Succeeded.into();
        let done = tests.update_status(&admin(), done).await.unwrap();
        let mut again = done.clone();
        again.status_mut().phase = ProcessPhase::Failed.into();
        assert_eq!(tests.update_status(&admin(), again).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
        // Delete: held by the finalizer until it is removed.
        let d = tests.delete(&admin(), DeleteRequest { name: "t".into(), ..Default::default() }).await.unwrap();
        assert!(!d.meta().deletion_timestamp.is_empty());
        let (mut cur, _) = tests.load("t").await.unwrap();
        cur.meta_mut().finalizers.clear();
        tests.update(&admin(), cur).await.unwrap();
        assert_eq!(tests.load("t").await.unwrap_err().code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn generate_name_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let tests = ResourceService::<Test>::new(state(&dir).await);
        let mut g = test_obj("");
        g.meta_mut().generate_name = "run-".into();
        let a = tests.create(&admin(), g.clone()).await.unwrap();
        let b = tests.create(&admin(), g).await.unwrap();
        assert!(a.name().starts_with("run-") && a.name().len() == 9 && a.name() != b.name());
        tests.create(&admin(), test_obj("x")).await.unwrap();
        assert_eq!(tests.create(&admin(), test_obj("x")).await.unwrap_err().code(), tonic::Code::AlreadyExists);
    }

    #[tokio::test]
    async fn a_host_watch_sees_only_its_own_processes() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&dir).await;
        let procs = ResourceService::<Process>::new(st.clone());
        let id = admin();
        let watch = |host: &str| {
            procs.watch(&id, WatchRequest { field_selector: format!("spec.hostName={host}"), ..Default::default() })
        };
        let mut a = watch("host-a").await.unwrap();
        let mut b = watch("host-b").await.unwrap();
        for i in 0..20 {
            procs.create(&admin(), process_on(&format!("pa{i}"), "host-a")).await.unwrap();
        }
        procs.create(&admin(), process_on("pb", "host-b")).await.unwrap();
        let first_b =
            tokio::time::timeout(std::time::Duration::from_secs(5), b.next()).await.unwrap().unwrap().unwrap();
        // host-b's first event is its own, though 20 of host-a's came before.
        assert_eq!(first_b.object.unwrap().name(), "pb");
        for i in 0..20 {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), a.next()).await.unwrap().unwrap().unwrap();
            assert_eq!(e.object.unwrap().name(), format!("pa{i}"));
        }
        // Only the indexed watchers exist: nobody watches the whole kind.
        assert_eq!(st.hub.watchers(), 2);
        // A watch that is dropped (a client that cancelled) is forgotten at
        // once, though no event for it ever comes: none pile up.
        let mut idle = Vec::new();
        for i in 0..50 {
            idle.push(watch(&format!("nobody-{i}")).await.unwrap());
        }
        idle.push(
            procs
                .watch(&id, WatchRequest { label_selector: "never=matches".into(), ..Default::default() })
                .await
                .unwrap(),
        );
        assert_eq!(st.hub.watchers(), 53);
        drop(idle);
        drop(a);
        assert_eq!(st.hub.watchers(), 1);
        drop(b);
        assert_eq!(st.hub.watchers(), 0);
    }

    /// Creating a Host was a way around `Tests.Claim`: one created with a
    /// claim in its status stayed claimed. A host is now born free.
    #[tokio::test]
    async fn a_host_cannot_be_created_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&dir).await;
        let hosts = ResourceService::<Host>::new(st);
        let mut h = Host::default();
        h.meta_mut().name = "h".into();
        h.status_mut().claim =
            Some(testbus_proto::HostClaim { test: "t".into(), test_uid: "u".into(), ..Default::default() });
        let made = hosts.create(&admin(), h).await.unwrap();
        assert_eq!(made.status().claim, None);
    }

    /// A lease renewal between the scheduler's choice and the claim does
    /// not undo the claim (a 1,000-host test among renewing agents never
    /// started); a host that no longer fits its member's requirement does.
    /// A renewal waits while a claim holds its host's lock.
    #[tokio::test]
    async fn a_claim_survives_a_lease_renewal_but_not_a_change_of_fit() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&dir).await;
        let hosts = ResourceService::<Host>::new(st.clone());
        let tests = ResourceService::<Test>::new(st.clone());
        let mut chosen = Vec::new();
        for name in ["h1", "h2"] {
            let mut h = Host::default();
            h.meta_mut().name = name.into();
            hosts.create(&admin(), h).await.unwrap();
            let (mut h, _) = st.load::<Host>(name).await.unwrap();
            let s = h.status_mut();
            s.phase = HostPhase::Ready.into();
            s.capabilities = vec!["x".into()];
            s.agent_id = "agent".into();
            s.lease_duration_seconds = 10;
            chosen.push(hosts.update_status(&admin(), h).await.unwrap());
        }
        let claim = |t: &Test, h: &Host| ClaimRequest {
            test: t.name().into(),
            test_resource_version: t.resource_version().into(),
            assignments: vec![testbus_proto::ClaimAssignment {
                role: "a".into(),
                host: h.name().into(),
                host_resource_version: h.resource_version().into(),
            }],
            status: Some(testbus_proto::TestStatus { phase: TestPhase::Running.into(), ..Default::default() }),
        };
        let mut wants_x = test_obj("t1");
        wants_x.spec_mut().hosts[0].capabilities = vec!["x".into()];
        let t1 = tests.create(&admin(), wants_x.clone()).await.unwrap();
        let renew = RenewLeaseRequest { name: "h1".into(), agent_id: "agent".into(), release: false };
        hosts.renew_lease(&admin(), renew.clone()).await.unwrap();
        let claimed = tests.claim(&admin(), claim(&t1, &chosen[0])).await.expect("claimed across a renewal");
        assert_eq!(claimed.status().phase, TestPhase::Running);
        assert_eq!(st.load::<Host>("h1").await.unwrap().0.status().claim.as_ref().unwrap().test, "t1");

        wants_x.meta_mut().name = "t2".into();
        let t2 = tests.create(&admin(), wants_x).await.unwrap();
        let (mut h2, _) = st.load::<Host>("h2").await.unwrap();
        h2.status_mut().capabilities = vec!["y".into()];
        hosts.update_status(&admin(), h2).await.unwrap();
        let err = tests.claim(&admin(), claim(&t2, &chosen[1])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{}", err.message());
        assert!(err.message().contains("changed since it was chosen"), "{}", err.message());

        let held = st.host_locks.one("h1").await;
        let mut renewal = tokio::spawn({
            let hosts = ResourceService::<Host>::new(st.clone());
            async move { hosts.renew_lease(&admin(), renew).await }
        });
        // Unheld, a renewal takes about a millisecond here.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut renewal).await;
        assert!(waited.is_err(), "a renewal did not wait for the host's lock");
        drop(held);
        renewal.await.unwrap().unwrap();
    }

    /// The hub's task held the hub, so a dropped hub (a replica's state
    /// being rebuilt, a test) kept following the store forever.
    #[tokio::test]
    async fn a_dropped_hub_stops_following_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 1000).unwrap());
        let hub = Hub::start(16, store.clone()).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.watch_count() != 1 {
            assert!(tokio::time::Instant::now() < deadline, "the hub never watched the store");
            tokio::task::yield_now().await;
        }
        let weak = Arc::downgrade(&hub);
        drop(hub);
        assert!(weak.upgrade().is_none(), "something still holds the hub");
        while store.watch_count() != 0 {
            assert!(tokio::time::Instant::now() < deadline, "the dropped hub still watches the store");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn watch_resumes_from_a_revision_or_says_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 1000).unwrap());
        let hub = Hub::start(16, store.clone()).await.unwrap();
        let blobs = crate::blobs::BlobStore::open(&dir.path().join("blobs"), 0).unwrap();
        let st = ApiState::new(store, hub, blobs, None, Default::default());
        let tests = ResourceService::<Test>::new(st.clone());
        let first = tests.create(&admin(), test_obj("t0")).await.unwrap();
        // Let the hub see it before resuming from its revision.
        let mut live = tests.watch(&admin(), WatchRequest::default()).await.unwrap();
        tests.create(&admin(), test_obj("t1")).await.unwrap();
        let _ = live.next().await;
        let mut resumed = tests
            .watch(&admin(), WatchRequest { resource_version: first.resource_version().into(), ..Default::default() })
            .await
            .unwrap();
        let e = resumed.next().await.unwrap().unwrap();
        assert_eq!((e.kind, e.object.unwrap().name().to_string()), (EventType::Added, "t1".to_string()));
        for i in 2..40 {
            tests.create(&admin(), test_obj(&format!("t{i}"))).await.unwrap();
        }
        // Wait until the hub has moved past the ring's capacity.
        loop {
            let e = live.next().await.unwrap().unwrap();
            if e.object.as_ref().is_some_and(|o| o.name() == "t39") {
                break;
            }
        }
        let mut old = tests
            .watch(&admin(), WatchRequest { resource_version: first.resource_version().into(), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(old.next().await.unwrap().unwrap().kind, EventType::Compacted);
        // A revision the store has not reached: refused, not a watch that
        // never delivers and never ends.
        let err = tests
            .watch(&admin(), WatchRequest { resource_version: "99999999".into(), ..Default::default() })
            .await
            .err()
            .expect("a watch from the future");
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
        assert!(err.message().contains("in the future"), "{err:?}");
    }
}
