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
use crate::error::{Doing, Error};
use crate::runtime::Action;
use crate::schedule::{self, Assignment};
use crate::test_plan::{self, held, set_condition, Ending, Verdict};
use crate::Context;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use testbus_proto::states::{waits_for_hosts, ConditionStatus, ConditionType, TestReason};
use testbus_proto::subst::host_var_name;
use testbus_proto::validate::members;
use testbus_proto::Condition;
use testbus_proto::{
    duration, phase, time, ClaimAssignment, ClaimRequest, Host, HostFacts, Process, Resource, StepStatus, Test,
    TestStatus, TestTrace,
};
use tonic::Code;

pub use crate::test_plan::{process_name, DEFAULT_TIMEOUT, LABEL_ROLE, LABEL_STEP, LABEL_TEST};
use testbus_proto::states::{ProcessPhase, StepPhase, TestPhase};
use testbus_proto::TEST_FINALIZER as FINALIZER;
/// A test whose reconcile keeps failing (a status too large to store, say)
/// says so in its conditions instead of staying Pending in silence.
pub async fn report_trouble(ctx: &Context, name: &str, trouble: crate::runtime::Trouble) {
    crate::runtime::report_trouble(ctx.client.api::<Test>(), name, trouble, |t| &mut t.status_mut().conditions).await
}

pub async fn reconcile(ctx: &Context, name: &str) -> Result<Action, Error> {
    let Some(t) = ctx.tests.get(name) else {
        return Ok(Action::AwaitChange);
    };
    let uid = t.meta().uid.clone();
    let procs: Vec<Arc<Process>> = ctx.processes.filter(|p| p.spec().test == name && p.spec().test_uid == uid);
    if !t.meta().deletion_timestamp.is_empty() {
        // A running test ends Cancelled first (its plan says so), then is
        // torn down.
        if t.status().phase == TestPhase::Running {
            return drive(ctx, &t, &procs).await;
        }
        return teardown(ctx, &t, &procs).await;
    }
    let status = t.status();
    if testbus_proto::states::unclaimed(&status.phase) {
        pending(ctx, &t).await
    } else if status.phase == TestPhase::Running {
        drive(ctx, &t, &procs).await
    } else {
        finished(ctx, &t, &procs).await
    }
}

/// A pending test's own reconcile: the scheduler's pass claims it (see
/// [`schedule_pass`]); this asks for a pass and ends the test at its
/// pending timeout. A waiting test costs nothing more until something it
/// could use changes.
async fn pending(ctx: &Context, t: &Test) -> Result<Action, Error> {
    match pending_outcome(t, SystemTime::now()) {
        PendingOutcome::GiveUp { waited } => give_up(ctx, t, waited).await,
        PendingOutcome::Decided(v) => end_pending(ctx, t, v.reason, &v.message, None).await,
        PendingOutcome::Wait(left) => {
            ctx.schedule_queue.add(SCHEDULE);
            Ok(Action::Requeue(left))
        }
    }
}

/// The one key of the scheduler's queue: a pass covers every pending test.
pub const SCHEDULE: &str = "queue";

/// The most time between two passes: changes that come meanwhile share
/// the next one.
pub const SCHEDULE_COALESCE: Duration = Duration::from_millis(50);

/// How long the scheduler waits after a pass that took `pass`, so that
/// changes coming meanwhile share the next one: four times the pass, at
/// most [`SCHEDULE_COALESCE`]. A long queue (5,000 waiting tests) is passed
/// over at most about every 50 ms whatever changes; a small one without
/// delay: a fixed 50 ms made every `run` that came right after another
/// wait up to 50 ms for its claim (issue 33: 55 ms per back-to-back `run
/// -- true`, 28 ms when spaced out).
pub fn coalesce_after(pass: Duration) -> Duration {
    (pass * 4).min(SCHEDULE_COALESCE)
}

/// How long a pass waits before the next when nothing wakes it: changes
/// to hosts and to the queue do, this is a safety net.
const SCHEDULE_SAFETY_NET: Duration = Duration::from_secs(300);

/// One pass of the scheduler over every pending test, in queue order
/// (`schedule::plan_queue`, one pure decision for the whole queue): claims
/// first, so that a test that can run starts whatever waits around it;
/// then each waiting test's Scheduled condition, written only where its
/// reason changed.
pub async fn schedule_pass(ctx: &Context) -> Result<Action, Error> {
    let hosts = ctx.hosts.list();
    let refs: Vec<&Host> = hosts.iter().map(|h| h.as_ref()).collect();
    let pending = ctx.tests.filter(waits_for_hosts);
    let mut queue: Vec<&Test> = pending.iter().map(|t| t.as_ref()).collect();
    queue.sort_by(|a, b| schedule::queue_order(a, b));
    let decisions = schedule::plan_queue(&queue, &refs);
    let by_name: HashMap<&str, &Host> = refs.iter().map(|h| (h.name(), *h)).collect();
    let mut again = SCHEDULE_SAFETY_NET;
    let mut waiting = Vec::new();
    for (t, d) in queue.iter().zip(decisions) {
        match d {
            schedule::Decision::Claim(a) => {
                if claim(ctx, t, &a, &by_name).await? == Claimed::Raced {
                    again = Duration::from_millis(20);
                }
            }
            schedule::Decision::Wait(w) => waiting.push((*t, w)),
        }
    }
    // Pools that can make hosts for a test that cannot run on what exists.
    let pools = ctx.pools.filter(|p| p.meta().deletion_timestamp.is_empty());
    let writes = waiting.into_iter().filter_map(|(t, w)| {
        let (reason, why) = match &w {
            schedule::Waiting::Unsatisfiable(why) => {
                let makers: Vec<&str> =
                    pools.iter().filter(|p| crate::pool_plan::demand(p, [t]).0 > 0).map(|p| p.name()).collect();
                if makers.is_empty() {
                    (w.reason(), w.message())
                } else {
                    ("WaitingForPool", format!("waiting for pool {} to make guests: {why}", makers.join(", ")))
                }
            }
            _ => (w.reason(), w.message()),
        };
        let unchanged = t.status().phase == TestPhase::Pending
            && t.status()
                .conditions
                .iter()
                .any(|c| c.r#type == ConditionType::Scheduled && c.reason == reason && c.message == why);
        (!unchanged).then_some((t, reason, why))
    });
    let writes: Vec<_> = writes.collect();
    // Written a few at a time: thousands of new waiting tests take a while
    // once, and hold up nothing (claims went first).
    let mut results = Vec::new();
    for chunk in writes.chunks(16) {
        results
            .extend(futures::future::join_all(chunk.iter().map(|(t, r, w)| still_pending(ctx, t, r, w.clone()))).await);
    }
    for r in results {
        match r {
            Err(e) if e.status().code() == Code::Aborted => again = Duration::from_millis(20),
            Err(e) if e.status().code() == Code::NotFound => {}
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    Ok(Action::Requeue(again))
}

/// How a claim went.
#[derive(Debug, PartialEq, Eq)]
enum Claimed {
    Claimed,
    /// Someone else got a host first, or our view was stale: the next pass,
    /// from fresh caches.
    Raced,
}

async fn claim(
    ctx: &Context,
    t: &Test,
    assignments: &[Assignment],
    by_name: &HashMap<&str, &Host>,
) -> Result<Claimed, Error> {
    let status = running_status(t, assignments, by_name);
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
            if let Err(s) = drive(ctx, &claimed.into_inner(), &[]).await {
                tracing::debug!(test = t.name(), error = %s, "starting a claimed test; its reconcile goes on");
            }
            Ok(Claimed::Claimed)
        }
        Err(s) if matches!(s.code(), Code::Aborted | Code::FailedPrecondition | Code::NotFound) => Ok(Claimed::Raced),
        Err(status) => Err(Error::Api { what: "claiming the hosts", status }),
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
    /// A verdict was recorded before it claimed (it was cancelled): it
    /// ends so, without hosts.
    Decided(testbus_proto::states::Verdict),
}

fn pending_outcome(t: &Test, now: SystemTime) -> PendingOutcome {
    if let Some(v) = testbus_proto::states::Verdict::recorded(&t.status().conditions) {
        return PendingOutcome::Decided(v);
    }
    let limit = duration::parse(&t.spec().pending_timeout).unwrap_or(DEFAULT_PENDING_TIMEOUT);
    let created = time::parse(&t.meta().creation_timestamp).unwrap_or(now);
    let waited = now.duration_since(created).unwrap_or_default();
    if waited >= limit {
        return PendingOutcome::GiveUp { waited: limit };
    }
    // Host and queue changes wake the scheduler; this is the deadline.
    PendingOutcome::Wait(limit - waited)
}

/// A test that has waited past its pending timeout ends in Error, saying
/// what it waited for.
async fn give_up(ctx: &Context, t: &Test, waited: Duration) -> Result<Action, Error> {
    let why = t
        .status()
        .conditions
        .iter()
        .find(|c| c.r#type == ConditionType::Scheduled)
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_else(|| ("Unschedulable".into(), "no pass of the scheduler found hosts for it".into()));
    let message = format!("waited {} for hosts (its pendingTimeout): {}", duration::format(waited), why.1);
    end_pending(ctx, t, TestReason::PendingTimeout, &message, Some(why)).await
}

/// Ends a test that never claimed hosts, for `reason`; `scheduled` is what
/// its Scheduled condition says at the end, when that changes.
async fn end_pending(
    ctx: &Context,
    t: &Test,
    reason: TestReason,
    message: &str,
    scheduled: Option<(String, String)>,
) -> Result<Action, Error> {
    let mut next = t.clone();
    let st = next.status_mut();
    st.phase = reason.phase().into();
    st.reason = reason.into();
    st.message = message.to_string();
    st.completion_time = time::now();
    if let Some((r, m)) = scheduled {
        set_condition(&mut st.conditions, Condition::new(ConditionType::Scheduled, ConditionStatus::False, &r, m));
    }
    // Its recorded verdict (if any) is carried out: the condition says so.
    set_condition(
        &mut st.conditions,
        Condition::new(ConditionType::Finished, ConditionStatus::False, reason.as_str(), message),
    );
    ctx.client.api::<Test>().update_status(next).await.doing("ending the test before its claim")?;
    tracing::info!(test = t.name(), reason = reason.as_str(), "ended before it claimed hosts");
    Ok(Action::AwaitChange)
}

/// A test that cannot claim its hosts now says why on its Scheduled
/// condition.
async fn still_pending(ctx: &Context, t: &Test, reason: &str, why: String) -> Result<(), Error> {
    let mut next = t.clone();
    let st = next.status_mut();
    let changed = set_condition(
        &mut st.conditions,
        Condition::new(ConditionType::Scheduled, ConditionStatus::False, reason, &why),
    );
    if changed || st.phase.is_empty() {
        st.phase = TestPhase::Pending.into();
        st.message = why;
        ctx.client.api::<Test>().update_status(next).await.doing("saying why the test waits")?;
    }
    Ok(())
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
    let mut conditions = t.status().conditions.clone();
    set_condition(
        &mut conditions,
        Condition::new(ConditionType::Scheduled, ConditionStatus::True, "Claimed", "all hosts claimed"),
    );
    TestStatus {
        phase: TestPhase::Running.into(),
        conditions,
        observed_generation: t.meta().generation,
        claims: assignments.iter().map(|a| (a.member.clone(), a.host.clone())).collect(),
        // The host variables are in host_vars alone: env is the spec's
        // env and what setenv adds (shown once by `get -o yaml`).
        env: spec.env.clone(),
        host_vars,
        steps: testbus_proto::steps::expand(spec)
            .into_iter()
            .map(|s| StepStatus { name: s.step.name, phase: StepPhase::Waiting.into(), ..Default::default() })
            .collect(),
        start_time: time::now(),
        trace: Some(TestTrace { hosts: trace_hosts, env: spec.env.clone(), files: file_digests(t) }),
        // What earlier attempts came to stays.
        attempts: t.status().attempts.clone(),
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

/// A running test: its plan, written. Creates what the plan creates,
/// releases gates, refreshes the steps' status (paced), or concludes.
async fn drive(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Error> {
    if retrying(t) && t.meta().deletion_timestamp.is_empty() {
        return next_attempt(ctx, t, procs).await;
    }
    let plan = test_plan::plan(t, procs, ctx.hosts.as_ref(), SystemTime::now());
    match plan.ending {
        Some(Ending::Recorded(v)) => return conclude(ctx, t, procs, plan.steps, v, Recorded::Yes).await,
        Some(Ending::New(v)) => return conclude(ctx, t, procs, plan.steps, v, Recorded::No).await,
        None => {}
    }
    create_all(ctx, plan.create).await?;
    for p in plan.release {
        let mut next = (*p).clone();
        next.spec_mut().released = true;
        ctx.client.api::<Process>().update(next).await.doing("releasing a sync step's processes")?;
        tracing::debug!(test = t.name(), process = p.name(), "released");
    }
    let st = t.status();
    if st.steps != plan.steps {
        let phases = |steps: &[StepStatus]| steps.iter().map(|s| (s.name.clone(), s.phase.clone())).collect::<Vec<_>>();
        let urgent = if phases(&st.steps) != phases(&plan.steps) { Urgency::Now } else { Urgency::Paced };
        if let Some(wait) = ctx.result_writes.admit(t.name(), urgent) {
            return Ok(Action::Requeue(wait.min(plan.requeue)));
        }
        let mut next = t.clone();
        next.status_mut().steps = plan.steps;
        ctx.client.api::<Test>().update_status(next).await.doing("writing the test's status")?;
    }
    Ok(Action::Requeue(plan.requeue))
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
    last: parking_lot::Mutex<HashMap<String, tokio::time::Instant>>,
}

impl ResultWrites {
    pub fn new(interval: Duration) -> Self {
        ResultWrites { interval, last: Default::default() }
    }

    /// None: write now (recorded as the test's last write); Some(d): not
    /// before d from now.
    pub fn admit(&self, test: &str, urgency: Urgency) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock();
        // Entries older than the interval decide nothing: dropping them
        // keeps the map to the tests written lately.
        last.retain(|_, at| now.duration_since(*at) < self.interval);
        match last.get(test) {
            Some(at) if urgency == Urgency::Paced => Some(self.interval - now.duration_since(*at)),
            _ => {
                last.insert(test.to_string(), now);
                None
            }
        }
    }
}

/// Whether a status write may wait for the pace of result refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A step changed phase: written at once.
    Now,
    /// Only results were refreshed: paced.
    Paced,
}

/// Creates processes concurrently, so a step's processes share the store's
/// group commits instead of paying one round trip each. An existing one is
/// fine: names are fixed, so a second pass creates nothing twice.
async fn create_all(ctx: &Context, procs: Vec<Process>) -> Result<(), Error> {
    use futures::StreamExt;
    let api = ctx.client.api::<Process>();
    let mut results = futures::stream::iter(procs).map(|p| api.create(p)).buffer_unordered(64);
    while let Some(r) = results.next().await {
        match r {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(status) => return Err(Error::Api { what: "creating the test's processes", status }),
        }
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
    steps: Vec<StepStatus>,
    v: Verdict,
    recorded: Recorded,
) -> Result<Action, Error> {
    // With every process already ended there is nothing to stop, so nothing
    // can change the verdict: the final status is written at once (one
    // write instead of two, on the path every test ends by).
    let all_ended = procs.iter().all(|p| phase::process_terminal(&p.status().phase));
    if recorded == Recorded::No && !all_ended {
        let mut next = t.clone();
        let st = next.status_mut();
        st.steps = steps;
        set_condition(&mut st.conditions, v.condition(time::now()));
        let t = ctx.client.api::<Test>().update_status(next).await.doing("recording the test's verdict")?;
        stop_all(ctx, &t, procs).await?;
        return Ok(Action::AwaitChange);
    }
    if !stop_all(ctx, t, procs).await? {
        // Stuck here while an agent does not act on a stop: the test says
        // which processes it waits for, and where.
        let why = test_plan::waiting_for_stops(procs);
        if t.status().message != why {
            let mut next = t.clone();
            next.status_mut().message = why;
            ctx.client.api::<Test>().update_status(next).await.doing("saying what the ending test waits for")?;
        }
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
    let cancelled = !t.meta().deletion_timestamp.is_empty();
    let retry = test_plan::retry(t, procs, &v, ctx.hosts.as_ref(), ctx.cfg.infrastructure_retries);
    if let Some(r) = retry.filter(|_| !cancelled) {
        return record_attempt(ctx, t, steps, v, r).await;
    }
    let phase = v.phase().as_str();
    let mut next = t.clone();
    *next.status_mut() = test_plan::final_status(t, steps, v, SystemTime::now());
    ctx.client.api::<Test>().update_status(next).await.doing("writing the test's final status")?;
    tracing::info!(test = t.name(), phase, "test finished");
    Ok(Action::AwaitChange)
}

/// Whether an attempt that failed for the infrastructure's sake is being
/// torn down for the next.
fn retrying(t: &Test) -> bool {
    t.status().conditions.iter().any(|c| c.is(ConditionType::Retrying, ConditionStatus::True))
}

/// The attempt that just ended for the infrastructure's sake goes into
/// the test's status (what ended it, the hosts it failed on), with the
/// Retrying condition: from here on, reconciles tear it down
/// ([`next_attempt`]), whatever happens in between.
async fn record_attempt(
    ctx: &Context,
    t: &Test,
    steps: Vec<StepStatus>,
    v: Verdict,
    r: test_plan::Retry,
) -> Result<Action, Error> {
    let mut next = t.clone();
    let st = next.status_mut();
    let number = st.attempts.len() as u32 + 1;
    let message = format!(
        "attempt {number} failed for the infrastructure's sake on {} ({}: {}); retrying on other hosts",
        r.hosts.join(", "),
        v.reason.as_str(),
        v.message
    );
    st.attempts.push(testbus_proto::Attempt {
        number,
        reason: v.reason.as_str().into(),
        message: v.message.clone(),
        hosts: r.hosts.clone(),
        start_time: st.start_time.clone(),
        finish_time: time::now(),
        claims: st.claims.clone(),
    });
    st.steps = steps;
    set_condition(
        &mut st.conditions,
        Condition::new(ConditionType::Retrying, ConditionStatus::True, v.reason.as_str(), &message),
    );
    ctx.client.api::<Test>().update_status(next).await.doing("recording the failed attempt")?;
    tracing::warn!(test = t.name(), attempt = number, hosts = ?r.hosts, reason = v.reason.as_str(), "retrying the test on other hosts");
    Ok(Action::AwaitChange)
}

/// Tears a failed attempt down (its processes deleted, its hosts
/// released), then puts the test back in the queue for the next one; the
/// scheduler does not give it the hosts earlier attempts failed on.
async fn next_attempt(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Error> {
    if !stop_all(ctx, t, procs).await? {
        return Ok(Action::Requeue(Duration::from_secs(1)));
    }
    delete_processes(ctx, procs, "deleting the failed attempt's processes").await?;
    release(ctx, t, &[]).await?;
    let claimed = ctx.hosts.filter(|h| h.status().claim.as_ref().is_some_and(|c| c.test_uid == t.meta().uid));
    if !procs.is_empty() || !claimed.is_empty() {
        // Looked at again once the caches show it all gone.
        return Ok(Action::Requeue(Duration::from_millis(100)));
    }
    let mut next = t.clone();
    let st = next.status_mut();
    let why = st
        .conditions
        .iter()
        .find(|c| c.r#type == ConditionType::Retrying)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    st.conditions.retain(|c| c.r#type != ConditionType::Retrying && c.r#type != ConditionType::Finished);
    st.phase = TestPhase::Pending.into();
    st.reason = String::new();
    st.message = why;
    st.claims.clear();
    st.steps.clear();
    st.host_vars.clear();
    st.env.clear();
    st.start_time = String::new();
    ctx.client.api::<Test>().update_status(next).await.doing("queueing the test's next attempt")?;
    ctx.schedule_queue.add(SCHEDULE);
    Ok(Action::AwaitChange)
}

/// Deletes `procs` (those gone already are fine).
async fn delete_processes(ctx: &Context, procs: &[Arc<Process>], what: &'static str) -> Result<(), Error> {
    for p in procs {
        match ctx.client.api::<Process>().delete(p.name()).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(status) => return Err(Error::Api { what, status }),
        }
    }
    Ok(())
}

/// Whether a verdict was recorded by an earlier reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    Yes,
    No,
}

/// Asks every running process of the test to stop and marks those on lost
/// hosts Lost. True when none is left running.
async fn stop_all(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<bool, Error> {
    let stops = test_plan::stops(procs, ctx.hosts.as_ref());
    for p in stops.lost {
        let mut next = (*p).clone();
        let s = next.status_mut();
        s.phase = ProcessPhase::Lost.into();
        s.reason = testbus_proto::states::ProcessReason::HostLost.into();
        s.message = format!("host {} was lost", p.spec().host_name);
        s.finish_time = time::now();
        match ctx.client.api::<Process>().update_status(next).await {
            Ok(_) | Err(_) => {} // a conflict is retried by the next reconcile
        }
    }
    let mut why = test_plan::recorded_verdict(t)
        .map(|v| match v.message.as_str() {
            "" => format!("its test ended ({})", v.reason.as_str()),
            m => format!("its test ended ({}): {m}", v.reason.as_str()),
        })
        .unwrap_or_default();
    // Well within what the API takes (a verdict can name many processes).
    const MAX_STOP_REASON: usize = 1024;
    if why.len() > MAX_STOP_REASON {
        let mut end = MAX_STOP_REASON;
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        why.truncate(end);
        why.push('…');
    }
    for p in stops.stop {
        let mut next = (*p).clone();
        next.spec_mut().stop = true;
        next.spec_mut().stop_reason = why.clone();
        ctx.client.api::<Process>().update(next).await.doing("stopping the test's processes")?;
        tracing::debug!(test = t.name(), process = p.name(), "stopping");
    }
    Ok(stops.all_ended)
}

/// A finished test: release its hosts (unless held), and delete it once
/// `ttlAfterFinished` has passed.
async fn finished(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Error> {
    if held(t) {
        // What the test ran is stopped; commands a person runs on the held
        // hosts to debug them (`testbusctl exec`, `cp`) are left to run.
        let ran: Vec<Arc<Process>> = procs
            .iter()
            .filter(|p| !p.meta().labels.contains_key(testbus_proto::process::LABEL_EXEC))
            .cloned()
            .collect();
        stop_all(ctx, t, &ran).await?;
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
                Err(status) => Err(Error::Api { what: "deleting the test after its ttlAfterFinished", status }),
            }
        }
    }
}

/// After the end: release each host once nothing of the test runs on it.
async fn release(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Error> {
    stop_all(ctx, t, procs).await?;
    let uid = &t.meta().uid;
    let free: Vec<Arc<Host>> = ctx
        .hosts
        .filter(|h| h.status().claim.as_ref().is_some_and(|c| &c.test_uid == uid))
        .into_iter()
        .filter(|h| {
            !procs.iter().any(|p| p.spec().host_name == h.name() && !phase::process_terminal(&p.status().phase))
        })
        .collect();
    // Read-modify-write from the cached copy, again from the stored one on
    // a conflict: every agent renews its lease (a write) every few
    // seconds, and a release of a thousand hosts written against the
    // cached versions conflicted on one of them at each try (issue 33's
    // fleet: seconds of backoff before the hosts were free again). A few
    // at a time.
    let api = ctx.client.api::<Host>();
    for chunk in free.chunks(16) {
        let writes = chunk.iter().map(|h| {
            api.patch_status_from(h.name(), Some((**h).clone()), |h| {
                if h.status().claim.as_ref().is_none_or(|c| &c.test_uid != uid) {
                    return false;
                }
                h.status_mut().claim = None;
                true
            })
        });
        for (h, r) in chunk.iter().zip(futures::future::join_all(writes).await) {
            match r {
                Ok(_) => tracing::info!(test = t.name(), host = h.name(), "released"),
                Err(s) if s.code() == Code::NotFound => {}
                Err(status) => return Err(Error::Api { what: "releasing the test's hosts", status }),
            }
        }
    }
    Ok(Action::AwaitChange)
}

/// Deleting a test: stop, release, delete its processes, drop the
/// finalizer.
async fn teardown(ctx: &Context, t: &Test, procs: &[Arc<Process>]) -> Result<Action, Error> {
    release(ctx, t, procs).await?;
    if procs.iter().any(|p| !phase::process_terminal(&p.status().phase)) {
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
    let claimed = ctx.hosts.filter(|h| h.status().claim.as_ref().is_some_and(|c| c.test_uid == t.meta().uid));
    if !claimed.is_empty() {
        return Ok(Action::Requeue(Duration::from_millis(100)));
    }
    delete_processes(ctx, procs, "deleting the test's processes").await?;
    let mut next = t.clone();
    next.meta_mut().finalizers.retain(|f| f != FINALIZER);
    match ctx.client.api::<Test>().update(next).await {
        Ok(_) => Ok(Action::AwaitChange),
        Err(s) if s.code() == Code::NotFound => Ok(Action::AwaitChange),
        Err(status) => Err(Error::Api { what: "removing the test's finalizer", status }),
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;

    #[test]
    fn a_cheap_pass_waits_little_and_a_long_one_at_most_the_coalescing_time() {
        assert_eq!(coalesce_after(Duration::from_micros(500)), Duration::from_millis(2));
        assert_eq!(coalesce_after(Duration::from_millis(10)), Duration::from_millis(40));
        assert_eq!(coalesce_after(Duration::from_millis(400)), SCHEDULE_COALESCE);
    }

    #[tokio::test(start_paused = true)]
    async fn result_only_writes_are_paced_per_test() {
        let w = ResultWrites::new(Duration::from_millis(200));
        assert_eq!(w.admit("a", Urgency::Paced), None);
        assert_eq!(w.admit("b", Urgency::Paced), None, "tests are paced apart");
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(w.admit("a", Urgency::Paced), Some(Duration::from_millis(150)));
        assert_eq!(w.admit("a", Urgency::Now), None, "a step changing phase is written at once");
        assert_eq!(w.admit("a", Urgency::Paced), Some(Duration::from_millis(200)));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(w.admit("a", Urgency::Paced), None);
    }

    #[test]
    fn a_pending_test_waits_until_its_pending_timeout_then_gives_up() {
        let mut t = Test::default();
        t.meta_mut().creation_timestamp = "2026-01-01T00:00:00Z".into();
        let at = |secs: u64| time::parse("2026-01-01T00:00:00Z").unwrap() + Duration::from_secs(secs);
        // Default: an hour; looked at again at least every 30 s.
        assert_eq!(pending_outcome(&t, at(10)), PendingOutcome::Wait(Duration::from_secs(3590)));
        assert_eq!(pending_outcome(&t, at(3590)), PendingOutcome::Wait(Duration::from_secs(10)));
        assert_eq!(pending_outcome(&t, at(3600)), PendingOutcome::GiveUp { waited: DEFAULT_PENDING_TIMEOUT });
        t.spec_mut().pending_timeout = "5s".into();
        assert_eq!(pending_outcome(&t, at(2)), PendingOutcome::Wait(Duration::from_secs(3)));
        assert_eq!(pending_outcome(&t, at(6)), PendingOutcome::GiveUp { waited: Duration::from_secs(5) });
        // Cancelled before it claimed: it ends so, and the scheduler no
        // longer offers it hosts.
        assert!(waits_for_hosts(&t));
        let v = testbus_proto::states::Verdict::new(TestReason::Cancelled, "cancelled by alice");
        t.status_mut().conditions.push(v.condition(time::now()));
        assert_eq!(pending_outcome(&t, at(2)), PendingOutcome::Decided(v));
        assert!(!waits_for_hosts(&t));
    }
}
