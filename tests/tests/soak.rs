//! A bounded soak: 200 tests over 10 agents while agents are killed and
//! restarted and the control plane is killed and restarted twice. Every
//! test must end, none for a reason other than the faults injected, every
//! process must run at most once, and the store must be consistent.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use testbus_proto::states::{ProcessPhase, TestPhase};
use testbus_proto::{phase, Host, HostRequirement, Process, Resource, Step, Test, TestSpec};
use testbus_tests::{wait_for, Cluster};

const TESTS: usize = 200;
const AGENTS: usize = 10;

fn soak_test(i: usize, marks: &str) -> Test {
    let mut t = Test::default();
    t.meta_mut().name = format!("soak-{i:03}");
    t.meta_mut().labels.insert("soak".into(), "yes".into());
    let spec: &mut TestSpec = t.spec_mut();
    spec.timeout = "2m".into();
    spec.hosts.push(HostRequirement { role: "a".into(), count: Some(1 + (i % 2) as u32), ..Default::default() });
    if i.is_multiple_of(3) {
        spec.hosts.push(HostRequirement { role: "b".into(), ..Default::default() });
    }
    // Each process leaves one line in its own file: two lines would mean it
    // ran twice.
    let mark = format!("echo ran >> {marks}/$TESTBUS_TEST-$TESTBUS_STEP-$TESTBUS_ROLE");
    spec.steps.push(Step {
        name: "one".into(),
        on: vec!["a".into()],
        shell: true,
        argv: vec![format!("{mark}; sleep 0.05")],
        ..Default::default()
    });
    let on = if i.is_multiple_of(3) { vec!["a".to_string(), "b".to_string()] } else { vec!["a".to_string()] };
    spec.steps.push(Step {
        name: "two".into(),
        on,
        after: vec!["one".into()],
        shell: true,
        argv: vec![mark],
        ..Default::default()
    });
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_agent_and_control_plane_crashes() {
    // Faults are injected on purpose here: quarantine (tested in
    // hostile.rs) would take the hosts they hit away from the soak.
    let mut c = Cluster::start_full(AGENTS, &[], &["--quarantine-after", "0"]).await;
    let marks = c.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let marks_s = marks.display().to_string();
    {
        let client = c.client().await;
        for i in 0..TESTS {
            client.api::<Test>().create(soak_test(i, &marks_s)).await.unwrap();
        }
    }
    // Faults at points of progress: an agent killed and restarted every 15
    // finished tests, the control plane killed at 60 and 130.
    let finished = |c: &Cluster| {
        let server = c.server.clone();
        async move {
            let client = testbus_client::Client::connect(&server).await.ok()?;
            let (ts, _) = client.api::<Test>().list("soak=yes", "").await.ok()?;
            Some(ts.iter().filter(|t| phase::test_terminal(&t.status().phase)).count())
        }
    };
    let mut next_agent = 0;
    let mut cp_restarts = 0;
    let mut agent_restarts = 0;
    for target in (15..TESTS).step_by(15) {
        wait_for(Duration::from_secs(240), &format!("{target} finished tests"), || async {
            finished(&c).await.filter(|n| *n >= target)
        })
        .await;
        if (target == 60 || target == 135) && cp_restarts < 2 {
            c.kill_control_plane();
            c.start_control_plane().await;
            cp_restarts += 1;
        } else {
            c.kill_agent(next_agent);
            c.start_agent(next_agent);
            next_agent = (next_agent + 1) % AGENTS;
            agent_restarts += 1;
        }
    }
    assert_eq!(cp_restarts, 2);
    wait_for(Duration::from_secs(240), "every test to finish", || async { finished(&c).await.filter(|n| *n == TESTS) })
        .await;

    let client = c.client().await;
    let (tests, _) = client.api::<Test>().list("soak=yes", "").await.unwrap();
    let (procs, _) = client.api::<Process>().list("", "").await.unwrap();
    let by_test: HashMap<&str, Vec<&Process>> = procs.iter().fold(HashMap::new(), |mut m, p| {
        m.entry(p.spec().test.as_str()).or_default().push(p);
        m
    });
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tests {
        let s = t.status();
        *outcomes.entry(format!("{}/{}", s.phase, s.reason)).or_default() += 1;
        let mine = by_test.get(t.name()).cloned().unwrap_or_default();
        match s.phase.parse() {
            Ok(TestPhase::Succeeded) => {
                let want: usize = s.steps.iter().map(|st| st.processes.len()).sum();
                assert!(want >= 2 && mine.len() == want, "{}: {} processes, status lists {want}", t.name(), mine.len());
                assert!(mine.iter().all(|p| p.status().phase == ProcessPhase::Succeeded), "{}", t.name());
            }
            // The only failures allowed are the injected ones: a process
            // lost with its agent, or a host lost.
            Ok(TestPhase::Failed) => {
                assert_eq!(s.reason, "StepFailed", "{}: {s:?}", t.name());
                let bad: Vec<&&Process> = mine.iter().filter(|p| p.status().phase != ProcessPhase::Succeeded).collect();
                assert!(!bad.is_empty(), "{}", t.name());
                for p in bad {
                    assert!(
                        matches!(p.status().phase.parse(), Ok(ProcessPhase::Lost | ProcessPhase::Killed)),
                        "{} failed for a reason other than a fault: {:?}",
                        p.name(),
                        p.status()
                    );
                }
            }
            Ok(TestPhase::Error) => assert_eq!(s.reason, "HostLost", "{}: {s:?}", t.name()),
            _ => panic!("{} ended {}", t.name(), s.phase),
        }
    }
    eprintln!("soak: {outcomes:?} after {agent_restarts} agent and {cp_restarts} control-plane restarts");
    assert!(outcomes.get("Succeeded/Completed").copied().unwrap_or(0) >= TESTS / 2, "{outcomes:?}");

    // At most once: no marker file has two lines.
    let mut ran = 0;
    for e in std::fs::read_dir(&marks).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        assert_eq!(text, "ran\n", "a process ran more than once");
        ran += 1;
    }
    assert!(ran >= procs.len() / 2, "{ran} markers for {} processes", procs.len());

    // Consistency: every process belongs to an existing test, and once the
    // controllers settle no host holds a claim of a finished test.
    let names: std::collections::HashSet<&str> = tests.iter().map(|t| t.name()).collect();
    assert!(procs.iter().all(|p| names.contains(p.spec().test.as_str())), "orphaned processes");
    wait_for(Duration::from_secs(60), "every host released", || async {
        let (hosts, _) = client.api::<Host>().list("", "").await.ok()?;
        hosts.iter().all(|h| h.status().claim.as_ref().is_none()).then_some(())
    })
    .await;
}
