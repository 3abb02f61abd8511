//! The test lifecycle.
//!
//! Pending → (gang claim, one transaction) → Running → Succeeded / Failed /
//! Error. While Running, each reconcile derives every step's phase from the
//! Processes that exist, creates the Processes of steps whose `after` steps
//! are done, and decides a verdict (all steps done, a step failed, the
//! timeout passed, a claimed host was lost). A verdict first stops every
//! process still running and waits for them to end, so the final status —
//! immutable once written — holds complete results. A finished test's hosts
//! are released once nothing of the test runs on them any more.
use crate::runtime::Action;
use crate::schedule::{self, Assignment};
use crate::Context;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use testbus_proto::steps::Expanded;
use testbus_proto::subst::host_var_name;
use testbus_proto::validate::members;
use testbus_proto::{
    duration, phase, time, ClaimAssignment, ClaimRequest, Condition, Host, HostFacts, ObjectMeta, OwnerReference,
    Process, ProcessResult, ProcessSpec, Resource, Step, StepStatus, Test, TestStatus, TestTrace,
};
use tonic::{Code, Status};

pub const LABEL_TEST: &str = "testbus.io/test";
pub const LABEL_STEP: &str = "testbus.io/step";
pub const LABEL_ROLE: &str = "testbus.io/role";
use testbus_proto::TEST_FINALIZER as FINALIZER;
/// A test without `spec.timeout` gets this one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

pub fn is_pending(t: &Test) -> bool {
    let p = t.status().phase.as_str();
    (p.is_empty() || p == phase::PENDING) && t.meta().deletion_timestamp.is_empty()
}

/// A test whose reconcile keeps failing (a status too large to store, say)
/// says so in its conditions instead of staying Pending in silence.
pub async fn report_trouble(ctx: &Context, name: &str, trouble: crate::runtime::Trouble) {
    crate::runtime::report_trouble(ctx.client.api::<Test>(), name, trouble, |t| &mut t.status_mut().conditions).await
}

pub async fn reconcile(ctx: &Context, name: &str) -> Result<Action, Status> {
    let Some(t) = ctx.tests.get(name) else {
        return Ok(Action::AwaitChange);
    };
    let uid = t.meta().uid.clone();
    let procs: Vec<Arc<Process>> = ctx.processes.filter(|p| p.spec().test == name && p.spec().test_uid == uid);
    if !t.meta().deletion_timestamp.is_empty() {
        return teardown(ctx, &t, &procs).await;
    }
    match t.status().phase.as_str() {
        "" | phase::PENDING => claim(ctx, &t).await,
        phase::RUNNING => drive(ctx, &t, &procs).await,
        _ => finished(ctx, &t, &procs).await,
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        r#type: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time::now(),
    }
}

/// Replaces the condition of the same type; true if anything but the time
/// changed.
fn set_condition(conds: &mut Vec<Condition>, c: Condition) -> bool {
    match conds.iter_mut().find(|x| x.r#type == c.r#type) {
        Some(x) if x.status == c.status && x.reason == c.reason && x.message == c.message => false,
        Some(x) => {
            *x = c;
            true
        }
        None => {
            conds.push(c);
            true
        }
    }
}

async fn claim(ctx: &Context, t: &Test) -> Result<Action, Status> {
    let hosts = ctx.hosts.list();
    let refs: Vec<&Host> = hosts.iter().map(|h| h.as_ref()).collect();
    let spec = t.spec();
    // Tests ahead in the queue hold back what they need.
    let pending = ctx.tests.filter(is_pending);
    let mut queue: Vec<&Test> = pending.iter().map(|t| t.as_ref()).collect();
    queue.sort_by(|a, b| schedule::queue_order(a, b));
    let (reserved, blocked) = schedule::reserved_ahead(&queue, t, &refs);
    let avail: Vec<&Host> = refs.iter().copied().filter(|h| !reserved.contains(h.name())).collect();
    let result = match schedule::fits_inventory(&spec.hosts, &refs) {
        Err(why) => Err(("Unsatisfiable", format!("cannot run on the hosts that exist: {why}"))),
        Ok(()) => schedule::assign(&spec.hosts, &avail).map_err(|why| match blocked {
            Some(b) if schedule::assign(&spec.hosts, &refs).is_ok() => (
                "Queued",
                format!(
                    "queued behind test {} (priority {}), which waits for hosts this test could use",
                    b.name(),
                    b.spec().priority
                ),
            ),
            _ => ("Unschedulable", why),
        }),
    };
    let assignments = match result {
        Ok(a) => a,
        Err((reason, why)) => return still_pending(ctx, t, reason, why).await,
    };
    let by_name: HashMap<&str, &Host> = refs.iter().map(|h| (h.name(), *h)).collect();
    let status = running_status(t, &assignments, &by_name);
    let req = ClaimRequest {
        test: t.name().to_string(),
        test_resource_version: t.resource_version().to_string(),
        assignments: assignments
            .iter()
            .map(|a| ClaimAssignment {
                role: a.member.clone(),
                host: a.host.clone(),
                host_resource_version: by_name[a.host.as_str()].resource_version().to_string(),
            })
            .collect(),
        status: Some(status),
    };
    match ctx.client.tests().claim(req).await {
        Ok(claimed) => {
            tracing::info!(test = t.name(), hosts = ?assignments.iter().map(|a| (&a.member, &a.host)).collect::<Vec<_>>(), "claimed");
            // The claim answers with the test as stored: start it now rather
            // than at the watch event of our own write (the later pass finds
            // the processes there, or creates nothing twice: names are
            // fixed and creating an existing one is a no-op).
            drive(ctx, &claimed.into_inner(), &[]).await
        }
        // Someone else got a host first, or our view was stale: try again
        // from fresh caches.
        Err(s) if s.code() == Code::Aborted => Ok(Action::Requeue(Duration::from_millis(20))),
        Err(s) => Err(s),
    }
}

/// A test waits for hosts no longer than this unless its
/// `spec.pendingTimeout` says otherwise.
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a pending test that could not claim now comes to.
#[derive(Debug, PartialEq, Eq)]
enum PendingOutcome {
    /// It waits, saying why; looked at again after this long at the latest.
    Wait(Duration),
    /// It has waited past its pending timeout: it ends in Error.
    GiveUp { waited: Duration },
}

fn pending_outcome(t: &Test, now: SystemTime) -> PendingOutcome {
    let limit = duration::parse(&t.spec().pending_timeout).unwrap_or(DEFAULT_PENDING_TIMEOUT);
    let created = time::parse(&t.meta().creation_timestamp).unwrap_or(now);
    let waited = now.duration_since(created).unwrap_or_default();
    if waited >= limit {
        return PendingOutcome::GiveUp { waited: limit };
    }
    // Host and queue changes wake pending tests; the timer is a safety net
    // and the deadline.
    PendingOutcome::Wait((limit - waited).min(Duration::from_secs(30)))
}

/// A test that cannot claim its hosts now: says why on its Scheduled
/// condition, or ends in Error once it has waited past its pending timeout.
async fn still_pending(ctx: &Context, t: &Test, reason: &str, why: String) -> Result<Action, Status> {
    let mut next = t.clone();
    let st = next.status_mut();
    match pending_outcome(t, SystemTime::now()) {
        PendingOutcome::GiveUp { waited } => {
            let message = format!("waited {} for hosts (its pendingTimeout): {why}", duration::format(waited));
            st.phase = phase::ERROR.into();
            st.reason = "PendingTimeout".into();
            st.message = message.clone();
            st.completion_time = time::now();
            set_condition(&mut st.conditions, condition("Scheduled", false, reason, &why));
            set_condition(&mut st.conditions, condition(FINISHED, false, "PendingTimeout", &message));
            ctx.client.api::<Test>().update_status(next).await?;
            tracing::info!(test = t.name(), "gave up waiting for hosts");
            Ok(Action::AwaitChange)
        }
        PendingOutcome::Wait(next_look) => {
            let changed = set_condition(&mut st.conditions, condition("Scheduled", false, reason, &why));
            if changed || st.phase.is_empty() {
                st.phase = phase::PENDING.into();
                st.message = why;
                ctx.client.api::<Test>().update_status(next).await?;
            }
            Ok(Action::Requeue(next_look))
        }
    }
}

/// The status a test gets with its claim: Running, claims, env, trace.
fn running_status(t: &Test, assignments: &[Assignment], hosts: &HashMap<&str, &Host>) -> TestStatus {
    let spec = t.spec();
    let mut host_vars = BTreeMap::new();
    let mut trace_hosts: BTreeMap<String, HostFacts> = BTreeMap::new();
    for a in assignments {
        let h = hosts[a.host.as_str()];
        for (var, val) in &h.status().vars {
            host_vars.insert(host_var_name(&a.member, var), val.clone());
        }
        trace_hosts.insert(a.member.clone(), h.status().facts.clone().unwrap_or_default());
    }
    // A role of count n also gets each var as a space-separated list.
    for req in &spec.hosts {
        if req.count.unwrap_or(1) <= 1 {
            continue;
        }
        let ms = members(req);
        let vars: std::collections::BTreeSet<&String> = ms
            .iter()
            .filter_map(|m| assignments.iter().find(|a| &a.member == m))
            .flat_map(|a| hosts[a.host.as_str()].status().vars.keys())
            .collect();
        for var in vars {
            let vals: Vec<String> = ms
                .iter()
                .filter_map(|m| assignments.iter().find(|a| &a.member == m))
                .map(|a| hosts[a.host.as_str()].status().vars.get(var).cloned().unwrap_or_default())
                .collect();
            host_vars.insert(host_var_name(&req.role, var), vals.join(" "));
        }
    }
    let mut env = spec.env.clone();
    env.extend(host_vars.clone());
    let mut conditions = t.status().conditions.clone();
    set_condition(&mut conditions, condition("Scheduled", true, "Claimed", "all hosts claimed"));
    TestStatus {
        phase: phase::RUNNING.into(),
        conditions,
        observed_generation: t.meta().generation,
        claims: assignments.iter().map(|a| (a.member.clone(), a.host.clone())).collect(),
        env: env.clone(),
        host_vars,
        steps: testbus_proto::steps::expand(spec)
            .into_iter()
            .map(|s| StepStatus { name: s.step.name, phase: phase::WAITING.into(), ..Default::default() })
            .collect(),
        start_time: time::now(),
        trace: Some(TestTrace { hosts: trace_hosts, env, files: file_digests(t) }),
        ..Default::default()
    }
}

/// Every file the test names, by where it goes, with its digest.
fn file_digests(t: &Test) -> BTreeMap<String, String> {
    testbus_proto::validate::file_refs_of_test(t)
        .into_iter()
        .map(|(field, f)| {
            let dest = if !f.path.is_empty() {
                f.path.clone()
            } else if !f.env.is_empty() {
                format!("${}", f.env)
            } else {
                field
            };
            (dest, f.digest.clone())
        })
        .collect()
}

/// The members a step runs on, in role order.
fn targets(t: &Test, step: &Step) -> Vec<String> {
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

fn process_for(t: &Test, step: &Expanded, member: &str, host: &Host) -> Process {
    let env = testbus_proto::process::env(t, host, member, &step.step.name, &step.test_env, &step.step.env);
    let step = &step.step;
    let labels = [
        (LABEL_TEST.to_string(), t.name().to_string()),
        (LABEL_STEP.to_string(), step.name.clone()),
        (LABEL_ROLE.to_string(), member.to_string()),
    ]
    .into();
    Process {
        metadata: Some(ObjectMeta {
            name: process_name(t.name(), &step.name, member),
            labels,
            owner_references: vec![OwnerReference {
                kind: "Test".into(),
                name: t.name().into(),
                uid: t.meta().uid.clone(),
                controller: true,
            }],
            ..Default::default()
        }),
        spec: Some(ProcessSpec {
            host_name: host.name().into(),
            test: t.name().into(),
            test_uid: t.meta().uid.clone(),
            role: member.into(),
            step: step.name.clone(),
            argv: step.argv.clone(),
            script: step.script.clone(),
            shell: step.shell,
            env,
            stdin: step.stdin.clone(),
            workdir: step.workdir.clone(),
            timeout: step.timeout.clone(),
            exit_codes: if step.exit_codes.is_empty() { vec![0] } else { step.exit_codes.clone() },
            stop: false,
            gated: step.sync,
            released: false,
            // Test files reach every host, host files every process on the
            // host, step files the step's hosts; later ones win a path.
            files: t.spec().files.iter().chain(&host.spec().files).chain(&step.files).cloned().collect(),
            stdin_file: step.stdin_file.clone(),
            test_host_vars: testbus_proto::process::reads_host_vars(t),
        }),
        ..Default::default()
    }
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

struct Verdict {
    phase: &'static str,
    reason: String,
    message: String,
}

const FINISHED: &str = "Finished";
/// Condition of a failed test whose hosts stay claimed (holdOnFailure).
const HELD: &str = "Held";
/// Step phase: its processes were stopped by the controller.
const STOPPED: &str = "Stopped";

/// The phase each verdict reason leads to.
fn phase_of_reason(reason: &str) -> &'static str {
    match reason {
        "Completed" | "Finished" => phase::SUCCEEDED,
        "StepFailed" | "BackgroundEnded" | "ResultFailed" | "FinishedFailed" => phase::FAILED,
        "Cancelled" => phase::CANCELLED,
        _ => phase::ERROR,
    }
}

/// A verdict already recorded by an earlier reconcile.
fn decided_verdict(t: &Test) -> Option<Verdict> {
    let c = t.status().conditions.iter().find(|c| c.r#type == FINISHED && c.status == "Unknown")?;
    Some(Verdict { phase: phase_of_reason(&c.reason), reason: c.reason.clone(), message: c.message.clone() })
}

/// Ended because the controller asked it to stop.
fn stopped(p: &Process) -> bool {
    p.status().phase == phase::KILLED && p.status().reason == "Stopped"
}

/// Every process of a background step is running (it may be depended on).
fn serving(step: &str, by_step: &HashMap<&str, Vec<&Process>>) -> bool {
    by_step.get(step).is_some_and(|ps| !ps.is_empty() && ps.iter().all(|p| p.status().phase == phase::RUNNING))
}

/// A claimed host that is gone or no longer Ready. (The claim itself is not
/// checked: the hosts cache may not have seen it yet, and nothing but the
/// end of this test releases it.)
fn lost_host(ctx: &Context, t: &Test) -> Option<(String, String, String)> {
    for (member, host) in &t.status().claims {
        match ctx.hosts.get(host) {
            None => return Some((member.clone(), host.clone(), "deleted".into())),
            Some(h) if h.status().phase != phase::READY => {
                return Some((member.clone(), host.clone(), h.status().message.clone()))
            }
            _ => {}
        }
    }
    None
}

async fn drive(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Status> {
    let spec = t.spec();
    let st = t.status();
    let by_step: HashMap<&str, Vec<&Process>> = procs.iter().fold(HashMap::new(), |mut m, p| {
        m.entry(p.spec().step.as_str()).or_default().push(p);
        m
    });
    let timeout = duration::parse(&spec.timeout).unwrap_or(DEFAULT_TIMEOUT);
    let started = time::parse(&st.start_time).unwrap_or_else(SystemTime::now);
    let deadline = started + timeout;
    let now = SystemTime::now();
    let decided = decided_verdict(t);

    // Step phases, in an order where `after` steps come first.
    let mut phases: HashMap<&str, &'static str> = HashMap::new();
    let mut to_create: Vec<Process> = Vec::new();
    let mut steps_status = Vec::new();
    // Child tests are steps of the expanded graph.
    let expanded = testbus_proto::steps::expand(spec);
    let all: Vec<&Step> = expanded.iter().map(|e| &e.step).collect();
    let mut remaining: Vec<&Step> = all.clone();
    let mut verdict: Option<Verdict> = None;
    while !remaining.is_empty() {
        let before = remaining.len();
        let mut next_round = Vec::new();
        for step in remaining {
            if step.after.iter().any(|a| !phases.contains_key(a.as_str())) {
                next_round.push(step);
                continue;
            }
            let mine = by_step.get(step.name.as_str()).cloned().unwrap_or_default();
            let want = targets(t, step);
            let dep_ok = |a: &String| {
                let p = phases[a.as_str()];
                let dep = all.iter().find(|s| &s.name == a);
                p == phase::SUCCEEDED
                    || (p == phase::FAILED && dep.is_some_and(|d| d.allow_failure))
                    || (p == phase::RUNNING && dep.is_some_and(|d| d.background) && serving(a, &by_step))
            };
            let deps_done = step.after.iter().all(dep_ok);
            let deps_dead = step.after.iter().any(|a| {
                let p = phases[a.as_str()];
                p == phase::SKIPPED || (p != phase::WAITING && p != phase::RUNNING && !dep_ok(a))
            });
            let p: &'static str = if mine.is_empty() && deps_dead {
                phase::SKIPPED
            } else if mine.is_empty() && !deps_done {
                phase::WAITING
            } else if mine.len() < want.len() {
                for member in &want {
                    if mine.iter().any(|p| &p.spec().role == member) {
                        continue;
                    }
                    let host = st.claims.get(member).and_then(|h| ctx.hosts.get(h));
                    match host {
                        Some(h) => {
                            let ex = expanded.iter().find(|e| e.step.name == step.name).expect("expanded step");
                            to_create.push(process_for(t, ex, member, &h))
                        }
                        None => {
                            verdict.get_or_insert(Verdict {
                                phase: phase::ERROR,
                                reason: "HostLost".into(),
                                message: format!("no host for {member}"),
                            });
                        }
                    }
                }
                phase::RUNNING
            } else if mine.iter().any(|p| !phase::process_terminal(&p.status().phase)) {
                phase::RUNNING
            } else if mine.iter().all(|p| p.status().phase == phase::SUCCEEDED) {
                phase::SUCCEEDED
            } else if mine.iter().all(|p| p.status().phase == phase::SUCCEEDED || stopped(p)) {
                // Stopped by us: at the end of the test, or after another
                // step failed.
                if step.background {
                    phase::SUCCEEDED
                } else {
                    STOPPED
                }
            } else {
                phase::FAILED
            };
            phases.insert(step.name.as_str(), p);
            let mut results: Vec<ProcessResult> = mine.iter().map(|p| result_of(p)).collect();
            results.sort_by(|a, b| a.role.cmp(&b.role));
            let prev = st.steps.iter().find(|s| s.name == step.name);
            let start_time = prev.map(|s| s.start_time.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| {
                if p == phase::WAITING || p == phase::SKIPPED {
                    String::new()
                } else {
                    time::now()
                }
            });
            let completion_time = match p {
                phase::SUCCEEDED | phase::FAILED | phase::SKIPPED => {
                    prev.map(|s| s.completion_time.clone()).filter(|s| !s.is_empty()).unwrap_or_else(time::now)
                }
                _ => String::new(),
            };
            let failed: Vec<&ProcessResult> = results.iter().filter(|r| r.phase != phase::SUCCEEDED).collect();
            let message = if p == phase::FAILED {
                failed
                    .iter()
                    .map(|r| match (r.exit_code, r.message.is_empty()) {
                        (Some(c), true) => format!("{} on {}: exit code {c}", r.role, r.host),
                        _ => format!("{} on {}: {}", r.role, r.host, r.message),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            } else {
                String::new()
            };
            if step.background && !step.allow_failure && verdict.is_none() && decided.is_none() {
                if let Some(p) = mine.iter().find(|p| phase::process_terminal(&p.status().phase) && !stopped(p)) {
                    let why =
                        if p.status().message.is_empty() { "exited".to_string() } else { p.status().message.clone() };
                    verdict = Some(Verdict {
                        phase: phase::FAILED,
                        reason: "BackgroundEnded".into(),
                        message: format!(
                            "background step {} ended before the test finished: {} on {}: {why}",
                            step.name,
                            p.spec().role,
                            p.spec().host_name
                        ),
                    });
                }
            }
            if p == phase::FAILED && !step.allow_failure && verdict.is_none() {
                verdict = Some(Verdict {
                    phase: phase::FAILED,
                    reason: "StepFailed".into(),
                    message: format!("step {} failed: {message}", step.name),
                });
            }
            steps_status.push(StepStatus {
                name: step.name.clone(),
                phase: p.into(),
                processes: results,
                start_time,
                completion_time,
                message,
            });
        }
        if next_round.len() == before {
            break; // unreachable for validated specs (no cycles)
        }
        remaining = next_round;
    }
    // Keep the spec's order.
    steps_status.sort_by_key(|s| all.iter().position(|x| x.name == s.name));

    if let Some(d) = decided {
        return conclude(ctx, t, procs, steps_status, d, true).await;
    }
    if verdict.is_none() {
        if let Some((member, host, why)) = lost_host(ctx, t) {
            verdict = Some(Verdict {
                phase: phase::ERROR,
                reason: "HostLost".into(),
                message: format!("host {host} ({member}) was lost: {why}"),
            });
        } else if now >= deadline {
            verdict = Some(Verdict {
                phase: phase::ERROR,
                reason: "TimedOut".into(),
                message: format!("test exceeded its timeout of {}", duration::format(timeout)),
            });
        } else if !all.is_empty()
            && steps_status
                .iter()
                .zip(&all)
                .all(|(s, step)| step.background || (s.phase != phase::RUNNING && s.phase != phase::WAITING))
        {
            let failed: Vec<&str> =
                st.results.iter().filter(|r| r.outcome == "fail").map(|r| r.path.as_str()).collect();
            verdict = Some(if failed.is_empty() {
                Verdict { phase: phase::SUCCEEDED, reason: "Completed".into(), message: String::new() }
            } else {
                Verdict {
                    phase: phase::FAILED,
                    reason: "ResultFailed".into(),
                    message: format!("recorded results failed: {}", failed.join(", ")),
                }
            });
        }
    }

    if let Some(v) = verdict {
        return conclude(ctx, t, procs, steps_status, v, false).await;
    }

    create_all(ctx, to_create).await?;
    release_gates(ctx, t, &by_step).await?;
    let left = deadline.duration_since(now).unwrap_or_default() + Duration::from_millis(10);
    if st.steps != steps_status {
        let phases = |steps: &[StepStatus]| steps.iter().map(|s| (s.name.clone(), s.phase.clone())).collect::<Vec<_>>();
        let urgent = phases(&st.steps) != phases(&steps_status);
        if let Some(wait) = ctx.result_writes.admit(t.name(), urgent) {
            return Ok(Action::Requeue(wait.min(left)));
        }
        let mut next = t.clone();
        next.status_mut().steps = steps_status;
        ctx.client.api::<Test>().update_status(next).await?;
    }
    Ok(Action::Requeue(left))
}

/// Paces a running test's status writes that only refresh process results.
///
/// A test's status holds the result of every process it ran, so writing it
/// at each process event costs O(processes) per event and O(processes²)
/// per test. Steps changing phase are written at once; a write that only
/// refreshes results waits until `interval` has passed since the test's
/// last write (the reconcile is requeued for then). The final status is
/// written complete whatever the pace.
pub struct ResultWrites {
    interval: Duration,
    last: std::sync::Mutex<HashMap<String, tokio::time::Instant>>,
}

impl ResultWrites {
    pub fn new(interval: Duration) -> Self {
        ResultWrites { interval, last: Default::default() }
    }

    /// None: write now (recorded as the test's last write); Some(d): not
    /// before d from now.
    pub fn admit(&self, test: &str, urgent: bool) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // Entries older than the interval decide nothing: dropping them
        // keeps the map to the tests written lately.
        last.retain(|_, at| now.duration_since(*at) < self.interval);
        match last.get(test) {
            Some(at) if !urgent => Some(self.interval - now.duration_since(*at)),
            _ => {
                last.insert(test.to_string(), now);
                None
            }
        }
    }
}

/// Creates processes concurrently, so a step's processes share the store's
/// group commits instead of paying one round trip each. An existing one is
/// fine: names are fixed, so a second pass creates nothing twice.
async fn create_all(ctx: &Context, procs: Vec<Process>) -> Result<(), Status> {
    use futures::StreamExt;
    let api = ctx.client.api::<Process>();
    let mut results = futures::stream::iter(procs).map(|p| api.create(p)).buffer_unordered(64);
    while let Some(r) = results.next().await {
        match r {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(s),
        }
    }
    Ok(())
}

/// A `sync: true` step starts together: once every one of its processes
/// exists and is Ready, all are released.
async fn release_gates(ctx: &Context, t: &Test, by_step: &HashMap<&str, Vec<&Process>>) -> Result<(), Status> {
    for ex in testbus_proto::steps::expand(t.spec()).iter().filter(|e| e.step.sync) {
        let step = &ex.step;
        let Some(mine) = by_step.get(step.name.as_str()) else { continue };
        if mine.len() < targets(t, step).len() || mine.iter().all(|p| p.spec().released) {
            continue;
        }
        if !mine.iter().all(|p| p.status().phase == phase::READY || p.spec().released) {
            continue;
        }
        for p in mine.iter().filter(|p| !p.spec().released) {
            let mut next = (*p).clone();
            next.spec_mut().released = true;
            ctx.client.api::<Process>().update(next).await?;
        }
        tracing::debug!(test = t.name(), step = %step.name, "released");
    }
    Ok(())
}

/// Stops what still runs; once everything has ended, writes the final
/// status. When something must be stopped, the verdict is recorded first
/// (condition Finished=Unknown), so that stopping processes, or a
/// controller restart, cannot change it.
async fn conclude(
    ctx: &Context,
    t: &Test,
    procs: &[Arc<Process>],
    mut steps: Vec<StepStatus>,
    v: Verdict,
    recorded: bool,
) -> Result<Action, Status> {
    // With every process already ended there is nothing to stop, so nothing
    // can change the verdict: the final status is written at once (one
    // write instead of two, on the path every test ends by).
    let all_ended = procs.iter().all(|p| phase::process_terminal(&p.status().phase));
    if !recorded && !all_ended {
        let mut next = t.clone();
        let st = next.status_mut();
        st.steps = steps.clone();
        set_condition(
            &mut st.conditions,
            Condition { status: "Unknown".into(), ..condition(FINISHED, false, &v.reason, &v.message) },
        );
        let t = ctx.client.api::<Test>().update_status(next).await?;
        stop_all(ctx, &t, procs).await?;
        return Ok(Action::AwaitChange);
    }
    if !stop_all(ctx, t, procs).await? {
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
    for s in &mut steps {
        if s.phase == phase::WAITING || s.phase == phase::RUNNING {
            s.phase = phase::SKIPPED.into();
        }
    }
    let mut next = t.clone();
    let st = next.status_mut();
    st.phase = v.phase.into();
    st.reason = v.reason;
    st.message = v.message;
    st.steps = steps;
    st.completion_time = time::now();
    let ok = v.phase == phase::SUCCEEDED;
    if !ok && t.spec().hold_on_failure {
        let hosts: Vec<&str> = st.claims.values().map(String::as_str).collect();
        let msg = format!("hosts {} stay claimed for debugging until the test is deleted", hosts.join(", "));
        set_condition(&mut st.conditions, condition(HELD, true, "HoldOnFailure", &msg));
    }
    set_condition(&mut st.conditions, condition("Finished", ok, &st.reason.clone(), &st.message.clone()));
    ctx.client.api::<Test>().update_status(next).await?;
    tracing::info!(test = t.name(), phase = v.phase, "test finished");
    Ok(Action::AwaitChange)
}

/// Asks every running process of the test to stop and marks those on lost
/// hosts Lost. True when none is left running.
async fn stop_all(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<bool, Status> {
    let mut all_done = true;
    for p in procs {
        if phase::process_terminal(&p.status().phase) {
            continue;
        }
        all_done = false;
        let host_alive = ctx.hosts.get(&p.spec().host_name).is_some_and(|h| h.status().phase == phase::READY);
        if !host_alive {
            let mut next = (**p).clone();
            let s = next.status_mut();
            s.phase = phase::LOST.into();
            s.reason = "HostLost".into();
            s.message = format!("host {} was lost", p.spec().host_name);
            s.finish_time = time::now();
            match ctx.client.api::<Process>().update_status(next).await {
                Ok(_) | Err(_) => {} // a conflict is retried by the next reconcile
            }
        } else if !p.spec().stop {
            let mut next = (**p).clone();
            next.spec_mut().stop = true;
            ctx.client.api::<Process>().update(next).await?;
            tracing::debug!(test = t.name(), process = p.name(), "stopping");
        }
    }
    Ok(all_done)
}

/// A held test keeps its hosts until it is deleted.
fn held(t: &Test) -> bool {
    t.status().conditions.iter().any(|c| c.r#type == HELD && c.status == "True")
}

/// A finished test: release its hosts (unless held), and delete it once
/// `ttlAfterFinished` has passed.
async fn finished(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Status> {
    if held(t) {
        stop_all(ctx, t, procs).await?;
    } else {
        release(ctx, t, procs).await?;
    }
    let Ok(ttl) = duration::parse(&t.spec().ttl_after_finished) else { return Ok(Action::AwaitChange) };
    let done = time::parse(&t.status().completion_time).unwrap_or_else(SystemTime::now);
    match (done + ttl).duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => Ok(Action::Requeue(left + Duration::from_millis(10))),
        _ => {
            tracing::info!(test = t.name(), "ttlAfterFinished passed; deleting");
            match ctx.client.api::<Test>().delete(t.name()).await {
                Ok(_) => Ok(Action::AwaitChange),
                Err(s) if s.code() == Code::NotFound => Ok(Action::AwaitChange),
                Err(s) => Err(s),
            }
        }
    }
}

/// After the end: release each host once nothing of the test runs on it.
async fn release(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Status> {
    stop_all(ctx, t, procs).await?;
    let uid = &t.meta().uid;
    for h in ctx.hosts.filter(|h| h.status().claim.as_ref().is_some_and(|c| &c.test_uid == uid)) {
        let busy = procs.iter().any(|p| p.spec().host_name == h.name() && !phase::process_terminal(&p.status().phase));
        if busy {
            continue;
        }
        let mut next: Host = (*h).clone();
        next.status_mut().claim = None;
        ctx.client.api::<Host>().update_status(next).await?;
        tracing::info!(test = t.name(), host = h.name(), "released");
    }
    Ok(Action::AwaitChange)
}

/// Deleting a test: stop, release, delete its processes, drop the
/// finalizer.
async fn teardown(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Status> {
    release(ctx, t, procs).await?;
    if procs.iter().any(|p| !phase::process_terminal(&p.status().phase)) {
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
    let claimed = ctx.hosts.filter(|h| h.status().claim.as_ref().is_some_and(|c| c.test_uid == t.meta().uid));
    if !claimed.is_empty() {
        return Ok(Action::Requeue(Duration::from_millis(100)));
    }
    for p in procs {
        match ctx.client.api::<Process>().delete(p.name()).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s),
        }
    }
    let mut next = t.clone();
    next.meta_mut().finalizers.retain(|f| f != FINALIZER);
    match ctx.client.api::<Test>().update(next).await {
        Ok(_) => Ok(Action::AwaitChange),
        Err(s) if s.code() == Code::NotFound => Ok(Action::AwaitChange),
        Err(s) => Err(s),
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn result_only_writes_are_paced_per_test() {
        let w = ResultWrites::new(Duration::from_millis(200));
        assert_eq!(w.admit("a", false), None);
        assert_eq!(w.admit("b", false), None, "tests are paced apart");
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(w.admit("a", false), Some(Duration::from_millis(150)));
        assert_eq!(w.admit("a", true), None, "a step changing phase is written at once");
        assert_eq!(w.admit("a", false), Some(Duration::from_millis(200)));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(w.admit("a", false), None);
    }

    #[test]
    fn a_pending_test_waits_until_its_pending_timeout_then_gives_up() {
        let mut t = Test::default();
        t.meta_mut().creation_timestamp = "2026-01-01T00:00:00Z".into();
        let at = |secs: u64| time::parse("2026-01-01T00:00:00Z").unwrap() + Duration::from_secs(secs);
        // Default: an hour; looked at again at least every 30 s.
        assert_eq!(pending_outcome(&t, at(10)), PendingOutcome::Wait(Duration::from_secs(30)));
        assert_eq!(pending_outcome(&t, at(3590)), PendingOutcome::Wait(Duration::from_secs(10)));
        assert_eq!(pending_outcome(&t, at(3600)), PendingOutcome::GiveUp { waited: DEFAULT_PENDING_TIMEOUT });
        t.spec_mut().pending_timeout = "5s".into();
        assert_eq!(pending_outcome(&t, at(2)), PendingOutcome::Wait(Duration::from_secs(3)));
        assert_eq!(pending_outcome(&t, at(6)), PendingOutcome::GiveUp { waited: Duration::from_secs(5) });
    }
}
