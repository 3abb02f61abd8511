//! The shortened chaos run (issue 32, part 3): `hack/chaos` for 90 seconds
//! of faults over 20 agents, 3 replicas and 3 etcd members, all in network
//! namespaces. The seed is printed (and taken from `CHAOS_SEED` when set),
//! so a failure here replays with the command its report prints
//! (`hack/chaos --seed S --seconds 90 --max-hold 4 --lease 2s,1s`).
use std::time::Duration;
use testbus_tests::{chaos, needs_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_hold_under_faults() {
    if !needs_root("the chaos run") {
        return;
    }
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    // Kept after a failure: the history and every log, for the replay.
    let out = testbus_tests::repo_root().join("target/chaos").join(seed.to_string());
    let opts = chaos::Options {
        seed,
        faults_for: Duration::from_secs(90),
        max_hold: Duration::from_secs(4),
        agents: 20,
        in_flight: 6,
        bound: Duration::from_secs(200),
        // Short leases, so that a fault of a few seconds loses hosts and
        // the retries run too.
        lease: Some(("2s".into(), "1s".into())),
        out: out.clone(),
    };
    eprintln!("chaos seed {seed}");
    let report = chaos::run(&opts).await;
    let text = report.markdown(&opts);
    eprintln!("{text}");
    let logs = || {
        let mut s = std::fs::read_to_string(out.join("unended.txt")).unwrap_or_default();
        for e in std::fs::read_dir(out.join("logs")).into_iter().flatten().flatten() {
            let body = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(40).collect();
            s += &format!(
                "--- {} (end)\n{}\n",
                e.path().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        s
    };
    let recovered = report.broken.is_none() && report.faults.iter().all(|f| f.recovery.is_some());
    assert!(report.violations.is_empty() && recovered, "seed {seed}:\n{text}\n{}", logs());
    // The run did something: faults of several kinds, tests that ended,
    // processes that recorded themselves.
    assert!(report.faults.len() >= 6, "{text}");
    assert!(report.processes >= 20, "{text}");
    assert!(report.phases.get("Succeeded").copied().unwrap_or(0) >= 5, "{text}");
    if report.violations.is_empty() {
        let _ = std::fs::remove_dir_all(&out);
    }
}
