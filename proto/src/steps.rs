//! The step graph of a test, with child tests expanded into it.
//!
//! A child's steps are named `<child>.<step>` (deeper children add more
//! parts); `after` naming a child means after every step of it; a child's
//! first steps come after what the child itself is `after`. Files
//! accumulate (parent's, then child's, then the step's) and a child's env
//! sits above its parent's.
use crate::{ChildTest, FileRef, Step, TestSpec};
use std::collections::BTreeMap;

/// One step of the expanded graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Expanded {
    /// The step with qualified name, `after`, files and env resolved.
    pub step: Step,
    /// The env of its enclosing child tests, outermost first (empty for the
    /// parent's own steps); it ranks below the host's env.
    pub test_env: BTreeMap<String, String>,
}

fn qualify(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Every qualified step name under one level.
fn names_under(prefix: &str, steps: &[Step], children: &[ChildTest]) -> Vec<String> {
    let mut out: Vec<String> = steps.iter().map(|s| qualify(prefix, &s.name)).collect();
    for c in children {
        out.extend(names_under(&qualify(prefix, &c.name), &c.steps, &c.tests));
    }
    out
}

pub fn expand(spec: &TestSpec) -> Vec<Expanded> {
    let mut out = Vec::new();
    level(&mut out, "", &BTreeMap::new(), &[], &spec.steps, &spec.tests, &[]);
    out
}

fn level(
    out: &mut Vec<Expanded>,
    prefix: &str,
    env: &BTreeMap<String, String>,
    files: &[FileRef],
    steps: &[Step],
    children: &[ChildTest],
    entry_after: &[String],
) {
    let resolve = |a: &String| -> Vec<String> {
        if steps.iter().any(|s| &s.name == a) {
            vec![qualify(prefix, a)]
        } else if let Some(c) = children.iter().find(|c| &c.name == a) {
            names_under(&qualify(prefix, &c.name), &c.steps, &c.tests)
        } else {
            vec![qualify(prefix, a)] // unknown: validation reports it
        }
    };
    let after_of = |after: &[String]| -> Vec<String> {
        if after.is_empty() {
            entry_after.to_vec()
        } else {
            after.iter().flat_map(resolve).collect()
        }
    };
    for s in steps {
        let mut step = s.clone();
        step.name = qualify(prefix, &s.name);
        step.after = after_of(&s.after);
        step.files = files.iter().chain(&s.files).cloned().collect();
        out.push(Expanded { step, test_env: env.clone() });
    }
    for c in children {
        let mut child_env = env.clone();
        child_env.extend(c.env.clone());
        let child_files: Vec<FileRef> = files.iter().chain(&c.files).cloned().collect();
        let entry = after_of(&c.after);
        level(out, &qualify(prefix, &c.name), &child_env, &child_files, &c.steps, &c.tests, &entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, after: &[&str]) -> Step {
        Step { name: name.into(), after: after.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn children_expand_into_the_graph() {
        let spec = TestSpec {
            steps: vec![step("setup", &[]), step("report", &["suite"])],
            tests: vec![ChildTest {
                name: "suite".into(),
                after: vec!["setup".into()],
                env: [("LEVEL".to_string(), "child".to_string())].into(),
                steps: vec![step("a", &[]), step("b", &["a"])],
                tests: vec![ChildTest { name: "inner".into(), steps: vec![step("c", &[])], ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let ex = expand(&spec);
        let by: BTreeMap<&str, &Expanded> = ex.iter().map(|e| (e.step.name.as_str(), e)).collect();
        let names: Vec<&str> = ex.iter().map(|e| e.step.name.as_str()).collect();
        assert_eq!(names, ["setup", "report", "suite.a", "suite.b", "suite.inner.c"]);
        assert_eq!(by["report"].step.after, ["suite.a", "suite.b", "suite.inner.c"]);
        assert_eq!(by["suite.a"].step.after, ["setup"]);
        assert_eq!(by["suite.b"].step.after, ["suite.a"]);
        assert_eq!(by["suite.inner.c"].step.after, ["setup"], "a child's first steps follow the child's after");
        assert_eq!(by["suite.inner.c"].test_env["LEVEL"], "child");
        assert!(by["setup"].test_env.is_empty());
    }
}
