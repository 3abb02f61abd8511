//! How a Process is built for a test: its name and its environment. Shared
//! by the test controller (steps) and `testbusctl exec` (imperative
//! scripts), so both follow the same precedence rules.
use crate::{FileRef, Host, ObjectMeta, OwnerReference, Process, ProcessSpec, Resource, Step, Test};
use std::collections::BTreeMap;

/// Label: the test a Process belongs to.
pub const LABEL_TEST: &str = "testbus.io/test";
/// Label: the step a Process runs (steps only).
pub const LABEL_STEP: &str = "testbus.io/step";
/// Label: the `exec` call a Process runs (exec only).
pub const LABEL_EXEC: &str = "testbus.io/exec";
/// Label: the member (role or role with index) a Process runs for.
pub const LABEL_ROLE: &str = "testbus.io/role";

/// Where a Process comes from, which decides its unit label and its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A step of the test: it gets the test's files, its host's, then the
    /// step's (later ones win a path).
    Step,
    /// An imperative `exec`: only the files it was given.
    Exec,
}

/// The Process that runs `unit` (a step, or an exec call given as a step)
/// of test `t` for `member` on `host`. `child_env` is the env of the child
/// tests the step is in (see [`env`]). The one builder for steps and
/// `exec`.
pub fn build(
    t: &Test,
    host: &Host,
    member: &str,
    unit: &Step,
    child_env: &BTreeMap<String, String>,
    origin: Origin,
) -> Process {
    let env = env(t, host, member, &unit.name, child_env, &unit.env);
    let unit_label = match origin {
        Origin::Step => LABEL_STEP,
        Origin::Exec => LABEL_EXEC,
    };
    let labels = [
        (LABEL_TEST.to_string(), t.name().to_string()),
        (unit_label.to_string(), unit.name.clone()),
        (LABEL_ROLE.to_string(), member.to_string()),
    ]
    .into();
    let files: Vec<FileRef> = match origin {
        Origin::Step => t.spec().files.iter().chain(&host.spec().files).chain(&unit.files).cloned().collect(),
        Origin::Exec => unit.files.clone(),
    };
    Process {
        metadata: Some(ObjectMeta {
            name: name(t.name(), &unit.name, member),
            labels,
            owner_references: vec![OwnerReference {
                kind: "Test".into(),
                name: t.name().into(),
                uid: t.meta().uid.clone(),
                controller: true,
            }],
            ..Default::default()
        }),
        spec: Some(ProcessSpec {
            host_name: host.name().into(),
            test: t.name().into(),
            test_uid: t.meta().uid.clone(),
            role: member.into(),
            step: unit.name.clone(),
            argv: unit.argv.clone(),
            script: unit.script.clone(),
            shell: unit.shell,
            env,
            stdin: unit.stdin.clone(),
            workdir: unit.workdir.clone(),
            timeout: unit.timeout.clone(),
            exit_codes: if unit.exit_codes.is_empty() { vec![0] } else { unit.exit_codes.clone() },
            stop: false,
            gated: unit.sync,
            released: false,
            files,
            stdin_file: unit.stdin_file.clone(),
            test_host_vars: reads_host_vars(t),
            stop_reason: String::new(),
            stop_grace: String::new(),
            stdin_stream: unit.stdin_stream,
            stdin_closed: false,
        }),
        ..Default::default()
    }
}

/// Deterministic, DNS-label-safe process name: creating it twice is a no-op.
pub fn name(test: &str, step: &str, member: &str) -> String {
    let full = format!("{test}-{step}-{member}");
    // Steps of child tests ("suite.a") are not labels: hash them too, so
    // "suite.a" and a step "suite-a" stay apart.
    if full.len() <= 63 && !full.contains('.') {
        return full;
    }
    // FNV-1a keeps names distinct after truncation.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in full.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    let clean = full.replace('.', "-");
    let head = clean[..clean.len().min(52)].trim_end_matches('-');
    format!("{head}-{:010x}", h & 0xff_ffff_ffff)
}

/// A process's environment, low to high precedence: the claim's `host_*`
/// variables (`status.hostVars`), the test's env (the spec's, and what
/// `setenv` added), the env of the child tests the step is in, the
/// host's env (spec, then what its agent publishes), the step's (or exec's)
/// env, then `TESTBUS_TEST`, `TESTBUS_ROLE`, `TESTBUS_HOST`, `TESTBUS_STEP`.
///
/// In a test with more than [`INLINE_HOST_VARS`] `host_*` variables, those
/// the claim set are left out: the agent puts `status.hostVars` beneath
/// this env (see [`reads_host_vars`] and [`LayeredEnv`]), so a process does
/// not carry every member's variables. One that a later layer (or
/// `setenv`) changed stays in.
pub fn env(
    t: &Test,
    host: &Host,
    member: &str,
    step: &str,
    child_env: &BTreeMap<String, String>,
    step_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let st = t.status();
    let leave_out = reads_host_vars(t);
    let mut env: BTreeMap<String, String> = if leave_out { BTreeMap::new() } else { st.host_vars.clone() };
    env.extend(st.env.clone());
    env.extend(child_env.clone());
    env.extend(host.spec().env.clone());
    env.extend(host.status().env.clone());
    env.extend(step_env.clone());
    env.insert("TESTBUS_TEST".into(), t.name().into());
    env.insert("TESTBUS_ROLE".into(), member.into());
    env.insert("TESTBUS_HOST".into(), host.name().into());
    env.insert("TESTBUS_STEP".into(), step.into());
    env
}

impl crate::TestStatus {
    /// A variable of the test's environment as its processes see it: the
    /// test's env (spec and setenv), else the claim's host variables.
    pub fn var(&self, name: &str) -> Option<&String> {
        self.env.get(name).or_else(|| self.host_vars.get(name))
    }
}

/// Up to this many `host_*` variables, processes carry them: reading them
/// from the test would cost their agent a request on the way to starting
/// the process, for little saved.
pub const INLINE_HOST_VARS: usize = 64;

/// Whether the processes of `t` leave the claim's `host_*` variables to
/// their agent (`spec.testHostVars`).
pub fn reads_host_vars(t: &Test) -> bool {
    t.status().host_vars.len() > INLINE_HOST_VARS
}

/// What a process runs with, as layers from lowest to highest precedence
/// (for the agent: its own few variables, the test's claim-time `host_*`
/// variables, the process's env, then what the agent adds). A name is
/// looked up from the top; the child gets every layer in order, so a later
/// setting of a name wins. The layers are never merged into one map: a
/// process of a 50-host test has 250 or more variables, and copying them
/// for every process was a tenth of the agent's work.
#[derive(Debug)]
pub struct LayeredEnv<'a> {
    layers: Vec<&'a BTreeMap<String, String>>,
}

impl<'a> LayeredEnv<'a> {
    /// `layers`, lowest precedence first.
    pub fn new(layers: impl IntoIterator<Item = &'a BTreeMap<String, String>>) -> Self {
        LayeredEnv { layers: layers.into_iter().collect() }
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.layers.iter().rev().find_map(|l| l.get(name)).map(String::as_str)
    }

    /// Every setting, lowest layer first; a name may come more than once,
    /// and its last setting is the one that holds.
    pub fn settings(&self) -> impl Iterator<Item = (&'a String, &'a String)> + '_ {
        self.layers.iter().flat_map(|l| l.iter())
    }
}

impl crate::subst::Lookup for LayeredEnv<'_> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_labels() {
        assert_eq!(name("t", "s", "client0"), "t-s-client0");
        let long = name(&"a".repeat(40), &"b".repeat(30), "client12");
        assert!(long.len() <= 63);
        assert!(crate::validate::dns_label(&long).is_ok());
        assert_eq!(long, name(&"a".repeat(40), &"b".repeat(30), "client12"));
        assert_ne!(long, name(&"a".repeat(40), &"b".repeat(30), "client13"));
        let child = name("t", "suite.a", "r");
        assert!(crate::validate::dns_label(&child).is_ok(), "{child}");
        assert_ne!(child, name("t", "suite-a", "r"));
    }

    #[test]
    fn host_vars_come_from_the_test_beneath_the_process_env() {
        use crate::{Test, TestStatus};
        let m =
            |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        let mut host_vars = m(&[("host_s_ip", "10.0.0.1"), ("host_c_ip", "x y"), ("host_s_name", "srv")]);
        // status.env holds the spec's env and setenv's; setenv changed
        // host_s_name after the claim.
        let test_env = m(&[("A", "1"), ("host_s_name", "changed")]);
        let mut t = Test {
            metadata: Some(crate::ObjectMeta { name: "t".into(), ..Default::default() }),
            status: Some(TestStatus { env: test_env.clone(), host_vars: host_vars.clone(), ..Default::default() }),
            ..Default::default()
        };
        let host =
            Host { metadata: Some(crate::ObjectMeta { name: "h".into(), ..Default::default() }), ..Default::default() };
        // A few variables: carried by the process.
        assert!(!reads_host_vars(&t));
        let few = env(&t, &host, "s", "step", &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(few["host_s_ip"], "10.0.0.1");
        assert_eq!(few["host_s_name"], "changed", "setenv wins over the claim's value");
        // Many: left to the agent.
        for i in 0..INLINE_HOST_VARS {
            host_vars.insert(format!("host_m{i}_ip"), format!("10.1.0.{i}"));
        }
        t.status = Some(TestStatus { env: test_env, host_vars: host_vars.clone(), ..Default::default() });
        assert!(reads_host_vars(&t));
        let own = env(&t, &host, "s", "step", &BTreeMap::new(), &m(&[("host_c_ip", "override")]));
        assert!(!own.contains_key("host_s_ip"), "the claim's variables are not carried: {own:?}");
        let fin = LayeredEnv::new([&host_vars, &own]);
        assert_eq!(fin.get("A"), Some("1"));
        assert_eq!(fin.get("host_s_ip"), Some("10.0.0.1"));
        assert_eq!(fin.get("host_c_ip"), Some("override"), "a step's env wins");
        assert_eq!(fin.get("host_s_name"), Some("changed"), "setenv wins");
        assert_eq!(fin.get("TESTBUS_HOST"), Some("h"));
        assert_eq!(fin.get("NOPE"), None);
        // What the child gets: the last setting of each name holds.
        let last: BTreeMap<&String, &String> = fin.settings().collect();
        assert_eq!(last[&"host_c_ip".to_string()], "override");
        assert_eq!(last[&"host_s_name".to_string()], "changed");
        assert_eq!(last.len(), fin.settings().map(|(k, _)| k).collect::<std::collections::BTreeSet<_>>().len());
    }
}
