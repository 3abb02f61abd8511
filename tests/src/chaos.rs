//! Claims under faults (issue 32, part 3), as Jepsen checks a database: a
//! random workload of multi-role tests runs over many agents in network
//! namespaces, with three control-plane replicas on a three-member etcd,
//! while a nemesis kills, pauses and partitions agents, replicas and etcd
//! members. Every process records its own start and end in a file of its
//! own (which no fault touches); the workload records what the API
//! acknowledged and read back. When the faults stop and the tests have had
//! their time to end, [`crate::history::check`] judges the whole history.
//!
//! One seed drives both the workload's choices and the nemesis's (two
//! streams of it), so a failing seed replays the same tests and the same
//! faults in the same order; the timing of a real cluster still varies
//! between runs, as in Jepsen.
//!
//! Ownership: [`run`] owns the [`Cluster`] (and so every process and
//! namespace); the nemesis is the only one to touch processes and links,
//! the workload only talks to the API, through each replica's own socket.
use crate::history::{self, Event, FinalState, Violation};
use crate::{Cluster, Cut};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use testbus_client::Client;
use testbus_proto::states::{HostPhase, TestPhase};
use testbus_proto::{Host, HostRequirement, ObjectMeta, Resource, Retry, Step, Test, TestSpec};

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// How long the nemesis injects faults.
    pub faults_for: Duration,
    /// The longest a fault is held (each is held a random time up to this).
    pub max_hold: Duration,
    /// Agents (hosts), each in a network namespace of its own.
    pub agents: usize,
    /// Tests the workload keeps in flight.
    pub in_flight: usize,
    /// How long after the last fault every test must have ended.
    pub bound: Duration,
    /// The agents' `--lease-duration` and the control plane's
    /// `--lease-grace`; None: their defaults (10 s and 5 s), as users run.
    pub lease: Option<(String, String)>,
    /// Where the history, the report and (after a violation) the logs go.
    pub out: PathBuf,
}

/// What one fault cost.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub what: String,
    /// Its kind, for the summary ("kill -9 agent", "partition etcd inbound").
    pub kind: String,
    pub held: Duration,
    /// From the repair until every host was Ready, every replica and etcd
    /// member answered and a new test ran; None if that took longer than
    /// [`RECOVERY_LIMIT`].
    pub recovery: Option<Duration>,
}

/// How long the cluster has to recover from one fault before the run
/// says it is stuck.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

/// A run's outcome.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub faults: Vec<FaultRecord>,
    /// Tests created (acknowledged), by final phase ("" for none).
    pub phases: BTreeMap<String, usize>,
    /// Tests the workload deleted.
    pub deleted: usize,
    /// Tests that took more than one attempt.
    pub retried: usize,
    /// Processes that recorded a start.
    pub processes: usize,
    pub events: usize,
    /// How long the run took, setup included.
    pub took: Duration,
    /// Why the run could not be judged, if it could not.
    pub broken: Option<String>,
}

impl Report {
    /// Whether the run found nothing wrong.
    pub fn clean(&self) -> bool {
        self.violations.is_empty() && self.broken.is_none() && self.faults.iter().all(|f| f.recovery.is_some())
    }

    /// The report as Markdown: counts, recovery per kind of fault, and the
    /// first violations with how to replay them.
    pub fn markdown(&self, opts: &Options) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos run, seed {}: {} s of faults (each held up to {} s) over {} agents (lease {}), 3 control-plane replicas, 3 etcd members; took {} s\n",
            self.seed,
            opts.faults_for.as_secs(),
            opts.max_hold.as_secs(),
            opts.agents,
            opts.lease.as_ref().map_or("10s + 5s grace, the defaults".to_string(), |(l, g)| format!("{l} + {g} grace")),
            self.took.as_secs()
        );
        let created: usize = self.phases.values().sum();
        let phases: Vec<String> = self.phases.iter().map(|(p, n)| format!("{n} {}", or_none(p))).collect();
        let _ = writeln!(
            s,
            "- tests: {created} created ({}), {} deleted by the workload, {} retried on other hosts",
            phases.join(", "),
            self.deleted,
            self.retried
        );
        let _ = writeln!(s, "- processes: {} started; history: {} events", self.processes, self.events);
        let _ = writeln!(s, "\n| fault | count | held, median | recovery, median | recovery, max |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        let mut kinds: BTreeMap<&str, Vec<&FaultRecord>> = BTreeMap::new();
        for f in &self.faults {
            kinds.entry(&f.kind).or_default().push(f);
        }
        for (kind, fs) in kinds {
            let held = median(fs.iter().map(|f| f.held).collect());
            let rec: Vec<Duration> = fs.iter().filter_map(|f| f.recovery).collect();
            let stuck = fs.len() - rec.len();
            let max = rec.iter().max().copied().unwrap_or_default();
            let _ = writeln!(
                s,
                "| {kind} | {} | {:.1} s | {:.1} s | {:.1} s{} |",
                fs.len(),
                held.as_secs_f64(),
                median(rec).as_secs_f64(),
                max.as_secs_f64(),
                if stuck > 0 { format!(" ({stuck} never recovered)") } else { String::new() }
            );
        }
        if let Some(b) = &self.broken {
            let _ = writeln!(s, "\n**The run broke:** {b}");
        }
        if self.violations.is_empty() {
            let _ = writeln!(s, "\nNo violation.");
        } else {
            let _ = writeln!(s, "\n**{} violations**, the first:", self.violations.len());
            for v in self.violations.iter().take(10) {
                let _ = writeln!(s, "- {v}");
            }
        }
        if !self.clean() {
            let _ = writeln!(
                s,
                "\nReplay: `hack/chaos --seed {} --seconds {} --max-hold {} --agents {} --in-flight {}{}` (history and logs in {})",
                self.seed,
                opts.faults_for.as_secs(),
                opts.max_hold.as_secs(),
                opts.agents,
                opts.in_flight,
                opts.lease.as_ref().map_or(String::new(), |(l, g)| format!(" --lease {l},{g}")),
                opts.out.display()
            );
        }
        s
    }
}

fn or_none(p: &str) -> &str {
    if p.is_empty() {
        "never ended"
    } else {
        p
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Milliseconds on the machine's clock (the processes' `date +%s%3N`).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The history so far, shared by the workload and the nemesis.
type History = Arc<Mutex<Vec<Event>>>;

/// Calls through every replica's own socket: each call goes to the first
/// replica that answers within [`CALL_LIMIT`], starting after the one that
/// answered last (a paused or cut-off replica costs one timeout).
struct Replicas {
    clients: Vec<Client>,
    next: Mutex<usize>,
}

const CALL_LIMIT: Duration = Duration::from_secs(4);

impl Replicas {
    async fn list<K: testbus_client::ApiResource>(&self) -> Option<Vec<K>> {
        for _ in 0..self.clients.len() {
            let c = self.pick();
            if let Ok(Ok((items, _))) = tokio::time::timeout(CALL_LIMIT, c.api::<K>().list("", "")).await {
                return Some(items);
            }
            self.skip();
        }
        None
    }

    async fn get_test(&self, name: &str) -> Option<Test> {
        for _ in 0..self.clients.len() {
            let c = self.pick();
            if let Ok(Ok(t)) = tokio::time::timeout(CALL_LIMIT, c.api::<Test>().get(name)).await {
                return Some(t);
            }
            self.skip();
        }
        None
    }

    /// One attempt on one replica: a create that timed out may have landed,
    /// so it is never repeated under the same name.
    async fn create(&self, t: Test) -> bool {
        let c = self.pick();
        let ok = matches!(tokio::time::timeout(CALL_LIMIT, c.api::<Test>().create(t)).await, Ok(Ok(_)));
        if !ok {
            self.skip();
        }
        ok
    }

    async fn delete(&self, name: &str) {
        let c = self.pick();
        if !matches!(tokio::time::timeout(CALL_LIMIT, c.api::<Test>().delete(name)).await, Ok(Ok(_))) {
            self.skip();
        }
    }

    fn pick(&self) -> Client {
        let i = *self.next.lock();
        self.clients[i % self.clients.len()].clone()
    }

    fn skip(&self) {
        *self.next.lock() += 1;
    }
}

/// A control-plane replica: 0 is the cluster's own (namespace `cp`), the
/// others run in namespaces of their own.
struct Replica {
    node: String,
    /// Its arguments (replicas other than 0).
    args: Vec<String>,
    pid: Option<u32>,
}

impl Replica {
    /// Starts this replica (one other than 0) in its namespace.
    fn start(&mut self, c: &mut Cluster) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let node = &self.node;
        self.pid = Some(c.spawn_logged(Some(node), &format!("replica-{node}"), "testbus-control-plane", &args));
    }
}

/// What a fault is done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Agent(usize),
    Replica(usize),
    Etcd(usize),
}

/// What is done to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// kill -9, restarted at the repair.
    Kill,
    /// SIGSTOP, SIGCONT at the repair.
    Pause,
    /// A partition, healed at the repair.
    Cut(Cut),
}

#[derive(Debug, Clone, Copy)]
struct Fault {
    target: Target,
    action: Action,
    hold: Duration,
}

impl Fault {
    fn kind(&self) -> String {
        let class = match self.target {
            Target::Agent(_) => "agent",
            Target::Replica(_) => "replica",
            Target::Etcd(_) => "etcd member",
        };
        match self.action {
            Action::Kill => format!("kill -9 {class}"),
            Action::Pause => format!("SIGSTOP {class}"),
            Action::Cut(Cut::Both) => format!("partition (both ways) {class}"),
            Action::Cut(Cut::Inbound) => format!("partition (inbound) {class}"),
            Action::Cut(Cut::Outbound) => format!("partition (outbound) {class}"),
            Action::Cut(Cut::None) => format!("heal {class}"),
        }
    }
}

/// The nemesis's side: the cluster and what it needs to restart things.
struct Nemesis {
    c: Cluster,
    replicas: Vec<Replica>,
    rng: StdRng,
}

impl Nemesis {
    fn node(&self, t: Target) -> String {
        match t {
            Target::Agent(i) => self.c.hosts[i].clone(),
            Target::Replica(r) => self.replicas[r].node.clone(),
            Target::Etcd(m) => format!("etcd{m}"),
        }
    }

    fn pid(&self, t: Target) -> Option<u32> {
        match t {
            Target::Agent(i) => Some(self.c.agent_pid(i)),
            Target::Replica(0) => Some(self.c.control_plane_pid()),
            Target::Replica(r) => self.replicas[r].pid,
            Target::Etcd(m) => self.c.etcd.as_ref().and_then(|e| e.member_pid(m)),
        }
    }

    fn signal(&self, t: Target, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid(t) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    async fn inject(&mut self, f: &Fault) {
        use nix::sys::signal::Signal;
        match f.action {
            Action::Kill => match f.target {
                Target::Agent(i) => self.c.kill_agent(i),
                Target::Replica(0) => self.c.kill_control_plane(),
                Target::Replica(r) => {
                    if let Some(pid) = self.replicas[r].pid.take() {
                        self.c.kill_extra(pid);
                    }
                }
                Target::Etcd(m) => self.c.etcd.as_mut().expect("etcd").kill_member(m),
            },
            Action::Pause => self.signal(f.target, Signal::SIGSTOP),
            Action::Cut(cut) => self.c.partition(&self.node(f.target), cut),
        }
    }

    async fn repair(&mut self, f: &Fault) {
        use nix::sys::signal::Signal;
        match f.action {
            Action::Kill => match f.target {
                Target::Agent(i) => self.c.start_agent(i),
                // Not waited for: the recovery time counts its start.
                Target::Replica(0) => self.c.spawn_control_plane(),
                Target::Replica(r) => self.start_replica(r),
                Target::Etcd(m) => {
                    let e = self.c.etcd.as_mut().expect("etcd");
                    e.start_member(m, "existing");
                }
            },
            Action::Pause => self.signal(f.target, Signal::SIGCONT),
            Action::Cut(_) => self.c.partition(&self.node(f.target), Cut::None),
        }
    }

    fn start_replica(&mut self, r: usize) {
        self.replicas[r].start(&mut self.c);
    }

    /// The next faults, one of each kind on random targets, in a random
    /// order: a short run still sees every kind.
    fn round(&mut self, max_hold: Duration) -> Vec<Fault> {
        let agents = self.c.hosts.len();
        let replicas = self.replicas.len();
        let members = self.c.etcd.as_ref().map_or(0, |e| e.len());
        let mut out = Vec::new();
        for class in 0..3 {
            for action in [
                Action::Kill,
                Action::Pause,
                Action::Cut(Cut::Both),
                Action::Cut(Cut::Inbound),
                Action::Cut(Cut::Outbound),
            ] {
                let target = match class {
                    0 => Target::Agent(self.rng.random_range(0..agents)),
                    1 => Target::Replica(self.rng.random_range(0..replicas)),
                    _ => Target::Etcd(self.rng.random_range(0..members)),
                };
                let ms = self.rng.random_range(500..=max_hold.as_millis().max(501) as u64);
                out.push(Fault { target, action, hold: Duration::from_millis(ms) });
            }
        }
        out.shuffle(&mut self.rng);
        out
    }
}

/// The processes' record of themselves: `DIR/UID` gets `start MS TEST HOST
/// NAME` when the process starts, `alive MS` every half second while its
/// cgroup lives (a heartbeat in the background, killed with it), and `end
/// MS` when it ends, by itself or on SIGTERM (the agent's stop). One killed
/// with SIGKILL has no end: it counts as running until its last heartbeat.
/// Appends of one short line are single writes, so nothing a fault does to
/// the agent tears a record; the trap comes first, so no stop goes
/// unrecorded once the start is.
fn script(dir: &Path, sleep: &str, barrier: Option<(&str, &[String])>, code: u8) -> String {
    let mut s = format!(
        "f={}/$TESTBUS_PROCESS_UID\n\
         trap 'echo \"end $(date +%s%3N)\" >> $f; kill $hb $sp 2>/dev/null; exit 143' TERM INT\n\
         echo \"start $(date +%s%3N) $TESTBUS_TEST $TESTBUS_HOST $TESTBUS_PROCESS\" >> $f\n\
         while :; do sleep 0.5; echo \"alive $(date +%s%3N)\" >> $f; done &\n\
         hb=$!\n",
        dir.display()
    );
    if let Some((name, roles)) = barrier {
        let roles: Vec<String> = roles.iter().map(|r| format!("--role {r}")).collect();
        // A barrier that fails (a member died, its host was lost) ends the
        // process as a failure, as a real test would.
        let _ = writeln!(
            s,
            "testbusctl sync {name} {} --timeout 30s & wait $! || {{ echo \"end $(date +%s%3N)\" >> $f; kill $hb; exit 1; }}",
            roles.join(" ")
        );
    }
    let _ = writeln!(s, "sleep {sleep} & sp=$!; wait $sp");
    let _ = writeln!(s, "echo \"end $(date +%s%3N)\" >> $f");
    let _ = writeln!(s, "kill $hb");
    if code != 0 {
        let _ = writeln!(s, "exit {code}");
    }
    s
}

/// A random multi-role test: one to three roles of one or two hosts each,
/// one to three steps on some of them (chained or side by side), some with
/// a barrier, some failing, some retried on infrastructure failures.
fn random_test(rng: &mut StdRng, name: &str, dir: &Path) -> Test {
    // Every test can run on the smallest cluster `hack/chaos` takes (6
    // agents); one that waits too long for hosts ends (PendingTimeout).
    let roles: Vec<(String, u32)> =
        (0..rng.random_range(1..=3)).map(|i| (format!("r{i}"), rng.random_range(1..=2))).collect();
    let mut steps: Vec<Step> = Vec::new();
    for k in 0..rng.random_range(1..=3) {
        let mut on: Vec<String> = roles.iter().filter(|_| rng.random_bool(0.6)).map(|r| r.0.clone()).collect();
        if on.is_empty() {
            on.push(roles.choose(rng).expect("a role").0.clone());
        }
        let sleep = ["0.1", "0.5", "1", "2", "4", "8"].choose(rng).copied().unwrap_or("1");
        let barrier_name = format!("b{k}");
        let barrier = rng.random_bool(0.3).then_some((barrier_name.as_str(), on.as_slice()));
        let code = if rng.random_bool(0.08) { 1 } else { 0 };
        let after = match steps.last() {
            Some(prev) if rng.random_bool(0.6) => vec![prev.name.clone()],
            _ => vec![],
        };
        steps.push(Step {
            name: format!("s{k}"),
            script: script(dir, sleep, barrier, code),
            on: on.clone(),
            after,
            timeout: "60s".into(),
            retry: rng.random_bool(0.5).then_some(Retry { infrastructure: Some(2) }),
            ..Default::default()
        });
    }
    Test {
        metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
        spec: Some(TestSpec {
            hosts: roles
                .iter()
                .map(|(role, count)| HostRequirement {
                    role: role.clone(),
                    count: Some(*count),
                    capabilities: vec!["linux".into()],
                    ..Default::default()
                })
                .collect(),
            steps,
            timeout: "150s".into(),
            pending_timeout: "60s".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A one-host test that must run once the cluster has recovered.
fn probe(name: &str, dir: &Path) -> Test {
    Test {
        metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
        spec: Some(TestSpec {
            hosts: vec![HostRequirement { role: "p".into(), capabilities: vec!["linux".into()], ..Default::default() }],
            steps: vec![Step {
                name: "probe".into(),
                on: vec!["p".into()],
                script: script(dir, "0", None, 0),
                timeout: "60s".into(),
                ..Default::default()
            }],
            priority: 100,
            timeout: "100s".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a final test says it ended with: its phase, reason and message,
/// its attempts and end time, each step's phase and each process's (with
/// its exit code, signal and message), and its recorded results.
fn results(t: &Test) -> Vec<(String, String, String)> {
    let st = t.status();
    let mut out = vec![
        ("phase".to_string(), st.phase.clone(), st.reason.clone()),
        ("message".to_string(), st.message.clone(), st.completion_time.clone()),
        ("attempts".to_string(), st.attempts.len().to_string(), String::new()),
    ];
    for step in &st.steps {
        out.push((format!("step.{}", step.name), step.phase.clone(), String::new()));
        for p in &step.processes {
            let code = p.exit_code.map(|c| c.to_string()).unwrap_or_default();
            out.push((format!("process.{}", p.name), p.phase.clone(), format!("{code} {} {}", p.signal, p.message)));
        }
    }
    for r in &st.results {
        out.push((format!("result.{}", r.path), r.outcome.clone(), r.message.clone()));
    }
    out
}

fn is_final(t: &Test) -> bool {
    t.status().phase.parse::<TestPhase>().is_ok_and(TestPhase::is_terminal)
}

/// The workload's view: what it created, saw end and deleted.
#[derive(Default)]
struct Seen {
    acked: Vec<String>,
    /// The tests of the last listing.
    present: HashSet<String>,
    /// Each ended test's results, as last recorded.
    ended: HashMap<String, Vec<(String, String, String)>>,
    deleted: HashSet<String>,
    retried: HashSet<String>,
    phases: HashMap<String, String>,
}

impl Seen {
    /// Tests created and not ended: a deleted one counts until it is gone.
    fn in_flight(&self) -> usize {
        self.acked
            .iter()
            .filter(|t| !self.ended.contains_key(*t) && (!self.deleted.contains(*t) || self.present.contains(*t)))
            .count()
    }

    /// Records what a listing shows: tests seen final for the first time,
    /// and results that read differently from what was recorded (a test
    /// seen final is compared whatever its phase now; a path gone reads
    /// `<absent>`). With `always`, every ended test's results are recorded
    /// again (the final read).
    fn observe(&mut self, tests: &[Test], hist: &History, always: bool) {
        let at = now_ms();
        let mut h = hist.lock();
        self.present = tests.iter().map(|t| t.name().to_string()).collect();
        for t in tests {
            let name = t.name().to_string();
            if !t.status().attempts.is_empty() {
                self.retried.insert(name.clone());
            }
            let known = self.ended.get(&name);
            if known.is_none() && !is_final(t) {
                continue;
            }
            let now = results(t);
            if known.is_some() && !always && known == Some(&now) {
                continue;
            }
            let mut read = now.clone();
            match known {
                None => {
                    h.push(Event::TestEnded { test: name.clone(), at });
                    self.phases.insert(name.clone(), t.status().phase.clone());
                }
                Some(before) => {
                    for (path, ..) in before {
                        if !now.iter().any(|(p, ..)| p == path) {
                            read.push((path.clone(), "<absent>".into(), String::new()));
                        }
                    }
                }
            }
            for (path, outcome, message) in read {
                h.push(Event::ResultRead { test: name.clone(), path, outcome, message, at });
            }
            self.ended.insert(name, now);
        }
    }
}

/// Creates tests to keep `in_flight` of them going, cancels or deletes a
/// few, and records what it sees, until `creating` goes false and every
/// test it made has ended or `until` (set once the faults stop) passes.
async fn workload(
    api: Arc<Replicas>,
    hist: History,
    seen: Arc<Mutex<Seen>>,
    seed: u64,
    dir: PathBuf,
    in_flight: usize,
    creating: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6465_6c65_7465);
    let mut n = 0usize;
    loop {
        if let Some(tests) = api.list::<Test>().await {
            seen.lock().observe(&tests, &hist, false);
        }
        let creating_now = creating.load(Ordering::SeqCst);
        if !creating_now && seen.lock().in_flight() == 0 {
            return;
        }
        if creating_now && seen.lock().in_flight() < in_flight {
            let name = format!("w{n}");
            // Each test from the seed and its number alone: a replay makes
            // the same tests whatever the timing.
            let mut own = StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            n += 1;
            let t = random_test(&mut own, &name, &dir);
            if api.create(t).await {
                hist.lock().push(Event::CreateAcked { test: name.clone(), at: now_ms() });
                seen.lock().acked.push(name);
            }
        }
        // Now and then a running test is cancelled by deleting it, or an
        // ended one deleted; the delete is recorded before it is asked for,
        // so that a delete whose answer was lost still explains an absence.
        if creating_now && rng.random_bool(0.02) {
            let victim = {
                let s = seen.lock();
                let running: Vec<&String> = s.acked.iter().filter(|t| !s.deleted.contains(*t)).collect();
                running.choose(&mut rng).map(|t| t.to_string())
            };
            if let Some(t) = victim {
                hist.lock().push(Event::Deleted { test: t.clone(), at: now_ms() });
                seen.lock().deleted.insert(t.clone());
                api.delete(&t).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the cluster is whole again: every etcd member healthy, every
/// replica answering, every agent's host Ready; if not, what is missing.
async fn whole(n: &Nemesis, api: &Replicas) -> Result<(), String> {
    let members = n.c.etcd.as_ref().map_or(0, |e| e.len());
    let sick: Vec<usize> = tokio::task::block_in_place(|| {
        (0..members).filter(|&i| !n.c.etcd.as_ref().is_some_and(|e| e.healthy(i))).collect()
    });
    if !sick.is_empty() {
        return Err(format!("etcd members {sick:?} not healthy"));
    }
    for (i, c) in api.clients.iter().enumerate() {
        if !matches!(tokio::time::timeout(CALL_LIMIT, c.api::<Host>().list("", "")).await, Ok(Ok(_))) {
            return Err(format!("replica {} does not answer", n.replicas[i].node));
        }
    }
    let hosts = api.list::<Host>().await.ok_or("no replica lists hosts")?;
    let not_ready: Vec<String> = hosts
        .iter()
        .filter(|h| h.status().phase != HostPhase::Ready)
        .map(|h| format!("{} ({})", h.name(), h.status().phase))
        .collect();
    if hosts.len() < n.c.hosts.len() || !not_ready.is_empty() {
        return Err(format!("{} hosts, not Ready: {}", hosts.len(), not_ready.join(", ")));
    }
    Ok(())
}

/// From now until the cluster is whole and a probe test has run; what was
/// still wrong after [`RECOVERY_LIMIT`].
async fn recover(n: &Nemesis, api: &Replicas, hist: &History, dir: &Path, k: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + RECOVERY_LIMIT;
    while let Err(why) = whole(n, api).await {
        if Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let name = format!("probe{k}");
    loop {
        if api.create(probe(&name, dir)).await {
            hist.lock().push(Event::CreateAcked { test: name.clone(), at: now_ms() });
            break;
        }
        // A create that timed out may have landed: the next try's
        // AlreadyExists is then a success.
        if api.get_test(&name).await.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("the probe test {name} could not be created"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let t = api.get_test(&name).await;
        if let Some(t) = &t {
            if is_final(t) {
                return match t.status().phase == TestPhase::Succeeded {
                    true => Ok(start.elapsed()),
                    false => Err(format!("the probe test {name} ended {}: {}", t.status().phase, t.status().message)),
                };
            }
        }
        if Instant::now() >= deadline {
            let st = t.map(|t| format!("{} {}: {}", t.status().phase, t.status().reason, t.status().message));
            return Err(format!("the probe test {name} did not end: {}", st.unwrap_or_else(|| "unreadable".into())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (with the recovery limit) for the freshly started cluster to be
/// whole; why not, if it never is.
async fn ready(n: &Nemesis, api: &Replicas) -> Option<String> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        match whole(n, api).await {
            Ok(()) => return None,
            Err(why) if Instant::now() >= deadline => return Some(format!("the cluster never came up whole: {why}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Starts the cluster: `agents` agents, replica 0 and two more in
/// namespaces `cp1` and `cp2`, on three etcd members; agents given all
/// three replicas.
async fn start(agents: usize, lease: Option<&(String, String)>) -> (Cluster, Vec<Replica>) {
    let (lease, grace) = lease.cloned().unwrap_or(("10s".into(), "5s".into()));
    let mut c =
        Cluster::start_on_etcd_with(agents, 3, &["--infrastructure-retries", "1", "--lease-grace", &grace]).await;
    c.agent_args = vec!["--lease-duration".into(), lease];
    let url = c.etcd.as_ref().expect("etcd").url("/testbus");
    let mut replicas = vec![Replica { node: "cp".into(), args: vec![], pid: None }];
    let mut servers = vec![c.agent_server.clone()];
    for r in 1..3u8 {
        let node = format!("cp{r}");
        let (_, addr) = c.add_node(&node, 210 + r);
        let data = c.dir.path().join(&node);
        // The replicas share replica 0's CA: its key is copied, never
        // stored in etcd.
        std::fs::create_dir_all(data.join("pki")).unwrap();
        for f in ["ca.crt", "ca.key"] {
            std::fs::copy(c.dir.path().join("cp/pki").join(f), data.join("pki").join(f)).unwrap();
        }
        let listen = format!("{addr}:7780");
        let args = [
            "--listen",
            &listen,
            "--data-dir",
            &data.display().to_string(),
            "--store",
            &url,
            "--lease-grace",
            &grace,
            "--infrastructure-retries",
            "1",
        ]
        .map(String::from)
        .to_vec();
        servers.push(format!("https://{listen}"));
        replicas.push(Replica { node, args, pid: None });
    }
    let mut c = c;
    for r in replicas.iter_mut().skip(1) {
        r.start(&mut c);
    }
    c.agent_server = servers.join(",");
    for i in 0..agents {
        c.kill_agent(i);
        c.start_agent(i);
    }
    (c, replicas)
}

fn sockets(c: &Cluster, replicas: &[Replica]) -> Vec<String> {
    replicas.iter().map(|r| format!("unix:{}", c.dir.path().join(&r.node).join("api.sock").display())).collect()
}

/// The processes' own records, as history events; how many started.
fn read_records(dir: &Path) -> (Vec<Event>, usize) {
    let mut out = Vec::new();
    let mut started = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let process = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f[..] {
                ["start", at, test, host, name] => {
                    let Ok(at) = at.parse() else { continue };
                    started += 1;
                    out.push(Event::Started {
                        process: process.clone(),
                        name: name.into(),
                        test: test.into(),
                        host: host.into(),
                        at,
                    })
                }
                ["alive", at] => {
                    if let Ok(at) = at.parse() {
                        out.push(Event::Alive { process: process.clone(), at });
                    }
                }
                ["end", at] => {
                    if let Ok(at) = at.parse() {
                        out.push(Event::Ended { process: process.clone(), at });
                    }
                }
                _ => {}
            }
        }
    }
    (out, started)
}

fn line(e: &Event) -> String {
    match e {
        Event::CreateAcked { test, at } => format!("{at} create-acked {test}"),
        Event::Deleted { test, at } => format!("{at} deleted {test}"),
        Event::Started { process, name, test, host, at } => {
            format!("{at} started {process} test={test} host={host} process={name}")
        }
        Event::Alive { process, at } => format!("{at} alive {process}"),
        Event::Ended { process, at } => format!("{at} ended {process}"),
        Event::ResultRead { test, path, outcome, message, at } => {
            format!("{at} result {test} {path}={outcome} {message:?}")
        }
        Event::TestEnded { test, at } => format!("{at} test-ended {test}"),
        Event::Fault { what, at } => format!("{at} fault {what}"),
    }
}

/// One run: start the cluster, run the workload and the nemesis for
/// `faults_for`, let the tests end, check the history. Writes
/// `history.log` and `report.md` to `opts.out`, and the cluster's logs to
/// `opts.out/logs` when the run is not clean.
pub async fn run(opts: &Options) -> Report {
    let began = Instant::now();
    std::fs::create_dir_all(&opts.out).expect("the chaos output dir");
    let (c, replicas) = start(opts.agents, opts.lease.as_ref()).await;
    let records = c.dir.path().join("records");
    std::fs::create_dir_all(&records).unwrap();
    let api = Arc::new(Replicas {
        clients: sockets(&c, &replicas).iter().map(|s| Client::lazy(s).expect("a socket address")).collect(),
        next: Mutex::new(0),
    });
    let mut nemesis = Nemesis { c, replicas, rng: StdRng::seed_from_u64(opts.seed ^ 0x6e65_6d65_7369_7321) };
    let mut report = Report { seed: opts.seed, ..Default::default() };
    let hist: History = Arc::default();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    if let Some(d) = ready(&nemesis, &api).await {
        report.broken = Some(d);
    }
    let creating = Arc::new(AtomicBool::new(true));
    let mut work = tokio::spawn(workload(
        api.clone(),
        hist.clone(),
        seen.clone(),
        opts.seed,
        records.clone(),
        opts.in_flight,
        creating.clone(),
    ));

    // The nemesis: one fault at a time, each held, repaired, and the
    // recovery timed before a short gap and the next.
    let until = Instant::now() + opts.faults_for;
    let mut queue = Vec::new();
    let mut k = 0;
    while report.broken.is_none() && Instant::now() < until {
        if queue.is_empty() {
            queue = nemesis.round(opts.max_hold);
        }
        let f = queue.remove(0);
        let what = format!("{} {}", f.kind(), nemesis.node(f.target));
        progress(&format!("fault {k}: {what} for {:.1} s", f.hold.as_secs_f64()));
        hist.lock().push(Event::Fault { what: format!("inject: {what}"), at: now_ms() });
        nemesis.inject(&f).await;
        tokio::time::sleep(f.hold).await;
        nemesis.repair(&f).await;
        hist.lock().push(Event::Fault { what: format!("repair: {what}"), at: now_ms() });
        let recovery = match recover(&nemesis, &api, &hist, &records, k).await {
            Ok(d) => {
                progress(&format!("  recovered in {:.1} s", d.as_secs_f64()));
                Some(d)
            }
            Err(why) => {
                progress(&format!("  not recovered: {why}"));
                report.broken = Some(format!("the cluster did not recover within {RECOVERY_LIMIT:?} of {what}: {why}"));
                None
            }
        };
        report.faults.push(FaultRecord { what, kind: f.kind(), held: f.hold, recovery });
        k += 1;
        let gap = nemesis.rng.random_range(200..2000);
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }

    // Quiet: no new tests; every test has `bound` to end.
    creating.store(false, Ordering::SeqCst);
    match tokio::time::timeout(opts.bound, &mut work).await {
        Ok(Err(e)) if e.is_panic() => report.broken = Some(format!("the workload panicked: {e}")),
        Err(_) => work.abort(),
        _ => {}
    }
    // The final read, from a whole cluster: every result read again.
    let mut state = FinalState::default();
    let mut read = true;
    let mut final_tests = Vec::new();
    match api.list::<Test>().await {
        Some(tests) => {
            final_tests = tests.clone();
            seen.lock().observe(&tests, &hist, true);
            state = FinalState {
                tests: tests.iter().map(|t| t.name().to_string()).collect(),
                attempts: tests.iter().map(|t| (t.name().to_string(), t.status().attempts.len() + 1)).collect(),
                at: now_ms(),
            };
        }
        None => {
            read = false;
            report.broken = Some("no replica answered the final read".into());
        }
    }
    let (records, started) = read_records(&records);
    let mut events = hist.lock().clone();
    events.extend(records);
    events.sort_by_key(Event::at);
    // Checked even when the run broke; without a final read, what it
    // would judge (losses, tests that never ended) is left out.
    report.violations = history::check(&events, &state, opts.bound.as_millis() as u64);
    if !read {
        report.violations.retain(|v| !matches!(v, Violation::CreateLost { .. } | Violation::NeverEnded { .. }));
    }
    // What a test that never ended was waiting for is in its stored state:
    // kept for the replay, since no log says it.
    let unended: Vec<&str> = report
        .violations
        .iter()
        .filter_map(|v| match v {
            Violation::NeverEnded { test, .. } => Some(test.as_str()),
            _ => None,
        })
        .collect();
    if !unended.is_empty() {
        let procs = api.list::<testbus_proto::Process>().await.unwrap_or_default();
        let hosts = api.list::<Host>().await.unwrap_or_default();
        let _ = std::fs::write(opts.out.join("unended.txt"), unended_state(&unended, &final_tests, &procs, &hosts));
    }
    {
        let s = seen.lock();
        for t in &s.acked {
            let phase =
                if s.deleted.contains(t) { "deleted".into() } else { s.phases.get(t).cloned().unwrap_or_default() };
            *report.phases.entry(phase).or_default() += 1;
        }
        report.deleted = s.deleted.len();
        report.retried = s.retried.len();
    }
    report.processes = started;
    report.events = events.len();
    report.took = began.elapsed();
    let text: String = events.iter().map(|e| line(e) + "\n").collect();
    std::fs::write(opts.out.join("history.log"), text).expect("write the history");
    std::fs::write(opts.out.join("report.md"), report.markdown(opts)).expect("write the report");
    if !report.clean() {
        let logs = opts.out.join("logs");
        let _ = std::fs::create_dir_all(&logs);
        let etcd = nemesis.c.etcd.as_ref().map(|e| e.log_dir().to_path_buf());
        let dirs = std::iter::once(nemesis.c.dir.path().to_path_buf()).chain(etcd);
        for e in dirs.flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten()) {
            if e.file_name().to_string_lossy().ends_with(".log") {
                let _ = std::fs::copy(e.path(), logs.join(e.file_name()));
            }
        }
        // Each agent's keepers log in their own dirs (DATA_DIR/keepers/ID).
        for host in std::fs::read_dir(nemesis.c.dir.path()).into_iter().flatten().flatten() {
            for k in std::fs::read_dir(host.path().join("keepers")).into_iter().flatten().flatten() {
                let name =
                    format!("{}.keeper-{}.log", host.file_name().to_string_lossy(), k.file_name().to_string_lossy());
                let _ = std::fs::copy(k.path().join("log"), logs.join(name));
            }
        }
    }
    report
}

/// The stored state of each test that never ended: the test, its
/// processes and the hosts it claims.
fn unended_state(names: &[&str], tests: &[Test], procs: &[testbus_proto::Process], hosts: &[Host]) -> String {
    let mut s = String::new();
    for name in names {
        let _ = writeln!(s, "===== test {name}");
        let Some(t) = tests.iter().find(|t| t.name() == *name) else {
            let _ = writeln!(s, "(not stored)");
            continue;
        };
        let _ = writeln!(s, "{t:#?}");
        for p in procs.iter().filter(|p| p.spec().test == *name) {
            let _ = writeln!(s, "----- process {}\n{p:#?}", p.name());
        }
        for h in hosts.iter().filter(|h| t.status().claims.values().any(|c| c == h.name())) {
            let _ = writeln!(s, "----- host {}\n{h:#?}", h.name());
        }
    }
    s
}

/// Progress on stderr, with the time.
fn progress(s: &str) {
    eprintln!("[chaos {}] {s}", now_ms());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_workload_and_one_order_of_faults() {
        let dir = Path::new("/r");
        let tests = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20).map(|i| random_test(&mut rng, &format!("w{i}"), dir)).collect::<Vec<_>>()
        };
        assert_eq!(tests(7), tests(7));
        assert_ne!(tests(7), tests(8));
        // Every test claims 1 to 6 hosts and runs each step on a role it has.
        for t in tests(9) {
            let hosts: u32 = t.spec().hosts.iter().map(|h| h.count.unwrap_or(1)).sum();
            assert!((1..=6).contains(&hosts), "{hosts}");
            for s in &t.spec().steps {
                assert!(!s.on.is_empty());
                assert!(s.on.iter().all(|r| t.spec().hosts.iter().any(|h| &h.role == r)));
            }
        }
    }

    /// Runs `script` under sh as an agent would (its env), in `dir`.
    fn run_script(dir: &Path, sleep: &str, code: u8) -> std::process::Child {
        std::process::Command::new("sh")
            .args(["-c", &script(dir, sleep, None, code)])
            .env("TESTBUS_PROCESS_UID", "uid-1")
            .env("TESTBUS_PROCESS", "t1-s0-r0")
            .env("TESTBUS_TEST", "t1")
            .env("TESTBUS_HOST", "host-0")
            .spawn()
            .unwrap()
    }

    #[test]
    fn the_script_records_start_heartbeats_and_end_even_when_stopped() {
        let d = tempfile::tempdir().unwrap();
        // Runs to its end, with its exit code.
        let st = run_script(d.path(), "0.7", 1).wait().unwrap();
        assert_eq!(st.code(), Some(1));
        let (events, started) = read_records(d.path());
        assert_eq!(started, 1);
        assert!(
            matches!(&events[..], [Event::Started { name, test, host, .. }, .., Event::Ended { .. }]
                if name == "t1-s0-r0" && test == "t1" && host == "host-0"),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, Event::Alive { .. })), "a heartbeat in 0.7 s: {events:?}");
        std::fs::remove_file(d.path().join("uid-1")).unwrap();

        // Stopped by SIGTERM (an agent's stop) while it sleeps: it records
        // its end, and exits 143.
        let mut child = run_script(d.path(), "30", 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(d.path().join("uid-1")).unwrap_or_default().contains("alive") {
            assert!(Instant::now() < deadline, "no heartbeat within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(143));
        let (events, _) = read_records(d.path());
        assert!(matches!(events.last(), Some(Event::Ended { .. })), "{events:?}");
    }

    #[test]
    fn records_are_read_as_events_and_torn_lines_skipped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("uid-1"), "start 10 t1 host-0 p\nalive 1x\nalive 15\nend 20\nstart 30 t1\nend\n")
            .unwrap();
        let (events, started) = read_records(d.path());
        assert_eq!(started, 1);
        assert_eq!(
            events,
            vec![
                Event::Started {
                    process: "uid-1".into(),
                    name: "p".into(),
                    test: "t1".into(),
                    host: "host-0".into(),
                    at: 10
                },
                Event::Alive { process: "uid-1".into(), at: 15 },
                Event::Ended { process: "uid-1".into(), at: 20 }
            ]
        );
    }
}
