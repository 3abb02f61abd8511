//! Hosts that keep failing (LAVA's health checks, Teuthology's mark-down):
//! a host whose processes end in infrastructure failures — lost, or failed
//! before the program ran (spawn, files, setup) — several times in a row is
//! made unschedulable, with a reason naming the failures, until an admin
//! uncordons it.
//!
//! The `Ledger` is derived from the Process cache (the reflector records
//! each process that it sees terminal), so it is rebuilt by a relist like
//! the cache itself; the host controller reads it, level-triggered, on each
//! reconcile. Only failures that finished after the host's
//! `testbus.io/healthy-since` annotation (set by `uncordon`) count.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::SystemTime;
use testbus_proto::states::ProcessPhase;
use testbus_proto::states::ProcessReason;
use testbus_proto::{phase, time, Process, Resource};

/// Set by `testbusctl uncordon`: failures before it no longer count.
pub const HEALTHY_SINCE: &str = "testbus.io/healthy-since";
/// Most recent terminal processes remembered per host.
const KEEP: usize = 32;

/// Why a terminal process counts as an infrastructure failure of its host,
/// if it does.
pub fn infra_failure(p: &Process) -> Option<String> {
    let s = p.status();
    match s.phase.parse().ok()? {
        ProcessPhase::Lost => Some(if s.reason.is_empty() { "Lost".into() } else { s.reason.clone() }),
        // The program never ran: the host, not the test, failed.
        ProcessPhase::Failed if s.reason.parse::<ProcessReason>().is_ok_and(ProcessReason::is_infrastructure) => {
            Some(s.reason.clone())
        }
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    process: String,
    /// Its test: the processes one incident ended (a host lost under a
    /// test of many steps) count once.
    test_uid: String,
    finished: SystemTime,
    infra: Option<String>,
}

/// The last terminal processes of each host, newest first.
#[derive(Default)]
pub struct Ledger {
    by_host: Mutex<HashMap<String, Vec<Entry>>>,
}

impl Ledger {
    /// Records a process seen terminal (again: recorded once).
    pub fn record(&self, p: &Process) {
        if !phase::process_terminal(&p.status().phase) || p.spec().host_name.is_empty() {
            return;
        }
        let finished = time::parse(&p.status().finish_time).unwrap_or(SystemTime::UNIX_EPOCH);
        let e = Entry {
            process: p.name().to_string(),
            test_uid: p.spec().test_uid.clone(),
            finished,
            infra: infra_failure(p),
        };
        let mut by_host = self.by_host.lock();
        let entries = by_host.entry(p.spec().host_name.clone()).or_default();
        if entries.iter().any(|x| x.process == e.process) {
            return;
        }
        let at = entries.partition_point(|x| x.finished > e.finished);
        entries.insert(at, e);
        entries.truncate(KEEP);
    }

    /// The infrastructure failures of `host` in a row, newest first, among
    /// those that finished after `since`, one per test: (process, reason).
    pub fn streak(&self, host: &str, since: SystemTime) -> Vec<(String, String)> {
        let by_host = self.by_host.lock();
        let mut tests = std::collections::HashSet::new();
        by_host
            .get(host)
            .into_iter()
            .flatten()
            .take_while(|e| e.finished > since)
            .map_while(|e| e.infra.as_ref().map(|why| (e, why)))
            .filter(|(e, _)| e.test_uid.is_empty() || tests.insert(e.test_uid.clone()))
            .map(|(e, why)| (e.process.clone(), why.clone()))
            .collect()
    }
}

/// The reason to quarantine a host with `streak`, if `threshold` (> 0) is
/// reached.
pub fn quarantine_reason(streak: &[(String, String)], threshold: u32) -> Option<String> {
    if threshold == 0 || (streak.len() as u32) < threshold {
        return None;
    }
    let shown: Vec<String> = streak.iter().take(5).map(|(p, why)| format!("{p} ({why})")).collect();
    Some(format!(
        "quarantined after {} infrastructure failures in a row: {}{}; `testbusctl uncordon` when it is fixed",
        streak.len(),
        shown.join(", "),
        if streak.len() > 5 { ", ..." } else { "" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{ObjectMeta, ProcessSpec, ProcessStatus};

    fn ended(name: &str, secs: u64, phase: &str, reason: &str) -> Process {
        Process {
            metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
            spec: Some(ProcessSpec { host_name: "h".into(), test_uid: format!("t-{name}"), ..Default::default() }),
            status: Some(ProcessStatus {
                phase: phase.into(),
                reason: reason.into(),
                finish_time: time::format(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_streak_is_infrastructure_failures_in_a_row_since_the_host_was_healthy() {
        let l = Ledger::default();
        let at = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        l.record(&ended("ok", 10, ProcessPhase::Succeeded.as_str(), "Completed"));
        l.record(&ended("spawn", 20, ProcessPhase::Failed.as_str(), "SpawnFailed"));
        l.record(&ended("test-failed", 15, ProcessPhase::Failed.as_str(), "NonZeroExit"));
        l.record(&ended("lost", 30, ProcessPhase::Lost.as_str(), "HostLost"));
        l.record(&ended("lost", 30, ProcessPhase::Lost.as_str(), "HostLost")); // seen again
        l.record(&ended("running", 40, ProcessPhase::Running.as_str(), ""));
        // Newest first; a test's own failure ends the streak.
        let s = l.streak("h", SystemTime::UNIX_EPOCH);
        assert_eq!(s, vec![("lost".into(), "HostLost".into()), ("spawn".into(), "SpawnFailed".into())]);
        assert_eq!(l.streak("h", at(25)).len(), 1, "failures before healthy-since do not count");
        assert!(quarantine_reason(&s, 3).is_none());
        l.record(&ended("files", 35, ProcessPhase::Failed.as_str(), "FileFailed"));
        let s = l.streak("h", SystemTime::UNIX_EPOCH);
        let why = quarantine_reason(&s, 3).expect("three in a row");
        assert!(why.contains("files (FileFailed), lost (HostLost), spawn (SpawnFailed)"), "{why}");
        assert!(quarantine_reason(&s, 0).is_none(), "0 turns quarantine off");
        // Processes of one test ended by one incident count once.
        let mut twin = ended("files-2", 36, ProcessPhase::Lost.as_str(), "HostLost");
        twin.spec_mut().test_uid = "t-files".into();
        l.record(&twin);
        assert_eq!(l.streak("h", SystemTime::UNIX_EPOCH).len(), 3);
        // A killed (stopped) process is the test's doing, not the host's.
        assert!(infra_failure(&ended("k", 1, ProcessPhase::Killed.as_str(), "Stopped")).is_none());
    }
}
