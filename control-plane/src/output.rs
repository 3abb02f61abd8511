//! Process output, kept per process (by uid) as a log of records
//! `[kind+stream u8][offset u64][len u32][bytes]`: data, a truncation marker
//! (once per stream, when the output limit is reached), a skip record
//! that counts bytes received but not kept (so offsets stay right across
//! restarts), or a time record (the offset field holds when the server
//! received what follows, in ms since the epoch; no bytes) written before
//! each append's records.
//!
//! Where the records live depends on the store:
//! - embedded store (one replica): an append-only file per process in the
//!   data dir;
//! - shared store (etcd, several replicas): chunks in the store itself under
//!   `/output/<uid>/<seq>`, each written with a compare-and-swap on its key
//!   being absent. Every replica reads and appends to the same log, so an
//!   agent that fails over to another replica carries on where it was, and
//!   output survives the death of the replica that received it. The output
//!   limit bounds what a process can put in the store.
//!
//! Appends are idempotent by offset, so an agent can re-send after a
//! reconnect: bytes the server already holds are skipped, a gap is refused
//! (the agent re-sends from the length the error names). Readers that follow
//! stop once the process is terminal and everything has been delivered
//! (agents flush output before they report a final status).
use crate::authz::{Scope, Target, Verb};
use crate::hub;
use crate::state::ApiState;
use crate::store::{Compare, Event, KeyValue, Op, Store};
use futures::stream::BoxStream;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use testbus_proto::output_server::Output;
use testbus_proto::{
    phase, AppendOutputResponse, Kind, OutputChunk, OutputStream, Process, ReadOutputRequest, Resource,
};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

/// Largest chunk accepted in one append.
pub const MAX_CHUNK: usize = 4 << 20;
/// Default for how much of each stream of a process is kept.
pub const DEFAULT_LIMIT: u64 = 64 << 20;
/// Largest piece of data in one store chunk: well below etcd's request
/// limit (1.5 MiB by default).
const STORE_PIECE: usize = 256 << 10;
const OUTPUT_PREFIX: &str = "/output/";
const HEADER: usize = 1 + 8 + 4;
const MARKER: u8 = 0x40;
const SKIP: u8 = 0x80;
/// A time record: a tag of its own (no stream bit), no body.
const TIME: u8 = 0x20;

/// One record of a log.
enum Record<'a> {
    Data(usize, &'a [u8]),
    Marker(usize, &'a [u8]),
    /// Bytes counted, not kept.
    Skip(usize, u64),
    /// The records that follow were received at this time (ms since the
    /// epoch).
    Time(i64),
}

/// Parses the complete records at the start of `buf`; returns how many
/// bytes they took (a torn record at the end is left alone).
fn parse_records<'a>(buf: &'a [u8], mut f: impl FnMut(Record<'a>)) -> usize {
    let mut pos = 0usize;
    while pos + HEADER <= buf.len() {
        let tag = buf[pos];
        if tag & !(SKIP | MARKER | 1) != 0 && tag != TIME {
            break;
        }
        let s = (tag & 1) as usize;
        let len = u32::from_le_bytes(buf[pos + 9..pos + 13].try_into().unwrap_or_default()) as usize;
        let body = if tag & SKIP != 0 || tag == TIME { 0 } else { len };
        if pos + HEADER + body > buf.len() {
            break;
        }
        let bytes = &buf[pos + HEADER..pos + HEADER + body];
        f(if tag == TIME {
            Record::Time(i64::from_le_bytes(buf[pos + 1..pos + 9].try_into().unwrap_or_default()))
        } else if tag & SKIP != 0 {
            Record::Skip(s, len as u64)
        } else if tag & MARKER != 0 {
            Record::Marker(s, bytes)
        } else {
            Record::Data(s, bytes)
        });
        pos += HEADER + body;
    }
    pos
}

fn push_record(rec: &mut Vec<u8>, tag: u8, offset: u64, len: usize, body: &[u8]) {
    rec.push(tag);
    rec.extend_from_slice(&offset.to_le_bytes());
    rec.extend_from_slice(&(len as u32).to_le_bytes());
    rec.extend_from_slice(body);
}

/// Where an append goes: a stream, the offset of its data, and how many
/// bytes before it the agent lost.
#[derive(Debug, Clone, Copy)]
struct At {
    stream: usize,
    offset: u64,
    lost: u64,
}

/// What has been received of each stream of a process.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Bytes received, kept or not: the next expected offset.
    lens: [u64; 2],
    /// Bytes kept.
    kept: [u64; 2],
    truncated: [bool; 2],
}

impl Counts {
    /// Folds the records of `buf` in; returns the bytes they took.
    fn fold(&mut self, buf: &[u8]) -> usize {
        parse_records(buf, |r| match r {
            Record::Data(s, b) => {
                self.lens[s] += b.len() as u64;
                self.kept[s] += b.len() as u64;
            }
            Record::Marker(s, _) => self.truncated[s] = true,
            Record::Skip(s, n) => self.lens[s] += n,
            Record::Time(_) => {}
        })
    }

    /// The records that append `data` at `offset` to stream `s`, received
    /// at `now` (ms since the epoch), and the counts after them; None when
    /// everything is already held. `lost` bytes before `offset` are ones
    /// the agent no longer has (its spool kept the newest): a gap they
    /// cover is counted and told to readers. Errors when `offset` leaves
    /// any other gap.
    fn append(
        &self,
        s: usize,
        offset: u64,
        data: &[u8],
        lost: u64,
        limit: u64,
        now: i64,
    ) -> Result<Option<(Vec<u8>, Counts)>, Status> {
        let mut have = self.lens[s];
        let name = if s == 0 { "stdout" } else { "stderr" };
        if offset > have && offset.saturating_sub(lost) > have {
            return Err(Status::out_of_range(format!(
                "offset: chunk starts at {offset} but the server holds {have} bytes of {}; re-send from {have}",
                name.to_uppercase()
            )));
        }
        let tag = s as u8;
        let mut rec = Vec::new();
        let mut next = *self;
        if offset > have {
            let gone = offset - have;
            let marker =
                format!("\n[testbus: {gone} bytes of {name} lost: its agent was away and its spool kept the newest]\n");
            rec.push(TIME);
            rec.extend_from_slice(&now.to_le_bytes());
            rec.extend_from_slice(&0u32.to_le_bytes());
            push_record(&mut rec, MARKER | tag, have, marker.len(), marker.as_bytes());
            push_record(&mut rec, SKIP | tag, have, gone as usize, &[]);
            next.lens[s] += gone;
            next.truncated[s] = true;
            have = offset;
        }
        let skip = (have - offset) as usize;
        if skip >= data.len() {
            return Ok((!rec.is_empty()).then_some((rec, next)));
        }
        let data = &data[skip..];
        let room = limit.saturating_sub(self.kept[s]) as usize;
        let (keep, drop) = data.split_at(data.len().min(room));
        rec.reserve(4 * HEADER + keep.len() + 128);
        if !keep.is_empty() || !self.truncated[s] {
            // Bytes a reader will see (data or the marker) get a time.
            rec.push(TIME);
            rec.extend_from_slice(&now.to_le_bytes());
            rec.extend_from_slice(&0u32.to_le_bytes());
        }
        if !keep.is_empty() {
            push_record(&mut rec, tag, have, keep.len(), keep);
        }
        if !drop.is_empty() {
            if !self.truncated[s] {
                let marker =
                    format!("\n[testbus: {name} truncated after {limit} bytes; the rest is counted but not kept]\n");
                push_record(&mut rec, MARKER | tag, have + keep.len() as u64, marker.len(), marker.as_bytes());
            }
            push_record(&mut rec, SKIP | tag, have + keep.len() as u64, drop.len(), &[]);
        }
        next.lens[s] += data.len() as u64;
        next.kept[s] += keep.len() as u64;
        next.truncated[s] |= !drop.is_empty();
        Ok(Some((rec, next)))
    }
}

/// Where a reader is in a log, between calls of [`chunks_of`].
#[derive(Default, Clone, Copy)]
struct ReadPos {
    /// The offset of each stream's next byte.
    lens: [u64; 2],
    /// The time of the last time record.
    time: i64,
}

/// Turns records into the chunks a reader receives.
/// The chunks share `buf` rather than copy from it.
fn chunks_of(buf: &bytes::Bytes, at: &mut ReadPos, process: &str, out: &mut Vec<OutputChunk>) -> usize {
    parse_records(buf, |r| match r {
        Record::Data(s, b) | Record::Marker(s, b) => {
            let data = buf.slice_ref(b);
            let notice = matches!(r, Record::Marker(..));
            out.push(OutputChunk {
                process: process.to_string(),
                stream: s as i32,
                offset: at.lens[s],
                data,
                notice,
                time_unix_ms: at.time,
                lost: 0,
                process_uid: String::new(),
            });
            if matches!(r, Record::Data(..)) {
                at.lens[s] += b.len() as u64;
            }
        }
        Record::Skip(s, n) => at.lens[s] += n,
        Record::Time(t) => at.time = t,
    })
}

/// Where a log's records go.
enum Sink {
    /// An append-only file in the data dir (embedded store), open while
    /// it is being appended to (see [`OpenFiles`]).
    File { file: Option<Arc<std::fs::File>>, size: watch::Sender<u64> },
    /// Chunks in the shared store; `next` is the sequence number of the
    /// next chunk as far as this replica knows.
    Store { next: u64 },
}

struct Log {
    counts: Counts,
    sink: Sink,
    /// When it was last appended to: the least recently used file handle
    /// is the one closed when too many are open.
    last_used: tokio::time::Instant,
    /// Its process has ended: its output is complete, appends are refused.
    ended: bool,
    /// Its counts were read from its file or chunks. A file log is in the
    /// map before it is loaded (appends wait on its lock meanwhile); one
    /// whose load failed stays unloaded and is refused.
    loaded: bool,
}

impl Log {
    /// A file log not read yet.
    fn unloaded() -> Log {
        let (size, _) = watch::channel(0);
        Log {
            counts: Counts::default(),
            sink: Sink::File { file: None, size },
            last_used: tokio::time::Instant::now(),
            ended: false,
            loaded: false,
        }
    }
}

/// Most log files held open for appending at once. A process's file is
/// open from its first append until its process ends (or, past this many,
/// until it is the least recently appended to); it is reopened on demand.
pub const MAX_OPEN_LOGS: usize = 256;

#[derive(Clone)]
pub struct OutputService {
    dir: PathBuf,
    /// Bytes kept per stream of a process.
    limit: u64,
    api: ApiState,
    /// Some when output lives in the (shared) store rather than in files.
    shared: Option<Arc<dyn Store>>,
    logs: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<Log>>>>>,
    /// Process name → uid, for appends: a lookup in the store per append
    /// would cost more than the append. Refreshed whenever a stream starts
    /// (offset 0), so a process created again under the same name gets
    /// its own log.
    uids: Arc<Mutex<HashMap<String, (String, String)>>>,
    /// Log files open for appending now.
    open_files: Arc<std::sync::atomic::AtomicUsize>,
    max_open: usize,
}

fn io_err(e: std::io::Error) -> Status {
    crate::error::ApiError::io("output store", e).into()
}

fn store_err(e: crate::store::StoreError) -> Status {
    crate::error::ApiError::store("output store", e).into()
}

/// An append to a process that has ended: its output is complete.
fn ended(process: &str) -> Status {
    Status::failed_precondition(format!("process {process:?} has ended; its output is complete and takes no appends"))
}

fn chunk_prefix(uid: &str) -> String {
    format!("{OUTPUT_PREFIX}{uid}/")
}

fn chunk_key(uid: &str, seq: u64) -> String {
    format!("{OUTPUT_PREFIX}{uid}/{seq:020}")
}

fn seq_of(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

/// Whether a store key holds output (other store watchers skip these).
pub fn is_output_key(key: &str) -> bool {
    key.starts_with(OUTPUT_PREFIX)
}

impl OutputService {
    /// Output in files under `dir`, or, with `shared`, in that store.
    pub fn new(dir: PathBuf, api: ApiState, limit: u64, shared: Option<Arc<dyn Store>>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(OutputService {
            dir,
            limit,
            api,
            shared,
            logs: Default::default(),
            uids: Default::default(),
            open_files: Default::default(),
            max_open: MAX_OPEN_LOGS,
        })
    }

    /// With at most `n` log files open at once.
    pub fn with_max_open(mut self, n: usize) -> Self {
        self.max_open = n.max(1);
        self
    }

    /// Log files open for appending now.
    pub fn open_files(&self) -> usize {
        self.open_files.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes the file handle of the least recently appended log other than
    /// `keep`, if one is open and not in use.
    fn close_least_recent(&self, keep: &str) {
        let logs: Vec<(String, Arc<tokio::sync::Mutex<Log>>)> = {
            let logs = self.logs.lock();
            logs.iter().filter(|(u, _)| u.as_str() != keep).map(|(u, l)| (u.clone(), l.clone())).collect()
        };
        let mut oldest: Option<(tokio::time::Instant, tokio::sync::OwnedMutexGuard<Log>)> = None;
        for (_, l) in logs {
            let Ok(g) = l.try_lock_owned() else { continue };
            if matches!(g.sink, Sink::File { file: Some(_), .. })
                && oldest.as_ref().is_none_or(|(t, _)| g.last_used < *t)
            {
                oldest = Some((g.last_used, g));
            }
        }
        if let Some((_, mut g)) = oldest {
            self.close_file(&mut g);
        }
    }

    fn close_file(&self, log: &mut Log) {
        if let Sink::File { file, .. } = &mut log.sink {
            if file.take().is_some() {
                self.open_files.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The Process has ended: its log is complete and its file is closed.
    async fn seal(&self, uid: &str) {
        let log = self.logs.lock().get(uid).cloned();
        if let Some(log) = log {
            let mut l = log.lock().await;
            l.ended = true;
            self.close_file(&mut l);
        }
    }

    /// The Process is gone: so is its output, in memory, on disk and in a
    /// shared store.
    async fn forget(&self, name: &str, uid: &str) {
        self.forget_log(name, &stdin_log(uid)).await;
        self.forget_log(name, uid).await;
    }

    /// One log of a Process that is gone.
    async fn forget_log(&self, name: &str, uid: &str) {
        let log = self.logs.lock().remove(uid);
        if let Some(log) = log {
            self.close_file(&mut *log.lock().await);
        }
        {
            let mut uids = self.uids.lock();
            if uids.get(name).is_some_and(|(u, _)| u == uid) {
                uids.remove(name);
            }
        }
        match &self.shared {
            None => match tokio::fs::remove_file(self.path(uid)).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(process = name, error = %e, "cannot remove the output file"),
            },
            Some(store) => {
                let keys = match store.list(&chunk_prefix(uid)).await {
                    Ok((kvs, _)) => kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>(),
                    Err(e) => {
                        tracing::warn!(process = name, error = %e, "cannot list the output to remove it");
                        return;
                    }
                };
                for batch in keys.chunks(64) {
                    let ops = batch.iter().map(|k| Op::Delete(k.clone())).collect();
                    if let Err(e) = store.txn(vec![], ops).await {
                        tracing::warn!(process = name, error = %e, "cannot remove the output");
                        return;
                    }
                }
            }
        }
    }

    /// Keeps the output store to the live Processes: seals the log of each
    /// that ends and removes the output of each that is deleted, including
    /// those deleted while this replica was not watching (a sweep at start
    /// and whenever its watch was dropped). Runs until `stop`.
    pub fn spawn_janitor(&self, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<()> {
        let svc = self.clone();
        let janitor = async move {
            loop {
                let Ok(mut events) = svc.api.hub.watch(Kind::Process, None, None, Default::default()) else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                if let Err(e) = svc.sweep().await {
                    tracing::warn!(error = %e, "output sweep failed");
                }
                while let Some(ev) = events.recv().await {
                    let testbus_proto::Object::Process(p) = &ev.object else { continue };
                    let uid = &p.meta().uid;
                    if ev.kind == testbus_client::EventType::Deleted {
                        svc.forget(p.name(), uid).await;
                    } else if phase::process_terminal(&p.status().phase) {
                        svc.seal(uid).await;
                        svc.seal(&stdin_log(uid)).await;
                    }
                }
                // Dropped as too slow: what was missed is found by the sweep.
                tracing::debug!("output janitor's watch ended; sweeping again");
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = janitor => {}
            }
        })
    }

    /// Removes the output files of Processes that no longer exist (embedded
    /// store; a shared store's output is removed on each delete event).
    async fn sweep(&self) -> Result<(), Status> {
        if self.shared.is_some() {
            return Ok(());
        }
        let (kvs, _) = self.api.store.list(&hub::prefix(Kind::Process)).await.map_err(store_err)?;
        let live: std::collections::HashSet<String> = kvs
            .iter()
            .filter_map(|kv| match hub::decode(&kv.key, &kv.value, kv.mod_revision) {
                Some(testbus_proto::Object::Process(p)) => Some(p.meta().uid.clone()),
                _ => None,
            })
            .collect();
        let mut dir = tokio::fs::read_dir(&self.dir).await.map_err(io_err)?;
        while let Some(e) = dir.next_entry().await.map_err(io_err)? {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".log") else { continue };
            let uid = id.strip_suffix(".stdin").unwrap_or(id);
            // Created after the listing: not ours to judge.
            if !live.contains(uid) && !self.logs.lock().contains_key(id) {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
        Ok(())
    }

    async fn process(&self, name: &str) -> Result<Process, Status> {
        let kv = self
            .api
            .store
            .get(&hub::key(Kind::Process, name))
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("Process {name:?} not found")))?;
        match hub::decode(&kv.key, &kv.value, kv.mod_revision) {
            Some(testbus_proto::Object::Process(p)) => Ok(p),
            _ => Err(Status::data_loss(format!("Process {name:?} is unreadable"))),
        }
    }

    /// The uid and host of a Process that may still be appended to.
    async fn uid_of_running(&self, name: &str) -> Result<(String, String), Status> {
        let p = self.process(name).await?;
        if phase::process_terminal(&p.status().phase) {
            return Err(ended(name));
        }
        Ok((p.meta().uid.clone(), p.spec().host_name.clone()))
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.log"))
    }

    /// The log of a process, opened and recovered on first use.
    async fn open(&self, uid: &str) -> Result<Arc<tokio::sync::Mutex<Log>>, Status> {
        let Some(store) = &self.shared else {
            // The log goes into the map locked and unloaded, so that no
            // append (of either stream) can run before the load, which may
            // cut a torn tail. The load reads the file off the runtime, in
            // a task of its own: a caller that goes away cannot leave the
            // log half-loaded.
            let (log, loading) = {
                let mut logs = self.logs.lock();
                match logs.get(uid) {
                    Some(l) => (l.clone(), None),
                    None => {
                        let l = Arc::new(tokio::sync::Mutex::new(Log::unloaded()));
                        let guard = l.clone().try_lock_owned().expect("a new log is not locked");
                        logs.insert(uid.to_string(), l.clone());
                        (l, Some(guard))
                    }
                }
            };
            if let Some(mut guard) = loading {
                let (svc, uid, path) = (self.clone(), uid.to_string(), self.path(uid));
                let load = tokio::spawn(async move {
                    let loaded = tokio::task::spawn_blocking(move || load_file(&path))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    match loaded {
                        Ok(l) => {
                            *guard = l;
                            Ok(())
                        }
                        Err(e) => {
                            svc.logs.lock().remove(&uid);
                            Err(io_err(e))
                        }
                    }
                });
                load.await.map_err(|e| Status::internal(format!("output store: loading a log: {e}")))??;
            }
            return Ok(log);
        };
        if let Some(l) = self.logs.lock().get(uid) {
            return Ok(l.clone());
        }
        // Loading from the store changes nothing: two loads at once are
        // harmless, and the first one kept wins.
        let log = load_store(store.as_ref(), uid).await?;
        let mut logs = self.logs.lock();
        Ok(logs.entry(uid.to_string()).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(log))).clone())
    }

    /// Appends one chunk of a process's output (see `append`).
    async fn append_chunk(&self, scope: &Scope, c: OutputChunk) -> Result<AppendOutputResponse, Status> {
        if c.data.len() > MAX_CHUNK {
            return Err(Status::invalid_argument(format!("data: chunk larger than {MAX_CHUNK} bytes")));
        }
        let stream = OutputStream::try_from(c.stream)
            .map_err(|_| Status::invalid_argument(format!("stream: unknown output stream {}", c.stream)))?;
        if stream == OutputStream::Stdin {
            return self.append_stdin(scope, c).await;
        }
        // A cached uid that is not the one the chunk names may be stale
        // (a Process of that name made since): looked up again.
        let cached = (c.offset > 0)
            .then(|| self.uids.lock().get(&c.process).cloned())
            .flatten()
            .filter(|(uid, _)| c.process_uid.is_empty() || *uid == c.process_uid);
        let (uid, host) = match cached {
            Some(known) => known,
            None => {
                let known = self.uid_of_running(&c.process).await?;
                let mut uids = self.uids.lock();
                if uids.len() > 100_000 {
                    uids.clear();
                }
                uids.insert(c.process.clone(), known.clone());
                known
            }
        };
        // An agent appends only to the output of its host's processes.
        scope.process_on(Verb::AppendOutput, &c.process, &host)?;
        if !c.process_uid.is_empty() && c.process_uid != uid {
            return Err(Status::failed_precondition(format!(
                "process_uid: Process {:?} with uid {} is gone (the one of that name now has uid {uid})",
                c.process, c.process_uid
            )));
        }
        self.api.metrics.output_bytes.inc_by(c.data.len() as u64);
        let log = self.open(&uid).await?;
        let mut l = log.lock().await;
        if !l.loaded {
            return Err(Status::unavailable("output store: this process's log could not be read; retry"));
        }
        if l.ended {
            return Err(ended(&c.process));
        }
        l.last_used = tokio::time::Instant::now();
        let s = stream as usize;
        let piece = if self.shared.is_some() { STORE_PIECE } else { MAX_CHUNK };
        // The server's clock, whatever the chunk says (its time is read only).
        let now = testbus_proto::time::unix_ms(std::time::SystemTime::now());
        for (i, data) in c.data.chunks(piece).enumerate() {
            let lost = if i == 0 { c.lost } else { 0 };
            let at = At { stream: s, offset: c.offset + (i * piece) as u64, lost };
            self.append_piece(&mut l, &uid, at, data, now).await?;
        }
        if c.data.is_empty() && c.lost > 0 {
            self.append_piece(&mut l, &uid, At { stream: s, offset: c.offset, lost: c.lost }, &[], now).await?;
        } else if c.data.is_empty() {
            // An empty append still checks the offset.
            l.counts.append(s, c.offset, &[], 0, self.limit, now)?;
        }
        Ok(AppendOutputResponse { length: l.counts.lens[s], truncated: l.counts.truncated[s] })
    }

    /// Appends to a process's stdin (the log `UID.stdin`): by an admin (its
    /// test's driver), never an agent, to a running process started with
    /// `spec.stdinStream` whose stdin is not closed.
    async fn append_stdin(&self, scope: &Scope, c: OutputChunk) -> Result<AppendOutputResponse, Status> {
        scope.not_an_agent(Verb::AppendOutput, || format!("the stdin of Process {:?}", c.process))?;
        let p = self.process(&c.process).await?;
        if phase::process_terminal(&p.status().phase) {
            return Err(ended(&c.process));
        }
        if !p.spec().stdin_stream {
            return Err(Status::failed_precondition(format!(
                "stream: Process {:?} takes no streamed stdin (start it with stdinStream)",
                c.process
            )));
        }
        if p.spec().stdin_closed {
            return Err(Status::failed_precondition(format!("stream: the stdin of Process {:?} is closed", c.process)));
        }
        let id = stdin_log(&p.meta().uid);
        let log = self.open(&id).await?;
        let mut l = log.lock().await;
        if !l.loaded {
            return Err(Status::unavailable("output store: this process's log could not be read; retry"));
        }
        l.last_used = tokio::time::Instant::now();
        let now = testbus_proto::time::unix_ms(std::time::SystemTime::now());
        let piece = if self.shared.is_some() { STORE_PIECE } else { MAX_CHUNK };
        for (i, data) in c.data.chunks(piece).enumerate() {
            let at = At { stream: 0, offset: c.offset + (i * piece) as u64, lost: 0 };
            self.append_piece(&mut l, &id, at, data, now).await?;
        }
        if c.data.is_empty() {
            l.counts.append(0, c.offset, &[], 0, self.limit, now)?;
        }
        Ok(AppendOutputResponse { length: l.counts.lens[0], truncated: l.counts.truncated[0] })
    }

    fn store(&self) -> Result<&dyn Store, Status> {
        self.shared.as_deref().ok_or_else(|| Status::internal("output: no shared store"))
    }

    /// Appends one piece; retries when another replica appended first.
    async fn append_piece(&self, log: &mut Log, uid: &str, at: At, data: &[u8], now: i64) -> Result<(), Status> {
        let At { stream: s, offset, lost } = at;
        let mut reloaded = false;
        for _ in 0..8 {
            let (rec, next) = match log.counts.append(s, offset, data, lost, self.limit, now) {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                // This replica may be behind another one that took appends.
                Err(_) if !reloaded && self.shared.is_some() => {
                    reloaded = true;
                    *log = load_store(self.store()?, uid).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match &mut log.sink {
                Sink::File { file, size } => {
                    // File I/O goes to the blocking pool. The append runs in
                    // a task of its own (see `append`): it is not cancelled
                    // between the write and the counts' update below.
                    let f = match file {
                        Some(f) => f.clone(),
                        None => {
                            let path = self.path(uid);
                            let opened = tokio::task::spawn_blocking(move || {
                                std::fs::OpenOptions::new().create(true).append(true).open(path)
                            })
                            .await
                            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                            let f = Arc::new(opened.map_err(io_err)?);
                            *file = Some(f.clone());
                            let open = self.open_files.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            if open > self.max_open {
                                self.close_least_recent(uid);
                            }
                            f
                        }
                    };
                    let n = rec.len() as u64;
                    tokio::task::spawn_blocking(move || (&*f).write_all(&rec))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                        .map_err(io_err)?;
                    size.send_modify(|v| *v += n);
                }
                Sink::Store { next: seq } => {
                    let store = self.store()?;
                    let key = chunk_key(uid, *seq);
                    let done = store
                        .txn(vec![Compare::ModRevision(key.clone(), 0)], vec![Op::Put(key, rec)])
                        .await
                        .map_err(store_err)?;
                    if !done.succeeded {
                        // Another replica appended (or an earlier attempt
                        // of ours landed): catch up and decide again.
                        *log = load_store(store, uid).await?;
                        continue;
                    }
                    *seq += 1;
                }
            }
            log.counts = next;
            return Ok(());
        }
        Err(Status::aborted("output: too many concurrent appends to this process; retry"))
    }
}

/// Reads a log file, recovering the counts from its records (a torn last
/// record from a crash is cut off). Blocking: called off the runtime.
fn load_file(path: &std::path::Path) -> std::io::Result<Log> {
    // Only a file that is not there is empty: any other error is reported,
    // never taken for "nothing yet" (the cut below would then throw the log
    // away).
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut counts = Counts::default();
    let pos = counts.fold(&data);
    if pos < data.len() {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(pos as u64)?;
    }
    let (size, _) = watch::channel(pos as u64);
    Ok(Log {
        counts,
        sink: Sink::File { file: None, size },
        last_used: tokio::time::Instant::now(),
        ended: false,
        loaded: true,
    })
}

/// Rebuilds a log's counts from its chunks in the store.
async fn load_store(store: &dyn Store, uid: &str) -> Result<Log, Status> {
    let (kvs, _) = store.list(&chunk_prefix(uid)).await.map_err(store_err)?;
    let mut counts = Counts::default();
    for kv in &kvs {
        counts.fold(&kv.value);
    }
    let next = kvs.last().and_then(|kv| seq_of(&kv.key)).map_or(0, |s| s + 1);
    Ok(Log { counts, sink: Sink::Store { next }, last_used: tokio::time::Instant::now(), ended: false, loaded: true })
}

#[tonic::async_trait]
impl Output for OutputService {
    async fn append(&self, req: Request<OutputChunk>) -> Result<Response<AppendOutputResponse>, Status> {
        // In a task of its own: a client that goes away mid-append does not
        // cut it between writing a record and counting it.
        let scope = self.api.authorize(&req, Verb::AppendOutput, Target::Output)?;
        let svc = self.clone();
        let c = req.into_inner();
        tokio::spawn(async move { svc.append_chunk(&scope, c).await })
            .await
            .map_err(|e| Status::internal(format!("output store: an append failed: {e}")))?
            .map(Response::new)
    }

    type ReadStream = BoxStream<'static, Result<OutputChunk, Status>>;

    async fn read(&self, req: Request<ReadOutputRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let scope = self.api.authorize(&req, Verb::ReadOutput, Target::Output)?;
        let r = req.into_inner();
        // An agent reads only the stdin of its own host's processes.
        if !r.stdin {
            scope.not_an_agent(Verb::ReadOutput, || format!("the output of Process {:?}", r.process))?;
        }
        // Subscribed before the first look at the process, so that a
        // follower sees the process end at once, not at its next poll.
        let status = StatusChanges::of(&self.api, &r.process, r.follow);
        let p = self.process(&r.process).await?;
        scope.process_on(Verb::ReadOutput, &r.process, &p.spec().host_name)?;
        if r.stdin && !p.spec().stdin_stream {
            // Nothing to follow (and an agent gets no follow stream for free).
            scope.not_an_agent(Verb::ReadOutput, || format!("the stdin of Process {:?}: it has none", r.process))?;
        }
        let uid = if r.stdin { stdin_log(&p.meta().uid) } else { p.meta().uid.clone() };
        let (tx, rx) = mpsc::channel(16);
        match &self.shared {
            Some(store) => {
                let reader = StoreReader { store: store.clone(), uid, next: 0, at: ReadPos::default() };
                tokio::spawn(reader.run(self.clone(), r, status, tx));
            }
            None => {
                let size_rx = match &self.open(&uid).await?.lock().await.sink {
                    Sink::File { size, .. } => size.subscribe(),
                    Sink::Store { .. } => return Err(Status::internal("output log kind changed")),
                };
                tokio::spawn(follow_file(self.clone(), self.path(&uid), size_rx, status, r, tx));
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

type ChunkSender = mpsc::Sender<Result<OutputChunk, Status>>;

/// Changes of one Process, from the watch cache: a follower re-checks
/// whether the process has ended when it changes.
struct StatusChanges(Option<hub::Subscription>);

impl StatusChanges {
    fn of(api: &ApiState, name: &str, follow: bool) -> Self {
        let filter = testbus_proto::selector::FieldSelector::parse(&format!("metadata.name={name}"))
            .ok()
            .filter(|_| follow)
            .map(|fields| hub::Filter { fields, ..Default::default() });
        StatusChanges(filter.and_then(|f| api.hub.watch(Kind::Process, None, None, f).ok()))
    }

    /// Resolves at the next change, or after a second (a fallback: the
    /// watch may have been dropped as too slow).
    async fn changed(&mut self) {
        let wait = async {
            match &mut self.0 {
                Some(rx) => {
                    if rx.recv().await.is_none() {
                        self.0 = None;
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
    }
}

/// Whether a reader can stop: not following, or the process is terminal.
/// Terminal status is read before draining: output that was flushed
/// before the status is then surely readable.
async fn finished(svc: &OutputService, r: &ReadOutputRequest) -> bool {
    !r.follow
        || match svc.process(&r.process).await {
            Ok(p) => phase::process_terminal(&p.status().phase) || (r.stdin && p.spec().stdin_closed),
            // Gone is finished; a store that did not answer is not (the
            // reader looks again at the next change, or within a second):
            // a stdin follower that ended here would close its stdin.
            Err(s) => s.code() == tonic::Code::NotFound,
        }
}

/// The log of what was sent to a process's stdin: its own, beside the
/// output's (`UID.stdin`), removed with it.
fn stdin_log(uid: &str) -> String {
    format!("{uid}.stdin")
}

async fn send_all(tx: &ChunkSender, chunks: Vec<OutputChunk>) -> bool {
    for c in chunks {
        if tx.send(Ok(c)).await.is_err() {
            return false;
        }
    }
    true
}

async fn follow_file(
    svc: OutputService,
    path: PathBuf,
    mut size_rx: watch::Receiver<u64>,
    mut status: StatusChanges,
    r: ReadOutputRequest,
    tx: ChunkSender,
) {
    let mut pos = 0u64;
    let mut at = ReadPos::default();
    loop {
        let done = finished(&svc, &r).await;
        let end = *size_rx.borrow_and_update();
        if let Err(e) = drain_file(&path, &mut pos, end, &mut at, &r.process, &tx).await {
            let _ = tx.send(Err(e)).await;
            return;
        }
        if done || tx.is_closed() {
            return;
        }
        tokio::select! {
            _ = size_rx.changed() => {}
            _ = status.changed() => {}
        }
    }
}

/// Sends the records of a log file between `pos` and `end`.
async fn drain_file(
    path: &std::path::Path,
    pos: &mut u64,
    end: u64,
    at: &mut ReadPos,
    process: &str,
    tx: &ChunkSender,
) -> Result<(), Status> {
    if *pos >= end {
        return Ok(());
    }
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    use tokio::io::AsyncSeekExt;
    f.seek(std::io::SeekFrom::Start(*pos)).await.map_err(io_err)?;
    let mut f = f.take(end - *pos);
    // Whole records are sent; a record cut by the buffer's end waits in
    // `buf` for the rest. Reads go straight into `buf`'s spare room, sized
    // to what is new (often one append), not to the largest read.
    let block = ((end - *pos) as usize).min(1 << 20);
    let mut buf = bytes::BytesMut::with_capacity(block);
    loop {
        if buf.capacity() - buf.len() < block {
            buf.reserve(block);
        }
        let n = f.read_buf(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            return Ok(());
        }
        let mut chunks = Vec::new();
        let read = buf.split().freeze();
        let used = chunks_of(&read, at, process, &mut chunks);
        buf.extend_from_slice(&read[used..]);
        *pos += used as u64;
        if !send_all(tx, chunks).await {
            return Ok(());
        }
    }
}

/// Follows a log kept in the shared store: lists its chunks, then watches
/// for new ones; a final list once the process is terminal picks up
/// whatever the watch has not delivered yet.
struct StoreReader {
    store: Arc<dyn Store>,
    uid: String,
    /// The next chunk to send.
    next: u64,
    at: ReadPos,
}

impl StoreReader {
    /// Sends the chunks of `kvs` that come next, in order; false when the
    /// reader went away or a chunk is missing (the caller lists again).
    async fn send(&mut self, kvs: &[KeyValue], process: &str, tx: &ChunkSender) -> Result<bool, ()> {
        for kv in kvs {
            match seq_of(&kv.key) {
                Some(s) if s < self.next => continue,
                Some(s) if s == self.next => {}
                _ => return Ok(false),
            }
            let mut chunks = Vec::new();
            chunks_of(&bytes::Bytes::copy_from_slice(&kv.value), &mut self.at, process, &mut chunks);
            if !send_all(tx, chunks).await {
                return Err(());
            }
            self.next += 1;
        }
        Ok(true)
    }

    /// Lists the log and sends what is new; the revision it read at.
    async fn catch_up(&mut self, process: &str, tx: &ChunkSender) -> Result<u64, ()> {
        match self.store.list(&chunk_prefix(&self.uid)).await {
            Ok((kvs, rev)) => {
                self.send(&kvs, process, tx).await?;
                Ok(rev)
            }
            Err(e) => {
                let _ = tx.send(Err(store_err(e))).await;
                Err(())
            }
        }
    }

    async fn run(mut self, svc: OutputService, r: ReadOutputRequest, mut status: StatusChanges, tx: ChunkSender) {
        let Ok(mut rev) = self.catch_up(&r.process, &tx).await else { return };
        if !r.follow {
            return;
        }
        let mut events = None;
        loop {
            if finished(&svc, &r).await {
                let _ = self.catch_up(&r.process, &tx).await;
                return;
            }
            let w = match events.as_mut() {
                Some(w) => w,
                None => match self.store.watch(&chunk_prefix(&self.uid), rev).await {
                    Ok(w) => events.insert(w),
                    Err(_) => {
                        // Compacted or unreachable: list again shortly.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let Ok(r2) = self.catch_up(&r.process, &tx).await else { return };
                        rev = r2;
                        continue;
                    }
                },
            };
            let next = tokio::select! {
                n = w.next() => Ok(n),
                _ = status.changed() => Err(()),
            };
            match next {
                Err(()) => {}
                Ok(Some(Ok(Event::Put(kv)))) => {
                    rev = kv.mod_revision;
                    match self.send(std::slice::from_ref(&kv), &r.process, &tx).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let Ok(r2) = self.catch_up(&r.process, &tx).await else { return };
                            rev = r2;
                            events = None;
                        }
                        Err(()) => return,
                    }
                }
                Ok(Some(Ok(Event::Delete(kv)))) => rev = kv.mod_revision,
                Ok(_) => {
                    let Ok(r2) = self.catch_up(&r.process, &tx).await else { return };
                    rev = r2;
                    events = None;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use testbus_proto::states::ProcessPhase;
    use testbus_proto::{ObjectMeta, ProcessSpec};

    /// A request as the local socket brings it (admin).
    fn local<T>(t: T) -> Request<T> {
        let mut r = Request::new(t);
        r.extensions_mut().insert(crate::authz::Caller::Local);
        r
    }

    /// The first appends of stdout and stderr arrive together: neither may
    /// lose the other's bytes (opening a log once cut a record another
    /// stream had just written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_appends_of_both_streams_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (store, api) = api_state(&dir).await;
        for i in 0..500 {
            let name = format!("p{i}");
            let p = Process {
                metadata: Some(ObjectMeta { name: name.clone(), uid: format!("uid-{i}"), ..Default::default() }),
                spec: Some(ProcessSpec { host_name: "h".into(), argv: vec!["true".into()], ..Default::default() }),
                ..Default::default()
            };
            let value = p.to_stored();
            store.txn(vec![], vec![Op::Put(hub::key(Kind::Process, &name), value)]).await.unwrap();
        }
        let svc = OutputService::new(dir.path().join("output"), api, DEFAULT_LIMIT, None).unwrap();
        for i in 0..500 {
            let name = format!("p{i}");
            // Two tasks, so that the appends run on both worker threads.
            let append = |stream: i32, data: &'static [u8]| {
                let (svc, name) = (svc.clone(), name.clone());
                tokio::spawn(async move {
                    let c = OutputChunk {
                        process: name,
                        stream,
                        offset: 0,
                        data: bytes::Bytes::copy_from_slice(data),
                        ..Default::default()
                    };
                    svc.append(local(c)).await
                })
            };
            let (a, b) = (append(0, b"out"), append(1, b"err"));
            a.await.unwrap().unwrap();
            b.await.unwrap().unwrap();
            let log = std::fs::read(svc.path(&format!("uid-{i}"))).unwrap();
            let mut counts = Counts::default();
            counts.fold(&log);
            assert_eq!(counts.kept, [3, 3], "process {i}: both streams kept");
        }
    }

    async fn api_state(dir: &tempfile::TempDir) -> (Arc<dyn Store>, ApiState) {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 1000).unwrap());
        let hub = crate::hub::Hub::start(1000, store.clone()).await.unwrap();
        let blobs = crate::blobs::BlobStore::open(&dir.path().join("blobs"), 0).unwrap();
        (store.clone(), ApiState::new(store, hub, blobs, None, Default::default()))
    }

    async fn put_process(store: &Arc<dyn Store>, i: usize, phase: &str) {
        let name = format!("p{i}");
        let p = Process {
            metadata: Some(ObjectMeta { name: name.clone(), uid: format!("uid-{i}"), ..Default::default() }),
            spec: Some(ProcessSpec { host_name: "h".into(), argv: vec!["true".into()], ..Default::default() }),
            status: Some(testbus_proto::ProcessStatus { phase: phase.into(), ..Default::default() }),
            ..Default::default()
        };
        let value = p.to_stored();
        store.txn(vec![], vec![Op::Put(hub::key(Kind::Process, &name), value)]).await.unwrap();
    }

    /// Open fds of this process on files under `dir` (other tests of the
    /// binary run alongside: only these are this test's).
    fn fds_under(dir: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)))
            .count()
    }

    /// Each running process's log used to stay open forever (and its file
    /// and chunks on disk after the Process was deleted): at the fd limit,
    /// appends failed. Open logs are bounded, ended ones closed, deleted
    /// ones removed, and an ended process takes no appends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_logs_are_bounded_closed_when_ended_and_removed_with_their_process() {
        let dir = tempfile::tempdir().unwrap();
        let (store, api) = api_state(&dir).await;
        const N: usize = 300;
        for i in 0..N {
            put_process(&store, i, ProcessPhase::Running.as_str()).await;
        }
        let svc = OutputService::new(dir.path().join("output"), api, DEFAULT_LIMIT, None).unwrap().with_max_open(16);
        svc.spawn_janitor(tokio_util::sync::CancellationToken::new());
        let append = |i: usize, offset: u64| {
            let c = OutputChunk {
                process: format!("p{i}"),
                stream: 0,
                offset,
                data: bytes::Bytes::from_static(b"line\n"),
                ..Default::default()
            };
            svc.append(local(c))
        };
        for round in 0..2u64 {
            for i in 0..N {
                append(i, round * 5).await.unwrap();
            }
        }
        assert!(svc.open_files() <= 16, "{} logs open", svc.open_files());
        let out_dir = dir.path().join("output");
        assert!(fds_under(&out_dir) <= 16, "{} output files open", fds_under(&out_dir));
        for i in 0..N {
            let log = std::fs::read(svc.path(&format!("uid-{i}"))).unwrap();
            let mut counts = Counts::default();
            counts.fold(&log);
            assert_eq!(counts.kept, [10, 0], "process {i}: every append kept across reopens");
        }
        // Ended: closed, and appends refused.
        put_process(&store, 0, ProcessPhase::Succeeded.as_str()).await;
        let svc2 = svc.clone();
        wait_until(|| {
            let svc = svc2.clone();
            async move {
                let l = svc.logs.lock().get("uid-0").cloned();
                match l {
                    Some(l) => l.lock().await.ended,
                    None => false,
                }
            }
        })
        .await;
        let refused = append(0, 10).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        // A process that was never appended to, already ended: refused too.
        put_process(&store, N, ProcessPhase::Failed.as_str()).await;
        assert_eq!(append(N, 0).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
        // Deleted: its output goes.
        store.txn(vec![], vec![Op::Delete(hub::key(Kind::Process, "p1"))]).await.unwrap();
        let path = svc.path("uid-1");
        wait_until(|| {
            let path = path.clone();
            async move { !path.exists() }
        })
        .await;
        assert!(!svc.logs.lock().contains_key("uid-1"));
        // A file whose Process is gone (deleted while the janitor was not
        // watching) goes at the next sweep.
        std::fs::write(svc.path("uid-orphan"), b"").unwrap();
        svc.sweep().await.unwrap();
        assert!(!svc.path("uid-orphan").exists());
        assert!(svc.path("uid-2").exists());
    }

    /// Each append's bytes carry the time the server received them; a log
    /// written before time records has time 0; every record still counts.
    #[test]
    fn chunks_carry_the_time_their_append_was_received() {
        let mut counts = Counts::default();
        let mut log = Vec::new();
        // Output kept before time records: data with no time before it.
        push_record(&mut log, 0, 0, 4, b"old\n");
        counts.fold(&log);
        for (s, data, now) in [(0usize, &b"a\n"[..], 1_000i64), (1, b"e\n", 2_000), (0, b"b\n", 3_000)] {
            let (rec, next) = counts.append(s, counts.lens[s], data, 0, 10, now).unwrap().unwrap();
            log.extend_from_slice(&rec);
            counts = next;
        }
        // Past the limit of 10 bytes: what is kept and the marker get a time.
        let (rec, next) = counts.append(0, counts.lens[0], b"cccc\n", 0, 10, 4_000).unwrap().unwrap();
        log.extend_from_slice(&rec);
        counts = next;
        let mut refolded = Counts::default();
        assert_eq!(refolded.fold(&log), log.len());
        assert_eq!((refolded.lens, refolded.kept), (counts.lens, counts.kept));
        let mut chunks = Vec::new();
        let mut at = ReadPos::default();
        chunks_of(&bytes::Bytes::from(log), &mut at, "p", &mut chunks);
        let got: Vec<(i32, &[u8], i64, bool)> =
            chunks.iter().map(|c| (c.stream, &c.data[..], c.time_unix_ms, c.notice)).collect();
        assert_eq!(
            got[..4],
            [
                (0, &b"old\n"[..], 0, false),
                (0, b"a\n", 1_000, false),
                (1, b"e\n", 2_000, false),
                (0, b"b\n", 3_000, false)
            ]
        );
        assert_eq!(got[4], (0, &b"cc"[..], 4_000, false));
        assert_eq!((got[5].2, got[5].3), (4_000, true), "the truncation marker: {got:?}");
        assert_eq!(got.len(), 6);
        assert_eq!(at.lens, [13, 2]);
    }

    /// Bytes an agent lost (its spool kept the newest) fill a gap they
    /// cover: counted, marked, told to readers, idempotent; any other gap
    /// is refused.
    #[test]
    fn lost_bytes_fill_only_the_gap_they_cover() {
        let mut counts = Counts::default();
        let mut log = Vec::new();
        let (rec, next) = counts.append(0, 0, b"head\n", 0, 1 << 20, 1).unwrap().unwrap();
        log.extend_from_slice(&rec);
        counts = next;
        // A gap of 95 bytes that 90 lost bytes do not cover.
        let err = counts.append(0, 100, b"tail\n", 90, 1 << 20, 2).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        let (rec, next) = counts.append(0, 100, b"tail\n", 95, 1 << 20, 2).unwrap().unwrap();
        log.extend_from_slice(&rec);
        counts = next;
        assert_eq!((counts.lens[0], counts.kept[0], counts.truncated[0]), (105, 10, true));
        // Sent again (the agent restarted): nothing new.
        assert!(counts.append(0, 100, b"tail\n", 95, 1 << 20, 3).unwrap().is_none());
        // Lost to the very end: an empty chunk still counts them.
        let (rec, next) = counts.append(0, 120, b"", 15, 1 << 20, 4).unwrap().unwrap();
        log.extend_from_slice(&rec);
        counts = next;
        assert_eq!(counts.lens[0], 120);
        let mut chunks = Vec::new();
        let mut at = ReadPos::default();
        chunks_of(&bytes::Bytes::from(log), &mut at, "p", &mut chunks);
        let text: Vec<(bool, String)> =
            chunks.iter().map(|c| (c.notice, String::from_utf8_lossy(&c.data).into_owned())).collect();
        assert_eq!(text[0], (false, "head\n".into()));
        assert!(text[1].0 && text[1].1.contains("95 bytes of stdout lost"), "{text:?}");
        assert_eq!(text[2], (false, "tail\n".into()));
        assert!(text[3].0 && text[3].1.contains("15 bytes of stdout lost"), "{text:?}");
        assert_eq!(at.lens[0], 120);
    }

    /// A chunk names the uid of the Process it is from: once a Process of
    /// that name with another uid took its place (a test's next attempt),
    /// its bytes never go into the other's output.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_for_a_process_that_is_gone_is_not_appended_to_its_namesake() {
        let dir = tempfile::tempdir().unwrap();
        let (store, api) = api_state(&dir).await;
        put_process(&store, 0, ProcessPhase::Running.as_str()).await;
        let svc = OutputService::new(dir.path().join("output"), api, DEFAULT_LIMIT, None).unwrap();
        let chunk = |uid: &str, offset: u64| OutputChunk {
            process: "p0".into(),
            process_uid: uid.into(),
            offset,
            data: bytes::Bytes::from_static(b"x\n"),
            ..Default::default()
        };
        svc.append(local(chunk("uid-0", 0))).await.unwrap();
        svc.append(local(chunk("uid-0", 2))).await.unwrap();
        // p0 made again, with another uid.
        let mut again =
            Process::from_stored(&store.get(&hub::key(Kind::Process, "p0")).await.unwrap().unwrap().value, 0).unwrap();
        again.meta_mut().uid = "uid-new".into();
        store.txn(vec![], vec![Op::Put(hub::key(Kind::Process, "p0"), again.to_stored())]).await.unwrap();
        // Read afresh (a first chunk): refused.
        let e = svc.append(local(chunk("uid-0", 0))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("process_uid") && e.message().contains("is gone"), "{e:?}");
        svc.append(local(chunk("uid-new", 0))).await.unwrap();
        // From the cache (a later chunk): at most its own, gone, log takes
        // it; never the new one's.
        let _ = svc.append(local(chunk("uid-0", 4))).await;
        let log = std::fs::read(svc.path("uid-new")).unwrap();
        let mut counts = Counts::default();
        counts.fold(&log);
        assert_eq!(counts.kept[0], 2, "only the new one's own bytes");
    }

    /// A chunk's time is the server's: one an agent sends is not kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_appenders_own_time_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, api) = api_state(&dir).await;
        put_process(&store, 0, ProcessPhase::Running.as_str()).await;
        let svc = OutputService::new(dir.path().join("output"), api, DEFAULT_LIMIT, None).unwrap();
        let before = testbus_proto::time::unix_ms(std::time::SystemTime::now());
        let forged = OutputChunk {
            process: "p0".into(),
            data: bytes::Bytes::from_static(b"x\n"),
            time_unix_ms: 42,
            ..Default::default()
        };
        svc.append(local(forged)).await.unwrap();
        let req = ReadOutputRequest { process: "p0".into(), follow: false, stdin: false };
        let mut got = svc.read(local(req)).await.unwrap().into_inner();
        let c = got.next().await.unwrap().unwrap();
        assert!(c.time_unix_ms >= before, "{}", c.time_unix_ms);
    }

    async fn wait_until<F, Fut>(mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f().await {
            assert!(tokio::time::Instant::now() < deadline, "condition not reached in 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
