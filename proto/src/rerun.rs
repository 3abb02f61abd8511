//! A new run of an ended test with its original inputs (`Tests.Rerun`, the
//! dashboard's Rerun, `testbusctl rerun`): the same spec, so the same file
//! digests, its resolved environment (spec env and what `setenv` added),
//! and the same host requirements, on a local HostPool's guests if asked;
//! with `failed_only`, only the steps that failed and what they come
//! after. A pure function of the stored test.
use crate::states::StepPhase;
use crate::steps::expand;
use crate::{ChildTest, ObjectMeta, Resource, Step, Test};
use std::collections::{BTreeMap, BTreeSet};

/// The label a rerun carries: the name of the test it repeats.
pub const RERUN_OF: &str = "testbus.io/rerun-of";

/// How to run again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RerunOptions {
    /// Only the steps that failed (or were stopped: a timeout, a lost
    /// host), with the steps they come after.
    pub failed_only: bool,
    /// On guests of this HostPool: each role selects the pool's label
    /// instead of its own selector, and no role is pinned to a host.
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RerunError {
    #[error("test: {0:?} has not ended: cancel it first, or wait")]
    NotEnded(String),
    #[error("test: {0:?} is open (driven from outside, no steps): run what drove it again")]
    Open(String),
    #[error("failedOnly: no step of test {0:?} failed")]
    NothingFailed(String),
}

/// The test to create: named as the first run was (its generateName, or
/// NAME-), labelled with its labels and [`RERUN_OF`].
pub fn rerun_of(t: &Test, opts: &RerunOptions) -> Result<Test, RerunError> {
    let name = t.name();
    if !crate::phase::test_terminal(&t.status().phase) {
        return Err(RerunError::NotEnded(name.into()));
    }
    if t.spec().open {
        return Err(RerunError::Open(name.into()));
    }
    let mut spec = t.spec().clone();
    // The resolved environment: what setenv added sits over the spec's.
    spec.env.extend(t.status().env.clone());
    if opts.failed_only {
        let failed: BTreeSet<&str> = t
            .status()
            .steps
            .iter()
            .filter(|s| s.phase == StepPhase::Failed || s.phase == StepPhase::Stopped)
            .map(|s| s.name.as_str())
            .collect();
        if failed.is_empty() {
            return Err(RerunError::NothingFailed(name.into()));
        }
        let keep = with_what_they_follow(&spec, &failed);
        let (steps, tests) = prune("", &spec.steps, &spec.tests, &keep);
        spec.steps = steps;
        spec.tests = tests;
    }
    if let Some(pool) = &opts.pool {
        for h in &mut spec.hosts {
            h.selector = format!("{}={pool}", crate::pool::POOL_LABEL);
            h.host.clear();
        }
    }
    let m = t.meta();
    let generate_name = if m.generate_name.is_empty() {
        // Room for the five characters a generated name adds.
        format!("{}-", m.name[..m.name.len().min(57)].trim_end_matches('-'))
    } else {
        m.generate_name.clone()
    };
    let mut labels = m.labels.clone();
    labels.insert(RERUN_OF.into(), m.name.clone());
    Ok(Test {
        metadata: Some(ObjectMeta { generate_name, labels, ..Default::default() }),
        spec: Some(spec),
        ..Default::default()
    }
    .with_type_meta())
}

/// `failed` and every step they come after, transitively (qualified names).
fn with_what_they_follow(spec: &crate::TestSpec, failed: &BTreeSet<&str>) -> BTreeSet<String> {
    let graph: BTreeMap<String, Vec<String>> = expand(spec).into_iter().map(|e| (e.step.name, e.step.after)).collect();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = failed.iter().map(|s| s.to_string()).collect();
    while let Some(n) = todo.pop() {
        if keep.insert(n.clone()) {
            todo.extend(graph.get(&n).into_iter().flatten().cloned());
        }
    }
    keep
}

fn qualify(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The steps and children of one level that hold a kept step. A kept
/// step's `after` names only kept steps (the set is closed under it); a
/// kept child's `after` keeps the entries that still name something.
fn prune(prefix: &str, steps: &[Step], children: &[ChildTest], keep: &BTreeSet<String>) -> (Vec<Step>, Vec<ChildTest>) {
    let kept_steps: Vec<Step> = steps.iter().filter(|s| keep.contains(&qualify(prefix, &s.name))).cloned().collect();
    let mut kept_children = Vec::new();
    for c in children {
        let (s, t) = prune(&qualify(prefix, &c.name), &c.steps, &c.tests, keep);
        if !s.is_empty() || !t.is_empty() {
            kept_children.push(ChildTest { steps: s, tests: t, ..c.clone() });
        }
    }
    let present: BTreeSet<String> =
        kept_steps.iter().map(|s| s.name.clone()).chain(kept_children.iter().map(|c| c.name.clone())).collect();
    for c in &mut kept_children {
        c.after.retain(|a| present.contains(a));
    }
    (kept_steps, kept_children)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostRequirement, StepStatus, TestSpec, TestStatus};

    fn step(name: &str, after: &[&str]) -> Step {
        Step {
            name: name.into(),
            after: after.iter().map(|s| s.to_string()).collect(),
            argv: vec!["true".into()],
            on: vec!["a".into()],
            ..Default::default()
        }
    }

    fn ended(phase: &str, steps: &[(&str, &str)]) -> Test {
        let mut t = Test {
            metadata: Some(ObjectMeta { name: "nightly".into(), ..Default::default() }),
            spec: Some(TestSpec {
                hosts: vec![HostRequirement { role: "a".into(), host: "lab-7".into(), ..Default::default() }],
                env: [("A".to_string(), "spec".to_string())].into(),
                steps: vec![step("setup", &[]), step("smoke", &["setup"]), step("report", &["suite"])],
                tests: vec![ChildTest {
                    name: "suite".into(),
                    after: vec!["smoke".into()],
                    steps: vec![step("one", &[]), step("two", &["one"]), step("three", &[])],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(TestStatus { phase: phase.into(), ..Default::default() }),
            ..Default::default()
        };
        t.status_mut().steps = steps
            .iter()
            .map(|(n, p)| StepStatus { name: n.to_string(), phase: p.to_string(), ..Default::default() })
            .collect();
        t.status_mut().env = [("A".to_string(), "spec".to_string()), ("B".to_string(), "setenv".to_string())].into();
        t
    }

    #[test]
    fn a_rerun_repeats_the_inputs_and_says_what_it_repeats() {
        let t = ended("Failed", &[]);
        let r = rerun_of(&t, &RerunOptions::default()).unwrap();
        assert_eq!(r.meta().generate_name, "nightly-");
        assert_eq!(r.meta().labels[RERUN_OF], "nightly");
        assert_eq!(r.spec().steps, t.spec().steps);
        assert_eq!(r.spec().hosts, t.spec().hosts);
        assert_eq!(r.spec().env["B"], "setenv", "what setenv added is part of what it ran with");
        let on_pool = rerun_of(&t, &RerunOptions { pool: Some("laptop".into()), ..Default::default() }).unwrap();
        assert_eq!(on_pool.spec().hosts[0].selector, "testbus.io/pool=laptop");
        assert!(on_pool.spec().hosts[0].host.is_empty(), "a pinned lab host is no pool guest");
    }

    #[test]
    fn failed_only_keeps_the_failed_steps_and_what_they_follow() {
        let t = ended(
            "Failed",
            &[
                ("setup", "Succeeded"),
                ("smoke", "Succeeded"),
                ("suite.one", "Succeeded"),
                ("suite.two", "Failed"),
                ("suite.three", "Stopped"),
                ("report", "Skipped"),
            ],
        );
        let r = rerun_of(&t, &RerunOptions { failed_only: true, ..Default::default() }).unwrap();
        let names: Vec<String> = expand(r.spec()).into_iter().map(|e| e.step.name).collect();
        assert_eq!(names, ["setup", "smoke", "suite.one", "suite.two", "suite.three"]);
        assert_eq!(r.spec().tests[0].after, ["smoke"]);
        use crate::validate::Validate;
        let mut made = r.clone();
        made.meta_mut().name = "nightly-x1y2z".into();
        made.validate().unwrap();
    }

    /// Named as the first run was: its generateName, or NAME- (a name's
    /// own "--" kept, a trailing '-' not doubled, room for the suffix).
    #[test]
    fn a_rerun_is_named_as_its_first_run_was() {
        let mut t = ended("Failed", &[]);
        t.meta_mut().name = "web".into();
        t.meta_mut().labels.insert("suite".into(), "web".into());
        t.meta_mut().annotations.insert("note".into(), "not carried".into());
        let name = |t: &Test| rerun_of(t, &RerunOptions::default()).unwrap().meta().generate_name.clone();
        let r = rerun_of(&t, &RerunOptions::default()).unwrap();
        assert_eq!((r.meta().generate_name.as_str(), r.meta().name.as_str()), ("web-", ""));
        assert_eq!(r.meta().labels["suite"], "web");
        assert!(r.meta().annotations.is_empty() && r.status.is_none());
        t.meta_mut().generate_name = "hello-".into();
        t.meta_mut().name = "hello-x7k2p".into();
        assert_eq!(name(&t), "hello-");
        t.meta_mut().generate_name.clear();
        t.meta_mut().name = "a".repeat(63);
        let long = name(&t);
        assert!(long.len() <= 58 && long.ends_with('-'), "{long}");
        t.meta_mut().name = "a--b".into();
        assert_eq!(name(&t), "a--b-");
        t.meta_mut().name = format!("{}-x", "a".repeat(56));
        assert_eq!(name(&t), format!("{}-", "a".repeat(56)));
    }

    #[test]
    fn what_cannot_be_rerun_says_why() {
        let running = ended("Running", &[]);
        assert_eq!(rerun_of(&running, &RerunOptions::default()), Err(RerunError::NotEnded("nightly".into())));
        let all_passed = ended("Succeeded", &[("setup", "Succeeded")]);
        let e = rerun_of(&all_passed, &RerunOptions { failed_only: true, ..Default::default() }).unwrap_err();
        assert_eq!(e.to_string(), "failedOnly: no step of test \"nightly\" failed");
        let mut open = ended("Succeeded", &[]);
        open.spec_mut().open = true;
        assert!(matches!(rerun_of(&open, &RerunOptions::default()), Err(RerunError::Open(_))));
    }
}
