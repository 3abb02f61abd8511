//! Processes outlive their agent: each is held by the agent's keeper, and a
//! restarted (or upgraded) agent takes it over, uploads what was spooled
//! while it was away and reports exits that happened meanwhile.
use std::path::{Path, PathBuf};
use std::time::Duration;
use testbus_proto::{Process, Resource};
use testbus_tests::{manifest, process_alive, wait_for, Cluster};

/// The one process of test `test`.
async fn process_of(c: &Cluster, test: &str) -> Process {
    let client = c.client().await;
    wait_for(Duration::from_secs(30), &format!("the process of {test}"), || async {
        let (ps, _) = client.api::<Process>().list("", &format!("spec.test={test}")).await.ok()?;
        ps.into_iter().next()
    })
    .await
}

/// The live keepers of agent `host` (by their pid files).
fn keepers(c: &Cluster, host: &str) -> Vec<(PathBuf, i32)> {
    testbus_tests::keepers_of(&c.dir.path().join(host))
}

/// Applies test `name`, whose process prints "start", waits for the file
/// it returns to appear, then runs `then`; returns once "start" is printed,
/// with that file and the process.
async fn gated(c: &Cluster, name: &str, then: &str) -> (PathBuf, Process) {
    let dir = c.dir.path().join(format!("shared-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let go = dir.join("go");
    let script = format!("echo start\nwhile [ ! -e {} ]; do sleep 0.02; done\n{then}\n", go.display());
    let path = manifest(c, &format!("{name}.yaml"), &script_test(name, &script));
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    c.wait_output(&format!("test/{name}"), "start").await;
    (go, process_of(c, name).await)
}

/// Process `name` once it has ended.
async fn ended(c: &Cluster, name: &str) -> Process {
    let client = c.client().await;
    wait_for(Duration::from_secs(60), &format!("process {name} to end"), || async {
        let p = client.api::<Process>().get(name).await.ok()?;
        testbus_proto::phase::process_terminal(&p.status().phase).then_some(p)
    })
    .await
}

/// Test `name` once it has ended.
async fn test_ended(c: &Cluster, name: &str) -> testbus_proto::Test {
    let client = c.client().await;
    wait_for(Duration::from_secs(60), &format!("test {name} to end"), || async {
        let t = client.api::<testbus_proto::Test>().get(name).await.ok()?;
        testbus_proto::phase::test_terminal(&t.status().phase).then_some(t)
    })
    .await
}

/// A test `name` of one step on one host running `script`.
fn script_test(name: &str, script: &str) -> String {
    let body: String = script.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}}}\nspec:\n  timeout: 5m\n  hosts: [{{role: a}}]\n  steps:\n  - name: s\n    on: [a]\n    script: |\n{body}"
    )
}

fn touch(p: &Path) {
    std::fs::write(p, "").unwrap();
}

/// A test whose process runs across a kill -9 of its agent, a SIGTERM and
/// restart, and an upgrade to a new binary (exiting while no agent runs):
/// it passes, its output is byte-exact (much of it written while the agent
/// was away), it ran once, in its cgroup all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_survives_its_agent_being_killed_restarted_and_upgraded() {
    let mut c = Cluster::start_with(1, &["--lease-duration", "10s"]).await;
    let dir = c.dir.path().join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let script = format!(
        "echo start; echo err-start >&2; echo ran >> {d}/runs\n\
         for n in 1 2 3; do\n\
           while [ ! -e {d}/go$n ]; do sleep 0.02; done\n\
           echo \"after $n\"; seq $((n * 100000)) $((n * 100000 + 30000)); echo \"err $n\" >&2\n\
         done\n"
    );
    let path = manifest(&c, "long.yaml", &script_test("long", &script));
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    c.wait_output("test/long", "start").await;
    let first = process_of(&c, "long").await;
    let pid = first.status().pid;
    assert!(pid > 0);
    let cgroup = || std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let contained = cgroup();
    let in_own_cgroup = contained.contains(&format!("/p-{}", first.meta().uid));
    assert!(in_own_cgroup || !testbus_tests::is_root(), "contained: {contained}");

    // kill -9: the process writes while no agent runs.
    c.kill_agent(0);
    touch(&dir.join("go1"));
    c.start_agent(0);
    c.wait_output("test/long", "130000").await;
    assert_eq!(cgroup(), contained, "still in its cgroup");

    // SIGTERM: the agent leaves it to its keeper.
    let st = c.stop_agent(0);
    assert!(st.success(), "{st}");
    assert!(c.read_log("host-0").contains("left to the keeper"));
    touch(&dir.join("go2"));
    c.start_agent(0);
    c.wait_output("test/long", "230000").await;
    let old = keepers(&c, "host-0");
    assert_eq!(old.len(), 1, "one keeper: {old:?}");

    // An upgrade: another binary (another build); the process ends while
    // no agent runs.
    let new_dir = c.dir.path().join("upgrade");
    std::fs::create_dir_all(&new_dir).unwrap();
    let new_bin = new_dir.join("testbus-agent");
    std::fs::copy(c.agent_binary(), &new_bin).unwrap();
    let st = c.stop_agent(0);
    assert!(st.success(), "{st}");
    touch(&dir.join("go3"));
    c.start_agent_binary(0, &new_bin);
    let p = ended(&c, first.name()).await;
    let s = p.status();
    assert_eq!((s.phase.as_str(), s.exit_code, s.pid), ("Succeeded", Some(0), pid), "{}: {}", s.reason, s.message);
    let t = test_ended(&c, "long").await;
    assert_eq!(t.status().phase, "Succeeded", "{}", t.status().message);
    assert_eq!(std::fs::read_to_string(dir.join("runs")).unwrap(), "ran\n", "ran once");

    // Byte-exact.
    let seq = |a: u32, b: u32| (a..=b).map(|i| format!("{i}\n")).collect::<String>();
    let mut want = "start\n".to_string();
    for n in 1..=3 {
        want.push_str(&format!("after {n}\n"));
        want.push_str(&seq(n * 100000, n * 100000 + 30000));
    }
    let out = c.ctl(&["logs", &format!("process/{}", first.name())]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout == want, "stdout differs: {} bytes, want {}", out.stdout.len(), want.len());
    assert_eq!(s.stdout_bytes, want.len() as u64);
    assert!(!s.stdout_truncated);
    assert_eq!(out.stderr, "err-start\nerr 1\nerr 2\nerr 3\n");

    // The old keeper, retired, goes once it holds nothing; the next
    // process runs under a keeper of the new build.
    let (_, old_pid) = old[0];
    wait_for(Duration::from_secs(30), "the retired keeper to exit", || async {
        (!process_alive(i64::from(old_pid))).then_some(())
    })
    .await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "echo", "hi"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "hi\n"), "{out:?}");
    let now = keepers(&c, "host-0");
    assert_eq!(now.len(), 1, "{now:?}");
    let exe = std::fs::read_link(format!("/proc/{}/exe", now[0].1)).unwrap();
    assert_eq!(exe, new_bin, "the new keeper is of the new binary");
}

/// A keeper that dies with its agent (as in a reboot, where everything
/// goes) leaves its process Lost, saying so, and nothing of it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_keeper_is_gone_is_lost_saying_why() {
    let mut c = Cluster::start_with(1, &["--lease-duration", "10s"]).await;
    let path = manifest(
        &c,
        "s.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: s}\nspec:\n  hosts: [{role: a}]\n  steps:\n  - {name: s, on: [a], argv: [sleep, \"600\"]}\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let pid = c.running_pids("s", 1).await[0];
    let p = process_of(&c, "s").await;
    c.kill_agent(0);
    testbus_tests::end_keepers(&c.dir.path().join("host-0"));
    c.start_agent(0);
    let p = ended(&c, p.name()).await;
    let s = p.status();
    assert_eq!((s.phase.as_str(), s.reason.as_str()), ("Lost", "AgentRestarted"), "{}", s.message);
    assert!(s.message.contains("no keeper holds it"), "{}", s.message);
    wait_for(Duration::from_secs(30), "the orphaned sleep to be ended", || async {
        (!process_alive(pid)).then_some(())
    })
    .await;
}

/// A process that writes more than the spool keeps while its agent is
/// away: the newest bytes are kept and uploaded exactly, the server is
/// told how many were lost, and the stream is marked truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_keeps_the_newest_bytes() {
    let mut c = Cluster::start_with(1, &["--lease-duration", "10s", "--spool-limit", "2097152"]).await;
    let (go, p) = gated(&c, "big", "seq 1 1000000").await;
    c.kill_agent(0);
    touch(&go);
    // Wait for the process to end while no agent runs.
    let pid = p.status().pid;
    wait_for(Duration::from_secs(60), "the process to exit", || async { (!process_alive(pid)).then_some(()) }).await;
    c.start_agent(0);
    let p = ended(&c, p.name()).await;
    let s = p.status();
    let seq: String = (1..=1_000_000).map(|i| format!("{i}\n")).collect();
    let total = "start\n".len() + seq.len();
    assert_eq!((s.phase.as_str(), s.stdout_bytes, s.stdout_truncated), ("Succeeded", total as u64, true));
    let out = c.ctl(&["logs", &format!("process/{}", p.name())]);
    assert!(out.stderr.contains("lost: its agent was away"), "{}", out.stderr);
    let tail = out.stdout.strip_prefix("start\n").expect("what was uploaded before");
    assert!((1 << 20..=2 << 20).contains(&tail.len()), "kept {} bytes", tail.len());
    assert!(seq.ends_with(tail), "the newest bytes, exactly");
}

/// After a takeover, a process still speaks for itself on the agent's
/// socket (`testbusctl sync`), whatever holds it: the new agent knows it by
/// its cgroup, its PID namespace or its process group, as the old one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_process_still_speaks_for_itself_in_every_containment() {
    let kinds: &[&str] =
        if testbus_tests::is_root() { &["cgroup", "pid-namespace", "process-group"] } else { &["process-group"] };
    for kind in kinds {
        let mut c = Cluster::start_with(1, &["--lease-duration", "10s", "--containment", kind]).await;
        let (go, _) = gated(&c, "speak", "testbusctl sync after-restart && echo synced").await;
        c.kill_agent(0);
        c.start_agent(0);
        wait_for(Duration::from_secs(30), "the agent to take the process over", || async {
            c.read_log("host-0").contains("taken over from the keeper").then_some(())
        })
        .await;
        touch(&go);
        let t = test_ended(&c, "speak").await;
        assert_eq!(t.status().phase, "Succeeded", "{kind}: {}", t.status().message);
        assert!(c.ctl(&["logs", "test/speak"]).stdout.contains("synced"), "{kind}");
    }
}

/// A dead keeper's damaged exit log: records that do not check are never
/// trusted (a forged exit code is not reported), the log is quarantined,
/// and the record that checks still reports how the process ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_exit_log_is_quarantined_not_trusted() {
    let mut c = Cluster::start_with(1, &["--lease-duration", "10s"]).await;
    let (go, p) = gated(&c, "ex", "echo done; exit 3").await;
    let uid = p.meta().uid.clone();
    c.kill_agent(0);
    let (kdir, kpid) = keepers(&c, "host-0").pop().expect("a keeper");
    touch(&go);
    let log = kdir.join("exits");
    wait_for(Duration::from_secs(30), "the exit to be recorded", || async {
        std::fs::read_to_string(&log).ok()?.contains(&uid).then_some(())
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(kpid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for(Duration::from_secs(10), "the keeper to die", || async {
        (!process_alive(i64::from(kpid))).then_some(())
    })
    .await;
    // Garbage, and a record for the same process whose checksum does not
    // match (it claims exit code 0).
    let mut bytes = std::fs::read(&log).unwrap();
    let real = String::from_utf8(bytes.clone()).unwrap();
    let forged = real.lines().find(|l| l.contains(&uid)).unwrap().replace(" code 3 ", " code 0 ");
    bytes.extend_from_slice(b"\xff\xfegarbage\n");
    bytes.extend_from_slice(format!("{forged}\n").as_bytes());
    std::fs::write(&log, bytes).unwrap();
    c.start_agent(0);
    let p = ended(&c, p.name()).await;
    let s = p.status();
    assert_eq!((s.phase.as_str(), s.exit_code), ("Failed", Some(3)), "{}", s.message);
    assert!(c.ctl(&["logs", "test/ex"]).stdout.contains("done"), "the spool of a dead keeper is uploaded");
    let q = c.dir.path().join("host-0").join("quarantine");
    let aside: Vec<_> = std::fs::read_dir(&q).unwrap().flatten().collect();
    assert_eq!(aside.len(), 1, "the log is quarantined");
    assert!(!kdir.exists(), "the dead keeper's dir goes once reported");
}

/// Whatever reaches a keeper's socket (garbage, an endless line, a request
/// before hello, a uid that would leave the spool) closes that connection
/// or is refused; the keeper goes on serving its agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_survives_hostile_requests() {
    use std::io::{BufRead, Write};
    let c = Cluster::start(1).await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "true"]);
    assert_eq!(out.code, 0, "{out:?}");
    let (kdir, kpid) = keepers(&c, "host-0").pop().expect("a keeper");
    let sock = kdir.join("sock");
    let talk = |lines: &[&[u8]]| -> Vec<String> {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for l in lines {
            let _ = s.write_all(l);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        std::io::BufReader::new(s).lines().map_while(Result::ok).collect()
    };
    // Not a hello first; garbage; a line of 5 MiB with no end.
    assert!(talk(&[b"{\"op\":\"retire\"}\n"]).is_empty());
    assert!(talk(&[b"\xff\x00 not json\n"]).is_empty());
    let big = vec![b'x'; 5 << 20];
    assert!(talk(&[&big]).is_empty());
    // After hello (which takes the agent's place until it reconnects):
    // an implausible uid is refused, nothing is spawned or written.
    let hello = format!("{{\"op\":\"hello\",\"protocol\":{}}}\n", 1);
    let spawn = br#"{"op":"spawn","uid":"../../escape","program":"/bin/touch","args":["/tmp/keeper-escape"],"env":[],"cwd":"/","stdin":"null","containment":"process_group","spool_limit":1}
"#;
    let got = talk(&[hello.as_bytes(), spawn]);
    assert!(got[0].contains("\"welcome\""), "{got:?}");
    assert!(got.iter().any(|l| l.contains("refused") && l.contains("implausible")), "{got:?}");
    assert!(!Path::new("/tmp/keeper-escape").exists());
    assert!(process_alive(i64::from(kpid)), "the keeper lives on");
    // The agent is still served (it reconnects when its keeper stops
    // answering it).
    let out = c.ctl(&["run", "--host", "host-0", "--", "echo", "still"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "still\n"), "{out:?}");
}

/// A second connection that said hello and then read nothing (a stale
/// connection, a foreign client) took every answer of its keeper, the
/// agent's own spawns' included: the agent waited for a start that was
/// told elsewhere, and the host ran nothing more. A spawn's answer goes to
/// the connection that asked, and a process's events to its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_says_hello_takes_no_answers_from_the_agent() {
    use std::io::{BufRead, Write};
    let c = Cluster::start(1).await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "true"]);
    assert_eq!(out.code, 0, "{out:?}");
    let (kdir, _) = keepers(&c, "host-0").pop().expect("a keeper");
    let mut other = std::os::unix::net::UnixStream::connect(kdir.join("sock")).unwrap();
    other.write_all(format!("{{\"op\":\"hello\",\"protocol\":{}}}\n", 1).as_bytes()).unwrap();
    other.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut welcome = String::new();
    std::io::BufReader::new(&other).read_line(&mut welcome).unwrap();
    assert!(welcome.contains("\"welcome\""), "{welcome}");
    // It stays connected, silent, while the agent runs processes.
    for i in 0..3 {
        let word = format!("answered-{i}");
        let out = c.ctl(&["run", "--host", "host-0", "--timeout", "60s", "--", "echo", &word]);
        assert_eq!((out.code, out.stdout.trim()), (0, word.as_str()), "{out:?}");
    }
    drop(other);
    let out = c.ctl(&["run", "--host", "host-0", "--timeout", "60s", "--", "echo", "after"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "after\n"), "{out:?}");
}

/// A keeper that never answers a spawn (wedged; here stopped with SIGSTOP)
/// once left the process's runner waiting forever: not started, not
/// stopped by its test's timeout, the test never ending. The spawn is
/// bounded: the process ends Lost saying why, and the next one runs under
/// a new keeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_that_does_not_answer_a_spawn_loses_that_process_only() {
    let c = Cluster::start(1).await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "true"]);
    assert_eq!(out.code, 0, "{out:?}");
    let (_, kpid) = keepers(&c, "host-0").pop().expect("a keeper");
    let keeper = nix::unistd::Pid::from_raw(kpid);
    nix::sys::signal::kill(keeper, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let path = manifest(&c, "w.yaml", &script_test("w", "sleep 600"));
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let p = process_of(&c, "w").await;
    let p = ended(&c, p.name()).await;
    let s = p.status();
    assert_eq!((s.phase.as_str(), s.reason.as_str()), ("Lost", "KeeperLost"), "{}", s.message);
    assert!(s.message.contains("did not say within 30s whether it started"), "{}", s.message);
    let out = c.ctl(&["run", "--host", "host-0", "--timeout", "60s", "--", "echo", "again"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "again\n"), "{out:?}");
    assert!(keepers(&c, "host-0").iter().any(|(_, pid)| *pid != kpid), "a new keeper started");
    // Woken, the old keeper starts the process late: it is killed at once
    // (the agent gave it up), let go of, and the retired keeper exits.
    nix::sys::signal::kill(keeper, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_for(Duration::from_secs(30), "the old keeper to end what it started late, and exit", || async {
        (!process_alive(i64::from(kpid))).then_some(())
    })
    .await;
}
