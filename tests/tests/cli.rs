//! The command line as users live in it (issue 17): the real `testbusctl`
//! binary against a real control plane, checking its output and exit codes.
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use testbus_proto::{Process, Resource, Test};
use testbus_tests::{bin_dir, manifest, wait_for, Cluster};

/// An address that answers, but not as a testbus server (here an HTTP/1.1
/// server), was "h2 protocol error", exit 1 or 3. It is exit 4, with a
/// sentence naming the address.
#[test]
fn a_server_that_is_not_testbus_is_exit_4_and_said_so() {
    let lis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = lis.local_addr().unwrap();
    // Lives as long as the test process: every connection the client makes
    // (it may retry) meets the same server.
    std::thread::spawn(move || {
        loop {
            let Ok((mut s, _)) = lis.accept() else { return };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            // A keep-alive HTTP/1.1 server: answers, and keeps the
            // connection until the client goes.
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            std::thread::spawn(move || while s.read(&mut buf).is_ok_and(|n| n > 0) {});
        }
    });
    // `get hosts` against `server`, without a config: its exit code and
    // stderr.
    let get_hosts = |server: &str| {
        let out = std::process::Command::new(bin_dir().join("testbusctl"))
            .args(["--server", server, "get", "hosts"])
            .env("TESTBUS_CONFIG", "")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let url = format!("http://{addr}");
    let (code, stderr) = get_hosts(&url);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains(&format!("{url} does not speak testbus")), "{stderr}");
    // The same without a scheme: it said "operation was canceled", naming
    // nothing.
    let bare = addr.to_string();
    let (code, stderr) = get_hosts(&bare);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains(&format!("{bare} does not speak testbus")) && stderr.contains("HTTP/1.1 400"), "{stderr}");
    // A listener that accepts and says nothing: one sentence naming it,
    // within the connect timeout (it took 22 s, when HTTP/2's keepalive
    // gave up).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = silent.local_addr().unwrap().to_string();
    let (code, stderr) = get_hosts(&at);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach the server at {at}: the server accepted the connection but said nothing in 3s"
        )),
        "{stderr}"
    );
    drop(silent);
}

/// `get … | head -1`: testbusctl used to panic (exit 101) on the closed
/// pipe. It now ends quietly, as a Unix filter does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_output_without_a_panic() {
    let c = Cluster::start(2).await;
    for _ in 0..5 {
        let mut child = c.ctl_spawn(&["get", "hosts", "-o", "yaml"]);
        // The reader goes away before (or while) anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.status.code() == Some(0) || out.status.signal() == Some(13), "{:?} {stderr}", out.status);
    }
}

/// `exec --timeout` that runs out is "timed out", exit 3 (was 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_that_times_out_exits_3() {
    let c = Cluster::start(1).await;
    let out = c.ctl(&["create", "test", "ex", "--claim", "a", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = c.ctl(&["exec", "ex", "--timeout", "1s", "--", "sleep", "30"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("timed out"), "{out:?}");
}

/// `apply` sends nothing unless every document can be applied: a second
/// document whose `source:` file is missing, or two documents naming one
/// object, used to leave the first created (and running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_all_or_nothing() {
    let c = Cluster::start(1).await;
    let doc = |name: &str, files: &str| {
        format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  hosts: [{{role: a}}]{files}
  steps: [{{name: s, on: [a], argv: ["true"]}}]
"#
        )
    };
    let missing = manifest(
        &c,
        "two.yaml",
        &format!("{}---\n{}", doc("first", ""), doc("second", "\n  files: [{source: nowhere.txt, path: x}]")),
    );
    let out = c.ctl(&["apply", "-f", &missing]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("test/second") && out.stderr.contains("nowhere.txt"), "{out:?}");
    let twice = manifest(&c, "twice.yaml", &format!("{}---\n{}", doc("same", ""), doc("same", "")));
    let out = c.ctl(&["apply", "-f", &twice]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("test/same appears twice"), "{out:?}");
    let client = c.client().await;
    let (tests, _) = client.api::<Test>().list("", "").await.unwrap();
    assert!(tests.is_empty(), "created: {:?}", tests.iter().map(|t| t.name()).collect::<Vec<_>>());
}

/// Ctrl-C on `apply --wait` stops the waiting, not the test: it says so and
/// how to stop the test, and exits 3 (it used to die by the signal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_apply_wait_says_the_test_keeps_running() {
    let c = Cluster::start(1).await;
    let client = c.client().await;
    // SIGTERM was exit 143 and silence; it is said like Ctrl-C.
    for (sig, said) in
        [(nix::sys::signal::Signal::SIGINT, "interrupted"), (nix::sys::signal::Signal::SIGTERM, "terminated")]
    {
        let name = format!("long-{}", said);
        let path = manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{{role: a}}]\n  steps: [{{name: s, on: [a], argv: [sleep, \"600\"]}}]\n"
            ),
        );
        let child = c.ctl_spawn(&["apply", "-f", &path, "--wait"]);
        wait_for(Duration::from_secs(30), "the test to run", || async {
            let t = client.api::<Test>().get(&name).await.ok()?;
            (t.status().phase == "Running").then_some(())
        })
        .await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{sig}: {:?} {stderr}", out.status);
        assert!(
            stderr.contains(&format!("{said}; test/{name} keep running"))
                && stderr.contains(&format!("testbusctl delete test {name}")),
            "{stderr}"
        );
        let t = client.api::<Test>().get(&name).await.unwrap();
        assert_eq!(t.status().phase, "Running", "the test itself goes on");
        assert_eq!(c.ctl(&["delete", "test", &name]).code, 0);
    }
}

/// A test that timed out was reported green: JUnit counted its stopped
/// processes as skipped, TAP said `ok … # SKIP stopped on request`. Every
/// process a timeout (lost host, cancel) stopped is now an error naming
/// why, in every format; JUnit carries each process's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_test_is_an_error_in_every_report() {
    let c = Cluster::start(2).await;
    let path = manifest(
        &c,
        "slow.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: slow}
spec:
  timeout: 3s
  hosts: [{role: a}, {role: b}]
  steps:
    - {name: work, on: [a, b], argv: [sh, -c, 'echo working; echo grumble >&2; sleep 600']}
    - {name: after, on: [a], after: [work], argv: ["true"]}
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait"]);
    assert_eq!(out.code, 3, "{out:?}");
    // describe says that it finished, and how (its Finished condition read
    // "Finished False TimedOut", as if it had not).
    let d = c.ctl(&["describe", "test", "slow"]).stdout;
    assert!(d.contains("Finished:     Error (TimedOut: test exceeded its timeout of 3s)"), "{d}");
    assert!(!d.contains("Finished   False"), "{d}");
    let junit = c.ctl(&["results", "test/slow", "-o", "junit"]);
    assert_eq!(junit.code, 0, "{junit:?}");
    let x = &junit.stdout;
    assert!(x.contains(r#"failures="0" errors="3" skipped="0""#), "{x}");
    assert!(x.contains(r#"<error message="stopped: TimedOut: test exceeded its timeout of 3s"/>"#), "{x}");
    assert!(x.contains(r#"<error message="not run: TimedOut"/>"#), "{x}");
    assert!(
        x.contains("<system-out>working\n</system-out>") && x.contains("<system-err>grumble\n</system-err>"),
        "{x}"
    );
    let tap = c.ctl(&["results", "test/slow", "-o", "tap"]).stdout;
    assert_eq!(tap.matches("not ok").count(), 3, "{tap}");
    assert!(!tap.contains("# SKIP"), "{tap}");
}

/// A second agent with a name already held used to register over the
/// first: the host's capabilities became the newcomer's while both renewed.
/// It is now refused, saying how to take over; with `--take-over` it takes
/// the host, and the first agent says so and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_agent_name_is_refused_or_taken_over_explicitly() {
    let c = Cluster::start(1).await;
    let second = |extra: &[&str]| {
        let dir = c.dir.path().join("second");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("agent.log")).unwrap();
        let mut cmd = c.command_in("host-0", &bin_dir().join("testbus-agent"));
        cmd.args(["--server", &c.agent_server, "--name", "host-0", "--lease-duration", "2s"])
            .args(["--join-token", &c.join_token, "--data-dir"])
            .arg(&dir)
            .arg("--config-dir")
            .arg(dir.join("etc"))
            .args(["--capability", "imposter"])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(std::process::Stdio::null());
        cmd.spawn().unwrap()
    };
    let log = || std::fs::read_to_string(c.dir.path().join("second/agent.log")).unwrap_or_default();
    let mut refused = second(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = refused.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "the second agent did not give up: {}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(2), "{}", log());
    assert!(log().contains("is held by another agent") && log().contains("--take-over"), "{}", log());
    let client = c.client().await;
    let h = client.api::<testbus_proto::Host>().get("host-0").await.unwrap();
    assert!(!h.status().capabilities.iter().any(|c| c == "imposter"), "the first agent's host was changed");

    let mut taking = second(&["--take-over"]);
    wait_for(Duration::from_secs(30), "the host to be taken over", || async {
        let h = client.api::<testbus_proto::Host>().get("host-0").await.ok()?;
        h.status().capabilities.iter().any(|c| c == "imposter").then_some(())
    })
    .await;
    let first = c.agent_pid(0);
    wait_for(Duration::from_secs(30), "the first agent to stop", || async {
        (!testbus_tests::process_alive(i64::from(first))).then_some(())
    })
    .await;
    assert!(c.read_log("host-0").contains("taken over"), "{}", c.read_log("host-0"));
    let _ = taking.kill();
    let _ = taking.wait();
}

/// `run` wrote the truncation notice into stdout, so a piped file was
/// silently wrong. Stdout now holds exactly what the process wrote (its
/// first part); the notice and a final warning go to stderr, and
/// `describe process` says the output was truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_output_stays_out_of_stdout_and_is_said_loudly() {
    let c = Cluster::start_full(1, &[], &["--max-output-bytes", "1000"]).await;
    let out = c.ctl(&["run", "--", "sh", "-c", "seq 1 2000"]);
    assert_eq!(out.code, 0, "the command itself succeeded: {out:?}");
    let all: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.stdout.len(), 1000, "{:?}", &out.stdout[out.stdout.len().saturating_sub(200)..]);
    assert_eq!(out.stdout, all[..1000], "stdout is a clean prefix of the output");
    assert!(out.stderr.contains("stdout truncated after 1000 bytes"), "{out:?}");
    assert!(out.stderr.contains("warning: the output of") && out.stderr.contains("was truncated"), "{out:?}");
    let client = c.client().await;
    let (procs, _) = client.api::<testbus_proto::Process>().list("", "").await.unwrap();
    let p = procs.first().expect("run's process");
    let d = c.ctl(&["describe", "process", p.name()]);
    assert!(d.stdout.contains("bytes stdout (truncated: only the first part is kept)"), "{d:?}");
}

/// With child tests, `get tests` counted `4/2` steps and `describe` left the
/// children's steps out, though `results` and `logs` show them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_test_steps_are_counted_and_described() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "suite.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: suite}
spec:
  hosts: [{role: a}]
  steps:
    - {name: setup, on: [a], argv: ["true"]}
    - {name: check, on: [a], after: [setup], argv: ["true"]}
  tests:
    - name: child
      after: [setup]
      steps:
        - {name: one, on: [a], argv: ["true"]}
        - {name: two, on: [a], after: [one], argv: ["true"]}
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path, "--wait"]).code, 0);
    let get = c.ctl(&["get", "tests"]);
    assert!(get.stdout.contains("4/4"), "{get:?}");
    let d = c.ctl(&["describe", "test", "suite"]);
    for step in ["setup", "check", "child.one", "child.two"] {
        assert!(d.stdout.lines().any(|l| l.trim_start().starts_with(step) && l.contains("Succeeded")), "{step}: {d:?}");
    }
}

/// kubectl's habits: `delete` takes KIND/NAME, `-l` and `--all`; the server
/// may be given as HOST:PORT; `logs --step/--role` naming nothing is an
/// error, not silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_forms_server_without_scheme_and_logs_selection_errors() {
    let c = Cluster::start(1).await;
    let pending = |name: &str, suite: &str| {
        manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}, labels: {{suite: {suite}}}}}
spec:
  hosts: [{{role: a, capabilities: [none-such]}}]
  steps: [{{name: s, on: [a], argv: ["true"]}}]
"#
            ),
        )
    };
    for (n, s) in [("t1", "x"), ("t2", "nfs"), ("t3", "nfs"), ("t4", "x")] {
        assert_eq!(c.ctl(&["apply", "-f", &pending(n, s)]).code, 0);
    }
    let client = c.client().await;
    let names = || async {
        let (ts, _) = client.api::<Test>().list("", "").await.unwrap();
        let mut v: Vec<String> = ts.iter().map(|t| t.name().to_string()).collect();
        v.sort();
        v
    };
    let gone = |want: Vec<&'static str>| {
        let names = &names;
        async move {
            wait_for(Duration::from_secs(30), "deletions", || async { (names().await == want).then_some(()) }).await
        }
    };
    let out = c.ctl(&["delete", "test/t1"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "test/t1 deleted\n"), "{out:?}");
    gone(vec!["t2", "t3", "t4"]).await;
    let out = c.ctl(&["delete", "tests", "-l", "suite=nfs"]);
    assert_eq!(out.code, 0, "{out:?}");
    gone(vec!["t4"]).await;
    for wrong in [&["delete", "tests"][..], &["delete", "tests", "t4", "--all"], &["delete", "test/t4", "t5"]] {
        assert_eq!(c.ctl(wrong).code, 2, "{wrong:?}");
    }
    assert_eq!(c.ctl(&["delete", "tests", "--all"]).code, 0);
    gone(vec![]).await;

    let out = std::process::Command::new(bin_dir().join("testbusctl"))
        .args(["--server", "127.0.0.1:1", "get", "hosts"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "HOST:PORT is an address: {out:?}");

    let one = manifest(
        &c,
        "one.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: one}
spec:
  hosts: [{role: a}]
  steps: [{name: s, on: [a], argv: [echo, hi]}]
"#,
    );
    let out = c.ctl(&["apply", "-f", &one, "--wait", "--timeout", "60s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let name = "test/one";
    assert_eq!(c.ctl(&["logs", name, "--step", "s"]).stdout, "[a/host-0] hi\n");
    let out = c.ctl(&["logs", name, "--step", "nope"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--step nope") && out.stderr.contains("(steps: "), "{out:?}");
    let out = c.ctl(&["logs", name, "--role", "nobody"]);
    assert_eq!(out.code, 2, "{out:?}");
}

/// `run` cancelled its test on Ctrl-C only; SIGTERM and SIGHUP (a closed
/// terminal, a CI job stopped) left it running with nobody waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_cancels_its_test_on_sigterm() {
    let c = Cluster::start(1).await;
    let child = c.ctl_spawn(&["run", "--", "sleep", "600"]);
    let client = c.client().await;
    let test = wait_for(Duration::from_secs(30), "run's process to start", || async {
        let (ps, _) = client.api::<testbus_proto::Process>().list("", "").await.ok()?;
        ps.iter().find(|p| p.status().phase == "Running").map(|p| p.spec().test.clone())
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&format!("terminated; test/{test} cancelled")), "{stderr}");
    wait_for(Duration::from_secs(30), "the test to be gone", || async {
        client.api::<Test>().get_opt(&test).await.ok().flatten().is_none().then_some(())
    })
    .await;
}

/// An agent that cannot reach its server says so in one plain line per
/// attempt (was tonic's whole debug dump each time), and a log that goes
/// to a file carries no colour codes.
#[test]
fn an_agent_that_cannot_reach_the_server_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("agent.log");
    let mut agent = std::process::Command::new(bin_dir().join("testbus-agent"))
        .args(["--server", &server, "--name", "lonely"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.matches("cannot reach").count() >= 3 {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no retries logged:\n{text}");
        std::thread::sleep(Duration::from_millis(25));
    };
    // Stopped before it ever registered, it leaves no cgroup behind.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = agent.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_no_cgroup_left(&dir.path().join("data"));
    assert!(!text.contains('\x1b'), "colour codes in a log file:\n{text}");
    for line in text.lines().filter(|l| l.contains("cannot reach")) {
        let (_, said) = line.split_once("cannot reach").unwrap();
        assert!(said.starts_with(&format!(" {server}: connection refused; retrying in ")), "{line}");
        assert!(line.ends_with('s') && !line.contains("tonic") && !line.contains("source:"), "{line}");
    }
}

/// Where an agent said its cgroup is (as root), that cgroup is gone.
fn assert_no_cgroup_left(data_dir: &std::path::Path) {
    if let Ok(cgroup) = std::fs::read_to_string(data_dir.join("cgroup")) {
        assert!(!std::path::Path::new(&cgroup).exists(), "{cgroup} left behind");
    }
}

/// A join that fails, or is interrupted, leaves no cgroup behind (it did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_interrupted_join_leaves_no_cgroup() {
    let c = Cluster::start(0).await;
    let token = c.create_token("1h").await;
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("agent.log"));
    let agent = |server: &str, token: &str| {
        std::process::Command::new(bin_dir().join("testbus-agent"))
            .args(["--server", server, "--name", "joiner", "--join-token", token])
            .arg("--data-dir")
            .arg(&data)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap()
    };
    // A token that is not one: refused at once.
    let status = agent(&c.agent_server, "tbjoin.not-a-token").wait().unwrap();
    assert_eq!(status.code(), Some(2), "{}", std::fs::read_to_string(&log).unwrap());
    assert_no_cgroup_left(&data);
    // A server that is not there: stopped while it tries again.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut trying = agent(&format!("https://127.0.0.1:{port}"), &token);
    wait_for(Duration::from_secs(30), "the agent to retry its join", || async {
        std::fs::read_to_string(&log).ok()?.contains("retrying in").then_some(())
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(trying.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = trying.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("stopped before it joined"), "{text}");
    assert_no_cgroup_left(&data);
}

/// `completion bash|zsh|fish` prints a script for that shell (and no other
/// shell); the main verbs' `--help` has examples; a YAML syntax error says
/// FILE:LINE:COLUMN.
#[test]
fn completion_help_examples_and_syntax_error_positions() {
    let ctl = |args: &[&str]| std::process::Command::new(bin_dir().join("testbusctl")).args(args).output().unwrap();
    // Each script registers testbusctl itself as the completer (what it
    // completes is in `completion_asks_the_server_for_names`).
    for (shell, sign) in [("bash", "complete -o nospace"), ("zsh", "#compdef testbusctl"), ("fish", "complete")] {
        let out = ctl(&["completion", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        assert!(script.contains(sign) && script.contains("COMPLETE="), "{shell}: {script}");
        assert!(script.contains(&bin_dir().join("testbusctl").display().to_string()), "{shell}: {script}");
    }
    assert_eq!(ctl(&["completion", "powershell"]).status.code(), Some(2));
    // The agent's default data dir is in its --help (it was nowhere).
    let help = std::process::Command::new(bin_dir().join("testbus-agent")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(
        help.contains("/var/lib/testbus-agent/NAME") && help.contains("~/.local/share/testbus-agent/NAME"),
        "{help}"
    );
    // The member named in `logs --help` is one a role of count 2 has (it
    // said client-2; members are client0 and client1).
    let help = String::from_utf8_lossy(&ctl(&["logs", "--help"]).stdout).into_owned();
    let req = testbus_proto::HostRequirement { role: "client".into(), count: Some(2), ..Default::default() };
    let members = testbus_proto::validate::members(&req);
    assert!(members.iter().any(|m| help.contains(&format!("e.g. {m}"))), "{members:?} in {help}");
    for verb in ["apply", "get", "run", "exec", "cp", "describe", "delete"] {
        let out = ctl(&[verb, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Examples:"), "{verb}: {help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: testbus/v1\nkind: Test\nmetadata:\n  name: a\n\tspec: {}\n").unwrap();
    let out = ctl(&["apply", "-f", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}:5:", bad.display())), "{stderr}");
}

/// `run -i` gives the command this stdin; tests made by `run` are deleted
/// an hour after they end unless `--ttl-after-finished` says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_forwards_stdin_and_has_a_default_ttl() {
    let c = Cluster::start(1).await;
    let input: String = (0..5000).map(|i| format!("line {i}\n")).collect();
    let out = c.ctl_stdin(&["run", "-i", "--", "sh", "-c", "wc -l; echo done"], Some(&input));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "5000\ndone\n", "{out:?}");
    let client = c.client().await;
    let (tests, _) = client.api::<Test>().list("testbus.io/run=true", "").await.unwrap();
    assert_eq!(tests.len(), 1);
    assert_eq!(tests[0].spec().ttl_after_finished, "1h");
    // Without -i, the command's stdin is empty (not this terminal).
    let out = c.ctl_stdin(&["run", "--ttl-after-finished", "never", "--", "wc", "-c"], Some("ignored"));
    assert_eq!((out.code, out.stdout.trim()), (0, "0"), "{out:?}");
    let (tests, _) = client.api::<Test>().list("testbus.io/run=true", "").await.unwrap();
    assert!(tests.iter().any(|t| t.spec().ttl_after_finished.is_empty()), "never: kept");
    let out = c.ctl(&["run", "--ttl-after-finished", "0s", "--", "true"]);
    assert_eq!(out.code, 0, "{out:?}");
    wait_for(Duration::from_secs(30), "the 0s test to go", || async {
        let (tests, _) = client.api::<Test>().list("testbus.io/run=true", "").await.unwrap();
        (tests.len() == 2).then_some(())
    })
    .await;
    let bad = c.ctl(&["run", "--ttl-after-finished", "soon", "--", "true"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("--ttl-after-finished"), "{bad:?}");
}

/// A failed test with holdOnFailure keeps its hosts for debugging: `exec`
/// and `cp` work on it until it is deleted; on a test that holds nothing
/// they say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_cp_work_on_a_held_test() {
    let c = Cluster::start(2).await;
    let dir = c.dir.path().display().to_string();
    let test = |name: &str, hold: bool| {
        manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec:
  holdOnFailure: {hold}
  hosts: [{{role: a}}]
  steps: [{{name: s, on: [a], argv: [sh, -c, "echo evidence > {dir}/kept-$TESTBUS_HOST; false"]}}]
"#
            ),
        )
    };
    assert_eq!(c.ctl(&["apply", "-f", &test("held", true), "--wait"]).code, 1);
    let out = c.ctl(&["exec", "held", "--", "sh", "-c", "echo debugging on $TESTBUS_HOST"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("debugging on "), "{out:?}");
    let out = c.ctl(&["exec", "held", "--", "sh", "-c", &format!("cat {dir}/kept-$TESTBUS_HOST")]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "evidence\n"), "{out:?}");
    let note = format!("{dir}/note");
    let up = c.ctl_stdin(&["cp", "-", &format!("held/a:{note}")], Some("note\n"));
    assert_eq!(up.code, 0, "{up:?}");
    let down = c.ctl(&["cp", &format!("held/a:{note}"), "-"]);
    assert_eq!((down.code, down.stdout.as_str()), (0, "note\n"), "{down:?}");

    assert_eq!(c.ctl(&["apply", "-f", &test("gone", false), "--wait"]).code, 1);
    let out = c.ctl(&["exec", "gone", "--", "true"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("holds no hosts") && out.stderr.contains("holdOnFailure"), "{out:?}");

    assert_eq!(c.ctl(&["delete", "test/held"]).code, 0);
    let out = c.ctl(&["exec", "held", "--", "true"]);
    assert_ne!(out.code, 0, "{out:?}");
}

/// Reads a child's stdout (or stderr) line by line on a thread, so a test
/// can wait for a line with a deadline.
fn lines_of(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (30 s at most) for a line containing `text`; returns the lines up
/// to and including it.
fn until_line(rx: &std::sync::mpsc::Receiver<String>, text: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let found = l.contains(text);
                seen.push(l);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {text:?} in 30 s; saw {seen:#?}"),
        }
    }
}

/// kubectl's output options: `-o jsonpath=`, `-o custom-columns=`,
/// `--sort-by` (numbers by value); `get -w` prints aligned rows and only
/// real changes, not every lease renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonpath_custom_columns_sort_by_and_a_quiet_aligned_watch() {
    let c = Cluster::start(2).await;
    let out = c.ctl(&["get", "hosts", "-o", "jsonpath={.items[*].metadata.name}"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host-0 host-1"), "{out:?}");
    let out =
        c.ctl(&["get", "hosts", "-o", r#"jsonpath={range .items[*]}{.metadata.name}={.status.phase}{"\n"}{end}"#]);
    assert_eq!(out.stdout, "host-0=Ready\nhost-1=Ready\n", "{out:?}");
    let out = c.ctl(&["get", "host", "host-1", "-o", "jsonpath={.metadata.name}"]);
    assert_eq!(out.stdout, "host-1", "one object by name: the template sees the object");
    let out = c.ctl(&[
        "get",
        "hosts",
        "-o",
        "custom-columns=HOST:.metadata.name,STATE:.status.phase,CLAIM:.status.claim.test",
    ]);
    assert_eq!(out.stdout, "HOST     STATE   CLAIM\nhost-0   Ready   <none>\nhost-1   Ready   <none>\n", "{out:?}");

    for (name, priority) in [("a", 10), ("b", 9), ("z", 2)] {
        let text = format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  priority: {priority}\n  hosts: [{{role: r, capabilities: [none-such]}}]\n  steps: [{{name: s, on: [r], argv: [\"true\"]}}]\n"
        );
        assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, &format!("{name}.yaml"), &text)]).code, 0);
    }
    let out = c.ctl(&["get", "tests", "-o", "name", "--sort-by", ".spec.priority"]);
    assert_eq!(out.stdout, "test/z\ntest/b\ntest/a\n", "numbers sort by value: {out:?}");
    let out = c.ctl(&["get", "tests", "-o", "name", "--sort-by", ".metadata.name"]);
    assert_eq!(out.stdout, "test/a\ntest/b\ntest/z\n", "{out:?}");
    for (args, flag) in [
        (&["get", "tests", "-o", "jsonpath={.a"][..], "-o"),
        (&["get", "tests", "-o", "custom-columns=NAME"][..], "-o"),
        (&["get", "tests", "-o", "xml"][..], "-o"),
        (&["get", "tests", "--sort-by", "metadata.name"][..], "--sort-by"),
    ] {
        let out = c.ctl(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(flag), "{args:?}: {out:?}");
    }

    // The watch: lease renewals (every ~0.7 s here) print nothing; a
    // cordon prints one row, aligned with the table above it.
    let mut child = c.ctl_spawn(&["get", "hosts", "-w"]);
    let rx = lines_of(child.stdout.take().unwrap());
    let first = until_line(&rx, "host-1");
    assert_eq!(first.len(), 3, "{first:?}");
    let client = c.client().await;
    let renewed = |h: testbus_proto::Host| h.status().lease_renew_time.clone();
    let before = renewed(client.api::<testbus_proto::Host>().get("host-0").await.unwrap());
    wait_for(Duration::from_secs(30), "a lease renewal", || async {
        let now = renewed(client.api::<testbus_proto::Host>().get("host-0").await.ok()?);
        (now != before && testbus_proto::time::parse(&now)? > testbus_proto::time::parse(&before)?).then_some(())
    })
    .await;
    assert_eq!(c.ctl(&["cordon", "host-0", "--reason", "repairs"]).code, 0);
    let more = until_line(&rx, "Cordoned");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(more.len(), 1, "only the real change is printed: {more:#?}");
    let col = |l: &str, word: &str| l.find(word).unwrap();
    assert_eq!(col(&first[0], "PHASE"), col(&more[0], "Ready,Cordoned"), "{first:#?} {more:#?}");
}

/// Set-based selectors (`in`, `notin`, `!`) in `get -l` and `run -l`, and
/// host claims by label in a manifest. A test that cannot be placed says
/// why while `wait` and `run` wait, with "did you mean" for a capability no
/// host offers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_based_selectors_claims_by_label_and_pending_reasons() {
    let c = Cluster::start_with(2, &["--capability", "nfs-server"]).await;
    let client = c.client().await;
    for (host, rack) in [("host-0", "r1"), ("host-1", "r2")] {
        let api = client.api::<testbus_proto::Host>();
        let mut h = api.get(host).await.unwrap();
        h.meta_mut().labels.insert("rack".into(), rack.into());
        api.update(h).await.unwrap();
    }
    let names = |sel: &str| c.ctl(&["get", "hosts", "-l", sel, "-o", "name"]).stdout;
    assert_eq!(names("rack in (r2,r3)"), "host/host-1\n");
    assert_eq!(names("rack notin (r2)"), "host/host-0\n");
    assert_eq!(names("rack in (r1,r2),rack!=r1"), "host/host-1\n");
    assert_eq!(names("!rack"), "");
    let bad = c.ctl(&["get", "hosts", "-l", "rack in (r1"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("-l") && bad.stderr.contains("without ')'"), "{bad:?}");

    let out = c.ctl(&["run", "-l", "rack in (r2)", "--", "sh", "-c", "echo $TESTBUS_HOST"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host-1\n"), "{out:?}");

    let labelled = |name: &str, selector: &str| {
        manifest(
            &c,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{{role: s, capabilities: [nfs-server], selector: \"{selector}\"}}]\n  steps: [{{name: s, on: [s], argv: [sh, -c, \"echo $TESTBUS_HOST\"]}}]\n"
            ),
        )
    };
    assert_eq!(c.ctl(&["apply", "-f", &labelled("onr1", "rack notin (r2)"), "--wait"]).code, 0);
    assert_eq!(c.ctl(&["logs", "test/onr1"]).stdout, "[s/host-0] host-0\n");
    let bad = c.ctl(&["apply", "-f", &labelled("badsel", "rack in (")]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("spec.hosts[0].selector"), "{bad:?}");
    assert_eq!(c.ctl(&["apply", "-f", &labelled("nowhere", "rack=r9")]).code, 0);
    let out = c.ctl(&["wait", "test/nowhere", "--timeout", "3s"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("test/nowhere: Pending: ")
            && out.stderr.contains("no host with these capabilities has labels matching rack=r9"),
        "{out:?}"
    );
    assert_eq!(out.stderr.matches("Pending:").count(), 1, "said once: {out:?}");

    let mut child = c.ctl_spawn(&["run", "--capability", "nfs-sever", "--", "true"]);
    let rx = lines_of(child.stderr.take().unwrap());
    let said = until_line(&rx, "Pending:");
    assert!(
        said.last().unwrap().contains("no host offers capability nfs-sever (did you mean nfs-server?)"),
        "{said:?}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(3));
}

/// A failed step shows the end of its stderr in `apply --wait` and in
/// `describe`; `describe` shows the object's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_steps_show_their_stderr_and_describe_shows_events() {
    let c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "f.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: f}
spec:
  hosts: [{role: a}]
  steps:
    - {name: prepare, on: [a], argv: [sh, -c, "echo fine >&2"]}
    - {name: check, on: [a], after: [prepare], argv: [sh, -c, "seq 1 30 >&2; echo 'mount: permission denied' >&2; exit 3"]}
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait"]);
    assert_eq!(out.code, 1, "{out:?}");
    let tail: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("    | ")).collect();
    assert_eq!(tail.len(), 10, "the last 10 lines: {out:?}");
    assert_eq!(tail[9], "    | mount: permission denied", "{out:?}");
    assert_eq!(tail[0], "    | 22", "{out:?}");
    assert!(!out.stderr.contains("| fine"), "a step that succeeded shows no stderr: {out:?}");
    let d = c.ctl(&["describe", "test/f"]);
    assert!(d.stdout.contains("stderr | mount: permission denied"), "{d:?}");
    assert!(!d.stdout.contains("stderr | fine"), "{d:?}");
    let events = d.stdout.split_once("Events:").expect("an Events section").1;
    for reason in ["Created", "Started", "StepSucceeded", "StepFailed", "Failed"] {
        assert!(events.contains(reason), "{reason}: {d:?}");
    }
    assert!(events.contains("Warning") && events.contains("step check Failed"), "{d:?}");
    let client = c.client().await;
    let (procs, _) = client.api::<testbus_proto::Process>().list("", "spec.test=f").await.unwrap();
    let failed = procs.iter().find(|p| p.spec().step == "check").unwrap();
    let d = c.ctl(&["describe", "process", failed.name()]);
    let events = d.stdout.split_once("Events:").expect("an Events section").1;
    assert!(events.contains("Started") && events.contains("exit 3"), "{d:?}");
}

/// HostPool is a kind like the others: applied, listed, described,
/// watched and deleted; what is invalid is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_pools_are_a_kind_like_the_others() {
    let c = Cluster::start(1).await;
    let pool = manifest(
        &c,
        "pool.yaml",
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {name: vms, labels: {site: lab}}\nspec:\n  provider: libvirt\n  image: /var/lib/testbus/guest-image\n  capabilities: [vm]\n  min: 0\n  max: 4\n  network: vmnet\n",
    );
    let out = c.ctl(&["apply", "-f", &pool]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "hostpool/vms created\n"), "{out:?}");
    assert_eq!(c.ctl(&["apply", "-f", &pool]).stdout, "hostpool/vms unchanged\n");
    let get = c.ctl(&["get", "hostpools"]);
    assert!(get.stdout.starts_with("NAME   PROVIDER   GUESTS   READY   MIN   MAX"), "{get:?}");
    assert!(get.stdout.contains("vms    libvirt    0        0       0     4"), "{get:?}");
    let d = c.ctl(&["describe", "hostpool/vms"]);
    assert!(
        d.stdout.contains("Image:        /var/lib/testbus/guest-image") && d.stdout.contains("Network:      vmnet"),
        "{d:?}"
    );
    assert_eq!(c.ctl(&["get", "hostpools", "-l", "site in (lab)", "-o", "name"]).stdout, "hostpool/vms\n");
    let bad = manifest(&c, "bad.yaml", &std::fs::read_to_string(&pool).unwrap().replace("min: 0", "min: 9"));
    let out = c.ctl(&["apply", "-f", &bad]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("spec.min: must be at most spec.max (4)"), "{out:?}");
    assert_eq!(c.ctl(&["delete", "hostpool/vms"]).stdout, "hostpool/vms deleted\n");
    assert_eq!(c.ctl(&["get", "hostpools", "-o", "name"]).stdout, "");
}

/// `--log-format json`: every line a daemon writes is one JSON object with
/// the time, level, message and the event's own fields.
#[test]
fn daemons_log_one_json_object_per_line_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let read_json = |path: &std::path::Path, want: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            if lines.iter().any(want) {
                for l in &lines {
                    for k in ["timestamp", "level", "message"] {
                        assert!(l.get(k).is_some(), "no {k}: {l}");
                    }
                }
                return lines;
            }
            assert!(std::time::Instant::now() < deadline, "never logged what was expected:\n{text}");
            std::thread::sleep(Duration::from_millis(25));
        }
    };
    // A control plane: its "serving" event carries the address as a field.
    let cp_log = dir.path().join("cp.log");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut cp = std::process::Command::new(bin_dir().join("testbus-control-plane"))
        .args(["--listen", &addr, "--insecure", "--no-controllers", "--log-format", "json", "--data-dir"])
        .arg(dir.path().join("cp"))
        .stderr(std::fs::File::create(&cp_log).unwrap())
        .spawn()
        .unwrap();
    read_json(&cp_log, &|l| l["message"] == "serving" && l["addr"] == addr.as_str());
    // The same port answers a plain HTTP/1.1 GET of /metrics (an insecure
    // listener: every caller that names a loopback host is admin).
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut page = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&page).contains("# TYPE testbus_store_writes counter") {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => page.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    cp.kill().unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("# TYPE testbus_store_writes counter"), "{page}");
    cp.wait().unwrap();
    // An agent that cannot reach its server.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let agent_log = dir.path().join("agent.log");
    let mut agent = std::process::Command::new(bin_dir().join("testbus-agent"))
        .args(["--server", &format!("http://127.0.0.1:{port}"), "--name", "lonely", "--data-dir"])
        .arg(dir.path().join("agent"))
        .env("TESTBUS_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    read_json(&agent_log, &|l| l["message"].as_str().is_some_and(|m| m.starts_with("cannot reach")));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    agent.wait().unwrap();
    assert_no_cgroup_left(&dir.path().join("agent"));
    // A wrong format is refused, naming the flag.
    let out = std::process::Command::new(bin_dir().join("testbus-relay"))
        .args(["--log-format", "xml", "--downstream", "unix:/nonexistent", "--upstream", "tcp:127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format"), "{out:?}");
}

/// A command that does not exist, run three times, counted as the host's
/// failure (SpawnFailed): the host was quarantined and the next `run`
/// waited forever. It is the test's failure, with a shell's exit codes
/// (127 not found, 126 not executable), and the host stays schedulable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_is_the_tests_failure_not_the_hosts() {
    let c = Cluster::start(1).await;
    for _ in 0..4 {
        let out = c.ctl(&["run", "--host", "host-0", "--", "no-such-command-here"]);
        assert_eq!(out.code, 127, "{out:?}");
        assert!(out.stderr.contains("cannot execute no-such-command-here"), "{out:?}");
    }
    let plain = c.dir.path().join("not-executable");
    std::fs::write(&plain, "echo should not run\n").unwrap();
    let out = c.ctl(&["run", "--host", "host-0", "--", plain.to_str().unwrap()]);
    assert_eq!(out.code, 126, "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
    let host = c.ctl(&["get", "host", "host-0", "-o", "yaml"]).stdout;
    assert!(!host.contains("unschedulable: true") && !host.contains("Quarantined"), "{host}");
    let out = c.ctl(&["run", "--host", "host-0", "--timeout", "60s", "--", "echo", "still-here"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "still-here\n"), "{out:?}");
    let procs = c.ctl(&["get", "processes", "-o", "yaml"]).stdout;
    assert!(!procs.contains("SpawnFailed"), "{procs}");
}

/// `cordon --reason` promised the reason in get and describe; only
/// `-o yaml` showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordon_reason_is_shown_by_get_and_describe() {
    let c = Cluster::start(1).await;
    assert_eq!(c.ctl(&["cordon", "host-0", "--reason", "disk swap on Friday"]).code, 0);
    let wide = c.ctl(&["get", "hosts", "-o", "wide"]).stdout;
    assert!(wide.contains("MESSAGE") && wide.contains("cordoned: disk swap on Friday"), "{wide}");
    let described = c.ctl(&["describe", "host", "host-0"]).stdout;
    assert!(described.contains("Cordoned:     disk swap on Friday"), "{described}");
    // Its conditions, Ready with its reason among them (there were none).
    let ready = described.lines().skip_while(|l| *l != "Conditions:").find(|l| l.trim_start().starts_with("Ready"));
    assert!(ready.is_some_and(|l| l.contains("True") && l.contains("LeaseRenewed")), "{described}");
    assert_eq!(c.ctl(&["uncordon", "host-0"]).code, 0);
    let described = c.ctl(&["describe", "host", "host-0"]).stdout;
    assert!(!described.contains("Cordoned:"), "{described}");
}

/// A manifest with no steps silently became a test that held its hosts,
/// Running 0/0, for up to an hour. apply says so, unless the test says it
/// is driven from outside (`spec.open: true`, as `create test` makes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_with_no_steps_is_said_at_apply_unless_it_is_open() {
    let c = Cluster::start(0).await;
    let doc = |name: &str, extra: &str| {
        format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{{role: a}}]\n{extra}"
        )
    };
    let out = c.ctl(&["apply", "-f", &manifest(&c, "bare.yaml", &doc("bare", ""))]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("warning: test/bare has no steps: it holds its hosts until `testbusctl finish bare` or its timeout (1h); set spec.open: true"),
        "{out:?}"
    );
    let out = c.ctl(&["apply", "-f", &manifest(&c, "open.yaml", &doc("open", "  open: true\n"))]);
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:?}");
    assert!(c.test("open").await.spec().open);
    let out = c.ctl(&["create", "test", "scripted", "--claim", "a"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(c.test("scripted").await.spec().open, "create test makes an open test");
}

/// README's "Running it yourself", run as written (but for the build,
/// whose binaries the tests already have): it used to start one agent
/// for hello.yaml's three hosts, and the test waited forever. It runs in
/// namespaces of its own: network (loopback, and an address for the hosts
/// to publish), mount (a tmpfs over /var/lib, where it keeps its state),
/// and PID (all it started in the background ends with it).
#[test]
fn the_readme_runs_as_written() {
    if !testbus_tests::needs_root("the README's commands (namespaces, /var/lib)") {
        return;
    }
    let readme = std::fs::read_to_string(testbus_tests::repo_root().join("README.md")).unwrap();
    let section = &readme[readme.find("## Running it yourself").expect("the section")..];
    let block = &section[section.find("```sh\n").expect("its sh block") + 6..];
    let block = &block[..block.find("\n```").unwrap()];
    let bin = bin_dir().display().to_string();
    let commands: Vec<String> = block
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .map(|l| l.replace("$PWD/target/release", &bin))
        .collect();
    assert!(commands.iter().any(|l| l.contains("hello.yaml")), "{block}");
    let script = format!(
        "set -e\nip link set lo up\nip link add v0 type veth peer name v1\nip addr add 10.99.0.1/24 dev v0\n\
         ip link set v0 addrgenmode none\nip link set v1 up\nip link set v0 up\nmount -t tmpfs tmpfs /var/lib\ncd {}\n{}\n",
        testbus_tests::repo_root().display(),
        commands.join("\n")
    ) + "wait\n"; // for the daemons' own shutdown, before the namespace goes
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=5", "180", "unshare", "--net", "--mount", "--pid", "--fork", "--kill-child"])
        .args(["--mount-proc", "bash", "-c", &script])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(stdout.contains("host-c") && stdout.contains("test/hello-"), "{stdout}\n--- stderr\n{stderr}");
}

/// Every TLS failure the CLI can meet is one sentence saying whose
/// certificate and what to do, exit 5 (an expired certificate was "cannot
/// reach the server: transport error", exit 4; a CA offered as a client
/// certificate printed `Other(OtherError(CaUsedAsEndEntity))`); plaintext
/// against TLS says the server speaks TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_said_in_a_sentence() {
    let mut c = Cluster::start(1).await;
    c.ctl_node = Some("host-0".into());
    let tls = c.agent_server.clone();
    let run = |config: &std::path::Path, server: &str| c.ctl_with(config, &["--server", server, "get", "hosts"], None);
    // Expired: said before anything is sent, with when and what to do.
    let expired = c.dir.path().join("expired.yaml");
    let out = std::process::Command::new(bin_dir().join("testbus-control-plane"))
        .args(["user", "create", "x", "--role", "admin", "--ttl", "2s", "--server", &tls, "--out"])
        .arg(&expired)
        .arg("--data-dir")
        .arg(c.dir.path().join("cp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = testbus_pki::ClientFile::load(&expired).unwrap();
    let not_after = testbus_pki::identity_of_pem(&file.client_certificate).unwrap().not_after;
    // (Certificate times are whole seconds: past the last one it covers.)
    wait_for(Duration::from_secs(30), "the certificate to expire", || async {
        (std::time::SystemTime::now() > not_after + Duration::from_secs(1)).then_some(())
    })
    .await;
    let out = run(&expired, &tls);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("your certificate (") && out.stderr.contains("user x) expired at "), "{out:?}");
    assert!(out.stderr.contains("testbus-control-plane user create"), "{out:?}");
    // The server says so too, when one is offered anyway (checked here
    // with openssl's client, which does not look at its own dates).
    let (cert, key) = (c.dir.path().join("x.crt"), c.dir.path().join("x.key"));
    std::fs::write(&cert, &file.client_certificate).unwrap();
    std::fs::write(&key, &file.client_key).unwrap();
    let addr = tls.trim_start_matches("https://").to_string();
    let _ = c
        .command_in("host-0", std::path::Path::new("openssl"))
        .args(["s_client", "-connect", &addr, "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    wait_for(Duration::from_secs(30), "the control plane to log the refused handshake", || async {
        c.read_log("control-plane").contains("TLS handshake refused").then_some(())
    })
    .await;
    // Another CA's user against this server.
    let other = c.dir.path().join("other-ca.yaml");
    let (ca, _) = testbus_pki::Ca::create().unwrap();
    let eve = ca.issue("eve", testbus_pki::Role::Admin, Duration::from_secs(3600)).unwrap();
    testbus_pki::ClientFile {
        server: tls.clone(),
        certificate_authority: ca.cert_pem().to_string(),
        client_certificate: eve.cert,
        client_key: eve.key,
    }
    .save(&other)
    .unwrap();
    let out = run(&other, &tls);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("not signed by the CA in your config"), "{out:?}");
    // The CA's own certificate offered as the user's.
    let pki = c.dir.path().join("cp/pki");
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let as_user = c.dir.path().join("ca-as-user.yaml");
    testbus_pki::ClientFile {
        server: tls.clone(),
        certificate_authority: ca_pem.clone(),
        client_certificate: ca_pem,
        client_key: std::fs::read_to_string(pki.join("ca.key")).unwrap(),
    }
    .save(&as_user)
    .unwrap();
    let out = run(&as_user, &tls);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("client-certificate is not a testbus user's"), "{out:?}");
    assert!(!out.stderr.contains("OtherError"), "{out:?}");
    // Plaintext against TLS.
    let admin = c.write_user_config("ann", "admin");
    let plain = tls.replace("https://", "http://");
    let out = run(&admin, &plain);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains(&format!("{plain} speaks TLS: use {tls}")), "{out:?}");
}

/// An agent stopped with SIGTERM (and `--on-stop stop`: by default a
/// stop leaves the processes to the keeper, see keepers.rs) reported its
/// processes Killed (AgentShutdown) at once, but their test went on until
/// the host's lease ran out, then said HostLost. A clean stop ends the test
/// at once, with the agent's own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_ends_at_once_when_its_agent_is_stopped() {
    let mut c = Cluster::start_with(1, &["--on-stop", "stop"]).await;
    let path = manifest(
        &c,
        "long.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: long}\nspec:\n  hosts: [{role: a}]\n  steps:\n  - {name: bg, on: [a], background: true, argv: [sleep, \"600\"]}\n  - {name: s, on: [a], after: [bg], argv: [sleep, \"600\"]}\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    c.running_pids("long", 2).await;
    let t = stop_agent_then_ended(&c, "long").await;
    let s = t.status();
    assert!(
        s.message.contains("shut down") && !s.reason.contains("HostLost"),
        "{} {}: {}",
        s.phase,
        s.reason,
        s.message
    );
    c.kill_agent(0);
    // An open test with nothing running on the host: the same.
    c.start_agent(0);
    c.wait_hosts_ready(1).await;
    assert_eq!(c.ctl(&["create", "test", "open", "--claim", "a", "--wait-claimed"]).code, 0);
    let t = stop_agent_then_ended(&c, "open").await;
    let s = t.status();
    assert_eq!(
        (s.phase.as_str(), s.reason.as_str(), s.message.as_str()),
        ("Error", "AgentStopped", "the agent of host host-0 (a) shut down")
    );
    let client = c.client().await;
    wait_for(Duration::from_secs(30), "the host to say its agent stopped", || async {
        let host = client.api::<testbus_proto::Host>().get("host-0").await.ok()?;
        let s = host.status();
        let ready = s.conditions.iter().find(|c| c.r#type == "Ready")?;
        let said = s.phase == "NotReady" && s.message.starts_with("its agent stopped (at ");
        (said && ready.status == "False" && ready.reason == "AgentStopped").then_some(())
    })
    .await;
}

/// SIGTERM to host-0's agent, then test `name` once it has ended.
async fn stop_agent_then_ended(c: &Cluster, name: &str) -> Test {
    let pid = nix::unistd::Pid::from_raw(c.agent_pid(0) as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let client = c.client().await;
    wait_for(Duration::from_secs(60), &format!("test {name} to end"), || async {
        let t = client.api::<Test>().get(name).await.ok()?;
        testbus_proto::phase::test_terminal(&t.status().phase).then_some(t)
    })
    .await
}

/// kubectl's `get KIND/NAME` and `get KIND NAME1 NAME2` (a friction of
/// issue 28: only `get KIND [NAME]` was taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_takes_refs_and_several_names() {
    let c = Cluster::start(2).await;
    let names = |out: &testbus_tests::CtlOutput| -> Vec<String> {
        out.stdout.lines().skip(1).map(|l| l.split_whitespace().next().unwrap_or("").to_string()).collect()
    };
    let out = c.ctl(&["get", "hosts", "host-1", "host-0"]);
    assert_eq!((out.code, names(&out)), (0, vec!["host-1".to_string(), "host-0".into()]), "{out:?}");
    let out = c.ctl(&["get", "host/host-0"]);
    assert_eq!((out.code, names(&out)), (0, vec!["host-0".to_string()]), "{out:?}");
    let out = c.ctl(&["get", "host/host-0", "host/host-1", "-o", "name"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host/host-0\nhost/host-1\n"), "{out:?}");
    let out = c.ctl(&["get", "host/host-0", "test/x"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("of one kind"), "{out:?}");
    let out = c.ctl(&["get", "host/host-0", "host-1"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(c.ctl(&["get", "hosts", "host-0", "nope"]).code, 2);
}

/// Every command that takes a test takes `NAME` and `test/NAME` (results
/// wanted the second, exec and finish the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_a_test_take_both_name_forms() {
    let c = Cluster::start(1).await;
    assert_eq!(c.ctl(&["create", "test", "both", "--claim", "a", "--wait-claimed"]).code, 0);
    for test in ["both", "test/both"] {
        let out = c.ctl(&["exec", test, "--", "echo", "hi"]);
        assert_eq!((out.code, out.stdout.as_str()), (0, "hi\n"), "{test}: {out:?}");
        assert_eq!(c.ctl(&["getenv", test, "host_a_hostname"]).code, 0, "{test}");
        assert_eq!(c.ctl(&["setenv", test, "K=v"]).code, 0, "{test}");
        let path = if test == "both" { "r.one" } else { "r.two" };
        assert_eq!(c.ctl(&["result", test, path, "pass"]).code, 0, "{test}");
        assert_eq!(c.ctl(&["results", test]).code, 0, "{test}");
        assert!(c.ctl(&["logs", test]).stdout.contains("hi"), "{test}");
    }
    assert_eq!(c.ctl(&["finish", "test/both"]).code, 0);
    assert_eq!(c.ctl(&["wait", "both", "--timeout", "30s"]).code, 0);
    assert_eq!(c.ctl(&["results", "host/both"]).code, 2);
}

/// kubectl habits (frictions of issue 28): `--no-headers`,
/// `--show-labels`, `-L KEY`, custom-columns paths with or without the
/// leading dot, and "did you mean" for a kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_takes_kubectls_table_flags() {
    let c = Cluster::start(0).await;
    let doc = "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: lab, labels: {suite: nfs, example.com/team: core}}\nspec:\n  open: true\n  hosts: [{role: a}]\n";
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "lab.yaml", doc)]).code, 0);
    let out = c.ctl(&["get", "tests", "--no-headers"]);
    assert!(out.stdout.starts_with("lab ") && !out.stdout.contains("NAME"), "{out:?}");
    let out = c.ctl(&["get", "tests", "--show-labels"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].ends_with("LABELS") && lines[1].ends_with("example.com/team=core,suite=nfs"), "{out:?}");
    let out = c.ctl(&["get", "tests", "-L", "suite,example.com/team"]);
    let last_two = |l: &str| l.split_whitespace().rev().take(2).map(String::from).collect::<Vec<String>>();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        (last_two(lines[0]).join(" "), last_two(lines[1]).join(" ")),
        ("TEAM SUITE".into(), "core nfs".into()),
        "{out:?}"
    );
    for spec in ["custom-columns=N:metadata.name,S:spec.open", "custom-columns=N:.metadata.name,S:.spec.open"] {
        let out = c.ctl(&["get", "tests", "-o", spec]);
        let words: Vec<&str> = out.stdout.split_whitespace().collect();
        assert_eq!((out.code, words), (0, vec!["N", "S", "lab", "true"]), "{spec}: {out:?}");
    }
    let out = c.ctl(&["get", "tsets"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("did you mean tests?"), "{out:?}");
}

/// A process stopped because its test ended says so, with the test's
/// verdict (it said "stopped on request", a friction of issue 28).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_stopped_by_its_tests_end_says_why() {
    let c = Cluster::start(1).await;
    let doc = "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: halt}\nspec:\n  hosts: [{role: a}]\n  steps:\n  - {name: slow, on: [a], background: true, argv: [sleep, \"600\"]}\n  - {name: bad, on: [a], after: [slow], argv: [sh, -c, \"exit 3\"]}\n";
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "halt.yaml", doc), "--wait", "--timeout", "60s"]).code, 1);
    let client = c.client().await;
    let p = wait_for(Duration::from_secs(30), "the slow process to end", || async {
        let p = client.api::<testbus_proto::Process>().get("halt-slow-a").await.ok()?;
        testbus_proto::phase::process_terminal(&p.status().phase).then_some(p)
    })
    .await;
    assert_eq!(
        (p.status().phase.as_str(), p.status().message.as_str()),
        ("Killed", "stopped: its test ended (StepFailed): step bad failed: a on host-0: exit code 3")
    );
}

/// After `delete`, a test that is still stopping its processes shows
/// Terminating, as kubectl shows a pod being deleted (it showed Running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_test_shows_terminating_while_it_stops() {
    let c = Cluster::start(1).await;
    // Its process ignores SIGTERM: stopping it takes the grace period.
    let doc = "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: stubborn}\nspec:\n  hosts: [{role: a}]\n  steps: [{name: s, on: [a], argv: [sh, -c, \"trap '' TERM; while true; do sleep 0.1; done\"]}]\n";
    assert_eq!(c.ctl(&["apply", "-f", &manifest(&c, "stubborn.yaml", doc)]).code, 0);
    c.running_pids("stubborn", 1).await;
    assert_eq!(c.ctl(&["delete", "test", "stubborn"]).code, 0);
    wait_for(Duration::from_secs(30), "get to show the test Terminating", || async {
        let out = c.ctl(&["get", "test", "stubborn", "--no-headers"]);
        let phase = out.stdout.split_whitespace().nth(1).unwrap_or("").to_string();
        assert_ne!(phase, "Running", "{out:?}");
        (phase == "Terminating").then_some(())
    })
    .await;
}

/// `run -l SELECTOR --timeout D` with no host to match waited an hour: the
/// timeout bounds the wait for hosts too (or `--pending-timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_does_not_wait_for_hosts_past_its_timeout() {
    let c = Cluster::start(1).await;
    for args in [
        vec!["run", "-l", "rack=nowhere", "--timeout", "2s", "--", "true"],
        vec!["run", "-l", "rack=nowhere", "--pending-timeout", "1s", "--", "true"],
    ] {
        let out = c.ctl(&args);
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
        assert!(out.stderr.contains("for hosts (its pendingTimeout)"), "{args:?}: {out:?}");
    }
}

/// `user create` refuses names that are no identity, does not overwrite a
/// file unless told to, and names the control plane's own address by
/// default (frictions of issue 28).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_create_checks_its_name_its_file_and_knows_the_address() {
    let c = Cluster::start(0).await;
    let cp = |args: &[&str]| {
        let out = std::process::Command::new(bin_dir().join("testbus-control-plane"))
            .args(["user", "create"])
            .args(args)
            .arg("--data-dir")
            .arg(c.dir.path().join("cp"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = cp(&["Bad_Name", "--role", "viewer"]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("NAME \"Bad_Name\""), "{stderr}");
    let out = c.dir.path().join("vic.yaml");
    let out = out.to_str().unwrap();
    assert_eq!(cp(&["vic", "--role", "viewer", "--out", out]).0, Some(0));
    let (code, stderr) = cp(&["vic", "--role", "viewer", "--out", out]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("exists; --force overwrites it"), "{stderr}");
    assert_eq!(cp(&["vic", "--role", "viewer", "--out", out, "--force"]).0, Some(0));
    let file = testbus_pki::ClientFile::load(std::path::Path::new(out)).unwrap();
    assert_eq!(file.server, c.agent_server, "the address the control plane serves TLS on");
}

/// `logs --tail N`, `--since`, `--since-time` and `--timestamps`, as
/// kubectl has them (a friction of issue 28): the tail is per process, and
/// following after it repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_take_tail_since_and_timestamps() {
    let c = Cluster::start(1).await;
    assert_eq!(c.ctl(&["create", "test", "tl", "--claim", "a", "--wait-claimed"]).code, 0);
    assert_eq!(c.ctl(&["exec", "tl", "--", "printf", "l1\\nl2\\nl3\\n"]).code, 0);
    let stamped = c.ctl(&["logs", "tl", "--timestamps"]);
    let times: Vec<std::time::SystemTime> = stamped
        .stdout
        .lines()
        .map(|l| {
            let (t, rest) = l.split_once(' ').unwrap_or_else(|| panic!("{stamped:?}"));
            assert!(rest.starts_with("[a/host-0] l"), "{stamped:?}");
            testbus_proto::time::parse(t).unwrap_or_else(|| panic!("{t}: not a time"))
        })
        .collect();
    assert_eq!(times.len(), 3, "{stamped:?}");
    // The next output is received a millisecond later at least.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::SystemTime::now() <= times[2] + Duration::from_millis(1) {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    assert_eq!(c.ctl(&["exec", "tl", "--", "echo", "l4"]).code, 0);
    let stamped = c.ctl(&["logs", "tl", "--timestamps"]).stdout;
    let l4_time = stamped.lines().find(|l| l.ends_with(" l4")).and_then(|l| l.split(' ').next()).unwrap().to_string();
    let lines = |args: &[&str]| {
        let out = c.ctl(args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        out.stdout.lines().map(|l| l.rsplit(' ').next().unwrap_or_default().to_string()).collect::<Vec<String>>()
    };
    assert_eq!(lines(&["logs", "tl", "--tail", "2"]), ["l2", "l3", "l4"], "the last two of each process");
    assert_eq!(lines(&["logs", "tl", "--tail", "0"]), Vec::<String>::new());
    assert_eq!(lines(&["logs", "tl", "--since-time", &l4_time]), ["l4"]);
    assert_eq!(lines(&["logs", "tl", "--since", "1h"]), ["l1", "l2", "l3", "l4"]);
    let bad = c.ctl(&["logs", "tl", "--since-time", "yesterday"]);
    assert!(bad.code == 2 && bad.stderr.contains("--since-time"), "{bad:?}");
    assert_eq!(c.ctl(&["finish", "tl"]).code, 0);
    assert_eq!(c.ctl(&["wait", "tl", "--timeout", "30s"]).code, 0);
    let mut followed = lines(&["logs", "tl", "-f", "--tail", "1"]);
    followed.sort();
    assert_eq!(followed, ["l3", "l4"], "following after the tail repeats nothing");
}

/// `cancel` ends a pending or a running test Cancelled, saying who asked;
/// the test stays to be read, unlike a deleted one, and its host is free
/// again (issue 28: the dashboard's cancel is the same request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_pending_or_running_test_and_keeps_it() {
    let c = Cluster::start(1).await;
    // Pending: no host has the capability.
    assert_eq!(c.ctl(&["create", "test", "waits", "--claim", "a=no-such-capability"]).code, 0);
    let out = c.ctl(&["cancel", "waits"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("Cancelled: cancelled by the local socket"), "{out:?}");
    let t = c.test("waits").await;
    assert_eq!((t.status().phase.as_str(), t.status().reason.as_str()), ("Cancelled", "Cancelled"));
    assert!(t.status().claims.is_empty(), "{t:?}");
    // Running, with a reason.
    assert_eq!(c.ctl(&["create", "test", "runs", "--claim", "a", "--wait-claimed"]).code, 0);
    let out = c.ctl(&["cancel", "test/runs", "--message", "enough"]);
    assert_eq!(out.code, 0, "{out:?}");
    let t = c.test("runs").await;
    assert_eq!(t.status().phase, "Cancelled");
    assert!(t.status().message.ends_with(": enough"), "{t:?}");
    // Its host is free again; a finished test is not cancelled twice.
    assert_eq!(c.ctl(&["create", "test", "next", "--claim", "a", "--wait-claimed"]).code, 0);
    let again = c.ctl(&["cancel", "runs"]);
    assert!(again.code != 0 && again.stderr.contains("finished"), "{again:?}");
    assert_eq!(c.test("runs").await.status().phase, "Cancelled");
}

/// Completion, as kubectl's `__complete`: subcommands, flags and kinds from
/// the command's definition, object names asked of the server at each
/// <TAB> (it completed static words only, a friction of issue 28).
/// Driven through bash's own completion function, as a shell would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_asks_the_server_for_names() {
    let c = Cluster::start(1).await;
    assert_eq!(c.ctl(&["create", "test", "web-a", "--claim", "a", "--wait-claimed"]).code, 0);
    let script = c.dir.path().join("complete.bash");
    std::fs::write(&script, c.ctl(&["completion", "bash"]).stdout).unwrap();
    let complete = |line: &str| -> Vec<String> {
        let bash = format!(
            "source {}\nCOMP_WORDS=(testbusctl {line})\n[[ '{line}' == *' ' ]] && COMP_WORDS+=('')\n\
             COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_TYPE=9\n\
             _clap_complete_testbusctl testbusctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "-c", &bash])
            .env("TESTBUS_SERVER", &c.server)
            .env("TESTBUS_CONFIG", c.dir.path().join("admin.yaml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
    };
    let has = |line: &str, want: &str| {
        let got = complete(line);
        assert!(got.iter().any(|g| g == want), "{line:?} completes to {got:?}, not {want:?}");
        got
    };
    has("can", "cancel");
    has("get ", "hostpools");
    has("logs --ti", "--timestamps");
    assert_eq!(has("get tests w", "web-a"), ["web-a"]);
    assert_eq!(has("get test/w", "test/web-a"), ["test/web-a"]);
    has("describe host h", "host-0");
    has("logs w", "web-a");
    has("logs proc", "process/");
    has("cordon ", "host-0");
    has("cancel ", "web-a");
    assert!(complete("get tests zz").is_empty());
    // A server that cannot be reached completes no names (only the
    // command's flags), and says nothing on the terminal.
    let bash = format!(
        "source {}; COMP_WORDS=(testbusctl get tests ''); COMP_CWORD=3; COMP_TYPE=9; \
         _clap_complete_testbusctl testbusctl '' tests; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let out = std::process::Command::new("bash")
        .args(["--norc", "-c", &bash])
        .env("TESTBUS_SERVER", "unix:/nonexistent/api.sock")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("--output") && stdout.lines().all(|l| l.starts_with("--")), "{stdout}");
    assert_eq!(stderr, "");
}

/// `exec --detach` prints the processes and returns; `wait process/NAME`
/// exits with the process's code; `kill process/NAME --grace D` sends
/// SIGTERM, and SIGKILL only after the grace (issue 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_processes_are_waited_for_and_killed_by_name() {
    let c = Cluster::start(2).await;
    assert_eq!(c.ctl(&["create", "test", "dk", "--claim", "a:2", "--wait-claimed"]).code, 0);
    let out = c.ctl(&["exec", "dk", "--detach", "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.code, 0, "{out:?}");
    let names: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(names.len(), 2, "one process per member: {out:?}");
    assert!(names.iter().all(|n| n.starts_with("process/dk-x")), "{out:?}");
    for n in &names {
        assert_eq!(c.ctl(&["wait", n, "--timeout", "30s"]).code, 5, "{n}");
    }

    // A process that takes longer over SIGTERM than the default grace
    // (2s): the grace given lets it finish, and it is not SIGKILLed.
    let script = "trap 'sleep 3; echo terminated; exit 7' TERM; echo started; while :; do sleep 0.1; done";
    let out = c.ctl(&["exec", "dk", "--role", "a1", "-d", "--", "sh", "-c", script]);
    assert_eq!(out.code, 0, "{out:?}");
    let name = out.stdout.trim().to_string();
    let bare = name.trim_start_matches("process/").to_string();
    c.wait_output(&name, "started").await;
    let still = c.ctl(&["wait", &name, "--timeout", "1s"]);
    assert!(still.code == 3 && still.stderr.contains("still runs"), "{still:?}");
    let bad = c.ctl(&["kill", &name, "--grace", "1h"]);
    assert!(bad.code == 2 && bad.stderr.contains("spec.stopGrace"), "{bad:?}");
    let killed = c.ctl(&["kill", &name, "--grace", "30s"]);
    assert_eq!(killed.code, 0, "{killed:?}");
    let p = c.client().await.api::<Process>().get(&bare).await.unwrap();
    assert_eq!(p.status().phase, "Killed", "{p:?}");
    assert_eq!(p.status().signal, "SIGTERM", "it ended within the grace, before any SIGKILL: {p:?}");
    assert!(c.ctl(&["logs", &name]).stdout.contains("terminated"));
    assert_eq!(c.ctl(&["wait", &name]).code, 3, "a killed process is not its command's failure");
    let again = c.ctl(&["kill", &name]);
    assert!(again.code == 0 && again.stderr.contains("already ended"), "{again:?}");

    // Where it runs is checked against the test's members, named by flag.
    let out = c.ctl(&["exec", "dk", "--role", "b", "-d", "--", "true"]);
    assert!(out.code == 2 && out.stderr.contains("--role: no member"), "{out:?}");
    assert!(out.stderr.contains("a0, a1"), "{out:?}");
}

/// `rerun` makes a new test with the original's inputs, labelled with it;
/// `--failed-only` runs only what failed and what that comes after (issue
/// 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_repeats_the_inputs_and_failed_only_what_failed() {
    let c = Cluster::start(1).await;
    let data = c.dir.path().join("input.txt");
    std::fs::write(&data, "the same input\n").unwrap();
    let m = manifest(
        &c,
        "flaky.yaml",
        &format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: flaky}}\nspec:\n  hosts: [{{role: a}}]\n  \
             env: {{MODE: nightly}}\n  files: [{{source: {}, path: input.txt}}]\n  steps:\n  \
             - {{name: setup, on: [a], argv: [cat, input.txt]}}\n  \
             - {{name: good, on: [a], after: [setup], argv: [\"true\"]}}\n  \
             - {{name: bad, on: [a], after: [setup], argv: [sh, -c, \"echo $MODE; exit 3\"]}}\n",
            data.display()
        ),
    );
    assert_eq!(c.ctl(&["apply", "-f", &m, "--wait"]).code, 1);
    let first = c.test("flaky").await;

    let out = c.ctl(&["rerun", "test/flaky", "--wait"]);
    assert_eq!(out.code, 1, "it fails the same way: {out:?}");
    let name = out.stdout.lines().next().unwrap().trim_start_matches("test/").split(' ').next().unwrap().to_string();
    assert!(out.stdout.contains("a rerun of test/flaky"), "{out:?}");
    let again = c.test(&name).await;
    assert_eq!(again.meta().labels["testbus.io/rerun-of"], "flaky");
    assert_eq!(again.spec().steps, first.spec().steps);
    assert_eq!(again.spec().files, first.spec().files, "the same file digests");
    let (t1, t2) = (first.status().trace.clone().unwrap(), again.status().trace.clone().unwrap());
    assert_eq!((&t1.env, &t1.files), (&t2.env, &t2.files), "the traces show the same inputs");
    assert!(!t1.files.is_empty());

    let out = c.ctl(&["rerun", "flaky", "--failed-only", "--wait"]);
    assert_eq!(out.code, 1, "{out:?}");
    let name = out.stdout.lines().next().unwrap().trim_start_matches("test/").split(' ').next().unwrap().to_string();
    let only = c.test(&name).await;
    let steps: Vec<&str> = only.status().steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["setup", "bad"], "only what failed, after what it follows");

    let bad = c.ctl(&["rerun", "flaky", "--pool", "no-such-pool"]);
    assert!(bad.code == 2 && bad.stderr.contains("pool: HostPool \"no-such-pool\""), "{bad:?}");
    assert_eq!(c.ctl(&["create", "test", "open1", "--claim", "a", "--wait-claimed"]).code, 0);
    let running = c.ctl(&["rerun", "open1"]);
    assert!(running.code == 2 && running.stderr.contains("has not ended"), "{running:?}");
    assert_eq!(c.ctl(&["finish", "open1"]).code, 0);
    let open = c.ctl(&["rerun", "open1"]);
    assert!(open.code == 2 && open.stderr.contains("is open"), "{open:?}");
}
