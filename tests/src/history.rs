//! The checker of a fault-injection run (issue 32, part 3): a history of
//! what the workload and the processes observed, and the safety properties
//! it must keep, as Jepsen checks a database's history. Pure: the harness
//! records, this judges, and its unit tests show it catches each kind of
//! violation on a hand-made history.
//!
//! Times are milliseconds on one clock (every process of a run shares the
//! machine's). The workload never reuses a test's name within a run, so
//! names identify tests; a Process's uid identifies one run of a process. A
//! process records its own start, heartbeats and end from inside (so a
//! record survives whatever the nemesis did to agents and replicas); the
//! workload records what the API acknowledged and what it read back.
use std::collections::{BTreeMap, HashMap};

/// One observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The API acknowledged creating this test.
    CreateAcked { test: String, at: u64 },
    /// The workload deleted this test on purpose (its absence later is no
    /// loss).
    Deleted { test: String, at: u64 },
    /// A process of `test` started on `host` (recorded by the process):
    /// `process` is its Process's uid (each attempt's own), `name` its
    /// Process's name (the same for every attempt).
    Started { process: String, name: String, test: String, host: String, at: u64 },
    /// That process was still running (its heartbeat).
    Alive { process: String, at: u64 },
    /// That process ended (recorded by the process, on SIGTERM too; one
    /// killed with SIGKILL records none, and counts as running until its
    /// last heartbeat).
    Ended { process: String, at: u64 },
    /// The workload read a recorded result of `test`.
    ResultRead { test: String, path: String, outcome: String, message: String, at: u64 },
    /// The workload saw the test in a final phase.
    TestEnded { test: String, at: u64 },
    /// The nemesis did something (the last one starts the quiet period).
    Fault { what: String, at: u64 },
}

impl Event {
    pub fn at(&self) -> u64 {
        match self {
            Event::CreateAcked { at, .. }
            | Event::Deleted { at, .. }
            | Event::Started { at, .. }
            | Event::Alive { at, .. }
            | Event::Ended { at, .. }
            | Event::ResultRead { at, .. }
            | Event::TestEnded { at, .. }
            | Event::Fault { at, .. } => *at,
        }
    }
}

/// What the final read of the API found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalState {
    /// The tests stored at the end.
    pub tests: Vec<String>,
    /// How many attempts each of them made (1 + its recorded earlier
    /// attempts).
    pub attempts: HashMap<String, usize>,
    /// When the final read was made.
    pub at: u64,
}

/// A broken property, with the events that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Two tests' processes ran on one host at once.
    HostHeldTwice { host: String, first: (String, String), second: (String, String), at: u64 },
    /// One process started more than once.
    StartedTwice { process: String, first_at: u64, second_at: u64 },
    /// A process of a test ran in more Processes than the test made
    /// attempts: the same step on the same member run twice in one
    /// attempt.
    RanTooOften { test: String, name: String, runs: usize, attempts: usize, at: u64 },
    /// A test still not ended `bound` after the last fault.
    NeverEnded { test: String, created_at: u64 },
    /// A create the API acknowledged, gone without a delete.
    CreateLost { test: String, acked_at: u64 },
    /// A recorded result read back different.
    ResultChanged { test: String, path: String, before: String, after: String, at: u64 },
}

impl Violation {
    /// When it is first visible (violations are reported in this order).
    pub fn at(&self) -> u64 {
        match self {
            Violation::HostHeldTwice { at, .. }
            | Violation::ResultChanged { at, .. }
            | Violation::RanTooOften { at, .. } => *at,
            Violation::StartedTwice { second_at, .. } => *second_at,
            Violation::NeverEnded { created_at, .. } => *created_at,
            Violation::CreateLost { acked_at, .. } => *acked_at,
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::HostHeldTwice { host, first, second, at } => write!(
                f,
                "at {at} ms host {host} ran {} of test {} and {} of test {} at once",
                first.1, first.0, second.1, second.0
            ),
            Violation::StartedTwice { process, first_at, second_at } => {
                write!(f, "process {process} started at {first_at} ms and again at {second_at} ms")
            }
            Violation::RanTooOften { test, name, runs, attempts, at } => write!(
                f,
                "at {at} ms process {name} of test {test} started in {runs} Processes over {attempts} attempt(s)"
            ),
            Violation::NeverEnded { test, created_at } => {
                write!(f, "test {test} (created at {created_at} ms) never ended")
            }
            Violation::CreateLost { test, acked_at } => {
                write!(f, "test {test}, created at {acked_at} ms, is gone though nobody deleted it")
            }
            Violation::ResultChanged { test, path, before, after, at } => {
                write!(f, "at {at} ms result {path} of test {test} read {after:?}, recorded as {before:?}")
            }
        }
    }
}

/// Every violation of `history` (in the order they first show), given the
/// final read and how long after the last fault every test must have
/// ended.
pub fn check(history: &[Event], last: &FinalState, bound_ms: u64) -> Vec<Violation> {
    let mut out = Vec::new();
    host_exclusion(history, &mut out);
    // Each process starts once.
    let mut started: HashMap<&str, u64> = HashMap::new();
    for e in history {
        if let Event::Started { process, at, .. } = e {
            if let Some(first) = started.get(process.as_str()) {
                out.push(Violation::StartedTwice { process: process.clone(), first_at: *first, second_at: *at });
            } else {
                started.insert(process, *at);
            }
        }
    }
    // Each process name runs at most once per attempt of its test.
    let mut runs: BTreeMap<(&str, &str), Vec<(&str, u64)>> = BTreeMap::new();
    for e in history {
        if let Event::Started { process, name, test, at, .. } = e {
            let r = runs.entry((test.as_str(), name.as_str())).or_default();
            if !r.iter().any(|(p, _)| p == process) {
                r.push((process, *at));
            }
        }
    }
    for ((test, name), r) in runs {
        let Some(&attempts) = last.attempts.get(test) else { continue };
        if r.len() > attempts {
            out.push(Violation::RanTooOften {
                test: test.into(),
                name: name.into(),
                runs: r.len(),
                attempts,
                at: r[attempts].1,
            });
        }
    }
    // Tests end, and acknowledged ones stay unless deleted.
    let last_fault = history.iter().filter(|e| matches!(e, Event::Fault { .. })).map(Event::at).max().unwrap_or(0);
    let ended: HashMap<&str, u64> = history
        .iter()
        .filter_map(|e| match e {
            Event::TestEnded { test, at } => Some((test.as_str(), *at)),
            _ => None,
        })
        .collect();
    let mut deleted: HashMap<&str, u64> = HashMap::new();
    for e in history {
        if let Event::Deleted { test, at } = e {
            let d = deleted.entry(test.as_str()).or_insert(*at);
            *d = (*d).max(*at);
        }
    }
    for e in history {
        let Event::CreateAcked { test, at } = e else { continue };
        let deleted_after = deleted.get(test.as_str()).is_some_and(|d| d >= at);
        let gone = !last.tests.contains(test);
        // A deleted test that is still there has not ended either.
        if gone && !deleted_after {
            out.push(Violation::CreateLost { test: test.clone(), acked_at: *at });
        } else if !gone && !ended.contains_key(test.as_str()) && last.at >= last_fault.max(*at) + bound_ms {
            out.push(Violation::NeverEnded { test: test.clone(), created_at: *at });
        }
    }
    // A result, once read, reads the same.
    let mut results: BTreeMap<(&str, &str), (&str, &str)> = BTreeMap::new();
    for e in history {
        let Event::ResultRead { test, path, outcome, message, at } = e else { continue };
        match results.get(&(test.as_str(), path.as_str())) {
            Some((o, m)) if (*o, *m) != (outcome.as_str(), message.as_str()) => out.push(Violation::ResultChanged {
                test: test.clone(),
                path: path.clone(),
                before: format!("{o}: {m}"),
                after: format!("{outcome}: {message}"),
                at: *at,
            }),
            Some(_) => {}
            None => {
                results.insert((test, path), (outcome, message));
            }
        }
    }
    out.sort_by_key(Violation::at);
    out
}

/// Processes of different tests whose lives on one host overlap. Each
/// start ends at the first end of that process recorded after it; one with
/// none (killed with SIGKILL) at its last heartbeat, else at its start: a
/// life is never taken longer than the process showed it to be, so an
/// overlap found is one that happened.
fn host_exclusion(history: &[Event], out: &mut Vec<Violation>) {
    let mut ends: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut alive: HashMap<&str, u64> = HashMap::new();
    for e in history {
        match e {
            Event::Ended { process, at } => ends.entry(process.as_str()).or_default().push(*at),
            Event::Alive { process, at } => {
                let a = alive.entry(process.as_str()).or_insert(*at);
                *a = (*a).max(*at);
            }
            _ => {}
        }
    }
    for v in ends.values_mut() {
        v.sort_unstable();
    }
    let mut by_host: BTreeMap<&str, Vec<(u64, u64, &str, &str)>> = BTreeMap::new();
    for e in history {
        if let Event::Started { process, test, host, at, .. } = e {
            let own = ends.get_mut(process.as_str()).and_then(|v| {
                let i = v.iter().position(|end| end >= at)?;
                Some(v.remove(i))
            });
            let end = own.unwrap_or_else(|| alive.get(process.as_str()).copied().unwrap_or(*at).max(*at));
            by_host.entry(host).or_default().push((*at, end, test, process));
        }
    }
    for (host, mut lives) in by_host {
        lives.sort();
        // The live intervals so far, by end: an interval of another test
        // that has not ended when one starts is a double hold.
        let mut open: Vec<(u64, u64, &str, &str)> = Vec::new();
        for life in lives {
            open.retain(|o| o.1 > life.0);
            if let Some(o) = open.iter().find(|o| o.2 != life.2) {
                out.push(Violation::HostHeldTwice {
                    host: host.to_string(),
                    first: (o.2.to_string(), o.3.to_string()),
                    second: (life.2.to_string(), life.3.to_string()),
                    at: life.0,
                });
            }
            open.push(life);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(process: &str, test: &str, host: &str, at: u64) -> Event {
        Event::Started { process: process.into(), name: process.into(), test: test.into(), host: host.into(), at }
    }
    fn ended(process: &str, at: u64) -> Event {
        Event::Ended { process: process.into(), at }
    }
    fn acked(test: &str, at: u64) -> Event {
        Event::CreateAcked { test: test.into(), at }
    }
    fn test_ended(test: &str, at: u64) -> Event {
        Event::TestEnded { test: test.into(), at }
    }
    fn result(test: &str, outcome: &str, at: u64) -> Event {
        Event::ResultRead { test: test.into(), path: "a.b".into(), outcome: outcome.into(), message: "m".into(), at }
    }
    fn state(tests: &[&str], at: u64) -> FinalState {
        FinalState {
            tests: tests.iter().map(|t| t.to_string()).collect(),
            attempts: tests.iter().map(|t| (t.to_string(), 1)).collect(),
            at,
        }
    }

    /// A clean run: two tests one after the other on one host, a test's own
    /// processes overlapping, everything ended and kept.
    fn clean() -> Vec<Event> {
        vec![
            acked("t1", 0),
            started("t1-s-a", "t1", "h0", 10),
            started("t1-s-b", "t1", "h0", 12),
            ended("t1-s-a", 20),
            ended("t1-s-b", 21),
            result("t1", "pass", 25),
            test_ended("t1", 26),
            Event::Fault { what: "kill -9 agent h0".into(), at: 27 },
            acked("t2", 28),
            started("t2-s-a", "t2", "h0", 30),
            ended("t2-s-a", 40),
            test_ended("t2", 41),
            result("t1", "pass", 50),
        ]
    }

    #[test]
    fn a_clean_history_breaks_nothing() {
        assert_eq!(check(&clean(), &state(&["t1", "t2"], 100), 50), vec![]);
    }

    #[test]
    fn each_kind_of_violation_is_caught_and_named() {
        // Two tests on one host at once.
        let mut h = clean();
        h.push(started("t3-s-a", "t3", "h0", 35));
        h.push(ended("t3-s-a", 45));
        h.push(acked("t3", 33));
        h.push(test_ended("t3", 46));
        let v = check(&h, &state(&["t1", "t2", "t3"], 100), 50);
        assert!(matches!(&v[..], [Violation::HostHeldTwice { host, at: 35, .. }] if host == "h0"), "{v:?}");
        assert!(v[0].to_string().contains("host h0 ran t2-s-a of test t2 and t3-s-a of test t3"), "{}", v[0]);

        // A process without an end (killed with SIGKILL) holds its host
        // until its last heartbeat: never longer than it showed.
        let mut h = clean();
        h.retain(|e| e != &ended("t1-s-b", 21));
        assert_eq!(check(&h, &state(&["t1", "t2"], 100), 50), vec![], "no heartbeat: it ends where it started");
        h.push(Event::Alive { process: "t1-s-b".into(), at: 29 });
        assert_eq!(check(&h, &state(&["t1", "t2"], 100), 50), vec![], "alive until 29, before t2 started");
        h.push(Event::Alive { process: "t1-s-b".into(), at: 35 });
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert!(matches!(&v[..], [Violation::HostHeldTwice { at: 30, .. }]), "{v:?}");

        // A process started twice ends each life at its own end.
        let mut h = clean();
        h.push(started("t1-s-a", "t1", "h0", 22));
        h.push(ended("t1-s-a", 23));
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert_eq!(v, vec![Violation::StartedTwice { process: "t1-s-a".into(), first_at: 10, second_at: 22 }]);

        // One step on one member run in two Processes in one attempt; two
        // attempts may each run it once.
        let mut h = clean();
        h.push(Event::Started {
            process: "t2-s-a-again".into(),
            name: "t2-s-a".into(),
            test: "t2".into(),
            host: "h1".into(),
            at: 45,
        });
        h.push(ended("t2-s-a-again", 46));
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert!(matches!(&v[..], [Violation::RanTooOften { runs: 2, attempts: 1, at: 45, .. }]), "{v:?}");
        assert!(v[0].to_string().contains("process t2-s-a of test t2 started in 2 Processes over 1 attempt(s)"));
        let mut two = state(&["t1", "t2"], 100);
        two.attempts.insert("t2".into(), 2);
        assert_eq!(check(&h, &two, 50), vec![]);

        // Started twice.
        let mut h = clean();
        h.push(started("t2-s-a", "t2", "h1", 60));
        h.push(ended("t2-s-a", 61));
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert_eq!(v, vec![Violation::StartedTwice { process: "t2-s-a".into(), first_at: 30, second_at: 60 }]);

        // Never ended, once the quiet period is over (after the last fault
        // and after its creation); not before.
        let mut h = clean();
        h.retain(|e| e != &test_ended("t2", 41));
        assert_eq!(check(&h, &state(&["t1", "t2"], 60), 50), vec![]);
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert_eq!(v, vec![Violation::NeverEnded { test: "t2".into(), created_at: 28 }]);
        h.push(acked("t4", 95));
        assert_eq!(check(&h, &state(&["t1", "t2", "t4"], 100), 50).len(), 1, "t4 is too young to judge");

        // An acknowledged create gone; a deleted one is not a loss.
        let v = check(&clean(), &state(&["t2"], 100), 50);
        assert_eq!(v, vec![Violation::CreateLost { test: "t1".into(), acked_at: 0 }]);
        let mut h = clean();
        h.push(Event::Deleted { test: "t1".into(), at: 90 });
        assert_eq!(check(&h, &state(&["t2"], 100), 50), vec![]);
        // A delete before the acknowledgement explains nothing.
        let mut h = clean();
        h.insert(0, Event::Deleted { test: "t1".into(), at: 0 });
        h.retain(|e| e != &acked("t1", 0));
        h.push(acked("t1", 1));
        let v = check(&h, &state(&["t2"], 100), 50);
        assert!(v.iter().any(|v| matches!(v, Violation::CreateLost { .. })), "{v:?}");

        // A test deleted but still there has not ended either.
        let mut h = clean();
        h.retain(|e| e != &test_ended("t2", 41));
        h.push(Event::Deleted { test: "t2".into(), at: 42 });
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert_eq!(v, vec![Violation::NeverEnded { test: "t2".into(), created_at: 28 }]);
        assert_eq!(check(&h, &state(&["t1"], 100), 50), vec![], "gone: the delete explains it");

        // A result read back different.
        let mut h = clean();
        h.push(result("t1", "fail", 70));
        let v = check(&h, &state(&["t1", "t2"], 100), 50);
        assert!(matches!(&v[..], [Violation::ResultChanged { at: 70, .. }]), "{v:?}");
        assert!(v[0].to_string().contains("read \"fail: m\", recorded as \"pass: m\""), "{}", v[0]);
    }

    #[test]
    fn violations_come_in_the_order_they_first_show() {
        let mut h = clean();
        h.push(result("t1", "fail", 70));
        h.push(started("t2-s-a", "t2", "h1", 65));
        let v = check(&h, &state(&["t2"], 100), 50);
        let at: Vec<u64> = v.iter().map(Violation::at).collect();
        assert_eq!(at, [0, 65, 70], "{v:?}");
    }
}
