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
use testbus_proto::{Process, Resource, Test};
use tonic::{Request, Status};

/// Who is calling, as the transport proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The data dir's unix socket.
    Local,
    /// A TCP client of an `--insecure` (loopback) listener.
    Insecure,
    /// A certificate of the CA.
    Certified { name: String, role: Role, issued: SystemTime },
    /// TLS without a client certificate.
    Anonymous,
}

impl Caller {
    /// The caller of a request; a request that came by no connection of
    /// ours (an in-process call) has none and is anonymous.
    pub fn of<T>(req: &Request<T>) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous)
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
    /// An agent: its host and what runs on it.
    Host(String),
}

fn denied(caller: &Caller, verb: Verb, what: &str) -> Status {
    let e = ApiError::PermissionDenied(format!("{} may not {} {what}", caller.describe(), verb.as_str()));
    e.into()
}

/// Whether `caller` may `verb` objects of `kind` (a Kind's name, or
/// "output", "blobs", "tokens", ...) at all.
pub fn admit(caller: &Caller, verb: Verb, kind: &str) -> Result<Scope, Status> {
    match caller {
        Caller::Local | Caller::Insecure => Ok(Scope::All),
        Caller::Certified { role: Role::Admin | Role::Replica, .. } => Ok(Scope::All),
        Caller::Certified { role: Role::Viewer, .. } if verb.reads() => Ok(Scope::All),
        Caller::Certified { name, role: Role::Agent, .. } if agent_may(verb, kind) => Ok(Scope::Host(name.clone())),
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
fn agent_may(verb: Verb, kind: &str) -> bool {
    use Verb::*;
    match kind {
        "Host" => matches!(verb, Get | Create | Update | UpdateStatus | RenewLease),
        "Process" => matches!(verb, Get | List | Watch | Update | UpdateStatus),
        "Test" => verb == Get,
        "output" => verb == AppendOutput,
        "sync" => verb == Sync,
        "blobs" => verb == ReadBlob,
        "certificate" => verb == Renew,
        _ => false,
    }
}

impl Scope {
    fn only(&self, caller_host: &str, ok: bool, verb: Verb, what: impl FnOnce() -> String) -> Result<(), Status> {
        if ok {
            return Ok(());
        }
        let who = Caller::Certified { name: caller_host.into(), role: Role::Agent, issued: SystemTime::UNIX_EPOCH };
        Err(denied(&who, verb, &format!("{}: an agent acts only for its own host", what())))
    }

    /// The Host named `name`.
    pub fn host(&self, verb: Verb, name: &str) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host(h) => self.only(h, h == name, verb, || format!("Host {name:?}")),
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
            Scope::Host(h) => self.only(h, host == h, verb, || format!("Process {name:?} of host {host:?}")),
        }
    }

    /// A Test: an agent reads those that hold its host.
    pub fn test(&self, verb: Verb, t: &Test) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host(h) => self.only(h, t.status().claims.values().any(|c| c == h), verb, || {
                format!("Test {:?}, which does not hold its host", t.name())
            }),
        }
    }

    /// An update that changes the spec of `what` (`changed`): an agent
    /// changes no spec, its host's included (it would uncordon itself, or
    /// stop processes); it writes metadata (labels, finalizers) and status.
    pub fn spec_change(&self, what: impl FnOnce() -> String, changed: bool) -> Result<(), Status> {
        match self {
            Scope::Host(h) if changed => {
                self.only(h, false, Verb::Update, || format!("the spec of {}; it writes labels and status", what()))
            }
            _ => Ok(()),
        }
    }

    /// A list or watch of Processes: an agent's must select its host's.
    pub fn processes_selector(&self, verb: Verb, field_selector: &str) -> Result<(), Status> {
        match self {
            Scope::All => Ok(()),
            Scope::Host(h) => {
                let ok = field_selector.split(',').map(str::trim).any(|s| s == format!("spec.hostName={h}"));
                self.only(h, ok, verb, || format!("Processes without the field selector spec.hostName={h}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str, role: Role) -> Caller {
        Caller::Certified { name: name.into(), role, issued: SystemTime::now() }
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
                assert_eq!(admit(&c, v, "Test").unwrap(), Scope::All, "{c:?} {v:?}");
            }
        }
    }

    #[test]
    fn a_viewer_reads_and_writes_nothing() {
        let v = cert("alice", Role::Viewer);
        for verb in [Verb::Get, Verb::List, Verb::Watch, Verb::ReadOutput, Verb::ReadBlob] {
            assert!(admit(&v, verb, "Test").is_ok(), "{verb:?}");
        }
        for verb in [Verb::Create, Verb::Update, Verb::Delete, Verb::Claim, Verb::Finish, Verb::UploadBlob, Verb::Sync]
        {
            let e = admit(&v, verb, "Test").unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("viewer \"alice\" may not"), "{}", e.message());
        }
    }

    #[test]
    fn without_a_certificate_only_join() {
        assert!(admit(&Caller::Anonymous, Verb::Join, "certificate").is_ok());
        let e = admit(&Caller::Anonymous, Verb::List, "Host").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("user create"), "{}", e.message());
    }

    #[test]
    fn an_agent_acts_for_its_own_host_only() {
        let a = cert("host-a", Role::Agent);
        let scope = admit(&a, Verb::UpdateStatus, "Host").unwrap();
        assert!(scope.host(Verb::UpdateStatus, "host-a").is_ok());
        let e = scope.host(Verb::UpdateStatus, "host-b").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("agent \"host-a\" may not update the status of Host \"host-b\""), "{e:?}");
        let scope = admit(&a, Verb::UpdateStatus, "Process").unwrap();
        assert!(scope.process(Verb::UpdateStatus, &process_on("host-a")).is_ok());
        assert!(scope.process(Verb::UpdateStatus, &process_on("host-b")).is_err());
        assert!(scope.processes_selector(Verb::Watch, "spec.hostName=host-a").is_ok());
        assert!(scope.processes_selector(Verb::Watch, "").is_err());
        assert!(scope.processes_selector(Verb::Watch, "spec.hostName=host-b").is_err());
        let host_a = || "Host \"host-a\"".to_string();
        let e = scope.spec_change(host_a, true).unwrap_err();
        assert!(e.message().contains("may not update the spec of Host \"host-a\""), "{e:?}");
        assert!(scope.spec_change(host_a, false).is_ok());
        assert!(Scope::All.spec_change(host_a, true).is_ok());
        // Never: other kinds, creating processes or tests, deleting.
        for (verb, kind) in [
            (Verb::Create, "Test"),
            (Verb::Create, "Process"),
            (Verb::Delete, "Host"),
            (Verb::List, "Test"),
            (Verb::Get, "HostPool"),
            (Verb::ReadOutput, "output"),
            (Verb::UploadBlob, "blobs"),
            (Verb::CreateToken, "tokens"),
        ] {
            assert!(admit(&a, verb, kind).is_err(), "{verb:?} {kind}");
        }
        let mut t = Test::default();
        t.meta_mut().name = "t".into();
        let scope = admit(&a, Verb::Get, "Test").unwrap();
        assert!(scope.test(Verb::Get, &t).is_err());
        t.status_mut().claims.insert("server".into(), "host-a".into());
        assert!(scope.test(Verb::Get, &t).is_ok());
    }
}
