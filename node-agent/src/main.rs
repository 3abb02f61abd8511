//! testbus-agent: the daemon on every test host.
//!
//! Ownership: `main` owns the registration/lease task and the [`Agent`]
//! dispatcher. The dispatcher is the only owner of the runner table; each
//! runner task owns its child process and reports its own status. The
//! journal is written before any spawn.
// Unsafe only where a child joins its cgroup between fork and exec.
#![deny(unsafe_code)]

/// mimalloc rather than glibc's malloc: a process's short life (decode
/// its object, build its env, spawn, report) is thousands of small
/// allocations, and glibc's spent a tenth of the agent's time on them
/// (`hack/bench throughput` profile, session 4). Built with `no_thp`:
/// otherwise mimalloc's eagerly committed arenas land in transparent huge
/// pages and double the idle resident size (agent 7.6 → 15.3 MB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cache;
mod config;
mod containment;
mod credentials;
mod facts;
mod journal;
mod keeper;
mod local;
mod metrics;
mod pidns;
mod runner;
mod testvars;

use anyhow::Context;
use clap::Parser;
use credentials::TakeOver;
use futures::StreamExt;
use runner::{Command, ProcessRunner, StopReason};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use testbus_client::{watcher_with, Api, Client, Reconnect, WatcherEvent};
use testbus_proto::states::{ProcessPhase, ProcessReason};
use testbus_proto::{phase, time, Host, HostSpec, HostStatus, ObjectMeta, Process, Resource};
use tokio::sync::mpsc;
use tonic::Code;

#[derive(Parser, Debug)]
#[command(name = "testbus-agent", version, about = "The testbus node agent")]
struct Args {
    /// How log lines are written on stderr: text, or json (one object per
    /// line: timestamp, level, target, message and the event's fields).
    #[arg(long, env = "TESTBUS_LOG_FORMAT", default_value = "text")]
    log_format: testbus_telemetry::LogFormat,
    /// Control-plane address: https://host:port, a comma-separated list,
    /// unix:/path (plain: the control plane's own socket) or unix+tls:/path
    /// (a relay's socket that leads to the control plane's TLS listener).
    #[arg(long, env = "TESTBUS_SERVER", default_value = testbus_client::DEFAULT_SERVER)]
    server: String,
    /// This host's name (a DNS label).
    #[arg(long)]
    name: String,
    /// A capability this host offers. Repeatable.
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// A published host variable, K=V. Repeatable.
    #[arg(long = "var")]
    vars: Vec<String>,
    /// A label of the Host object, K=V. Repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Agent config file (YAML: capabilities, vars, labels, env).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory whose capabilities.d/*.yaml drop-ins are read.
    #[arg(long, default_value = "/etc/testbus")]
    config_dir: PathBuf,
    /// Its journal, key, cached files and the processes' work dirs
    /// (0700). Default: /var/lib/testbus-agent/NAME as root, else
    /// ~/.local/share/testbus-agent/NAME.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Take this host name over from the agent that holds it now (whose
    /// lease is still current). Without it, a second agent with the same
    /// --name is refused, and the first keeps the host.
    #[arg(long)]
    take_over: bool,
    /// A join token (`testbus-control-plane token create`): the first
    /// start gets a certificate for --name with it, kept in the data dir
    /// and renewed; later starts need no token.
    #[arg(long, env = "TESTBUS_JOIN_TOKEN", conflicts_with = "join_token_file")]
    join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// How long a lease lasts; the agent renews it every third of that.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// What holds each process and all it starts: `cgroup` (a cgroup v2
    /// cgroup per process; nothing escapes it), `pid-namespace` (a PID
    /// namespace per process, for hosts without cgroup v2; nothing escapes
    /// it either; needs root), or `process-group` (its process group: a
    /// descendant that calls setsid escapes, but processes start by
    /// posix_spawn, about 0.5 ms cheaper each here). Default: the first of
    /// these the kernel and permissions allow.
    #[arg(long, value_enum)]
    containment: Option<ContainmentKind>,
    /// How this agent reaches the control plane (a Host fact): direct,
    /// serial, vsock, ssh, ... Default: what the testbus-relay behind a
    /// `unix:` server says (its socket's `.transport` file), else direct.
    #[arg(long)]
    transport: Option<String>,
    /// Serve this agent's Prometheus metrics at http://ADDR/metrics
    /// (processes running, spawn latency, output bytes, processes ended).
    /// Plain HTTP: bind it to loopback or a management network. Off by
    /// default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// What a stop of the agent (SIGTERM, SIGINT) does to the processes it
    /// runs: `keep` leaves them to its keeper, for the next start of the
    /// agent (a restart or an upgrade) to take over, and keeps the host's
    /// lease for it; `stop` ends them (Killed, AgentShutdown) and gives the
    /// lease up, so their tests end at once.
    #[arg(long, value_enum, default_value = "keep")]
    on_stop: OnStop,
    /// How long a keeper holds processes with no agent: past it, it ends
    /// them. Longer than a restart takes; the control plane declares the
    /// host lost after its lease and grace anyway.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    keeper_orphan_timeout: Duration,
    /// Most bytes of each output stream of a process its keeper spools
    /// while they are not uploaded (the agent is away): the newest are
    /// kept, and the server is told how many were lost.
    #[arg(long, default_value_t = 64 << 20)]
    spool_limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnStop {
    Keep,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ContainmentKind {
    Cgroup,
    PidNamespace,
    ProcessGroup,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    testbus_proto::duration::parse(s).map_err(|e| e.to_string())
}

/// Builds the Host this agent registers.
fn host_object(args: &Args) -> anyhow::Result<Host> {
    testbus_proto::validate::dns_label(&args.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let mut offer = config::Offer { vars: facts::default_vars(), ..Default::default() };
    if let Some(path) = &args.config {
        offer.add(config::parse_file(path)?);
    } else if args.config_dir.join("agent.yaml").exists() {
        offer.add(config::parse_file(&args.config_dir.join("agent.yaml"))?);
    }
    for c in config::drop_ins(&args.config_dir)? {
        offer.add(c);
    }
    offer.capabilities.extend(args.capabilities.iter().cloned());
    for v in &args.vars {
        let (k, v) = config::parse_kv("--var", v)?;
        offer.vars.insert(k, v);
    }
    for l in &args.labels {
        let (k, v) = config::parse_kv("--label", l)?;
        offer.labels.insert(k, v);
    }
    let host = Host {
        metadata: Some(ObjectMeta { name: args.name.clone(), labels: offer.labels, ..Default::default() }),
        spec: Some(HostSpec::default()),
        status: Some(HostStatus {
            capabilities: offer.capabilities.into_iter().collect(),
            vars: offer.vars,
            env: offer.env,
            facts: Some(facts::facts(&facts::transport(args.transport.as_deref(), &args.server))),
            lease_duration_seconds: args.lease_duration.as_secs().max(1) as u32,
            ..Default::default()
        }),
        ..Default::default()
    };
    use testbus_proto::validate::Validate;
    host.validate().map_err(|e| anyhow::anyhow!("invalid host configuration: {e}"))?;
    Ok(host)
}

/// Creates the Host or refreshes what the agent owns of it (labels,
/// capabilities, vars, env, facts, lease), keeping what others own (spec,
/// claim, phase).
/// Why keeping the lease is over for good.
#[derive(Debug)]
enum LeaseLost {
    /// Another agent holds the host name (and this one may not take it).
    HeldByAnother(String),
    /// Another agent took the host over.
    TakenOver(String),
}

/// Whether the host's current lease is still running.
fn lease_current(h: &Host) -> bool {
    testbus_proto::states::lease_live(h.status(), std::time::SystemTime::now())
}

/// Registers this agent's Host, or takes the name over from an agent whose
/// lease ran out (or from any, with `take_over`). A name is held by one
/// agent at a time: another agent's current lease refuses this one.
async fn register(api: &Api<Host>, mine: &Host, take_over: TakeOver) -> Result<Result<(), LeaseLost>, tonic::Status> {
    let me = mine.status().agent_id.clone();
    match api.get_opt(mine.name()).await? {
        None => {
            let mut h = mine.clone();
            h.status_mut().lease_renew_time = time::now();
            match api.create(h).await {
                Err(s) if s.code() == Code::AlreadyExists => Err(tonic::Status::aborted("raced; retry")),
                r => r.map(|_| Ok(())),
            }
        }
        Some(mut h) => {
            // Labels under testbus.io/ are the controllers' (a pool's): kept
            // as they are, the rest is this agent's.
            let reserved = |l: &(&String, &String)| l.0.starts_with("testbus.io/");
            let mut labels: std::collections::BTreeMap<_, _> =
                h.meta().labels.iter().filter(reserved).map(|(k, v)| (k.clone(), v.clone())).collect();
            labels.extend(mine.meta().labels.iter().filter(|l| !reserved(l)).map(|(k, v)| (k.clone(), v.clone())));
            if h.meta().labels != labels {
                h.meta_mut().labels = labels;
                api.update(h).await?;
            }
            let m = mine.status().clone();
            // Decided on the Host as written: a race with another agent
            // registering is seen again by the write's compare-and-swap.
            let mut refused = None;
            let written = api
                .patch_status(mine.name(), |h| {
                    let holder = h.status().agent_id.clone();
                    if !holder.is_empty() && holder != me && lease_current(h) {
                        if take_over == TakeOver::No {
                            let ago = time::since(&h.status().lease_renew_time);
                            refused = Some(format!(
                                "host {} is held by another agent (agent {holder}, lease renewed {}s ago); \
                                 stop that agent, or start this one with --take-over",
                                h.name(),
                                ago.as_secs()
                            ));
                            return false;
                        }
                        tracing::warn!(host = h.name(), from = %holder, "taking the host over from another agent");
                    } else if !holder.is_empty() && holder != me {
                        tracing::info!(host = h.name(), from = %holder, "the host's previous agent let its lease run out; taking over");
                    }
                    refused = None;
                    let s = h.status_mut();
                    s.agent_id = me.clone();
                    s.capabilities = m.capabilities.clone();
                    s.vars = m.vars.clone();
                    s.env = m.env.clone();
                    s.facts = m.facts.clone();
                    s.lease_duration_seconds = m.lease_duration_seconds;
                    s.lease_renew_time = time::now();
                    true
                })
                .await;
            match (written, refused) {
                (_, Some(why)) => Ok(Err(LeaseLost::HeldByAnother(why))),
                (r, None) => r.map(|_| Ok(())),
            }
        }
    }
}

/// At least this long for a registration to be answered (it is a few
/// calls, on a new connection after a fail-over).
const REGISTER_LIMIT: Duration = Duration::from_secs(10);

/// Registers, then renews the lease every third of its duration, with
/// jittered backoff while the server is unreachable. Returns only when the
/// host is lost to another agent.
async fn keep_lease(client: Client, mine: Host, every: Duration, take_over: TakeOver) -> LeaseLost {
    let api = client.api::<Host>();
    let mut hosts = client.hosts();
    let mut registered = false;
    let mut backoff = Duration::from_millis(100);
    let me = mine.status().agent_id.clone();
    // Renewals in a row that were not answered in time, and whether this
    // outage already cost the connection.
    let (mut unanswered, mut failed_over) = (0u32, false);
    loop {
        // A renewal that hangs on a connection nobody answers must not
        // stall the heartbeat: given up after one renewal period (a
        // registration, a few calls, after longer), and tried again.
        let limit = if registered { every } else { (every * 3).max(REGISTER_LIMIT) };
        let attempt = async {
            if registered {
                let req = testbus_proto::RenewLeaseRequest {
                    name: mine.name().to_string(),
                    agent_id: me.clone(),
                    release: false,
                };
                match hosts.renew_lease(req).await {
                    Ok(_) => Ok(Ok(())),
                    Err(s) if s.code() == Code::FailedPrecondition && s.message().starts_with("taken over") => {
                        Ok(Err(LeaseLost::TakenOver(s.message().to_string())))
                    }
                    Err(s) => Err(s),
                }
            } else {
                register(&api, &mine, take_over).await
            }
        };
        let res = match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(Err(lost))) => return lost,
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("not answered within {:.1}s", limit.as_secs_f64()))),
        };
        match res {
            Ok(()) => {
                if !registered {
                    tracing::info!(host = mine.name(), server = client.server(), agent = %me, "registered");
                }
                registered = true;
                backoff = Duration::from_millis(100);
                (unanswered, failed_over) = (0, false);
                tokio::time::sleep(every).await;
            }
            Err(s) => {
                if s.code() == Code::NotFound {
                    registered = false;
                }
                if matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded) {
                    unanswered += 1;
                }
                if unanswered >= 2 && !failed_over {
                    // Two periods unanswered: the replica may hear nothing
                    // this agent sends (cut off one way, or stopped) while
                    // its connection looks alive for 20 s more, longer than
                    // a short lease lasts. The next try goes to another
                    // replica on a new connection (calls in flight on this
                    // one, the watch's too, fail and are retried). Once per
                    // outage: when every replica is slow, moving between
                    // them only adds relists.
                    failed_over = client.fail_over();
                }
                let jitter = Duration::from_millis(u64::from(std::process::id() % 97));
                let retry = format!("{:.1}s", (backoff + jitter).as_secs_f64());
                let server = client.server();
                let cause = testbus_client::cause(&s);
                // One line per attempt, saying what failed and when the
                // next comes.
                if s.code() == Code::Unavailable {
                    tracing::warn!("cannot reach {server}: {cause}; retrying in {retry}");
                } else {
                    let what = if registered { "renewing the lease" } else { "registering" };
                    tracing::warn!("{what} failed: {cause}; retrying in {retry}");
                }
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(every);
            }
        }
    }
}

/// This agent's id, kept in its data dir: the same across restarts, so a
/// restarted agent takes its own host back at once.
fn agent_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("agent-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            testbus_pki::write_private(&path, id.as_bytes(), 0o600)?;
            Ok(id)
        }
    }
}

struct Running {
    commands: mpsc::Sender<Command>,
    stop_sent: bool,
    release_sent: bool,
    /// The Process was deleted: its work dir goes when its runner ends.
    deleted: bool,
    /// The uid of its test: a host runs one test's processes at a time.
    test_uid: String,
}

impl Running {
    fn new(commands: mpsc::Sender<Command>, p: &Process) -> Running {
        Running { commands, stop_sent: false, release_sent: false, deleted: false, test_uid: p.spec().test_uid.clone() }
    }

    /// Asks its runner to stop it now (once): its test is over for this
    /// host, whatever the runner was doing. (Its channel has room: at most
    /// one stop and one release are ever sent.)
    fn fence(&mut self) {
        if !self.stop_sent {
            let stop = Command::Stop { by: StopReason::Requested, grace: runner::KILL_GRACE };
            self.stop_sent = self.commands.try_send(stop).is_ok();
        }
    }
}

/// Whether processes of tests `a` and `b` may run on one host at once:
/// those of one test may, those of two may not (a host is claimed by one
/// test at a time). A Process made directly, of no test, goes with any.
fn same_claim(a: &str, b: &str) -> bool {
    a.is_empty() || b.is_empty() || a == b
}

/// Most watch events handled (and processes journalled) together.
const MAX_BATCH: usize = 256;

/// Turns the Processes assigned to this host into runners.
struct Agent {
    client: Client,
    journal: journal::Journal,
    work_root: PathBuf,
    socket: Option<std::sync::Arc<local::LocalSocket>>,
    cache: std::sync::Arc<cache::BlobCache>,
    test_vars: std::sync::Arc<testvars::TestVars>,
    /// By Process uid, from admission on.
    running: HashMap<String, Running>,
    /// Admitted, not yet in the journal: no runner yet.
    admitted: Vec<(Process, mpsc::Receiver<Command>)>,
    done: mpsc::UnboundedSender<String>,
    containment: containment::Containment,
    /// Processes whose cgroup a predecessor left: they ran, whatever the
    /// journal says.
    predecessor_ran: std::collections::HashSet<String>,
    keepers: std::sync::Arc<keeper::client::Keepers>,
    /// What a predecessor's keepers hold (or recorded the end of), until
    /// their Processes are listed: then followed by a runner, or ended.
    adopted: HashMap<String, keeper::client::Adopted>,
    spool_limit: u64,
}

/// Whether a Process's own status says it was started already: an agent
/// sets these only after journalling it, so a Process showing them and
/// missing from the journal ran under a journal that was since lost.
fn status_says_started(p: &Process) -> bool {
    let s = p.status();
    s.pid != 0
        || !s.start_time.is_empty()
        || matches!(s.phase.parse(), Ok(ProcessPhase::Fetching | ProcessPhase::Ready | ProcessPhase::Running))
}

impl Agent {
    /// A batch of watch events: each handled, then the processes they
    /// admitted started together (one journal fsync).
    async fn on_events(&mut self, batch: Vec<Option<WatcherEvent<Process>>>) -> anyhow::Result<()> {
        for ev in batch {
            match ev {
                Some(WatcherEvent::Restarted(list)) => {
                    self.remove_stale_work_dirs(&list);
                    // Deleted while the watch was down (a failed attempt's
                    // Processes, deleted once the control plane had marked
                    // them Lost while this host was cut off): as if seen
                    // deleted. They once ran on beside the next test's.
                    let listed: std::collections::HashSet<&str> = list.iter().map(|p| p.meta().uid.as_str()).collect();
                    // Those still waiting to start never will.
                    for (p, _) in self.admitted.iter().filter(|(p, _)| !listed.contains(p.meta().uid.as_str())) {
                        self.running.remove(&p.meta().uid);
                    }
                    self.admitted.retain(|(p, _)| listed.contains(p.meta().uid.as_str()));
                    for (uid, r) in self.running.iter_mut() {
                        if !listed.contains(uid.as_str()) {
                            r.deleted = true;
                            r.fence();
                        }
                    }
                    for p in list {
                        self.handle(p).await
                    }
                    self.end_unclaimed();
                }
                Some(WatcherEvent::Applied(p)) => self.handle(p).await,
                Some(WatcherEvent::Deleted(p)) if self.admitted.iter().any(|(a, _)| a.meta().uid == p.meta().uid) => {
                    // Deleted while waiting to start: it never runs.
                    self.admitted.retain(|(a, _)| a.meta().uid != p.meta().uid);
                    self.running.remove(&p.meta().uid);
                }
                Some(WatcherEvent::Deleted(p)) => match self.running.get_mut(&p.meta().uid) {
                    Some(r) => {
                        // Deleted: no one waits for it to end well.
                        r.deleted = true;
                        r.fence();
                    }
                    None => self.remove_work_dirs(vec![p.meta().uid.clone()]),
                },
                None => anyhow::bail!("process watch ended"),
            }
        }
        self.start_admitted();
        Ok(())
    }

    /// Stops every process it runs (AgentShutdown) and waits for them, 10 s
    /// at most.
    async fn stop_and_wait(&mut self, done_rx: &mut mpsc::UnboundedReceiver<String>) {
        // Those waiting to start have no runner: they are simply not run.
        for (p, _) in std::mem::take(&mut self.admitted) {
            self.running.remove(&p.meta().uid);
        }
        tracing::info!("shutting down; stopping {} processes", self.running.len());
        self.stop_all(StopReason::AgentShutdown).await;
        let wait = async {
            while !self.running.is_empty() {
                match done_rx.recv().await {
                    Some(uid) => {
                        self.running.remove(&uid);
                    }
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
    }

    async fn handle(&mut self, p: Process) {
        let uid = p.meta().uid.clone();
        let terminal = phase::process_terminal(&p.status().phase);
        if let Some(at) = self.admitted.iter().position(|(a, _)| a.meta().uid == uid) {
            // Waiting to start (another test's leftover still ends here),
            // with no runner yet: stopped or ended meanwhile, it never runs.
            if p.spec().stop || terminal {
                self.admitted.remove(at);
                self.running.remove(&uid);
                if !terminal {
                    end_unrun(
                        self.client.api(),
                        p,
                        ProcessPhase::Killed,
                        ProcessReason::Stopped,
                        "stopped before it started",
                    );
                }
                return;
            }
        }
        if let Some(r) = self.running.get_mut(&uid) {
            // A final status written by someone else (Lost while this host
            // was cut off) fences the process: it must not run on.
            if (p.spec().stop || terminal) && !r.stop_sent {
                // A final status written by someone else fences it: its host
                // may be another test's already, so no long grace then.
                let grace = if terminal { runner::KILL_GRACE } else { runner::stop_grace(p.spec()) };
                let stop = Command::Stop { by: StopReason::Requested, grace };
                r.stop_sent = r.commands.send(stop).await.is_ok();
            } else if p.spec().released && !r.release_sent {
                r.release_sent = r.commands.send(Command::Release).await.is_ok();
            }
            return;
        }
        if terminal {
            return;
        }
        if let Some(adopted) = self.adopted.remove(&uid) {
            // Running under a predecessor's keeper (or ended there): taken
            // over, not started. A stop meanwhile reaches it below.
            let (tx, rx) = mpsc::channel(4);
            self.running.insert(uid.clone(), Running::new(tx, &p));
            self.start_runner(p.clone(), rx, Some(adopted));
            if p.spec().stop {
                Box::pin(self.handle(p)).await;
            }
            return;
        }
        let api = self.client.api::<Process>();
        if self.journal.contains(&uid) || self.predecessor_ran.contains(&uid) {
            // Started before by this agent, but not by this run of it: the
            // process cannot be re-adopted, and must never run twice.
            // Whatever its predecessor left running of it went when this
            // agent started (`containment::end_predecessors`).
            let why = "the agent restarted while the process ran, and no keeper holds it (the host rebooted, or its keeper was killed); its outcome is unknown";
            end_unrun(api, p, ProcessPhase::Lost, ProcessReason::AgentRestarted, why);
            return;
        }
        if status_says_started(&p) {
            let why = "the process was started before, but the agent's journal has no record of it (lost or damaged); it is not run again";
            end_unrun(api, p, ProcessPhase::Lost, ProcessReason::JournalLost, why);
            return;
        }
        if p.spec().stop {
            end_unrun(api, p, ProcessPhase::Killed, ProcessReason::Stopped, "stopped before it started");
            return;
        }
        // Its runner starts with the batch (see `start_admitted`); events
        // for it until then go to its channel.
        let (tx, rx) = mpsc::channel(4);
        self.running.insert(uid, Running::new(tx, &p));
        self.admitted.push((p, rx));
    }

    /// Starts the runners of the processes admitted since the last call,
    /// once all of them are in the journal (one write and one fsync for
    /// the batch).
    fn start_admitted(&mut self) {
        if self.admitted.is_empty() {
            return;
        }
        // A host runs one test's processes at a time. One of another test
        // still running here is left over from a test that is over for
        // this host (its end was written elsewhere while the host was cut
        // off, and the host claimed again since), and is being stopped
        // (its final status, its deletion or its absence from a relisting
        // fences it): the new test's processes wait until it has ended
        // (see the done events in `run`). Without this, the leftover ran
        // on beside the next test's first process. Waiting, not stopping:
        // which of two tests still holds the host is the control plane's
        // to say.
        let waiting: std::collections::HashSet<String> =
            self.admitted.iter().map(|(p, _)| p.meta().uid.clone()).collect();
        let mut batch = Vec::new();
        for (p, rx) in std::mem::take(&mut self.admitted) {
            let mine = p.spec().test_uid.as_str();
            let blocked = self.running.iter().any(|(uid, r)| !waiting.contains(uid) && !same_claim(&r.test_uid, mine));
            if blocked {
                self.admitted.push((p, rx));
            } else {
                batch.push((p, rx));
            }
        }
        if batch.is_empty() {
            return;
        }
        let uids: Vec<&str> = batch.iter().map(|(p, _)| p.meta().uid.as_str()).collect();
        if let Err(e) = self.journal.record_all(&uids) {
            for (p, _) in &batch {
                tracing::error!(error = %e, "cannot write the journal; not starting {}", p.name());
                self.running.remove(&p.meta().uid);
            }
            return;
        }
        for (p, rx) in batch {
            self.start_runner(p, rx, None);
        }
    }

    fn start_runner(&self, p: Process, rx: mpsc::Receiver<Command>, adopted: Option<keeper::client::Adopted>) {
        let uid = p.meta().uid.clone();
        let runner = ProcessRunner {
            client: self.client.clone(),
            known: runner::known(p.clone()),
            process: p,
            work_root: self.work_root.clone(),
            socket: self.socket.clone(),
            cache: self.cache.clone(),
            test_vars: self.test_vars.clone(),
            journal: self.journal.path().to_path_buf(),
            containment: self.containment.clone(),
            keepers: self.keepers.clone(),
            spool_limit: self.spool_limit,
            adopted,
        };
        let done = self.done.clone();
        tokio::spawn(async move {
            runner.run(rx).await;
            let _ = done.send(uid);
        });
    }

    /// After the first complete listing: what a predecessor's keepers hold
    /// whose Process is gone or already ended (Lost while the agent was
    /// away) is ended, and let go of.
    fn end_unclaimed(&mut self) {
        for (uid, adopted) in self.adopted.drain() {
            let keeper::client::Adopted::Live(mut held, state) = adopted else { continue };
            tracing::warn!(process_uid = %uid, "a keeper holds a process that is gone or ended; ending it");
            tokio::spawn(async move {
                if state.exit.is_none() {
                    held.signal(nix::sys::signal::Signal::SIGKILL);
                    while let Some(ev) = held.next().await {
                        if matches!(ev, keeper::Event::Exited { .. }) {
                            break;
                        }
                    }
                }
                held.forget();
            });
        }
    }

    /// Removes the work dirs of Processes that are gone, in the
    /// background. A process's work dir lives as long as its Process (so a
    /// test held for debugging keeps its files); without this, every
    /// process ever run would leave one behind.
    fn remove_work_dirs(&self, uids: Vec<String>) {
        let root = self.work_root.clone();
        tokio::task::spawn_blocking(move || {
            for uid in uids {
                match std::fs::remove_dir_all(root.join(&uid)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(process_uid = %uid, error = %e, "cannot remove the work dir"),
                }
            }
        });
    }

    /// After a complete listing of this host's Processes: the work dirs of
    /// those deleted while the watch was down (or the agent was).
    fn remove_stale_work_dirs(&self, listed: &[Process]) {
        let Ok(entries) = std::fs::read_dir(&self.work_root) else { return };
        let live: std::collections::HashSet<&str> = listed.iter().map(|p| p.meta().uid.as_str()).collect();
        let stale: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|uid| !live.contains(uid.as_str()) && !self.running.contains_key(uid))
            .collect();
        if !stale.is_empty() {
            self.remove_work_dirs(stale);
        }
    }

    async fn stop_all(&mut self, by: StopReason) {
        for r in self.running.values_mut() {
            if !r.stop_sent {
                r.stop_sent = r.commands.send(Command::Stop { by, grace: runner::KILL_GRACE }).await.is_ok();
            }
        }
    }
}

/// Ends a Process that is not run (its final status written), in the
/// background: the write is retried until the API takes it, and the event
/// loop must not wait on that (an API that refuses it for long would hold
/// up every other process of the host).
fn end_unrun(api: Api<Process>, p: Process, to: ProcessPhase, reason: ProcessReason, why: &'static str) {
    tokio::spawn(async move { runner::end_unrun(&api, &p, to, reason, why).await });
}

/// The agent's own cgroup, removed (if empty) whichever way `run`
/// returns: a failed or interrupted join used to leave it behind. One that
/// still holds processes stays, for the next start to end them.
struct CgroupRootCleanup(Option<std::sync::Arc<containment::CgroupRoot>>);

impl Drop for CgroupRootCleanup {
    fn drop(&mut self) {
        if let Some(root) = &self.0 {
            root.remove_if_empty();
        }
    }
}

/// Tells apart the cgroups of agents on one machine: by name, and by data
/// dir for two agents of one name.
fn cgroup_key(name: &str, data_dir: &std::path::Path) -> String {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!("{name}.{:08x}", crc32fast::hash(dir.as_os_str().as_encoded_bytes()))
}

fn default_data_dir(name: &str) -> PathBuf {
    let base = if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
    {
        PathBuf::from("/var/lib/testbus-agent")
    } else {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into()).join(".local/share/testbus-agent")
    };
    base.join(name)
}

/// The strongest containment this host allows, or the one asked for.
fn choose_containment(
    wanted: Option<ContainmentKind>,
    name: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<containment::Containment> {
    use containment::Containment;
    let cgroups = || containment::CgroupRoot::create(&cgroup_key(name, data_dir));
    let pid_namespace = || -> Result<Containment, String> {
        let agent = std::env::current_exe().map_err(|e| format!("cannot find the agent's own binary: {e}"))?;
        pidns::probe(&agent)?;
        Ok(Containment::PidNamespace { agent: std::sync::Arc::new(agent) })
    };
    let chosen = match wanted {
        Some(ContainmentKind::ProcessGroup) => Containment::ProcessGroup,
        Some(ContainmentKind::Cgroup) => Containment::Cgroup(std::sync::Arc::new(
            cgroups().map_err(|e| anyhow::anyhow!("--containment cgroup: {e}"))?,
        )),
        Some(ContainmentKind::PidNamespace) => {
            pid_namespace().map_err(|e| anyhow::anyhow!("--containment pid-namespace: {e}"))?
        }
        None => match cgroups() {
            Ok(root) => Containment::Cgroup(std::sync::Arc::new(root)),
            Err(no_cgroups) => match pid_namespace() {
                Ok(c) => {
                    tracing::info!("no cgroups ({no_cgroups}): each process runs in a PID namespace of its own");
                    c
                }
                Err(no_ns) => {
                    tracing::warn!(
                        "no cgroups ({no_cgroups}) and no PID namespaces ({no_ns}): processes are contained by \
                         their process group only, which one may leave"
                    );
                    Containment::ProcessGroup
                }
            },
        },
    };
    match &chosen {
        Containment::Cgroup(root) => {
            tracing::info!(cgroup = %root.dir().display(), "each process runs in a cgroup of its own");
            // Where it is, for whoever cleans up after an agent killed
            // outright (test harnesses).
            let _ = std::fs::write(data_dir.join("cgroup"), root.dir().as_os_str().as_encoded_bytes());
        }
        Containment::PidNamespace { .. } => {
            tracing::info!("each process runs in a PID namespace of its own");
        }
        Containment::ProcessGroup if wanted == Some(ContainmentKind::ProcessGroup) => {
            tracing::warn!(
                "--containment process-group: each process is held by its process group only, which one may leave"
            );
        }
        Containment::ProcessGroup => {}
    }
    Ok(chosen)
}

/// The agent's data dir (absolute), private, and its journal.
fn open_data_dir(args: &Args) -> anyhow::Result<(PathBuf, journal::Journal)> {
    let data_dir = args.data_dir.clone().unwrap_or_else(|| default_data_dir(&args.name));
    // Processes run in work dirs below it, with their own cwd: paths
    // handed to them must not depend on the agent's.
    let data_dir = std::path::absolute(&data_dir).with_context(|| format!("--data-dir {}", data_dir.display()))?;
    // Its journal, key, cached files and the tests' work dirs are this
    // agent's alone (0700), whatever the umask; the processes it runs keep
    // the umask it was started with.
    for dir in [data_dir.clone(), data_dir.join("work")] {
        testbus_pki::private_dir(&dir).with_context(|| format!("--data-dir {}", data_dir.display()))?;
    }
    let journal = journal::Journal::open(&data_dir.join("journal")).context("opening the journal")?;
    if journal.skipped() > 0 {
        tracing::warn!(
            skipped = journal.skipped(),
            "the journal has records that do not check (torn or damaged); they were skipped"
        );
    }
    Ok((data_dir, journal))
}

/// Gives up the host's lease (3 s at most): a clean stop ends what holds
/// the host now, saying why, not when the lease runs out.
async fn give_up_lease(client: &Client, name: &str, agent_id: String) {
    let mut req =
        tonic::Request::new(testbus_proto::RenewLeaseRequest { name: name.to_string(), agent_id, release: true });
    req.set_timeout(Duration::from_secs(3));
    if let Err(s) = client.hosts().renew_lease(req).await {
        tracing::warn!(error = %s.message(), "cannot give up the lease; the host goes NotReady when it runs out");
    }
}

/// The join token given (`--join-token`, or read from `--join-token-file`).
fn join_token(args: &Args) -> anyhow::Result<Option<String>> {
    Ok(match &args.join_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--join-token-file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => args.join_token.clone(),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut mine = host_object(&args)?;
    let (data_dir, journal) = open_data_dir(&args)?;
    let containment = choose_containment(args.containment, &args.name, &data_dir)?;
    let _cgroup_cleanup = CgroupRootCleanup(match &containment {
        containment::Containment::Cgroup(root) => Some(root.clone()),
        _ => None,
    });
    // What a predecessor's keepers hold is taken over (their processes run
    // on); what nothing holds is ended.
    let exe = std::env::current_exe().context("finding the agent's own binary")?;
    let (keepers, adopted) = keeper::client::Keepers::open(&data_dir.join("keepers"), &exe, args.keeper_orphan_timeout)
        .await
        .context("opening the keepers' dir")?;
    let held: std::collections::HashSet<String> = adopted
        .iter()
        .filter(|(_, a)| matches!(a, keeper::client::Adopted::Live(_, s) if s.exit.is_none()))
        .map(|(uid, _)| uid.clone())
        .collect();
    let predecessor_ran = containment::end_predecessors(&journal, containment.cgroups(), &held).await;
    // The metrics listener ends with this function (the guard cancels it).
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        testbus_telemetry::serve_metrics(addr, metrics::metrics().registry.clone(), metrics_stop.clone())
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
    }
    let _stop_metrics = metrics_stop.drop_guard();
    let token = join_token(&args)?;
    let take_over = if args.take_over { TakeOver::Yes } else { TakeOver::No };
    // A stop while it still tries to join ends it as cleanly as one later.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let creds = tokio::select! {
        creds = credentials::Credentials::obtain(&args.server, &args.name, token.as_deref(), take_over, &data_dir) => creds?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("stopped before it joined"),
        _ = term.recv() => anyhow::bail!("stopped before it joined"),
    };
    let client = Client::lazy_with(&args.server, creds.as_ref().map(|c| c.tls.clone()))
        .map_err(|e| anyhow::anyhow!("--server: {e}"))?;
    let renewing = tokio_util::sync::CancellationToken::new();
    if let Some(creds) = creds {
        tokio::spawn(creds.keep_renewed(client.clone(), renewing.clone()));
    }
    let _stop_renewing = renewing.drop_guard();
    mine.status_mut().agent_id = agent_id(&data_dir)?;
    let mut lease = tokio::spawn(keep_lease(client.clone(), mine, args.lease_duration / 3, take_over));

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        client: client.clone(),
        journal,
        work_root: data_dir.join("work"),
        socket: match local::LocalSocket::serve(&data_dir.join("sock"), client.clone(), containment.clone()) {
            Ok(s) => Some(std::sync::Arc::new(s)),
            Err(e) => {
                tracing::warn!(error = %e, "no local socket; sync/send/recv will fail in processes");
                None
            }
        },
        cache: cache::BlobCache::new(data_dir.join("blobs"), client.clone()).context("opening the blob cache")?,
        test_vars: testvars::TestVars::new(client.clone()),
        running: HashMap::new(),
        admitted: Vec::new(),
        done: done_tx,
        containment,
        predecessor_ran,
        keepers: std::sync::Arc::new(keepers),
        adopted,
        spool_limit: args.spool_limit,
    };
    // Listed again after every break, never resumed: a guest reverted to
    // a snapshot brings this agent (and its journal) back to an earlier
    // revision, from which a resumed watch would replay its later Processes
    // as Pending, and they would run a second time.
    let events =
        watcher_with(client.api::<Process>(), String::new(), format!("spec.hostName={}", args.name), Reconnect::Relist);
    futures::pin_mut!(events);
    let mut lost = None;
    loop {
        tokio::select! {
            ev = events.next() => {
                // Events already waiting are handled with this one, so the
                // processes they start share one journal fsync.
                let mut batch = vec![ev];
                while batch.len() < MAX_BATCH {
                    match futures::FutureExt::now_or_never(events.next()) {
                        Some(ev) => batch.push(ev),
                        None => break,
                    }
                }
                agent.on_events(batch).await?;
            },
            Some(uid) = done_rx.recv() => {
                if agent.running.remove(&uid).is_some_and(|r| r.deleted) {
                    agent.remove_work_dirs(vec![uid]);
                }
                // What waited for another test's leftovers to end.
                agent.start_admitted();
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            r = &mut lease => {
                lost = Some(match r {
                    Ok(LeaseLost::HeldByAnother(why)) => why,
                    Ok(LeaseLost::TakenOver(why)) => format!("{why}; this agent stops"),
                    Err(e) => format!("the lease task failed: {e}"),
                });
                break;
            }
        }
    }
    if let Some(why) = &lost {
        tracing::error!("{why}");
    }
    // Left to the keeper (a restart), unless told to stop them or the host
    // is lost to another agent.
    let keep = args.on_stop == OnStop::Keep && lost.is_none() && !agent.running.is_empty();
    if keep {
        tracing::info!(
            "stopping; {} processes are left to the keeper, for the next start of the agent to take over",
            agent.running.len()
        );
        // The lease is kept: the host stays Ready while the agent restarts
        // (within its lease and the control plane's grace).
        return Ok(());
    }
    agent.stop_and_wait(&mut done_rx).await;
    if lost.is_none() {
        // A clean stop: the lease is given up, so that whatever still holds
        // this host (an open test) ends now, saying why, rather than when
        // the lease runs out.
        lease.abort();
        let _ = lease.await;
        give_up_lease(&client, &args.name, agent_id(&data_dir)?).await;
    }
    match lost {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

// One thread: an agent's work is small pieces for a few processes at a
// time, and on a machine shared with the test's own processes a second
// worker only adds wake-ups and stealing (measured: 8–30% more processes/s
// over 50 agents on two cores). What blocks — a journal fsync, copying a
// file into place — is short; a lease is renewed at a third of its term.
fn main() {
    // The containment relay (see `pidns`) runs before anything else, while
    // the process is single-threaded.
    let mut argv = std::env::args_os();
    match argv.nth(1) {
        Some(a) if a == pidns::SUBCOMMAND => pidns::main(argv.collect()),
        Some(a) if a == keeper::SUBCOMMAND => keeper::server::main(argv.collect()),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match rt {
        Ok(rt) => rt.block_on(agent_main()),
        Err(e) => {
            eprintln!("testbus-agent: cannot start its runtime: {e}");
            std::process::exit(2);
        }
    }
}

async fn agent_main() {
    let args = Args::parse();
    testbus_telemetry::init_logging(args.log_format);
    if let Err(e) = run(args).await {
        eprintln!("testbus-agent: {e:#}");
        std::process::exit(2);
    }
}
