//! `ProcessRunner`: one Process on this host, as a small state machine with
//! its own command channel.
//!
//! Preparing (workdir, `${}` substitution, script file) → Running (held by
//! the agent's keeper, in its own process group; stdout/stderr streamed
//! from the keeper's spool as they come) → Ended. Every way to end is an
//! [`Ended`] variant, mapped to exactly one final status. Stop and timeout
//! have the keeper signal all of it (TERM, then KILL after a grace
//! period); the keeper ends its leftovers when the main process exits. All
//! output is uploaded before the final status is reported, so a terminal
//! status means the output is complete; only then does the keeper let go
//! of the process. A runner can also start from a process a predecessor's
//! keeper holds ([`ProcessRunner::adopted`]).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use testbus_client::{Api, Client};
use testbus_proto::states::{ProcessPhase, ProcessReason};
use testbus_proto::{duration, phase, subst, time, OutputChunk, Process, Resource};
use tokio::sync::mpsc;
use tonic::Code;

use crate::keeper;

/// Grace between SIGTERM and SIGKILL, unless the process's
/// `spec.stopGrace` says otherwise.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// The grace a stopped process gets: its spec's, else [`KILL_GRACE`]
/// (validation keeps it at most 10m).
pub fn stop_grace(spec: &testbus_proto::ProcessSpec) -> Duration {
    duration::parse(&spec.stop_grace).unwrap_or(KILL_GRACE).min(testbus_proto::validate::MAX_STOP_GRACE)
}
/// How long a process runs before it is reported Running.
const RUNNING_DELAY: Duration = Duration::from_millis(2);
/// Largest output append: what the spool holds is gathered up to this
/// size, so a fast writer costs one RPC per MiB.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `spec.stop` was set (the test ended or was cancelled).
    Requested,
    /// The agent itself is shutting down.
    AgentShutdown,
}

#[derive(Debug)]
pub enum Command {
    /// Stop: SIGTERM, then SIGKILL after `grace`.
    Stop { by: StopReason, grace: Duration },
    /// A gated process may start.
    Release,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    /// Its command could not be executed (not found, not executable): the
    /// test's failure, not the host's, with the code a shell would give
    /// (127 not found, 126 not executable), as the PID-namespace path
    /// gives it too.
    NotExecuted {
        code: i32,
        message: String,
    },
    Signalled(SignalNo),
    /// Its timeout passed; `signal` ended it.
    TimedOut {
        after: Duration,
        signal: SignalNo,
    },
    /// Stopped; by `signal`, or before it started (None).
    Stopped {
        by: StopReason,
        signal: Option<SignalNo>,
    },
    /// Its keeper went away while it ran: its outcome is unknown.
    KeeperLost {
        message: String,
    },
    /// It could not be started: `reason` is one of the setup failures.
    SetupFailed {
        reason: ProcessReason,
        message: String,
    },
}

/// How a process's end reads in its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndStatus {
    pub phase: ProcessPhase,
    pub reason: ProcessReason,
    pub message: String,
    pub exit_code: Option<i32>,
    /// What its signal field says: the signal that ended it (empty when it
    /// was stopped before it started); None leaves the field alone.
    pub signal: Option<String>,
}

/// The status a process's end gives it: the decision alone, unit-tested;
/// the runner writes it. `exit_codes` are the spec's codes that count as
/// success (none: 0 only); `stop_reason` is why it was asked to stop
/// (the spec's `stopReason`, empty when nobody said).
pub fn end_status(ended: &Ended, exit_codes: &[i32], stop_reason: &str) -> EndStatus {
    let end = |phase, reason, message: String| EndStatus { phase, reason, message, exit_code: None, signal: None };
    let passed = |code: &i32| exit_codes.is_empty() && *code == 0 || exit_codes.contains(code);
    let verdict = |ok: bool| match ok {
        true => (ProcessPhase::Succeeded, ProcessReason::Completed),
        false => (ProcessPhase::Failed, ProcessReason::NonZeroExit),
    };
    match ended {
        Ended::Exited(code) => {
            let (phase, reason) = verdict(passed(code));
            let message = if passed(code) { String::new() } else { format!("exit code {code}") };
            EndStatus { exit_code: Some(*code), ..end(phase, reason, message) }
        }
        Ended::NotExecuted { code, message } => {
            // Only a code the test named counts as success (a shell's 127
            // is never a plain 0).
            let (phase, reason) = verdict(exit_codes.contains(code));
            let message = format!("{message} (exit code {code}, as a shell's)");
            EndStatus { exit_code: Some(*code), ..end(phase, reason, message) }
        }
        Ended::Signalled(sig) => EndStatus {
            signal: Some(sig.to_string()),
            ..end(ProcessPhase::Failed, ProcessReason::Signalled, format!("killed by {sig}"))
        },
        Ended::TimedOut { after, signal } => EndStatus {
            signal: Some(signal.to_string()),
            ..end(
                ProcessPhase::Failed,
                ProcessReason::TimedOut,
                format!("timed out after {}", duration::format(*after)),
            )
        },
        Ended::Stopped { by, signal } => {
            let (reason, message) = match by {
                StopReason::Requested if stop_reason.is_empty() => {
                    (ProcessReason::Stopped, "stopped on request".into())
                }
                StopReason::Requested => (ProcessReason::Stopped, format!("stopped: {stop_reason}")),
                StopReason::AgentShutdown => (ProcessReason::AgentShutdown, "the agent shut down".into()),
            };
            EndStatus {
                signal: Some(signal.map(|g| g.to_string()).unwrap_or_default()),
                ..end(ProcessPhase::Killed, reason, message)
            }
        }
        Ended::SetupFailed { reason, message } => end(ProcessPhase::Failed, *reason, message.clone()),
        Ended::KeeperLost { message } => end(ProcessPhase::Lost, ProcessReason::KeeperLost, message.clone()),
    }
}

/// A runner's latest copy of its Process: what the watch delivered, then
/// what each of its own status writes returned. Reports start from it, so
/// one is usually a single write with no read before it.
pub type Known = std::sync::Arc<parking_lot::Mutex<Process>>;

pub fn known(p: Process) -> Known {
    std::sync::Arc::new(parking_lot::Mutex::new(p))
}

pub struct ProcessRunner {
    pub client: Client,
    pub process: Process,
    pub known: Known,
    pub work_root: PathBuf,
    /// The agent's local socket, if it could be served.
    pub socket: Option<std::sync::Arc<crate::local::LocalSocket>>,
    pub cache: std::sync::Arc<crate::cache::BlobCache>,
    pub test_vars: std::sync::Arc<crate::testvars::TestVars>,
    /// Where the process group is recorded once it runs.
    pub journal: PathBuf,
    /// What holds each process.
    pub containment: crate::containment::Containment,
    /// Who runs it.
    pub keepers: std::sync::Arc<keeper::client::Keepers>,
    /// Most bytes of each stream its keeper spools.
    pub spool_limit: u64,
    /// Set when a predecessor's keeper holds it already: followed, not
    /// started.
    pub adopted: Option<keeper::client::Adopted>,
}

/// A file of the process, fetched into the cache.
struct Fetched {
    file: testbus_proto::FileRef,
    cached: PathBuf,
}

/// A signal by number, shown as the kernel names it ("SIGTERM"), or as
/// "signal 40" for one without a name (real-time signals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalNo(pub i32);

impl SignalNo {
    pub const TERM: SignalNo = SignalNo(nix::libc::SIGTERM);
    pub const KILL: SignalNo = SignalNo(nix::libc::SIGKILL);
}

impl std::fmt::Display for SignalNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match nix::sys::signal::Signal::try_from(self.0) {
            Ok(s) => f.write_str(s.as_str()),
            Err(_) => write!(f, "signal {}", self.0),
        }
    }
}

/// The variables a process starts with besides its spec's env (the
/// agent's own, read once).
fn base_env() -> &'static BTreeMap<String, String> {
    static BASE: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
    BASE.get_or_init(read_base_env)
}

fn read_base_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for k in ["PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TZ", "TMPDIR", "TERM"] {
        if let Ok(v) = std::env::var(k) {
            env.insert(k.to_string(), v);
        }
    }
    let path = env
        .entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    // testbusctl (for sync/send/recv) is installed beside the agent.
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(std::path::Path::parent) {
        path.push(':');
        path.push_str(&dir.display().to_string());
    }
    env
}

/// `program` as a path: a bare name is looked up in the process's own
/// PATH, as exec would. Besides being what the process's env says, a path
/// lets the standard library start the child with posix_spawn (vfork)
/// rather than fork, which copies the agent's page tables for every
/// process. A name found nowhere is left as it is: spawning it fails with
/// the usual "No such file or directory".
fn program_path(program: &str, path: Option<&str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let found = path
        .into_iter()
        .flat_map(|p| p.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(program))
        .find(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0));
    found.unwrap_or_else(|| PathBuf::from(program))
}

/// Puts a copy of `from` at `to` with `mode`, whole or not at all: written
/// to a temporary file of a random name, created exclusively (never through
/// a link planted in the directory) beside `to`, then renamed over it. Two
/// deliveries into one directory at once never share a temporary file, and
/// a failed one leaves none behind.
fn deliver(from: &std::path::Path, to: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".testbus-").suffix(".tmp").tempfile_in(dir)?;
    std::io::copy(&mut std::fs::File::open(from)?, tmp.as_file_mut())?;
    // On the open file, not by name.
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.persist(to).map_err(|e| e.error)?;
    Ok(())
}

impl ProcessRunner {
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let name = self.process.name().to_string();
        let api = self.client.api::<Process>();
        let Outcome { ended, sizes, started, held, dead } = match self.adopted.take() {
            Some(adopted) => self.resume(adopted, &mut commands).await,
            None => {
                let prepare = async {
                    let (vars, fetched) = tokio::join!(self.host_vars(), self.fetch(&api));
                    match (vars, fetched) {
                        (Ok(vars), Ok((files, stdin))) => {
                            let socket = self.socket.as_ref().map(|s| s.path.as_path());
                            self.prepare(&vars, socket, &files, stdin).await
                        }
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                };
                let mut released = false;
                match unless_stopped(prepare, &mut commands, &mut released).await {
                    Err(e) => Outcome::ended(e),
                    Ok(spec) => match self.gate(&api, &mut commands, released).await {
                        Some(by) => Outcome::ended(Ended::Stopped { by, signal: None }),
                        None => self.execute(spec, &mut commands).await,
                    },
                }
            }
        };
        // An exit is the test's business (its status says it); the rest
        // is the agent's, and worth an operator's eye. At a thousand
        // processes a second, a line for each would be most of the log.
        match ended {
            Ended::Exited(_) | Ended::NotExecuted { .. } => tracing::debug!(process = %name, ?ended, "process ended"),
            _ => tracing::info!(process = %name, ?ended, "process ended"),
        }
        let exit_codes = self.process.spec().exit_codes.clone();
        report(&api, &self.known, move |p| {
            // Why it was asked to stop, as the latest spec says (a report
            // that meets a conflict reads it again).
            let why = p.spec().stop_reason.clone();
            let s = p.status_mut();
            if let Some((pid, start)) = &started {
                if s.start_time.is_empty() {
                    s.pid = *pid;
                    s.start_time = start.clone();
                }
            }
            s.finish_time = time::now();
            s.stdout_bytes = sizes.0.bytes;
            s.stderr_bytes = sizes.1.bytes;
            s.stdout_truncated = sizes.0.truncated;
            s.stderr_truncated = sizes.1.truncated;
            let end = end_status(&ended, &exit_codes, &why);
            s.phase = end.phase.into();
            s.reason = end.reason.into();
            s.message = end.message;
            if end.exit_code.is_some() {
                s.exit_code = end.exit_code;
            }
            if let Some(signal) = end.signal {
                s.signal = signal;
            }
            true
        })
        .await;
        // Its end is on the server: its keeper may let go of it, and a
        // successor has nothing left to end or to refuse to run again.
        if let Some(held) = held {
            held.forget();
        }
        drop(dead);
        crate::journal::Journal::forget_group_file(&self.journal, &self.process.meta().uid);
        let phase = self.known.lock().status().phase.clone();
        crate::metrics::metrics().ended.get_or_create(&crate::metrics::Phase { phase }).inc();
    }

    /// A gated process reports Ready and waits to be released; returns why
    /// it was stopped instead, if it was.
    async fn gate(
        &self,
        api: &Api<Process>,
        commands: &mut mpsc::Receiver<Command>,
        released: bool,
    ) -> Option<StopReason> {
        let spec = self.process.spec();
        if !spec.gated || spec.released || released {
            return None;
        }
        advance(api, &self.known, ProcessPhase::Ready).await;
        match commands.recv().await {
            Some(Command::Release) => None,
            Some(Command::Stop { by, .. }) => Some(by),
            None => Some(StopReason::AgentShutdown),
        }
    }

    /// The test's claim-time `host_*` variables, when the process does not
    /// carry them.
    async fn host_vars(&self) -> Result<crate::testvars::Vars, Ended> {
        let spec = self.process.spec();
        if !spec.test_host_vars || spec.test.is_empty() {
            return Ok(Default::default());
        }
        self.test_vars
            .of(&spec.test, &spec.test_uid)
            .await
            .map_err(|e| Ended::SetupFailed { reason: ProcessReason::EnvFailed, message: e.to_string() })
    }

    /// Fetches every file (and the stdin file) into the cache, reporting
    /// Fetching while any has to be downloaded.
    async fn fetch(&self, api: &Api<Process>) -> Result<(Vec<Fetched>, Option<PathBuf>), Ended> {
        let spec = self.process.spec();
        let digests: Vec<&str> = spec.files.iter().chain(spec.stdin_file.as_ref()).map(|f| f.digest.as_str()).collect();
        if digests.iter().any(|d| !self.cache.has(d)) {
            advance(api, &self.known, ProcessPhase::Fetching).await;
        }
        let get = |f: &testbus_proto::FileRef| {
            let f = f.clone();
            async move {
                self.cache.get(&f.digest).await.map_err(|e| Ended::SetupFailed {
                    reason: ProcessReason::FetchFailed,
                    message: format!("file {}: {e}", if f.path.is_empty() { &f.env } else { &f.path }),
                })
            }
        };
        let mut files = Vec::with_capacity(spec.files.len());
        for f in &spec.files {
            files.push(Fetched { cached: get(f).await?, file: f.clone() });
        }
        let stdin = match &spec.stdin_file {
            Some(f) => Some(get(f).await?),
            None => None,
        };
        Ok((files, stdin))
    }

    /// Copies each file from the cache to its destination (a copy: a
    /// process may change its file without touching the cache).
    async fn materialise(
        &self,
        workdir: &std::path::Path,
        files: &[Fetched],
        added: &mut BTreeMap<String, String>,
    ) -> Result<(), Ended> {
        for Fetched { file: f, cached } in files {
            let dest = if f.path.is_empty() {
                workdir.join("files").join(&f.env)
            } else if f.path.starts_with('/') {
                PathBuf::from(&f.path)
            } else {
                // Validated by the API already; the agent does not rely on it.
                let rel = std::path::Path::new(&f.path);
                if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                    return Err(Ended::SetupFailed {
                        reason: ProcessReason::FileFailed,
                        message: format!("file path {:?} leaves the work dir", f.path),
                    });
                }
                workdir.join(rel)
            };
            let mode = testbus_proto::validate::parse_mode(&f.mode).unwrap_or(0o644);
            let (from, to) = (cached.clone(), dest.clone());
            // A large file takes a while to copy: off the agent's thread.
            let copy = move || deliver(&from, &to, mode);
            let copied = tokio::task::spawn_blocking(copy).await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
            copied.map_err(|e| Ended::SetupFailed {
                reason: ProcessReason::FileFailed,
                message: format!("cannot write {}: {e}", dest.display()),
            })?;
            if !f.env.is_empty() {
                added.insert(f.env.clone(), dest.display().to_string());
            }
        }
        Ok(())
    }

    async fn prepare(
        &self,
        host_vars: &BTreeMap<String, String>,
        socket: Option<&std::path::Path>,
        files: &[Fetched],
        stdin_file: Option<PathBuf>,
    ) -> Result<keeper::SpawnSpec, Ended> {
        let spec = self.process.spec();
        // What the agent adds on top of the process's own env.
        let mut added = BTreeMap::new();
        // Which process this is (the uid tells attempts and reruns apart).
        added.insert("TESTBUS_PROCESS".to_string(), self.process.name().to_string());
        added.insert("TESTBUS_PROCESS_UID".to_string(), self.process.meta().uid.clone());
        if let Some(s) = socket {
            added.insert("TESTBUS_AGENT_SOCKET".to_string(), s.display().to_string());
        }
        let workdir = self.work_root.join(&self.process.meta().uid);
        std::fs::create_dir_all(&workdir).map_err(|e| Ended::SetupFailed {
            reason: ProcessReason::WorkdirFailed,
            message: format!("cannot create {}: {e}", workdir.display()),
        })?;
        self.materialise(&workdir, files, &mut added).await?;
        let env = testbus_proto::process::LayeredEnv::new([base_env(), host_vars, &spec.env, &added]);
        let argv =
            spec.argv.iter().map(|a| subst::substitute(a, &env)).collect::<Result<Vec<_>, _>>().map_err(|e| {
                Ended::SetupFailed {
                    reason: match e {
                        subst::SubstError::Unknown(_) => ProcessReason::UnknownVariable,
                        _ => ProcessReason::InvalidArgument,
                    },
                    message: format!("argv: {e}"),
                }
            })?;
        let (program, mut args) = if !spec.script.is_empty() {
            let path = workdir.join("script");
            let write = || -> std::io::Result<()> {
                use std::os::unix::fs::PermissionsExt;
                std::fs::write(&path, &spec.script)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            };
            write().map_err(|e| Ended::SetupFailed {
                reason: ProcessReason::WorkdirFailed,
                message: format!("script: {e}"),
            })?;
            if spec.script.starts_with("#!") {
                (path, vec![])
            } else {
                (PathBuf::from("/bin/sh"), vec![path.to_string_lossy().into_owned()])
            }
        } else if spec.shell {
            (PathBuf::from("/bin/sh"), vec!["-c".to_string(), argv.join(" ")])
        } else {
            (program_path(&argv[0], env.get("PATH")), vec![])
        };
        if spec.script.is_empty() && !spec.shell {
            args.extend(argv[1..].iter().cloned());
        }
        let stdin = match stdin_file {
            Some(p) => keeper::StdinSource::File(p),
            None if spec.stdin_stream => keeper::StdinSource::Stream,
            None if spec.stdin.is_empty() => keeper::StdinSource::Null,
            None => keeper::StdinSource::Data(spec.stdin.clone()),
        };
        // With a PID namespace per process, the agent's own binary starts
        // the command inside it (see `pidns`).
        let containment = match &self.containment {
            crate::containment::Containment::Cgroup(root) => keeper::SpawnContainment::Cgroup(root.dir().to_path_buf()),
            crate::containment::Containment::PidNamespace { agent } => {
                keeper::SpawnContainment::PidNamespace(agent.as_ref().clone())
            }
            crate::containment::Containment::ProcessGroup => keeper::SpawnContainment::ProcessGroup,
        };
        Ok(keeper::SpawnSpec {
            uid: self.process.meta().uid.clone(),
            program,
            args,
            env: env.settings().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cwd: if spec.workdir.is_empty() { workdir } else { PathBuf::from(&spec.workdir) },
            stdin,
            containment,
            spool_limit: self.spool_limit,
        })
    }

    /// Records the process group led by `pid` (started at `start_ticks`, as
    /// its keeper read before it could reap it) in the journal and in the
    /// process's group file: the leader's start time is what lets a
    /// successor prove the group is still this one.
    fn record_group(&self, pid: i32, start_ticks: u64) {
        let name = self.process.name();
        if start_ticks == 0 {
            tracing::debug!(process = %name, pid, "ended before its group could be recorded");
            return;
        }
        // As the keeper read it before it could reap the process: this
        // agent is not its parent, and the pid may be another's by now.
        let group = crate::journal::Group { pgid: pid, start_ticks };
        let uid = &self.process.meta().uid;
        if let Err(e) = crate::journal::Journal::record_group(&self.journal, uid, group) {
            tracing::warn!(process = %name, error = %e, "cannot record the process group in the journal");
        }
        if let Err(e) = crate::journal::Journal::record_group_file(&self.journal, uid, group) {
            tracing::warn!(process = %name, error = %e, "cannot record the process group in its file");
        }
    }

    /// Has the keeper start the process, then follows it to its end.
    async fn execute(&self, spec: keeper::SpawnSpec, commands: &mut mpsc::Receiver<Command>) -> Outcome {
        let name = self.process.name().to_string();
        // Started, as far as a successor can tell even without the journal
        // (a group file names no group until the child exists): a uid
        // with a group file is never spawned again. Without cgroups this
        // is what keeps "at most once" when the journal's record is lost.
        if self.containment.cgroups().is_none() {
            let none = crate::journal::Group { pgid: 0, start_ticks: 0 };
            if let Err(e) = crate::journal::Journal::record_group_file(&self.journal, &self.process.meta().uid, none) {
                tracing::warn!(process = %name, error = %e, "cannot record the process as started in its group file");
            }
        }
        let spawning = tokio::time::Instant::now();
        let held = match self.keepers.spawn(spec).await {
            Ok(h) => h,
            Err(e) => return self.not_spawned(e).await,
        };
        crate::metrics::metrics().spawn_seconds.observe(spawning.elapsed().as_secs_f64());
        let pid = held.pid;
        self.record_group(pid, held.start_ticks);
        let start = time::now();
        let running = report_running_later(self.client.api::<Process>(), self.known.clone(), pid, start.clone());
        let timeout = duration::parse(&self.process.spec().timeout).ok();
        let deadline = timeout.map(|t| (tokio::time::Instant::now() + t, t));
        let mut out = self.supervise(held, [0, 0], None, 0, deadline, commands).await;
        // A Running report not done yet is dropped; if it lands anyway, the
        // final report meets a conflict and reads again, or the server
        // refuses the Running one, the status being final by then.
        running.abort();
        let _ = running.await;
        out.started = Some((i64::from(pid), start));
        out
    }

    /// What a process the keeper could not start comes to.
    async fn not_spawned(&self, e: keeper::client::SpawnError) -> Outcome {
        let setup_failed = |reason, message| Outcome::ended(Ended::SetupFailed { reason, message });
        let what = self.process.spec().argv.first().map(String::as_str).unwrap_or("script");
        if e.maybe_started {
            // Asked, then gone: it may run, unheld.
            if let Some(root) = self.containment.cgroups() {
                root.end_one(&self.process.meta().uid).await;
            }
            return Outcome::ended(Ended::KeeperLost { message: e.message });
        }
        match e.stage {
            keeper::SpawnStage::Contain => setup_failed(ProcessReason::ContainFailed, e.message),
            keeper::SpawnStage::Keeper => setup_failed(ProcessReason::SpawnFailed, e.message),
            keeper::SpawnStage::Exec => {
                let message = format!("cannot execute {what}: {}", e.message);
                let Some(code) = e.errno.map(std::io::Error::from_raw_os_error).as_ref().and_then(shell_code) else {
                    return setup_failed(ProcessReason::SpawnFailed, message);
                };
                // Said on its stderr too, as a shell (and the PID-namespace
                // path) says it.
                let said = format!("testbus: {message}\n").into_bytes();
                let n = said.len() as u64;
                let (_, truncated) = append_retrying(
                    &mut self.client.output(),
                    (self.process.name(), &self.process.meta().uid),
                    1,
                    0,
                    0,
                    said.into(),
                )
                .await;
                Outcome {
                    ended: Ended::NotExecuted { code, message },
                    sizes: (Pumped::default(), Pumped { bytes: n, truncated }),
                    started: None,
                    held: None,
                    dead: None,
                }
            }
        }
    }

    /// Takes a process over from a predecessor's keeper: follows it to its
    /// end (or reports the end the keeper recorded), uploading what was
    /// spooled meanwhile.
    async fn resume(&self, adopted: keeper::client::Adopted, commands: &mut mpsc::Receiver<Command>) -> Outcome {
        let s = self.known.lock().status().clone();
        let start = if s.start_time.is_empty() { time::now() } else { s.start_time.clone() };
        match adopted {
            keeper::client::Adopted::Live(held, state) => {
                tracing::info!(process = %self.process.name(), pid = held.pid, "taken over from the keeper");
                let pid = held.pid;
                let running = match state.exit {
                    None if s.phase != ProcessPhase::Running.as_str() => {
                        Some(report_running_later(self.client.api::<Process>(), self.known.clone(), pid, start.clone()))
                    }
                    _ => None,
                };
                // What is left of its timeout, counted from its start.
                let timeout = duration::parse(&self.process.spec().timeout).ok();
                let ran = time::since(&start);
                let deadline = timeout.map(|t| (tokio::time::Instant::now() + t.saturating_sub(ran), t));
                let exited = state.exit.map(|e| (e, state.ends));
                let mut out = self.supervise(held, state.ends, exited, state.stdin_written, deadline, commands).await;
                if let Some(r) = running {
                    r.abort();
                    let _ = r.await;
                }
                out.started = Some((i64::from(pid), start));
                out
            }
            keeper::client::Adopted::Dead { spool, record, _dir } => {
                tracing::info!(process = %self.process.name(), "its keeper is gone; reporting the end it recorded");
                let pumps = self.pumps(&spool, record.ends, true, None);
                let sizes = pumps.finish(record.ends).await;
                // Its record is kept (the dead keeper's dir) until its end
                // is reported.
                Outcome {
                    ended: exit_of(record.exit),
                    sizes,
                    started: Some((s.pid, start)),
                    held: None,
                    dead: Some(_dir),
                }
            }
        }
    }

    fn pumps(
        &self,
        spool: &std::path::Path,
        ends: [u64; 2],
        last: bool,
        progress: Option<keeper::client::Progress>,
    ) -> SpoolPumps {
        let uid = &self.process.meta().uid;
        SpoolPumps::start(spool, uid, ends, last, self.client.output(), self.process.name(), progress)
    }

    /// Follows a held process to its end: streams its spooled output,
    /// feeds its stdin, and has it signalled on a stop or at its
    /// `deadline` (TERM, then KILL after the grace).
    async fn supervise(
        &self,
        mut held: keeper::client::Held,
        ends: [u64; 2],
        exited: Option<(keeper::ExitStatus, [u64; 2])>,
        stdin_written: u64,
        deadline: Option<(tokio::time::Instant, Duration)>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Outcome {
        let name = self.process.name().to_string();
        let spec = self.process.spec();
        let _running = crate::metrics::Running::start();
        // Its cgroup (or group) speaks for it on the local socket until it
        // is gone.
        let _speaks = self.socket.as_ref().map(|s| s.register(held.pid, &self.process.meta().uid, name.clone()));
        let pumps = self.pumps(&held.spool(), ends, false, Some(held.progress()));
        let (acks, acks_rx) = tokio::sync::watch::channel(StdinAck::Upto(stdin_written));
        let feeder = (spec.stdin_stream && exited.is_none())
            .then(|| tokio::spawn(feed_stdin(self.client.clone(), name.clone(), held.stdin(), acks_rx, stdin_written)));
        // Running, then Terminating once a stop or the deadline came. A
        // process that a signal ended while no agent ran was ended by its
        // stop (asked before the restart) or its deadline, if either came.
        let mut terminating: Option<Terminating> = match exited {
            Some((keeper::ExitStatus::Signal(_), _)) if spec.stop => {
                Some(Terminating::new(Why::Stopped(StopReason::Requested), Duration::ZERO))
            }
            Some((keeper::ExitStatus::Signal(_), _)) => deadline
                .filter(|d| d.0 <= tokio::time::Instant::now())
                .map(|d| Terminating::new(Why::TimedOut(d.1), Duration::ZERO)),
            _ => None,
        };
        let mut keeper_gone = false;
        let (exit, ends) = match exited {
            Some(e) => e,
            None => loop {
                let kill_at = terminating.as_ref().filter(|t| !t.killed).map(|t| t.kill_at);
                tokio::select! {
                    ev = held.next() => match ev {
                        Some(keeper::Event::Output { stream, end, .. }) => pumps.advance(stream, end),
                        Some(keeper::Event::StdinTaken { upto, .. }) => {
                            let _ = acks.send(StdinAck::Upto(upto));
                        }
                        Some(keeper::Event::Refused { message, .. }) => {
                            tracing::debug!(process = %name, %message, "the keeper refused a request");
                            if message.starts_with("stdin") {
                                let _ = acks.send(StdinAck::Closed);
                            }
                        }
                        Some(keeper::Event::Exited { exit, ends, .. }) => break (exit, ends),
                        Some(_) => {}
                        None => {
                            keeper_gone = true;
                            self.end_orphaned(held.pid, held.start_ticks).await;
                            break (keeper::ExitStatus::Unknown, pumps.seen());
                        }
                    },
                    _ = sleep_until_opt(deadline.map(|d| d.0)), if terminating.is_none() => {
                        held.signal(nix::sys::signal::Signal::SIGTERM);
                        let after = deadline.map(|d| d.1).unwrap_or_default();
                        terminating = Some(Terminating::new(Why::TimedOut(after), stop_grace(spec)));
                    }
                    Some((by, grace)) = stop_requested(commands), if terminating.is_none() => {
                        held.signal(nix::sys::signal::Signal::SIGTERM);
                        terminating = Some(Terminating::new(Why::Stopped(by), grace));
                    }
                    _ = sleep_until_opt(kill_at), if kill_at.is_some() => {
                        held.signal(nix::sys::signal::Signal::SIGKILL);
                        if let Some(t) = &mut terminating {
                            t.killed = true;
                        }
                    }
                }
            },
        };
        if let Some(f) = feeder {
            f.abort();
        }
        let sizes = pumps.finish(ends).await;
        if keeper_gone {
            let message = "its keeper went away while it ran (killed, or crashed); its outcome is unknown";
            let ended = Ended::KeeperLost { message: message.into() };
            return Outcome { ended, sizes, started: None, held: None, dead: None };
        }
        let ended = match terminating {
            None => exit_of(exit),
            Some(t) => {
                let signal = match (t.killed, exit) {
                    (true, _) => SignalNo::KILL,
                    (false, keeper::ExitStatus::Signal(s)) => SignalNo(s),
                    (false, _) => SignalNo::TERM,
                };
                match t.why {
                    Why::TimedOut(after) => Ended::TimedOut { after, signal },
                    Why::Stopped(by) => Ended::Stopped { by, signal: Some(signal) },
                }
            }
        };
        Outcome { ended, sizes, started: None, held: Some(held), dead: None }
    }

    /// Ends what is left of a process whose keeper is gone: its cgroup, or
    /// its group if provably still the one it was.
    async fn end_orphaned(&self, pid: i32, start_ticks: u64) {
        match self.containment.cgroups() {
            Some(root) => root.end_one(&self.process.meta().uid).await,
            None => {
                crate::journal::Group { pgid: pid, start_ticks }.kill_if_alive();
            }
        }
    }
}

/// How a runner's process came out: how it ended, what its streams came
/// to, its pid and start time if it ran, and its keeper's hold on it (let
/// go once its end is reported).
struct Outcome {
    ended: Ended,
    sizes: (Pumped, Pumped),
    started: Option<(i64, String)>,
    held: Option<keeper::client::Held>,
    /// A dead keeper's dir that recorded its end: removed (with the last
    /// of its processes) once the end is reported.
    dead: Option<std::sync::Arc<keeper::client::DeadDir>>,
}

impl Outcome {
    fn ended(ended: Ended) -> Outcome {
        Outcome { ended, sizes: Default::default(), started: None, held: None, dead: None }
    }
}

/// Why a process is being ended.
enum Why {
    TimedOut(Duration),
    Stopped(StopReason),
}

/// A process sent SIGTERM, to be sent SIGKILL at `kill_at`.
struct Terminating {
    why: Why,
    kill_at: tokio::time::Instant,
    killed: bool,
}

impl Terminating {
    fn new(why: Why, grace: Duration) -> Terminating {
        Terminating { why, kill_at: tokio::time::Instant::now() + grace, killed: false }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// How far the keeper has written a process's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdinAck {
    Upto(u64),
    /// The process closed its stdin (or ended).
    Closed,
}

/// Sends what the process's test sends to its stdin as it comes (its
/// stdin log, read with follow) through its keeper, from `written` on
/// (what the keeper had written already, after a restart), one chunk at a
/// time: the next goes once the keeper has written the last. Closes it
/// once the stdin is closed (`spec.stdinClosed`) and all of it written;
/// stops when the process stops reading. A broken read is resumed,
/// skipping what was written, with a backoff; the task lives no longer
/// than the process (its runner aborts it at the end).
async fn feed_stdin(
    client: Client,
    process: String,
    stdin: keeper::client::StdinWriter,
    mut acks: tokio::sync::watch::Receiver<StdinAck>,
    mut written: u64,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let req = testbus_proto::ReadOutputRequest { process: process.clone(), follow: true, stdin: true };
        match client.output().read(req).await {
            Ok(resp) => {
                let mut chunks = resp.into_inner();
                loop {
                    match chunks.message().await {
                        Ok(Some(c)) if c.notice => {}
                        Ok(Some(c)) => {
                            let end = c.offset + c.data.len() as u64;
                            if end <= written {
                                continue;
                            }
                            stdin.write(c.offset, &c.data);
                            loop {
                                match *acks.borrow_and_update() {
                                    StdinAck::Closed => return,
                                    StdinAck::Upto(u) if u >= end => break,
                                    StdinAck::Upto(_) => {}
                                }
                                if acks.changed().await.is_err() {
                                    return;
                                }
                            }
                            written = end;
                            backoff = Duration::from_millis(50);
                        }
                        // Closed, or the process ended: end of file.
                        Ok(None) => {
                            stdin.close();
                            return;
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(s) if matches!(s.code(), Code::NotFound | Code::PermissionDenied | Code::Unauthenticated) => {
                tracing::warn!(process = %process, error = %s, "cannot read the process's stdin");
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Reports the process Running (with `pid` and its `start`), in the
/// background so that a stop is never delayed by a slow API, and only once
/// it has run for RUNNING_DELAY: one that ends sooner needs none (the final
/// report carries its pid and start time), which saves a write, its watch
/// events and a reconcile for every short process.
fn report_running_later(api: Api<Process>, known: Known, pid: i32, start: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(RUNNING_DELAY).await;
        report(&api, &known, move |p| {
            if phase::process_terminal(&p.status().phase) {
                return false;
            }
            let s = p.status_mut();
            s.phase = ProcessPhase::Running.into();
            s.pid = i64::from(pid);
            s.start_time = start.clone();
            true
        })
        .await
    })
}

/// Runs `work` (fetching files, putting them in place) unless a stop comes
/// first: then the work is dropped where it is and the process never
/// starts. A release that comes meanwhile is remembered in `released`.
async fn unless_stopped<T>(
    work: impl std::future::Future<Output = Result<T, Ended>>,
    commands: &mut mpsc::Receiver<Command>,
    released: &mut bool,
) -> Result<T, Ended> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return r,
            cmd = commands.recv() => match cmd {
                Some(Command::Release) => *released = true,
                Some(Command::Stop { by, .. }) => return Err(Ended::Stopped { by, signal: None }),
                None => return Err(Ended::Stopped { by: StopReason::AgentShutdown, signal: None }),
            },
        }
    }
}

/// The next stop command (a late Release is ignored).
async fn stop_requested(commands: &mut mpsc::Receiver<Command>) -> Option<(StopReason, Duration)> {
    loop {
        match commands.recv().await? {
            Command::Stop { by, grace } => return Some((by, grace)),
            Command::Release => continue,
        }
    }
}

/// The exit code a shell gives for a command it cannot execute, where the
/// fault is the command's (the test's): 127 when it is not there, 126 when
/// it is there but cannot be run. None for the host's own failures (no
/// memory, no processes left), which stay infrastructure failures.
fn shell_code(e: &std::io::Error) -> Option<i32> {
    use nix::libc;
    match e.raw_os_error()? {
        libc::ENOENT | libc::ENOTDIR => Some(127),
        libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ELOOP | libc::ENAMETOOLONG | libc::EPERM => Some(126),
        _ => None,
    }
}

fn exit_of(exit: keeper::ExitStatus) -> Ended {
    match exit {
        keeper::ExitStatus::Code(c) => Ended::Exited(c),
        keeper::ExitStatus::Signal(s) => Ended::Signalled(SignalNo(s)),
        keeper::ExitStatus::Unknown => {
            Ended::SetupFailed { reason: ProcessReason::WaitFailed, message: "its keeper could not wait for it".into() }
        }
    }
}

/// What one output stream of a process came to.
#[derive(Debug, Default, Clone, Copy)]
struct Pumped {
    bytes: u64,
    truncated: bool,
}

/// Appends `data` at `offset` of `stream` (after `lost` bytes the spool no
/// longer had), retrying until the server has it (appends are idempotent
/// by offset). Returns whether the process is gone (nothing more is
/// taken) and whether the server truncated the stream.
async fn append_retrying(
    out: &mut impl OutputSink,
    (process, uid): (&str, &str),
    stream: i32,
    offset: u64,
    lost: u64,
    data: bytes::Bytes,
) -> (bool, bool) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let chunk = OutputChunk {
            process: process.to_string(),
            process_uid: uid.to_string(),
            stream,
            offset,
            data: data.clone(),
            lost,
            ..Default::default()
        };
        match out.append(chunk).await {
            Ok(t) => {
                let name = if stream == 1 { "stderr" } else { "stdout" };
                crate::metrics::metrics()
                    .output_bytes
                    .get_or_create(&crate::metrics::Stream { stream: name })
                    .inc_by(data.len() as u64);
                return (false, t);
            }
            // Gone, or already ended (its status was made final by someone
            // else), or another host's now (one of its name made since):
            // nothing more is taken.
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition | Code::PermissionDenied) => {
                return (true, false)
            }
            Err(s) => {
                tracing::debug!(%process, error = %s, "output append failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Uploads one stream from its keeper's spool as it grows (`ends` says how
/// far), deleting each segment once the server has it, until the stream's
/// final end. Bytes the spool lost (it was full while nobody read it) are
/// said to the server as lost.
async fn spool_pump(
    reader: keeper::SpoolReader,
    mut ends: tokio::sync::watch::Receiver<(u64, bool)>,
    mut out: impl OutputSink,
    process: String,
    progress: Option<keeper::client::Progress>,
) -> Pumped {
    let stream = i32::from(reader.stream);
    let (mut offset, mut truncated, mut deleted, mut stalls) = (0u64, false, 0u64, 0u32);
    loop {
        let (end, last) = *ends.borrow_and_update();
        while offset < end {
            let mut piece = reader.read(offset, end, CHUNK);
            if piece.stalled && piece.lost == 0 && piece.data.is_empty() {
                // A segment that is there but cannot be opened now (no
                // descriptors left...): tried again, for a while.
                stalls += 1;
                if stalls <= STALLS {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let next = (offset / keeper::SEGMENT + 1) * keeper::SEGMENT;
                piece.lost = next.min(end) - offset;
            }
            stalls = 0;
            let n = piece.lost + piece.data.len() as u64;
            if n == 0 {
                break;
            }
            let at = offset + piece.lost;
            let (gone, t) =
                append_retrying(&mut out, (&process, &reader.uid), stream, at, piece.lost, piece.data.into()).await;
            // The server marks what `lost` filled as truncated itself (and
            // ignores it for bytes it has: a restarted agent's first
            // uploads).
            truncated |= t;
            offset += n;
            if gone {
                return Pumped { bytes: offset, truncated };
            }
            if let Some(p) = &progress {
                p.uploaded(reader.stream, offset);
            }
            reader.remove_below(deleted, offset);
            deleted = offset - offset % keeper::SEGMENT;
        }
        if last || ends.changed().await.is_err() {
            return Pumped { bytes: offset.max(end), truncated };
        }
    }
}

/// How many times in a row a spool that cannot be read is tried again
/// (50 ms apart) before its bytes count as lost.
const STALLS: u32 = 100;

/// A process's two spool pumps.
struct SpoolPumps {
    ends: [tokio::sync::watch::Sender<(u64, bool)>; 2],
    pumps: [tokio::task::JoinHandle<Pumped>; 2],
}

impl SpoolPumps {
    fn start(
        spool: &std::path::Path,
        uid: &str,
        ends: [u64; 2],
        last: bool,
        sink: impl OutputSink + Clone,
        process: &str,
        progress: Option<keeper::client::Progress>,
    ) -> SpoolPumps {
        let start = |stream: u8| {
            let (tx, rx) = tokio::sync::watch::channel((ends[stream as usize], last));
            let reader = keeper::SpoolReader { spool: spool.to_path_buf(), uid: uid.to_string(), stream };
            (tx, tokio::spawn(spool_pump(reader, rx, sink.clone(), process.to_string(), progress.clone())))
        };
        let ((o, op), (e, ep)) = (start(0), start(1));
        SpoolPumps { ends: [o, e], pumps: [op, ep] }
    }

    fn advance(&self, stream: u8, end: u64) {
        if let Some(tx) = self.ends.get(stream as usize) {
            tx.send_if_modified(|(e, _)| {
                let grew = end > *e;
                *e = (*e).max(end);
                grew
            });
        }
    }

    /// The ends seen so far.
    fn seen(&self) -> [u64; 2] {
        [self.ends[0].borrow().0, self.ends[1].borrow().0]
    }

    /// Uploads up to the final `ends`; returns what each stream came to.
    /// The final status, reported after this, never lands before the
    /// output it counts.
    async fn finish(self, ends: [u64; 2]) -> (Pumped, Pumped) {
        for (tx, end) in self.ends.iter().zip(ends) {
            tx.send_replace((end, true));
        }
        let [o, e] = self.pumps;
        let (o, e) = tokio::join!(o, e);
        (o.unwrap_or_default(), e.unwrap_or_default())
    }
}

/// Where a pump appends output: the Output API, or a test's stand-in.
pub(crate) trait OutputSink: Send + 'static {
    /// Appends one chunk; answers whether the server truncated the stream.
    fn append(&mut self, chunk: OutputChunk) -> impl std::future::Future<Output = Result<bool, tonic::Status>> + Send;
}

impl OutputSink for testbus_proto::output_client::OutputClient<tonic::transport::Channel> {
    async fn append(&mut self, chunk: OutputChunk) -> Result<bool, tonic::Status> {
        testbus_proto::output_client::OutputClient::append(self, chunk).await.map(|r| r.into_inner().truncated)
    }
}

/// Moves a process on from Pending (to Fetching or Ready); later phases
/// are left alone.
async fn advance(api: &Api<Process>, known: &Known, to: ProcessPhase) {
    report(api, known, |p| {
        let from = p.status().phase.as_str();
        if from != ProcessPhase::Pending && !(from == ProcessPhase::Fetching && to == ProcessPhase::Ready) {
            return false;
        }
        p.status_mut().phase = to.into();
        true
    })
    .await
}

/// Ends a process that never ran (or whose run this agent cannot know),
/// unless its status is final already.
pub async fn end_unrun(
    api: &Api<Process>,
    p: &Process,
    to: ProcessPhase,
    reason: ProcessReason,
    message: &'static str,
) {
    report(api, &known(p.clone()), |p| {
        if phase::process_terminal(&p.status().phase) {
            return false;
        }
        let s = p.status_mut();
        s.phase = to.into();
        s.reason = reason.into();
        s.message = message.into();
        s.finish_time = time::now();
        true
    })
    .await
}

/// Applies `f` to the Process status until the API takes it. Gives up only
/// when the Process is gone or its status is already final.
pub async fn report(api: &Api<Process>, known: &Known, mut f: impl FnMut(&mut Process) -> bool + Send) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let copy = known.lock().clone();
        let name = copy.name().to_string();
        let uid = copy.meta().uid.clone();
        // Only this Process: one of the same name made since (a test's
        // next attempt names its processes alike) is another's, and its
        // status was once written with this one's end.
        let mut other = false;
        let only_mine = |p: &mut Process| {
            if p.meta().uid != uid {
                other = true;
                return false;
            }
            f(p)
        };
        match api.patch_status_from(&name, Some(copy), only_mine).await {
            Ok(_) if other => {
                tracing::debug!(process = %name, "status not written: the Process is gone (one of its name was made since)");
                return;
            }
            Ok(p) => {
                *known.lock() = p;
                return;
            }
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                tracing::debug!(process = %name, error = %s, "status not written");
                return;
            }
            // Never this agent's to write, however often it tries (a
            // Process of that name on another host): this one is gone.
            Err(s) if s.code() == Code::PermissionDenied => {
                tracing::warn!(process = %name, error = %s, "status not written");
                return;
            }
            Err(s) => {
                tracing::debug!(process = %name, error = %s, "status update failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{deliver, end_status, program_path, shell_code, unless_stopped, Command, Ended, SignalNo, StopReason};
    use std::path::PathBuf;
    use std::time::Duration;
    use testbus_proto::states::{ProcessPhase, ProcessReason};
    use tokio::sync::mpsc;

    /// Every way a process can end, as its status reads (the decision the
    /// runner writes).
    #[test]
    fn each_end_reads_as_its_status() {
        let st = |e: &Ended, codes: &[i32], why: &str| {
            let s = end_status(e, codes, why);
            (s.phase, s.reason, s.message, s.exit_code, s.signal)
        };
        let ok = (ProcessPhase::Succeeded, ProcessReason::Completed, String::new(), Some(0), None);
        assert_eq!(st(&Ended::Exited(0), &[], ""), ok);
        let failed = st(&Ended::Exited(3), &[], "");
        assert_eq!(failed, (ProcessPhase::Failed, ProcessReason::NonZeroExit, "exit code 3".into(), Some(3), None));
        assert_eq!(st(&Ended::Exited(3), &[0, 3], "").0, ProcessPhase::Succeeded, "a code the test names passes");
        assert_eq!(st(&Ended::Exited(0), &[3], "").0, ProcessPhase::Failed, "then 0 is not one");
        let missing = Ended::NotExecuted { code: 127, message: "nope: not found".into() };
        let (phase, reason, message, code, _) = st(&missing, &[], "");
        assert_eq!((phase, reason, code), (ProcessPhase::Failed, ProcessReason::NonZeroExit, Some(127)));
        assert_eq!(message, "nope: not found (exit code 127, as a shell's)");
        assert_eq!(st(&missing, &[127], "").0, ProcessPhase::Succeeded);
        let killed = st(&Ended::Signalled(SignalNo(9)), &[], "");
        assert_eq!((killed.0, killed.1, killed.4.is_some()), (ProcessPhase::Failed, ProcessReason::Signalled, true));
        let timed = st(&Ended::TimedOut { after: Duration::from_secs(90), signal: SignalNo(15) }, &[], "");
        assert_eq!((timed.0, timed.1), (ProcessPhase::Failed, ProcessReason::TimedOut));
        assert!(timed.2.starts_with("timed out after "), "{}", timed.2);
        let asked = Ended::Stopped { by: StopReason::Requested, signal: None };
        let stopped =
            (ProcessPhase::Killed, ProcessReason::Stopped, "stopped on request".into(), None, Some(String::new()));
        assert_eq!(st(&asked, &[], ""), stopped);
        assert_eq!(st(&asked, &[], "its test ended (Failed)").2, "stopped: its test ended (Failed)");
        let shut = st(&Ended::Stopped { by: StopReason::AgentShutdown, signal: Some(SignalNo(15)) }, &[], "x");
        assert_eq!(
            (shut.0, shut.1, shut.2.as_str()),
            (ProcessPhase::Killed, ProcessReason::AgentShutdown, "the agent shut down")
        );
        let setup = Ended::SetupFailed { reason: ProcessReason::FileFailed, message: "no blob".into() };
        assert_eq!(
            st(&setup, &[], ""),
            (ProcessPhase::Failed, ProcessReason::FileFailed, "no blob".into(), None, None)
        );
    }

    /// What cannot be executed is the command's fault, with a shell's
    /// codes; what the host lacks stays the host's.
    #[test]
    fn commands_that_cannot_be_executed_get_a_shells_exit_code() {
        let spawn = |p: &str| std::process::Command::new(p).spawn().unwrap_err();
        assert_eq!(shell_code(&spawn("/no/such/program")), Some(127));
        assert_eq!(shell_code(&spawn("no-such-program-on-path")), Some(127));
        assert_eq!(shell_code(&spawn("/etc")), Some(126));
        let plain = std::env::temp_dir().join(format!("not-executable-{}", std::process::id()));
        std::fs::write(&plain, "data").unwrap();
        assert_eq!(shell_code(&spawn(plain.to_str().unwrap())), Some(126));
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(shell_code(&std::io::Error::from_raw_os_error(nix::libc::EAGAIN)), None);
        assert_eq!(shell_code(&std::io::Error::from_raw_os_error(nix::libc::ENOMEM)), None);
    }

    /// A stop that came while a process's files were still being fetched
    /// was not seen: the process was spawned, then killed. The fetch is now
    /// dropped where it is.
    #[tokio::test(start_paused = true)]
    async fn a_stop_during_preparation_ends_it_before_the_process_starts() {
        let (tx, mut rx) = mpsc::channel(4);
        let spawned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = spawned.clone();
        let slow_fetch = async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            s.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, Ended>("command")
        };
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(Command::Release).await.unwrap();
            tx.send(Command::Stop { by: StopReason::Requested, grace: super::KILL_GRACE }).await.unwrap();
            tx
        });
        let mut released = false;
        let r = unless_stopped(slow_fetch, &mut rx, &mut released).await;
        assert_eq!(r, Err(Ended::Stopped { by: StopReason::Requested, signal: None }));
        assert!(released, "a release that came meanwhile is kept");
        assert!(!spawned.load(std::sync::atomic::Ordering::SeqCst), "the rest of the preparation never ran");
        // Without a stop, the preparation's result is the answer; an agent
        // shutting down (its channel gone) stops it too.
        let tx = stopper.await.unwrap();
        let mut released = false;
        let r = unless_stopped(async { Ok::<_, Ended>(7) }, &mut rx, &mut released).await;
        assert_eq!(r, Ok(7));
        drop(tx);
        let r = unless_stopped(std::future::pending::<Result<(), Ended>>(), &mut rx, &mut released).await;
        assert_eq!(r, Err(Ended::Stopped { by: StopReason::AgentShutdown, signal: None }));
    }

    /// Appends that take their time, recorded in order.
    #[derive(Clone, Default)]
    struct SlowSink(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl super::OutputSink for SlowSink {
        async fn append(&mut self, chunk: testbus_proto::OutputChunk) -> Result<bool, tonic::Status> {
            tokio::time::sleep(Duration::from_secs(30)).await;
            self.0.lock().extend_from_slice(&chunk.data);
            Ok(false)
        }
    }

    /// An append as recorded: its offset, the bytes it said were lost, its
    /// data.
    type Appended = (u64, u64, Vec<u8>);

    /// Appends recorded at once, with what each said was lost.
    #[derive(Clone, Default)]
    struct Quick(std::sync::Arc<parking_lot::Mutex<Vec<Appended>>>);

    impl super::OutputSink for Quick {
        async fn append(&mut self, chunk: testbus_proto::OutputChunk) -> Result<bool, tonic::Status> {
            self.0.lock().push((chunk.offset, chunk.lost, chunk.data.to_vec()));
            Ok(false)
        }
    }

    const UID: &str = "0b7c6f2e-0000-4000-8000-00000000000a";

    /// What the spool holds is uploaded before `finish` returns (and so
    /// before the final status, reported after it), however slow the
    /// server.
    #[tokio::test(start_paused = true)]
    async fn the_spool_is_uploaded_before_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = crate::keeper::SpoolWriter::new(dir.path(), UID, 0, 64 << 20);
        w.write(b"written before the end\n");
        let sink = SlowSink::default();
        let pumps = super::SpoolPumps::start(dir.path(), UID, [0, 0], false, sink.clone(), "p", None);
        pumps.advance(0, 10);
        let started = tokio::time::Instant::now();
        let (out, err) = pumps.finish([23, 0]).await;
        assert!(started.elapsed() >= Duration::from_secs(30), "returned before the upload finished");
        assert_eq!((out.bytes, err.bytes), (23, 0));
        assert_eq!(sink.0.lock().as_slice(), b"written before the end\n");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_some(), "the last segment stays for the keeper");
    }

    /// Segments the keeper dropped (its spool was full while nobody read
    /// it) reach the server as lost bytes before the data; uploaded
    /// segments are deleted.
    #[tokio::test]
    async fn bytes_the_spool_lost_are_said_to_be_lost() {
        let seg = crate::keeper::SEGMENT;
        let dir = tempfile::tempdir().unwrap();
        let mut w = crate::keeper::SpoolWriter::new(dir.path(), UID, 1, 2 * seg);
        let data: Vec<u8> = (0..4 * seg + 5).map(|i| (i % 7) as u8).collect();
        w.write(&data);
        let sink = Quick::default();
        let pumps = super::SpoolPumps::start(dir.path(), UID, [0, 0], false, sink.clone(), "p", None);
        let (_, err) = pumps.finish([0, w.end]).await;
        // Truncated is the server's word (it marks what `lost` filled); this
        // sink says nothing was.
        assert_eq!((err.bytes, err.truncated), (w.end, false));
        let got = sink.0.lock().clone();
        assert_eq!((got[0].0, got[0].1), (3 * seg, 3 * seg), "lost before the first data: {:?}", (got[0].0, got[0].1));
        let uploaded: Vec<u8> = got.iter().flat_map(|c| c.2.clone()).collect();
        assert_eq!(&uploaded[..], &data[(3 * seg) as usize..]);
        assert!(!crate::keeper::segment_path(dir.path(), UID, 1, 3).exists(), "an uploaded segment is deleted");
    }

    #[test]
    fn deliveries_into_one_directory_do_not_meet_and_planted_links_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let victim = src.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A link at the temporary name earlier agents used for both
        // app.conf and app.yaml (`with_extension`).
        let planted = dir.path().join(format!("app.testbus-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, planted).unwrap();
        // Two large files with the same stem, delivered at once, many times.
        let (a, b) = (src.path().join("a"), src.path().join("b"));
        std::fs::write(&a, vec![b'a'; 4 << 20]).unwrap();
        std::fs::write(&b, vec![b'b'; 4 << 20]).unwrap();
        for _ in 0..5 {
            std::thread::scope(|s| {
                s.spawn(|| deliver(&a, &dir.path().join("app.conf"), 0o640).unwrap());
                s.spawn(|| deliver(&b, &dir.path().join("app.yaml"), 0o755).unwrap());
            });
            assert!(std::fs::read(dir.path().join("app.conf")).unwrap().iter().all(|&c| c == b'a'));
            assert!(std::fs::read(dir.path().join("app.yaml")).unwrap().iter().all(|&c| c == b'b'));
        }
        let mode = |n: &str| std::fs::metadata(dir.path().join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("app.conf"), mode("app.yaml")), (0o640, 0o755));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o600);
        // A failed delivery leaves no temporary file behind.
        assert!(deliver(&src.path().join("missing"), &dir.path().join("x"), 0o644).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".testbus-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn programs_are_found_in_the_process_path() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let path = format!("/nonexistent::{}:/bin", dir.path().display());
        // Not executable: skipped, as exec would.
        assert_eq!(program_path("plain", Some(path.as_str())), PathBuf::from("plain"));
        assert_eq!(program_path("sh", Some(path.as_str())), PathBuf::from("/bin/sh"));
        assert_eq!(program_path("./x", Some(path.as_str())), PathBuf::from("./x"));
        assert_eq!(program_path("no-such-program", Some(path.as_str())), PathBuf::from("no-such-program"));
        assert_eq!(program_path("sh", None), PathBuf::from("sh"));
    }
}
