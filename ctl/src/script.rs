//! Imperative scripting of an *open* test (one without steps), the way
//! classic shell suites drive hosts one by one: `create test`, `exec`, `cp`,
//! `getenv`, `setenv`, `result`, `finish`.
use crate::error::{CliError, CliResult, FAILED, INCOMPLETE};
use crate::logs;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::io::Write;
use testbus_client::{watcher, Client, WatcherEvent};
use testbus_proto::duration;
use testbus_proto::states::{ProcessPhase, TestPhase};
use testbus_proto::validate::member_matches;
use testbus_proto::{
    phase, ExecRequest, FileRef, FinishRequest, HostRequirement, ObjectMeta, Process, RecordResultRequest, Resource,
    SetEnvRequest, Test, TestSpec,
};

/// `ROLE[=CAP[,CAP...]][:COUNT]`.
pub fn parse_claim(s: &str) -> CliResult<HostRequirement> {
    let bad = || CliError::usage(format!("--claim {s:?}: expected ROLE=CAP[,CAP...][:COUNT]"));
    let (rest, count) = match s.rsplit_once(':') {
        Some((r, n)) => (r, Some(n.parse::<u32>().map_err(|_| bad())?)),
        None => (s, None),
    };
    let (role, caps) = match rest.split_once('=') {
        Some((r, c)) => (r, c.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect()),
        None => (rest, vec![]),
    };
    if role.is_empty() {
        return Err(bad());
    }
    Ok(HostRequirement { role: role.into(), capabilities: caps, count, ..Default::default() })
}

pub async fn create_test(
    client: &Client,
    name: &str,
    claims: Vec<HostRequirement>,
    env: BTreeMap<String, String>,
    timeout: Option<String>,
    wait_claimed: bool,
) -> CliResult {
    let t = Test {
        metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
        spec: Some(TestSpec {
            hosts: claims,
            env,
            timeout: timeout.unwrap_or_default(),
            open: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    use testbus_proto::validate::Validate;
    t.validate().map_err(|e| CliError::usage(e.to_string()))?;
    client.api::<Test>().create(t).await?;
    println!("test/{name} created");
    if !wait_claimed {
        return Ok(0);
    }
    let t = wait_running(client, name).await?;
    let claims: Vec<String> = t.status().claims.iter().map(|(r, h)| format!("{r}={h}")).collect();
    println!("test/{name} claimed {}", claims.join(" "));
    Ok(0)
}

/// Waits until the test holds its hosts.
async fn wait_running(client: &Client, name: &str) -> CliResult<Test> {
    let events = watcher(client.api::<Test>(), String::new(), format!("metadata.name={name}"));
    futures::pin_mut!(events);
    let mut pending = crate::pending::PendingNote::default();
    while let Some(ev) = events.next().await {
        let t = match ev {
            WatcherEvent::Restarted(mut l) => match l.pop() {
                Some(t) => t,
                None => return Err(CliError::incomplete(format!("test/{name} does not exist"))),
            },
            WatcherEvent::Applied(t) => t,
            WatcherEvent::Deleted(_) => return Err(CliError::incomplete(format!("test/{name} was deleted"))),
        };
        let s = t.status();
        if s.phase == ProcessPhase::Running {
            return Ok(t);
        }
        if phase::test_terminal(&s.phase) {
            return Err(CliError::incomplete(format!("test/{name} ended ({}): {}", s.phase, s.message)));
        }
        if let Some(l) = pending.line(&t) {
            eprintln!("{l}");
        }
    }
    Err(CliError::incomplete("the watch ended"))
}

fn suffix() -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}", (n ^ u128::from(std::process::id())) & 0xffff_ffff)
}

/// Uploads this command's stdin, read to its end, as a blob; returns its
/// digest. It passes through a private temporary file (removed at once),
/// so its size is bounded by the server's blob limit, not by memory.
pub async fn upload_stdin(client: &Client) -> CliResult<String> {
    let tmp = std::env::temp_dir().join(format!("testbusctl-stdin-{}-{}", std::process::id(), suffix()));
    let copied = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        std::io::copy(&mut std::io::stdin().lock(), &mut f)
    })();
    let r = match copied {
        Ok(_) => upload(client, &tmp, "stdin").await,
        Err(e) => Err(CliError::failed(format!("reading stdin: {e}"))),
    };
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Uploads a local file as a blob and returns its digest; `what` names it
/// in errors (a file that cannot be read is the user's to fix: exit 2).
pub async fn upload(client: &Client, path: &std::path::Path, what: &str) -> CliResult<String> {
    match testbus_client::transfer::upload_file(client.channel(), path).await {
        Ok(r) => Ok(r.digest),
        Err(testbus_client::transfer::BlobError::Rpc(s)) => Err(CliError::from(s)),
        Err(e) => Err(CliError::usage(format!("{what}: {e}"))),
    }
}

pub struct ExecArgs {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<String>,
    pub timeout: Option<String>,
    pub files: Vec<FileRef>,
}

impl ExecArgs {
    fn command(self) -> testbus_proto::Step {
        testbus_proto::Step {
            argv: self.argv,
            env: self.env,
            stdin: self.stdin.unwrap_or_default(),
            timeout: self.timeout.unwrap_or_default(),
            files: self.files,
            ..Default::default()
        }
    }
}

/// Starts one command on each target member (`Tests.Exec`: the server
/// builds the processes as it builds a step's); returns them as made.
pub async fn start_processes(client: &Client, test: &str, roles: &[String], a: ExecArgs) -> CliResult<Vec<Process>> {
    let req = ExecRequest { test: test.into(), on: roles.to_vec(), command: Some(a.command()) };
    match client.tests().exec(req).await {
        Ok(r) => Ok(r.into_inner().processes),
        Err(s) => {
            let mut e = CliError::from(s);
            // The request's `on` is this command's --role.
            if let Some(rest) = e.message.strip_prefix("on[").and_then(|m| m.split_once("]: ")).map(|(_, r)| r) {
                e.message = format!("--role: {rest}");
            }
            Err(e)
        }
    }
}

/// Runs one command on each target member; returns the processes when
/// they have ended, their output copied (prefixed when several) to
/// stdout/stderr when `show`.
async fn run_processes(
    client: &Client,
    test: &str,
    roles: &[String],
    a: ExecArgs,
    show: bool,
) -> CliResult<Vec<Process>> {
    let started = start_processes(client, test, roles, a).await?;
    let prefix = started.len() > 1;
    let mut readers = tokio::task::JoinSet::new();
    for p in &started {
        let c = client.clone();
        let n = p.name().to_string();
        let pre = (prefix && show).then(|| format!("[{}/{}] ", p.spec().role, p.spec().host_name));
        readers.spawn(async move {
            if show {
                logs::copy_process(&c, &n, pre, logs::Follow::Yes, &logs::Lines::default()).await
            } else {
                wait_process(&c, &n).await
            }
        });
    }
    while let Some(r) = readers.join_next().await {
        r.map_err(|e| CliError::failed(e.to_string()))??;
    }
    let mut done = Vec::new();
    for p in &started {
        done.push(client.api::<Process>().get(p.name()).await?);
    }
    Ok(done)
}

pub async fn wait_process(client: &Client, name: &str) -> CliResult<()> {
    let events = watcher(client.api::<Process>(), String::new(), format!("metadata.name={name}"));
    futures::pin_mut!(events);
    while let Some(ev) = events.next().await {
        let p = match ev {
            WatcherEvent::Restarted(mut l) => l.pop(),
            WatcherEvent::Applied(p) => Some(p),
            WatcherEvent::Deleted(_) => None,
        };
        match p {
            Some(p) if !phase::process_terminal(&p.status().phase) => continue,
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// The exit code of a set of ended processes: the first non-zero remote
/// exit code; 1 for one that failed without one; 3 for one stopped or lost.
fn exit_code(procs: &[Process]) -> i32 {
    for p in procs {
        let s = p.status();
        // Timed out, stopped or lost: not the command's own failure (3).
        let phase = s.phase.parse().ok();
        let incomplete = matches!(phase, Some(ProcessPhase::Killed | ProcessPhase::Lost))
            || s.reason == testbus_proto::states::ProcessReason::TimedOut;
        match (phase, s.exit_code) {
            (Some(ProcessPhase::Succeeded), _) => {}
            _ if incomplete => {
                eprintln!("testbusctl: {} on {}: {} ({})", p.spec().role, p.spec().host_name, s.phase, s.message);
                return INCOMPLETE;
            }
            (_, Some(c)) if c != 0 => return c,
            _ => {
                eprintln!("testbusctl: {} on {}: {}", p.spec().role, p.spec().host_name, s.message);
                return FAILED;
            }
        }
    }
    0
}

/// `wait process/NAME`: until it has ended; its exit code as `exec`'s.
pub async fn wait(client: &Client, name: &str, timeout: Option<std::time::Duration>) -> CliResult {
    client.api::<Process>().get(name).await?;
    match timeout {
        Some(d) => tokio::time::timeout(d, wait_process(client, name))
            .await
            .map_err(|_| CliError::incomplete(format!("process/{name} still runs after {}", duration::format(d))))??,
        None => wait_process(client, name).await?,
    }
    Ok(exit_code(&[client.api::<Process>().get(name).await?]))
}

/// `kill process/NAME`: sets its stop (and grace), as a test's end does;
/// with `wait`, until it has ended (exit 0 once it has, whatever its end).
pub async fn kill(client: &Client, name: &str, grace: Option<String>, wait: bool) -> CliResult {
    let api = client.api::<Process>();
    loop {
        let mut p = api.get(name).await?;
        if phase::process_terminal(&p.status().phase) {
            eprintln!("process/{name} had already ended ({})", p.status().phase);
            return Ok(0);
        }
        if p.spec().stop {
            break;
        }
        let spec = p.spec_mut();
        spec.stop = true;
        spec.stop_reason = "killed with testbusctl kill".into();
        if let Some(g) = &grace {
            spec.stop_grace = g.clone();
        }
        match api.update(p).await {
            Ok(_) => break,
            // Its agent wrote its status meanwhile: read it again.
            Err(s) if s.code() == tonic::Code::Aborted => continue,
            Err(s) => return Err(s.into()),
        }
    }
    if wait {
        wait_process(client, name).await?;
        let p = api.get(name).await?;
        eprintln!("process/{name} {}: {}", p.status().phase, p.status().message);
    }
    Ok(0)
}

pub async fn exec(client: &Client, test: &str, roles: &[String], a: ExecArgs) -> CliResult {
    let procs = run_processes(client, test, roles, a, true).await?;
    Ok(exit_code(&procs))
}

/// `TEST/ROLE:PATH`.
pub fn parse_remote(s: &str) -> Option<(String, String, String)> {
    let (test, rest) = s.split_once('/')?;
    let (role, path) = rest.split_once(':')?;
    (!test.is_empty() && !role.is_empty() && !path.is_empty()).then(|| (test.into(), role.into(), path.into()))
}

pub async fn cp(client: &Client, src: &str, dest: &str) -> CliResult {
    match (parse_remote(src), parse_remote(dest)) {
        (None, Some((test, role, path))) => {
            if !path.starts_with('/') {
                return Err(CliError::usage(format!("{dest}: the remote path must be absolute")));
            }
            // `cp FILE test:role:/dir/` puts FILE in /dir, as cp does.
            let path = if path.ends_with('/') {
                let name = std::path::Path::new(src).file_name().and_then(|n| n.to_str()).filter(|_| src != "-");
                match name {
                    Some(n) => format!("{path}{n}"),
                    None => return Err(CliError::usage(format!("{dest}: name the remote file (stdin has no name)"))),
                }
            } else {
                path
            };
            let (digest, mode) = if src == "-" {
                (upload_stdin(client).await?, "0644".to_string())
            } else {
                use std::os::unix::fs::PermissionsExt;
                let m = std::fs::metadata(src).map_err(|e| CliError::usage(format!("{src}: {e}")))?;
                let digest = upload(client, std::path::Path::new(src), src).await?;
                (digest, format!("{:04o}", m.permissions().mode() & 0o777))
            };
            let file = FileRef { digest, path: path.clone(), mode, ..Default::default() };
            let a = ExecArgs {
                argv: vec!["true".into()],
                env: BTreeMap::new(),
                stdin: None,
                timeout: None,
                files: vec![file],
            };
            let procs = run_processes(client, &test, &[role], a, true).await?;
            Ok(exit_code(&procs))
        }
        (Some((test, role, path)), None) => {
            // One member to read from; whether the test may run commands
            // at all is the server's to say (Tests.Exec).
            let t = client.api::<Test>().get(&test).await?;
            let members: Vec<&str> =
                t.status().claims.keys().map(String::as_str).filter(|m| member_matches(m, &role)).collect();
            if members.len() > 1 {
                return Err(CliError::usage(format!(
                    "{src}: {role} has {} members; name one ({})",
                    members.len(),
                    members.join(", ")
                )));
            }
            let a = ExecArgs {
                argv: vec!["cat".into(), "--".into(), path],
                env: BTreeMap::new(),
                stdin: None,
                timeout: None,
                files: vec![],
            };
            let procs = run_processes(client, &test, &[role], a, false).await?;
            let code = exit_code(&procs);
            let mut stream = client
                .output()
                .read(testbus_proto::ReadOutputRequest { process: procs[0].name().into(), follow: false, stdin: false })
                .await?
                .into_inner();
            let mut out: Box<dyn Write> = if dest == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::fs::File::create(dest).map_err(|e| CliError::usage(format!("{dest}: {e}")))?)
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if chunk.stream == 1 {
                    std::io::stderr().write_all(&chunk.data)?;
                } else {
                    out.write_all(&chunk.data)?;
                }
            }
            out.flush()?;
            Ok(code)
        }
        _ => Err(CliError::usage("cp: exactly one of SRC and DEST must be TEST/ROLE:PATH")),
    }
}

pub async fn getenv(client: &Client, test: &str, name: &str) -> CliResult {
    let t = client.api::<Test>().get(test).await?;
    match t.status().var(name) {
        Some(v) => {
            println!("{v}");
            Ok(0)
        }
        None => Err(CliError::usage(format!("test/{test} has no variable {name}"))),
    }
}

pub async fn setenv(client: &Client, test: &str, env: BTreeMap<String, String>) -> CliResult {
    client.tests().set_env(SetEnvRequest { test: test.into(), env }).await?;
    Ok(0)
}

pub async fn result(client: &Client, test: &str, path: &str, outcome: &str, message: Option<String>) -> CliResult {
    let req = RecordResultRequest {
        test: test.into(),
        path: path.into(),
        outcome: outcome.into(),
        message: message.unwrap_or_default(),
    };
    client.tests().record_result(req).await?;
    Ok(0)
}

/// How `finish` ends an open test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Succeeded, unless a recorded result failed.
    AsResults,
    /// Failed, whatever its results say (`--failed`).
    Failed,
}

pub async fn finish(client: &Client, test: &str, how: Finish) -> CliResult {
    let failed = how == Finish::Failed;
    client.tests().finish(FinishRequest { test: test.into(), failed, ..Default::default() }).await?;
    crate::progress::wait(client, &[test.to_string()], None, crate::progress::Progress::Quiet).await
}

/// Cancels a test and waits until it has ended: exit 0 once it is
/// Cancelled.
pub async fn cancel(client: &Client, test: &str, message: String) -> CliResult {
    client.tests().finish(FinishRequest { test: test.into(), cancel: true, message, ..Default::default() }).await?;
    crate::progress::wait(client, &[test.to_string()], None, crate::progress::Progress::Quiet).await?;
    let t = client.api::<Test>().get(test).await?;
    eprintln!("test/{test} {}: {}", t.status().phase, t.status().message);
    Ok(if t.status().phase == TestPhase::Cancelled { 0 } else { crate::progress::exit_code(&t) })
}
