//! Choosing hosts for a test: every member of every role gets a distinct
//! free host with the capabilities its role needs, or the test gets nothing
//! and a sentence saying why.
//!
//! Matching is bipartite (augmenting paths), so an assignment is found
//! whenever one exists, not only when a greedy pass happens to find it.
use std::collections::{BTreeSet, HashMap};
use testbus_proto::selector::LabelSelector;
use testbus_proto::states::HostPhase;
use testbus_proto::validate::members;
use testbus_proto::{Host, HostRequirement, Resource};

/// One role member and the host chosen for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub role: String,
    pub member: String,
    pub host: String,
}

fn capabilities(h: &Host) -> BTreeSet<&str> {
    h.status().capabilities.iter().chain(h.spec().capabilities.iter()).map(String::as_str).collect()
}

/// Whether host `h` gives what `req` asks: its name (if named), every
/// capability, the label selector.
pub fn fits(req: &HostRequirement, h: &Host) -> bool {
    if !req.host.is_empty() && req.host != h.name() {
        return false;
    }
    let caps = capabilities(h);
    req.capabilities.iter().all(|c| caps.contains(c.as_str())) && fits_labels(req, &h.meta().labels)
}

/// Whether a requirement's label selector matches `labels` (an invalid
/// selector was refused when the test was created).
pub fn fits_labels(req: &HostRequirement, labels: &std::collections::BTreeMap<String, String>) -> bool {
    req.selector.is_empty() || LabelSelector::parse(&req.selector).is_ok_and(|s| s.matches(labels))
}

/// Why no host there is fits `r`: a capability no host offers (with the
/// nearest one that is offered: a typo is the usual cause), a pinned host
/// that does not exist, or a selector no host with the capabilities
/// matches.
fn none_fits(r: &HostRequirement, hosts: &[&Host]) -> String {
    if !r.host.is_empty() && !hosts.iter().any(|h| h.name() == r.host) {
        return format!("no host named {}", r.host);
    }
    let offered: BTreeSet<&str> = hosts.iter().flat_map(|h| capabilities(h)).collect();
    let unknown: Vec<String> = r
        .capabilities
        .iter()
        .filter(|c| !offered.contains(c.as_str()))
        .map(|c| match nearest(c, &offered) {
            Some(n) => format!("{c} (did you mean {n}?)"),
            None => c.clone(),
        })
        .collect();
    if !unknown.is_empty() {
        let noun = if unknown.len() == 1 { "capability" } else { "capabilities" };
        return format!("no host offers {noun} {}", unknown.join(", "));
    }
    let unlabelled = HostRequirement { selector: String::new(), ..r.clone() };
    if !r.selector.is_empty() && hosts.iter().any(|h| fits(&unlabelled, h)) {
        return format!("no host with these capabilities has labels matching {}", r.selector);
    }
    "no host has these capabilities".to_string()
}

/// The offered capability closest to a missing one, if it is close enough
/// to be a typo (`nfs-sever` → `nfs-server`).
fn nearest<'a>(wanted: &str, offered: &BTreeSet<&'a str>) -> Option<&'a str> {
    offered
        .iter()
        .map(|o| (strsim::damerau_levenshtein(wanted, o), *o))
        .filter(|(d, o)| *d <= 2.max(wanted.len().min(o.len()) / 4))
        .min()
        .map(|(_, o)| o)
}

/// Free: Ready, schedulable, not claimed, and (a pool guest) clean.
pub fn is_free(h: &Host) -> bool {
    h.status().phase == HostPhase::Ready
        && !h.spec().unschedulable
        && h.status().claim.as_ref().is_none()
        && testbus_proto::pool::clean_enough(h)
}

fn describe(req: &HostRequirement) -> String {
    let n = req.count.unwrap_or(1);
    let what = if !req.host.is_empty() {
        format!("host {}", req.host)
    } else if req.capabilities.is_empty() {
        "any host".to_string()
    } else {
        req.capabilities.join("+")
    };
    let labelled = if req.selector.is_empty() { String::new() } else { format!(" labelled {}", req.selector) };
    format!("{n} × {what}{labelled} (role {})", req.role)
}

/// Why a host that fits is not free.
fn busy_reason(h: &Host) -> String {
    if let Some(c) = h.status().claim.as_ref() {
        format!("{} claimed by test {}", h.name(), c.test)
    } else if h.spec().unschedulable {
        format!("{} cordoned", h.name())
    } else if !testbus_proto::pool::clean_enough(h) {
        format!("{} being cleaned", h.name())
    } else {
        format!("{} {}", h.name(), if h.status().phase.is_empty() { "not ready" } else { &h.status().phase })
    }
}

/// Queue order: higher priority first, then older, then by name.
pub fn queue_order(a: &testbus_proto::Test, b: &testbus_proto::Test) -> std::cmp::Ordering {
    b.spec()
        .priority
        .cmp(&a.spec().priority)
        .then_with(|| a.meta().creation_timestamp.cmp(&b.meta().creation_timestamp))
        .then_with(|| a.name().cmp(b.name()))
}

/// What the scheduler decides for one pending test in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Claim these hosts now.
    Claim(Vec<Assignment>),
    /// Wait: why, as the Scheduled condition says it.
    Wait(Waiting),
}

/// Why a pending test waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// It could not run even on every host there is (a pool may make more).
    Unsatisfiable(Unfit),
    /// It could run now, but a test ahead of it waits for hosts it could use.
    Queued { behind: String, priority: i32 },
    /// The hosts it needs are busy.
    Unschedulable(Unavailable),
}

/// Why a test could not run even on every host there is, were they all
/// free (the Scheduled condition's message says it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    /// No host fits a role: `hint` says what is missing (and the nearest
    /// capability offered when the one asked for looks like a typo).
    #[error("needs {needs}; {hint}")]
    NoHostFits { needs: String, hint: String },
    #[error("needs {needs}; only {have} such hosts exist")]
    TooFew { needs: String, have: usize },
    #[error("the {hosts} hosts that exist fit each role separately, but not all roles at once")]
    RolesClash { hosts: usize },
}

/// Why a test that fits the inventory cannot claim its hosts now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// Too few free hosts fit a role: `busy` says what holds the others,
    /// `hint` what is missing when no host fits at all.
    #[error("needs {needs}, {free} free{}", busy_list(.busy, .hint))]
    Short { needs: String, free: usize, busy: Vec<String>, hint: Option<String> },
    #[error("{free} free hosts fit each role separately, but not all roles at once")]
    RolesClash { free: usize },
}

/// `: h1 claimed by test t, h2 cordoned and 2 more` (at most three named),
/// or `; HINT` where no host fits at all.
fn busy_list(busy: &[String], hint: &Option<String>) -> String {
    if let Some(hint) = hint {
        return format!("; {hint}");
    }
    if busy.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = busy.iter().take(3).map(String::as_str).collect();
    let more = if busy.len() > 3 { format!(" and {} more", busy.len() - 3) } else { String::new() };
    format!(": {}{more}", shown.join(", "))
}

impl Waiting {
    /// The Scheduled condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Waiting::Unsatisfiable(_) => "Unsatisfiable",
            Waiting::Queued { .. } => "Queued",
            Waiting::Unschedulable(_) => "Unschedulable",
        }
    }

    /// The Scheduled condition's message.
    pub fn message(&self) -> String {
        match self {
            Waiting::Unsatisfiable(why) => format!("cannot run on the hosts that exist: {why}"),
            Waiting::Queued { behind, priority } => {
                format!("queued behind test {behind} (priority {priority}), which waits for hosts this test could use")
            }
            Waiting::Unschedulable(why) => why.to_string(),
        }
    }
}

/// One pass over the whole queue (`queue` in [`queue_order`]): what each
/// pending test does now. Walking in order, each test that can claim
/// takes its hosts; one that cannot start yet holds back every free host
/// that fits one of its roles, so a large test is not starved by a stream
/// of small ones; one that could not run even on every host there is holds
/// nothing back (it would block the queue for good). Whether a spec fits
/// the inventory (and the "did you mean" of one that does not) is worked
/// out once per distinct spec in a pass: thousands of waiting tests cost
/// one pass, not one each.
pub fn plan_queue(queue: &[&testbus_proto::Test], hosts: &[&Host]) -> Vec<Decision> {
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut blocked: Option<&testbus_proto::Test> = None;
    let mut inventory: HashMap<String, Result<(), Unfit>> = HashMap::new();
    let mut out = Vec::with_capacity(queue.len());
    for q in queue {
        let reqs = &q.spec().hosts;
        // Hosts an earlier attempt of the test failed on are not its.
        let failed_on: std::collections::BTreeSet<&str> =
            q.status().attempts.iter().flat_map(|a| a.hosts.iter().map(String::as_str)).collect();
        let owned;
        let hosts: &[&Host] = if failed_on.is_empty() {
            hosts
        } else {
            owned = hosts.iter().copied().filter(|h| !failed_on.contains(h.name())).collect::<Vec<_>>();
            &owned
        };
        let key = format!("{reqs:?}{failed_on:?}");
        let fit = inventory.entry(key).or_insert_with(|| fits_inventory(reqs, hosts));
        if let Err(why) = fit {
            out.push(Decision::Wait(Waiting::Unsatisfiable(why.clone())));
            continue;
        }
        let avail: Vec<&Host> = hosts.iter().copied().filter(|h| !taken.contains(h.name())).collect();
        match assign(reqs, &avail) {
            Ok(a) => {
                taken.extend(a.iter().map(|a| a.host.clone()));
                out.push(Decision::Claim(a));
            }
            Err(why) => {
                let wait = match blocked {
                    Some(b) if assign(reqs, hosts).is_ok() => {
                        Waiting::Queued { behind: b.name().to_string(), priority: b.spec().priority }
                    }
                    _ => Waiting::Unschedulable(why),
                };
                for h in avail.iter().filter(|h| is_free(h) && reqs.iter().any(|r| fits(r, h))) {
                    taken.insert(h.name().to_string());
                }
                blocked.get_or_insert(*q);
                out.push(Decision::Wait(wait));
            }
        }
    }
    out
}

/// Whether the test could run on the hosts that exist, were they all free,
/// Ready and schedulable (a host that is down may come back, a cordoned
/// one be uncordoned); Err says what no host there is can give.
pub fn fits_inventory(reqs: &[HostRequirement], hosts: &[&Host]) -> Result<(), Unfit> {
    for r in reqs {
        let need = r.count.unwrap_or(1) as usize;
        let have = hosts.iter().filter(|h| fits(r, h)).count();
        if have < need {
            return Err(if have == 0 {
                Unfit::NoHostFits { needs: describe(r), hint: none_fits(r, hosts) }
            } else {
                Unfit::TooFew { needs: describe(r), have }
            });
        }
    }
    match_slots(reqs, hosts).map(|_| ()).map_err(|()| Unfit::RolesClash { hosts: hosts.len() })
}

pub fn assign(reqs: &[HostRequirement], hosts: &[&Host]) -> Result<Vec<Assignment>, Unavailable> {
    let free: Vec<&Host> = hosts.iter().copied().filter(|h| is_free(h)).collect();
    // Per-role shortage gives the clearest message.
    for r in reqs {
        let need = r.count.unwrap_or(1) as usize;
        let have = (0..free.len()).filter(|&j| fits(r, free[j])).count();
        if have < need {
            let mut busy: Vec<String> =
                hosts.iter().filter(|h| fits(r, h) && !is_free(h)).map(|h| busy_reason(h)).collect();
            busy.sort();
            let hint = (busy.is_empty() && have == 0).then(|| none_fits(r, hosts));
            return Err(Unavailable::Short { needs: describe(r), free: have, busy, hint });
        }
    }

    match_slots(reqs, &free).map_err(|()| Unavailable::RolesClash { free: free.len() })
}

/// Gives every role member a distinct host of `hosts` that fits its role,
/// if that can be done at all.
fn match_slots(reqs: &[HostRequirement], hosts: &[&Host]) -> Result<Vec<Assignment>, ()> {
    // Slots: one per role member.
    let slots: Vec<(usize, String)> =
        reqs.iter().enumerate().flat_map(|(i, r)| members(r).into_iter().map(move |m| (i, m))).collect();
    if slots.len() > hosts.len() {
        return Err(());
    }
    // Members of one role want the same: their candidates are found once
    // per role, not per member (1,000 members over 10,000 hosts took
    // seconds a pass).
    let per_role: Vec<Vec<usize>> =
        reqs.iter().map(|r| (0..hosts.len()).filter(|&j| fits(r, hosts[j])).collect()).collect();
    let candidates: Vec<&[usize]> = slots.iter().map(|(i, _)| per_role[*i].as_slice()).collect();
    // Most constrained slots first makes augmenting paths short.
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|&s| candidates[s].len());
    let mut host_to_slot: HashMap<usize, usize> = HashMap::new();
    for &s in &order {
        let mut seen = vec![false; hosts.len()];
        if !augment(s, &candidates, &mut host_to_slot, &mut seen) {
            return Err(());
        }
    }
    let mut out: Vec<Assignment> = host_to_slot
        .into_iter()
        .map(|(h, s)| Assignment {
            role: reqs[slots[s].0].role.clone(),
            member: slots[s].1.clone(),
            host: hosts[h].name().to_string(),
        })
        .collect();
    out.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(out)
}

fn augment(s: usize, cand: &[&[usize]], host_to_slot: &mut HashMap<usize, usize>, seen: &mut [bool]) -> bool {
    // A free candidate first: no path to follow. Without this, n slots over
    // n alike hosts walked a path through every taken host for each slot,
    // O(n^3): a test over 1,000 hosts never got its claim.
    if let Some(&h) = cand[s].iter().find(|&&h| !seen[h] && !host_to_slot.contains_key(&h)) {
        seen[h] = true;
        host_to_slot.insert(h, s);
        return true;
    }
    for &h in cand[s] {
        if seen[h] {
            continue;
        }
        seen[h] = true;
        let taken_by = host_to_slot.get(&h).copied();
        if taken_by.is_none_or(|other| augment(other, cand, host_to_slot, seen)) {
            host_to_slot.insert(h, s);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::states::ProcessPhase;
    use testbus_proto::{HostClaim, HostStatus, ObjectMeta};

    fn host(name: &str, caps: &[&str]) -> Host {
        Host {
            metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
            status: Some(HostStatus {
                phase: ProcessPhase::Ready.into(),
                capabilities: caps.iter().map(|c| c.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn req(role: &str, caps: &[&str], count: u32) -> HostRequirement {
        HostRequirement {
            role: role.into(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            count: Some(count),
            ..Default::default()
        }
    }

    /// A test over a thousand alike hosts gets them (the matching took
    /// cubic time before, and the claim never came).
    #[test]
    fn a_thousand_alike_hosts_are_matched_to_a_thousand_members() {
        let hosts: Vec<Host> = (0..1000).map(|i| host(&format!("h{i}"), &["x"])).collect();
        let refs: Vec<&Host> = hosts.iter().collect();
        let a = assign(&[req("w", &["x"], 1000)], &refs).expect("assigned");
        let distinct: std::collections::BTreeSet<&str> = a.iter().map(|a| a.host.as_str()).collect();
        assert_eq!(distinct.len(), 1000);
    }

    #[test]
    fn finds_a_matching_greedy_would_miss() {
        // Greedy in role order would give h1 to `a` and leave `b` nothing.
        let h1 = host("h1", &["x", "y"]);
        let h2 = host("h2", &["x"]);
        let reqs = [req("a", &["x"], 1), req("b", &["x", "y"], 1)];
        let got = assign(&reqs, &[&h1, &h2]).unwrap();
        let find = |m: &str| got.iter().find(|a| a.member == m).unwrap().host.clone();
        assert_eq!(find("a"), "h2");
        assert_eq!(find("b"), "h1");
    }

    #[test]
    fn members_are_named_and_distinct() {
        let hs: Vec<Host> = (0..3).map(|i| host(&format!("h{i}"), &["c"])).collect();
        let refs: Vec<&Host> = hs.iter().collect();
        let got = assign(&[req("client", &["c"], 3)], &refs).unwrap();
        let members: Vec<&str> = got.iter().map(|a| a.member.as_str()).collect();
        assert_eq!(members, ["client0", "client1", "client2"]);
        let hosts: BTreeSet<&str> = got.iter().map(|a| a.host.as_str()).collect();
        assert_eq!(hosts.len(), 3);
    }

    #[test]
    fn shortage_says_why() {
        let mut busy = host("h1", &["nfs-client"]);
        busy.status.as_mut().unwrap().claim = Some(HostClaim { test: "other".into(), ..Default::default() });
        let free = host("h2", &["nfs-client"]);
        let err = assign(&[req("client", &["nfs-client"], 4)], &[&busy, &free]).unwrap_err().to_string();
        assert_eq!(err, "needs 4 × nfs-client (role client), 1 free: h1 claimed by test other");
        let err = assign(&[req("gpu", &["gpu"], 1)], &[&free]).unwrap_err().to_string();
        assert!(err.ends_with("; no host offers capability gpu"), "{err}");
    }

    /// A capability no host offers is named, with the nearest offered one
    /// when it looks like a typo; a selector no host matches is said too.
    #[test]
    fn a_missing_capability_gets_did_you_mean() {
        let mut a = host("h1", &["nfs-server", "kvm"]);
        a.metadata.as_mut().unwrap().labels.insert("rack".into(), "r1".into());
        let b = host("h2", &["nfs-client"]);
        let hosts = [&a, &b];
        let err = fits_inventory(&[req("s", &["nfs-sever"], 1)], &hosts).unwrap_err().to_string();
        assert!(err.ends_with("no host offers capability nfs-sever (did you mean nfs-server?)"), "{err}");
        let err = fits_inventory(&[req("s", &["gpu", "kmv"], 1)], &hosts).unwrap_err().to_string();
        assert!(err.ends_with("no host offers capabilities gpu, kmv (did you mean kvm?)"), "{err}");
        // Both exist, but not on one host.
        let err = fits_inventory(&[req("s", &["nfs-server", "nfs-client"], 1)], &hosts).unwrap_err().to_string();
        assert!(err.ends_with("no host has these capabilities"), "{err}");
        let mut labelled = req("s", &["kvm"], 1);
        labelled.selector = "rack in (r2,r3)".into();
        let err = fits_inventory(&[labelled.clone()], &hosts).unwrap_err().to_string();
        assert!(err.contains("1 × kvm labelled rack in (r2,r3) (role s)"), "{err}");
        assert!(err.ends_with("no host with these capabilities has labels matching rack in (r2,r3)"), "{err}");
        labelled.selector = "rack notin (r2),!flaky".into();
        assert_eq!(assign(&[labelled], &hosts).unwrap()[0].host, "h1");
        let mut pinned = req("s", &[], 1);
        pinned.host = "h9".into();
        assert!(fits_inventory(&[pinned], &hosts).unwrap_err().to_string().ends_with("no host named h9"));
    }

    fn pending(name: &str, priority: i32, created: &str, reqs: Vec<HostRequirement>) -> testbus_proto::Test {
        testbus_proto::Test {
            metadata: Some(ObjectMeta {
                name: name.into(),
                uid: name.into(),
                creation_timestamp: created.into(),
                ..Default::default()
            }),
            spec: Some(testbus_proto::TestSpec { hosts: reqs, priority, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_large_test_at_the_head_is_not_starved() {
        // Three hosts, one busy. The big test (needs 3) came first; a small
        // one (needs 1) came later and must not take the free hosts.
        let mut busy = host("h0", &[]);
        busy.status.as_mut().unwrap().claim = Some(HostClaim { test: "other".into(), ..Default::default() });
        let (h1, h2) = (host("h1", &[]), host("h2", &[]));
        let hosts = [&busy, &h1, &h2];
        let big = pending("big", 0, "2026-01-01T00:00:00Z", vec![req("r", &[], 3)]);
        let small = pending("small", 0, "2026-01-01T00:00:01Z", vec![req("r", &[], 1)]);
        let mut queue = vec![&small, &big];
        queue.sort_by(|a, b| queue_order(a, b));
        assert_eq!(queue[0].name(), "big");
        let d = plan_queue(&queue, &hosts);
        assert_eq!(d[1], Decision::Wait(Waiting::Queued { behind: "big".into(), priority: 0 }), "the small test waits");
        assert!(matches!(&d[0], Decision::Wait(Waiting::Unschedulable(_))), "{:?}", d[0]);
        // A small test needing a capability the big one does not use backfills.
        let mut gpu = host("g", &["gpu"]);
        gpu.spec = None;
        let big_plain = pending("big", 0, "2026-01-01T00:00:00Z", vec![req("r", &["plain"], 3)]);
        let small_gpu = pending("small", 0, "2026-01-01T00:00:01Z", vec![req("r", &["gpu"], 1)]);
        let mut plain = host("h1", &["plain"]);
        plain.spec = None;
        let hosts = [&busy, &plain, &gpu];
        let d = plan_queue(&[&big_plain, &small_gpu], &hosts);
        assert!(matches!(&d[1], Decision::Claim(a) if a[0].host == "g"), "{d:?}");
        // Priority goes before age.
        let urgent = pending("urgent", 10, "2026-01-02T00:00:00Z", vec![]);
        let mut q = [&big, &urgent];
        q.sort_by(|a, b| queue_order(a, b));
        assert_eq!(q[0].name(), "urgent");
    }

    /// Thousands of tests that cannot run wait in one pass, and a test that
    /// can run behind them is claimed in that same pass.
    #[test]
    fn a_runnable_test_behind_thousands_that_cannot_run_is_claimed() {
        let hs: Vec<Host> = (0..4).map(|i| host(&format!("h{i}"), &["c"])).collect();
        let refs: Vec<&Host> = hs.iter().collect();
        let stuck: Vec<testbus_proto::Test> = (0..5000)
            .map(|i| pending(&format!("s{i}"), 0, "2026-01-01T00:00:00Z", vec![req("a", &["nfs-sever"], 1)]))
            .collect();
        let runnable = pending("go", 0, "2026-01-02T00:00:00Z", vec![req("a", &["c"], 2)]);
        let mut queue: Vec<&testbus_proto::Test> = stuck.iter().collect();
        queue.push(&runnable);
        let d = plan_queue(&queue, &refs);
        assert_eq!(d.len(), 5001);
        assert!(matches!(&d[5000], Decision::Claim(a) if a.len() == 2), "{:?}", d[5000]);
        assert!(d[..5000].iter().all(|d| matches!(d, Decision::Wait(Waiting::Unsatisfiable(_)))));
    }

    #[test]
    fn not_ready_and_cordoned_hosts_are_not_free() {
        let mut a = host("a", &[]);
        a.status.as_mut().unwrap().phase = HostPhase::NotReady.into();
        let mut b = host("b", &[]);
        b.spec = Some(testbus_proto::HostSpec { unschedulable: true, ..Default::default() });
        assert!(assign(&[req("r", &[], 1)], &[&a, &b]).is_err());
    }

    /// A test that can never run (more hosts than exist, a capability no
    /// host has) once reserved every free host ahead of the queue for good.
    #[test]
    fn a_test_that_cannot_fit_the_inventory_holds_nothing_back() {
        let hs: Vec<Host> = (0..3).map(|i| host(&format!("h{i}"), &["c"])).collect();
        let refs: Vec<&Host> = hs.iter().collect();
        let huge = pending("huge", 10, "2026-01-01T00:00:00Z", vec![req("a", &[], 1000)]);
        let typo = pending("typo", 10, "2026-01-01T00:00:01Z", vec![req("a", &["no-such-cap"], 1)]);
        let small = pending("small", 0, "2026-01-01T00:00:02Z", vec![req("a", &["c"], 2)]);
        assert!(fits_inventory(&huge.spec().hosts, &refs).unwrap_err().to_string().contains("only 3 such hosts exist"));
        assert!(fits_inventory(&typo.spec().hosts, &refs)
            .unwrap_err()
            .to_string()
            .ends_with("no host offers capability no-such-cap"));
        assert!(fits_inventory(&small.spec().hosts, &refs).is_ok());
        let queue = [&huge, &typo, &small];
        let d = plan_queue(&queue, &refs);
        assert!(matches!(&d[2], Decision::Claim(a) if a.len() == 2), "nothing held back: {d:?}");
        // Busy, cordoned or down hosts still count as inventory.
        let mut down = host("h9", &["d"]);
        down.status_mut().phase = HostPhase::NotReady.into();
        assert!(fits_inventory(&[req("a", &["d"], 1)], &[&down]).is_ok());
        assert!(assign(&[req("a", &["d"], 1)], &[&down]).is_err());
        // Each role fits alone, not all at once.
        let both = [req("a", &["c"], 2), req("b", &["c"], 2)];
        assert!(fits_inventory(&both, &refs).unwrap_err().to_string().contains("not all roles at once"));
    }
}
