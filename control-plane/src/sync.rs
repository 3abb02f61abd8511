//! In-test synchronisation: barriers and messages between the processes of
//! one test, kept in the store under `/sync/<test uid>/`.
//!
//! Every call that waits re-evaluates from current state whenever something
//! of its own test changes (see `sync_index`: one index for all waiters, fed
//! by the hub and one watch of the sync keys), so it sees a participant's
//! death or host loss as soon as the controllers record it, and a change to
//! another test costs it nothing.
//! A barrier's participants are every member the test claimed (or those of
//! the roles the call names), read from the claim by each caller: fixed by
//! the claim, never by who arrives first or which processes run.
use crate::authz::{Scope, Verb};
use crate::hub;
use crate::state::ApiState;
use crate::store::{Compare, Op};
use crate::sync_index::{SyncIndex, Wakeup};
use std::collections::{BTreeMap, BTreeSet};
use testbus_proto::states::ProcessPhase;
use testbus_proto::sync_server::Sync;
use testbus_proto::validate::{member_matches, sync_key};
use testbus_proto::{
    duration, phase, BarrierRequest, BarrierResponse, Kind, Object, Process, RecvRequest, RecvResponse, Resource,
    SendRequest, SendResponse, SyncMessage, Test,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

/// Largest value `send` accepts.
pub const MAX_VALUE: usize = 1 << 20;

#[derive(Clone)]
pub struct SyncService {
    st: ApiState,
    index: SyncIndex,
}

/// Waits for the next change of one test, or fails at the deadline.
/// Callers re-evaluate from current state after each change.
struct Waiter {
    wake: Wakeup,
    deadline: Option<Instant>,
    what: String,
}

impl Waiter {
    async fn changed(&mut self) -> Result<(), Status> {
        let timed_out = match self.deadline {
            Some(d) => tokio::time::timeout_at(d, self.wake.changed()).await.is_err(),
            None => {
                self.wake.changed().await;
                false
            }
        };
        if timed_out {
            return Err(Status::deadline_exceeded(format!("timed out waiting for {}", self.what)));
        }
        Ok(())
    }
}

fn store_err(e: crate::store::StoreError) -> Status {
    crate::error::ApiError::store("sync", e).into()
}

impl SyncService {
    /// The service, and the task that feeds its index (until `stop`).
    pub fn new(st: ApiState, stop: tokio_util::sync::CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let (index, feed) = SyncIndex::start(st.clone(), stop);
        (SyncService { st, index }, feed)
    }

    async fn object(&self, kind: Kind, name: &str) -> Result<Option<Object>, Status> {
        let kv = self.st.store.get(&hub::key(kind, name)).await.map_err(store_err)?;
        Ok(kv.and_then(|kv| hub::decode(&kv.key, &kv.value, kv.mod_revision)))
    }

    async fn process(&self, name: &str) -> Result<Option<Process>, Status> {
        Ok(match self.object(Kind::Process, name).await? {
            Some(Object::Process(p)) => Some(p),
            _ => None,
        })
    }

    /// The calling process; it must be running.
    /// The running Process a call speaks for; an agent speaks only for
    /// those on its host (it knows which of its processes calls, by pid).
    async fn caller(&self, scope: &Scope, name: &str) -> Result<Process, Status> {
        let p = self.process(name).await?.ok_or_else(|| Status::not_found(format!("Process {name:?} not found")))?;
        scope.process(Verb::Sync, &p)?;
        if phase::process_terminal(&p.status().phase) {
            return Err(Status::failed_precondition(format!("Process {name:?} has ended")));
        }
        Ok(p)
    }

    /// A waiter on test `uid`, subscribed before the caller's first look.
    async fn waiter(&self, what: String, timeout: &str, uid: &str) -> Result<Waiter, Status> {
        let deadline = if timeout.is_empty() {
            None
        } else {
            let d = duration::parse(timeout).map_err(|e| Status::invalid_argument(format!("timeout: {e}")))?;
            Some(Instant::now() + d)
        };
        self.index.synced().await;
        Ok(Waiter { wake: self.index.subscribe(uid), deadline, what })
    }

    async fn test_of(&self, p: &Process) -> Result<Test, Status> {
        match self.object(Kind::Test, &p.spec().test).await? {
            Some(Object::Test(t)) if t.meta().uid == p.spec().test_uid => Ok(t),
            _ => Err(Status::not_found(format!("Test {:?} not found", p.spec().test))),
        }
    }

    /// Why one of `members` can no longer arrive or send, if one cannot: a
    /// process of it died (Failed, Killed, Lost), or its host is lost.
    fn member_failure(&self, test: &Test, members: &[&String]) -> Option<String> {
        let procs = self.index.processes(&test.meta().uid);
        for m in members {
            for p in procs.iter().filter(|p| &&p.role == m) {
                if matches!(p.phase.parse(), Ok(ProcessPhase::Failed | ProcessPhase::Killed | ProcessPhase::Lost)) {
                    let why = if p.message.is_empty() { String::new() } else { format!(": {}", p.message) };
                    return Some(format!("{m} on {} ended ({}{why})", p.host, p.phase));
                }
            }
            if let Some(host) = test.status().claims.get(*m) {
                if !self.index.host_ready(host) {
                    return Some(format!("{m} lost its host {host}"));
                }
            }
        }
        None
    }
}

#[tonic::async_trait]
impl Sync for SyncService {
    async fn barrier(&self, req: Request<BarrierRequest>) -> Result<Response<BarrierResponse>, Status> {
        let scope = self.st.authorize(&req, Verb::Sync, crate::authz::Target::Sync)?;
        let r = req.into_inner();
        sync_key(&r.name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let me = self.caller(&scope, &r.process).await?;
        let test = self.test_of(&me).await?;
        let participants: Vec<String> = test
            .status()
            .claims
            .keys()
            .filter(|m| r.roles.is_empty() || r.roles.iter().any(|role| member_matches(m, role)))
            .cloned()
            .collect();
        if !participants.contains(&me.spec().role) {
            return Err(Status::invalid_argument(format!(
                "role: {} is not among the participants of barrier {:?} ({})",
                me.spec().role,
                r.name,
                participants.join(", ")
            )));
        }
        let arrived_prefix = format!("/sync/{}/barrier/{}/", me.spec().test_uid, r.name);
        self.st
            .store
            .txn(vec![], vec![Op::Put(format!("{arrived_prefix}{}", me.spec().role), vec![])])
            .await
            .map_err(store_err)?;
        let mut waiter = self.waiter(format!("barrier {:?}", r.name), &r.timeout, &me.spec().test_uid).await?;
        loop {
            let (kvs, _) = self.st.store.list(&arrived_prefix).await.map_err(store_err)?;
            let arrived: BTreeSet<&str> = kvs.iter().map(|kv| &kv.key[arrived_prefix.len()..]).collect();
            let missing: Vec<&String> = participants.iter().filter(|m| !arrived.contains(m.as_str())).collect();
            if missing.is_empty() {
                return Ok(Response::new(BarrierResponse { participants }));
            }
            if let Some(why) = self.member_failure(&test, &missing) {
                return Err(Status::failed_precondition(format!(
                    "barrier {:?} failed: participant {why} before reaching it",
                    r.name
                )));
            }
            waiter.changed().await?;
        }
    }

    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let scope = self.st.authorize(&req, Verb::Sync, crate::authz::Target::Sync)?;
        let r = req.into_inner();
        sync_key(&r.key).map_err(|e| Status::invalid_argument(format!("key: {e}")))?;
        if r.value.len() > MAX_VALUE {
            return Err(Status::invalid_argument(format!("value: larger than {MAX_VALUE} bytes")));
        }
        let me = self.caller(&scope, &r.process).await?;
        let key = format!("/sync/{}/msg/{}/{}", me.spec().test_uid, r.key, me.spec().role);
        let out = self
            .st
            .store
            .txn(vec![Compare::ModRevision(key.clone(), 0)], vec![Op::Put(key.clone(), r.value.clone())])
            .await
            .map_err(store_err)?;
        if !out.succeeded {
            let old = self.st.store.get(&key).await.map_err(store_err)?.map(|kv| kv.value);
            if old.as_deref() != Some(r.value.as_slice()) {
                return Err(Status::already_exists(format!(
                    "{} already sent {:?} with another value; a sent value is immutable",
                    me.spec().role,
                    r.key
                )));
            }
        }
        Ok(Response::new(SendResponse {}))
    }

    async fn recv(&self, req: Request<RecvRequest>) -> Result<Response<RecvResponse>, Status> {
        let scope = self.st.authorize(&req, Verb::Sync, crate::authz::Target::Sync)?;
        let r = req.into_inner();
        sync_key(&r.key).map_err(|e| Status::invalid_argument(format!("key: {e}")))?;
        let me = self.caller(&scope, &r.process).await?;
        let uid = me.spec().test_uid.clone();
        let test = self.test_of(&me).await?;
        let expected: Vec<String> = if r.from.is_empty() {
            vec![]
        } else {
            let members: Vec<String> =
                test.status().claims.keys().filter(|m| member_matches(m, &r.from)).cloned().collect();
            if members.is_empty() {
                let known: Vec<&str> = test.status().claims.keys().map(String::as_str).collect();
                return Err(Status::invalid_argument(format!(
                    "from: no role or member {:?} in this test (members: {})",
                    r.from,
                    known.join(", ")
                )));
            }
            members
        };
        let prefix = format!("/sync/{uid}/msg/{}/", r.key);
        let what =
            format!("{:?}{}", r.key, if r.from.is_empty() { String::new() } else { format!(" from {}", r.from) });
        let mut waiter = self.waiter(what, &r.timeout, &uid).await?;
        loop {
            let (kvs, _) = self.st.store.list(&prefix).await.map_err(store_err)?;
            let got: BTreeMap<String, Vec<u8>> =
                kvs.into_iter().map(|kv| (kv.key[prefix.len()..].to_string(), kv.value)).collect();
            let reply = |senders: Vec<(&String, &Vec<u8>)>| {
                Response::new(RecvResponse {
                    messages: senders
                        .into_iter()
                        .map(|(s, v)| SyncMessage { sender: s.clone(), value: v.clone() })
                        .collect(),
                })
            };
            if expected.is_empty() {
                if !got.is_empty() {
                    return Ok(reply(got.iter().collect()));
                }
                // Nobody is left who could send it.
                let procs = self.index.processes(&uid);
                if !procs.iter().any(|p| p.name != me.name() && !phase::process_terminal(&p.phase)) {
                    return Err(Status::failed_precondition(format!(
                        "no other process of the test is running to send {:?}",
                        r.key
                    )));
                }
                waiter.changed().await?;
                continue;
            }
            let missing: Vec<&String> = expected.iter().filter(|m| !got.contains_key(*m)).collect();
            if missing.is_empty() {
                return Ok(reply(expected.iter().map(|m| (m, &got[m])).collect()));
            }
            if let Some(why) = self.member_failure(&test, &missing) {
                return Err(Status::failed_precondition(format!(
                    "recv {:?} failed: sender {why} before sending it",
                    r.key
                )));
            }
            waiter.changed().await?;
        }
    }
}
