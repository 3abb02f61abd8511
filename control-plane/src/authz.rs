//! Who may do what: every rule of authorization is here, and every handler
//! asks this module before it acts.
//!
//! The caller is what the transport proved ([`Caller`], put on each
//! connection by the server's acceptor, read from the request's
//! extensions), never a field of the request:
//! - the data dir's unix socket is admin (its file permissions say who);
//! - a TCP client of an `--insecure` listener (loopback only) is admin:
//!   development;
//! - over TLS, a client certificate signed by the CA names a user (admin or
//!   viewer), an agent (its host) or another replica; a client without one
//!   may only join.
//!
//! Two steps: [`admit`] decides from the caller and the verb alone, and
//! gives an agent a [`Scope::Host`]; the handler then shows that scope the
//! object the call touches (`Scope::host`, `process`, `test`,
//! `processes_selector`) once it has it.
use crate::error::ApiError;
use std::time::SystemTime;
use testbus_pki::Role;
use testbus_proto::selector::FieldSelector;
use testbus_proto::{Kind, ObjectMeta, Process, Resource, Test};
use tonic::{Request, Status};

/// Who is calling, as the transport proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The data dir's unix socket.
    Local,
    /// A TCP client of an `--insecure` (loopback) listener.
    Insecure,
    /// A certificate of the CA; `pool` for the agent of a pool's guest.
    Certified { name: String, role: Role, issued: SystemTime, pool: Option<String> },
    /// TLS without a client certificate.
    Anonymous,
}

/// What the server's acceptor puts on each connection: who is calling,
/// and whether a connection of a caller without a certificate has proven
/// itself since (a join, a dashboard login or a page its session cookie
/// opened). One that has not is closed a few seconds after it came.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub caller: Caller,
    proven: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ConnInfo {
    pub fn new(caller: Caller) -> ConnInfo {
        let proven = !matches!(caller, Caller::Anonymous);
        ConnInfo { caller, proven: std::sync::Arc::new(proven.into()) }
    }

    pub fn proven(&self) -> bool {
        self.proven.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Marks the connection of `extensions` proven (see [`ConnInfo`]).
    pub fn prove(extensions: &tonic::Extensions) {
        if let Some(c) = extensions.get::<ConnInfo>() {
            c.proven.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Caller {
    /// The caller of a request, from its connection; a request that came
    /// by no connection of ours (an in-process call) is anonymous unless it
    /// says otherwise.
    pub fn of<T>(req: &Request<T>) -> Caller {
        Caller::in_extensions(req.extensions())
    }

    /// [`Caller::of`], from a request's extensions.
    pub fn in_extensions(ext: &tonic::Extensions) -> Caller {
        ext.get::<ConnInfo>()
            .map(|c| c.caller.clone())
            .or_else(|| ext.get::<Caller>().cloned())
            .unwrap_or(Caller::Anonymous)
    }

    /// As an error message names it.
    pub fn describe(&self) -> String {
        match self {
            Caller::Local => "the local socket".into(),
            Caller::Insecure => "an insecure client".into(),
            Caller::Certified { name, role, .. } => format!("{role} {name:?}"),
            Caller::Anonymous => "a client without a certificate".into(),
        }
    }

    /// The name in its identity space, for a certificate: what a
    /// revocation names.
    pub fn subject(&self) -> Option<testbus_pki::Subject> {
        match self {
            Caller::Certified { name, role, .. } => Some(testbus_pki::Subject::of(*role, name)),
            _ => None,
        }
    }

    /// The agent's host, if this is an agent.
    pub fn agent(&self) -> Option<&str> {
        match self {
            Caller::Certified { name, role: Role::Agent, .. } => Some(name),
            _ => None,
        }
    }
}

/// What a call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    UpdateStatus,
    Delete,
    RenewLease,
    Claim,
    SetEnv,
    RecordResult,
    Finish,
    /// Run a command on a test's hosts (`Tests.Exec`).
    Exec,
    Snapshot,
    AppendOutput,
    ReadOutput,
    /// Barriers and messages.
    Sync,
    UploadBlob,
    ReadBlob,
    Join,
    Renew,
    CreateToken,
    Revoke,
}

impl Verb {
    fn reads(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch | Verb::ReadOutput | Verb::ReadBlob)
    }

    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::UpdateStatus => "update the status of",
            Verb::Delete => "delete",
            Verb::RenewLease => "renew the lease of",
            Verb::Claim => "claim hosts for",
            Verb::SetEnv => "set the env of",
            Verb::RecordResult => "record results of",
            Verb::Finish => "finish",
            Verb::Exec => "run commands in",
            Verb::Snapshot => "snapshot guests of",
            Verb::AppendOutput => "append output of",
            Verb::ReadOutput => "read output of",
            Verb::Sync => "sync or message for",
            Verb::UploadBlob => "upload",
            Verb::ReadBlob => "read",
            Verb::Join => "join as",
            Verb::Renew => "renew the certificate of",
            Verb::CreateToken => "create",
            Verb::Revoke => "revoke",
        }
    }
}

/// What an admitted caller may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// An agent: its host and what runs on it; `pool` when its host is a
    /// guest of that pool (its certificate says so).
    Host {
        host: String,
        pool: Option<String>,
    },
}

/// Labels and annotations under this prefix are the controllers' (the
/// pool a guest is of, its clean mark, the quarantine's bookkeeping): no
/// agent writes one.
pub const RESERVED_PREFIX: &str = "testbus.io/";

/// The first key under [`RESERVED_PREFIX`] whose value differs between
/// `a` and `b` (present in one only, or with another value).
fn reserved_change<'a>(
    a: &'a std::collections::BTreeMap<String, String>,
    b: &'a std::collections::BTreeMap<String, String>,
) -> Option<&'a str> {
    let reserved = |m: &'a std::collections::BTreeMap<String, String>| {
        m.iter().filter(|(k, _)| k.starts_with(RESERVED_PREFIX)).map(|(k, v)| (k.as_str(), v.as_str()))
    };
    let differs = |x: &'a std::collections::BTreeMap<String, String>,
                   y: &std::collections::BTreeMap<String, String>| {
        reserved(x).find(|(k, v)| y.get(*k).map(String::as_str) != Some(*v)).map(|(k, _)| k)
    };
    differs(a, b).or_else(|| differs(b, a))
}

/// What of a Host's status an agent owns: its lease, agent id, facts,
/// capabilities, published vars and env. The rest (phase, claim,
/// conditions, failure counts, observed generation, message) is the
/// controllers' and the claim's: the first such field `new` changes.
pub fn host_status_not_agents(
    old: &testbus_proto::HostStatus,
    new: &testbus_proto::HostStatus,
) -> Option<&'static str> {
    let mut owned = new.clone();
    owned.capabilities = old.capabilities.clone();
    owned.vars = old.vars.clone();
    owned.facts = old.facts.clone();
    owned.lease_renew_time = old.lease_renew_time.clone();
    owned.lease_duration_seconds = old.lease_duration_seconds;
    owned.env = old.env.clone();
    owned.agent_id = old.agent_id.clone();
    let fields: [(&'static str, bool); 6] = [
        ("status.phase", owned.phase != old.phase),
        ("status.claim", owned.claim != old.claim),
        ("status.infraFailures", owned.infra_failures != old.infra_failures),
        ("status.conditions", owned.conditions != old.conditions),
        ("status.observedGeneration", owned.observed_generation != old.observed_generation),
        ("status.message", owned.message != old.message),
    ];
    let named = fields.iter().find(|(_, changed)| *changed).map(|(f, _)| *f);
    debug_assert!(named.is_some() || owned == *old, "a HostStatus field is missing from the list");
    named.or((owned != *old).then_some("status"))
}

fn denied(caller: &Caller, verb: Verb, what: &str) -> Status {
    let e = ApiError::PermissionDenied(format!("{} may not {} {what}", caller.describe(), verb.as_str()));
    e.into()
}

/// What a caller acts on, as authorization sees it: objects of a kind, or
/// one of the services that keep no objects. An enum, so that a
/// misspelt target is a compile error (a string was denied in silence:
/// "certificate" and "certificates" both were in use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Objects(Kind),
    /// Process output (Output service).
    Output,
    /// Barriers and messages (Sync service).
    Sync,
    Blobs,
    /// Certificates: joins, renewals, revocations.
    Certificates,
    /// Join and dashboard tokens.
    Tokens,
    Dashboard,
    Metrics,
}

impl Target {
    /// As messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Objects(k) => k.name(),
            Target::Output => "output",
            Target::Sync => "sync",
            Target::Blobs => "blobs",
            Target::Certificates => "certificates",
            Target::Tokens => "tokens",
            Target::Dashboard => "dashboard",
            Target::Metrics => "metrics",
        }
    }
}

impl From<Kind> for Target {
    fn from(k: Kind) -> Target {
        Target::Objects(k)
    }
}

/// Whether `caller` may `verb` on `target` at all.
pub fn admit(caller: &Caller, verb: Verb, target: Target) -> Result<Scope, Status> {
    let kind = target.name();
    match caller {
        Caller::Local | Caller::Insecure => Ok(Scope::All),
        Caller::Certified { role: Role::Admin | Role::Replica, .. } => Ok(Scope::All),
        Caller::Certified { role: Role::Viewer, .. } if verb.reads() => Ok(Scope::All),
        Caller::Certified { name, role: Role::Agent, pool, .. } if agent_may(verb, target) => {
            Ok(Scope::Host { host: name.clone(), pool: pool.clone() })
        }
        Caller::Anonymous if verb == Verb::Join => Ok(Scope::All),
        Caller::Anonymous => Err(ApiError::Unauthenticated(format!(
            "{} may not {} {kind}: connect with a certificate (testbusctl: TESTBUS_CONFIG, made by \
             `testbus-control-plane user create`; an agent: --join-token)",
            caller.describe(),
            verb.as_str()
        ))
        .into()),
        _ => Err(denied(caller, verb, kind)),
    }
}

/// What an agent may do at all; which objects, its [`Scope`] says.
fn agent_may(verb: Verb, target: Target) -> bool {
    use Verb::*;
    match target {
        Target::Objects(Kind::Host) => matches!(verb, Get | Create | Update | UpdateStatus | RenewLease),
        Target::Objects(Kind::Process) => matches!(verb, Get | List | Watch | Update | UpdateStatus),
        Target::Objects(Kind::Test) => verb == Get,
        // Reads: only the stdin of its host's processes (the read checks).
        Target::Output => matches!(verb, AppendOutput | ReadOutput),
        Target::Sync => verb == Sync,
        Target::Blobs => verb == ReadBlob,
        Target::Certificates => verb == Renew,
        Target::Objects(Kind::HostPool) | Target::Tokens | Target::Dashboard | Target::Metrics => false,
    }
}

impl Scope {
    /// The agent's host, for an agent.
    pub fn agent_host(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Host { host, .. } => Some(host),
        }
    }

    fn only(&self, caller_host: &str, ok: bool, verb: Verb, what: impl FnOnce() -> String) -> Result<(), Status> {
        if ok {
            return Ok(());
        }
        let who = Caller::Certified {
            name: caller_host.into(),
            role: Role::Agent,
            issued: SystemTime::UNIX_EPOCH,
            pool: None,
        };
        Err(denied(&who, verb, &format!("{}: an agent acts only for its own host", what())))
    }

    /// What no agent may do, even for its own host (`what` says what).
    pub fn not_an_agent(&self, verb: Verb, what: impl FnOnce() -> String) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host { host: h, .. } => self.only(h, false, verb, what),
        }
    }

    /// The Host named `name`.
    pub fn host(&self, verb: Verb, name: &str) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host { host: h, .. } => self.only(h, h == name, verb, || format!("Host {name:?}")),
        }
    }

    /// A Process (as stored: its host is the one it was made for).
    pub fn process(&self, verb: Verb, p: &Process) -> Result<(), Status> {
        self.process_on(verb, p.name(), &p.spec().host_name)
    }

    /// The Process `name` of host `host`.
    pub fn process_on(&self, verb: Verb, name: &str, host: &str) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host { host: h, .. } => {
                self.only(h, host == h, verb, || format!("Process {name:?} of host {host:?}"))
            }
        }
    }

    /// A Test: an agent reads those that hold its host.
    pub fn test(&self, verb: Verb, t: &Test) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host { host: h, .. } => self.only(h, t.status().claims.values().any(|c| c == h), verb, || {
                format!("Test {:?}, which does not hold its host", t.name())
            }),
        }
    }

    /// An update that changes the spec of `what` (`changed`): an agent
    /// changes no spec, its host's included (it would uncordon itself, or
    /// stop processes); it writes metadata (labels, finalizers) and status.
    pub fn spec_change(&self, what: impl FnOnce() -> String, changed: bool) -> Result<(), Status> {
        match self {
            Scope::Host { host: h, .. } if changed => {
                self.only(h, false, Verb::Update, || format!("the spec of {}; it writes labels and status", what()))
            }
            _ => Ok(()),
        }
    }

    /// The metadata an agent writes (`old`: as stored, None on create):
    /// labels and annotations of its own, never one under `testbus.io/`
    /// (the controllers' marks), never finalizers or owners.
    pub fn metadata(&self, what: impl Fn() -> String, old: &ObjectMeta, new: &ObjectMeta) -> Result<(), Status> {
        let Scope::Host { host: h, .. } = self else { return Ok(()) };
        let refuse = |field: String| {
            self.only(h, false, Verb::Update, || {
                format!("{field} of {}: the controllers write it, agents do not", what())
            })
        };
        if new.finalizers != old.finalizers {
            return refuse("metadata.finalizers".into());
        }
        if new.owner_references != old.owner_references {
            return refuse("metadata.ownerReferences".into());
        }
        if let Some(k) = reserved_change(&old.labels, &new.labels) {
            return refuse(format!("metadata.labels[{k}]"));
        }
        if let Some(k) = reserved_change(&old.annotations, &new.annotations) {
            return refuse(format!("metadata.annotations[{k}]"));
        }
        Ok(())
    }

    /// The metadata of an object an agent creates (its Host): as
    /// [`Scope::metadata`] from nothing, except that the Host of a pool's
    /// guest gets its pool's label from the agent's certificate (it may
    /// ask for that label, with that value only).
    pub fn created_metadata(&self, what: impl Fn() -> String, meta: &mut ObjectMeta) -> Result<(), Status> {
        let Scope::Host { pool, .. } = self else { return Ok(()) };
        let mut expected = ObjectMeta::default();
        if let Some(p) = pool {
            let label = testbus_proto::pool::POOL_LABEL.to_string();
            expected.labels.insert(label.clone(), p.clone());
            meta.labels.entry(label).or_insert_with(|| p.clone());
        }
        self.metadata(what, &expected, meta)
    }

    /// A list or watch of Processes, by its parsed field selector: an
    /// agent's must select its own host's (the parse refused a field given
    /// twice, so this is the one value the filter applies).
    pub fn processes_selector(&self, verb: Verb, fields: &FieldSelector) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host { host: h, .. } => {
                let ok = fields.host_name.as_deref() == Some(h.as_str());
                self.only(h, ok, verb, || format!("Processes without the field selector spec.hostName={h}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str, role: Role) -> Caller {
        Caller::Certified { name: name.into(), role, issued: SystemTime::now(), pool: None }
    }

    fn process_on(host: &str) -> Process {
        let mut p = Process::default();
        p.meta_mut().name = "p1".into();
        p.spec_mut().host_name = host.into();
        p
    }

    #[test]
    fn admins_and_the_local_socket_do_everything() {
        for c in [Caller::Local, Caller::Insecure, cert("root", Role::Admin), cert("cp-b", Role::Replica)] {
            for v in [Verb::Delete, Verb::Create, Verb::CreateToken, Verb::Sync] {
                assert_eq!(admit(&c, v, Kind::Test.into()).unwrap(), Scope::All, "{c:?} {v:?}");
            }
        }
    }

    #[test]
    fn a_viewer_reads_and_writes_nothing() {
        let v = cert("alice", Role::Viewer);
        for verb in [Verb::Get, Verb::List, Verb::Watch, Verb::ReadOutput, Verb::ReadBlob] {
            assert!(admit(&v, verb, Kind::Test.into()).is_ok(), "{verb:?}");
        }
        for verb in [
            Verb::Create,
            Verb::Update,
            Verb::Delete,
            Verb::Claim,
            Verb::Finish,
            Verb::Exec,
            Verb::UploadBlob,
            Verb::Sync,
        ] {
            let e = admit(&v, verb, Kind::Test.into()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("viewer \"alice\" may not"), "{}", e.message());
        }
    }

    #[test]
    fn without_a_certificate_only_join() {
        assert!(admit(&Caller::Anonymous, Verb::Join, Target::Certificates).is_ok());
        let e = admit(&Caller::Anonymous, Verb::List, Kind::Host.into()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("user create"), "{}", e.message());
    }

    #[test]
    fn an_agent_acts_for_its_own_host_only() {
        let a = cert("host-a", Role::Agent);
        let scope = admit(&a, Verb::UpdateStatus, Kind::Host.into()).unwrap();
        assert!(scope.host(Verb::UpdateStatus, "host-a").is_ok());
        let e = scope.host(Verb::UpdateStatus, "host-b").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("agent \"host-a\" may not update the status of Host \"host-b\""), "{e:?}");
        let scope = admit(&a, Verb::UpdateStatus, Kind::Process.into()).unwrap();
        assert!(scope.process(Verb::UpdateStatus, &process_on("host-a")).is_ok());
        assert!(scope.process(Verb::UpdateStatus, &process_on("host-b")).is_err());
        let sel = |s: &str| FieldSelector::parse(s).unwrap();
        assert!(scope.processes_selector(Verb::Watch, &sel("spec.hostName=host-a")).is_ok());
        assert!(scope.processes_selector(Verb::Watch, &sel("")).is_err());
        assert!(scope.processes_selector(Verb::Watch, &sel("spec.hostName=host-b")).is_err());
        assert!(scope.processes_selector(Verb::Watch, &sel("metadata.name=p,spec.hostName=host-a")).is_ok());
        let host_a = || "Host \"host-a\"".to_string();
        let e = scope.spec_change(host_a, true).unwrap_err();
        assert!(e.message().contains("may not update the spec of Host \"host-a\""), "{e:?}");
        assert!(scope.spec_change(host_a, false).is_ok());
        assert!(Scope::All.spec_change(host_a, true).is_ok());
        // Never: other kinds, creating processes or tests, deleting.
        for (verb, kind) in [
            (Verb::Create, Kind::Test.into()),
            (Verb::Create, Kind::Process.into()),
            (Verb::Exec, Kind::Test.into()),
            (Verb::Delete, Kind::Host.into()),
            (Verb::List, Kind::Test.into()),
            (Verb::Get, Kind::HostPool.into()),
            (Verb::UploadBlob, Target::Blobs),
            (Verb::CreateToken, Target::Tokens),
        ] {
            assert!(admit(&a, verb, kind).is_err(), "{verb:?} {kind:?}");
        }
        let mut t = Test::default();
        t.meta_mut().name = "t".into();
        let scope = admit(&a, Verb::Get, Kind::Test.into()).unwrap();
        assert!(scope.test(Verb::Get, &t).is_err());
        t.status_mut().claims.insert("server".into(), "host-a".into());
        assert!(scope.test(Verb::Get, &t).is_ok());
    }

    #[test]
    fn an_agent_writes_only_its_own_part_of_its_host_status() {
        use testbus_proto::{HostClaim, HostStatus};
        let old = HostStatus {
            phase: "Ready".into(),
            claim: Some(HostClaim { test: "t1".into(), test_uid: "u".into(), role: "a".into() }),
            ..Default::default()
        };
        let mut mine = old.clone();
        mine.lease_renew_time = "2026-12-06T23:00:00Z".into();
        mine.capabilities = vec!["nfs".into()];
        mine.vars.insert("x".into(), "1".into());
        mine.agent_id = "a1".into();
        assert_eq!(host_status_not_agents(&old, &mine), None);
        let mut released = mine.clone();
        released.claim = None;
        assert_eq!(host_status_not_agents(&old, &released), Some("status.claim"));
        let mut healthy = mine.clone();
        healthy.infra_failures = 0;
        healthy.phase = "NotReady".into();
        assert_eq!(host_status_not_agents(&old, &healthy), Some("status.phase"));
        let mut conditions = mine;
        conditions.conditions.push(Default::default());
        assert_eq!(host_status_not_agents(&old, &conditions), Some("status.conditions"));
    }

    #[test]
    fn an_agent_writes_no_marks_finalizers_or_owners() {
        let agent = Scope::Host { host: "h".into(), pool: None };
        let what = || "Host \"h\"".to_string();
        let mut old = ObjectMeta::default();
        old.labels.insert("testbus.io/pool".into(), "vms".into());
        old.annotations.insert("testbus.io/healthy-since".into(), "x".into());
        old.labels.insert("rack".into(), "r1".into());
        let mut ok = old.clone();
        ok.labels.insert("rack".into(), "r2".into());
        ok.annotations.insert("note".into(), "mine".into());
        assert!(agent.metadata(what, &old, &ok).is_ok());
        type Change = fn(&mut ObjectMeta);
        let changes: [(&str, Change); 6] = [
            ("metadata.annotations[testbus.io/clean]", |m| {
                m.annotations.insert("testbus.io/clean".into(), "true".into());
            }),
            ("metadata.labels[testbus.io/pool]", |m| {
                m.labels.remove("testbus.io/pool");
            }),
            ("metadata.labels[testbus.io/pool]", |m| {
                m.labels.insert("testbus.io/pool".into(), "other".into());
            }),
            ("metadata.annotations[testbus.io/healthy-since]", |m| {
                m.annotations.insert("testbus.io/healthy-since".into(), "y".into());
            }),
            ("metadata.finalizers", |m| m.finalizers.push("keep.me/forever".into())),
            ("metadata.ownerReferences", |m| m.owner_references.push(Default::default())),
        ];
        for (field, change) in changes {
            let mut bad = old.clone();
            change(&mut bad);
            let e = agent.metadata(what, &old, &bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains(field), "{field}: {}", e.message());
            assert!(Scope::All.metadata(what, &old, &bad).is_ok(), "admins and controllers write them");
        }
        // Created: a guest's Host gets its pool's label from its
        // certificate; it may ask for that one, no other.
        let guest = Scope::Host { host: "vms-0a1b2".into(), pool: Some("vms".into()) };
        let mut m = ObjectMeta::default();
        guest.created_metadata(what, &mut m).unwrap();
        assert_eq!(m.labels.get("testbus.io/pool").map(String::as_str), Some("vms"));
        let mut m = ObjectMeta::default();
        m.labels.insert("testbus.io/pool".into(), "prod".into());
        assert!(guest.created_metadata(what, &mut m).is_err());
        let mut m = ObjectMeta::default();
        m.labels.insert("testbus.io/pool".into(), "vms".into());
        assert!(agent.created_metadata(what, &mut m).is_err(), "an agent outside pools joins none");
        let mut m = ObjectMeta::default();
        m.annotations.insert("testbus.io/clean".into(), "true".into());
        assert!(guest.created_metadata(what, &mut m).is_err(), "nobody is born clean");
    }
}
