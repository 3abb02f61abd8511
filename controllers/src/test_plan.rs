//! A running test's plan: what one reconcile should do, derived from the
//! Test, its Processes, the hosts and the time, without writing anything.
//!
//! [`plan`] expands the step graph once and walks it in `after` order,
//! giving every step its phase from the Processes that exist: Waiting for
//! its `after` steps, Skipped when one of them can no longer succeed,
//! Running while its processes are made or run, then Succeeded, Failed or
//! Stopped. On the way it collects the Processes to create, the gates of
//! `sync` steps to release, and the verdict once there is one (a step
//! failed, a background step died, a host was lost, the timeout passed,
//! every step is done). The executor in `test_lifecycle` writes the plan;
//! these functions are the decisions, unit-tested below without a server.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use testbus_proto::steps::Expanded;
use testbus_proto::validate::members;
use testbus_proto::{
    duration, phase, time, Condition, Host, Process, ProcessResult, Resource, Step, StepStatus, Test, TestStatus,
};

pub use testbus_proto::process::{LABEL_ROLE, LABEL_STEP, LABEL_TEST};
/// A test without `spec.timeout` gets this one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The hosts as the controller sees them (its cache; a map in tests).
pub trait HostView {
    fn host(&self, name: &str) -> Option<Arc<Host>>;
}

impl HostView for crate::runtime::Cache<Host> {
    fn host(&self, name: &str) -> Option<Arc<Host>> {
        self.get(name)
    }
}

impl HostView for HashMap<String, Arc<Host>> {
    fn host(&self, name: &str) -> Option<Arc<Host>> {
        self.get(name).cloned()
    }
}

pub use testbus_proto::states::Verdict;
use testbus_proto::states::{ConditionStatus, ConditionType, StepPhase, TestPhase, TestReason};
use testbus_proto::states::{HostPhase, ProcessPhase};

/// A verdict, and whether an earlier reconcile recorded it already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Reached now: recorded (while processes are stopped) or final.
    New(Verdict),
    /// Recorded by an earlier reconcile (condition Finished=Unknown): it
    /// stands, whatever the stopped processes do.
    Recorded(Verdict),
}

/// What one reconcile of a running test should do.
#[derive(Debug)]
pub struct Plan {
    /// Every step's status, in the spec's order.
    pub steps: Vec<StepStatus>,
    /// The test ends: stop what runs, then write the final status. When
    /// set, nothing is created or released.
    pub ending: Option<Ending>,
    /// Processes of steps whose turn has come.
    pub create: Vec<Process>,
    /// Gated processes of `sync` steps that may all start now.
    pub release: Vec<Arc<Process>>,
    /// Look again by then at the latest (the test's deadline).
    pub requeue: Duration,
}

/// A verdict already recorded by an earlier reconcile.
pub fn recorded_verdict(t: &Test) -> Option<Verdict> {
    Verdict::recorded(&t.status().conditions)
}

/// Ended because the controller asked it to stop.
fn stopped(p: &Process) -> bool {
    p.status().phase == ProcessPhase::Killed && p.status().reason == testbus_proto::states::ProcessReason::Stopped
}

/// Every process of a background step is running (it may be depended on).
fn serving(step: &str, by_step: &HashMap<&str, Vec<&Arc<Process>>>) -> bool {
    by_step.get(step).is_some_and(|ps| !ps.is_empty() && ps.iter().all(|p| p.status().phase == ProcessPhase::Running))
}

/// The members a step runs on, in role order.
pub fn targets(t: &Test, step: &Step) -> Vec<String> {
    let mut out = Vec::new();
    for on in &step.on {
        match t.spec().hosts.iter().find(|r| &r.role == on) {
            Some(r) => out.extend(members(r)),
            None => out.push(on.clone()),
        }
    }
    out.dedup();
    out
}

pub use testbus_proto::process::name as process_name;

/// The Process of `step` for `member` on `host`.
pub fn process_for(t: &Test, step: &Expanded, member: &str, host: &Host) -> Process {
    testbus_proto::process::build(t, host, member, &step.step, &step.test_env, testbus_proto::process::Origin::Step)
}

fn result_of(p: &Process) -> ProcessResult {
    let s = p.status();
    ProcessResult {
        name: p.name().into(),
        role: p.spec().role.clone(),
        host: p.spec().host_name.clone(),
        phase: s.phase.clone(),
        exit_code: s.exit_code,
        signal: s.signal.clone(),
        message: s.message.clone(),
        start_time: s.start_time.clone(),
        finish_time: s.finish_time.clone(),
    }
}

/// A claimed host that is gone or no longer Ready. (The claim itself is not
/// checked: the hosts cache may not have seen it yet, and nothing but the
/// end of this test releases it.)
fn lost_host(t: &Test, hosts: &impl HostView) -> Option<Verdict> {
    for (member, host) in &t.status().claims {
        let why = match hosts.host(host) {
            None => "deleted".to_string(),
            Some(h) if testbus_proto::states::lease_given_up(h.status()) => {
                return Some(Verdict::new(
                    TestReason::AgentStopped,
                    format!("the agent of host {host} ({member}) shut down"),
                ));
            }
            Some(h) if h.status().phase != HostPhase::Ready => h.status().message.clone(),
            _ => continue,
        };
        return Some(Verdict::new(TestReason::HostLost, format!("host {host} ({member}) was lost: {why}")));
    }
    None
}

/// One step's phase from its processes and its `after` steps' phases;
/// members without a process yet are in `missing`.
fn step_phase(
    step: &Step,
    mine: &[&Arc<Process>],
    want: &[String],
    graph: &[&Step],
    phases: &HashMap<&str, StepPhase>,
    by_step: &HashMap<&str, Vec<&Arc<Process>>>,
) -> StepPhase {
    let dep_ok = |a: &String| {
        let p = phases[a.as_str()];
        let dep = graph.iter().find(|s| &s.name == a);
        p == StepPhase::Succeeded
            || (p == StepPhase::Failed && dep.is_some_and(|d| d.allow_failure))
            || (p == StepPhase::Running && dep.is_some_and(|d| d.background) && serving(a, by_step))
    };
    let deps_done = step.after.iter().all(dep_ok);
    let deps_dead = step.after.iter().any(|a| {
        let p = phases[a.as_str()];
        p == StepPhase::Skipped || (p != StepPhase::Waiting && p != StepPhase::Running && !dep_ok(a))
    });
    if mine.is_empty() && deps_dead {
        StepPhase::Skipped
    } else if mine.is_empty() && !deps_done {
        StepPhase::Waiting
    } else if mine.len() < want.len() || mine.iter().any(|p| !phase::process_terminal(&p.status().phase)) {
        StepPhase::Running
    } else if mine.iter().all(|p| p.status().phase == ProcessPhase::Succeeded) {
        StepPhase::Succeeded
    } else if mine.iter().all(|p| p.status().phase == ProcessPhase::Succeeded || stopped(p)) {
        // Stopped by us: at the end of the test, or after another step
        // failed. A background step is meant to be stopped.
        if step.background {
            StepPhase::Succeeded
        } else {
            StepPhase::Stopped
        }
    } else {
        StepPhase::Failed
    }
}

/// What failed in a step, one "role on host: why" per failed process.
fn failure_message(results: &[ProcessResult]) -> String {
    results
        .iter()
        .filter(|r| r.phase != ProcessPhase::Succeeded)
        .map(|r| match (r.exit_code, r.message.is_empty()) {
            (Some(c), true) => format!("{} on {}: exit code {c}", r.role, r.host),
            _ => format!("{} on {}: {}", r.role, r.host, r.message),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The plan for a Running test at `now`.
pub fn plan(t: &Test, procs: &[Arc<Process>], hosts: &impl HostView, now: SystemTime) -> Plan {
    let spec = t.spec();
    let st = t.status();
    // Commands run with Tests.Exec are no step's, whatever they are named.
    let by_step: HashMap<&str, Vec<&Arc<Process>>> = procs
        .iter()
        .filter(|p| !p.meta().labels.contains_key(testbus_proto::process::LABEL_EXEC))
        .fold(HashMap::new(), |mut m, p| {
            m.entry(p.spec().step.as_str()).or_default().push(p);
            m
        });
    let timeout = duration::parse(&spec.timeout).unwrap_or(DEFAULT_TIMEOUT);
    let started = time::parse(&st.start_time).unwrap_or(now);
    let deadline = started + timeout;
    let stamp = time::format(now);
    let recorded = recorded_verdict(t);

    // Child tests are steps of the expanded graph: expanded once, walked in
    // rounds so that `after` steps come first.
    let expanded = testbus_proto::steps::expand(spec);
    let graph: Vec<&Step> = expanded.iter().map(|e| &e.step).collect();
    let mut phases: HashMap<&str, StepPhase> = HashMap::new();
    let mut create: Vec<Process> = Vec::new();
    let mut release: Vec<Arc<Process>> = Vec::new();
    let mut steps = Vec::new();
    let mut verdict: Option<Verdict> = None;
    let mut remaining: Vec<&Expanded> = expanded.iter().collect();
    while !remaining.is_empty() {
        let before = remaining.len();
        let mut next_round = Vec::new();
        for ex in remaining {
            let step = &ex.step;
            if step.after.iter().any(|a| !phases.contains_key(a.as_str())) {
                next_round.push(ex);
                continue;
            }
            let mine = by_step.get(step.name.as_str()).cloned().unwrap_or_default();
            let want = targets(t, step);
            let p = step_phase(step, &mine, &want, &graph, &phases, &by_step);
            if p == StepPhase::Running && mine.len() < want.len() {
                for member in want.iter().filter(|m| !mine.iter().any(|p| &p.spec().role == *m)) {
                    match st.claims.get(member).and_then(|h| hosts.host(h)) {
                        Some(h) => create.push(process_for(t, ex, member, &h)),
                        None => {
                            verdict.get_or_insert(Verdict::new(TestReason::HostLost, format!("no host for {member}")));
                        }
                    }
                }
            }
            // A sync step starts together: once every one of its processes
            // exists and is Ready, all are released.
            if step.sync
                && mine.len() >= want.len()
                && !mine.iter().all(|p| p.spec().released)
                && mine.iter().all(|p| p.status().phase == ProcessPhase::Ready || p.spec().released)
            {
                release.extend(mine.iter().filter(|p| !p.spec().released).map(|p| Arc::clone(p)));
            }
            phases.insert(step.name.as_str(), p);
            let prev = st.steps.iter().find(|s| s.name == step.name);
            let status = step_status(step, p, &mine, prev, &stamp);
            if verdict.is_none() && recorded.is_none() {
                verdict = background_ended(step, &mine);
            }
            if p == StepPhase::Failed && !step.allow_failure && verdict.is_none() {
                let why = format!("step {} failed: {}", step.name, status.message);
                verdict = Some(Verdict::new(TestReason::StepFailed, why));
            }
            steps.push(status);
        }
        if next_round.len() == before {
            break; // unreachable for validated specs (no cycles)
        }
        remaining = next_round;
    }
    // Keep the spec's order.
    steps.sort_by_key(|s| graph.iter().position(|x| x.name == s.name));
    let requeue = deadline.duration_since(now).unwrap_or_default() + Duration::from_millis(10);
    let ending = match recorded {
        Some(v) => Some(Ending::Recorded(v)),
        // Deleted while running: it ends Cancelled (visible until its
        // cleanup is done), whatever else was about to happen.
        None if !t.meta().deletion_timestamp.is_empty() => {
            Some(Ending::New(Verdict::new(TestReason::Cancelled, "the test was deleted while it ran")))
        }
        None => verdict
            .or_else(|| lost_host(t, hosts))
            .or_else(|| {
                let why = || format!("test exceeded its timeout of {}", duration::format(timeout));
                (now >= deadline).then(|| Verdict::new(TestReason::TimedOut, why()))
            })
            .or_else(|| all_done(&steps, &graph).then(|| completed(st)))
            .map(Ending::New),
    };
    if ending.is_some() {
        create.clear();
        release.clear();
    }
    Plan { steps, ending, create, release, requeue }
}

/// Whether every step but background ones has finished (a test of no
/// steps never has).
fn all_done(steps: &[StepStatus], graph: &[&Step]) -> bool {
    !graph.is_empty()
        && steps
            .iter()
            .zip(graph)
            .all(|(s, step)| step.background || (s.phase != StepPhase::Running && s.phase != StepPhase::Waiting))
}

/// A step's status in `phase`: its processes' results, and when it started
/// and completed (kept from `prev`, else now, `stamp`).
fn step_status(
    step: &Step,
    phase: StepPhase,
    mine: &[&Arc<Process>],
    prev: Option<&StepStatus>,
    stamp: &str,
) -> StepStatus {
    let mut results: Vec<ProcessResult> = mine.iter().map(|p| result_of(p)).collect();
    results.sort_by(|a, b| a.role.cmp(&b.role));
    let kept = |t: Option<&String>| t.filter(|s| !s.is_empty()).cloned();
    let start_time = match phase {
        StepPhase::Waiting | StepPhase::Skipped => kept(prev.map(|s| &s.start_time)).unwrap_or_default(),
        _ => kept(prev.map(|s| &s.start_time)).unwrap_or_else(|| stamp.to_string()),
    };
    let completion_time = match phase {
        StepPhase::Succeeded | StepPhase::Failed | StepPhase::Skipped => {
            kept(prev.map(|s| &s.completion_time)).unwrap_or_else(|| stamp.to_string())
        }
        _ => String::new(),
    };
    let message = if phase == StepPhase::Failed { failure_message(&results) } else { String::new() };
    StepStatus {
        name: step.name.clone(),
        phase: phase.into(),
        processes: results,
        start_time,
        completion_time,
        message,
    }
}

/// A background step (that may not fail) one of whose processes ended on
/// its own before the test did: the test's verdict.
fn background_ended(step: &Step, mine: &[&Arc<Process>]) -> Option<Verdict> {
    if !step.background || step.allow_failure {
        return None;
    }
    let p = mine.iter().find(|p| phase::process_terminal(&p.status().phase) && !stopped(p))?;
    let why = if p.status().message.is_empty() { "exited".to_string() } else { p.status().message.clone() };
    let (role, host) = (&p.spec().role, &p.spec().host_name);
    Some(Verdict::new(
        TestReason::BackgroundEnded,
        format!("background step {} ended before the test finished: {role} on {host}: {why}", step.name),
    ))
}

/// Every step is done: the verdict of the recorded results.
fn completed(st: &TestStatus) -> Verdict {
    let failed: Vec<&str> = st.results.iter().filter(|r| r.outcome == "fail").map(|r| r.path.as_str()).collect();
    if failed.is_empty() {
        Verdict::new(TestReason::Completed, "")
    } else {
        Verdict::new(TestReason::ResultFailed, format!("recorded results failed: {}", failed.join(", ")))
    }
}

/// What stopping a test's processes takes.
#[derive(Debug, Default)]
pub struct Stops {
    /// Running on a Ready host: asked to stop (`spec.stop`).
    pub stop: Vec<Arc<Process>>,
    /// Running on a host that is gone or not Ready: marked Lost.
    pub lost: Vec<Arc<Process>>,
    /// Nothing of the test runs any more.
    pub all_ended: bool,
}

/// What a test that has its verdict waits for while its processes stop,
/// as its status says it (a process whose agent never acts on the stop
/// keeps the test open: it must say on which host). Empty when none runs.
pub fn waiting_for_stops(procs: &[Arc<Process>]) -> String {
    const NAMED: usize = 5;
    let running: Vec<&Arc<Process>> = procs.iter().filter(|p| !phase::process_terminal(&p.status().phase)).collect();
    if running.is_empty() {
        return String::new();
    }
    let mut names: Vec<String> = running
        .iter()
        .take(NAMED)
        .map(|p| {
            let phase = if p.status().phase.is_empty() { "Pending" } else { p.status().phase.as_str() };
            format!("{} on host {} ({phase})", p.name(), p.spec().host_name)
        })
        .collect();
    if running.len() > NAMED {
        names.push(format!("{} more", running.len() - NAMED));
    }
    let n = running.len();
    format!("ending: waiting for {n} process{} to stop: {}", if n == 1 { "" } else { "es" }, names.join(", "))
}

pub fn stops(procs: &[Arc<Process>], hosts: &impl HostView) -> Stops {
    let mut s = Stops { all_ended: true, ..Default::default() };
    for p in procs.iter().filter(|p| !phase::process_terminal(&p.status().phase)) {
        s.all_ended = false;
        let host_alive = hosts.host(&p.spec().host_name).is_some_and(|h| {
            h.status().phase == HostPhase::Ready && !testbus_proto::states::lease_given_up(h.status())
        });
        if !host_alive {
            s.lost.push(p.clone());
        } else if !p.spec().stop {
            s.stop.push(p.clone());
        }
    }
    s
}

pub use testbus_proto::states::set_condition;

/// Another attempt of a test that failed for the infrastructure's sake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The hosts it failed on: not claimed again.
    pub hosts: Vec<String>,
}

/// Whether a process ended for the infrastructure's sake: its host lost,
/// its agent gone without a keeper (or stopped with `--on-stop stop`), or
/// it could not be contained or spawned for a reason other than its
/// command (a missing or unexecutable command is exit code 127/126, the
/// test's own failure).
pub fn infrastructure_end(p: &Process) -> bool {
    use testbus_proto::states::ProcessReason as R;
    matches!(
        p.status().reason.parse(),
        Ok(R::HostLost
            | R::AgentRestarted
            | R::JournalLost
            | R::KeeperLost
            | R::AgentShutdown
            | R::SpawnFailed
            | R::ContainFailed)
    )
}

/// Whether a test whose verdict is `v` gets another attempt, and on which
/// hosts it failed. Only a verdict the infrastructure caused qualifies (a
/// host lost or its agent stopped, or a step failed whose every failed
/// process ended for the infrastructure's sake); a test failure anywhere
/// (a non-zero exit, a timeout) never does. The budget is the failed
/// steps' `retry.infrastructure` (the largest; `default` where a step
/// does not say), against the attempts made so far.
pub fn retry(t: &Test, procs: &[Arc<Process>], v: &Verdict, hosts: &impl HostView, default: u32) -> Option<Retry> {
    let failed: Vec<&Arc<Process>> = procs
        .iter()
        .filter(|p| {
            let ph = p.status().phase.as_str();
            (ph == ProcessPhase::Failed || ph == ProcessPhase::Lost || ph == ProcessPhase::Killed) && !stopped(p)
        })
        .collect();
    if failed.iter().any(|p| !infrastructure_end(p)) {
        return None;
    }
    let lost_hosts: Vec<String> = t
        .status()
        .claims
        .values()
        .filter(|h| {
            hosts.host(h).is_none_or(|h| {
                h.status().phase != HostPhase::Ready || testbus_proto::states::lease_given_up(h.status())
            })
        })
        .cloned()
        .collect();
    match v.reason {
        TestReason::HostLost | TestReason::AgentStopped => {}
        TestReason::StepFailed if !failed.is_empty() => {}
        _ => return None,
    }
    let steps = testbus_proto::steps::expand(t.spec());
    let budget_of = |name: &str| {
        steps
            .iter()
            .find(|e| e.step.name == name)
            .and_then(|e| e.step.retry.as_ref().and_then(|r| r.infrastructure))
            .unwrap_or(default)
    };
    // The failed steps decide; a host lost with nothing failed yet, every
    // step that ran on it.
    let mut on: Vec<&str> = failed.iter().map(|p| p.spec().step.as_str()).collect();
    if on.is_empty() {
        on =
            procs.iter().filter(|p| lost_hosts.contains(&p.spec().host_name)).map(|p| p.spec().step.as_str()).collect();
    }
    let budget = if on.is_empty() { default } else { on.iter().map(|s| budget_of(s)).max().unwrap_or(default) };
    if t.status().attempts.len() as u32 >= budget {
        return None;
    }
    let mut failed_on: Vec<String> = failed.iter().map(|p| p.spec().host_name.clone()).collect();
    failed_on.extend(lost_hosts);
    failed_on.sort();
    failed_on.dedup();
    Some(Retry { hosts: failed_on })
}

/// The status a test ends with: the verdict, its steps (what never ran is
/// Skipped), the Finished condition, and Held when a failed test keeps its
/// hosts (holdOnFailure).
pub fn final_status(t: &Test, mut steps: Vec<StepStatus>, v: Verdict, now: SystemTime) -> TestStatus {
    for s in &mut steps {
        if s.phase == StepPhase::Waiting || s.phase == StepPhase::Running {
            s.phase = StepPhase::Skipped.into();
        }
    }
    let mut st = t.status().clone();
    let ok = v.phase() == TestPhase::Succeeded;
    st.phase = v.phase().into();
    st.reason = v.reason.into();
    st.message = v.message;
    st.steps = steps;
    st.completion_time = time::format(now);
    if !ok && t.spec().hold_on_failure {
        let hosts: Vec<&str> = st.claims.values().map(String::as_str).collect();
        let msg = format!("hosts {} stay claimed for debugging until the test is deleted", hosts.join(", "));
        set_condition(
            &mut st.conditions,
            Condition::new(ConditionType::Held, ConditionStatus::True, "HoldOnFailure", msg),
        );
    }
    let (reason, message) = (st.reason.clone(), st.message.clone());
    set_condition(
        &mut st.conditions,
        Condition::new(
            ConditionType::Finished,
            if ok { ConditionStatus::True } else { ConditionStatus::False },
            &reason,
            message,
        ),
    );
    st
}

/// A held test keeps its hosts until it is deleted.
pub fn held(t: &Test) -> bool {
    t.status().conditions.iter().any(|c| c.is(ConditionType::Held, ConditionStatus::True))
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{Object, ProcessStatus};

    const T0: &str = "2026-01-01T00:00:00Z";

    fn at(secs: u64) -> SystemTime {
        time::parse(T0).unwrap() + Duration::from_secs(secs)
    }

    /// A Running test from a manifest, each member claiming host `h-<member>`.
    fn running(yaml: &str) -> Test {
        let Some(Object::Test(mut t)) = testbus_proto::manifest::parse("fixture", yaml).unwrap().pop() else {
            panic!("not a test")
        };
        t.meta_mut().uid = "uid-1".into();
        let claims = t.spec().hosts.iter().flat_map(members).map(|m| (m.clone(), format!("h-{m}"))).collect();
        let st = t.status_mut();
        st.phase = StepPhase::Running.into();
        st.start_time = T0.into();
        st.claims = claims;
        t
    }

    fn ready_hosts(t: &Test) -> HashMap<String, Arc<Host>> {
        t.status()
            .claims
            .values()
            .map(|name| {
                let mut h = Host::default();
                h.meta_mut().name = name.clone();
                h.status_mut().phase = HostPhase::Ready.into();
                (name.clone(), Arc::new(h))
            })
            .collect()
    }

    /// The processes a plan created, each given `status`.
    fn with_status(created: &[Process], f: impl Fn(&Process) -> ProcessStatus) -> Vec<Arc<Process>> {
        created
            .iter()
            .map(|p| {
                let mut p = p.clone();
                *p.status_mut() = f(&p);
                Arc::new(p)
            })
            .collect()
    }

    fn exited(code: i32) -> ProcessStatus {
        let phase = if code == 0 { ProcessPhase::Succeeded } else { ProcessPhase::Failed };
        ProcessStatus { phase: phase.into(), exit_code: Some(code), ..Default::default() }
    }

    fn in_phase(p: &str) -> ProcessStatus {
        ProcessStatus { phase: p.into(), ..Default::default() }
    }

    fn step_phases(plan: &Plan) -> Vec<(&str, &str)> {
        plan.steps.iter().map(|s| (s.name.as_str(), s.phase.as_str())).collect()
    }

    fn ended(plan: &Plan) -> (TestPhase, &str) {
        match &plan.ending {
            Some(Ending::New(v)) | Some(Ending::Recorded(v)) => (v.phase(), v.reason.as_str()),
            None => panic!("no verdict: {:?}", step_phases(plan)),
        }
    }

    const CHAIN: &str = "
apiVersion: testbus/v1
kind: Test
metadata: {name: chain}
spec:
  hosts: [{role: a}, {role: b, count: 2}]
  steps:
    - {name: first, on: [a], argv: [\"true\"]}
    - {name: second, on: [b], after: [first], argv: [\"true\"], exitCodes: [0, 3]}
    - {name: third, on: [a, b], after: [second], argv: [\"true\"]}
";

    #[test]
    fn steps_run_in_after_order_and_the_test_completes() {
        let t = running(CHAIN);
        let hosts = ready_hosts(&t);
        let p = plan(&t, &[], &hosts, at(1));
        assert_eq!(step_phases(&p), [("first", "Running"), ("second", "Waiting"), ("third", "Waiting")]);
        let names: Vec<&str> = p.create.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["chain-first-a"]);
        assert_eq!(p.create[0].spec().host_name, "h-a");
        assert_eq!(p.create[0].spec().exit_codes, [0], "no exitCodes: 0 only");
        assert_eq!(p.requeue, Duration::from_secs(3599) + Duration::from_millis(10), "until the default timeout");

        let mut procs = with_status(&p.create, |_| exited(0));
        let p = plan(&t, &procs, &hosts, at(2));
        assert_eq!(step_phases(&p)[..2], [("first", "Succeeded"), ("second", "Running")]);
        assert_eq!(p.create.iter().map(|p| p.spec().role.as_str()).collect::<Vec<_>>(), ["b0", "b1"]);
        assert_eq!(p.create[0].spec().exit_codes, [0, 3], "the step's exitCodes go to its processes");
        // The agent judged exit 3 a success (exitCodes).
        procs.extend(with_status(&p.create, |_| ProcessStatus { exit_code: Some(3), ..exited(0) }));
        let p = plan(&t, &procs, &hosts, at(3));
        assert_eq!(p.create.len(), 3, "third runs on a, b0 and b1");
        procs.extend(with_status(&p.create, |_| exited(0)));
        let p = plan(&t, &procs, &hosts, at(4));
        assert_eq!(ended(&p), (TestPhase::Succeeded, "Completed"));
        assert!(p.create.is_empty());
        let done = final_status(&t, p.steps, Verdict::new(TestReason::Completed, ""), at(4));
        assert_eq!(done.phase, ProcessPhase::Succeeded);
        assert!(done.conditions.iter().any(|c| c.is(ConditionType::Finished, ConditionStatus::True)));
    }

    #[test]
    fn a_failed_step_fails_the_test_and_skips_what_depends_on_it_unless_failure_is_allowed() {
        let t = running(CHAIN);
        let hosts = ready_hosts(&t);
        let first = with_status(&plan(&t, &[], &hosts, at(1)).create, |_| exited(1));
        let p = plan(&t, &first, &hosts, at(2));
        assert_eq!(step_phases(&p), [("first", "Failed"), ("second", "Skipped"), ("third", "Skipped")]);
        assert_eq!(ended(&p), (TestPhase::Failed, "StepFailed"));
        let Some(Ending::New(v)) = &p.ending else { panic!() };
        assert_eq!(v.message, "step first failed: a on h-a: exit code 1");
        assert!(p.create.is_empty(), "nothing more is started once there is a verdict");

        let allowed = running(&CHAIN.replace("{name: first, on: [a],", "{name: first, allowFailure: true, on: [a],"));
        let p = plan(&allowed, &first, &hosts, at(2));
        assert_eq!(step_phases(&p)[..2], [("first", "Failed"), ("second", "Running")]);
        assert!(p.ending.is_none());
        assert_eq!(p.create.len(), 2);
    }

    const SERVER: &str = "
apiVersion: testbus/v1
kind: Test
metadata: {name: srv}
spec:
  hosts: [{role: s}, {role: c}]
  steps:
    - {name: serve, on: [s], background: true, argv: [sleep, \"100\"]}
    - {name: use, on: [c], after: [serve], argv: [\"true\"]}
";

    #[test]
    fn a_background_step_serves_its_dependents_and_its_death_fails_the_test() {
        let t = running(SERVER);
        let hosts = ready_hosts(&t);
        let serve = plan(&t, &[], &hosts, at(1)).create;
        // Created but not yet running: its dependents wait.
        let p = plan(&t, &with_status(&serve, |_| in_phase(ProcessPhase::Pending.as_str())), &hosts, at(1));
        assert_eq!(step_phases(&p), [("serve", "Running"), ("use", "Waiting")]);
        let serving = with_status(&serve, |_| in_phase(ProcessPhase::Running.as_str()));
        let p = plan(&t, &serving, &hosts, at(2));
        assert_eq!(p.create.iter().map(|p| p.name()).collect::<Vec<_>>(), ["srv-use-c"]);
        // The foreground step done: the test completes with the server
        // still running (it is then stopped, and counts as Succeeded).
        let mut procs = serving.clone();
        procs.extend(with_status(&p.create, |_| exited(0)));
        assert_eq!(ended(&plan(&t, &procs, &hosts, at(3))), (TestPhase::Succeeded, "Completed"));
        let stopped = with_status(&serve, |_| ProcessStatus {
            reason: "Stopped".into(),
            ..in_phase(ProcessPhase::Killed.as_str())
        });
        let p = plan(&t, &stopped, &hosts, at(3));
        assert_eq!(step_phases(&p)[0], ("serve", "Succeeded"));
        // The server dying on its own fails the test, naming it.
        let died = with_status(&serve, |_| ProcessStatus { message: "exit code 2".into(), ..exited(2) });
        let p = plan(&t, &died, &hosts, at(3));
        assert_eq!(ended(&p), (TestPhase::Failed, "BackgroundEnded"));
        let Some(Ending::New(v)) = &p.ending else { panic!() };
        assert!(v.message.contains("background step serve ended") && v.message.contains("exit code 2"), "{v:?}");
    }

    #[test]
    fn a_sync_step_is_released_once_all_its_processes_are_ready() {
        let t = running(&CHAIN.replace("{name: first, on: [a],", "{name: first, sync: true, on: [a, b],"));
        let hosts = ready_hosts(&t);
        let created = plan(&t, &[], &hosts, at(1)).create;
        assert_eq!(created.len(), 3);
        assert!(created.iter().all(|p| p.spec().gated));
        let mut procs = with_status(&created, |_| in_phase(ProcessPhase::Ready.as_str()));
        procs[2] = Arc::new({
            let mut p = (*procs[2]).clone();
            p.status_mut().phase = ProcessPhase::Fetching.into();
            p
        });
        assert!(plan(&t, &procs, &hosts, at(2)).release.is_empty(), "one is still fetching");
        let procs = with_status(&created, |_| in_phase(ProcessPhase::Ready.as_str()));
        let release = plan(&t, &procs, &hosts, at(2)).release;
        assert_eq!(release.len(), 3);
        let released = with_status(&created, |p| {
            let _ = p;
            in_phase(ProcessPhase::Running.as_str())
        })
        .into_iter()
        .map(|p| {
            let mut p = (*p).clone();
            p.spec_mut().released = true;
            Arc::new(p)
        })
        .collect::<Vec<_>>();
        assert!(plan(&t, &released, &hosts, at(3)).release.is_empty(), "released once");
    }

    #[test]
    fn child_tests_are_steps_of_the_graph() {
        let t = running(
            "
apiVersion: testbus/v1
kind: Test
metadata: {name: parent}
spec:
  hosts: [{role: a}]
  steps:
    - {name: setup, on: [a], argv: [\"true\"]}
  tests:
    - name: child
      after: [setup]
      env: {LEVEL: child}
      steps:
        - {name: inner, on: [a], argv: [\"true\"]}
",
        );
        let hosts = ready_hosts(&t);
        let p = plan(&t, &[], &hosts, at(1));
        assert_eq!(step_phases(&p), [("setup", "Running"), ("child.inner", "Waiting")]);
        let procs = with_status(&p.create, |_| exited(0));
        let p = plan(&t, &procs, &hosts, at(2));
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].spec().step, "child.inner");
        assert_eq!(p.create[0].spec().env.get("LEVEL").map(String::as_str), Some("child"));
    }

    #[test]
    fn a_test_ending_says_which_processes_it_waits_for() {
        let t = running(CHAIN);
        let plan = plan(&t, &[], &ready_hosts(&t), at(1));
        assert!(!plan.create.is_empty());
        let mut procs = with_status(&plan.create, |_| in_phase("Running"));
        assert_eq!(
            waiting_for_stops(&procs),
            format!("ending: waiting for 1 process to stop: {} on host h-a (Running)", procs[0].name())
        );
        procs = with_status(&plan.create, |_| exited(0));
        assert_eq!(waiting_for_stops(&procs), "");
        let many: Vec<Arc<Process>> = (0..7)
            .map(|i| {
                let mut p = (*procs[0]).clone();
                p.meta_mut().name = format!("p{i}");
                *p.status_mut() = in_phase("");
                Arc::new(p)
            })
            .collect();
        let why = waiting_for_stops(&many);
        assert!(why.starts_with("ending: waiting for 7 processes to stop: p0 on host h-a (Pending), "), "{why}");
        assert!(why.ends_with("p4 on host h-a (Pending), 2 more"), "{why}");
    }

    #[test]
    fn a_lost_host_or_the_timeout_ends_the_test_in_error() {
        let t = running(&SERVER.replace("spec:\n", "spec:\n  timeout: 10s\n"));
        let mut hosts = ready_hosts(&t);
        let procs = with_status(&plan(&t, &[], &hosts, at(1)).create, |_| in_phase(ProcessPhase::Running.as_str()));
        let p = plan(&t, &procs, &hosts, at(2));
        assert!(p.ending.is_none());
        assert_eq!(p.requeue, Duration::from_secs(8) + Duration::from_millis(10), "looked at again at the deadline");
        assert_eq!(ended(&plan(&t, &procs, &hosts, at(10))), (TestPhase::Error, "TimedOut"));

        let mut lost = (*hosts["h-s"]).clone();
        lost.status_mut().phase = HostPhase::NotReady.into();
        lost.status_mut().message = "lease expired".into();
        hosts.insert("h-s".into(), Arc::new(lost));
        let p = plan(&t, &procs, &hosts, at(3));
        assert_eq!(ended(&p), (TestPhase::Error, "HostLost"));
        // What runs there is marked Lost rather than asked to stop.
        let s = stops(&procs, &hosts);
        assert_eq!((s.lost.len(), s.stop.len(), s.all_ended), (1, 0, false));
        hosts.remove("h-s");
        let Some(Ending::New(v)) = plan(&t, &procs, &hosts, at(3)).ending else { panic!() };
        assert_eq!(v.message, "host h-s (s) was lost: deleted");
    }

    /// An agent that stopped cleanly gave its lease up: the test ends at
    /// once with that reason, before the host is even marked NotReady, and
    /// what ran there is not waited for.
    #[test]
    fn a_host_whose_agent_stopped_ends_the_test_with_that_reason() {
        let t = running(SERVER);
        let mut hosts = ready_hosts(&t);
        let procs = with_status(&plan(&t, &[], &hosts, at(1)).create, |_| in_phase(ProcessPhase::Running.as_str()));
        let mut stopped = (*hosts["h-s"]).clone();
        stopped.status_mut().lease_renew_time = time::format(at(2));
        stopped.status_mut().lease_duration_seconds = 0;
        hosts.insert("h-s".into(), Arc::new(stopped));
        let Some(Ending::New(v)) = plan(&t, &procs, &hosts, at(3)).ending else { panic!() };
        assert_eq!((v.reason, v.message.as_str()), (TestReason::AgentStopped, "the agent of host h-s (s) shut down"));
        let s = stops(&procs, &hosts);
        assert_eq!((s.lost.len(), s.stop.len()), (1, 0));
    }

    #[test]
    fn a_recorded_verdict_stands_and_deletion_cancels() {
        let mut t = running(SERVER);
        let hosts = ready_hosts(&t);
        let procs = with_status(&plan(&t, &[], &hosts, at(1)).create, |_| in_phase(ProcessPhase::Running.as_str()));
        t.meta_mut().deletion_timestamp = time::format(at(2));
        let p = plan(&t, &procs, &hosts, at(2));
        assert_eq!(
            p.ending,
            Some(Ending::New(Verdict::new(TestReason::Cancelled, "the test was deleted while it ran")))
        );
        let s = stops(&procs, &hosts);
        assert_eq!((s.stop.len(), s.all_ended), (1, false));
        // Recorded (Finished=Unknown), it holds while the processes stop,
        // even when a stopped process then "fails".
        let mut st = t.status().clone();
        set_condition(&mut st.conditions, Verdict::new(TestReason::Cancelled, "deleted").condition(time::now()));
        *t.status_mut() = st;
        let failed = with_status(&plan(&t, &[], &hosts, at(1)).create, |_| exited(1));
        let p = plan(&t, &failed, &hosts, at(3));
        assert_eq!(p.ending, Some(Ending::Recorded(Verdict::new(TestReason::Cancelled, "deleted"))));
        assert!(stops(&failed, &hosts).all_ended);
    }

    #[test]
    fn a_failed_test_with_hold_on_failure_keeps_its_hosts() {
        let t = running(&CHAIN.replace("spec:\n", "spec:\n  holdOnFailure: true\n"));
        let v = Verdict::new(TestReason::StepFailed, "step first failed");
        let st = final_status(&t, vec![], v, at(5));
        let mut done = t.clone();
        *done.status_mut() = st;
        assert!(held(&done));
        let c = done.status().conditions.iter().find(|c| c.r#type == ConditionType::Held).unwrap();
        assert!(c.message.contains("h-a") && c.message.contains("h-b0"), "{c:?}");
        // Succeeded: nothing is held.
        let st = final_status(&t, vec![], Verdict::new(TestReason::Completed, ""), at(5));
        *done.status_mut() = st;
        assert!(!held(&done));
        assert_eq!(done.status().completion_time, time::format(at(5)));
    }

    fn ended_for(phase: ProcessPhase, reason: testbus_proto::states::ProcessReason) -> ProcessStatus {
        ProcessStatus { phase: phase.into(), reason: reason.into(), ..Default::default() }
    }

    /// Infrastructure failures get another attempt, within the budget, on
    /// other hosts; test failures (a non-zero exit, a missing command, a
    /// timeout) never do, nor does a cancelled test.
    #[test]
    fn only_infrastructure_failures_are_retried_within_the_budget() {
        use testbus_proto::states::ProcessReason as R;
        let yaml = "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: t}\nspec:\n  hosts: [{role: a}, {role: b}]\n  steps:\n  - {name: s, on: [a, b], argv: [\"true\"], retry: {infrastructure: 2}}\n  - {name: plain, on: [a], after: [s], argv: [\"true\"]}\n";
        let t = running(yaml);
        let hosts = ready_hosts(&t);
        let created = plan(&t, &[], &hosts, at(1)).create;
        let step_failed = Verdict::new(TestReason::StepFailed, "step s failed");
        let one = |status: ProcessStatus| {
            with_status(&created, |p| if p.spec().role == "a" { status.clone() } else { exited(0) })
        };
        let decide = |t: &Test, procs: &[Arc<Process>], v: &Verdict| retry(t, procs, v, &hosts, 0);
        // Each infrastructure reason: retried on the host it failed on.
        for r in [R::HostLost, R::AgentRestarted, R::JournalLost, R::KeeperLost, R::SpawnFailed, R::ContainFailed] {
            let procs = one(ended_for(ProcessPhase::Lost, r));
            assert_eq!(decide(&t, &procs, &step_failed), Some(Retry { hosts: vec!["h-a".into()] }), "{r:?}");
        }
        // Test failures: never.
        let exit_1 = one(exited(1));
        assert_eq!(decide(&t, &exit_1, &step_failed), None, "a non-zero exit");
        let missing = one(ProcessStatus { exit_code: Some(127), ..ended_for(ProcessPhase::Failed, R::NonZeroExit) });
        assert_eq!(decide(&t, &missing, &step_failed), None, "a missing command");
        let timed_out = one(ended_for(ProcessPhase::Failed, R::TimedOut));
        assert_eq!(decide(&t, &timed_out, &step_failed), None, "a timeout");
        assert_eq!(decide(&t, &one(exited(0)), &Verdict::new(TestReason::TimedOut, "")), None, "the test's timeout");
        assert_eq!(decide(&t, &one(exited(0)), &Verdict::new(TestReason::Cancelled, "")), None);
        // One infrastructure failure beside a test failure: the test's.
        let mixed = with_status(&created, |p| {
            if p.spec().role == "a" {
                ended_for(ProcessPhase::Lost, R::HostLost)
            } else {
                exited(2)
            }
        });
        assert_eq!(decide(&t, &mixed, &step_failed), None);
        // A host lost (its lease ran out): retried, that host excluded.
        let mut gone = hosts.clone();
        let mut h = (*gone["h-b"]).clone();
        h.status_mut().phase = HostPhase::NotReady.into();
        gone.insert("h-b".into(), Arc::new(h));
        let running_procs = with_status(&created, |_| in_phase(ProcessPhase::Running.as_str()));
        let lost = Verdict::new(TestReason::HostLost, "host h-b (b) was lost");
        assert_eq!(retry(&t, &running_procs, &lost, &gone, 0), Some(Retry { hosts: vec!["h-b".into()] }));
        // The budget: step s allows 2 retries, then no more.
        let procs = one(ended_for(ProcessPhase::Lost, R::HostLost));
        let mut t2 = t.clone();
        t2.status_mut().attempts = vec![Default::default(); 2];
        assert_eq!(decide(&t2, &procs, &step_failed), None, "out of retries");
        t2.status_mut().attempts.pop();
        assert!(decide(&t2, &procs, &step_failed).is_some());
        // A step that does not say takes the control plane's default (0 here).
        let plain: Vec<Arc<Process>> = with_status(&created, |_| ended_for(ProcessPhase::Lost, R::AgentRestarted))
            .into_iter()
            .map(|p| {
                let mut p = (*p).clone();
                p.spec_mut().step = "plain".into();
                Arc::new(p)
            })
            .collect();
        assert_eq!(decide(&t, &plain, &step_failed), None);
        assert!(retry(&t, &plain, &step_failed, &hosts, 1).is_some(), "a default of 1");
    }
}
