//! `ProcessRunner`: one Process on this host, as a small state machine with
//! its own command channel.
//!
//! Preparing (workdir, `${}` substitution, script file) → Running (own
//! process group; stdout/stderr streamed in chunks as they come) → Ended.
//! Every way to end is an [`Ended`] variant, mapped to exactly one final
//! status. Stop and timeout kill the whole process group (TERM, then KILL
//! after a grace period); leftovers of the group are killed when the main
//! process exits. All output is uploaded before the final status is
//! reported, so a terminal status means the output is complete.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use testbus_client::{Api, Client};
use testbus_proto::states::{ProcessPhase, ProcessReason};
use testbus_proto::{duration, phase, subst, time, OutputChunk, Process, Resource};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Code;

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
/// How long to wait for output pipes after the process group is gone.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Bytes a pump still takes from its pipe once stopped (what a pipe holds,
/// with room to spare).
const AFTER_STOP: usize = 1 << 20;
/// Largest output append: what the pipe holds is gathered up to this size,
/// so a fast writer costs one RPC per MiB rather than per pipe buffer.
const CHUNK: usize = 1 << 20;
/// The first read's buffer: enough for what most processes ever write.
const FIRST_READ: usize = 16 << 10;

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

fn kill_group(pgid: i32, sig: nix::sys::signal::Signal) {
    // ESRCH (group already gone) is fine.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
}

impl ProcessRunner {
    pub async fn run(self, mut commands: mpsc::Receiver<Command>) {
        let name = self.process.name().to_string();
        let api = self.client.api::<Process>();
        let prepare = async {
            let (vars, fetched) = tokio::join!(self.host_vars(), self.fetch(&api));
            match (vars, fetched) {
                (Ok(vars), Ok((files, stdin))) => {
                    self.prepare(&vars, self.socket.as_ref().map(|s| s.path.as_path()), &files, stdin).await
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        };
        let mut released = false;
        let prepared = unless_stopped(prepare, &mut commands, &mut released).await;
        let (ended, sizes, started) = match prepared {
            Err(e) => (e, Default::default(), None),
            Ok(cmd) => match self.gate(&api, &mut commands, released).await {
                Some(by) => (Ended::Stopped { by, signal: None }, Default::default(), None),
                None => self.execute(cmd, &mut commands).await,
            },
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
        // Its end is on the server: a successor has nothing left to end or
        // to refuse to run again.
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
    ) -> Result<tokio::process::Command, Ended> {
        let spec = self.process.spec();
        // What the agent adds on top of the process's own env.
        let mut added = BTreeMap::new();
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
        // With a PID namespace per process, the agent's own binary starts
        // the command inside it (see `pidns`).
        let command = |program: &std::ffi::OsStr| match &self.containment {
            crate::containment::Containment::PidNamespace { agent } => {
                let mut c = tokio::process::Command::new(agent.as_path());
                c.arg(crate::pidns::SUBCOMMAND).arg(program);
                c
            }
            _ => tokio::process::Command::new(program),
        };
        let mut cmd = if !spec.script.is_empty() {
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
                command(path.as_os_str())
            } else {
                let mut c = command("/bin/sh".as_ref());
                c.arg(&path);
                c
            }
        } else if spec.shell {
            let mut c = command("/bin/sh".as_ref());
            c.arg("-c").arg(argv.join(" "));
            c
        } else {
            let mut c = command(program_path(&argv[0], env.get("PATH")).as_os_str());
            c.args(&argv[1..]);
            c
        };
        let cwd = if spec.workdir.is_empty() { workdir } else { PathBuf::from(&spec.workdir) };
        cmd.current_dir(cwd)
            .env_clear()
            .envs(env.settings())
            .process_group(0)
            .stdin(match &stdin_file {
                Some(p) => std::fs::File::open(p).map(Stdio::from).map_err(|e| Ended::SetupFailed {
                    reason: ProcessReason::FileFailed,
                    message: format!("stdin file: {e}"),
                })?,
                None if spec.stdin.is_empty() && !spec.stdin_stream => Stdio::null(),
                None => Stdio::piped(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd)
    }

    /// Puts `cmd` in its containment: its own cgroup (made here, joined
    /// between fork and exec), or a PID namespace of its own; without
    /// cgroups, the process's group file says it started. An error names
    /// what could not be made.
    fn contain(&self, cmd: &mut tokio::process::Command) -> Result<Option<crate::containment::ProcessCgroup>, String> {
        let cgroup = match self.containment.cgroups() {
            Some(root) => {
                let cg = root
                    .create_for(&self.process.meta().uid)
                    .map_err(|e| format!("cannot create the process's cgroup: {e}"))?;
                // SAFETY: the closure runs in the child between fork and
                // exec; it only writes to a file already open (one
                // write(2), async-signal-safe, no allocation or lock).
                #[allow(unsafe_code)]
                unsafe {
                    cmd.pre_exec(cg.joiner());
                }
                Some(cg)
            }
            None => None,
        };
        if let crate::containment::Containment::PidNamespace { .. } = self.containment {
            // SAFETY: the closure runs in the child between fork and exec;
            // it makes one syscall (unshare), async-signal-safe.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(crate::pidns::unsharer());
            }
        }
        // Started, as far as a successor can tell even without the journal
        // (a group file names no group until the child exists): a uid
        // with a group file is never spawned again. Without cgroups this
        // is what keeps "at most once" when the journal's record is lost.
        if cgroup.is_none() {
            let none = crate::journal::Group { pgid: 0, start_ticks: 0 };
            if let Err(e) = crate::journal::Journal::record_group_file(&self.journal, &self.process.meta().uid, none) {
                let name = self.process.name();
                tracing::warn!(process = %name, error = %e, "cannot record the process as started in its group file");
            }
        }
        Ok(cgroup)
    }

    /// Records the process group led by `pid` in the journal and in the
    /// process's group file. Read before anything can reap the child: the
    /// leader's start time is what lets a successor prove the group is
    /// still this one.
    fn record_group(&self, pid: i32) {
        let name = self.process.name();
        let Some(group) = crate::journal::Group::of_leader(pid) else {
            tracing::debug!(process = %name, pid, "ended before its group could be recorded");
            return;
        };
        let uid = &self.process.meta().uid;
        if let Err(e) = crate::journal::Journal::record_group(&self.journal, uid, group) {
            tracing::warn!(process = %name, error = %e, "cannot record the process group in the journal");
        }
        if let Err(e) = crate::journal::Journal::record_group_file(&self.journal, uid, group) {
            tracing::warn!(process = %name, error = %e, "cannot record the process group in its file");
        }
    }

    async fn execute(
        &self,
        mut cmd: tokio::process::Command,
        commands: &mut mpsc::Receiver<Command>,
    ) -> (Ended, (Pumped, Pumped), Option<(i64, String)>) {
        let name = self.process.name().to_string();
        let spec = self.process.spec();
        let setup_failed = |reason, message| (Ended::SetupFailed { reason, message }, Default::default(), None);
        let cgroup = match self.contain(&mut cmd) {
            Ok(cg) => cg,
            Err(message) => return setup_failed(ProcessReason::ContainFailed, message),
        };
        let spawning = tokio::time::Instant::now();
        let mut child = {
            let mut tries = 0;
            loop {
                match cmd.spawn() {
                    Ok(c) => break c,
                    // A script just written can be briefly "busy" if another
                    // thread forked while it was open for writing.
                    Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 20 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => {
                        if let Some(cg) = &cgroup {
                            cg.end().await;
                        }
                        let what = spec.argv.first().map(String::as_str).unwrap_or("script");
                        let message = format!("cannot execute {what}: {e}");
                        let Some(code) = shell_code(&e) else {
                            return setup_failed(ProcessReason::SpawnFailed, message);
                        };
                        // Said on its stderr too, as a shell (and the
                        // PID-namespace path) says it.
                        let said = std::io::Cursor::new(format!("testbus: {message}\n").into_bytes());
                        let pumps =
                            OutputPumps::start(None::<tokio::io::Empty>, Some(said), self.client.output(), &name);
                        let sizes = pumps.drain(DRAIN_LIMIT, &name).await;
                        return (Ended::NotExecuted { code, message }, sizes, None);
                    }
                }
            }
        };
        crate::metrics::metrics().spawn_seconds.observe(spawning.elapsed().as_secs_f64());
        let _running = crate::metrics::Running::start();
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        // Its cgroup (or group) speaks for it on the local socket until it
        // is gone.
        let _speaks = self.socket.as_ref().map(|s| s.register(pid, &self.process.meta().uid, name.clone()));
        self.record_group(pid);
        let contained = Contained {
            pgid: pid,
            cgroup: cgroup.as_ref(),
            relay: matches!(self.containment, crate::containment::Containment::PidNamespace { .. }),
        };
        let api = self.client.api::<Process>();
        let start = time::now();
        let running = report_running_later(api.clone(), self.known.clone(), pid, start.clone());
        let feeder = match child.stdin.take() {
            Some(stdin) if spec.stdin_stream => {
                Some(tokio::spawn(feed_stdin(self.client.clone(), name.clone(), stdin)))
            }
            Some(mut stdin) => {
                let data = spec.stdin.clone().into_bytes();
                tokio::spawn(async move {
                    let _ = stdin.write_all(&data).await;
                });
                None
            }
            None => None,
        };
        // Larger pipes (1 MiB, the default limit) mean fewer, larger reads
        // and appends for a process that writes fast; best effort.
        use std::os::fd::AsFd;
        let pipes = [child.stdout.as_ref().map(AsFd::as_fd), child.stderr.as_ref().map(AsFd::as_fd)];
        for fd in pipes.into_iter().flatten() {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        }
        let pumps = OutputPumps::start(child.stdout.take(), child.stderr.take(), self.client.output(), &name);
        let timeout = duration::parse(&spec.timeout).ok();
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            st = child.wait() => match st {
                Ok(st) => exit_of(st),
                Err(e) => Ended::SetupFailed { reason: ProcessReason::WaitFailed, message: e.to_string() },
            },
            _ = deadline => {
                let signal = terminate(&mut child, &contained, stop_grace(spec)).await;
                Ended::TimedOut { after: timeout.unwrap_or_default(), signal }
            }
            Some((by, grace)) = stop_requested(commands) => {
                let signal = terminate(&mut child, &contained, grace).await;
                Ended::Stopped { by, signal: Some(signal) }
            }
        };
        if let Some(f) = feeder {
            f.abort();
        }
        // Whatever the main process left behind goes too.
        contained.end().await;
        let sizes = pumps.drain(DRAIN_LIMIT, &name).await;
        // A Running report not done yet is dropped; if it lands anyway, the
        // final report meets a conflict and reads again, or the server
        // refuses the Running one, the status being final by then.
        running.abort();
        let _ = running.await;
        (ended, sizes, Some((i64::from(pid), start)))
    }
}

/// Writes what the process's test sends to its stdin as it comes (its
/// stdin log, read with follow), then closes it: once the stdin is closed
/// (`spec.stdinClosed`) and all of it written, or the process stops
/// reading. A broken read is resumed, skipping what was written, with a
/// backoff; the task lives no longer than the process (its runner aborts
/// it at the end).
async fn feed_stdin(client: Client, process: String, mut stdin: tokio::process::ChildStdin) {
    let mut written = 0u64;
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
                            let skip = written.saturating_sub(c.offset) as usize;
                            if stdin.write_all(&c.data[skip..]).await.is_err() {
                                return; // it closed its stdin
                            }
                            written = end;
                            backoff = Duration::from_millis(50);
                        }
                        // Closed, or the process ended: end of file.
                        Ok(None) => return,
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

fn exit_of(st: std::process::ExitStatus) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => Ended::Exited(c),
        (None, Some(s)) => Ended::Signalled(SignalNo(s)),
        // Neither an exit nor a signal: std says this cannot be on Linux.
        (None, None) => Ended::Signalled(SignalNo(0)),
    }
}

/// Everything a running process may have started: its process group and,
/// where cgroups can be had, its cgroup (which holds all of it); or, with a
/// PID namespace per process, the relay that holds its namespace.
struct Contained<'a> {
    pgid: i32,
    cgroup: Option<&'a crate::containment::ProcessCgroup>,
    /// `pgid` is the relay of a PID namespace (see `pidns`): it passes
    /// signals on to everything inside, and all of it ends with the relay.
    relay: bool,
}

impl Contained<'_> {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        // A pgid of 0 or 1 would mean "our own group" or "everyone".
        if self.pgid <= 1 {
        } else if self.relay {
            // Once, to the relay: it reaches each process inside once.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pgid), sig);
        } else {
            kill_group(self.pgid, sig);
        }
        if let Some(cg) = self.cgroup {
            cg.signal(sig);
        }
    }

    /// Kills what is left (all of the cgroup at once, or the group) and
    /// removes the cgroup. A PID namespace is gone already: the relay, just
    /// reaped, exits only after its init, whose exit ends the namespace.
    async fn end(&self) {
        match self.cgroup {
            Some(cg) => cg.end().await,
            None if self.pgid > 1 && !self.relay => kill_group(self.pgid, nix::sys::signal::Signal::SIGKILL),
            None => {}
        }
    }
}

/// TERM everything, KILL it after `grace`; returns the signal that ended
/// the main process.
async fn terminate(child: &mut tokio::process::Child, contained: &Contained<'_>, grace: Duration) -> SignalNo {
    use nix::sys::signal::Signal;
    contained.signal(Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(st)) => match exit_of(st) {
            Ended::Signalled(s) => s,
            _ => SignalNo::TERM,
        },
        _ => {
            contained.signal(Signal::SIGKILL);
            let _ = child.wait().await;
            SignalNo::KILL
        }
    }
}

/// What one output stream of a process came to.
#[derive(Debug, Default, Clone, Copy)]
struct Pumped {
    bytes: u64,
    truncated: bool,
}

/// Reads into `buf`'s spare capacity (never past it), without zeroing it.
async fn read_spare(r: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use bytes::BufMut;
    let room = buf.capacity() - buf.len();
    r.read_buf(&mut buf.limit(room)).await
}

/// Streams one pipe to the control plane. Retries until the server has
/// each chunk (appends are idempotent by offset), so nothing is lost while
/// the API is unreachable.
///
/// Reading and sending overlap: while one chunk is being appended, the
/// next is read from the pipe, so a fast writer does not wait for the
/// server's answer with a full pipe. Appends stay one at a time, in order.
/// Memory is bounded by one chunk being sent and one read ahead; beyond
/// that the pipe's back-pressure holds the writer.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    mut out: impl OutputSink,
    process: String,
    stream: i32,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Pumped {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
    let read = async move {
        // Most processes write little or nothing: a chunk's buffer starts
        // small and is CHUNK only after one that filled its buffer (never
        // zeroed: reads go into spare capacity). Each chunk is moved into
        // its append, not copied.
        let mut size = FIRST_READ;
        // Once stopped: bytes still taken from the pipe, at most AFTER_STOP.
        let mut stopped: Option<usize> = None;
        loop {
            let mut buf: Vec<u8> = Vec::with_capacity(size);
            if let Some(taken) = &mut stopped {
                // What is in the pipe already is still taken (a process that
                // printed and exited must not lose it to a drain limit cut
                // short, as by a guest's clock jumping on a snapshot
                // revert); nothing more is waited for, and a writer that
                // keeps writing is cut off after AFTER_STOP bytes. (No timer
                // here: right after a revert a guest's timers can all fire at
                // once, and a read given a timeout then read nothing.)
                match futures::FutureExt::now_or_never(read_spare(&mut r, &mut buf)) {
                    Some(Ok(m)) if m > 0 && *taken < AFTER_STOP => *taken += m,
                    _ => return,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = &mut stop => {
                        stopped = Some(0);
                        continue;
                    }
                    n = read_spare(&mut r, &mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            }
            // Whatever else is already in the pipe goes in the same append
            // (a read that would wait is dropped; pipe reads are cancel-safe).
            while buf.len() < buf.capacity() {
                match futures::FutureExt::now_or_never(read_spare(&mut r, &mut buf)) {
                    Some(Ok(m)) if m > 0 => {}
                    _ => break,
                }
            }
            if buf.len() == buf.capacity() {
                size = CHUNK;
            }
            if tx.send(buf).await.is_err() {
                return;
            }
        }
    };
    let send = async move {
        let mut offset = 0u64;
        let mut truncated = false;
        let mut gone = false;
        while let Some(data) = rx.recv().await {
            let n = data.len() as u64;
            // Shared, not copied, by each attempt.
            let data = bytes::Bytes::from(data);
            let mut backoff = Duration::from_millis(50);
            while !gone {
                let chunk =
                    OutputChunk { process: process.clone(), stream, offset, data: data.clone(), ..Default::default() };
                match out.append(chunk).await {
                    Ok(t) => {
                        truncated |= t;
                        let stream = if stream == 1 { "stderr" } else { "stdout" };
                        crate::metrics::metrics()
                            .output_bytes
                            .get_or_create(&crate::metrics::Stream { stream })
                            .inc_by(n);
                        break;
                    }
                    // Gone, or already ended (its status was made final by
                    // someone else): nothing more is taken.
                    Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => gone = true,
                    Err(s) => {
                        tracing::debug!(%process, error = %s, "output append failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            offset += n;
        }
        Pumped { bytes: offset, truncated }
    };
    tokio::join!(read, send).1
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

/// A process's stdout and stderr pumps, from spawn to drain.
struct OutputPumps {
    pumps: [Option<(tokio::task::JoinHandle<Pumped>, tokio::sync::oneshot::Sender<()>)>; 2],
}

impl OutputPumps {
    fn start<S: OutputSink + Clone>(
        stdout: Option<impl AsyncRead + Unpin + Send + 'static>,
        stderr: Option<impl AsyncRead + Unpin + Send + 'static>,
        sink: S,
        process: &str,
    ) -> OutputPumps {
        let start = |r: Box<dyn AsyncRead + Unpin + Send>, stream| {
            let (stop, stop_rx) = tokio::sync::oneshot::channel();
            (tokio::spawn(pump(r, sink.clone(), process.to_string(), stream, stop_rx)), stop)
        };
        let out = stdout.map(|r| start(Box::new(r), 0));
        let err = stderr.map(|r| start(Box::new(r), 1));
        OutputPumps { pumps: [out, err] }
    }

    /// Waits for both pipes to close, at most `limit`. Past it (something
    /// outside the process's containment holds a pipe), reading stops, but
    /// what was read is still uploaded before this returns: the final
    /// status, reported after it, never lands before the output it counts.
    async fn drain(self, limit: Duration, process: &str) -> (Pumped, Pumped) {
        let [mut out, mut err] = self.pumps;
        let (mut out_done, mut err_done) = (None, None);
        let drained = async {
            if let Some((h, _)) = &mut out {
                out_done = Some(h.await.unwrap_or_default());
            }
            if let Some((h, _)) = &mut err {
                err_done = Some(h.await.unwrap_or_default());
            }
        };
        if tokio::time::timeout(limit, drained).await.is_err() {
            tracing::warn!(%process, "output pipes still open after the process ended; reading stops");
        }
        async fn finish(
            done: Option<Pumped>,
            pump: Option<(tokio::task::JoinHandle<Pumped>, tokio::sync::oneshot::Sender<()>)>,
        ) -> Pumped {
            match (done, pump) {
                (Some(p), _) => p,
                (None, Some((h, stop))) => {
                    let _ = stop.send(());
                    h.await.unwrap_or_default()
                }
                (None, None) => Pumped::default(),
            }
        }
        let (o, e) = tokio::join!(finish(out_done, out), finish(err_done, err));
        (o, e)
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
        match api.patch_status_from(&name, Some(copy), &mut f).await {
            Ok(p) => {
                *known.lock() = p;
                return;
            }
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                tracing::debug!(process = %name, error = %s, "status not written");
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

    /// A pump stopped (the drain limit passed) still takes what is in the
    /// pipe already: a process that printed and exited lost its output
    /// when the limit was cut short.
    #[tokio::test]
    async fn a_stopped_pump_still_takes_what_the_pipe_holds() {
        use tokio::io::AsyncWriteExt;
        let (mut held, stdout) = tokio::io::duplex(1 << 16);
        held.write_all(b"one\n").await.unwrap();
        let sink = SlowSink::default();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        stop.send(()).unwrap();
        let pumped = super::pump(stdout, Quick(sink.0.clone()), "p".into(), 0, stop_rx).await;
        assert_eq!(pumped.bytes, 4);
        assert_eq!(&sink.0.lock()[..], b"one\n");
        drop(held);
    }

    /// The same with a real pipe whose writer has exited: the reactor has
    /// not yet said the pipe is readable when the pump is already stopped
    /// (a snapshot revert's clock jump ends the drain limit at once), and
    /// what the process printed must still be taken. A reverted guest's
    /// `cat` once printed nothing, exit 0.
    #[tokio::test]
    async fn a_stopped_pump_takes_what_an_exited_process_left_in_its_pipe() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "echo one"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        assert!(child.wait().await.unwrap().success());
        let sink = Quick(Default::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        stop.send(()).unwrap();
        let pumped = super::pump(stdout, sink.clone(), "p".into(), 0, stop_rx).await;
        assert_eq!(&sink.0.lock()[..], b"one\n");
        assert_eq!(pumped.bytes, 4);
    }

    /// Appends recorded at once.
    #[derive(Clone)]
    struct Quick(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl super::OutputSink for Quick {
        async fn append(&mut self, chunk: testbus_proto::OutputChunk) -> Result<bool, tonic::Status> {
            self.0.lock().extend_from_slice(&chunk.data);
            Ok(false)
        }
    }

    /// When something outside the process holds its stdout open past the
    /// drain limit, reading stops, but what was read is uploaded before the
    /// drain returns (and so before the final status). The pumps used to be
    /// left to finish on their own, after the status had landed.
    #[tokio::test(start_paused = true)]
    async fn past_the_drain_limit_what_was_read_is_uploaded_before_the_end() {
        use tokio::io::AsyncWriteExt;
        let (mut held, stdout) = tokio::io::duplex(1 << 16);
        let (stderr_w, stderr) = tokio::io::duplex(1 << 16);
        drop(stderr_w);
        held.write_all(b"written before the end\n").await.unwrap();
        let sink = SlowSink::default();
        let pumps = super::OutputPumps::start(Some(stdout), Some(stderr), sink.clone(), "p");
        let started = tokio::time::Instant::now();
        let (out, err) = pumps.drain(Duration::from_secs(10), "p").await;
        assert!(started.elapsed() >= Duration::from_secs(30), "returned before the upload finished");
        assert_eq!(out.bytes, 23);
        assert_eq!(err.bytes, 0);
        assert_eq!(sink.0.lock().as_slice(), b"written before the end\n");
        // Held open all along: the reader is gone, not waiting on it.
        assert!(held.write_all(b"later").await.is_err());
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
