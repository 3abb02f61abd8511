//! The agent's side of its keepers: finding what predecessors left,
//! starting a keeper of its own build, and one handle per held process.
use super::{Event, ExitLog, ExitRecord, HeldState, Request, SpawnSpec, SpawnStage, PROTOCOL, SUBCOMMAND};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a keeper has to answer a connection, and a new one to listen.
const ANSWER: Duration = Duration::from_secs(5);
/// How long a keeper has to say whether it started a process (a fork and
/// an exec: milliseconds, unless it is wedged).
const SPAWN_ANSWER: Duration = Duration::from_secs(30);

/// One connection to one keeper.
pub struct KeeperLink {
    pub dir: PathBuf,
    pub build: String,
    pub pid: u32,
    requests: mpsc::UnboundedSender<Request>,
    /// Where each held process's events go.
    routes: Mutex<HashMap<String, Arc<Route>>>,
    /// It starts new processes (said at hello).
    pub accepting: bool,
    /// The keeper closed the connection (it exited, or died).
    pub gone: CancellationToken,
}

impl KeeperLink {
    /// Connects and says hello; returns what the keeper holds, each with
    /// the receiver of its events (routed from now on).
    async fn connect(
        dir: &Path,
    ) -> std::io::Result<(Arc<KeeperLink>, Vec<(HeldState, (Arc<Route>, mpsc::UnboundedReceiver<Event>))>)> {
        let stream = tokio::net::UnixStream::connect(dir.join("sock")).await?;
        let (rd, mut wr) = stream.into_split();
        let mut hello = serde_json::to_vec(&Request::Hello { protocol: PROTOCOL }).map_err(std::io::Error::other)?;
        hello.push(b'\n');
        wr.write_all(&hello).await?;
        let mut rd = tokio::io::BufReader::new(rd);
        let first = tokio::time::timeout(ANSWER, read_line(&mut rd))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the keeper did not answer"))??;
        let Some(Event::Welcome { protocol, build, pid, held, accepting }) = first else {
            return Err(std::io::Error::other("the keeper did not welcome this agent (another protocol?)"));
        };
        if protocol != PROTOCOL {
            return Err(std::io::Error::other(format!("the keeper speaks protocol {protocol}, not {PROTOCOL}")));
        }
        let (requests, mut to_send) = mpsc::unbounded_channel::<Request>();
        let link = Arc::new(KeeperLink {
            dir: dir.to_path_buf(),
            build,
            pid,
            requests,
            routes: Mutex::new(HashMap::new()),
            accepting,
            gone: CancellationToken::new(),
        });
        let held = held.into_iter().map(|h| (link.route(&h.uid), h)).map(|(rx, h)| (h, rx)).collect();
        let gone = link.gone.clone();
        let sender = Arc::downgrade(&link);
        tokio::spawn(async move {
            let mut wr = tokio::io::BufWriter::new(wr);
            while let Some(req) = to_send.recv().await {
                let mut line = serde_json::to_vec(&req).unwrap_or_default();
                if line.len() >= super::MAX_LINE {
                    // Never sent: the keeper would close the connection on
                    // it, and with it every process it holds.
                    if let (Request::Spawn(spec), Some(link)) = (&req, sender.upgrade()) {
                        let message = format!(
                            "its command, env and files come to {} bytes, more than a keeper takes",
                            line.len()
                        );
                        let failed = Event::SpawnFailed {
                            uid: spec.uid.clone(),
                            stage: SpawnStage::Keeper,
                            errno: None,
                            message,
                        };
                        let route = link.routes.lock().get(&spec.uid).cloned();
                        if let Some(route) = route {
                            route.deliver(failed);
                        }
                    }
                    continue;
                }
                line.push(b'\n');
                if wr.write_all(&line).await.is_err() || (to_send.is_empty() && wr.flush().await.is_err()) {
                    break;
                }
            }
            gone.cancel();
        });
        let reader = Arc::downgrade(&link);
        let gone = link.gone.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = read_line(&mut rd) => ev,
                    _ = gone.cancelled() => break,
                };
                let Ok(Some(ev)) = ev else { break };
                let Some(link) = reader.upgrade() else { break };
                let Some(uid) = ev.uid() else { continue };
                let route = link.routes.lock().get(uid).cloned();
                if let Some(route) = route {
                    route.deliver(ev);
                }
            }
            gone.cancel();
        });
        Ok((link, held))
    }

    fn route(&self, uid: &str) -> (Arc<Route>, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let route = Arc::new(Route { tx, ends: Default::default(), pending: Default::default() });
        self.routes.lock().insert(uid.to_string(), route.clone());
        (route, rx)
    }

    fn send(&self, req: Request) {
        let _ = self.requests.send(req);
    }
}

/// Where one process's events go. Output events are coalesced: at most
/// one per stream waits in the channel, and it says the latest end when
/// taken (a process not followed yet, its agent still listing, costs no
/// memory per write).
struct Route {
    tx: mpsc::UnboundedSender<Event>,
    ends: [std::sync::atomic::AtomicU64; 2],
    pending: [std::sync::atomic::AtomicBool; 2],
}

impl Route {
    fn deliver(&self, ev: Event) {
        use std::sync::atomic::Ordering;
        if let Event::Output { stream, end, .. } = &ev {
            let i = *stream as usize & 1;
            self.ends[i].fetch_max(*end, Ordering::AcqRel);
            if self.pending[i].swap(true, Ordering::AcqRel) {
                return;
            }
        }
        let _ = self.tx.send(ev);
    }

    /// An event as taken: an Output says the latest end.
    fn taken(&self, mut ev: Event) -> Event {
        use std::sync::atomic::Ordering;
        if let Event::Output { stream, end, .. } = &mut ev {
            let i = *stream as usize & 1;
            self.pending[i].store(false, Ordering::Release);
            *end = (*end).max(self.ends[i].load(Ordering::Acquire));
        }
        ev
    }
}

/// One event line; None at the end of the connection.
async fn read_line(rd: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> std::io::Result<Option<Event>> {
    let mut line = Vec::new();
    let n = rd.take(super::MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::other("a keeper's line too long, or cut short"));
    }
    serde_json::from_slice(&line).map(Some).map_err(std::io::Error::other)
}

/// A process held by a live keeper: its events, and what can be asked.
pub struct Held {
    link: Arc<KeeperLink>,
    pub uid: String,
    route: Arc<Route>,
    events: mpsc::UnboundedReceiver<Event>,
    pub pid: i32,
    pub start_ticks: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.link.routes.lock().remove(&self.uid);
    }
}

impl Held {
    /// Where its keeper spools its output.
    pub fn spool(&self) -> PathBuf {
        self.link.dir.join("spool")
    }

    /// The next event; None once the keeper is gone (after every event it
    /// sent before going).
    pub async fn next(&mut self) -> Option<Event> {
        let ev = tokio::select! {
            biased;
            ev = self.events.recv() => ev,
            _ = self.link.gone.cancelled() => self.events.try_recv().ok(),
        };
        ev.map(|e| self.route.taken(e))
    }

    /// Tells the keeper how far the server has each stream (see
    /// `Request::Uploaded`).
    pub fn progress(&self) -> Progress {
        Progress { link: self.link.clone(), uid: self.uid.clone() }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.link.send(Request::Signal { uid: self.uid.clone(), signal: sig as i32 });
    }

    pub fn stdin(&self) -> StdinWriter {
        StdinWriter { link: self.link.clone(), uid: self.uid.clone() }
    }

    /// Its end is reported: the keeper may let go of it.
    pub fn forget(&self) {
        self.link.send(Request::Forget { uid: self.uid.clone() });
    }
}

/// Tells a keeper what the server has of a process's output.
#[derive(Clone)]
pub struct Progress {
    link: Arc<KeeperLink>,
    uid: String,
}

impl Progress {
    pub fn uploaded(&self, stream: u8, upto: u64) {
        self.link.send(Request::Uploaded { uid: self.uid.clone(), stream, upto });
    }
}

/// Sends a process's stdin through its keeper.
#[derive(Clone)]
pub struct StdinWriter {
    link: Arc<KeeperLink>,
    uid: String,
}

impl StdinWriter {
    /// Sends `data` for `offset` on, in pieces a request line holds.
    pub fn write(&self, offset: u64, data: &[u8]) {
        for (i, piece) in data.chunks(super::STDIN_PIECE).enumerate() {
            let at = offset + (i * super::STDIN_PIECE) as u64;
            self.link.send(Request::Stdin { uid: self.uid.clone(), offset: at, data: hex::encode(piece) });
        }
    }

    pub fn close(&self) {
        self.link.send(Request::CloseStdin { uid: self.uid.clone() });
    }
}

/// Why a keeper did not start a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    pub stage: SpawnStage,
    pub errno: Option<i32>,
    pub message: String,
    /// The keeper went away after it was asked: the process may have
    /// started, and what is left of it must be ended.
    pub maybe_started: bool,
}

/// A dead keeper's directory, removed when the last process read from it
/// has been reported.
pub struct DeadDir(PathBuf);

impl Drop for DeadDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process a predecessor's keeper holds (or a dead keeper recorded the
/// end of).
pub enum Adopted {
    Live(Held, HeldState),
    Dead { spool: PathBuf, record: ExitRecord, _dir: Arc<DeadDir> },
}

/// Whether the keeper of `dir` lives: its pid file names a process that
/// started when it says.
fn alive(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("pid")) else { return false };
    let Some((pid, ticks)) = text.trim().split_once(' ') else { return false };
    let (Ok(pid), Ok(ticks)) = (pid.parse::<i32>(), ticks.parse::<u64>()) else { return false };
    // A zombie (its parent has not reaped it) is dead.
    pid > 1 && crate::journal::ProcStat::read(pid).is_some_and(|s| s.start_ticks == ticks && s.state != 'Z')
}

/// Moves a dead keeper's exit log to `ROOT/../quarantine/exits-ID`.
fn quarantine(root: &Path, dir: &Path) -> PathBuf {
    let q = root.with_file_name("quarantine");
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let to = q.join(format!("exits-{id}"));
    if let Err(e) = testbus_pki::private_dir(&q)
        .map_err(std::io::Error::other)
        .and_then(|_| std::fs::rename(dir.join("exits"), &to))
    {
        tracing::warn!(error = %e, "cannot quarantine the exit log");
    }
    to
}

/// This agent's keepers.
pub struct Keepers {
    root: PathBuf,
    exe: PathBuf,
    orphan: Duration,
    build: String,
    current: tokio::sync::Mutex<Option<Arc<KeeperLink>>>,
}

impl Keepers {
    /// Finds every keeper under `root`: live ones give what they hold (one
    /// of this agent's build becomes the current keeper, the others retire);
    /// dead ones what their exit logs recorded.
    pub async fn open(
        root: &Path,
        exe: &Path,
        orphan: Duration,
    ) -> std::io::Result<(Keepers, HashMap<String, Adopted>)> {
        testbus_pki::private_dir(root).map_err(std::io::Error::other)?;
        let keepers = Keepers {
            root: root.to_path_buf(),
            exe: exe.to_path_buf(),
            orphan,
            build: super::build(),
            current: tokio::sync::Mutex::new(None),
        };
        let mut adopted = HashMap::new();
        let mut current = None;
        for e in std::fs::read_dir(root)?.flatten() {
            let dir = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match KeeperLink::connect(&dir).await {
                Ok((link, held)) => {
                    tracing::info!(keeper = %dir.display(), pid = link.pid, held = held.len(), "found a keeper");
                    if current.is_none() && link.build == keepers.build && link.accepting {
                        current = Some(link.clone());
                    } else {
                        link.send(Request::Retire);
                    }
                    for (state, (route, events)) in held {
                        let h = Held {
                            link: link.clone(),
                            uid: state.uid.clone(),
                            route,
                            events,
                            pid: state.pid,
                            start_ticks: state.start_ticks,
                        };
                        adopted.insert(state.uid.clone(), Adopted::Live(h, state));
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::TimedOut || alive(&dir) => {
                    // Alive but not answering (stopped?) or not to be
                    // spoken to (another protocol): neither trusted nor
                    // removed.
                    tracing::warn!(keeper = %dir.display(), error = %err, "a live keeper cannot be spoken to; what it holds is not taken over");
                }
                Err(err) => {
                    let (exits, bad) = ExitLog::read(&dir.join("exits"));
                    if bad > 0 {
                        // Kept aside for a person to look at, never read again.
                        let aside = quarantine(root, &dir);
                        tracing::warn!(
                            keeper = %dir.display(), bad, quarantined = %aside.display(),
                            "exit records that do not check were skipped; the log is quarantined"
                        );
                    }
                    tracing::warn!(keeper = %dir.display(), error = %err, ended = exits.len(), "a keeper is gone; reading its exit log");
                    let d = Arc::new(DeadDir(dir.clone()));
                    for (uid, record) in exits {
                        adopted.entry(uid).or_insert(Adopted::Dead {
                            spool: dir.join("spool"),
                            record,
                            _dir: d.clone(),
                        });
                    }
                }
            }
        }
        *keepers.current.lock().await = current;
        Ok((keepers, adopted))
    }

    /// The keeper new processes go to, started if there is none (or it is
    /// gone).
    async fn link(&self) -> std::io::Result<Arc<KeeperLink>> {
        let mut cur = self.current.lock().await;
        if let Some(l) = cur.as_ref().filter(|l| !l.gone.is_cancelled()) {
            return Ok(l.clone());
        }
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = self.root.join(id);
        testbus_pki::private_dir(&dir).map_err(std::io::Error::other)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log"))?;
        // This very binary, even if a newer one was installed at its path
        // since (its protocol could differ).
        let me = if Path::new("/proc/self/exe").exists() { Path::new("/proc/self/exe") } else { self.exe.as_path() };
        let mut cmd = tokio::process::Command::new(me);
        cmd.arg(SUBCOMMAND)
            .arg(&dir)
            .arg(self.orphan.as_secs().max(1).to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Out of the agent's process group: a terminal's ^C to the
            // agent is not for the keeper.
            .process_group(0);
        let mut child = cmd.spawn()?;
        // Reaped when it exits, while this agent lives; a later agent is
        // not its parent.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let deadline = tokio::time::Instant::now() + ANSWER;
        let link = loop {
            match KeeperLink::connect(&dir).await {
                Ok((link, _)) => break link,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!("the keeper in {} did not start: {e}", dir.display())))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        tracing::info!(keeper = %dir.display(), pid = link.pid, "started a keeper");
        *cur = Some(link.clone());
        Ok(link)
    }

    /// New processes go to another keeper than `link` from now on.
    async fn stop_using(&self, link: &Arc<KeeperLink>) {
        let mut cur = self.current.lock().await;
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, link)) {
            *cur = None;
        }
    }

    /// Has the current keeper start `spec`.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<Held, SpawnError> {
        let keeper =
            |message: String| SpawnError { stage: SpawnStage::Keeper, errno: None, message, maybe_started: false };
        // (One too large for a line is answered SpawnFailed by the writer.)
        let spec = Box::new(spec);
        let link = self.link().await.map_err(|e| keeper(format!("no keeper: {e}")))?;
        let uid = spec.uid.clone();
        let (route, events) = link.route(&uid);
        link.send(Request::Spawn(spec));
        let mut held = Held { link, uid, route, events, pid: 0, start_ticks: 0 };
        let Ok(answer) = tokio::time::timeout(SPAWN_ANSWER, held.next()).await else {
            // A keeper that does not answer is not asked again: the next
            // spawn starts a new one (what this one holds stays with it,
            // and it retires). Should it start this process late, it is
            // killed at once (and its cgroup ended by the caller).
            self.stop_using(&held.link).await;
            held.signal(nix::sys::signal::Signal::SIGKILL);
            held.link.send(Request::Retire);
            return Err(SpawnError {
                maybe_started: true,
                ..keeper(format!(
                    "the keeper (pid {}) did not say within {}s whether it started the process",
                    held.link.pid,
                    SPAWN_ANSWER.as_secs()
                ))
            });
        };
        match answer {
            Some(Event::Spawned { pid, start_ticks, .. }) => {
                held.pid = pid;
                held.start_ticks = start_ticks;
                Ok(held)
            }
            Some(Event::SpawnFailed { stage, errno, message, .. }) => {
                if stage == SpawnStage::Keeper {
                    // Retiring or full: the next spawn starts a new one.
                    self.stop_using(&held.link).await;
                }
                Err(SpawnError { stage, errno, message, maybe_started: false })
            }
            Some(Event::Refused { message, .. }) => Err(keeper(format!("the keeper refused it: {message}"))),
            Some(other) => Err(keeper(format!("the keeper answered {other:?}"))),
            None => Err(SpawnError { maybe_started: true, ..keeper("the keeper went away while starting it".into()) }),
        }
    }
}
