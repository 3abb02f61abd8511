//! End-to-end: the real control plane, agents (in network namespaces as
//! root) and testbusctl.
use std::collections::BTreeSet;
use std::time::Duration;
use testbus_proto::states::{HostPhase, ProcessPhase, StepPhase, TestPhase};
use testbus_proto::{phase, Host, Process, Resource, Test};
use testbus_tests::{is_root, manifest, process_alive, repo_root, wait_for, Cluster};

fn first_test_name(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("test/").and_then(|r| r.split_whitespace().next()))
        .unwrap_or_else(|| panic!("no test name in {out:?}"))
        .to_string()
}

async fn wait_released(c: &Cluster) {
    let client = c.client().await;
    wait_for(Duration::from_secs(15), "hosts to be released", || async {
        let (hosts, _) = client.api::<Host>().list("", "").await.ok()?;
        hosts.iter().all(|h| h.status().claim.as_ref().is_none()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_runs_across_three_hosts() {
    let c = Cluster::start(3).await;
    let hello = repo_root().join("manifests/examples/hello.yaml");
    let out = c.ctl(&["apply", "-f", hello.to_str().unwrap(), "--wait", "--timeout", "60s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let name = first_test_name(&out.stdout);
    // Progress names each role's host and each step.
    assert!(out.stderr.contains("Running on client0=host-"), "{}", out.stderr);
    assert!(out.stderr.contains("step greet Succeeded"), "{}", out.stderr);

    let t = c.test(&name).await;
    assert_eq!(t.status().phase, TestPhase::Succeeded);
    let claimed: BTreeSet<&String> = t.status().claims.values().collect();
    assert_eq!(claimed.len(), 3, "three distinct hosts");
    let server_addr = &t.status().host_vars["host_server_ipv4addr"];
    // The claim's variables are in status.hostVars alone: `get -o yaml`
    // shows each once, and `getenv` still finds them.
    let yaml = c.ctl(&["get", &format!("test/{name}"), "-o", "yaml"]);
    assert_eq!(yaml.stdout.matches("host_server_ipv4addr:").count(), 1, "{}", yaml.stdout);
    assert_eq!(c.ctl(&["getenv", &name, "host_server_ipv4addr"]).stdout.trim(), server_addr.as_str());
    if is_root() {
        // Each host has its own address in its namespace.
        assert!(server_addr.starts_with("10.77.0."), "{server_addr}");
        let addrs: BTreeSet<&String> = ["server", "client0", "client1"]
            .iter()
            .map(|m| &t.status().host_vars[&format!("host_{m}_ipv4addr")])
            .collect();
        assert_eq!(addrs.len(), 3, "distinct addresses: {addrs:?}");
        assert_eq!(t.status().host_vars["host_client_ipv4addr"].split(' ').count(), 2, "a role of count 2 gets a list");
    }
    // A small test's processes carry the claim's host variables.
    assert_eq!(t.status().host_vars["host_server_ipv4addr"], *server_addr);
    let client = c.client().await;
    let (ps, _) = client.api::<Process>().list("", &format!("spec.test={name}")).await.unwrap();
    let carried = |p: &Process| !p.spec().test_host_vars && p.spec().env.contains_key("host_server_ipv4addr");
    assert!(!ps.is_empty() && ps.iter().all(carried), "{ps:?}");
    let logs = c.ctl(&["logs", &format!("test/{name}")]);
    assert_eq!(logs.code, 0, "{logs:?}");
    let server_host = &t.status().claims["server"];
    for m in ["client0", "client1"] {
        let host = &t.status().claims[m];
        assert!(
            logs.stdout.contains(&format!("[greet {m}/{host}] hello {m}, this is {server_host}")),
            "{}",
            logs.stdout
        );
    }
    let only = c.ctl(&["logs", &format!("test/{name}"), "--role", "server"]);
    assert!(only.stdout.contains("listening on port ") && !only.stdout.contains("[greet"), "{}", only.stdout);
    wait_released(&c).await;
}

/// A test with many host variables: its processes leave them to their
/// agents, which read them from the test; a process sees them all the same,
/// below its own env.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_host_variables_are_read_by_the_agent() {
    let vars: Vec<String> = (0..30).map(|i| format!("--var=extra{i}=v{i}")).collect();
    let args: Vec<&str> = vars.iter().map(String::as_str).collect();
    let c = Cluster::start_with(3, &args).await;
    let path = manifest(
        &c,
        "vars.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: vars}
spec:
  hosts: [{role: n, count: 3}]
  steps:
    - name: s
      on: [n]
      env: {host_n2_extra1: mine}
      argv: [sh, -c, 'echo "$TESTBUS_ROLE: $host_n0_extra29 $host_n1_extra3 $host_n2_extra1 [$host_n_extra0]"']
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "60s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let t = c.test("vars").await;
    assert!(t.status().host_vars.len() > testbus_proto::process::INLINE_HOST_VARS);
    let client = c.client().await;
    let (ps, _) = client.api::<Process>().list("", "spec.test=vars").await.unwrap();
    assert_eq!(ps.len(), 3);
    assert!(ps.iter().all(|p| p.spec().test_host_vars && !p.spec().env.contains_key("host_n0_extra29")));
    let logs = c.ctl(&["logs", "test/vars"]);
    for m in ["n0", "n1", "n2"] {
        let line = format!("{m}: v29 v3 mine [v0 v0 v0]");
        assert!(logs.stdout.contains(&line), "{line} in {}", logs.stdout);
    }
}

/// A process's work dir lives as long as its Process: deleting the test
/// removes it, and a restarted agent removes those of Processes deleted
/// while it was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_dirs_go_with_their_processes() {
    let mut c = Cluster::start(1).await;
    let work = c.dir.path().join(&c.hosts[0]).join("work");
    let out = c.ctl(&["run", "--host", &c.hosts[0], "--", "sh", "-c", "echo kept > here"]);
    assert_eq!(out.code, 0, "{out:?}");
    let client = c.client().await;
    let (ps, _) = client.api::<Process>().list("", "").await.unwrap();
    assert_eq!(ps.len(), 1);
    let dir = work.join(ps[0].meta().uid.as_str());
    assert_eq!(std::fs::read_to_string(dir.join("here")).unwrap(), "kept\n", "kept while the Process exists");
    assert_eq!(c.ctl(&["delete", "test", &ps[0].spec().test]).code, 0);
    wait_for(Duration::from_secs(15), "the work dir to go", || async { (!dir.exists()).then_some(()) }).await;
    // Left behind by a Process deleted while the agent was down.
    c.kill_agent(0);
    let stale = work.join("0123456789abcdef");
    std::fs::create_dir_all(&stale).unwrap();
    c.start_agent(0);
    wait_for(Duration::from_secs(15), "the stale work dir to go", || async { (!stale.exists()).then_some(()) }).await;
}

const FAILING: &str = r#"
apiVersion: testbus/v1
kind: Test
metadata: {name: failing}
spec:
  hosts: [{role: a}, {role: b}]
  steps:
    - {name: ok, on: [a], argv: ["true"]}
    - {name: bad, on: [b], after: [ok], argv: [sh, -c, "echo boom >&2; exit 3"]}
    - {name: never, on: [a], after: [bad], argv: ["true"]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_the_test_and_apply_exits_1() {
    let c = Cluster::start(2).await;
    let path = manifest(&c, "failing.yaml", FAILING);
    let out = c.ctl(&["apply", "-f", &path, "--wait"]);
    assert_eq!(out.code, 1, "{out:?}");
    let t = c.test("failing").await;
    assert_eq!(t.status().phase, TestPhase::Failed);
    assert_eq!(t.status().reason, "StepFailed");
    let phases: Vec<&str> = t.status().steps.iter().map(|s| s.phase.as_str()).collect();
    assert_eq!(phases, [StepPhase::Succeeded, StepPhase::Failed, StepPhase::Skipped].map(StepPhase::as_str));
    assert_eq!(t.status().steps[1].processes[0].exit_code, Some(3));
    assert!(t.status().message.contains("exit code 3"), "{}", t.status().message);
    // `wait` agrees, and so does a second look with `logs`.
    assert_eq!(c.ctl(&["wait", "test/failing"]).code, 1);
    assert!(c.ctl(&["logs", "test/failing"]).stderr.contains("boom"));
    wait_released(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_variable_fails_its_process_naming_the_variable() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "unknown.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: unknown-var}
spec:
  env: {KNOWN: x}
  hosts: [{role: a}]
  steps:
    - {name: s, on: [a], argv: [echo, "${KNOWN}-${NO_SUCH_VAR}"]}
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait"]);
    assert_eq!(out.code, 1, "{out:?}");
    let client = c.client().await;
    let p = client.api::<Process>().get("unknown-var-s-a").await.unwrap();
    assert_eq!(p.status().phase, ProcessPhase::Failed);
    assert_eq!(p.status().reason, "UnknownVariable");
    assert!(p.status().message.contains("NO_SUCH_VAR"), "{}", p.status().message);
    assert_eq!(p.status().pid, 0, "never started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_with_the_remote_exit_code() {
    let c = Cluster::start(2).await;
    let out = c.ctl(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 42"]);
    assert_eq!(out.code, 42, "{out:?}");
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr.lines().next(), Some("err"));
    let out = c.ctl(&["run", "--host", "host-1", "--env", "X=y", "--", "sh", "-c", "echo $X on $TESTBUS_HOST"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "y on host-1\n"), "{out:?}");
    let out = c.ctl(&["run", "--count", "2", "--", "true"]);
    assert_eq!(out.code, 0, "{out:?}");
    // Two hosts, one fails: its code, once both have ended.
    let out = c.ctl(&["run", "--count", "2", "--", "sh", "-c", "[ $TESTBUS_ROLE = host0 ] || exit 7"]);
    assert_eq!(out.code, 7, "{out:?}");
    // A process with no verdict of its own (killed at the test's timeout)
    // leaves the verdict to the test.
    let out = c.ctl(&["run", "--timeout", "1s", "--", "sleep", "30"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("timeout"), "{out:?}");
    // Bad usage is exit 2, before anything runs.
    assert_eq!(c.ctl(&["run", "--env", "novalue", "--", "true"]).code, 2);
    assert_eq!(c.ctl(&["run", "--count", "0", "--", "true"]).code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_exit_2_name_the_field_and_store_nothing() {
    let c = Cluster::start(1).await;
    let head = r#"apiVersion: testbus/v1
kind: Test
metadata: {name: bad}
"#;
    let cases: Vec<(String, &str)> = vec![
        (format!("{head}spec:\n  hosts: [{{role: a}}, {{role: b, count: 0}}]\n"), "spec.hosts[1].count: must be >= 1"),
        (format!("{head}spec:\n  hosts: [{{role: a}}, {{role: a}}]\n"), "spec.hosts[1].role: duplicate role"),
        (r#"apiVersion: testbus/v1
kind: Test
metadata: {name: Bad_Name}
spec: {hosts: [{role: a}]}
"#.into(), "metadata.name"),
        (format!("{head}spec:\n  hosts: [{{role: a}}]\n  colour: blue\n"), "spec.colour: unknown field"),
        (r#"apiVersion: testbus/v1
kind: Widget
metadata: {name: w}
"#.into(), "kind: unknown kind \"Widget\""),
        (format!("{head}spec:\n  hosts: [{{role: a}}]\n  steps: [{{name: s, on: [zz], argv: [\"true\"]}}]\n"), "spec.steps[0].on[0]: unknown role \"zz\""),
        (format!("{head}spec:\n  hosts: [{{role: a}}]\n  steps:\n    - {{name: x, on: [a], after: [y], argv: [\"true\"]}}\n    - {{name: y, on: [a], after: [x], argv: [\"true\"]}}\n"), "cycle"),
        (format!("{head}spec:\n  hosts: [{{role: a, count: many}}]\n"), "spec.hosts[0].count"),
        (format!("{head}spec:\n  env: {{A: x, A: y}}\n  hosts: [{{role: a}}]\n"), "duplicate key"),
        (format!("{head}spec:\n  hosts: [{{role: a}}]\n  timeout: soon\n"), "spec.timeout"),
        (r#"apiVersion: testbus/v1
kind: Test
metadata: {name: x
"#.into(), ""),
        // A valid document followed by an invalid one: neither is stored.
        (format!("{head}spec: {{hosts: [{{role: a}}]}}\n---\n{head}spec: {{hosts: []}}\n"), "document 2"),
    ];
    for (text, expect) in &cases {
        let out = c.ctl_stdin(&["apply", "-f", "-"], Some(text));
        assert_eq!(out.code, 2, "manifest:\n{text}\noutput: {out:?}");
        assert!(out.stderr.contains(expect), "expected {expect:?} in {:?}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    let tests = c.ctl(&["get", "tests", "-o", "name"]);
    assert_eq!((tests.code, tests.stdout.as_str()), (0, ""), "nothing stored: {tests:?}");
    // The server enforces the same rules for clients that skip the CLI.
    let client = c.client().await;
    let mut t = Test::default();
    t.meta_mut().name = "direct".into();
    t.spec_mut().hosts.push(testbus_proto::HostRequirement { role: "a".into(), count: Some(0), ..Default::default() });
    let err = client.api::<Test>().create(t).await.unwrap_err();
    assert_eq!(err.code(), tonic_code_invalid());
    assert!(err.message().contains("spec.hosts[0].count"), "{}", err.message());
    assert_eq!(c.ctl(&["get", "widgets"]).code, 2);
}

fn tonic_code_invalid() -> tonic::Code {
    tonic::Code::InvalidArgument
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_keeps_every_object() {
    let mut c = Cluster::start(3).await;
    let hello = repo_root().join("manifests/examples/hello.yaml");
    assert_eq!(c.ctl(&["apply", "-f", hello.to_str().unwrap(), "--wait"]).code, 0);
    wait_released(&c).await;
    let snapshot = |c: &Cluster| {
        let tests = c.ctl(&["get", "tests", "-o", "json"]).stdout;
        let procs = c.ctl(&["get", "processes", "-o", "json"]).stdout;
        let hosts: serde_json::Value = serde_json::from_str(&c.ctl(&["get", "hosts", "-o", "json"]).stdout).unwrap();
        // Host status moves with every lease renewal; what users wrote does not.
        let hosts: Vec<serde_json::Value> = hosts["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                let mut m = h["metadata"].clone();
                m.as_object_mut().unwrap().remove("resourceVersion");
                serde_json::json!({"metadata": m, "spec": h["spec"]})
            })
            .collect();
        (tests, procs, hosts)
    };
    let before = snapshot(&c);
    assert!(before.0.contains("hello-") && before.1.contains("-greet-client1"));
    c.kill_control_plane();
    c.start_control_plane().await;
    let after = snapshot(&c);
    assert_eq!(before.0, after.0, "tests changed across the restart");
    assert_eq!(before.1, after.1, "processes changed across the restart");
    assert_eq!(before.2, after.2, "hosts changed across the restart");
    // Agents reconnect by themselves and work goes on.
    c.wait_hosts_ready(3).await;
    let out = c.ctl(&["apply", "-f", hello.to_str().unwrap(), "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_tests_never_deadlock_and_all_finish() {
    let c = Cluster::start(3).await;
    // Each test wants two of the three hosts: at most one runs at a time,
    // and a half-claimed test would deadlock the others.
    let mut children = Vec::new();
    for i in 0..4 {
        let path = manifest(
            &c,
            &format!("compete-{i}.yaml"),
            &format!(
                r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: compete-{i}}}
spec:
  timeout: 60s
  hosts: [{{role: a}}, {{role: b}}]
  steps:
    - {{name: s, on: [a, b], argv: [sleep, "0.2"]}}
"#
            ),
        );
        children.push(c.ctl_spawn(&["apply", "-f", &path, "--wait", "--timeout", "60s"]));
    }
    for ch in children {
        let out = ch.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for i in 0..4 {
        assert_eq!(c.test(&format!("compete-{i}")).await.status().phase, TestPhase::Succeeded);
    }
    wait_released(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_test_says_why_it_waits() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "gpu.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: wants-gpu}
spec:
  hosts: [{role: g, capabilities: [gpu], count: 2}]
  steps: [{name: s, on: [g], argv: ["true"]}]
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let client = c.client().await;
    let msg = wait_for(Duration::from_secs(10), "a Pending condition", || async {
        let t = client.api::<Test>().get("wants-gpu").await.ok()?;
        let cond = t.status().conditions.iter().find(|c| c.r#type == "Scheduled" && c.status == "False")?;
        Some(cond.message.clone())
    })
    .await;
    assert_eq!(msg, "cannot run on the hosts that exist: needs 2 × gpu (role g); no host offers capability gpu");
    let out = c.ctl(&["wait", "test/wants-gpu", "--timeout", "1s"]);
    assert_eq!(out.code, 3, "a wait that times out is exit 3: {out:?}");
    // Deleting a pending test removes it.
    assert_eq!(c.ctl(&["delete", "test", "wants-gpu"]).code, 0);
    wait_for(Duration::from_secs(10), "the test to be gone", || async {
        client.api::<Test>().get_opt("wants-gpu").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_test_kills_its_processes_and_releases_hosts() {
    let c = Cluster::start(2).await;
    let marker = c.dir.path().join("still-running");
    let path = manifest(
        &c,
        "long.yaml",
        &format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: long}}
spec:
  hosts: [{{role: a}}, {{role: b}}]
  steps:
    - name: s
      on: [a, b]
      script: |
        #!/bin/sh
        echo started
        sleep 30
        touch {}
"#,
            marker.display()
        ),
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let client = c.client().await;
    let pids = c.running_pids("long", 2).await;
    let out = c.ctl(&["delete", "test", "long"]);
    assert_eq!(out.code, 0, "{out:?}");
    wait_for(Duration::from_secs(15), "the test and its processes to be gone", || async {
        let gone = client.api::<Test>().get_opt("long").await.ok()?.is_none();
        let (ps, _) = client.api::<Process>().list("", "spec.test=long").await.ok()?;
        (gone && ps.is_empty()).then_some(())
    })
    .await;
    wait_released(&c).await;
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} still alive after delete");
    }
    assert!(!marker.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_past_its_timeout_is_stopped_and_apply_exits_3() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "slow.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: slow}
spec:
  timeout: 1s
  hosts: [{role: a}]
  steps: [{name: s, on: [a], argv: [sleep, "30"]}]
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait"]);
    assert_eq!(out.code, 3, "{out:?}");
    let t = c.test("slow").await;
    assert_eq!((t.status().phase.as_str(), t.status().reason.as_str()), (TestPhase::Error.as_str(), "TimedOut"));
    let p = &t.status().steps[0].processes[0];
    assert_eq!(p.phase, ProcessPhase::Killed, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_host_fails_its_test_naming_the_host() {
    let mut c = Cluster::start(2).await;
    let path = manifest(
        &c,
        "lost.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: lost}
spec:
  hosts: [{role: a, host: host-0}, {role: b, host: host-1}]
  steps: [{name: s, on: [a, b], argv: [sh, -c, "echo before-the-loss; sleep 30"]}]
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let client = c.client().await;
    c.running_pids("lost", 2).await;
    wait_for(Duration::from_secs(30), "b's output to arrive", || async {
        c.ctl(&["logs", "process/lost-s-b"]).stdout.contains("before-the-loss").then_some(())
    })
    .await;
    c.kill_agent(1);
    let out = c.ctl(&["wait", "test/lost", "--timeout", "30s"]);
    assert_eq!(out.code, 3, "{out:?}");
    let t = c.test("lost").await;
    assert_eq!(t.status().reason, "HostLost");
    assert!(t.status().message.contains("host-1"), "{}", t.status().message);
    let h = client.api::<Host>().get("host-1").await.unwrap();
    assert_eq!(h.status().phase, HostPhase::NotReady);
    // Its status was written without its agent: describe says what arrived
    // (it said 0 bytes while `logs` showed the line).
    let described = c.ctl(&["describe", "process", "lost-s-b"]).stdout;
    assert!(
        described.contains("Output:       16 bytes stdout, 0 bytes stderr (what arrived before it was lost)"),
        "{described}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_formats_selectors_describe_and_follow() {
    let c = Cluster::start(2).await;
    let path = manifest(
        &c,
        "labelled.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: labelled, labels: {suite: demo}}
spec:
  hosts: [{role: a}]
  steps:
    - name: s
      on: [a]
      script: |
        for i in 1 2 3; do echo line $i; sleep 0.1; done
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    // logs -f follows to the end of the test.
    let follow = c.ctl(&["logs", "-f", "test/labelled"]);
    assert_eq!(follow.code, 0, "{follow:?}");
    let lines: Vec<&str> = follow.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].starts_with("[a/host-") && lines[2].ends_with("line 3"), "{lines:?}");

    let json: serde_json::Value =
        serde_json::from_str(&c.ctl(&["get", "test", "labelled", "-o", "json"]).stdout).unwrap();
    assert_eq!(json["kind"], "Test");
    assert_eq!(json["spec"]["hosts"][0]["role"], "a");
    let yaml = c.ctl(&["get", "tests", "-o", "yaml"]).stdout;
    assert!(yaml.contains("kind: List") && yaml.contains("name: labelled"), "{yaml}");
    assert_eq!(c.ctl(&["get", "tests", "-l", "suite=demo", "-o", "name"]).stdout, "test/labelled\n");
    assert_eq!(c.ctl(&["get", "tests", "-l", "suite=other", "-o", "name"]).stdout, "");
    assert_eq!(c.ctl(&["get", "hosts", "-l", "index=1", "-o", "name"]).stdout, "host/host-1\n");
    let table = c.ctl(&["get", "hosts", "-o", "wide"]).stdout;
    assert!(table.starts_with("NAME") && table.contains("TRANSPORT") && table.contains("direct"), "{table}");
    let d = c.ctl(&["describe", "test", "labelled"]);
    assert!(d.stdout.contains("Phase:        Succeeded"), "{}", d.stdout);
    // Cordon keeps new tests off a host.
    assert_eq!(c.ctl(&["cordon", "host-0"]).code, 0);
    let out = c.ctl(&["run", "--count", "1", "--", "sh", "-c", "echo $TESTBUS_HOST"]);
    assert_eq!(out.stdout, "host-1\n", "{out:?}");
    assert_eq!(c.ctl(&["uncordon", "host-0"]).code, 0);
    assert_eq!(c.ctl(&["describe", "host", "nope"]).code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_the_control_plane_through_a_relay() {
    let mut c = Cluster::start(1).await;
    // In host-0's namespace: a relay from a unix socket to the control
    // plane's TLS listener, and a second agent that knows only that socket
    // and joins through it: TLS is end to end, the relay holds no key.
    let sock = c.dir.path().join("relay.sock");
    let upstream = format!("tcp:{}", c.agent_server.trim_start_matches("https://"));
    let down = format!("unix:{}", sock.display());
    c.spawn_in("host-0", "testbus-relay", &["--downstream", &down, "--upstream", &upstream]);
    wait_for(Duration::from_secs(10), "the relay socket", || async { sock.exists().then_some(()) }).await;
    let data = c.dir.path().join("relayed");
    let server = format!("unix+tls:{}", sock.display());
    let etc = data.join("etc");
    let token = c.join_token.clone();
    c.spawn_in(
        "host-0",
        "testbus-agent",
        &[
            "--server",
            &server,
            "--join-token",
            &token,
            "--name",
            "relayed",
            "--data-dir",
            data.to_str().unwrap(),
            "--config-dir",
            etc.to_str().unwrap(),
            "--lease-duration",
            "2s",
        ],
    );
    c.wait_hosts_ready(2).await;
    let out = c.ctl(&["run", "--host", "relayed", "--", "sh", "-c", "echo via relay from $TESTBUS_HOST"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "via relay from relayed\n"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let c = Cluster::start(1).await;
    let ch = c.client().await.channel();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "testbus.v1.Tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["testbus.v1.Hosts", "testbus.v1.Tests", "testbus.v1.Processes", "testbus.v1.Output"] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    if !testbus_tests::needs_root("Google's reflection client (installed by hack/setup as root)") {
        return;
    }
    // Google's Python client (grpcio-reflection, v1alpha) lists the
    // services and describes one, through the control plane's socket.
    let script = r#"
import sys, grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel('unix:' + sys.argv[1]))
print(' '.join(sorted(db.get_services())))
print(' '.join(m.name for m in DescriptorPool(db).FindServiceByName('testbus.v1.Tests').methods))
"#;
    let out = std::process::Command::new("/usr/bin/python3")
        .env("PYTHONPATH", "/var/lib/testbus/python")
        .args(["-c", script])
        .arg(c.server.trim_start_matches("unix:"))
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let services = lines.next().unwrap_or_default();
    for s in ["testbus.v1.Auth", "testbus.v1.Hosts", "testbus.v1.Tests", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(services.split(' ').any(|n| n == s), "{s} missing: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    }
    let methods = lines.next().unwrap_or_default();
    assert!(methods.contains("Claim") && methods.contains("RecordResult"), "{methods}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_while_the_process_runs() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "stream.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: stream}
spec:
  hosts: [{role: a}]
  steps: [{name: s, on: [a], shell: true, argv: ["echo first; sleep 30"]}]
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let client = c.client().await;
    wait_for(Duration::from_secs(15), "the process to exist", || async {
        client.api::<Process>().get_opt("stream-s-a").await.ok()?.map(|_| ())
    })
    .await;
    let mut out = client
        .output()
        .read(testbus_proto::ReadOutputRequest { process: "stream-s-a".into(), follow: true, stdin: false })
        .await
        .unwrap()
        .into_inner();
    let chunk = tokio::time::timeout(Duration::from_secs(15), out.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(&chunk.data[..], b"first\n");
    let p = client.api::<Process>().get("stream-s-a").await.unwrap();
    // (Its Running report may still be on its way: it waits 2 ms.)
    assert!(!phase::process_terminal(&p.status().phase), "output arrived while the process runs: {:?}", p.status());
    assert_eq!(c.ctl(&["delete", "test", "stream"]).code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timeout_kills_the_whole_process_group() {
    let c = Cluster::start(1).await;
    let pidfile = c.dir.path().join("grandchild.pid");
    let path = manifest(
        &c,
        "group.yaml",
        &format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: group}}
spec:
  hosts: [{{role: a}}]
  steps:
    - name: s
      on: [a]
      timeout: 1s
      script: |
        sleep 300 &
        echo $! > {}
        wait
"#,
            pidfile.display()
        ),
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait"]);
    assert_eq!(out.code, 1, "a step that times out fails the test: {out:?}");
    let t = c.test("group").await;
    let p = &t.status().steps[0].processes[0];
    assert_eq!(p.phase, ProcessPhase::Failed);
    assert!(p.message.contains("timed out after 1s"), "{p:?}");
    let pid: i64 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(!process_alive(pid), "the background child {pid} of the timed-out step survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_takes_a_directory_and_get_watches() {
    let c = Cluster::start(1).await;
    let dir = c.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..2 {
        std::fs::write(
            dir.join(format!("t{i}.yaml")),
            format!(
                r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: dir-{i}}}
spec:
  hosts: [{{role: a}}]
  steps: [{{name: s, on: [a], argv: ["true"]}}]
"#
            ),
        )
        .unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let mut watch = c.ctl_spawn(&["get", "tests", "-w", "-o", "name"]);
    let out = c.ctl(&["apply", "-f", dir.to_str().unwrap(), "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "test/dir-0 created\ntest/dir-1 created\n");
    // Applying the same again changes nothing.
    assert_eq!(c.ctl(&["apply", "-f", dir.to_str().unwrap()]).stdout, "test/dir-0 unchanged\ntest/dir-1 unchanged\n");
    // The watch saw both tests appear.
    let stdout = watch.stdout.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut names = BTreeSet::new();
        for line in std::io::BufReader::new(stdout).lines() {
            names.insert(line.unwrap());
            if names.len() == 2 {
                break;
            }
        }
        names
    });
    let names = tokio::time::timeout(Duration::from_secs(15), seen).await.expect("watch output").unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["test/dir-0", "test/dir-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_send_recv_examples_run() {
    let c = Cluster::start(3).await;
    for ex in ["sync", "send-recv"] {
        let path = repo_root().join(format!("manifests/examples/{ex}.yaml"));
        let out = c.ctl(&["apply", "-f", path.to_str().unwrap(), "--wait", "--timeout", "90s"]);
        assert_eq!(out.code, 0, "{ex}: {out:?}");
        let name = first_test_name(&out.stdout);
        let logs = c.ctl(&["logs", &format!("test/{name}")]).stdout;
        match ex {
            "sync" => {
                for m in ["node0", "node1", "node2"] {
                    assert!(logs.contains(&format!("{m} after the barrier")), "{logs}");
                }
                let client = c.client().await;
                let (ps, _) = client
                    .api::<Process>()
                    .list(&format!("testbus.io/step=start-together,testbus.io/test={name}"), "")
                    .await
                    .unwrap();
                assert_eq!(ps.len(), 3);
                assert!(ps.iter().all(|p| p.spec().gated && p.spec().released), "{ps:?}");
            }
            _ => {
                assert!(logs.contains("] hi from client0") && logs.contains("] hi from client1"), "{logs}");
                assert_eq!(logs.matches("server said: welcome to host-").count(), 2, "{logs}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_fails_at_once_when_a_participant_dies() {
    let c = Cluster::start(3).await;
    let path = manifest(
        &c,
        "barrier.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: barrier}
spec:
  hosts: [{role: n, count: 3}]
  steps:
    - name: s
      on: [n]
      script: |
        if [ "$TESTBUS_ROLE" = n0 ]; then exit 3; fi
        testbusctl sync meet --timeout 10m
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "5m"]);
    assert_eq!(out.code, 1, "{out:?}");
    let t = c.test("barrier").await;
    let procs = &t.status().steps[0].processes;
    let waiting: Vec<_> = procs.iter().filter(|p| p.role != "n0").collect();
    assert!(waiting.iter().all(|p| p.exit_code == Some(1)), "the waiters fail (exit 1): {procs:?}");
    let logs = c.ctl(&["logs", "test/barrier", "--role", "n1"]);
    assert!(
        logs.stderr.contains("barrier \"meet\" failed: participant n0 on host-") && logs.stderr.contains("exit code 3"),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_values_are_immutable_and_bad_sync_use_is_refused() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "immutable.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: immutable}
spec:
  hosts: [{role: a}]
  steps:
    - name: s
      on: [a]
      script: |
        testbusctl send k one || exit 10
        testbusctl send k one || exit 11
        testbusctl send k two; echo "second send: $?"
        echo -n from-stdin | testbusctl send s -
        echo "recv: $(testbusctl recv k --from a) $(testbusctl recv s)"
        testbusctl recv k --from nobody; echo "unknown role: $?"
        testbusctl recv never; echo "nobody left: $?"
        testbusctl recv never --from a --timeout 1s; echo "timeout: $?"
        setsid testbusctl send detached yes; echo "left its group: $?"
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "60s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let logs = c.ctl(&["logs", "test/immutable"]);
    assert!(logs.stdout.contains("second send: 2"), "{logs:?}");
    assert!(logs.stderr.contains("immutable"), "{logs:?}");
    assert!(logs.stdout.contains("recv: one from-stdin"), "{logs:?}");
    assert!(
        logs.stdout.contains("unknown role: 2") && logs.stderr.contains("no role or member \"nobody\""),
        "{logs:?}"
    );
    assert!(logs.stdout.contains("nobody left: 1") && logs.stderr.contains("no other process"), "{logs:?}");
    assert!(logs.stdout.contains("timeout: 3"), "{logs:?}");
    // A child that left the process's group still speaks for it.
    assert!(logs.stdout.contains("left its group: 0"), "{logs:?}");
    // Outside a test process there is no agent socket.
    let out = c.ctl(&["send", "k", "v"]);
    assert_eq!(out.code, 2, "{out:?}");
    // And a program that is no process of the agent is refused on it.
    let sock = c.dir.path().join(&c.hosts[0]).join("sock/agent.sock");
    assert!(sock.exists(), "{}", sock.display());
    let out = std::process::Command::new(testbus_tests::bin_dir().join("testbusctl"))
        .args(["send", "k", "v"])
        .env("TESTBUS_AGENT_SOCKET", &sock)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("belongs to no process this agent runs"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_reach_their_hosts_and_are_fetched_once() {
    let c = Cluster::start(3).await;
    let ex = repo_root().join("manifests/examples/files.yaml");
    for round in 0..2 {
        let out = c.ctl(&["apply", "-f", ex.to_str().unwrap(), "--wait", "--timeout", "60s"]);
        assert_eq!(out.code, 0, "round {round}: {out:?}");
        let name = first_test_name(&out.stdout);
        let logs = c.ctl(&["logs", &format!("test/{name}")]).stdout;
        assert_eq!(logs.matches("/etc/motd: Welcome to testbus").count(), 3, "{logs}");
        assert_eq!(logs.matches("stdin: Welcome to testbus").count(), 3, "{logs}");
        assert_eq!(logs.matches("check.sh is executable").count(), 3, "{logs}");
        let t = c.test(&name).await;
        assert!(t.spec().files[0].digest.starts_with("sha256:") && t.spec().files[0].source.is_empty());
    }
    // Two tests, two files each, on every host: each blob fetched once.
    for h in &c.hosts {
        assert_eq!(c.read_log(h).matches("fetched blob").count(), 2, "{h}: {}", c.read_log(h));
    }

    // A host file reaches every process on that host; a step file at the
    // same path wins over it.
    let dir = c.dir.path().join("hostfiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "from the host\n").unwrap();
    std::fs::write(dir.join("b.txt"), "from the step\n").unwrap();
    std::fs::write(
        dir.join("host.yaml"),
        r#"apiVersion: testbus/v1
kind: Host
metadata: {name: host-0}
spec:
  files: [{source: a.txt, path: h.txt}, {source: a.txt, path: o.txt}]
"#,
    )
    .unwrap();
    let out = c.ctl(&["apply", "-f", dir.join("host.yaml").to_str().unwrap()]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host/host-0 configured\n"), "{out:?}");
    let client = c.client().await;
    let h = client.api::<Host>().get("host-0").await.unwrap();
    assert_eq!(h.meta().labels.get("index").map(String::as_str), Some("0"), "the agent's labels stay");
    std::fs::write(
        dir.join("t.yaml"),
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: layered}
spec:
  hosts: [{role: a, host: host-0}]
  steps:
    - name: s
      on: [a]
      files: [{source: b.txt, path: o.txt}]
      argv: [cat, h.txt, o.txt]
"#,
    )
    .unwrap();
    let out = c.ctl(&["apply", "-f", dir.join("t.yaml").to_str().unwrap(), "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(c.ctl(&["logs", "test/layered"]).stdout, "[a/host-0] from the host\n[a/host-0] from the step\n");

    // Bad references are refused before anything runs.
    let out = c.ctl_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {name: nofile}
spec:
  files: [{source: does-not-exist.txt, path: x}]
  hosts: [{role: a}]
"#,
        ),
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("does-not-exist.txt"), "{out:?}");
    let out = c.ctl_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {name: baddest}
spec:
  files: [{digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000", path: ../../etc/passwd}]
  hosts: [{role: a}]
"#,
        ),
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("spec.files[0].path") && out.stderr.contains(".."), "{out:?}");
    let out = c.ctl_stdin(
        &["apply", "-f", "-"],
        Some(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {name: noblob}
spec:
  files: [{digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000", path: x}]
  hosts: [{role: a}]
"#,
        ),
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("spec.files[0].digest: no blob"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripted_client_server_example_runs() {
    let c = Cluster::start(2).await;
    let script = repo_root().join("manifests/examples/scripted-client-server.sh");
    let path = format!("{}:{}", testbus_tests::bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new(&script)
        .arg("scripted")
        .env("TESTBUS_SERVER", &c.server)
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("test/scripted claimed client=host-"), "{stdout}");
    assert!(stdout.contains("server host-") && stdout.contains(" ready"), "{stdout}");
    let t = c.test("scripted").await;
    assert_eq!(t.status().phase, TestPhase::Succeeded);
    let results: Vec<(&str, &str)> = t.status().results.iter().map(|r| (r.path.as_str(), r.outcome.as_str())).collect();
    assert_eq!(
        results,
        [
            ("config.delivered", "pass"),
            ("users.verify-name", "pass"),
            ("config.round-trip", "pass"),
            ("optional.ipv6", "skip")
        ]
    );
    assert!(stdout.contains("passed: 3, failed: 0, errors: 0, skipped: 1"), "{stdout}");
    wait_released(&c).await;
    // A finished test takes no more scripting.
    let out = c.ctl(&["setenv", "scripted", "A=b"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("immutable"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripting_exit_codes_and_failed_results() {
    let c = Cluster::start(2).await;
    let out = c.ctl(&["create", "test", "imp", "--claim", "a=linux", "--claim", "b:1", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = c.ctl(&["exec", "imp", "--role", "b", "--", "sh", "-c", "echo $TESTBUS_ROLE; exit 5"]);
    assert_eq!((out.code, out.stdout.as_str()), (5, "b\n"), "{out:?}");
    let out = c.ctl(&["exec", "imp", "--", "sh", "-c", "echo $TESTBUS_ROLE"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("[a/host-") && out.stdout.contains("[b/host-"), "{out:?}");
    let out = c.ctl_stdin(&["exec", "imp", "--role", "a", "--stdin", "-", "--", "cat"], Some("via stdin"));
    assert_eq!((out.code, out.stdout.as_str()), (0, "via stdin"), "{out:?}");
    assert_eq!(c.ctl(&["exec", "imp", "--role", "zz", "--", "true"]).code, 2);
    assert_eq!(c.ctl(&["result", "imp", "bad path!", "pass"]).code, 2);
    assert_eq!(c.ctl(&["result", "imp", "checks.one", "fail", "--message", "broken"]).code, 0);
    // A result is a fact: the same again is a retry, a later pass does not
    // overwrite the failure (it did, and the test succeeded).
    assert_eq!(c.ctl(&["result", "imp", "checks.one", "fail", "--message", "broken"]).code, 0);
    let out = c.ctl(&["result", "imp", "checks.one", "pass"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("checks.one already has a result (fail at "), "{out:?}");
    assert_eq!(c.ctl(&["getenv", "imp", "host_a_hostname"]).code, 0);
    assert_eq!(c.ctl(&["getenv", "imp", "NOPE"]).code, 2);
    // A failed recorded result fails the test at finish.
    let out = c.ctl(&["finish", "imp"]);
    assert_eq!(out.code, 1, "{out:?}");
    let t = c.test("imp").await;
    assert_eq!((t.status().phase.as_str(), t.status().reason.as_str()), (TestPhase::Failed.as_str(), "ResultFailed"));
    // A recorded result is named by its dotted path, as it was recorded.
    let text = c.ctl(&["results", "test/imp"]).stdout;
    assert!(text.contains("FAIL  checks.one ") && text.contains("broken"), "{text}");
    let tap = c.ctl(&["results", "test/imp", "-o", "tap"]).stdout;
    assert!(tap.contains("not ok 1 - checks.one"), "{tap}");

    // Reports: text, TAP, and JUnit read back by an independent parser.
    let path = manifest(&c, "failing.yaml", FAILING);
    assert_eq!(c.ctl(&["apply", "-f", &path, "--wait"]).code, 1);
    let text = c.ctl(&["results", "test/failing"]).stdout;
    assert!(text.starts_with("test/failing: Failed (StepFailed"), "{text}");
    assert!(text.contains("FAIL  bad/b@host-") && text.contains("SKIP  never/never"), "{text}");
    let tap = c.ctl(&["results", "test/failing", "-o", "tap"]).stdout;
    assert!(tap.starts_with("TAP version 13\n1..3\nok 1 - ok/a@host-"), "{tap}");
    assert!(tap.contains("not ok 2 - bad/b@host-") && tap.contains("ok 3 - never/never # SKIP"), "{tap}");
    let junit = c.ctl(&["results", "test/failing", "-o", "junit"]).stdout;
    let xml = c.dir.path().join("failing.xml");
    std::fs::write(&xml, &junit).unwrap();
    let py = "import sys, junitparser\nx = junitparser.JUnitXml.fromfile(sys.argv[1])\nfor s in x:\n    for c in s:\n        r = c.result[0].__class__.__name__ if c.result else 'Pass'\n        print(c.classname, c.name, r)\n";
    let out = std::process::Command::new("python3").args(["-c", py]).arg(&xml).output().unwrap();
    let parsed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "junitparser: {}\n{junit}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = parsed.lines().collect();
    assert_eq!(lines.len(), 3, "{parsed}");
    assert!(lines[0].starts_with("failing.ok a@host-") && lines[0].ends_with(" Pass"), "{parsed}");
    assert!(lines[1].starts_with("failing.bad b@host-") && lines[1].ends_with(" Failure"), "{parsed}");
    assert_eq!(lines[2], "failing.never never Skipped", "{parsed}");
    let json: serde_json::Value =
        serde_json::from_str(&c.ctl(&["results", "test/failing", "-o", "json"]).stdout).unwrap();
    assert_eq!(json["cases"][1]["outcome"], "fail");
}

fn pinned(name: &str, extra: &str, host: &str, cmd: &str) -> String {
    format!(
        r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
{extra}  hosts: [{{role: a, host: {host}}}]
  steps: [{{name: s, on: [a], shell: true, argv: ["{cmd}"]}}]
"#
    )
}

async fn wait_message(c: &Cluster, test: &str, want: &str) {
    let client = c.client().await;
    wait_for(Duration::from_secs(20), &format!("{test} to say {want:?}"), || async {
        let t = client.api::<Test>().get(test).await.ok()?;
        t.status().message.contains(want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_goes_by_priority_then_age_and_never_starves_a_large_test() {
    let c = Cluster::start(2).await;
    let marker = c.dir.path().join("release-holder");
    let holder = pinned("holder", "", "host-0", &format!("while [ ! -e {} ]; do sleep 0.05; done", marker.display()));
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-"], Some(&holder)).code, 0);
    let client = c.client().await;
    wait_for(Duration::from_secs(15), "the holder to run", || async {
        let t = client.api::<Test>().get("holder").await.ok()?;
        (t.status().phase == TestPhase::Running).then_some(())
    })
    .await;
    let test = |name: &str, priority: i32, count: u32| {
        format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  priority: {priority}
  hosts: [{{role: r, count: {count}}}]
  steps: [{{name: s, on: [r], argv: ["true"]}}]
"#
        )
    };
    // big needs both hosts and waits for host-0; small comes later.
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-"], Some(&test("big", 0, 2))).code, 0);
    wait_message(&c, "big", "needs 2 × any host (role r), 1 free").await;
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-"], Some(&test("small", 0, 1))).code, 0);
    // host-1 is free, but big is ahead and needs it: small waits.
    wait_message(&c, "small", "queued behind test big").await;
    // A higher priority goes ahead of both.
    let out = c.ctl_stdin(&["apply", "-f", "-", "--wait", "--timeout", "30s"], Some(&test("urgent", 10, 1)));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(client.api::<Test>().get("small").await.unwrap().status().phase, TestPhase::Pending);
    std::fs::write(&marker, "").unwrap();
    let out = c.ctl(&["wait", "test/small", "--timeout", "30s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let big = c.test("big").await;
    let small = c.test("small").await;
    assert_eq!(big.status().phase, TestPhase::Succeeded);
    assert!(big.status().start_time < small.status().start_time, "big ran before small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_on_failure_keeps_hosts_and_ttl_deletes_finished_tests() {
    let c = Cluster::start(1).await;
    let held = pinned("held", "  holdOnFailure: true\n", "host-0", "exit 1");
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-", "--wait"], Some(&held)).code, 1);
    let t = c.test("held").await;
    let cond = t.status().conditions.iter().find(|c| c.r#type == "Held").expect("Held condition");
    assert!(cond.message.contains("host-0"), "{cond:?}");
    // The host stays claimed: the next test waits for it.
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-"], Some(&pinned("next", "", "host-0", "true"))).code, 0);
    wait_message(&c, "next", "host-0 claimed by test held").await;
    assert_eq!(c.ctl(&["delete", "test", "held"]).code, 0);
    assert_eq!(c.ctl(&["wait", "test/next", "--timeout", "30s"]).code, 0);

    let brief = pinned("brief", "  ttlAfterFinished: 1s\n", "host-0", "true");
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-", "--wait"], Some(&brief)).code, 0);
    let client = c.client().await;
    wait_for(Duration::from_secs(20), "brief to be deleted after its ttl", || async {
        client.api::<Test>().get_opt("brief").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(client.api::<Test>().get_opt("next").await.unwrap().is_some(), "tests without a ttl stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_tests_inherit_and_roll_up() {
    let c = Cluster::start(2).await;
    let ex = repo_root().join("manifests/examples/nested.yaml");
    let out = c.ctl(&["apply", "-f", ex.to_str().unwrap(), "--wait", "--timeout", "60s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let name = first_test_name(&out.stdout);
    let t = c.test(&name).await;
    let steps: Vec<(&str, &str)> = t.status().steps.iter().map(|s| (s.name.as_str(), s.phase.as_str())).collect();
    assert_eq!(
        steps,
        [
            ("setup", "Succeeded"),
            ("teardown", "Succeeded"),
            ("basic.read", "Succeeded"),
            ("advanced.deep.check", "Succeeded")
        ]
    );
    let logs = c.ctl(&["logs", &format!("test/{name}")]).stdout;
    assert!(logs.contains("setup on server at level parent"), "{logs}");
    assert!(logs.contains("storage/basic reads: Welcome to testbus"), "child env and parent files: {logs}");
    assert!(logs.contains("storage/advanced deep check"), "grandchild inherits its parent's env: {logs}");
    // The order: setup, then basic, then advanced, then teardown.
    let start = |step: &str| t.status().steps.iter().find(|s| s.name == step).unwrap().start_time.clone();
    assert!(start("basic.read") >= start("setup") && start("advanced.deep.check") >= start("basic.read"));
    assert!(start("teardown") >= start("advanced.deep.check"));
    let junit = c.ctl(&["results", &format!("test/{name}"), "-o", "junit"]).stdout;
    assert!(junit.contains(&format!("classname=\"{name}.advanced.deep.check\"")), "{junit}");

    // A failing child fails its parent; what comes after it is skipped.
    let failing = r#"apiVersion: testbus/v1
kind: Test
metadata: {name: child-fails}
spec:
  hosts: [{role: a}]
  steps: [{name: last, on: [a], after: [kid], argv: ["true"]}]
  tests:
    - name: kid
      steps: [{name: s, on: [a], argv: ["false"]}]
"#;
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-", "--wait"], Some(failing)).code, 1);
    let t = c.test("child-fails").await;
    assert!(t.status().message.starts_with("step kid.s failed"), "{}", t.status().message);
    let last = t.status().steps.iter().find(|s| s.name == "last").unwrap();
    assert_eq!(last.phase, StepPhase::Skipped);
    // Child names are checked like steps.
    let bad = r#"apiVersion: testbus/v1
kind: Test
metadata: {name: bad-kids}
spec:
  hosts: [{role: a}]
  tests:
    - {name: k, after: [nope], steps: [{name: s, on: [a], argv: ["true"]}]}
    - {name: k2}
"#;
    let out = c.ctl_stdin(&["apply", "-f", "-"], Some(bad));
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("spec.tests[0].after[0]: unknown step or child test \"nope\""), "{out:?}");
    assert!(out.stderr.contains("spec.tests[1]: a child test needs steps"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_manifest_succeeds() {
    let c = Cluster::start(3).await;
    let dir = repo_root().join("manifests/examples");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        // The HostPool examples need libvirt: tests/tests/pools.rs applies them.
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pool-")))
        .collect();
    names.sort();
    assert!(names.len() >= 6, "{names:?}");
    for p in names {
        let out = c.ctl(&["apply", "-f", p.to_str().unwrap(), "--wait", "--timeout", "90s"]);
        assert_eq!(out.code, 0, "{}: {out:?}", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_step_that_dies_early_fails_the_test() {
    let c = Cluster::start(1).await;
    let marker = c.dir.path().join("never");
    let test = |name: &str, allow: bool| {
        format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  hosts: [{{role: a}}]
  steps:
    - {{name: bg, on: [a], background: true, allowFailure: {allow}, argv: [sh, -c, "exit 4"]}}
    - {{name: main, on: [a], shell: true, argv: ["while [ ! -e {m} ]; do sleep 0.05; done"], timeout: 3s}}
"#,
            m = marker.display()
        )
    };
    let out = c.ctl_stdin(&["apply", "-f", "-", "--wait"], Some(&test("bg-dies", false)));
    assert_eq!(out.code, 1, "{out:?}");
    let t = c.test("bg-dies").await;
    assert_eq!(t.status().reason, "BackgroundEnded");
    assert!(t.status().message.contains("background step bg ended before the test finished"), "{}", t.status().message);
    // With allowFailure the test goes on; here the main step then times out.
    let out = c.ctl_stdin(&["apply", "-f", "-", "--wait"], Some(&test("bg-allowed", true)));
    assert_eq!(out.code, 1, "{out:?}");
    let t = c.test("bg-allowed").await;
    assert_eq!(t.status().reason, "StepFailed", "{:?}", t.status());
    assert!(t.status().message.contains("step main failed"), "{}", t.status().message);
}

/// A control plane asked to stop (SIGTERM) stops within its grace period
/// whatever is connected: agents with their watches, a log follower, a
/// waiting `apply --wait`. It used to stop listening and then stay alive
/// until the last agent went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_control_plane_whatever_is_connected() {
    let mut c = Cluster::start(2).await;
    let path = manifest(
        &c,
        "long.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: long}
spec:
  hosts: [{role: a}]
  steps:
    - {name: s, on: [a], argv: [sh, -c, 'echo started; sleep 600']}
"#,
    );
    let mut waiting = c.ctl_spawn(&["apply", "-f", &path, "--wait"]);
    c.wait_output("test/long", "started").await;
    let mut follow = c.ctl_spawn(&["logs", "test/long", "-f"]);
    let mut watch = c.ctl_spawn(&["get", "processes", "-w"]);
    let status = c.stop_control_plane(Duration::from_secs(30)).await;
    for child in [&mut waiting, &mut follow, &mut watch] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = c.read_log("control-plane");
    let status =
        status.unwrap_or_else(|| panic!("the control plane was still running 30 s after SIGTERM; log:\n{log}"));
    assert!(status.success(), "{status:?}");
}

/// Deleting a running test ends it Cancelled, visible until its cleanup is
/// done: `wait` says so (exit 3) instead of losing the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_test_cancels_it() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "doomed.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: doomed}
spec:
  hosts: [{role: a}]
  steps:
    - {name: s, on: [a], argv: [sh, -c, 'echo started; sleep 600']}
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    c.wait_output("test/doomed", "started").await;
    let waiting = c.ctl_spawn(&["wait", "test/doomed", "--timeout", "60s"]);
    let client = c.client().await;
    let tests = client.api::<Test>();
    let mut seen = tests.watch("", "", "metadata.name=doomed").await.unwrap();
    let out = c.ctl(&["delete", "test", "doomed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let cancelled = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(ev)) = futures::StreamExt::next(&mut seen).await {
            if let Some(t) = ev.object {
                if t.status().phase == TestPhase::Cancelled {
                    return t;
                }
            }
        }
        panic!("the watch ended before the test was Cancelled");
    })
    .await
    .expect("the test was never Cancelled");
    assert_eq!(cancelled.status().reason, "Cancelled");
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    wait_for(Duration::from_secs(30), "the test to be gone", || async {
        tests.get_opt("doomed").await.ok().flatten().is_none().then_some(())
    })
    .await;
}
