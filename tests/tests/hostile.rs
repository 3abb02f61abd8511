//! Hostile inputs and hostile processes, against the real binaries: each
//! test is an attack that once worked (issue 15) or one of its class. Add
//! the next attacker's idea here.
use std::time::Duration;
use testbus_proto::{phase, FileRef, ObjectMeta, Process, ProcessSpec, Resource};
use testbus_tests::{bin_dir, manifest, process_alive, wait_for, Cluster};

/// A process that leaves its process group and session (`setsid`) used to
/// outlive its test, free to join the next test's group and speak for it.
/// It now ends with its Process, whatever group it moved to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_escapes_its_group_ends_with_it() {
    let c = Cluster::start(1).await;
    let pidfile = c.dir.path().join("escaped.pid");
    let path = manifest(
        &c,
        "escape.yaml",
        &format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: escape}}
spec:
  hosts: [{{role: a}}]
  steps:
    - name: escape
      on: [a]
      shell: true
      argv: ["setsid sh -c 'echo $$$$ > {pid}.tmp && mv {pid}.tmp {pid}; exec sleep 600' </dev/null >/dev/null 2>&1 & while [ ! -e {pid} ]; do sleep 0.01; done"]
"#,
            pid = pidfile.display()
        ),
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "30s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let pid: i64 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    wait_for(Duration::from_secs(10), "the escaped process to end with its Process", || async {
        (!process_alive(pid)).then_some(())
    })
    .await;
    // It had really left the step's group (else this test proves nothing).
    if let Some((_, rest)) = stat.rsplit_once(')') {
        let f: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!(f.get(2), Some(&pid.to_string().as_str()), "it led a session of its own: {stat}");
    }
}

/// One stray byte or a torn record in the agent's journal once kept it from
/// starting at all (or, with "uid 1", made it kill every process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starts_with_a_damaged_journal_and_runs_nothing_twice() {
    let mut c = Cluster::start(1).await;
    let path = manifest(
        &c,
        "one.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: one}\nspec:\n  hosts: [{role: a}]\n  steps: [{name: s, on: [a], argv: [\"true\"]}]\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &path, "--wait"]).code, 0);
    c.kill_agent(0);
    let journal = c.dir.path().join(&c.hosts[0]).join("journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    assert!(!bytes.is_empty());
    bytes.extend_from_slice(b"\xff\xfe garbage\nnot-a-uid 1\ntb1 00000000 start x");
    std::fs::write(&journal, bytes).unwrap();
    c.start_agent(0);
    c.host_phase(&c.hosts[0].clone(), phase::READY).await;
    let path = manifest(
        &c,
        "two.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: two}\nspec:\n  hosts: [{role: a}]\n  steps: [{name: s, on: [a], argv: [\"true\"]}]\n",
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "30s"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(c.read_log(&c.hosts[0]).contains("do not check"), "the damage is reported");
}

fn process(name: &str, host: &str, files: Vec<FileRef>, env: &[(&str, &str)]) -> Process {
    Process {
        metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
        spec: Some(ProcessSpec {
            host_name: host.into(),
            argv: vec!["true".into()],
            files,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Process created directly is held to what a test's step is: its file
/// paths stay in its work dir, its env names are names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_created_directly_are_validated_like_steps() {
    let c = Cluster::start(1).await;
    let api = c.client().await.api::<Process>();
    let digest = format!("sha256:{}", "0".repeat(64));
    let file = |path: &str| FileRef { digest: digest.clone(), path: path.into(), ..Default::default() };
    let cases: Vec<(Process, &str)> = vec![
        (process("dots", &c.hosts[0], vec![file("../../../etc/passwd")], &[]), "spec.files[0].path"),
        (process("dir", &c.hosts[0], vec![file("etc/")], &[]), "spec.files[0].path"),
        (process("mode", &c.hosts[0], vec![FileRef { mode: "999".into(), ..file("x") }], &[]), "spec.files[0].mode"),
        (process("eq", &c.hosts[0], vec![], &[("host_a=b", "1")]), "spec.env.host_a=b"),
        (process("dash", &c.hosts[0], vec![], &[("MY-VAR", "1")]), "spec.env.MY-VAR"),
        (process("code", &c.hosts[0], vec![], &[]), "spec.exitCodes[0]"),
    ];
    for (mut p, field) in cases {
        if p.name() == "code" {
            p.spec_mut().exit_codes = vec![300];
        }
        let err = api.create(p.clone()).await.expect_err(p.name());
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}: {err:?}", p.name());
        assert!(err.message().contains(field), "{}: {:?} does not name {field}", p.name(), err.message());
    }
    // A claim's host variables keep their names (members may hold '-').
    let ok = process("hostvar", &c.hosts[0], vec![], &[("host_nfs-server_ipv4addr", "10.0.0.1")]);
    api.create(ok).await.expect("a host variable name");
}

/// A drop-in that publishes an env name no process can be given once left
/// every test on the host Running forever; the agent now refuses it at
/// start, naming the field.
#[test]
fn an_agent_refuses_env_names_no_process_can_be_given() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("capabilities.d")).unwrap();
    std::fs::write(etc.join("capabilities.d/bad.yaml"), "env: {MY-VAR: \"1\"}\n").unwrap();
    let out = std::process::Command::new(bin_dir().join("testbus-agent"))
        .args(["--server", "unix:/nonexistent/api.sock", "--name", "bad-env"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config-dir")
        .arg(&etc)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("status.env.MY-VAR"), "{stderr}");
}

/// `cp FILE test:role:/dir/` puts the file in the directory, as cp does
/// (it used to fail and leave a temporary file behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_into_a_directory_keeps_the_file_name() {
    let c = Cluster::start(1).await;
    let out = c.ctl(&["create", "test", "open", "--claim", "a=linux", "--wait-claimed"]);
    assert_eq!(out.code, 0, "{out:?}");
    let dest = c.dir.path().join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let src = c.dir.path().join("payload.txt");
    std::fs::write(&src, "payload").unwrap();
    let out = c.ctl(&["cp", src.to_str().unwrap(), &format!("open/a:{}/", dest.display())]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(std::fs::read_to_string(dest.join("payload.txt")).unwrap(), "payload");
    let left: Vec<_> = std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// Small holes: a host that does not exist (once a test Pending forever),
/// selectors that are mistakes, revisions with a sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_naming_what_is_wrong() {
    let c = Cluster::start(1).await;
    let out = c.ctl(&["run", "--host", "no-such-host", "--", "true"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("no host named \"no-such-host\"") && out.stderr.contains(&c.hosts[0]), "{out:?}");
    for sel in ["a=b=c", "!!a"] {
        let out = c.ctl(&["get", "tests", "-l", sel]);
        assert_eq!(out.code, 2, "{sel}: {out:?}");
    }
    let api = c.client().await.api::<testbus_proto::Host>();
    let mut h = api.get(&c.hosts[0]).await.unwrap();
    h.meta_mut().resource_version = format!("+{}", h.meta().resource_version);
    let err = api.update(h).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

/// A `source:` file inside a child test was never uploaded by `apply`
/// (the CLI walked file references itself and missed child tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_uploads_the_files_of_child_tests() {
    let c = Cluster::start(1).await;
    std::fs::write(c.dir.path().join("kid.txt"), "from the child's file\n").unwrap();
    let path = manifest(
        &c,
        "kids.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: kids}
spec:
  hosts: [{role: a}]
  tests:
    - name: kid
      steps:
        - name: read
          on: [a]
          files: [{source: ./kid.txt, env: KID}]
          argv: [cat, "${KID}"]
"#,
    );
    let out = c.ctl(&["apply", "-f", &path, "--wait", "--timeout", "30s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let logs = c.ctl(&["logs", "test/kids"]);
    assert!(logs.stdout.contains("from the child's file"), "{logs:?}");
}
