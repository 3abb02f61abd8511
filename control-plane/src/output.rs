//! Process output: one append-only file per process (by uid) in the data
//! dir, holding records `[kind+stream u8][offset u64][len u32][bytes]`:
//! data, a truncation marker (once per stream, when the output limit is
//! reached), or a skip record that counts bytes received but not kept (so
//! offsets stay right across restarts).
//!
//! Appends are idempotent by offset, so an agent can re-send after a
//! reconnect: bytes the server already holds are skipped, a gap is refused
//! (the agent re-sends from the length the error names). Readers that follow
//! wait on a per-log watch channel and stop once the process is terminal and
//! everything has been delivered (agents flush output before they report a
//! final status).
use crate::api::ApiState;
use crate::hub;
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use testbus_proto::output_server::Output;
use testbus_proto::{phase, AppendOutputResponse, Kind, OutputChunk, OutputStream, Process, ReadOutputRequest};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Largest chunk accepted in one append.
pub const MAX_CHUNK: usize = 4 << 20;
/// Default for how much of each stream of a process is kept.
pub const DEFAULT_LIMIT: u64 = 64 << 20;
const HEADER: usize = 1 + 8 + 4;
const MARKER: u8 = 0x40;
const SKIP: u8 = 0x80;

struct LogFile {
    file: std::fs::File,
    /// Bytes received per stream, kept or not: the next expected offset.
    lens: [u64; 2],
    /// Bytes kept per stream.
    kept: [u64; 2],
    truncated: [bool; 2],
    /// Bytes in the file; readers wait for it to grow.
    size: watch::Sender<u64>,
}

#[derive(Clone)]
pub struct OutputService {
    dir: PathBuf,
    /// Bytes kept per stream of a process.
    limit: u64,
    api: ApiState,
    logs: Arc<Mutex<HashMap<String, Arc<Mutex<LogFile>>>>>,
}

fn io_err(e: std::io::Error) -> Status {
    Status::unavailable(format!("output store: {e}"))
}

impl OutputService {
    pub fn new(dir: PathBuf, api: ApiState, limit: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(OutputService { dir, limit, api, logs: Default::default() })
    }

    async fn process(&self, name: &str) -> Result<Process, Status> {
        let kv = self
            .api
            .store
            .get(&hub::key(Kind::Process, name))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("Process {name:?} not found")))?;
        match hub::decode(&kv.key, &kv.value, kv.mod_revision) {
            Some(testbus_proto::Object::Process(p)) => Ok(p),
            _ => Err(Status::data_loss(format!("Process {name:?} is unreadable"))),
        }
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.log"))
    }

    /// Opens a log, recovering stream lengths from its records (a torn last
    /// record from a crash is cut off).
    fn open(&self, uid: &str) -> std::io::Result<Arc<Mutex<LogFile>>> {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = logs.get(uid) {
            return Ok(l.clone());
        }
        let path = self.path(uid);
        let data = std::fs::read(&path).unwrap_or_default();
        let (mut lens, mut kept, mut truncated, mut pos) = ([0u64; 2], [0u64; 2], [false; 2], 0usize);
        while pos + HEADER <= data.len() {
            let tag = data[pos];
            let s = (tag & 1) as usize;
            let len = u32::from_le_bytes(data[pos + 9..pos + 13].try_into().unwrap_or_default()) as usize;
            let body = if tag & SKIP != 0 { 0 } else { len };
            if pos + HEADER + body > data.len() || tag & !(SKIP | MARKER | 1) != 0 {
                break;
            }
            if tag & SKIP != 0 {
                lens[s] += len as u64;
            } else if tag & MARKER != 0 {
                truncated[s] = true;
            } else {
                lens[s] += len as u64;
                kept[s] += len as u64;
            }
            pos += HEADER + body;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        file.set_len(pos as u64)?;
        let (size, _) = watch::channel(pos as u64);
        let l = Arc::new(Mutex::new(LogFile { file, lens, kept, truncated, size }));
        logs.insert(uid.to_string(), l.clone());
        Ok(l)
    }
}

#[tonic::async_trait]
impl Output for OutputService {
    async fn append(&self, req: Request<OutputChunk>) -> Result<Response<AppendOutputResponse>, Status> {
        let c = req.into_inner();
        if c.data.len() > MAX_CHUNK {
            return Err(Status::invalid_argument(format!("data: chunk larger than {MAX_CHUNK} bytes")));
        }
        let stream = OutputStream::try_from(c.stream)
            .map_err(|_| Status::invalid_argument(format!("stream: unknown output stream {}", c.stream)))?;
        let p = self.process(&c.process).await?;
        let uid = p.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let log = self.open(&uid).map_err(io_err)?;
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        let s = stream as usize;
        let have = l.lens[s];
        if c.offset > have {
            return Err(Status::out_of_range(format!(
                "offset: chunk starts at {} but the server holds {have} bytes of {:?}; re-send from {have}",
                c.offset,
                stream.as_str_name()
            )));
        }
        let skip = (have - c.offset) as usize;
        if skip < c.data.len() {
            let data = &c.data[skip..];
            let room = self.limit.saturating_sub(l.kept[s]) as usize;
            let (keep, drop) = data.split_at(data.len().min(room));
            let mut rec = Vec::with_capacity(3 * HEADER + keep.len() + 128);
            let mut record = |tag: u8, offset: u64, len: usize, body: &[u8]| {
                rec.push(tag | s as u8);
                rec.extend_from_slice(&offset.to_le_bytes());
                rec.extend_from_slice(&(len as u32).to_le_bytes());
                rec.extend_from_slice(body);
            };
            if !keep.is_empty() {
                record(0, have, keep.len(), keep);
            }
            if !drop.is_empty() {
                if !l.truncated[s] {
                    let marker = format!(
                        "\n[testbus: {} truncated after {} bytes; the rest is counted but not kept]\n",
                        if s == 0 { "stdout" } else { "stderr" },
                        self.limit
                    );
                    record(MARKER, have + keep.len() as u64, marker.len(), marker.as_bytes());
                }
                record(SKIP, have + keep.len() as u64, drop.len(), &[]);
            }
            l.file.write_all(&rec).map_err(io_err)?;
            l.lens[s] += data.len() as u64;
            l.kept[s] += keep.len() as u64;
            l.truncated[s] |= !drop.is_empty();
            let added = rec.len() as u64;
            l.size.send_modify(|v| *v += added);
        }
        Ok(Response::new(AppendOutputResponse { length: l.lens[s], truncated: l.truncated[s] }))
    }

    type ReadStream = BoxStream<'static, Result<OutputChunk, Status>>;

    async fn read(&self, req: Request<ReadOutputRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let r = req.into_inner();
        let p = self.process(&r.process).await?;
        let uid = p.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let log = self.open(&uid).map_err(io_err)?;
        let mut size_rx = log.lock().unwrap_or_else(|p| p.into_inner()).size.subscribe();
        let path = self.path(&uid);
        let this = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut pos = 0u64;
            let mut lens = [0u64; 2];
            loop {
                // Terminal status is read before draining: output that was
                // flushed before the status is then surely in the file.
                let done = !r.follow
                    || match this.process(&r.process).await {
                        Ok(p) => phase::process_terminal(&p.status.unwrap_or_default().phase),
                        Err(_) => true,
                    };
                let end = *size_rx.borrow_and_update();
                if let Err(e) = drain(&path, &mut pos, end, &mut lens, &r.process, &tx).await {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if done || tx.is_closed() {
                    return;
                }
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), size_rx.changed()).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Sends the records between `pos` and `end`.
async fn drain(
    path: &std::path::Path,
    pos: &mut u64,
    end: u64,
    lens: &mut [u64; 2],
    process: &str,
    tx: &tokio::sync::mpsc::Sender<Result<OutputChunk, Status>>,
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
    let mut f = tokio::io::BufReader::new(f.take(end - *pos));
    loop {
        let mut hdr = [0u8; HEADER];
        match f.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err(e)),
        }
        let s = (hdr[0] & 1) as usize;
        let len = u32::from_le_bytes(hdr[9..13].try_into().unwrap_or_default()) as usize;
        if hdr[0] & SKIP != 0 {
            // Counted, not kept: nothing to read.
            *pos += HEADER as u64;
            lens[s] += len as u64;
            continue;
        }
        let mut data = vec![0u8; len];
        f.read_exact(&mut data).await.map_err(io_err)?;
        *pos += (HEADER + len) as u64;
        let chunk = OutputChunk { process: process.to_string(), stream: s as i32, offset: lens[s], data };
        lens[s] += len as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(());
        }
    }
}
