//! What a HostPool should do now, as a pure function of what is: how many
//! guests to make, which to clean and which to destroy. The pool controller
//! (`pools.rs`) carries the plan out.
use crate::schedule::fits_labels;
use std::time::{Duration, SystemTime};
use testbus_proto::{HostPool, Resource, Test};

/// Where a guest is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPhase {
    /// Its disk and domain are being made.
    Creating,
    /// Booting, until it waits for its go.
    Booting,
    /// Its link is up; waiting for its agent to register.
    Linking,
    /// Its Host is Ready and clean, or in use by a test.
    Ready,
    /// Being brought back to its clean state after a test.
    Cleaning,
    /// Something failed; it is destroyed and replaced.
    Failed,
    /// Being destroyed.
    Deleting,
}

impl GuestPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestPhase::Creating => "Creating",
            GuestPhase::Booting => "Booting",
            GuestPhase::Linking => "Linking",
            GuestPhase::Ready => "Ready",
            GuestPhase::Cleaning => "Cleaning",
            GuestPhase::Failed => "Failed",
            GuestPhase::Deleting => "Deleting",
        }
    }
}

/// One guest as the plan sees it.
#[derive(Debug, Clone)]
pub struct GuestView {
    pub name: String,
    pub phase: GuestPhase,
    /// An operation on it is under way.
    pub busy: bool,
    /// Its Host is claimed by a test.
    pub claimed: bool,
    /// Claimed by a test that has ended: free again once cleaned, which is
    /// sooner than a new guest boots.
    pub freeing: bool,
    /// Its Host carries the clean mark.
    pub clean: bool,
    /// Since when it is Ready, clean and unclaimed.
    pub idle_since: Option<SystemTime>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolPlan {
    /// Guests to make now.
    pub create: u32,
    /// Guests to bring back to their clean state.
    pub clean: Vec<String>,
    /// Guests to destroy.
    pub destroy: Vec<String>,
    /// The guests the pool wants (within min and max).
    pub want: u32,
    /// The pending tests the new guests are for, for the pool's message.
    pub for_tests: Vec<String>,
    /// Demand beyond max.
    pub capped: bool,
}

/// Default `max` of a pool.
pub const DEFAULT_MAX: u32 = 8;
/// Default `idleTimeout` of a pool.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);

/// How many members of pending tests this pool's guests could be, and
/// which tests they are: every member of each requirement the pool's
/// capabilities and labels satisfy (all of a test's members at once: a test
/// is claimed whole).
pub fn demand<'a>(pool: &HostPool, pending: impl IntoIterator<Item = &'a Test>) -> (u32, Vec<String>) {
    let sp = pool.spec();
    let mut labels = sp.labels.clone();
    labels.insert(testbus_proto::pool::POOL_LABEL.into(), pool.name().to_string());
    let (mut n, mut tests) = (0, Vec::new());
    for t in pending {
        if !testbus_proto::states::waits_for_hosts(t) {
            continue;
        }
        let fitting: u32 = t
            .spec()
            .hosts
            .iter()
            .filter(|r| r.host.is_empty() || r.host.starts_with(&format!("{}-", pool.name())))
            .filter(|r| r.capabilities.iter().all(|c| sp.capabilities.contains(c)))
            .filter(|r| r.capabilities.iter().any(|c| sp.capabilities.contains(c)) || !r.selector.is_empty())
            .filter(|r| fits_labels(r, &labels))
            .map(|r| r.count.unwrap_or(1))
            .sum();
        if fitting > 0 {
            n += fitting;
            tests.push(t.name().to_string());
        }
    }
    (n, tests)
}

pub fn plan(pool: &HostPool, guests: &[GuestView], demand: (u32, Vec<String>), now: SystemTime) -> PoolPlan {
    let sp = pool.spec();
    let max = sp.max.unwrap_or(DEFAULT_MAX);
    let idle = testbus_proto::duration::parse(&sp.idle_timeout).unwrap_or(DEFAULT_IDLE);
    let mut p = PoolPlan::default();
    let alive: Vec<&GuestView> =
        guests.iter().filter(|g| !matches!(g.phase, GuestPhase::Failed | GuestPhase::Deleting)).collect();
    // Guests of tests that ended count as free: the demand they can meet
    // once cleaned is not met with new guests (a test that waited 1.5 s for
    // a cleaning guest had a second one booted for it, a 10 s TCG boot).
    let claimed = alive.iter().filter(|g| g.claimed && !g.freeing).count() as u32;
    let wanted = (claimed + demand.0).max(sp.min);
    p.capped = wanted > max;
    p.want = wanted.min(max);
    let have = alive.len() as u32;
    p.create = p.want.saturating_sub(have);
    if p.create > 0 {
        p.for_tests = demand.1;
    }
    for g in guests {
        if g.phase == GuestPhase::Failed && !g.busy {
            p.destroy.push(g.name.clone());
        }
    }
    // Used and released: clean before anyone else gets it.
    for g in &alive {
        if g.phase == GuestPhase::Ready && !g.busy && !g.claimed && !g.clean {
            p.clean.push(g.name.clone());
        }
    }
    // Idle past the timeout, above what is wanted: the longest idle first.
    let mut idle_guests: Vec<&&GuestView> = alive
        .iter()
        .filter(|g| g.phase == GuestPhase::Ready && !g.busy && !g.claimed && g.clean)
        .filter(|g| g.idle_since.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= idle))
        .collect();
    idle_guests.sort_by_key(|g| g.idle_since);
    let mut extra = have.saturating_sub(p.want);
    for g in idle_guests {
        if extra == 0 {
            break;
        }
        p.destroy.push(g.name.clone());
        extra -= 1;
    }
    p
}

/// What a pool has, for its condition: "no guests", "1 guest: 1 Ready",
/// "3 guests: 2 Ready (1 in use), 1 Booting". (It said how many it
/// wanted, which was 0 with one idle guest Ready.)
pub fn summary(views: &[GuestView]) -> String {
    if views.is_empty() {
        return "no guests".into();
    }
    let mut counts: Vec<(GuestPhase, usize)> = Vec::new();
    for v in views {
        match counts.iter_mut().find(|(p, _)| *p == v.phase) {
            Some((_, n)) => *n += 1,
            None => counts.push((v.phase, 1)),
        }
    }
    counts.sort_by_key(|(p, _)| *p as u8);
    let in_use = views.iter().filter(|v| v.phase == GuestPhase::Ready && v.claimed).count();
    let parts: Vec<String> = counts
        .iter()
        .map(|(p, n)| match p {
            GuestPhase::Ready if in_use > 0 => format!("{n} Ready ({in_use} in use)"),
            _ => format!("{n} {}", p.as_str()),
        })
        .collect();
    let n = views.len();
    format!("{n} guest{}: {}", if n == 1 { "" } else { "s" }, parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::manifest;
    use testbus_proto::states::TestPhase;

    fn view(name: &str, phase: GuestPhase, claimed: bool) -> GuestView {
        GuestView { name: name.into(), phase, busy: false, claimed, freeing: false, clean: !claimed, idle_since: None }
    }

    #[test]
    fn the_summary_says_what_the_pool_has() {
        assert_eq!(summary(&[]), "no guests");
        assert_eq!(summary(&[view("a", GuestPhase::Ready, false)]), "1 guest: 1 Ready");
        let three = [
            view("a", GuestPhase::Booting, false),
            view("b", GuestPhase::Ready, true),
            view("c", GuestPhase::Ready, false),
        ];
        assert_eq!(summary(&three), "3 guests: 1 Booting, 2 Ready (1 in use)");
    }

    fn pool(extra: &str) -> HostPool {
        let text = format!(
            "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {{name: vms}}\nspec:\n  provider: libvirt\n  image: /i\n  capabilities: [vm]\n  labels: {{site: lab}}\n{extra}"
        );
        match manifest::parse_documents("p", &text).unwrap().remove(0).1 {
            testbus_proto::Object::HostPool(p) => p,
            _ => unreachable!(),
        }
    }

    fn pending(name: &str, hosts: &str) -> Test {
        let text = format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  hosts: {hosts}\n  steps: [{{name: s, on: [a], argv: [\"true\"]}}]\n"
        );
        let mut t = match manifest::parse_documents("t", &text).unwrap().remove(0).1 {
            testbus_proto::Object::Test(t) => t,
            _ => unreachable!(),
        };
        t.status_mut().phase = TestPhase::Pending.into();
        t
    }

    fn guest(name: &str, phase: GuestPhase, claimed: bool, clean: bool, idle_for: Option<u64>) -> GuestView {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        GuestView {
            name: name.into(),
            phase,
            busy: false,
            claimed,
            freeing: false,
            clean,
            idle_since: idle_for.map(|s| now - Duration::from_secs(s)),
        }
    }

    const NOW: u64 = 10_000;
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
    }

    #[test]
    fn demand_counts_the_members_the_pool_can_be() {
        let p = pool("");
        let tests = [
            pending("two", "[{role: a, capabilities: [vm], count: 2}]"),
            pending("mixed", "[{role: a, capabilities: [vm]}, {role: b, capabilities: [bare]}]"),
            pending("other", "[{role: a, capabilities: [gpu]}]"),
            pending("any", "[{role: a}]"),
            pending("labelled", "[{role: a, selector: \"site in (lab)\"}]"),
            pending("elsewhere", "[{role: a, capabilities: [vm], selector: \"site=far\"}]"),
        ];
        let (n, names) = demand(&p, &tests);
        assert_eq!(n, 4, "{names:?}");
        assert_eq!(names, ["two", "mixed", "labelled"]);
        // A test cancelled before its claim, or being deleted, wants no
        // guest (one cancelled still made the pool boot guests for it).
        let mut cancelled = pending("cancelled", "[{role: a, capabilities: [vm]}]");
        let v = testbus_proto::states::Verdict::new(testbus_proto::states::TestReason::Cancelled, "by alice");
        cancelled.status_mut().conditions.push(v.condition("t".into()));
        let mut deleted = pending("deleted", "[{role: a, capabilities: [vm]}]");
        deleted.meta_mut().deletion_timestamp = "t".into();
        let mut fresh = pending("fresh", "[{role: a, capabilities: [vm]}]");
        fresh.status_mut().phase.clear();
        assert_eq!(demand(&p, &[cancelled, deleted, fresh]), (1, vec!["fresh".to_string()]));
    }

    #[test]
    fn scales_up_on_demand_within_max_and_keeps_min() {
        let p = pool("  min: 1\n  max: 3\n");
        assert_eq!(plan(&p, &[], (0, vec![]), now()).create, 1, "min");
        let pl = plan(&p, &[], (5, vec!["big".into()]), now());
        assert_eq!((pl.create, pl.capped, pl.for_tests.clone()), (3, true, vec!["big".to_string()]));
        let busy =
            [guest("g1", GuestPhase::Ready, true, false, None), guest("g2", GuestPhase::Booting, false, false, None)];
        assert_eq!(plan(&p, &busy, (1, vec!["t".into()]), now()).create, 0, "one in use, one on its way");
        assert_eq!(plan(&p, &busy, (2, vec!["t".into()]), now()).create, 1);
    }

    /// A test waiting for the only guest, whose test has ended but not yet
    /// released it, waits for it to be cleaned: no second guest is booted.
    #[test]
    fn a_guest_whose_test_ended_is_waited_for_not_replaced() {
        let p = pool("  max: 2\n");
        let mut ending = guest("g1", GuestPhase::Ready, true, false, None);
        ending.freeing = true;
        assert_eq!(plan(&p, std::slice::from_ref(&ending), (1, vec!["next".into()]), now()).create, 0);
        let cleaning = guest("g1", GuestPhase::Cleaning, false, false, None);
        assert_eq!(plan(&p, &[cleaning], (1, vec!["next".into()]), now()).create, 0);
        // Demand beyond what it frees still gets new guests.
        assert_eq!(plan(&p, &[ending], (2, vec!["a".into(), "b".into()]), now()).create, 1);
    }

    #[test]
    fn released_guests_are_cleaned_and_idle_ones_go_above_min() {
        let p = pool("  min: 1\n  idleTimeout: 1m\n");
        let guests = [
            guest("used", GuestPhase::Ready, false, false, None),
            guest("long-idle", GuestPhase::Ready, false, true, Some(300)),
            guest("longer-idle", GuestPhase::Ready, false, true, Some(400)),
            guest("fresh", GuestPhase::Ready, false, true, Some(10)),
            guest("broken", GuestPhase::Failed, false, false, None),
        ];
        let pl = plan(&p, &guests, (0, vec![]), now());
        assert_eq!(pl.clean, ["used"]);
        // 4 alive, min 1: the two idle past the timeout go, longest first;
        // "fresh" stays (not idle long enough), as does "used".
        assert_eq!(pl.destroy, ["broken", "longer-idle", "long-idle"]);
        assert_eq!(pl.create, 0);
        // Demand keeps idle guests.
        let pl = plan(&p, &guests, (3, vec!["t".into()]), now());
        assert_eq!(pl.destroy, ["broken", "longer-idle"]);
    }
}
