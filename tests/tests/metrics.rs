//! The agent's own metrics (`--metrics-listen`), scraped as Prometheus
//! would and read with Prometheus's own parser. (The control plane's are
//! tested with its security, in security.rs: who may scrape them.)
use std::time::Duration;
use testbus_tests::{metric_sum, needs_root, wait_for, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_counts_its_processes_spawns_and_output() {
    if !needs_root("the metrics tests") {
        return;
    }
    let c = Cluster::start_full(1, &["--metrics-listen", "127.0.0.1:9464"], &[]).await;
    let go = c.dir.path().join("go");
    let test = format!(
        r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: counted}}
spec:
  hosts: [{{role: a}}]
  steps:
  - name: s
    on: [a]
    argv: [sh, -c, "echo out; echo error >&2; while [ ! -e {} ]; do sleep 0.05; done"]
"#,
        go.display()
    );
    assert_eq!(c.ctl_stdin(&["apply", "-f", "-"], Some(&test)).code, 0);
    let scrape = || c.scrape("host-0", "http://127.0.0.1:9464/metrics", &[]);
    let running = wait_for(Duration::from_secs(30), "the process to run", || async {
        let (status, s) = scrape();
        (status == 200 && metric_sum(&s, "testbus_agent_processes_running", &[]) == 1.0).then_some(s)
    })
    .await;
    assert_eq!(metric_sum(&running, "testbus_agent_spawn_duration_seconds_count", &[]), 1.0);
    std::fs::write(&go, "").unwrap();
    let done = wait_for(Duration::from_secs(30), "the process to end", || async {
        let (_, s) = scrape();
        // The family exists once the first process has ended and its end
        // is reported (after it stopped counting as running).
        let ended = s.get("testbus_agent_processes_ended_total").is_some()
            && metric_sum(&s, "testbus_agent_processes_ended_total", &[("phase", "Succeeded")]) == 1.0;
        ended.then_some(s)
    })
    .await;
    assert_eq!(metric_sum(&done, "testbus_agent_processes_running", &[]), 0.0);
    assert_eq!(metric_sum(&done, "testbus_agent_output_bytes_total", &[("stream", "stdout")]), 4.0, "{done}");
    assert_eq!(metric_sum(&done, "testbus_agent_output_bytes_total", &[("stream", "stderr")]), 6.0, "{done}");
    assert!(metric_sum(&done, "testbus_agent_spawn_duration_seconds_sum", &[]) > 0.0);
    // Nothing else is served there.
    let (status, _) = c.scrape("host-0", "http://127.0.0.1:9464/other", &[]);
    assert_eq!(status, 404);
}
