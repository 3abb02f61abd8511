//! The Python package (`python/`) against real daemons: a control plane and
//! four agents in network namespaces, reached over TLS as an admin with a
//! config file, as a user would. pytest runs in host-0's namespace:
//! - ruff's lints and format, and mypy's types;
//! - the package's own tests and its integration tests, in a clean venv
//!   with the newest grpcio and again with the lowest supported runtime
//!   (grpcio 1.51.1, protobuf 4.21.6: what the committed stubs were made
//!   for), each installed from the wheel `hack/python-wheel` builds;
//! - the examples: the API script, and the same test with the pytest plugin
//!   under pytest-xdist (two workers, each claiming its own hosts);
//! - the plugin's verdicts: `pytest --junitxml` and `testbusctl results -o
//!   junit` agree on every test, and an unsatisfiable claim is an error
//!   that says why;
//! - a wait that loses the control plane ends in Unavailable, bounded.
use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use testbus_pki::ClientFile;
use testbus_proto::{Resource, Test};
use testbus_tests::{needs_root, python_venv, repo_root, Cluster, CtlOutput};

const HTTPS: &str = "https://10.77.0.1:7780";

/// `python ARGS` in host-0's namespace, in `python/`, toward the cluster's
/// TLS listener with the admin's config file.
fn python(c: &Cluster, py: &Path, config: &Path, args: &[&str]) -> CtlOutput {
    let out = c
        .command_in("host-0", py)
        .args(args)
        .current_dir(repo_root().join("python"))
        // "" names no file: the config then comes from the arguments.
        .env("TESTBUS_CONFIG", config)
        .env("TESTBUS_INTEGRATION", "1")
        .env_remove("TESTBUS_SERVER")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// "N passed" with nothing failed, erred or skipped (a skip here is work
/// not done).
fn all_passed(out: &CtlOutput, at_least: usize) {
    let summary = out.stdout.lines().last().unwrap_or_default();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let passed: usize =
        summary.split(" passed").next().and_then(|s| s.trim().rsplit(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(passed >= at_least, "fewer than {at_least} passed: {summary}");
    for bad in ["failed", "error", "skipped"] {
        assert!(!summary.contains(bad), "{summary}\n{}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_package_its_examples_and_pytest_plugin_against_a_cluster() {
    if !needs_root("the Python tests") {
        return;
    }
    let mut c = Cluster::start(4).await;
    c.ctl_node = Some("host-0".into());
    let mut admin = ClientFile::load(&c.dir.path().join("admin.yaml")).unwrap();
    admin.server = HTTPS.into();
    let config = c.dir.path().join("python.yaml");
    admin.save(&config).unwrap();

    let pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"];
    for lowest in [false, true] {
        let py = python_venv(if lowest { "python-venv-lowest" } else { "python-venv" }, lowest);
        all_passed(&python(&c, &py, &config, &pytest), 25);
    }
    let py = python_venv("python-venv", false);
    // Linted, formatted and type-checked (ruff and mypy, configured in
    // pyproject.toml), as the Rust is.
    for args in [&["-m", "ruff", "check", "."][..], &["-m", "ruff", "format", "--check", "."], &["-m", "mypy"]] {
        let out = python(&c, &py, &config, args);
        assert_eq!(out.code, 0, "ruff {args:?}: {out:?}");
    }

    let script = python(&c, &py, &config, &["examples/client_server.py"]);
    assert_eq!(script.code, 0, "{script:?}");
    assert!(script.stdout.contains("client0 on host-") && script.stdout.contains(": HTTP 200"), "{script:?}");
    assert!(script.stdout.contains(": Succeeded"), "{script:?}");

    // The plugin's own option instead of TESTBUS_CONFIG (workers get it too).
    let option = format!("--testbus-config={}", config.display());
    let xdist = python(
        &c,
        &py,
        Path::new(""),
        &["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", &option, "examples"],
    );
    all_passed(&xdist, 3);

    let junit = c.dir.path().join("verdicts.xml");
    let junit_arg = format!("--junitxml={}", junit.display());
    let cases = python(&c, &py, &config, &["-m", "pytest", "-q", "-p", "no:cacheprovider", "plugin_cases", &junit_arg]);
    assert_eq!(cases.code, 1, "one test fails on purpose: {cases:?}");
    assert!(cases.stdout.contains("Unsatisfiable") && cases.stdout.contains("no-such-capability"), "{cases:?}");
    let pytest_says = junit_verdicts(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!(pytest_says.len(), 6, "{pytest_says:?}");

    // The claim the plugin made for topology "verdicts", and what testbus says.
    let client = c.client().await;
    let (tests, _) = client.api::<Test>().list("testbus.io/pytest-topology=verdicts", "").await.unwrap();
    let solo = tests.iter().filter(|t| !t.status().results.is_empty()).collect::<Vec<_>>();
    assert_eq!(solo.len(), 1, "one claim for the four tests of one topology: {tests:?}");
    let out = c.ctl(&["results", &format!("test/{}", solo[0].name()), "-o", "junit"]);
    let testbus_says = junit_verdicts(&out.stdout);
    for (name, verdict) in &pytest_says {
        if name.contains("unsatisfiable") {
            assert_eq!(verdict, "error", "{pytest_says:?}");
            continue;
        }
        assert_eq!(testbus_says.get(name), Some(verdict), "{name}: pytest {verdict}, testbus {testbus_says:?}");
    }

    // The control plane goes away while a command is waited for: the wait
    // ends in Unavailable once the retries (3 s here) are spent, never
    // hangs.
    let mut waiter = c
        .command_in("host-0", &py)
        .args(["-c", WAITER])
        .current_dir(repo_root().join("python"))
        .env("TESTBUS_CONFIG", &config)
        .env_remove("TESTBUS_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(waiter.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("waiting"));
    c.kill_control_plane();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = waiter.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = waiter.kill();
            panic!("the waiting client did not give up within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut waiter.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{rest:?} {err}");
    assert!(rest.iter().any(|l| l.starts_with("unavailable after")), "{rest:?} {err}");
}

/// Starts a command, says "waiting", and waits for it: Unavailable must end
/// the wait once the control plane is gone.
const WAITER: &str = r#"
import sys, time, testbus
with testbus.Client(retry_for=3) as client:
    t = client.create_test({"a": None}).start()
    p = t.hosts["a"].run(["sleep", "600"], background=True)
    print("waiting", flush=True)
    started = time.monotonic()
    try:
        p.wait(timeout=120)
    except testbus.Unavailable as e:
        print(f"unavailable after {time.monotonic() - started:.1f}s: {e}", flush=True)
        sys.exit(0)
    sys.exit("the wait ended without the server")
"#;

/// Each `<testcase>`'s name and verdict (pass, fail, error or skip).
fn junit_verdicts(xml: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for case in xml.split("<testcase").skip(1) {
        let attr = |key: &str| {
            let start = case.find(&format!(" {key}=\""))? + key.len() + 3;
            Some(case[start..].split('"').next()?.to_string())
        };
        let Some(name) = attr("name") else { continue };
        let body = case.split("</testcase>").next().unwrap_or_default();
        let head_end = case.find('>').unwrap_or(0);
        let closed = case[..head_end].ends_with('/');
        let verdict = if closed {
            "pass"
        } else if body.contains("<failure") {
            "fail"
        } else if body.contains("<error") {
            "error"
        } else if body.contains("<skipped") {
            "skip"
        } else {
            "pass"
        };
        out.insert(name, verdict.to_string());
    }
    out
}
