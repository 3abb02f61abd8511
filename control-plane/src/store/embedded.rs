//! The embedded store: one redb file in the data dir.
//!
//! redb gives crash-safe, fsynced transactions; on top of it this keeps a
//! global revision, the key's create/mod revisions and an event log of the
//! last `retain` revisions for watch resumption.
//!
//! Writes go to one writer thread, which commits every transaction waiting
//! for it in one redb transaction (group commit): each keeps its own
//! revision and compares, and none is acknowledged before the fsync that
//! makes it durable. So many concurrent writers share one fsync instead of
//! queueing for one each. The writer holds a mutex across commit and
//! broadcast, so live events leave in revision order and a new watcher can
//! read the log and subscribe atomically.
use super::*;
use futures::StreamExt;
use parking_lot::{MappedRwLockReadGuard, Mutex, RwLock, RwLockReadGuard};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::broadcast;

/// redb's page cache (its default is 1 GiB, which a control plane that
/// saw tens of thousands of tests then kept resident): the objects a
/// control plane reads again are few, and the watch cache holds the rest.
const CACHE_BYTES: usize = 64 << 20;

/// Commits' events kept for watchers that lag (see `open_with_reserve`).
const EVENT_BATCHES_KEPT: usize = 1024;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
/// The oldest revision still in the log.
const META_OLDEST: &str = "oldest";

/// Largest value accepted (matches etcd's default request limit).
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    writer: Arc<Writer>,
}

/// Most transactions committed together.
const MAX_BATCH: usize = 512;
/// How long a commit waits for the writers the previous commit answered
/// (see `write_loop`).
const LINGER: std::time::Duration = std::time::Duration::from_micros(200);

type Reply = tokio::sync::oneshot::Sender<Result<TxnOutcome, StoreError>>;

struct WriteRequest {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    reply: Reply,
}

/// The writer thread and the way to it. Dropping the last handle of the
/// store ends the thread and waits for it, so the file can be opened again
/// at once.
struct Writer {
    tx: Option<std::sync::mpsc::Sender<WriteRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Inner {
    /// `None` once closed. Every read and commit holds a read guard while
    /// it uses the database, so `close` (taking the write guard) waits for
    /// them and then drops it: the file is unlocked when `close` returns,
    /// however many handles of the store live on in late tasks.
    db: RwLock<Option<Database>>,
    dir: std::path::PathBuf,
    /// Writes are refused while less than this is free in `dir`.
    min_free: u64,
    /// Held across commit + broadcast, and by new watchers while they read
    /// the log and subscribe.
    write_lock: Mutex<()>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    retain: u64,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Inner {
    /// The open database, or an error once the store is closed.
    fn db(&self) -> Result<MappedRwLockReadGuard<'_, Database>, StoreError> {
        RwLockReadGuard::try_map(self.db.read(), Option::as_ref).map_err(|_| backend("the store is closed"))
    }
}

impl EmbeddedStore {
    /// Live watches on the store (for tests).
    #[cfg(test)]
    pub fn watch_count(&self) -> usize {
        self.inner.events.receiver_count()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file. `retain` revisions of events are
    /// kept for watchers that resume.
    pub fn open(path: &Path, retain: u64) -> Result<Self, StoreError> {
        Self::open_with_reserve(path, retain, 0)
    }

    /// Like `open`, refusing writes while less than `min_free` bytes are
    /// free on the store's file system (a full disk would otherwise leave
    /// the database unusable until reopened).
    pub fn open_with_reserve(path: &Path, retain: u64, min_free: u64) -> Result<Self, StoreError> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(backend)?;
        let w = db.begin_write().map_err(backend)?;
        {
            w.open_table(KV).map_err(backend)?;
            w.open_table(LOG).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            if meta.get(META_OLDEST).map_err(backend)?.is_none() {
                meta.insert(META_OLDEST, 1).map_err(backend)?;
                meta.insert(META_REVISION, 0).map_err(backend)?;
            }
        }
        w.commit().map_err(backend)?;
        // A broadcast channel keeps its last `capacity` batches (values
        // included) until new ones overwrite them, read or not: 4,096 kept
        // a control plane that had seen 20,000 tests at hundreds of MB after
        // they were gone. A watcher more than this many commits behind gets
        // Compacted and lists again (the hub's follower keeps up by far).
        let (events, _) = broadcast::channel(EVENT_BATCHES_KEPT);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let inner = Arc::new(Inner {
            db: RwLock::new(Some(db)),
            dir,
            min_free,
            write_lock: Mutex::new(()),
            events,
            retain: retain.max(1),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || inner.write_loop(rx))
                .map_err(backend)?
        };
        Ok(EmbeddedStore { inner, writer: Arc::new(Writer { tx: Some(tx), thread: Some(thread) }) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(backend)?
    }
}

fn encode_record(value: &[u8], create: u64, modrev: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modrev.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_record(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < 16 {
        return Err(StoreError::Backend(format!("corrupt record for {key}")));
    }
    Ok(KeyValue {
        key: key.to_string(),
        create_revision: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        mod_revision: u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default()),
        value: raw[16..].to_vec(),
    })
}

/// Log entry: the events of one revision.
fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for ev in events {
        let (tag, kv) = match ev {
            Event::Put(kv) => (0u8, kv),
            Event::Delete(kv) => (1u8, kv),
        };
        out.push(tag);
        out.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
        out.extend_from_slice(kv.key.as_bytes());
        out.extend_from_slice(&kv.create_revision.to_le_bytes());
        out.extend_from_slice(&kv.mod_revision.to_le_bytes());
        out.extend_from_slice(&(kv.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&kv.value);
    }
    out
}

fn decode_events(mut raw: &[u8]) -> Result<Vec<Event>, StoreError> {
    let corrupt = || StoreError::Backend("corrupt event log entry".into());
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if raw.len() < n {
            return None;
        }
        let (a, b) = raw.split_at(n);
        *raw = b;
        Some(a)
    }
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize;
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let mut out = Vec::new();
    while !raw.is_empty() {
        let tag = take(&mut raw, 1).ok_or_else(corrupt)?[0];
        let klen = u32_of(take(&mut raw, 4).ok_or_else(corrupt)?);
        let key = String::from_utf8(take(&mut raw, klen).ok_or_else(corrupt)?.to_vec()).map_err(|_| corrupt())?;
        let create_revision = u64_of(take(&mut raw, 8).ok_or_else(corrupt)?);
        let mod_revision = u64_of(take(&mut raw, 8).ok_or_else(corrupt)?);
        let vlen = u32_of(take(&mut raw, 4).ok_or_else(corrupt)?);
        let value = take(&mut raw, vlen).ok_or_else(corrupt)?.to_vec();
        let kv = KeyValue { key, value, create_revision, mod_revision };
        out.push(if tag == 0 { Event::Put(kv) } else { Event::Delete(kv) });
    }
    Ok(out)
}

/// Fails, naming the directory, when fewer than `min_free` bytes are free
/// on the file system holding `dir`.
pub fn check_free_space(dir: &Path, min_free: u64) -> Result<(), StoreError> {
    if min_free == 0 {
        return Ok(());
    }
    let st =
        nix::sys::statvfs::statvfs(dir).map_err(|e| StoreError::Backend(format!("statvfs {}: {e}", dir.display())))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < min_free {
        return Err(StoreError::Full(format!(
            "{free} bytes free in {}, below the {min_free} bytes kept in reserve; writes are refused until space is freed",
            dir.display()
        )));
    }
    Ok(())
}

/// The tables of one redb write transaction, and the revision reached.
struct Batch<'a> {
    kv: redb::Table<'a, &'static str, &'static [u8]>,
    log: redb::Table<'a, u64, &'static [u8]>,
    meta: redb::Table<'a, &'static str, u64>,
    revision: u64,
}

impl Inner {
    /// Serves write requests until every handle of the store is gone.
    fn write_loop(&self, rx: std::sync::mpsc::Receiver<WriteRequest>) {
        let mut last = 1;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // The writers the last commit answered are on their way back
            // with their next writes; after a commit that had company, a
            // short wait for them lets one fsync carry more. A lone writer
            // (last == 1) never waits.
            if batch.len() < last {
                // A thread of its own on a std channel: the real clock.
                #[allow(clippy::disallowed_types)]
                let deadline = std::time::Instant::now() + LINGER;
                while batch.len() < last {
                    #[allow(clippy::disallowed_types)]
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
            }
            last = batch.len();
            self.commit_batch(batch);
        }
    }

    /// Applies the requests in order in one transaction and commits it;
    /// then publishes their events and answers each.
    fn commit_batch(&self, batch: Vec<WriteRequest>) {
        let _guard = self.write_lock.lock();
        // An error inside the batch (not a failed compare) aborts all of
        // it: nothing of a half-applied transaction may be committed.
        let mut results = Vec::with_capacity(batch.len());
        let committed = (|| {
            if batch.iter().any(|r| !r.ops.is_empty()) {
                check_free_space(&self.dir, self.min_free)?;
            }
            let db = self.db()?;
            let w = db.begin_write().map_err(backend)?;
            {
                let meta = w.open_table(META).map_err(backend)?;
                let revision = meta.get(META_REVISION).map_err(backend)?.map(|g| g.value()).unwrap_or(0);
                let mut b = Batch {
                    kv: w.open_table(KV).map_err(backend)?,
                    log: w.open_table(LOG).map_err(backend)?,
                    meta,
                    revision,
                };
                for r in &batch {
                    results.push(self.apply(&mut b, &r.compares, &r.ops)?);
                }
                let oldest = b.meta.get(META_OLDEST).map_err(backend)?.map(|g| g.value()).unwrap_or(1);
                if b.revision >= oldest + self.retain {
                    let cut = b.revision + 1 - self.retain;
                    b.log.retain_in(oldest..cut, |_, _| false).map_err(backend)?;
                    b.meta.insert(META_OLDEST, cut).map_err(backend)?;
                }
                b.meta.insert(META_REVISION, b.revision).map_err(backend)?;
            }
            w.commit().map_err(backend)
        })();
        let mut results = results.into_iter();
        for req in batch {
            let answer = match &committed {
                Err(e) => Err(e.clone()),
                Ok(()) => match results.next() {
                    Some((outcome, events)) => {
                        if !events.is_empty() {
                            // No receivers is fine: nobody watches yet.
                            let _ = self.events.send(Arc::new(events));
                        }
                        Ok(outcome)
                    }
                    None => Err(backend("write batch cut short")),
                },
            };
            let _ = req.reply.send(answer);
        }
    }

    /// One transaction inside a batch (a failed compare leaves the others
    /// alone).
    fn apply(
        &self,
        b: &mut Batch<'_>,
        compares: &[Compare],
        ops: &[Op],
    ) -> Result<(TxnOutcome, Vec<Event>), StoreError> {
        let current = b.revision;
        for Compare::ModRevision(key, want) in compares {
            let have = match b.kv.get(key.as_str()).map_err(backend)? {
                Some(raw) => decode_record(key, raw.value())?.mod_revision,
                None => 0,
            };
            if have != *want {
                return Ok((TxnOutcome { succeeded: false, revision: current }, vec![]));
            }
        }
        let rev = current + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put(key, value) => {
                    let create = match b.kv.get(key.as_str()).map_err(backend)? {
                        Some(raw) => decode_record(key, raw.value())?.create_revision,
                        None => rev,
                    };
                    b.kv.insert(key.as_str(), encode_record(value, create, rev).as_slice()).map_err(backend)?;
                    events.push(Event::Put(KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: create,
                        mod_revision: rev,
                    }));
                }
                Op::Delete(key) => {
                    let old = b.kv.remove(key.as_str()).map_err(backend)?.map(|g| g.value().to_vec());
                    if let Some(raw) = old {
                        let mut last = decode_record(key, &raw)?;
                        last.mod_revision = rev;
                        events.push(Event::Delete(last));
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok((TxnOutcome { succeeded: true, revision: current }, events));
        }
        b.log.insert(rev, encode_events(&events).as_slice()).map_err(backend)?;
        b.revision = rev;
        Ok((TxnOutcome { succeeded: true, revision: rev }, events))
    }
}

#[tonic::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |i| {
            let db = i.db()?;
            let r = db.begin_read().map_err(backend)?;
            let kv = r.open_table(KV).map_err(backend)?;
            match kv.get(key.as_str()).map_err(backend)? {
                Some(raw) => Ok(Some(decode_record(&key, raw.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| {
            let db = i.db()?;
            let r = db.begin_read().map_err(backend)?;
            let kv = r.open_table(KV).map_err(backend)?;
            let meta = r.open_table(META).map_err(backend)?;
            let rev = meta.get(META_REVISION).map_err(backend)?.map(|g| g.value()).unwrap_or(0);
            let mut out = Vec::new();
            for item in kv.range(prefix.as_str()..).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                out.push(decode_record(key, v.value())?);
            }
            Ok((out, rev))
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        for op in &ops {
            if let Op::Put(key, value) = op {
                if value.len() > MAX_VALUE_BYTES {
                    return Err(StoreError::TooLarge { key: key.clone(), size: value.len(), limit: MAX_VALUE_BYTES });
                }
            }
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let tx = self.writer.tx.as_ref().ok_or_else(|| backend("the store is closed"))?;
        tx.send(WriteRequest { compares, ops, reply }).map_err(|_| backend("the store writer has stopped"))?;
        answer.await.map_err(|_| backend("the store writer has stopped"))?
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream, StoreError> {
        let p = prefix.to_string();
        let (backlog, rx) = self
            .blocking(move |i| {
                let _guard = i.write_lock.lock();
                let db = i.db()?;
                let r = db.begin_read().map_err(backend)?;
                let meta = r.open_table(META).map_err(backend)?;
                let oldest = meta.get(META_OLDEST).map_err(backend)?.map(|g| g.value()).unwrap_or(1);
                if after + 1 < oldest {
                    return Err(StoreError::Compacted { requested: after, oldest });
                }
                let log = r.open_table(LOG).map_err(backend)?;
                let mut backlog = Vec::new();
                for item in log.range(after + 1..).map_err(backend)? {
                    let (_, v) = item.map_err(backend)?;
                    backlog.extend(decode_events(v.value())?.into_iter().filter(|e| e.kv().key.starts_with(&p)));
                }
                Ok((backlog, i.events.subscribe()))
            })
            .await?;
        let prefix = prefix.to_string();
        let live = tokio_stream::wrappers::BroadcastStream::new(rx)
            .map(move |r| match r {
                Ok(batch) => Ok(batch.iter().filter(|e| e.kv().key.starts_with(&prefix)).cloned().collect::<Vec<_>>()),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(_)) => {
                    Err(StoreError::Compacted { requested: after, oldest: 0 })
                }
            })
            .scan(false, |failed, r| {
                // After a lag the stream ends with one Compacted error.
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = r.is_err();
                futures::future::ready(Some(r))
            })
            .flat_map(|r| match r {
                Ok(evs) => futures::stream::iter(evs.into_iter().map(Ok).collect::<Vec<_>>()),
                Err(e) => futures::stream::iter(vec![Err(e)]),
            });
        Ok(futures::stream::iter(backlog.into_iter().map(Ok)).chain(live).boxed())
    }

    async fn close(&self) {
        let inner = self.inner.clone();
        // Waits for the reads and the commit in flight (each holds a read
        // guard); a blocking wait, so off the runtime.
        let _ = tokio::task::spawn_blocking(move || inner.db.write().take()).await;
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|i| {
            let db = i.db()?;
            let r = db.begin_read().map_err(backend)?;
            let meta = r.open_table(META).map_err(backend)?;
            Ok(meta.get(META_REVISION).map_err(backend)?.map(|g| g.value()).unwrap_or(0))
        })
        .await
    }
}
