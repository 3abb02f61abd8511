//! The keeper process (see the module above): serves one agent at a time
//! on `DIR/sock` and holds the processes it was asked to run.
//!
//! Ownership: the accept loop owns the lifetime (when to exit); each
//! process is owned by its own task, from spawn to its exit record; a
//! connection's reader handles requests and its writer sends events. What
//! they share is in [`Shared`], behind one lock that is never held across
//! an await.
use super::{
    Event, ExitLog, ExitRecord, ExitStatus, HeldState, Request, SpawnContainment, SpawnSpec, SpawnStage, SpoolWriter,
    StdinSource, PROTOCOL,
};
use crate::containment::ProcessCgroup;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// How long to wait for output pipes after the process and all it left are
/// gone (something outside its containment may hold one).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Bytes a reader still takes from its pipe once told to stop.
const AFTER_STOP: usize = 1 << 20;
/// One pipe read.
const READ: usize = 64 << 10;
/// How long a new keeper waits for its first agent.
const FIRST_CONNECTION: Duration = Duration::from_secs(30);
/// Most processes held at once.
const MAX_HELD: usize = 65_536;

/// One held process.
struct Kept {
    pid: i32,
    start_ticks: u64,
    /// `pid` is a PID-namespace relay (signalled itself, not its group).
    relay: bool,
    cgroup: Option<Arc<ProcessCgroup>>,
    ends: [Arc<AtomicU64>; 2],
    /// What the agent said the server has of each stream.
    uploaded: [Arc<AtomicU64>; 2],
    /// The oldest spool segment of each stream still kept.
    first: [Arc<AtomicU64>; 2],
    /// Wakes its pipe readers waiting for room in the spool.
    room: Arc<Notify>,
    /// An Output event for the stream is on its way (one at a time).
    pending: [Arc<AtomicBool>; 2],
    stdin: Option<mpsc::UnboundedSender<(u64, Vec<u8>)>>,
    stdin_written: Arc<AtomicU64>,
    reaped: bool,
    exit: Option<ExitRecord>,
    /// The connection its events go to: the one that started it, until a
    /// newer agent says hello (and takes over all that is held), or this
    /// one closes (and the newest left gets it).
    owner: u64,
}

impl Kept {
    fn state(&self, uid: &str) -> HeldState {
        HeldState {
            uid: uid.to_string(),
            pid: self.pid,
            start_ticks: self.start_ticks,
            ends: [self.ends[0].load(Ordering::Acquire), self.ends[1].load(Ordering::Acquire)],
            stdin_written: self.stdin_written.load(Ordering::Acquire),
            exit: self.exit.map(|r| r.exit),
        }
    }

    /// Signals all of it while it has not been reaped (its pid cannot have
    /// been reused before).
    fn signal(&self, sig: i32) {
        let Ok(sig) = nix::sys::signal::Signal::try_from(sig) else { return };
        if self.reaped || self.pid <= 1 {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = if self.relay { nix::sys::signal::kill(pid, sig) } else { nix::sys::signal::killpg(pid, sig) };
        if let Some(cg) = &self.cgroup {
            cg.signal(sig);
        }
    }
}

struct Agent {
    conn: u64,
    events: mpsc::UnboundedSender<Event>,
}

struct State {
    kept: HashMap<String, Kept>,
    /// Connections that said hello, oldest first. A process's events go to
    /// its owner (see `Kept::owner`); a second connection (a stale one, a
    /// foreign client) that said hello took every answer once, the
    /// agent's own spawns' included, and their processes never started.
    agents: Vec<Agent>,
    /// When the last agent went (or the keeper started).
    alone_since: tokio::time::Instant,
    ever_connected: bool,
    retiring: bool,
    /// The orphan timeout passed: everything held was killed.
    orphaned: bool,
    /// Asked to start, not held yet.
    spawning: std::collections::HashSet<String>,
    /// Of those, the ones told to be killed meanwhile (an agent that gave
    /// up waiting for the start): killed as soon as they are held, and let
    /// go of once ended, since nobody will ask about them.
    doomed: std::collections::HashSet<String>,
}

struct Shared {
    /// An agent is connected (its uploads make room in the spools).
    connected: AtomicBool,
    state: Mutex<State>,
    exits: Mutex<ExitLog>,
    spool: PathBuf,
    build: String,
    changed: Notify,
}

impl Shared {
    /// Sends `ev` to the connection that owns its process (the newest one
    /// when that is gone, or for a process not held).
    fn send(&self, ev: Event) {
        let s = self.state.lock();
        let owner = ev.uid().and_then(|uid| s.kept.get(uid)).map(|k| k.owner);
        let to = owner.and_then(|o| s.agents.iter().find(|a| a.conn == o)).or(s.agents.last());
        if let Some(a) = to {
            let _ = a.events.send(ev);
        }
    }
}

/// `testbus-agent __testbus-keeper DIR ORPHAN_SECONDS`: never returns.
pub fn main(args: Vec<std::ffi::OsString>) -> ! {
    let (Some(dir), Some(orphan)) = (args.first(), args.get(1).and_then(|s| s.to_str()?.parse::<u64>().ok())) else {
        eprintln!("testbus-agent {}: DIR ORPHAN_SECONDS", super::SUBCOMMAND);
        std::process::exit(2);
    };
    testbus_telemetry::init_logging(testbus_telemetry::LogFormat::Text);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let code = match rt {
        Ok(rt) => rt.block_on(serve(PathBuf::from(dir), Duration::from_secs(orphan))),
        Err(e) => {
            eprintln!("keeper: cannot start its runtime: {e}");
            2
        }
    };
    std::process::exit(code)
}

async fn serve(dir: PathBuf, orphan: Duration) -> i32 {
    let sock = dir.join("sock");
    let _ = std::fs::remove_file(&sock);
    let listener = match tokio::net::UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %sock.display(), error = %e, "keeper: cannot listen");
            return 2;
        }
    };
    let spool = dir.join("spool");
    let exits = match testbus_pki::private_dir(&spool)
        .map_err(std::io::Error::other)
        .and_then(|_| ExitLog::open(&dir.join("exits")))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "keeper: cannot open its spool");
            return 2;
        }
    };
    let me = std::process::id() as i32;
    let ticks = crate::journal::ProcStat::read(me).map(|s| s.start_ticks).unwrap_or(0);
    // Who this keeper is, proven by its start time, for whoever must end
    // it without its agent (test harnesses).
    let _ = testbus_pki::write_private(&dir.join("pid"), format!("{me} {ticks}\n").as_bytes(), 0o600);
    let shared = Arc::new(Shared {
        connected: AtomicBool::new(false),
        state: Mutex::new(State {
            kept: HashMap::new(),
            agents: Vec::new(),
            alone_since: tokio::time::Instant::now(),
            ever_connected: false,
            retiring: false,
            orphaned: false,
            spawning: Default::default(),
            doomed: Default::default(),
        }),
        exits: Mutex::new(exits),
        spool,
        build: super::build(),
        changed: Notify::new(),
    });
    tracing::info!(dir = %dir.display(), build = %shared.build, "keeper started");
    let mut conns = 0u64;
    loop {
        // Decided on the state as it is now; woken by any change.
        let changed = shared.changed.notified();
        let wake_at = {
            let mut s = shared.state.lock();
            let nothing_held = s.kept.is_empty();
            let all_reaped = s.kept.values().all(|k| k.reaped && k.exit.is_some());
            if s.agents.is_empty() {
                let alone = s.alone_since.elapsed();
                if nothing_held && s.ever_connected {
                    break;
                }
                if !s.ever_connected && nothing_held && alone >= FIRST_CONNECTION {
                    break;
                }
                if s.orphaned && all_reaped {
                    break;
                }
                if alone >= orphan && !nothing_held && !s.orphaned {
                    tracing::warn!(held = s.kept.len(), "no agent came back in time; ending what the keeper holds");
                    s.orphaned = true;
                    for k in s.kept.values() {
                        k.signal(nix::libc::SIGKILL);
                    }
                    continue;
                }
                // Once orphaned, only the reaping of what it holds (a
                // change) matters.
                (!s.orphaned).then(|| s.alone_since + if s.ever_connected { orphan } else { FIRST_CONNECTION })
            } else {
                if s.retiring && nothing_held {
                    break;
                }
                None
            }
        };
        let sleep = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = sleep => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns += 1;
                    tokio::spawn(serve_conn(shared.clone(), stream, conns));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keeper: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(dir.join("pid"));
    let held = shared.state.lock().kept.len();
    if held == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    tracing::info!(held, "keeper exits");
    0
}

async fn serve_conn(shared: Arc<Shared>, stream: tokio::net::UnixStream, conn: u64) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_events(shared.clone(), wr, rx));
    let mut rd = tokio::io::BufReader::new(rd);
    let mut line = Vec::new();
    let mut hello = false;
    loop {
        line.clear();
        match (&mut rd).take(super::MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) if line.last() != Some(&b'\n') => {
                tracing::warn!("keeper: a request too long, or cut short; the connection is closed");
                break;
            }
            Ok(_) => {}
        }
        let req: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "keeper: a request that does not parse; the connection is closed");
                break;
            }
        };
        if !hello {
            let Request::Hello { protocol } = req else { break };
            if protocol != PROTOCOL {
                tracing::warn!(protocol, "keeper: an agent of another protocol; refused");
                break;
            }
            hello = true;
            let mut s = shared.state.lock();
            // Output events sent while no agent listened were lost: the
            // welcome says how far each stream is, and the next write
            // sends an event again.
            for k in s.kept.values_mut() {
                for p in &k.pending {
                    p.store(false, Ordering::Release);
                }
                k.owner = conn;
            }
            let held = s.kept.iter().map(|(uid, k)| k.state(uid)).collect();
            let welcome = Event::Welcome {
                protocol: PROTOCOL,
                build: shared.build.clone(),
                pid: std::process::id(),
                held,
                accepting: !s.retiring && !s.orphaned,
            };
            let _ = tx.send(welcome);
            // The newest connection is the agent's: it holds all that was
            // held; what an older one starts from now on stays its own.
            s.agents.push(Agent { conn, events: tx.clone() });
            s.ever_connected = true;
            shared.connected.store(true, Ordering::Release);
            drop(s);
            shared.changed.notify_one();
            continue;
        }
        handle(&shared, req, (conn, &tx));
    }
    {
        let mut s = shared.state.lock();
        s.agents.retain(|a| a.conn != conn);
        let next = s.agents.last().map(|a| (a.conn, a.events.clone()));
        match next {
            None => {
                s.alone_since = tokio::time::Instant::now();
                // Nobody uploads now: the spools keep the newest bytes
                // rather than hold the processes back.
                shared.connected.store(false, Ordering::Release);
                for k in s.kept.values() {
                    k.room.notify_waiters();
                }
            }
            // What this one owned goes to the newest left: it missed what
            // was sent here, so it is told where each stands.
            Some((next, events)) => {
                for (uid, k) in s.kept.iter_mut().filter(|(_, k)| k.owner == conn) {
                    k.owner = next;
                    for p in &k.pending {
                        p.store(false, Ordering::Release);
                    }
                    for ev in resync(uid, k) {
                        let _ = events.send(ev);
                    }
                }
            }
        }
    }
    shared.changed.notify_one();
    drop(tx);
    let _ = writer.await;
}

async fn write_events(
    shared: Arc<Shared>,
    wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let mut wr = tokio::io::BufWriter::new(wr);
    while let Some(mut ev) = rx.recv().await {
        if let Event::Output { uid, stream, end } = &mut ev {
            // The latest end, and the next write sends another event.
            if let Some(k) = shared.state.lock().kept.get(uid.as_str()) {
                k.pending[*stream as usize & 1].store(false, Ordering::Release);
                *end = k.ends[*stream as usize & 1].load(Ordering::Acquire);
            }
        }
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        if wr.write_all(&line).await.is_err() {
            return;
        }
        if rx.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
}

fn handle(shared: &Arc<Shared>, req: Request, (conn, tx): (u64, &mpsc::UnboundedSender<Event>)) {
    let refuse = |uid: &str, message: String| {
        let _ = tx.send(Event::Refused { uid: uid.to_string(), message });
    };
    match req {
        Request::Hello { .. } => {}
        Request::Spawn(spec) => {
            let uid = spec.uid.clone();
            let failed = |message: String| {
                let _ =
                    tx.send(Event::SpawnFailed { uid: uid.clone(), stage: SpawnStage::Keeper, errno: None, message });
            };
            if !crate::journal::plausible_uid(&uid) {
                return refuse(&uid, "implausible process uid".into());
            }
            let mut s = shared.state.lock();
            if s.retiring || s.orphaned {
                return failed("the keeper is retiring".into());
            }
            if s.kept.contains_key(&uid) {
                return refuse(&uid, "already held".into());
            }
            if s.kept.len() >= MAX_HELD {
                return failed(format!("the keeper holds {MAX_HELD} processes already"));
            }
            s.spawning.insert(uid.clone());
            drop(s);
            tokio::spawn(run(shared.clone(), *spec, (conn, tx.clone())));
        }
        Request::Signal { uid, signal } => {
            let mut s = shared.state.lock();
            match s.kept.get(&uid) {
                Some(k) => k.signal(signal),
                None if signal == nix::libc::SIGKILL && s.spawning.contains(&uid) => {
                    s.doomed.insert(uid);
                }
                None => refuse(&uid, "not held".into()),
            }
        }
        Request::Stdin { uid, offset, data } => {
            let sent = shared.state.lock().kept.get(&uid).and_then(|k| k.stdin.as_ref()).map(|s| {
                let data = hex::decode(&data).unwrap_or_default();
                s.send((offset, data)).is_ok()
            });
            if sent != Some(true) {
                refuse(&uid, "stdin closed".into());
            }
        }
        Request::Uploaded { uid, stream, upto } => {
            if let Some(k) = shared.state.lock().kept.get(&uid) {
                k.uploaded[stream as usize & 1].fetch_max(upto, Ordering::AcqRel);
                k.room.notify_waiters();
            }
        }
        Request::CloseStdin { uid } => {
            if let Some(k) = shared.state.lock().kept.get_mut(&uid) {
                k.stdin = None;
            }
        }
        Request::Forget { uid } => {
            if !forget(shared, &uid) && shared.state.lock().kept.contains_key(&uid) {
                refuse(&uid, "still running".into());
            }
        }
        Request::Retire => {
            shared.state.lock().retiring = true;
            shared.changed.notify_one();
        }
    }
}

/// Lets go of an ended process: its record, exit log entry and spool.
/// False when it is not held, or still runs.
fn forget(shared: &Shared, uid: &str) -> bool {
    let mut s = shared.state.lock();
    let Some(k) = s.kept.get(uid) else { return false };
    let Some(r) = k.exit else { return false };
    let first = [k.first[0].load(Ordering::Acquire), k.first[1].load(Ordering::Acquire)];
    s.kept.remove(uid);
    let mut exits = shared.exits.lock();
    exits.forgot(uid);
    if exits.wants_compaction() {
        exits.compact(s.kept.iter().filter_map(|(u, k)| Some((u.as_str(), k.exit?))));
    }
    drop(exits);
    drop(s);
    for stream in 0..2u8 {
        super::remove_spool(&shared.spool, uid, stream, first[stream as usize], r.ends[stream as usize]);
    }
    shared.changed.notify_one();
    true
}

/// Takes `uid` off the keeper's list of processes being started, however
/// its start ends.
struct Spawning<'a> {
    shared: &'a Shared,
    uid: String,
}

impl Drop for Spawning<'_> {
    fn drop(&mut self) {
        let mut s = self.shared.state.lock();
        s.spawning.remove(&self.uid);
        s.doomed.remove(&self.uid);
    }
}

/// One process from spawn to its exit record. Whether it started is told
/// to the connection that asked (`asker`, connection `owner`), which waits
/// for that answer; what follows goes to the process's owner.
async fn run(shared: Arc<Shared>, spec: SpawnSpec, (owner, asker): (u64, mpsc::UnboundedSender<Event>)) {
    let uid = spec.uid.clone();
    let spawning = Spawning { shared: &shared, uid: uid.clone() };
    let failed = |stage, errno, message: String| {
        let _ = asker.send(Event::SpawnFailed { uid: uid.clone(), stage, errno, message });
    };
    let cgroup = match &spec.containment {
        SpawnContainment::Cgroup(root) => match ProcessCgroup::create(root, &uid) {
            Ok(cg) => Some(Arc::new(cg)),
            Err(e) => {
                return failed(
                    SpawnStage::Contain,
                    e.raw_os_error(),
                    format!("cannot create the process's cgroup: {e}"),
                )
            }
        },
        _ => None,
    };
    let relay = matches!(spec.containment, SpawnContainment::PidNamespace(_));
    let stdin_file = match &spec.stdin {
        StdinSource::File(p) => match std::fs::File::open(p) {
            Ok(f) => Some(f),
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.end().await;
                }
                return failed(SpawnStage::Exec, None, format!("stdin file: {e}"));
            }
        },
        _ => None,
    };
    let mut child = match start(&spec, cgroup.as_deref(), stdin_file).await {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = &cgroup {
                cg.end().await;
            }
            return failed(SpawnStage::Exec, e.raw_os_error(), e.to_string());
        }
    };
    let pid = child.id();
    // Read before it can be reaped: what proves its group later.
    let start_ticks = crate::journal::Group::of_leader(pid).map(|g| g.start_ticks).unwrap_or(0);
    // Larger pipes (1 MiB) mean fewer, larger reads for a process that
    // writes fast; best effort.
    for fd in child.output_fds().into_iter().flatten() {
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    let ends = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let uploaded = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let first = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let room = Arc::new(Notify::new());
    let pending = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
    let stdin_written = Arc::new(AtomicU64::new(0));
    let mut stdin_tx = None;
    match (child.take_stdin(), &spec.stdin) {
        (Some(mut w), StdinSource::Data(data)) => {
            let data = data.clone().into_bytes();
            tokio::spawn(async move {
                let _ = w.write_all(&data).await;
            });
        }
        (Some(w), StdinSource::Stream) => {
            let (tx, rx) = mpsc::unbounded_channel();
            stdin_tx = Some(tx);
            tokio::spawn(feed_stdin(shared.clone(), uid.clone(), w, rx, stdin_written.clone()));
        }
        _ => {}
    }
    let doomed = {
        let mut st = shared.state.lock();
        let doomed = st.doomed.remove(&uid);
        st.kept.insert(
            uid.clone(),
            Kept {
                pid,
                start_ticks,
                relay,
                cgroup: cgroup.clone(),
                ends: ends.clone(),
                uploaded: uploaded.clone(),
                first: first.clone(),
                room: room.clone(),
                pending: pending.clone(),
                stdin: stdin_tx,
                stdin_written,
                reaped: false,
                exit: None,
                owner,
            },
        );
        if doomed {
            if let Some(k) = st.kept.get(&uid) {
                k.signal(nix::libc::SIGKILL);
            }
        }
        doomed
    };
    drop(spawning);
    let _ = asker.send(Event::Spawned { uid: uid.clone(), pid, start_ticks });
    drop(asker);
    let mut readers = Vec::new();
    for (stream, pipe) in child.take_output().into_iter().enumerate() {
        let stream = stream as u8;
        let Some(pipe) = pipe else { continue };
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let mut spool = SpoolWriter::new(&shared.spool, &uid, stream, spec.spool_limit);
        let i = stream as usize;
        // While an agent uploads, the spool never drops what it has not
        // uploaded: the reader waits (and the process with it, as on a
        // full pipe) once a segment's worth short of full.
        let lag_limit = spool.capacity() - super::SEGMENT;
        let (end, up, shared3) = (ends[i].clone(), uploaded[i].clone(), shared.clone());
        let has_room = move || {
            !shared3.connected.load(Ordering::Acquire)
                || end.load(Ordering::Acquire).saturating_sub(up.load(Ordering::Acquire)) < lag_limit
        };
        let (end, first, pending, shared2, uid2) =
            (ends[i].clone(), first[i].clone(), pending[i].clone(), shared.clone(), uid.clone());
        let sink = move |data: &[u8]| {
            spool.write(data);
            end.store(spool.end, Ordering::Release);
            first.store(spool.first, Ordering::Release);
            if !pending.swap(true, Ordering::AcqRel) {
                shared2.send(Event::Output { uid: uid2.clone(), stream, end: spool.end });
            }
        };
        let gate = Gate { has_room: Box::new(has_room), wake: room.clone() };
        readers.push((tokio::spawn(read_pipe(pipe, sink, stop_rx, Some(gate))), stop));
    }
    let exit = match child.wait().await {
        Ok(st) => ExitStatus::of(st),
        Err(e) => {
            tracing::warn!(process_uid = %uid, error = %e, "keeper: cannot wait for the process");
            ExitStatus::Unknown
        }
    };
    if let Some(k) = shared.state.lock().kept.get_mut(&uid) {
        k.reaped = true;
    }
    // Whatever the main process left behind goes too: its cgroup whole, or
    // its group (a PID namespace ended with its relay).
    match &cgroup {
        Some(cg) => cg.end().await,
        None if !relay && pid > 1 => {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        None => {}
    }
    drain(readers, &uid).await;
    let record = ExitRecord { exit, ends: [ends[0].load(Ordering::Acquire), ends[1].load(Ordering::Acquire)] };
    shared.exits.lock().exited(&uid, record);
    if let Some(k) = shared.state.lock().kept.get_mut(&uid) {
        k.exit = Some(record);
        k.stdin = None;
    }
    shared.send(Event::Exited { uid: uid.clone(), exit, ends: record.ends });
    if doomed {
        forget(&shared, &uid);
    }
    shared.changed.notify_one();
}

/// A process the keeper started: born in its cgroup, or forked the
/// ordinary way (no cgroup, or clone3 refused here).
enum Child {
    Forked(tokio::process::Child),
    Born(super::born::BornChild),
}

/// Whether clone3 into a cgroup was refused once: then every later spawn
/// forks and joins without asking again.
static NO_CLONE_INTO_CGROUP: AtomicBool = AtomicBool::new(false);

impl Child {
    fn id(&self) -> i32 {
        match self {
            Child::Forked(c) => c.id().map(|p| p as i32).unwrap_or(0),
            Child::Born(c) => c.pid,
        }
    }

    fn output_fds(&self) -> [Option<std::os::fd::BorrowedFd<'_>>; 2] {
        use std::os::fd::AsFd;
        match self {
            Child::Forked(c) => [c.stdout.as_ref().map(AsFd::as_fd), c.stderr.as_ref().map(AsFd::as_fd)],
            Child::Born(c) => [c.stdout.as_ref().map(AsFd::as_fd), c.stderr.as_ref().map(AsFd::as_fd)],
        }
    }

    fn take_stdin(&mut self) -> Option<Box<dyn AsyncWrite + Unpin + Send>> {
        match self {
            Child::Forked(c) => c.stdin.take().map(|w| Box::new(w) as Box<dyn AsyncWrite + Unpin + Send>),
            Child::Born(c) => c.stdin.take().map(|w| Box::new(w) as Box<dyn AsyncWrite + Unpin + Send>),
        }
    }

    /// stdout, then stderr.
    fn take_output(&mut self) -> [Option<Box<dyn AsyncRead + Unpin + Send>>; 2] {
        match self {
            Child::Forked(c) => [c.stdout.take().map(boxed), c.stderr.take().map(boxed)],
            Child::Born(c) => [c.stdout.take().map(boxed), c.stderr.take().map(boxed)],
        }
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Child::Forked(c) => c.wait().await,
            Child::Born(c) => c.wait().await,
        }
    }
}

/// Starts the process of `spec`: straight into `cgroup` where the kernel
/// can, else forked and joined to it between fork and exec.
async fn start(
    spec: &SpawnSpec,
    cgroup: Option<&ProcessCgroup>,
    stdin_file: Option<std::fs::File>,
) -> std::io::Result<Child> {
    let mut tries = 0;
    loop {
        let r = match cgroup {
            Some(cg) if !NO_CLONE_INTO_CGROUP.load(Ordering::Relaxed) => {
                use super::born::{spawn, Born, BornStdin, Launch};
                let stdin = match (&stdin_file, &spec.stdin) {
                    (Some(f), _) => BornStdin::File(f.try_clone()?),
                    (None, StdinSource::Null) => BornStdin::Null,
                    (None, _) => BornStdin::Piped,
                };
                let launch = Launch { program: &spec.program, args: &spec.args, cwd: &spec.cwd, env: &spec.env, stdin };
                match spawn(&cg.dir_file()?, launch) {
                    Ok(Born::Started(c)) => Ok(Child::Born(c)),
                    Ok(Born::Unsupported) => {
                        tracing::info!(
                            "keeper: clone3 into a cgroup is refused here; processes join theirs after fork"
                        );
                        NO_CLONE_INTO_CGROUP.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            _ => forked(spec, cgroup, stdin_file.as_ref().map(|f| f.try_clone()).transpose()?),
        };
        match r {
            // A script just written can be briefly "busy" if another
            // thread forked while it was open for writing.
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            r => return r,
        }
    }
}

/// Forks the process of `spec`, which joins `cgroup` (if any) between
/// fork and exec.
fn forked(
    spec: &SpawnSpec,
    cgroup: Option<&ProcessCgroup>,
    stdin_file: Option<std::fs::File>,
) -> std::io::Result<Child> {
    let relay = matches!(spec.containment, SpawnContainment::PidNamespace(_));
    let mut cmd = match &spec.containment {
        SpawnContainment::PidNamespace(agent) => {
            let mut c = tokio::process::Command::new(agent);
            c.arg(crate::pidns::SUBCOMMAND).arg(&spec.program);
            c
        }
        _ => tokio::process::Command::new(&spec.program),
    };
    use std::process::Stdio;
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(match (stdin_file, &spec.stdin) {
            (Some(f), _) => Stdio::from(f),
            (None, StdinSource::Null) => Stdio::null(),
            (None, _) => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cg) = cgroup {
        // SAFETY: the closure runs in the child between fork and exec; it
        // only writes to a file already open (one write(2),
        // async-signal-safe, no allocation or lock).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(cg.joiner());
        }
    }
    if relay {
        // SAFETY: the closure runs in the child between fork and exec; it
        // makes one syscall (unshare), async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(crate::pidns::unsharer());
        }
    }
    cmd.spawn().map(Child::Forked)
}

/// The events that tell where a held process stands.
fn resync(uid: &str, k: &Kept) -> Vec<Event> {
    let ends = [k.ends[0].load(Ordering::Acquire), k.ends[1].load(Ordering::Acquire)];
    let mut out: Vec<Event> =
        (0..2u8).map(|stream| Event::Output { uid: uid.to_string(), stream, end: ends[stream as usize] }).collect();
    out.push(Event::StdinTaken { uid: uid.to_string(), upto: k.stdin_written.load(Ordering::Acquire) });
    if let Some(r) = k.exit {
        out.push(Event::Exited { uid: uid.to_string(), exit: r.exit, ends: r.ends });
    }
    out
}

fn boxed(r: impl AsyncRead + Unpin + Send + 'static) -> Box<dyn AsyncRead + Unpin + Send> {
    Box::new(r)
}

type Reader = (tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>);

/// Waits for both pipes to close, at most DRAIN_LIMIT; past it, each
/// reader takes what its pipe holds already and stops.
async fn drain(readers: Vec<Reader>, uid: &str) {
    let (mut handles, stops): (Vec<_>, Vec<_>) = readers.into_iter().unzip();
    let all = async {
        for h in handles.iter_mut() {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(DRAIN_LIMIT, all).await.is_ok() {
        return;
    }
    tracing::warn!(process_uid = %uid, "output pipes still open after the process ended; reading stops");
    for stop in stops {
        let _ = stop.send(());
    }
    for h in handles {
        if !h.is_finished() {
            let _ = h.await;
        }
    }
}

/// Holds a pipe reader back while its spool has no room.
pub(crate) struct Gate {
    has_room: Box<dyn Fn() -> bool + Send + Sync>,
    /// Told when room may have been made (an upload, the agent gone).
    wake: Arc<Notify>,
}

/// Reads a pipe into `sink` until its end, waiting while `gate` says the
/// spool has no room; once `stop` fires, takes only what the pipe holds
/// already (at most AFTER_STOP) and returns. (No timer there: right after a
/// snapshot revert a guest's timers can all fire at once, and a read given
/// a timeout then read nothing.)
pub(crate) async fn read_pipe(
    mut r: impl AsyncRead + Unpin,
    mut sink: impl FnMut(&[u8]),
    mut stop: tokio::sync::oneshot::Receiver<()>,
    gate: Option<Gate>,
) {
    let mut buf = vec![0u8; READ];
    let mut stopped: Option<usize> = None;
    loop {
        if let (Some(g), None) = (&gate, stopped) {
            while !(g.has_room)() {
                // Looked at again at least every 50 ms: a wake between the
                // look and the wait is not missed for long.
                tokio::select! {
                    _ = &mut stop => {
                        stopped = Some(0);
                        break;
                    }
                    _ = tokio::time::timeout(Duration::from_millis(50), g.wake.notified()) => {}
                }
            }
        }
        let n = if let Some(taken) = &mut stopped {
            match futures::FutureExt::now_or_never(r.read(&mut buf)) {
                Some(Ok(n)) if n > 0 && *taken < AFTER_STOP => {
                    *taken += n;
                    n
                }
                _ => return,
            }
        } else {
            tokio::select! {
                biased;
                _ = &mut stop => {
                    stopped = Some(0);
                    continue;
                }
                n = r.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
            }
        };
        sink(&buf[..n]);
    }
}

/// Writes what the agent sends to the process's stdin, in order, telling
/// it how far it got; the pipe closes when the agent closes it (its
/// sender goes) or the process stops reading.
async fn feed_stdin(
    shared: Arc<Shared>,
    uid: String,
    mut w: Box<dyn AsyncWrite + Unpin + Send>,
    mut rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    written: Arc<AtomicU64>,
) {
    while let Some((offset, data)) = rx.recv().await {
        let have = written.load(Ordering::Acquire);
        if offset > have {
            shared.send(Event::Refused { uid: uid.clone(), message: format!("stdin: a gap at {have}") });
            continue;
        }
        let skip = (have - offset) as usize;
        if skip < data.len() {
            if w.write_all(&data[skip..]).await.is_err() {
                shared.send(Event::Refused { uid: uid.clone(), message: "stdin closed".into() });
                return;
            }
            written.store(offset + data.len() as u64, Ordering::Release);
        }
        shared.send(Event::StdinTaken { uid: uid.clone(), upto: written.load(Ordering::Acquire) });
    }
}

#[cfg(test)]
mod tests {
    use super::{read_pipe, Arc, Duration, Notify};

    /// A reader told to stop still takes what the pipe holds already: a
    /// process that printed and exited lost its output when the drain
    /// limit was cut short (a snapshot revert's clock jump).
    #[tokio::test]
    async fn a_stopped_reader_still_takes_what_the_pipe_holds() {
        use tokio::io::AsyncWriteExt;
        let (mut held, stdout) = tokio::io::duplex(1 << 16);
        held.write_all(b"one\n").await.unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        stop.send(()).unwrap();
        let mut got = Vec::new();
        read_pipe(stdout, |d| got.extend_from_slice(d), stop_rx, None).await;
        assert_eq!(got, b"one\n");
        drop(held);
    }

    /// The same with a real pipe whose writer has exited: the reactor has
    /// not yet said the pipe is readable when the reader is already
    /// stopped. A reverted guest's `cat` once printed nothing, exit 0.
    #[tokio::test]
    async fn a_stopped_reader_takes_what_an_exited_process_left_in_its_pipe() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "echo one"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        assert!(child.wait().await.unwrap().success());
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        stop.send(()).unwrap();
        let mut got = Vec::new();
        read_pipe(stdout, |d| got.extend_from_slice(d), stop_rx, None).await;
        assert_eq!(got, b"one\n");
    }

    /// While the spool has no room (an agent is connected and has not
    /// uploaded enough), nothing more is read: the process waits on its
    /// pipe, as it would on a slow reader, and nothing is dropped. Room
    /// made (an upload, the agent gone) lets reading go on.
    #[tokio::test(start_paused = true)]
    async fn a_reader_waits_for_room_in_the_spool() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::AsyncWriteExt;
        let (mut w, r) = tokio::io::duplex(1 << 16);
        w.write_all(b"held back\n").await.unwrap();
        let room = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let r2 = room.clone();
        let gate = super::Gate { has_room: Box::new(move || r2.load(Ordering::Acquire)), wake: wake.clone() };
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let g2 = got.clone();
        let (_stop, stop_rx) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(read_pipe(r, move |d| g2.lock().extend_from_slice(d), stop_rx, Some(gate)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(got.lock().is_empty(), "read while the spool had no room");
        room.store(true, Ordering::Release);
        wake.notify_waiters();
        drop(w);
        reader.await.unwrap();
        assert_eq!(&got.lock()[..], b"held back\n");
    }
}
