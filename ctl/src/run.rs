//! `run`: claim hosts, run one command, stream its output, exit with the
//! remote exit code.
use crate::error::{CliError, CliResult, INCOMPLETE};
use crate::logs;
use std::collections::BTreeMap;
use testbus_proto::states::ProcessPhase;
use testbus_proto::{HostRequirement, ObjectMeta, Resource, Step, Test, TestSpec};

pub struct RunArgs {
    pub capabilities: Vec<String>,
    pub host: Option<String>,
    /// A label selector on the hosts; empty for any.
    pub selector: String,
    pub count: u32,
    pub env: BTreeMap<String, String>,
    pub timeout: Option<String>,
    /// How long it may wait for hosts.
    pub pending_timeout: Option<String>,
    /// Forward this command's stdin (read to its end, uploaded as a blob).
    pub stdin: bool,
    /// The test's ttlAfterFinished; empty keeps it.
    pub ttl_after_finished: String,
    pub argv: Vec<String>,
}

pub fn test_for(a: &RunArgs) -> Test {
    Test {
        metadata: Some(ObjectMeta {
            generate_name: "run-".into(),
            labels: [("testbus.io/run".to_string(), "true".to_string())].into(),
            ..Default::default()
        }),
        spec: Some(TestSpec {
            timeout: a.timeout.clone().unwrap_or_default(),
            pending_timeout: a.pending_timeout.clone().unwrap_or_default(),
            ttl_after_finished: a.ttl_after_finished.clone(),
            hosts: vec![HostRequirement {
                role: "host".into(),
                capabilities: a.capabilities.clone(),
                count: Some(a.count),
                host: a.host.clone().unwrap_or_default(),
                selector: a.selector.clone(),
            }],
            steps: vec![Step {
                name: "run".into(),
                on: vec!["host".into()],
                argv: a.argv.clone(),
                env: a.env.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn run(client: &testbus_client::Client, a: RunArgs) -> CliResult {
    let mut t = test_for(&a);
    use testbus_proto::validate::Validate;
    t.validate().map_err(|e| CliError::usage(e.to_string()))?;
    // A host that does not exist would leave the test Pending for good.
    if let Some(host) = &a.host {
        if client.api::<testbus_proto::Host>().get_opt(host).await?.is_none() {
            let (hosts, _) = client.api::<testbus_proto::Host>().list("", "").await?;
            let names: Vec<&str> = hosts.iter().map(|h| h.name()).collect();
            return Err(CliError::usage(format!(
                "--host: no host named {host:?} (hosts: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        }
    }
    if a.stdin {
        let digest = crate::script::upload_stdin(client).await?;
        t.spec_mut().steps[0].stdin_file = Some(testbus_proto::FileRef { digest, ..Default::default() });
    }
    let t = client.api::<Test>().create(t).await?;
    let name = t.name().to_string();
    // Output is followed until the test ends, or until its processes have
    // all ended with their own verdict: the exit code is known then, and
    // need not wait for the test's final status to be written.
    let all = logs::Select::default();
    let prefix = if a.count > 1 { logs::Prefix::Always } else { logs::Prefix::Never };
    let follow = logs::follow_test(client, &t, &all, prefix, Some(a.count as usize));
    // Ctrl-C, SIGTERM or SIGHUP (a closed terminal) cancels the remote
    // test: it was this command's, and nobody else waits for it.
    let stopped = stop_signal();
    let followed = tokio::select! {
        r = follow => r,
        why = stopped => {
            let _ = client.api::<Test>().delete(&name).await;
            return Err(CliError::incomplete(format!("{why}; test/{name} cancelled")));
        }
    };
    match followed {
        Ok(logs::Followed::ProcessesEnded(mut ps)) => {
            ps.sort_by(|a, b| a.spec().role.cmp(&b.spec().role));
            // The exit code stays the command's own; that the output was
            // cut is said last, where a script's log shows it.
            for p in ps.iter().filter(|p| p.status().stdout_truncated || p.status().stderr_truncated) {
                eprintln!(
                    "testbusctl: warning: the output of {} on {} was truncated (the server keeps --max-output-bytes per stream); what was printed is only its first part",
                    p.spec().role,
                    p.spec().host_name
                );
            }
            // The remote exit code of the first failing process.
            return Ok(ps
                .iter()
                .find(|p| p.status().phase != ProcessPhase::Succeeded)
                .and_then(|p| p.status().exit_code)
                .unwrap_or(0));
        }
        Ok(logs::Followed::TestEnded) => {}
        Err(e) if e.code == crate::error::INCOMPLETE => return Err(e),
        Err(e) => {
            eprintln!("testbusctl: output of test/{name}: {}", e.message);
            crate::progress::wait(client, std::slice::from_ref(&name), None, crate::progress::Progress::Quiet).await?;
        }
    }
    let t = client.api::<Test>().get(&name).await?;
    let s = t.status();
    if s.phase == ProcessPhase::Succeeded {
        return Ok(0);
    }
    if s.phase == ProcessPhase::Failed {
        // The remote exit code of the first failing process.
        let remote = s
            .steps
            .iter()
            .flat_map(|st| st.processes.iter())
            .filter(|p| p.phase != ProcessPhase::Succeeded)
            .find_map(|p| p.exit_code);
        if let Some(c) = remote {
            return Ok(c);
        }
        eprintln!("testbusctl: test/{name} failed: {}", s.message);
        return Ok(crate::error::FAILED);
    }
    eprintln!("testbusctl: test/{name} {}: {}", s.phase, s.message);
    Ok(INCOMPLETE)
}

/// The first of Ctrl-C, SIGTERM or SIGHUP (a closed terminal), said as a
/// word for a message ("interrupted", "terminated", "hung up"). Every
/// command that waits stops on any of them, the same way.
pub async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut hup) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::hangup()).ok());
    let on = |s: &mut Option<tokio::signal::unix::Signal>| {
        let s = s.take();
        async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = on(&mut term) => "terminated",
        _ = on(&mut hup) => "hung up",
    }
}
