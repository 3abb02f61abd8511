//! Which reconciles a change of an object asks for: the decisions of the
//! controllers' watches, apart from the queues (unit-tested below). A
//! reconcile reads the current state, never the event; the event only
//! says whom to wake.
use testbus_proto::states::waits_for_hosts;
use testbus_proto::{Host, HostPool, Process, Resource, Test};

/// What a change wakes: keys of each queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wakes {
    pub hosts: Vec<String>,
    pub tests: Vec<String>,
    /// A pass of the scheduler.
    pub schedule: bool,
    pub pools: Vec<String>,
    /// Every pool (each may make guests for a test that started or stopped
    /// waiting).
    pub all_pools: bool,
}

/// Scheduling-relevant parts of a host changed (or it appeared/vanished).
fn schedulable_changed(old: Option<&Host>, new: Option<&Host>) -> bool {
    let key = |h: &Host| {
        (
            h.status().phase.clone(),
            h.spec().unschedulable,
            h.status().claim.clone(),
            h.status().capabilities.clone(),
            h.spec().capabilities.clone(),
            // A pool guest cleaned (or used) changes what is free.
            testbus_proto::pool::clean_enough(h),
        )
    };
    old.map(key) != new.map(key)
}

/// What a test that claims the host reads of it changed: its phase (lost,
/// back), its claim, its deletion, or the host itself appeared or went.
fn claim_changed(old: Option<&Host>, new: Option<&Host>) -> bool {
    let key = |h: &Host| (h.status().phase.clone(), h.status().claim.clone(), h.meta().deletion_timestamp.clone());
    old.map(key) != new.map(key)
}

/// A Host: itself; the tests it was or is claimed by (when what they read
/// of it changed); the scheduler when
/// what it offers changed; the pool it is a guest of.
pub fn host(old: Option<&Host>, new: Option<&Host>) -> Wakes {
    let both = || [old, new].into_iter().flatten();
    Wakes {
        hosts: new.or(old).map(|h| vec![h.name().to_string()]).unwrap_or_default(),
        // Not on a lease renewal (every few seconds per host): a test over
        // a thousand hosts was reconciled hundreds of times a second.
        tests: if claim_changed(old, new) {
            both().filter_map(|h| h.status().claim.as_ref()).map(|c| c.test.clone()).collect()
        } else {
            Vec::new()
        },
        schedule: schedulable_changed(old, new),
        pools: both().filter_map(testbus_proto::pool::pool_of).map(str::to_string).collect(),
        all_pools: false,
    }
}

/// A Test: itself; when it starts or stops waiting for hosts (claimed,
/// ended, deleted, cancelled), the scheduler (one pass for both: one that
/// stops waiting no longer holds hosts back from those behind it), and
/// every pool, which makes guests for waiting tests.
pub fn test(old: Option<&Test>, new: Option<&Test>) -> Wakes {
    let was = old.is_some_and(waits_for_hosts);
    let is = new.is_some_and(waits_for_hosts);
    Wakes {
        tests: new.or(old).map(|t| vec![t.name().to_string()]).unwrap_or_default(),
        schedule: was != is,
        all_pools: was || is,
        ..Default::default()
    }
}

/// A Process: its test; once it has ended, its host (it counts for or
/// against the host's quarantine).
pub fn process(old: Option<&Process>, new: Option<&Process>) -> Wakes {
    let ended = new.filter(|p| testbus_proto::phase::process_terminal(&p.status().phase));
    Wakes {
        tests: new.or(old).map(|p| vec![p.spec().test.clone()]).unwrap_or_default(),
        hosts: ended.map(|p| vec![p.spec().host_name.clone()]).unwrap_or_default(),
        ..Default::default()
    }
}

/// A HostPool: itself.
pub fn pool(old: Option<&HostPool>, new: Option<&HostPool>) -> Wakes {
    Wakes { pools: new.or(old).map(|p| vec![p.name().to_string()]).unwrap_or_default(), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{HostClaim, ObjectMeta};

    fn meta(name: &str) -> Option<ObjectMeta> {
        Some(ObjectMeta { name: name.into(), ..Default::default() })
    }

    #[test]
    fn a_host_wakes_itself_its_tests_its_pool_and_the_scheduler_when_it_offers_otherwise() {
        let mut h = Host { metadata: meta("vms-1"), ..Default::default() };
        h.meta_mut().labels.insert(testbus_proto::pool::POOL_LABEL.into(), "vms".into());
        let mut claimed = h.clone();
        claimed.status_mut().claim = Some(HostClaim { test: "t1".into(), test_uid: "u".into(), ..Default::default() });
        let w = host(Some(&h), Some(&claimed));
        assert_eq!((w.hosts, w.tests, w.schedule), (vec!["vms-1".to_string()], vec!["t1".to_string()], true));
        assert_eq!(w.pools, ["vms", "vms"]);
        // A lease renewal offers nothing new: no pass of the scheduler.
        let mut renewed = claimed.clone();
        renewed.status_mut().lease_renew_time = "later".into();
        let w = host(Some(&claimed), Some(&renewed));
        assert!(!w.schedule);
        // Nor its test (a test over a thousand hosts heard hundreds of
        // renewals a second); the host itself does (its lease).
        assert!(w.tests.is_empty() && w.hosts == ["vms-1"], "{w:?}");
        let mut lost = renewed.clone();
        lost.status_mut().phase = testbus_proto::states::HostPhase::NotReady.into();
        assert_eq!(host(Some(&renewed), Some(&lost)).tests, ["t1", "t1"]);
        // Gone: the scheduler, and its test, still hear of it.
        let gone = host(Some(&claimed), None);
        assert!(gone.schedule && gone.tests == ["t1"] && gone.hosts == ["vms-1"]);
    }

    #[test]
    fn a_test_wakes_the_scheduler_and_the_pools_only_when_it_starts_or_stops_waiting() {
        let pending = Test { metadata: meta("t"), ..Default::default() };
        let w = test(None, Some(&pending));
        assert!(w.schedule && w.all_pools && w.tests == ["t"]);
        let mut again = pending.clone();
        again.status_mut().message = "still waiting".into();
        let w = test(Some(&pending), Some(&again));
        assert!(!w.schedule && w.all_pools, "{w:?}");
        let mut running = pending.clone();
        running.status_mut().phase = "Running".into();
        assert!(test(Some(&pending), Some(&running)).schedule);
        let mut step = running.clone();
        step.status_mut().message = "a step ended".into();
        let w = test(Some(&running), Some(&step));
        assert!(!w.schedule && !w.all_pools && w.tests == ["t"], "{w:?}");
        let v = testbus_proto::states::Verdict::new(testbus_proto::states::TestReason::Cancelled, "by alice");
        let mut cancelled = pending.clone();
        cancelled.status_mut().conditions.push(v.condition("t".into()));
        assert!(test(Some(&pending), Some(&cancelled)).schedule, "a cancelled test stops waiting");
    }

    #[test]
    fn a_process_wakes_its_test_and_once_ended_its_host() {
        let mut p = Process { metadata: meta("p"), ..Default::default() };
        p.spec_mut().test = "t".into();
        p.spec_mut().host_name = "h".into();
        p.status_mut().phase = "Running".into();
        let w = process(None, Some(&p));
        assert!(w.tests == ["t"] && w.hosts.is_empty());
        let mut done = p.clone();
        done.status_mut().phase = "Failed".into();
        assert_eq!(process(Some(&p), Some(&done)).hosts, ["h"]);
        assert!(process(Some(&done), None).hosts.is_empty(), "a deletion counts nothing again");
        let pool_w = pool(None, Some(&HostPool { metadata: meta("vms"), ..Default::default() }));
        assert_eq!(pool_w.pools, ["vms"]);
    }
}
