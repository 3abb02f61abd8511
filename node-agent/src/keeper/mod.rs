//! Keepers: what holds a host's processes while its agent is away (a crash,
//! a restart, an upgrade to a new binary), as conmon holds a container for
//! podman.
//!
//! A keeper is the agent's own binary in its [`SUBCOMMAND`] mode, started
//! by the agent in a session of its own, one per agent (not per process:
//! containerd's shim per pod, not per container), in
//! `DATA_DIR/keepers/<id>/`. It is the parent of every process it runs: it
//! makes the process's cgroup, spawns it, owns its pipes, writes its
//! output to a bounded spool, reaps it, ends what it left behind and
//! records how it ended in its exit log. The agent tells it what to run and
//! when to signal (the policy: timeouts, stops, grace); the keeper does it
//! (the mechanism), and tells the agent what happened.
//!
//! Lifecycle. An agent that starts finds every keeper a predecessor left
//! (`keepers/*/sock`), takes over what each holds and uploads what was
//! spooled while nobody listened; a keeper whose socket does not answer
//! is dead, and its exit log and spool are read instead. New processes go
//! to a keeper of the agent's own build (`build`); an older one is
//! retired: it starts nothing more and exits once the agent has taken the
//! last of its processes' ends. A keeper exits by itself when no agent is
//! connected and it holds nothing, and ends what it holds (SIGKILL) when no
//! agent has come back within its orphan timeout.
//!
//! The protocol is one JSON object per line over the keeper's unix socket
//! (0600 in a 0700 dir: the agent's user only), one agent at a time; a
//! second connection replaces the first.
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

mod born;
pub mod client;
pub mod server;

/// The agent's first argument that selects keeper mode. Not for people.
pub const SUBCOMMAND: &str = "__testbus-keeper";

/// Bumped when a message changes meaning: an agent speaks only to a keeper
/// of its own protocol (it retires and outlives the others).
pub const PROTOCOL: u32 = 1;

/// Largest line either side accepts: a spawn spec (its env and argv are
/// bounded by the API's validation), a welcome listing every held
/// process, a stdin piece ([`STDIN_PIECE`], hex-encoded).
pub const MAX_LINE: usize = 32 << 20;

/// Most stdin bytes in one request.
pub const STDIN_PIECE: usize = 512 << 10;

/// Spool segment size: a stream's bytes `[k·SEGMENT, (k+1)·SEGMENT)` are in
/// the file `<uid>.<stream>.<k>`.
pub const SEGMENT: u64 = 1 << 20;

/// What this binary is: a keeper of another build is retired. (Its
/// version, size and modification time: a new binary differs in one.)
pub fn build() -> String {
    use std::os::unix::fs::MetadataExt;
    let exe = std::env::current_exe().and_then(std::fs::metadata);
    let (size, sec, nsec) = exe.map(|m| (m.len(), m.mtime(), m.mtime_nsec())).unwrap_or_default();
    format!("{}-{size:x}-{sec:x}.{nsec:x}", env!("CARGO_PKG_VERSION"))
}

/// The agent's requests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First on every connection; answered by `Welcome`.
    Hello {
        protocol: u32,
    },
    Spawn(Box<SpawnSpec>),
    /// Signals what holds the process (its group or PID-namespace relay,
    /// and every member of its cgroup), while it has not been reaped.
    Signal {
        uid: String,
        signal: i32,
    },
    /// Bytes for the process's stdin (`stdin: stream`), at `offset` of
    /// what it has been given; answered by `StdinTaken` once written.
    Stdin {
        uid: String,
        offset: u64,
        data: String,
    },
    CloseStdin {
        uid: String,
    },
    /// The server has `stream` up to `upto`: while an agent is connected,
    /// the keeper reads no further than the spool can hold beyond that
    /// (back-pressure on the process, as a pipe gives), rather than drop
    /// what is not uploaded yet.
    Uploaded {
        uid: String,
        stream: u8,
        upto: u64,
    },
    /// The agent has reported the process's end: its spool and record go.
    Forget {
        uid: String,
    },
    /// Start nothing more; exit once nothing is held.
    Retire,
}

/// What the keeper tells the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Welcome {
        protocol: u32,
        build: String,
        pid: u32,
        held: Vec<HeldState>,
        /// It starts new processes (it is not retiring, nor past its
        /// orphan timeout).
        accepting: bool,
    },
    Spawned {
        uid: String,
        pid: i32,
        start_ticks: u64,
    },
    SpawnFailed {
        uid: String,
        stage: SpawnStage,
        errno: Option<i32>,
        message: String,
    },
    /// The spool of `stream` has grown to `end` bytes.
    Output {
        uid: String,
        stream: u8,
        end: u64,
    },
    StdinTaken {
        uid: String,
        upto: u64,
    },
    /// The process ended; everything it left was ended and its pipes read
    /// (or given up on) up to `ends`.
    Exited {
        uid: String,
        exit: ExitStatus,
        ends: [u64; 2],
    },
    /// Something the agent sent could not be done.
    Refused {
        uid: String,
        message: String,
    },
}

impl Event {
    /// The process it is about (none for a welcome).
    pub fn uid(&self) -> Option<&str> {
        match self {
            Event::Spawned { uid, .. }
            | Event::SpawnFailed { uid, .. }
            | Event::Output { uid, .. }
            | Event::StdinTaken { uid, .. }
            | Event::Exited { uid, .. }
            | Event::Refused { uid, .. } => Some(uid),
            Event::Welcome { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SpawnStage {
    /// Its cgroup (or other containment) could not be made.
    Contain,
    /// The command could not be executed.
    Exec,
    /// The keeper is retiring or full.
    Keeper,
}

/// A process as the keeper holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldState {
    pub uid: String,
    pub pid: i32,
    pub start_ticks: u64,
    pub ends: [u64; 2],
    pub stdin_written: u64,
    /// Set once it has ended.
    pub exit: Option<ExitStatus>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// Its keeper could not wait for it.
    Unknown,
}

impl ExitStatus {
    pub fn of(st: std::process::ExitStatus) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match (st.code(), st.signal()) {
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(s)) => ExitStatus::Signal(s),
            (None, None) => ExitStatus::Unknown,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StdinSource {
    Null,
    /// A file to read (a cached file).
    File(PathBuf),
    /// These bytes, then end of file.
    Data(String),
    /// What `Stdin` requests bring, until `CloseStdin`.
    Stream,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SpawnContainment {
    /// A cgroup `p-<uid>` made under this one.
    Cgroup(PathBuf),
    /// A PID namespace of its own, through this binary's `pidns` mode.
    PidNamespace(PathBuf),
    ProcessGroup,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpawnSpec {
    pub uid: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdin: StdinSource,
    pub containment: SpawnContainment,
    /// Most bytes of each stream the spool keeps (the newest).
    pub spool_limit: u64,
}

/// One stream's spool file for segment `k`.
pub fn segment_path(spool: &Path, uid: &str, stream: u8, k: u64) -> PathBuf {
    spool.join(format!("{uid}.{stream}.{k}"))
}

/// The keeper's side of one stream's spool: appends, in segments, keeping
/// at most `limit` bytes (whole segments; the oldest go first).
pub struct SpoolWriter {
    spool: PathBuf,
    uid: String,
    stream: u8,
    /// Bytes written so far: the next byte's offset.
    pub end: u64,
    /// The oldest segment still kept.
    pub first: u64,
    segments: u64,
    file: Option<std::fs::File>,
    /// A segment a write to failed: nothing more goes in it (later bytes
    /// would land at the wrong offset); its missing bytes read as lost.
    dead: Option<u64>,
}

impl SpoolWriter {
    pub fn new(spool: &Path, uid: &str, stream: u8, limit: u64) -> SpoolWriter {
        SpoolWriter {
            spool: spool.to_path_buf(),
            uid: uid.to_string(),
            stream,
            end: 0,
            first: 0,
            segments: limit.div_ceil(SEGMENT).max(2),
            file: None,
            dead: None,
        }
    }

    /// Bytes the spool holds at most: whole segments.
    pub fn capacity(&self) -> u64 {
        self.segments * SEGMENT
    }

    /// Appends `data`. A write that fails (a full disk) still counts its
    /// bytes: the reader finds them missing and reports them lost.
    pub fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let k = self.end / SEGMENT;
            let n = ((k + 1) * SEGMENT - self.end).min(data.len() as u64) as usize;
            if self.file.is_none() && self.dead != Some(k) {
                let path = segment_path(&self.spool, &self.uid, self.stream, k);
                match std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot open a spool segment; bytes lost");
                        self.dead = Some(k);
                    }
                }
            }
            if let Some(f) = &mut self.file {
                if let Err(e) = f.write_all(&data[..n]) {
                    tracing::warn!(process_uid = %self.uid, error = %e, "cannot write the spool; bytes lost");
                    self.file = None;
                    self.dead = Some(k);
                }
            }
            self.end += n as u64;
            data = &data[n..];
            if self.end.is_multiple_of(SEGMENT) {
                self.file = None;
            }
            while (self.end.saturating_sub(1)) / SEGMENT + 1 - self.first > self.segments {
                let _ = std::fs::remove_file(segment_path(&self.spool, &self.uid, self.stream, self.first));
                self.first += 1;
            }
        }
    }
}

/// Removes the segments `[first, …]` of a stream of `end` bytes.
pub fn remove_spool(spool: &Path, uid: &str, stream: u8, first: u64, end: u64) {
    for k in first..=end / SEGMENT {
        let _ = std::fs::remove_file(segment_path(spool, uid, stream, k));
    }
}

/// What one read of a spool gave: `lost` bytes the spool no longer has,
/// then `data`; `stalled` when a segment could not be opened for another
/// reason than its absence (no descriptors left...): try again later.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub lost: u64,
    pub data: Vec<u8>,
    pub stalled: bool,
}

/// The agent's side of one stream's spool.
pub struct SpoolReader {
    pub spool: PathBuf,
    pub uid: String,
    pub stream: u8,
}

impl SpoolReader {
    /// Reads from `offset` towards `end`, at most `max` bytes of data. Bytes
    /// whose segment is gone (the spool was full while nobody read it) or
    /// short (a write failed) are counted as lost, before the data.
    pub fn read(&self, offset: u64, end: u64, max: usize) -> Piece {
        let mut piece = Piece::default();
        let mut at = offset;
        while at < end && piece.data.len() < max {
            let k = at / SEGMENT;
            let seg_end = end.min((k + 1) * SEGMENT);
            let want = ((seg_end - at) as usize).min(max - piece.data.len());
            let mut got = Vec::new();
            match std::fs::File::open(segment_path(&self.spool, &self.uid, self.stream, k)) {
                Ok(mut f) => {
                    if f.seek(std::io::SeekFrom::Start(at - k * SEGMENT)).is_ok() {
                        let _ = Read::by_ref(&mut f).take(want as u64).read_to_end(&mut got);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {
                    piece.stalled = true;
                    break;
                }
            }
            if got.is_empty() {
                if !piece.data.is_empty() {
                    break; // a gap after data: the next read says so
                }
                piece.lost += seg_end - at;
                at = seg_end;
                continue;
            }
            at += got.len() as u64;
            let short = got.len() < want;
            piece.data.extend_from_slice(&got);
            if short {
                break;
            }
        }
        piece
    }

    /// Removes the segments wholly below `offset` (uploaded).
    pub fn remove_below(&self, from: u64, offset: u64) {
        for k in from / SEGMENT..offset / SEGMENT {
            let _ = std::fs::remove_file(segment_path(&self.spool, &self.uid, self.stream, k));
        }
    }
}

/// A keeper's exit log: one checked line per exit and per forget, so that a
/// keeper that died still tells how what it held ended.
pub struct ExitLog {
    file: std::fs::File,
    path: PathBuf,
    records: usize,
}

/// What an exit log says of a process it recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRecord {
    pub exit: ExitStatus,
    pub ends: [u64; 2],
}

impl ExitLog {
    pub fn open(path: &Path) -> std::io::Result<ExitLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(ExitLog { file, path: path.to_path_buf(), records: 0 })
    }

    pub fn exited(&mut self, uid: &str, r: ExitRecord) {
        self.append(&Self::exit_payload(uid, r));
    }

    pub fn forgot(&mut self, uid: &str) {
        self.append(&format!("forget {uid}"));
    }

    /// Whether the log has grown enough to be rewritten.
    pub fn wants_compaction(&self) -> bool {
        self.records > 1024
    }

    /// Rewrites the log with only the exits still needed (`live`: of
    /// processes held and not forgotten), whole or not at all (a new file
    /// renamed over the old).
    pub fn compact<'a>(&mut self, live: impl Iterator<Item = (&'a str, ExitRecord)>) {
        let tmp = self.path.with_extension("tmp");
        let rewrite = || -> std::io::Result<(std::fs::File, usize)> {
            let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
            let mut n = 0;
            for (uid, r) in live {
                f.write_all(crate::journal::checksummed(&Self::exit_payload(uid, r)).as_bytes())?;
                n += 1;
            }
            std::fs::rename(&tmp, &self.path)?;
            Ok((std::fs::OpenOptions::new().append(true).open(&self.path)?, n))
        };
        match rewrite() {
            Ok((file, n)) => {
                self.file = file;
                self.records = n;
            }
            Err(e) => tracing::warn!(file = %self.path.display(), error = %e, "cannot compact the exit log"),
        }
    }

    fn exit_payload(uid: &str, r: ExitRecord) -> String {
        let (kind, v) = match r.exit {
            ExitStatus::Code(c) => ("code", c),
            ExitStatus::Signal(s) => ("signal", s),
            ExitStatus::Unknown => ("unknown", 0),
        };
        format!("exit {uid} {kind} {v} {} {}", r.ends[0], r.ends[1])
    }

    fn append(&mut self, payload: &str) {
        // Not fsynced: a keeper outlives a crash of its agent, not of the
        // machine (which ends its processes too).
        if let Err(e) = self.file.write_all(crate::journal::checksummed(payload).as_bytes()) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot write the exit log");
        }
        self.records += 1;
    }

    /// The exits recorded and not forgotten. A line that does not check is
    /// counted in the second value and skipped, never trusted.
    pub fn read(path: &Path) -> (std::collections::HashMap<String, ExitRecord>, usize) {
        let mut out = std::collections::HashMap::new();
        let mut bad = 0;
        let text = std::fs::read(path).unwrap_or_default();
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let parsed = std::str::from_utf8(line).ok().and_then(crate::journal::checked).and_then(|p| {
                let f: Vec<&str> = p.split(' ').collect();
                match f.as_slice() {
                    ["exit", uid, kind, v, o, e] if crate::journal::plausible_uid(uid) => {
                        let v: i32 = v.parse().ok()?;
                        let exit = match *kind {
                            "code" => ExitStatus::Code(v),
                            "signal" => ExitStatus::Signal(v),
                            "unknown" => ExitStatus::Unknown,
                            _ => return None,
                        };
                        Some((uid.to_string(), Some(ExitRecord { exit, ends: [o.parse().ok()?, e.parse().ok()?] })))
                    }
                    ["forget", uid] if crate::journal::plausible_uid(uid) => Some((uid.to_string(), None)),
                    _ => None,
                }
            });
            match parsed {
                Some((uid, Some(r))) => {
                    out.insert(uid, r);
                }
                Some((uid, None)) => {
                    out.remove(&uid);
                }
                None => bad += 1,
            }
        }
        (out, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "0b7c6f2e-0000-4000-8000-00000000000a";

    #[test]
    fn a_full_spool_keeps_the_newest_bytes_and_says_what_was_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::new(dir.path(), U, 0, 2 * SEGMENT);
        let data: Vec<u8> = (0..(5 * SEGMENT + 123)).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(70_001) {
            w.write(piece);
        }
        assert_eq!(w.end, data.len() as u64);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "two segments kept");
        let r = SpoolReader { spool: dir.path().to_path_buf(), uid: U.into(), stream: 0 };
        let mut at = 0;
        let mut lost = 0;
        let mut got = Vec::new();
        while at < w.end {
            let p = r.read(at, w.end, 300_000);
            assert!(p.lost > 0 || !p.data.is_empty(), "a read makes progress");
            lost += p.lost;
            at += p.lost + p.data.len() as u64;
            got.extend_from_slice(&p.data);
        }
        assert_eq!(lost, 4 * SEGMENT, "the oldest segments went");
        assert_eq!(&got[..], &data[(4 * SEGMENT) as usize..], "the newest bytes are kept, exactly");
        remove_spool(dir.path(), U, 0, 0, w.end);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_short_or_missing_segment_is_lost_not_invented() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::new(dir.path(), U, 1, 64 * SEGMENT);
        w.write(&vec![7u8; (SEGMENT + 10) as usize]);
        // A hand (or a full disk) cut the first segment short.
        let first = segment_path(dir.path(), U, 1, 0);
        std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(100).unwrap();
        let r = SpoolReader { spool: dir.path().to_path_buf(), uid: U.into(), stream: 1 };
        assert_eq!(r.read(0, w.end, 1 << 30), Piece { lost: 0, data: vec![7; 100], stalled: false });
        let p = r.read(100, w.end, 1 << 30);
        assert_eq!((p.lost, p.data.len()), (SEGMENT - 100, 10));
        r.remove_below(0, SEGMENT);
        assert!(!first.exists());
    }

    #[test]
    fn the_exit_log_skips_what_does_not_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exits");
        let mut log = ExitLog::open(&path).unwrap();
        let b = "0b7c6f2e-0000-4000-8000-00000000000b";
        log.exited(U, ExitRecord { exit: ExitStatus::Code(3), ends: [10, 0] });
        log.exited(b, ExitRecord { exit: ExitStatus::Signal(9), ends: [0, 5] });
        log.forgot(b);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"garbage\n");
        let forged = crate::journal::checksummed(&format!("exit {U} code 0 10 0")).replace("code 0", "code 1");
        bytes.extend_from_slice(forged.as_bytes());
        bytes.extend_from_slice(crate::journal::checksummed("exit ../x code 0 0 0").as_bytes());
        std::fs::write(&path, bytes).unwrap();
        let (exits, bad) = ExitLog::read(&path);
        assert_eq!(bad, 3);
        assert_eq!(exits.len(), 1);
        assert_eq!(exits[U], ExitRecord { exit: ExitStatus::Code(3), ends: [10, 0] });
        // Compacted: only what is still needed, and appends go on after it.
        let mut log = ExitLog::open(&path).unwrap();
        log.compact([(U, exits[U])].into_iter());
        log.exited(b, ExitRecord { exit: ExitStatus::Code(0), ends: [1, 1] });
        let (after, bad) = ExitLog::read(&path);
        assert_eq!((after.len(), bad), (2, 0));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
