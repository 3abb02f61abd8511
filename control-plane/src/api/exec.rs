//! `Tests.Exec`: a command run now on members of a running test, one
//! Process per member, built exactly as a step's would be
//! (`testbus_proto::process::build`, so the environment layers and names
//! are the controller's). What to run and where is decided by
//! [`plan`], a pure function; [`ResourceService::exec`] loads, plans and
//! creates.
use super::ResourceService;
use crate::authz::Scope;
use std::collections::BTreeMap;
use testbus_proto::process::{build, Origin};
use testbus_proto::states::{ConditionStatus, ConditionType, TestPhase, Verdict};
use testbus_proto::validate::{dns_label, member_matches};
use testbus_proto::{phase, ExecRequest, ExecResponse, Host, Process, Resource, Step, Test};
use tonic::Status;

/// What an exec runs, and on which members (with their hosts' names).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecPlan {
    pub command: Step,
    pub members: Vec<(String, String)>,
}

/// Checks the request against the test as stored: the test runs (or ended
/// failed and holds its hosts), is not finishing, and `on` names members
/// it has. `fresh_name` names the command when the request does not.
pub fn plan(t: &Test, req: &ExecRequest, fresh_name: impl FnOnce() -> String) -> Result<ExecPlan, Status> {
    let mut command = req.command.clone().ok_or_else(|| Status::invalid_argument("command: required"))?;
    for (field, set) in [
        ("command.on", !command.on.is_empty()),
        ("command.after", !command.after.is_empty()),
        ("command.sync", command.sync),
        ("command.background", command.background),
        ("command.allowFailure", command.allow_failure),
    ] {
        if set {
            return Err(Status::invalid_argument(format!(
                "{field}: belongs to a test's steps; an exec runs now (use `on` of the request for where)"
            )));
        }
    }
    if command.name.is_empty() {
        command.name = fresh_name();
    } else {
        dns_label(&command.name).map_err(|e| Status::invalid_argument(format!("command.name: {e}")))?;
        // Its processes would be taken for the step's.
        if testbus_proto::steps::expand(t.spec()).iter().any(|e| e.step.name == command.name) {
            return Err(Status::invalid_argument(format!(
                "command.name: {:?} is a step of test {:?}",
                command.name,
                t.name()
            )));
        }
    }
    let s = t.status();
    let held =
        phase::test_terminal(&s.phase) && s.conditions.iter().any(|c| c.is(ConditionType::Held, ConditionStatus::True));
    if !t.meta().deletion_timestamp.is_empty() {
        return Err(Status::failed_precondition(format!("test: {:?} is being deleted", t.name())));
    }
    if s.phase != TestPhase::Running && !held {
        let why = if phase::test_terminal(&s.phase) {
            format!("has ended ({}) and holds no hosts (spec.holdOnFailure keeps a failed test's hosts)", s.phase)
        } else {
            format!("is not running (phase {}): it has not claimed its hosts", s.phase)
        };
        return Err(Status::failed_precondition(format!("test: {:?} {why}", t.name())));
    }
    if !held && Verdict::decided(&s.conditions) {
        return Err(Status::failed_precondition(format!("test: {:?} is finishing", t.name())));
    }
    let known = || s.claims.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
    for (i, want) in req.on.iter().enumerate() {
        if !s.claims.keys().any(|m| member_matches(m, want)) {
            return Err(Status::invalid_argument(format!(
                "on[{i}]: no member of test {:?} is or belongs to role {want:?} (members: {})",
                t.name(),
                known()
            )));
        }
    }
    let members = s
        .claims
        .iter()
        .filter(|(m, _)| req.on.is_empty() || req.on.iter().any(|r| member_matches(m, r)))
        .map(|(m, h)| (m.clone(), h.clone()))
        .collect();
    Ok(ExecPlan { command, members })
}

/// `x` and eight hex digits: a step name no manifest step is likely to
/// take (the process names are TEST-NAME-MEMBER).
fn fresh_name() -> String {
    format!("x{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

impl ResourceService<Test> {
    pub async fn exec(&self, scope: &Scope, req: ExecRequest) -> Result<ExecResponse, Status> {
        let (t, _) = self.load(&req.test).await?;
        let plan = plan(&t, &req, fresh_name)?;
        let hosts = ResourceService::<Host>::new(self.st.clone());
        let mut made = Vec::with_capacity(plan.members.len());
        for (member, host) in &plan.members {
            let (h, _) = hosts.load(host).await?;
            // A held test's claims stay written after its hosts could have
            // gone to another test: run only on a host this test holds.
            if h.status().claim.as_ref().is_none_or(|c| c.test_uid != t.meta().uid) {
                return Err(Status::failed_precondition(format!(
                    "test: host {host:?} ({member}) is no longer held by test {:?}",
                    t.name()
                )));
            }
            made.push(build(&t, &h, member, &plan.command, &BTreeMap::new(), Origin::Exec));
        }
        // Everything is checked before the first write: one bad member
        // leaves none of the others started.
        for p in &made {
            use testbus_proto::validate::Validate;
            p.validate().map_err(|e| Status::invalid_argument(format!("command: {e}")))?;
        }
        let processes = ResourceService::<Process>::new(self.st.clone());
        let mut out = Vec::with_capacity(made.len());
        for p in made {
            let created = processes.create(scope, p).await.map_err(|s| match s.code() {
                tonic::Code::AlreadyExists => Status::already_exists(format!(
                    "command.name: {:?} is taken in test {:?} (a step or an earlier exec has it)",
                    plan.command.name, req.test
                )),
                _ => s,
            })?;
            out.push(created);
        }
        Ok(ExecResponse { processes: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{Condition, TestStatus};

    fn running(claims: &[(&str, &str)]) -> Test {
        let mut t = Test::default();
        t.meta_mut().name = "t".into();
        *t.status_mut() = TestStatus {
            phase: TestPhase::Running.into(),
            claims: claims.iter().map(|(m, h)| (m.to_string(), h.to_string())).collect(),
            ..Default::default()
        };
        t
    }

    fn req(on: &[&str], command: Step) -> ExecRequest {
        ExecRequest { test: "t".into(), on: on.iter().map(|s| s.to_string()).collect(), command: Some(command) }
    }

    fn argv(a: &[&str]) -> Step {
        Step { argv: a.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn roles_and_members_select_where_it_runs() {
        let t = running(&[("server", "h0"), ("client0", "h1"), ("client1", "h2")]);
        let p = plan(&t, &req(&["client"], argv(&["true"])), || "x1".into()).unwrap();
        assert_eq!(p.members, vec![("client0".into(), "h1".into()), ("client1".into(), "h2".into())]);
        assert_eq!(p.command.name, "x1");
        let p = plan(&t, &req(&["client1", "server"], argv(&["true"])), || "x1".into()).unwrap();
        assert_eq!(p.members.len(), 2);
        let all = plan(&t, &req(&[], argv(&["true"])), || "x1".into()).unwrap();
        assert_eq!(all.members.len(), 3);
        let e = plan(&t, &req(&["clients"], argv(&["true"])), || "x1".into()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("on[0]: no member"), "{}", e.message());
        assert!(e.message().contains("client0, client1, server"), "{}", e.message());
    }

    #[test]
    fn step_graph_fields_and_bad_names_are_refused_by_field() {
        let t = running(&[("a", "h0")]);
        assert!(plan(&t, &ExecRequest { test: "t".into(), ..Default::default() }, || "x".into())
            .unwrap_err()
            .message()
            .starts_with("command: required"));
        let mut c = argv(&["true"]);
        c.after = vec!["s".into()];
        assert!(plan(&t, &req(&[], c), || "x".into()).unwrap_err().message().starts_with("command.after:"));
        let mut c = argv(&["true"]);
        c.background = true;
        assert!(plan(&t, &req(&[], c), || "x".into()).unwrap_err().message().starts_with("command.background:"));
        let mut stepped = t.clone();
        stepped.spec_mut().steps = vec![Step { name: "report".into(), ..argv(&["true"]) }];
        let mut c = argv(&["true"]);
        c.name = "report".into();
        let e = plan(&stepped, &req(&[], c), || "x".into()).unwrap_err();
        assert!(e.message().starts_with("command.name: \"report\" is a step"), "{}", e.message());
        let mut c = argv(&["true"]);
        c.name = "Not_A_Label".into();
        assert!(plan(&t, &req(&[], c), || "x".into()).unwrap_err().message().starts_with("command.name:"));
    }

    #[test]
    fn only_a_running_or_held_test_runs_commands() {
        let mut t = running(&[("a", "h0")]);
        t.status_mut().phase = TestPhase::Pending.into();
        let e = plan(&t, &req(&[], argv(&["true"])), || "x".into()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("not running"), "{}", e.message());
        t.status_mut().phase = TestPhase::Failed.into();
        assert!(plan(&t, &req(&[], argv(&["true"])), || "x".into()).unwrap_err().message().contains("holds no hosts"));
        t.status_mut().conditions.push(Condition::new(ConditionType::Held, ConditionStatus::True, "Held", ""));
        assert!(plan(&t, &req(&[], argv(&["true"])), || "x".into()).is_ok());
        let mut t = running(&[("a", "h0")]);
        t.meta_mut().deletion_timestamp = "2026-01-01T00:00:00Z".into();
        assert!(plan(&t, &req(&[], argv(&["true"])), || "x".into()).unwrap_err().message().contains("being deleted"));
    }
}
