//! `logs`: a process's output raw, or a test's output with each line
//! prefixed by where it came from; `-f` follows until the test ends.
use crate::error::{CliError, CliResult};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use testbus_proto::client::{watcher, Client, WatcherEvent};
use testbus_proto::{phase, Process, ReadOutputRequest, Resource, Test};

/// Which processes of a test to show.
#[derive(Clone, Default)]
pub struct Select {
    pub role: Option<String>,
    pub step: Option<String>,
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

/// Writes complete lines with a prefix; a final partial line gets a newline.
struct Prefixer {
    prefix: String,
    partial: Vec<u8>,
}

impl Prefixer {
    fn feed(&mut self, data: &[u8], out: &mut impl Write) {
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let _ = out.write_all(self.prefix.as_bytes());
            let _ = out.write_all(&line);
        }
    }
    fn finish(&mut self, out: &mut impl Write) {
        if !self.partial.is_empty() {
            let _ = out.write_all(self.prefix.as_bytes());
            let _ = out.write_all(&self.partial);
            let _ = out.write_all(b"\n");
            self.partial.clear();
        }
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

/// How many of a failed process's last stderr lines `describe` and
/// `apply --wait` show.
pub const TAIL_LINES: usize = 10;

/// The end of what one failed process of a test wrote to stderr.
pub struct FailedTail {
    pub step: String,
    pub role: String,
    pub host: String,
    pub lines: Vec<String>,
}

/// The stderr tails of the processes of test `t` (of `step` only, when
/// given) that ran a step and did not succeed; processes that wrote
/// nothing to stderr are left out.
pub async fn failed_tails(client: &Client, t: &Test, step: Option<&str>) -> CliResult<Vec<FailedTail>> {
    let (procs, _) = client.api::<Process>().list("", &format!("spec.test={}", t.name())).await?;
    let mut out = Vec::new();
    for p in procs {
        let (sp, st) = (p.spec(), p.status());
        let failed = phase::process_terminal(&st.phase) && st.phase != phase::SUCCEEDED;
        let ran_a_step = p.meta().labels.contains_key(testbus_proto::process::LABEL_STEP);
        if sp.test_uid != t.meta().uid || !failed || !ran_a_step || step.is_some_and(|s| s != sp.step) {
            continue;
        }
        let lines = stderr_tail(client, p.name(), TAIL_LINES).await?;
        if !lines.is_empty() {
            out.push(FailedTail { step: sp.step.clone(), role: sp.role.clone(), host: sp.host_name.clone(), lines });
        }
    }
    out.sort_by(|a, b| (&a.step, &a.role).cmp(&(&b.step, &b.role)));
    Ok(out)
}

/// The last `n` lines a process wrote to stderr (only the last 16 KiB are
/// kept while reading).
async fn stderr_tail(client: &Client, name: &str, n: usize) -> CliResult<Vec<String>> {
    const KEEP: usize = 16 << 10;
    let req = ReadOutputRequest { process: name.to_string(), follow: false };
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
    let text = String::from_utf8_lossy(&tail);
    let mut lines: Vec<String> = text.lines().rev().take(n).map(str::to_string).collect();
    lines.reverse();
    Ok(lines)
}

/// How many bytes of each stream (stdout, stderr) of a process the server
/// holds, counted from its chunks' offsets.
pub async fn output_sizes(client: &Client, name: &str) -> CliResult<[u64; 2]> {
    let req = ReadOutputRequest { process: name.to_string(), follow: false };
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

/// Copies one process's output to stdout/stderr, optionally prefixed.
pub async fn copy_process(client: &Client, name: &str, prefix: Option<String>, follow: Follow) -> CliResult<()> {
    let req = ReadOutputRequest { process: name.to_string(), follow: follow == Follow::Yes };
    let mut stream = client.output().read(req).await?.into_inner();
    let mut pre =
        prefix.map(|p| [Prefixer { prefix: p.clone(), partial: vec![] }, Prefixer { prefix: p, partial: vec![] }]);
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
        match (&mut pre, is_err) {
            (Some(p), false) => p[0].feed(&chunk.data, &mut std::io::stdout().lock()),
            (Some(p), true) => p[1].feed(&chunk.data, &mut std::io::stderr().lock()),
            (None, false) => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&chunk.data);
                let _ = o.flush();
            }
            (None, true) => {
                let _ = std::io::stderr().lock().write_all(&chunk.data);
            }
        }
    }
    if let Some(p) = &mut pre {
        p[0].finish(&mut std::io::stdout().lock());
        p[1].finish(&mut std::io::stderr().lock());
    }
    let _ = std::io::stdout().flush();
    Ok(())
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
/// in step order; with it, every process as it runs, until the test ends.
/// `Prefix::Never` copies output raw (for `run` on one host).
pub async fn test_logs(client: &Client, test: &str, sel: &Select, follow: Follow, prefix: Prefix) -> CliResult<()> {
    let t = client.api::<Test>().get(test).await?;
    sel.check(&t)?;
    let fields = format!("spec.test={test}");
    if follow == Follow::No {
        let (mut procs, _) = client.api::<Process>().list("", &fields).await?;
        procs.retain(|p| p.spec().test_uid == t.meta().uid && sel.matches(p));
        procs.sort_by(|a, b| (step_index(&t, a), &a.spec().role).cmp(&(step_index(&t, b), &b.spec().role)));
        for p in procs {
            let pre = (prefix == Prefix::Always).then(|| prefix_for(&t, &p));
            copy_process(client, p.name(), pre, Follow::No).await?;
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
    s.phase == phase::SUCCEEDED || (s.phase == phase::FAILED && s.exit_code.is_some())
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
        readers.spawn(async move { copy_process(&c, p.name(), pre, Follow::Yes).await });
    };
    let mut ended: HashMap<String, Process> = HashMap::new();
    let mut note = |p: &Process| {
        if p.spec().test_uid == t.meta().uid && phase::process_terminal(&p.status().phase) {
            ended.insert(p.name().to_string(), p.clone());
        }
        expected.is_some_and(|n| ended.len() == n && ended.values().all(decided))
    };
    let mut by_processes = false;
    let mut pending = crate::progress::PendingNote::default();
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
