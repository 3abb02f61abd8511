//! Waiting for tests, with live progress: each role's hosts and each step,
//! printed (to stderr) as they change.
use crate::error::{CliError, CliResult, FAILED, INCOMPLETE};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use testbus_client::{watcher, Client, WatcherEvent};
use testbus_proto::states::{StepPhase, TestPhase};
use testbus_proto::{phase, Resource, Test};

/// The exit code of a finished test.
pub fn exit_code(t: &Test) -> i32 {
    match t.status().phase.parse() {
        Ok(TestPhase::Succeeded) => 0,
        Ok(TestPhase::Failed) => FAILED,
        _ => INCOMPLETE,
    }
}

/// Lines describing what changed between two views of a test.
fn progress_lines(prev: Option<&Test>, t: &Test) -> Vec<String> {
    let name = t.name();
    let s = t.status();
    let mut out = Vec::new();
    let ps = prev.map(|p| p.status());
    if ps.map(|p| (&p.phase, &p.message)) != Some((&s.phase, &s.message)) {
        match s.phase.parse() {
            Ok(TestPhase::Pending) if !s.message.is_empty() => out.push(format!("test/{name}: Pending: {}", s.message)),
            Ok(TestPhase::Running) => {
                let claims: Vec<String> = s.claims.iter().map(|(r, h)| format!("{r}={h}")).collect();
                out.push(format!("test/{name}: Running on {}", claims.join(" ")));
            }
            Ok(p) if p.is_terminal() => {}
            _ => out.push(format!("test/{name}: {}", s.phase)),
        }
    }
    for st in &s.steps {
        let before = ps.and_then(|p| p.steps.iter().find(|x| x.name == st.name));
        if before.map(|b| (&b.phase, &b.processes)) == Some((&st.phase, &st.processes))
            || st.phase == StepPhase::Waiting
        {
            continue;
        }
        if before.map(|b| &b.phase) == Some(&st.phase) && st.phase == StepPhase::Running {
            continue; // only process details changed while running
        }
        let procs: Vec<String> = st
            .processes
            .iter()
            .map(|p| {
                let end = match (p.exit_code, p.signal.is_empty()) {
                    (Some(c), _) => format!(" exit {c}"),
                    (None, false) => format!(" {}", p.signal),
                    _ => String::new(),
                };
                format!("{}@{}{end}", p.role, p.host)
            })
            .collect();
        let mut line = format!("test/{name}: step {} {}", st.name, st.phase);
        if !procs.is_empty() {
            line.push_str(&format!(" [{}]", procs.join(", ")));
        }
        out.push(line);
    }
    if phase::test_terminal(&s.phase) && ps.map(|p| &p.phase) != Some(&s.phase) {
        let mut line = format!("test/{name}: {}", s.phase);
        if !s.message.is_empty() {
            line.push_str(&format!(": {}", s.message));
        }
        if let (Some(a), Some(b)) =
            (testbus_proto::time::parse(&s.start_time), testbus_proto::time::parse(&s.completion_time))
        {
            if let Ok(d) = b.duration_since(a) {
                line.push_str(&format!(" ({:.1}s)", d.as_secs_f64()));
            }
        }
        out.push(line);
    }
    out
}

/// The steps of `t` that have failed since `prev`.
fn newly_failed(prev: Option<&Test>, t: &Test) -> Vec<String> {
    t.status()
        .steps
        .iter()
        .filter(|st| st.phase == StepPhase::Failed)
        .filter(|st| {
            prev.and_then(|p| p.status().steps.iter().find(|b| b.name == st.name)).is_none_or(|b| b.phase != st.phase)
        })
        .map(|st| st.name.clone())
        .collect()
}

use crate::pending::PendingNote;

/// Prints the stderr tails of a test's processes that failed in `steps`.
async fn print_failed_tails(client: &Client, t: &Test, steps: &[String]) {
    for step in steps {
        // Output that cannot be read only leaves the hint out.
        let Ok(tails) = crate::logs::failed_tails(client, t, Some(step)).await else { continue };
        for tail in tails {
            eprintln!("  {}@{} stderr (last lines):", tail.role, tail.host);
            for l in tail.lines {
                eprintln!("    | {l}");
            }
        }
    }
}

/// Whether waiting prints each test's progress (to stderr) as it changes,
/// with the end of a failed step's stderr; or only why a test is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Shown,
    Quiet,
}

/// Waits until every named test has finished; returns the worst exit code
/// (3 on timeout or deletion, then 1 for a failure, else 0).
pub async fn wait(client: &Client, names: &[String], timeout: Option<Duration>, progress: Progress) -> CliResult {
    let show = progress == Progress::Shown;
    // Fail fast (exit 2 or 4) if a test does not exist or the server is down.
    let mut last: HashMap<String, Test> = HashMap::new();
    let mut pending: HashMap<String, PendingNote> = HashMap::new();
    let mut report = |prev: Option<&Test>, t: &Test| {
        if show {
            for l in progress_lines(prev, t) {
                eprintln!("{l}");
            }
        } else if let Some(l) = pending.entry(t.name().to_string()).or_default().line(t) {
            eprintln!("{l}");
        }
    };
    for n in names {
        let t = client.api::<Test>().get(n).await?;
        report(None, &t);
        if show {
            print_failed_tails(client, &t, &newly_failed(None, &t)).await;
        }
        last.insert(n.clone(), t);
    }
    let deadline = timeout.map(|d| Instant::now() + d);
    let events = watcher(client.api::<Test>(), String::new(), String::new());
    futures::pin_mut!(events);
    let mut codes: HashMap<String, i32> = HashMap::new();
    for (n, t) in &last {
        if phase::test_terminal(&t.status().phase) {
            codes.insert(n.clone(), exit_code(t));
        }
    }
    while codes.len() < names.len() {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), events.next()).await {
                Ok(ev) => ev,
                Err(_) => {
                    let waiting: Vec<&String> = names.iter().filter(|n| !codes.contains_key(*n)).collect();
                    return Err(CliError::incomplete(format!(
                        "timed out waiting for {}",
                        waiting.iter().map(|n| format!("test/{n}")).collect::<Vec<_>>().join(", ")
                    )));
                }
            },
            None => events.next().await,
        };
        let updates: Vec<Test> = match next {
            Some(WatcherEvent::Restarted(list)) => {
                for n in names {
                    if !codes.contains_key(n) && !list.iter().any(|t| t.name() == n) {
                        return Err(CliError::incomplete(format!("test/{n} was deleted")));
                    }
                }
                list.into_iter().filter(|t| names.iter().any(|n| n == t.name())).collect()
            }
            Some(WatcherEvent::Applied(t)) if names.iter().any(|n| n == t.name()) => vec![t],
            Some(WatcherEvent::Deleted(t)) if names.iter().any(|n| n == t.name()) && !codes.contains_key(t.name()) => {
                return Err(CliError::incomplete(format!("test/{} was deleted", t.name())));
            }
            Some(_) => continue,
            None => return Err(CliError::incomplete("the watch ended")),
        };
        for t in updates {
            report(last.get(t.name()), &t);
            if show {
                print_failed_tails(client, &t, &newly_failed(last.get(t.name()), &t)).await;
            }
            if phase::test_terminal(&t.status().phase) {
                codes.insert(t.name().to_string(), exit_code(&t));
            }
            last.insert(t.name().to_string(), t);
        }
    }
    let worst = codes.values().copied().fold(0, |acc, c| match (acc, c) {
        (INCOMPLETE, _) | (_, INCOMPLETE) => INCOMPLETE,
        (FAILED, _) | (_, FAILED) => FAILED,
        _ => 0,
    });
    Ok(worst)
}
