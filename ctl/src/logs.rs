//! `logs`: a process's output raw, or a test's output with each line
//! prefixed by where it came from; `-f` follows until the test ends.
use crate::error::{CliError, CliResult};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use testbus_client::{watcher, Client, WatcherEvent};
use testbus_proto::states::ProcessPhase;
use testbus_proto::{phase, OutputChunk, Process, ReadOutputRequest, Resource, Test};

/// Which processes of a test to show, and which of their lines.
#[derive(Clone, Default)]
pub struct Select {
    pub role: Option<String>,
    pub step: Option<String>,
    pub lines: Lines,
}

impl Select {
    /// An error if `--role` or `--step` names nothing in test `t` (it would
    /// show nothing, and say nothing about why).
    fn check(&self, t: &Test) -> CliResult<()> {
        if let Some(r) = &self.role {
            let members: Vec<String> = t.spec().hosts.iter().flat_map(testbus_proto::validate::members).collect();
            if !members.iter().any(|m| testbus_proto::validate::member_matches(m, r)) {
                return Err(crate::error::CliError::usage(format!(
                    "--role {r}: test/{} has no such role or member (members: {})",
                    t.name(),
                    members.join(", ")
                )));
            }
        }
        if let Some(s) = &self.step {
            let steps: Vec<String> = testbus_proto::steps::expand(t.spec()).into_iter().map(|e| e.step.name).collect();
            if !steps.contains(s) {
                return Err(crate::error::CliError::usage(format!(
                    "--step {s}: test/{} has no such step (steps: {})",
                    t.name(),
                    steps.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn matches(&self, p: &Process) -> bool {
        let role = &p.spec().role;
        // --role client matches client0, client1, ...
        self.role.as_ref().is_none_or(|r| testbus_proto::validate::member_matches(role, r))
            && self.step.as_ref().is_none_or(|s| &p.spec().step == s)
    }
}

/// Which lines of each process's output are shown, and how (`logs
/// --tail/--since/--timestamps`). The default shows everything, raw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lines {
    /// Only the last N lines (then what follows, when following).
    pub tail: Option<usize>,
    /// Only output the server received at or after this time (ms since the
    /// epoch).
    pub since_unix_ms: Option<i64>,
    /// Each line starts with the time the server received it (RFC 3339).
    pub timestamps: bool,
}

impl Lines {
    /// Whether output can be copied as it comes, without cutting it into
    /// lines.
    fn raw(&self) -> bool {
        self.tail.is_none() && self.since_unix_ms.is_none() && !self.timestamps
    }

    fn shown(&self, c: &OutputChunk) -> bool {
        self.since_unix_ms.is_none_or(|t| c.time_unix_ms >= t)
    }
}

/// Cuts one stream's chunks into lines, each with the time its first byte
/// was received; what is left is an unfinished line.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
    partial_time: i64,
}

impl LineSplitter {
    /// Feeds `data`, received at `time`; `line` gets each complete line
    /// (its newline included) with its time.
    fn feed(&mut self, data: &[u8], time: i64, mut line: impl FnMut(i64, &[u8])) {
        let mut rest = data;
        while !rest.is_empty() {
            if self.partial.is_empty() {
                self.partial_time = time;
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    line(self.partial_time, &self.partial);
                    self.partial.clear();
                }
                None => {
                    self.partial.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
    }

    /// The unfinished line, taken out.
    fn take_partial(&mut self) -> Option<(i64, Vec<u8>)> {
        (!self.partial.is_empty()).then(|| (self.partial_time, std::mem::take(&mut self.partial)))
    }
}

/// Writes complete lines, each with its time (when asked) and a prefix;
/// a final partial line gets a newline.
struct LineWriter {
    prefix: String,
    timestamps: bool,
    lines: LineSplitter,
}

impl LineWriter {
    fn new(prefix: String, timestamps: bool) -> Self {
        LineWriter { prefix, timestamps, lines: LineSplitter::default() }
    }

    fn feed(&mut self, data: &[u8], time: i64, out: &mut impl Write) {
        let (prefix, timestamps) = (&self.prefix, self.timestamps);
        self.lines.feed(data, time, |t, line| write_line(out, timestamps, t, prefix, line));
    }

    fn finish(&mut self, out: &mut impl Write) {
        if let Some((t, mut line)) = self.lines.take_partial() {
            line.push(b'\n');
            write_line(out, self.timestamps, t, &self.prefix, &line);
        }
    }
}

fn write_line(out: &mut impl Write, timestamps: bool, time: i64, prefix: &str, line: &[u8]) {
    if timestamps {
        let _ = write!(out, "{} ", stamp(time));
    }
    let _ = out.write_all(prefix.as_bytes());
    let _ = out.write_all(line);
}

/// A chunk's time as `--timestamps` prints it.
fn stamp(ms: i64) -> String {
    match ms {
        0 => "-".to_string(),
        ms => testbus_proto::time::format_unix_ms(ms),
    }
}

/// Whether each line says which role and host it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// `[role/host] line`.
    Always,
    /// Raw, as the process wrote it.
    Never,
}

/// Whether output is copied as it is now, or followed until it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// What there is now.
    No,
    /// Until the process (or test) has ended and all its output is in.
    Yes,
}

/// The end of what one failed process of a test wrote to stderr.
pub struct FailedTail {
    pub step: String,
    pub role: String,
    pub host: String,
    pub lines: Vec<String>,
}

/// The stderr tails of the processes of test `t`'s steps (of `step` only,
/// when given) that did not succeed; processes that wrote nothing to
/// stderr, or are gone, are left out.
pub async fn failed_tails(client: &Client, t: &Test, step: Option<&str>) -> CliResult<Vec<FailedTail>> {
    let mut out = Vec::new();
    for (step, p) in testbus_report::failed_processes(t, step) {
        let lines = match stderr_tail(client, &p.name, testbus_report::FAILED_TAIL_LINES).await {
            Ok(lines) => lines,
            Err(e) if e.code == crate::error::USAGE => continue, // deleted meanwhile
            Err(e) => return Err(e),
        };
        if !lines.is_empty() {
            out.push(FailedTail { step: step.to_string(), role: p.role.clone(), host: p.host.clone(), lines });
        }
    }
    Ok(out)
}

/// The last `n` lines a process wrote to stderr (only the last 16 KiB are
/// kept while reading).
async fn stderr_tail(client: &Client, name: &str, n: usize) -> CliResult<Vec<String>> {
    const KEEP: usize = 16 << 10;
    let req = ReadOutputRequest { process: name.to_string(), follow: false, stdin: false };
    let mut stream = client.output().read(req).await?.into_inner();
    let mut tail: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if chunk.stream == 1 && !chunk.notice {
            tail.extend_from_slice(&chunk.data);
            if tail.len() > 2 * KEEP {
                tail.drain(..tail.len() - KEEP);
            }
        }
    }
    Ok(testbus_report::last_lines(&String::from_utf8_lossy(&tail), n))
}

/// How many bytes of each stream (stdout, stderr) of a process the server
/// holds, counted from its chunks' offsets.
pub async fn output_sizes(client: &Client, name: &str) -> CliResult<[u64; 2]> {
    let req = ReadOutputRequest { process: name.to_string(), follow: false, stdin: false };
    let mut stream = client.output().read(req).await?.into_inner();
    let mut sizes = [0u64; 2];
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if !chunk.notice {
            let s = usize::from(chunk.stream == 1);
            sizes[s] = sizes[s].max(chunk.offset + chunk.data.len() as u64);
        }
    }
    Ok(sizes)
}

/// One line of a process's output, as `--tail` keeps it.
struct TailLine {
    stderr: bool,
    time: i64,
    bytes: Vec<u8>,
}

/// The last `n` lines of a process's output now (of both streams, in the
/// order received; of those shown by `lines`), and where in each stream
/// the output after them starts: a last line not yet ended is left to what
/// follows.
async fn tail_of(client: &Client, name: &str, n: usize, lines: &Lines) -> CliResult<(Vec<TailLine>, [u64; 2])> {
    let req = ReadOutputRequest { process: name.to_string(), follow: false, stdin: false };
    let mut stream = client.output().read(req).await?.into_inner();
    let mut kept: std::collections::VecDeque<TailLine> = std::collections::VecDeque::new();
    let mut splitters = [LineSplitter::default(), LineSplitter::default()];
    let mut ends = [0u64; 2];
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if chunk.notice {
            continue;
        }
        let s = usize::from(chunk.stream == 1);
        ends[s] = chunk.offset + chunk.data.len() as u64;
        if !lines.shown(&chunk) {
            splitters[s].take_partial();
            continue;
        }
        splitters[s].feed(&chunk.data, chunk.time_unix_ms, |time, bytes| {
            kept.push_back(TailLine { stderr: s == 1, time, bytes: bytes.to_vec() });
            if kept.len() > n {
                kept.pop_front();
            }
        });
    }
    for (s, sp) in splitters.iter_mut().enumerate() {
        if let Some((_, p)) = sp.take_partial() {
            ends[s] -= p.len() as u64;
        }
    }
    Ok((kept.into(), ends))
}

/// Copies one process's output to stdout/stderr, optionally prefixed and
/// shaped by `lines`.
pub async fn copy_process(
    client: &Client,
    name: &str,
    prefix: Option<String>,
    follow: Follow,
    lines: &Lines,
) -> CliResult<()> {
    let mut writers = (!lines.raw() || prefix.is_some()).then(|| {
        let p = prefix.unwrap_or_default();
        [LineWriter::new(p.clone(), lines.timestamps), LineWriter::new(p, lines.timestamps)]
    });
    // Bytes of each stream already shown (by --tail).
    let mut skip = [0u64; 2];
    if let Some(n) = lines.tail {
        let (tail, ends) = tail_of(client, name, n, lines).await?;
        if let Some(w) = &mut writers {
            for l in tail {
                let i = usize::from(l.stderr);
                w[i].feed(&l.bytes, l.time, &mut out(l.stderr));
            }
        }
        if follow == Follow::No {
            let _ = std::io::stdout().flush();
            return Ok(());
        }
        skip = ends;
    }
    let req = ReadOutputRequest { process: name.to_string(), follow: follow == Follow::Yes, stdin: false };
    let mut stream = client.output().read(req).await?.into_inner();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        // A note from testbus (the stream was truncated) is not the
        // process's output: it goes to stderr, so a piped stdout holds only
        // what the process wrote (a clean prefix of it).
        if chunk.notice {
            let note = String::from_utf8_lossy(&chunk.data);
            eprintln!("testbusctl: {}: {}", name, note.trim().trim_start_matches("[testbus: ").trim_end_matches(']'));
            continue;
        }
        let is_err = chunk.stream == 1;
        let s = usize::from(is_err);
        let end = chunk.offset + chunk.data.len() as u64;
        if end <= skip[s] || !lines.shown(&chunk) {
            continue;
        }
        let data = &chunk.data[skip[s].saturating_sub(chunk.offset) as usize..];
        match &mut writers {
            Some(w) => w[s].feed(data, chunk.time_unix_ms, &mut out(is_err)),
            None if !is_err => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(data);
                let _ = o.flush();
            }
            None => {
                let _ = std::io::stderr().lock().write_all(data);
            }
        }
    }
    if let Some(w) = &mut writers {
        w[0].finish(&mut out(false));
        w[1].finish(&mut out(true));
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Where a process's stream is copied to.
fn out(stderr: bool) -> Box<dyn Write> {
    if stderr {
        Box::new(std::io::stderr().lock())
    } else {
        Box::new(std::io::stdout().lock())
    }
}

fn prefix_for(t: &Test, p: &Process) -> String {
    if testbus_proto::steps::expand(t.spec()).len() > 1 {
        format!("[{} {}/{}] ", p.spec().step, p.spec().role, p.spec().host_name)
    } else {
        format!("[{}/{}] ", p.spec().role, p.spec().host_name)
    }
}

fn step_index(t: &Test, p: &Process) -> usize {
    testbus_proto::steps::expand(t.spec()).iter().position(|s| s.step.name == p.spec().step).unwrap_or(usize::MAX)
}

/// A test's output. Without `follow`, what there is now, process by process
/// in step order (then commands run with exec, oldest first); with it,
/// every process as it runs, until the test ends.
/// `Prefix::Never` copies output raw (for `run` on one host).
pub async fn test_logs(client: &Client, test: &str, sel: &Select, follow: Follow, prefix: Prefix) -> CliResult<()> {
    let t = client.api::<Test>().get(test).await?;
    sel.check(&t)?;
    let fields = format!("spec.test={test}");
    if follow == Follow::No {
        let (mut procs, _) = client.api::<Process>().list("", &fields).await?;
        procs.retain(|p| p.spec().test_uid == t.meta().uid && sel.matches(p));
        // Steps in step order, each by role; commands run with exec (no
        // step's) after them, in the order they were made.
        let made = |p: &Process| match p.meta().labels.contains_key(testbus_proto::process::LABEL_EXEC) {
            true => p.meta().creation_timestamp.clone(),
            false => String::new(),
        };
        procs.sort_by_cached_key(|p| (step_index(&t, p), made(p), p.spec().role.clone()));
        for p in procs {
            let pre = (prefix == Prefix::Always).then(|| prefix_for(&t, &p));
            copy_process(client, p.name(), pre, Follow::No, &sel.lines).await?;
        }
        return Ok(());
    }
    follow_test(client, &t, sel, prefix, None).await.map(|_| ())
}

/// How following a test's output ended.
pub enum Followed {
    /// The test ended: every output is complete.
    TestEnded,
    /// The expected number of processes ended, each with a verdict of its
    /// own (it succeeded, or exited with a code), before the test's final
    /// status was written: their output is complete.
    ProcessesEnded(Vec<Process>),
}

/// A process whose outcome needs nothing from the test to be told.
fn decided(p: &Process) -> bool {
    let s = p.status();
    s.phase == ProcessPhase::Succeeded || (s.phase == ProcessPhase::Failed && s.exit_code.is_some())
}

/// Streams the output of test `t`'s processes as they come, until the test
/// ends or, with `expected`, until that many processes have ended with a
/// verdict of their own (whichever is first).
pub async fn follow_test(
    client: &Client,
    t: &Test,
    sel: &Select,
    prefix: Prefix,
    expected: Option<usize>,
) -> CliResult<Followed> {
    let test = t.name();
    let fields = format!("spec.test={test}");
    let mut started: HashSet<String> = HashSet::new();
    let mut readers = tokio::task::JoinSet::new();
    let procs = watcher(client.api::<Process>(), String::new(), fields.clone());
    let tests = watcher(client.api::<Test>(), String::new(), format!("metadata.name={test}"));
    futures::pin_mut!(procs, tests);
    let spawn = |p: Process, readers: &mut tokio::task::JoinSet<CliResult<()>>, started: &mut HashSet<String>| {
        if p.spec().test_uid != t.meta().uid || !sel.matches(&p) || !started.insert(p.name().to_string()) {
            return;
        }
        let c = client.clone();
        let pre = (prefix == Prefix::Always).then(|| prefix_for(t, &p));
        let lines = sel.lines;
        readers.spawn(async move { copy_process(&c, p.name(), pre, Follow::Yes, &lines).await });
    };
    let mut ended: HashMap<String, Process> = HashMap::new();
    let mut note = |p: &Process| {
        if p.spec().test_uid == t.meta().uid && phase::process_terminal(&p.status().phase) {
            ended.insert(p.name().to_string(), p.clone());
        }
        expected.is_some_and(|n| ended.len() == n && ended.values().all(decided))
    };
    let mut by_processes = false;
    let mut pending = crate::pending::PendingNote::default();
    while !by_processes {
        tokio::select! {
            ev = procs.next() => match ev {
                Some(WatcherEvent::Restarted(list)) => for p in list {
                    by_processes |= note(&p);
                    spawn(p, &mut readers, &mut started);
                },
                Some(WatcherEvent::Applied(p)) => {
                    by_processes |= note(&p);
                    spawn(p, &mut readers, &mut started);
                }
                _ => {}
            },
            ev = tests.next() => match ev {
                Some(WatcherEvent::Restarted(list)) if list.is_empty() => return Err(CliError::incomplete(format!("test/{test} was deleted"))),
                Some(WatcherEvent::Restarted(list)) if list.iter().any(|t| phase::test_terminal(&t.status().phase)) => break,
                Some(WatcherEvent::Applied(t)) if phase::test_terminal(&t.status().phase) => break,
                Some(WatcherEvent::Deleted(_)) => break,
                Some(WatcherEvent::Restarted(list)) => {
                    for t in &list {
                        if let Some(l) = pending.line(t) {
                            eprintln!("{l}");
                        }
                    }
                }
                Some(WatcherEvent::Applied(t)) => {
                    if let Some(l) = pending.line(&t) {
                        eprintln!("{l}");
                    }
                }
                None => {}
            },
        }
    }
    if !by_processes {
        // The test has ended: every process it had exists and is final.
        let (rest, _) = client.api::<Process>().list("", &fields).await?;
        for p in rest {
            spawn(p, &mut readers, &mut started);
        }
    }
    while let Some(r) = readers.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.code == crate::error::USAGE => {} // a process deleted meanwhile
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(CliError::failed(e.to_string())),
        }
    }
    Ok(if by_processes { Followed::ProcessesEnded(ended.into_values().collect()) } else { Followed::TestEnded })
}
