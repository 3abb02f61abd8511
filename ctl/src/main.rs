//! testbusctl: the user's command-line client. Exit codes follow the
//! contract in error.rs.
#![forbid(unsafe_code)]

/// Like std's `print!`/`println!` (which these shadow in this crate), but a
/// reader that has gone (`get tests -o yaml | head -1`) ends testbusctl
/// quietly instead of making it panic. (Restoring SIGPIPE instead would
/// kill it on a server closing its socket, too.)
macro_rules! print {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            crate::stdout_failed(e)
        }
    }};
}
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            crate::stdout_failed(e)
        }
    }};
}

/// Standard output failed: a closed pipe ends the program quietly (its
/// reader wanted no more); anything else is an error.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("testbusctl: writing the output: {e}");
    std::process::exit(error::FAILED);
}

mod complete;
mod config;
mod error;
mod events;
mod format;
mod intest;
mod jsonpath;
mod logs;
mod objects;
mod pending;
mod progress;
mod results;
mod run;
mod script;

use clap::{Parser, Subcommand};
use clap_complete::engine::ArgValueCompleter;
use error::{CliError, CliResult};
use format::Format;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use testbus_client::Client;
use testbus_proto::states::ProcessPhase;
use testbus_proto::{duration, manifest, Host, Kind, Object, Resource};

#[derive(Parser)]
#[command(
    name = "testbusctl",
    version,
    about = "Run and inspect multi-host tests on testbus",
    after_help = "Examples:\n  testbusctl apply -f nfs.yaml --wait\n  testbusctl get tests -w\n  testbusctl run --capability kvm --count 2 -- uname -r\n  testbusctl logs test/nfs-basic --role client -f\n\nExit codes: 0 succeeded; 1 the test or command failed (run/exec: the remote exit code); 2 invalid input or usage; 3 cancelled, error or timed out; 4 the server could not be reached or does not speak testbus; 5 permission denied.\n\nCredentials: $TESTBUS_CONFIG, default ~/.config/testbus/config.yaml (made by `testbus-control-plane user create`)."
)]
struct Cli {
    /// Control-plane address: https://host:port, a comma-separated list, or
    /// unix:/path [default: the config file's, else the local control
    /// plane's socket, else https://127.0.0.1:7780]
    #[arg(long, global = true, env = "TESTBUS_SERVER")]
    server: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or update the objects in manifests.
    ///
    /// Every document is read and validated, and every `source:` file
    /// uploaded, before the first object is created.
    #[command(
        after_help = "Examples:\n  testbusctl apply -f nfs.yaml\n  testbusctl apply -f suite/ --wait --timeout 30m\n  generate-tests | testbusctl apply -f -"
    )]
    Apply {
        /// A file, a directory of *.yaml/*.yml/*.json, or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true, value_name = "FILE|DIR|-")]
        files: Vec<String>,
        /// Wait for the applied tests to finish, showing progress.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (exit 3).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        timeout: Option<std::time::Duration>,
    },
    /// List or show objects.
    #[command(
        after_help = "Examples:\n  testbusctl get hosts\n  testbusctl get tests -l suite=nfs -w\n  testbusctl get test nfs-basic -o yaml"
    )]
    Get {
        /// host(s), test(s), process(es) or hostpool(s); or KIND/NAME.
        #[arg(add = ArgValueCompleter::new(complete::kinds_and_names))]
        kind: String,
        /// Objects' names (or more KIND/NAMEs); all of KIND without any.
        #[arg(add = ArgValueCompleter::new(complete::kinds_and_names))]
        names: Vec<String>,
        /// Output format: table, wide, yaml, json, name, jsonpath=TEMPLATE
        /// (kubectl's: `{.metadata.name}`, `{range .items[*]}…{end}`) or
        /// custom-columns=HEADER:PATH[,HEADER:PATH...].
        #[arg(short = 'o', long, value_parser = Format::parse, default_value = "table", value_name = "FORMAT")]
        output: Format,
        /// Label selector: key=value, key!=value, key in (a,b), key notin (a,b), key, !key; comma-separated.
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// After listing, print changes as they happen (only real ones: not lease renewals).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Sort the list by this JSONPath, e.g. .metadata.creationTimestamp or .status.phase.
        #[arg(long, value_name = "PATH")]
        sort_by: Option<String>,
        /// Tables without their header line.
        #[arg(long)]
        no_headers: bool,
        /// A LABELS column with every label.
        #[arg(long)]
        show_labels: bool,
        /// A column of this label's values (repeatable, or comma-separated).
        #[arg(short = 'L', long = "label-columns", value_name = "KEY", value_delimiter = ',')]
        label_columns: Vec<String>,
    },
    /// Show one object in detail.
    #[command(after_help = "Examples:\n  testbusctl describe test nfs-basic\n  testbusctl describe host/node-1")]
    Describe {
        /// host, test or process; or KIND/NAME.
        #[arg(add = ArgValueCompleter::new(complete::kinds_and_names))]
        kind: String,
        /// The object's name (when KIND is not KIND/NAME).
        #[arg(add = ArgValueCompleter::new(complete::kinds_and_names))]
        name: Option<String>,
    },
    /// Delete objects (a running test ends Cancelled, then goes).
    ///
    /// Examples: `delete test/t1 test/t2`, `delete tests t1 t2`,
    /// `delete tests -l suite=nfs`, `delete tests --all`.
    Delete {
        /// KIND, or a KIND/NAME to delete.
        #[arg(add = ArgValueCompleter::new(complete::kinds_and_names))]
        kind: String,
        /// Names of KIND, or more KIND/NAME.
        #[arg(add = ArgValueCompleter::new(complete::kinds_and_names))]
        names: Vec<String>,
        /// Delete every object of KIND matching this label selector.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// Delete every object of KIND.
        #[arg(long)]
        all: bool,
    },
    /// Output of a test (prefixed by role/host) or of a process.
    Logs {
        /// test/NAME (or NAME) or process/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests_or_processes))]
        target: String,
        /// Only the processes of this role (or member, e.g. client1: a role
        /// with count N has members ROLE0 to ROLE(N-1)).
        #[arg(long)]
        role: Option<String>,
        /// Only the processes of this step.
        #[arg(long)]
        step: Option<String>,
        /// Follow until the test or process ends.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines of each process (then, with -f, what
        /// follows).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only output received in the last DURATION (e.g. 30s, 5m).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        since: Option<std::time::Duration>,
        /// Only output received at or after TIME (RFC 3339, as
        /// --timestamps prints it).
        #[arg(long, value_parser = parse_time, value_name = "TIME", conflicts_with = "since")]
        since_time: Option<std::time::SystemTime>,
        /// Start each line with the time the server received it (RFC 3339,
        /// UTC).
        #[arg(long)]
        timestamps: bool,
    },
    /// Wait for a test or a process to finish; exits as `exec` does for a
    /// process (its exit code), as `apply --wait` does for a test.
    Wait {
        /// NAME or test/NAME, or process/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests_or_processes))]
        target: String,
        /// Give up after this long (exit 3).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        timeout: Option<std::time::Duration>,
    },
    /// Mark a host unschedulable.
    Cordon {
        /// The host's name.
        #[arg(add = ArgValueCompleter::new(complete::hosts))]
        host: String,
        /// Why, shown by get and describe.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make a host schedulable again.
    Uncordon {
        /// The host's name.
        #[arg(add = ArgValueCompleter::new(complete::hosts))]
        host: String,
    },
    /// A test's results as text, JSON, JUnit XML or TAP.
    Results {
        /// NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        target: String,
        /// Report format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: results::ReportFormat,
    },
    /// Create an open test (no steps) to drive with exec, cp, result and finish.
    Create {
        #[command(subcommand)]
        what: CreateCmd,
    },
    /// Run a command on the hosts of a running test; exits with the remote exit code.
    #[command(
        after_help = "Examples:\n  testbusctl exec t1 -- uname -r\n  testbusctl exec t1 --role server --env MODE=fast -- ./setup.sh\n  testbusctl exec t1 --role client --stdin - -- sh -s < check.sh"
    )]
    Exec {
        /// The test, NAME or test/NAME (open, running, or ended with
        /// holdOnFailure and kept).
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// Roles or members to run on (repeatable); default: every host.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// An extra environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Give the command this file (or - for this stdin) on its stdin.
        #[arg(long, value_name = "FILE|-")]
        stdin: Option<String>,
        /// Stop the command after this long (exit 3).
        #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
        timeout: Option<String>,
        /// Start the command and return: print its processes'
        /// names (process/NAME, one per line) for wait, logs and kill.
        #[arg(short = 'd', long)]
        detach: bool,
        /// The command and its arguments, after --.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Run an ended test again with its original inputs (the same spec, file digests and resolved
    /// environment); the new test is labelled testbus.io/rerun-of=NAME.
    #[command(
        after_help = "Examples:\n  testbusctl rerun test/nightly-x7k2p --wait\n  testbusctl rerun nightly-x7k2p --failed-only\n  testbusctl rerun nightly-x7k2p --pool laptop   # on guests of a local HostPool"
    )]
    Rerun {
        /// The test: NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// Only the steps that failed, with the steps they come after.
        #[arg(long)]
        failed_only: bool,
        /// On guests of this HostPool instead of hosts like the original's.
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        /// Wait for it to end, as apply --wait does (its exit code).
        #[arg(long)]
        wait: bool,
    },
    /// Stop a process: SIGTERM to all it started, SIGKILL after the grace.
    #[command(
        after_help = "Examples:\n  testbusctl kill process/t1-x3f2a9c01-server\n  testbusctl kill process/t1-x3f2a9c01-server --grace 30s"
    )]
    Kill {
        /// process/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests_or_processes))]
        target: String,
        /// Time between SIGTERM and SIGKILL (default 2s, at most 10m).
        #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
        grace: Option<String>,
        /// Return at once instead of waiting for it to end.
        #[arg(long)]
        no_wait: bool,
    },
    /// Copy a file to (SRC|- TEST/ROLE:PATH) or from (TEST/ROLE:PATH DEST|-) hosts of a running test.
    #[command(
        after_help = "Examples:\n  testbusctl cp ./fixture.tar t1/server:/tmp/fixture.tar\n  testbusctl cp t1/client:/var/log/syslog -"
    )]
    Cp {
        /// A local file, - for stdin, or TEST/ROLE:PATH.
        src: String,
        /// TEST/ROLE:PATH, or a local file, - for stdout.
        dest: String,
    },
    /// Print a variable of a test's environment.
    Getenv {
        /// The test: NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// The variable's name.
        name: String,
    },
    /// Add variables to a running test's environment (for later exec).
    Setenv {
        /// The test: NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        vars: Vec<String>,
    },
    /// Record a result of a running test at a dotted path (users.verify-name).
    Result {
        /// The test: NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// Where in the test's results, dotted (users.verify-name).
        path: String,
        /// pass, fail or skip.
        #[arg(value_parser = ["pass", "fail", "skip"])]
        outcome: String,
        /// A line saying why.
        #[arg(long)]
        message: Option<String>,
    },
    /// End an open test: Succeeded, or Failed with --failed or a failed result.
    Finish {
        /// The test: NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// End it Failed whatever its results say.
        #[arg(long)]
        failed: bool,
    },
    /// Cancel a test, pending or running: it ends Cancelled (its processes
    /// stopped, its hosts released) and stays to be read, unlike `delete`.
    Cancel {
        /// The test: NAME or test/NAME.
        #[arg(add = ArgValueCompleter::new(complete::tests))]
        test: String,
        /// Why, added to its message.
        #[arg(long)]
        message: Option<String>,
    },
    /// Inside a test process: wait until every member the test claimed (or each of --role) arrives at
    /// barrier NAME; fails at once if one of them can no longer arrive.
    Sync {
        /// The barrier's name.
        name: String,
        /// Only these roles or members take part (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Give up after this long (exit 3).
        #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
        timeout: Option<String>,
    },
    /// Inside a test process: publish VALUE (or stdin with -) under KEY, from this role.
    Send {
        /// The message's key.
        key: String,
        /// Its value; - or nothing reads stdin.
        value: Option<String>,
    },
    /// Inside a test process: wait for KEY (from ROLE) and print its value.
    Recv {
        /// The message's key.
        key: String,
        /// The role (or member) that sends it; needed when several do.
        #[arg(long)]
        from: Option<String>,
        /// Give up after this long (exit 3).
        #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
        timeout: Option<String>,
    },
    /// Claim hosts, run one command on them, stream its output and exit with its exit code.
    ///
    /// Ctrl-C, SIGTERM or SIGHUP cancel the test. Output cut by the
    /// server's limit is said in a warning on stderr (the exit code stays
    /// the command's).
    #[command(
        after_help = "Examples:\n  testbusctl run -- uname -a\n  testbusctl run --capability kvm --count 3 --timeout 10m -- ./stress.sh\n  tar c src | testbusctl run -i --host node-1 -- tar tv"
    )]
    Run(RunCmd),
    /// Snapshots of a pool guest, as kvm-compose offers them (the control
    /// plane calls libvirt).
    #[command(
        after_help = "Examples:\n  testbusctl snapshot create vms-1a2b3 before-upgrade\n  testbusctl snapshot list vms-1a2b3\n  testbusctl snapshot revert vms-1a2b3 before-upgrade"
    )]
    Snapshot {
        /// create, revert, delete or list.
        #[arg(value_parser = parse_snapshot_action)]
        action: testbus_proto::pool::SnapshotAction,
        /// The guest's host name.
        #[arg(add = ArgValueCompleter::new(complete::hosts))]
        host: String,
        /// The snapshot's name (not for list).
        name: Option<String>,
    },
    /// Print a shell completion script: subcommands, flags and kinds, and
    /// the names of objects, asked of the server at each <TAB> (at most 2 s).
    #[command(
        after_help = "Examples:\n  source <(testbusctl completion bash)\n  testbusctl completion fish > ~/.config/fish/completions/testbusctl.fish"
    )]
    Completion {
        /// The shell.
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
}

#[derive(Subcommand)]
enum CreateCmd {
    /// An open test claiming hosts: --claim ROLE=CAP[,CAP...][:COUNT].
    #[command(
        after_help = "Examples:\n  testbusctl create test t1 --claim server=nfs --claim client=nfs:2 --wait-claimed"
    )]
    Test {
        /// The test's name.
        name: String,
        /// Hosts to claim for a role (repeatable).
        #[arg(long = "claim", required = true, value_name = "ROLE=CAP[,CAP...][:COUNT]")]
        claims: Vec<String>,
        /// A variable of the test's environment, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// End the test (Error, TimedOut) after this long.
        #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
        timeout: Option<String>,
        /// Wait until the hosts are claimed, and print them.
        #[arg(long)]
        wait_claimed: bool,
    },
}

/// `--ttl-after-finished`: a duration, or "never" (kept until deleted).
fn parse_ttl(s: &str) -> Result<String, String> {
    if s == "never" {
        return Ok(String::new());
    }
    parse_duration_str(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    duration::parse(s).map_err(|e| e.to_string())
}

fn parse_snapshot_action(s: &str) -> Result<testbus_proto::pool::SnapshotAction, String> {
    s.parse().map_err(|e: testbus_proto::states::Unknown| e.to_string())
}

fn parse_time(s: &str) -> Result<std::time::SystemTime, String> {
    testbus_proto::time::parse(s).ok_or_else(|| "not an RFC 3339 time, e.g. 2026-12-07T05:12:13.123Z".to_string())
}

fn parse_duration_str(s: &str) -> Result<String, String> {
    duration::parse(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

fn parse_env(flag: &str, items: &[String]) -> CliResult<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CliError::usage(format!("{flag} {kv:?}: expected KEY=VALUE"))),
        })
        .collect()
}

/// The file references of an object, for upload.
fn file_refs_mut(o: &mut Object) -> Vec<&mut testbus_proto::FileRef> {
    match o {
        // The validator's walk: child tests' files included.
        Object::Test(t) => testbus_proto::validate::file_refs_of_test_mut(t),
        Object::Host(h) => h.spec_mut().files.iter_mut().collect(),
        Object::Process(p) => {
            let s = p.spec_mut();
            s.files.iter_mut().chain(s.stdin_file.as_mut()).collect()
        }
        Object::HostPool(p) => p.spec_mut().files.iter_mut().collect(),
    }
}

/// Uploads every local `source` file an object names (relative to its
/// manifest's directory) and names it by digest instead.
async fn upload_sources(client: &Client, o: &mut Object, base: &Path) -> CliResult<()> {
    for f in file_refs_mut(o) {
        if f.source.is_empty() {
            continue;
        }
        let path = base.join(&f.source);
        f.digest = script::upload(client, &path, &format!("source {:?}", f.source)).await?;
        f.source.clear();
    }
    Ok(())
}

/// Reads every manifest source; validates everything before anything is
/// sent. Each object comes with the directory its `source` files are
/// relative to.
fn read_manifests(files: &[String]) -> CliResult<Vec<(Object, PathBuf)>> {
    let mut sources: Vec<(String, String, PathBuf)> = Vec::new();
    let cwd = std::env::current_dir().unwrap_or_default();
    for f in files {
        if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| CliError::usage(format!("-f -: {e}")))?;
            sources.push(("-".into(), s, cwd.clone()));
            continue;
        }
        let p = Path::new(f);
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| CliError::usage(format!("-f {f}: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
                .collect();
            entries.sort();
            for e in entries {
                let text =
                    std::fs::read_to_string(&e).map_err(|err| CliError::usage(format!("{}: {err}", e.display())))?;
                sources.push((e.display().to_string(), text, cwd.join(p)));
            }
        } else {
            let text = std::fs::read(p).map_err(|e| CliError::usage(format!("-f {f}: {e}")))?;
            let text = String::from_utf8(text).map_err(|_| CliError::usage(format!("{f}: not valid UTF-8")))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            sources.push((f.clone(), text, cwd.join(base)));
        }
    }
    let mut objs = Vec::new();
    for (name, text, base) in sources {
        let parsed = manifest::parse_documents(&name, &text).map_err(|e| CliError::usage(e.to_string()))?;
        for (doc, o) in parsed {
            o.validate().map_err(|e| {
                let at = manifest::document_suffix(doc);
                CliError::usage(format!("{name}{at}: {} {}: {e}", o.kind(), display_name(&o)))
            })?;
            objs.push((o, base.clone()));
        }
    }
    Ok(objs)
}

fn display_name(o: &Object) -> String {
    let m = o.meta();
    if m.name.is_empty() {
        format!("{}*", m.generate_name)
    } else {
        m.name.clone()
    }
}

async fn connect(server: &Option<String>) -> CliResult<Client> {
    config::connect(server.as_deref()).await
}

async fn apply(
    client: &Client,
    objs: Vec<(Object, PathBuf)>,
    wait: bool,
    timeout: Option<std::time::Duration>,
) -> CliResult {
    // Nothing is created unless every document can be: two documents
    // naming one object, or a `source:` file that cannot be read, stop the
    // apply before anything is sent; then every file is uploaded (blobs are
    // content-addressed: an upload changes nothing visible) before the
    // first object is created.
    let mut seen = std::collections::HashSet::new();
    for (o, base) in &objs {
        let name = o.meta().name.as_str();
        if !name.is_empty() && !seen.insert((o.kind(), name.to_string())) {
            return Err(CliError::usage(format!(
                "{}/{name} appears twice in what was given to apply",
                format::kind_slug(o.kind())
            )));
        }
        let mut probe = o.clone();
        for f in file_refs_mut(&mut probe) {
            if f.source.is_empty() {
                continue;
            }
            let path = base.join(&f.source);
            if let Err(e) = std::fs::File::open(&path) {
                return Err(CliError::usage(format!(
                    "{}/{}: source {:?}: {e}",
                    format::kind_slug(o.kind()),
                    display_name(o),
                    f.source
                )));
            }
        }
    }
    let mut uploaded = Vec::with_capacity(objs.len());
    for (mut o, base) in objs {
        upload_sources(client, &mut o, &base).await?;
        uploaded.push(o);
    }
    let mut tests = Vec::new();
    for o in uploaded {
        let what = format!("{}", o.kind()).to_lowercase();
        let res = objects::apply(client, o).await?;
        let (obj, verb) = match res {
            objects::Applied::Created(o) => (o, "created"),
            objects::Applied::Configured(o) => (o, "configured"),
            objects::Applied::Unchanged(o) => (o, "unchanged"),
        };
        println!("{what}/{} {verb}", obj.meta().name);
        if let Object::Test(t) = &obj {
            if let Some(warning) = open_warning(t) {
                eprintln!("testbusctl: warning: {warning}");
            }
            tests.push(t.name().to_string());
        }
    }
    if wait && !tests.is_empty() {
        return tokio::select! {
            code = progress::wait(client, &tests, timeout, progress::Progress::Shown) => code,
            why = run::stop_signal() => {
                // Only the waiting stops: say so, and how to stop the tests.
                let names: Vec<String> = tests.iter().map(|t| format!("test/{t}")).collect();
                eprintln!(
                    "testbusctl: {why}; {} keep running (`testbusctl delete test {}` stops them)",
                    names.join(" "),
                    tests.join(" ")
                );
                Ok(error::INCOMPLETE)
            }
        };
    }
    Ok(0)
}

/// What `get` was asked for: `KIND [NAME...]` or `KIND/NAME...` (of one
/// kind), as kubectl takes them.
fn get_targets(first: &str, rest: Vec<String>) -> CliResult<(Kind, Vec<String>)> {
    if !first.contains('/') {
        return Ok((objects::parse_kind(first)?, rest));
    }
    let mut kind = None;
    let mut names = Vec::new();
    for r in std::iter::once(first).chain(rest.iter().map(String::as_str)) {
        if !r.contains('/') {
            return Err(CliError::usage(format!("get: {r:?}: give KIND NAME... or KIND/NAME..., not both")));
        }
        let (k, n) = objects::parse_ref(r, &Kind::ALL)?;
        if kind.is_some_and(|known| known != k) {
            return Err(CliError::usage(format!("get: {r:?}: every KIND/NAME must be of one kind")));
        }
        kind = Some(k);
        names.push(n);
    }
    Ok((kind.expect("at least the first"), names))
}

async fn get(client: &Client, kind: Kind, names: Vec<String>, output: Format, a: &GetArgs) -> CliResult {
    if a.watch && names.len() > 1 {
        return Err(CliError::usage("get -w: watch one NAME, or all of KIND (with -l to choose)"));
    }
    let name = (names.len() == 1).then(|| names[0].clone());
    let selector = a.selector.as_str();
    testbus_proto::selector::LabelSelector::parse(selector).map_err(|e| CliError::usage(format!("-l: {e}")))?;
    let sort_by = match &a.sort_by {
        Some(p) => Some(jsonpath::Path::parse(p).map_err(|e| CliError::usage(format!("--sort-by: {e}")))?),
        None => None,
    };
    let (mut objs, rv) = if names.is_empty() {
        objects::list(client, kind, selector, "").await?
    } else {
        let mut objs = Vec::new();
        for n in &names {
            objs.push(objects::get(client, kind, n).await?);
        }
        let rv = objs.last().map(|o| o.meta().resource_version.clone()).unwrap_or_default();
        (objs, rv)
    };
    if let Some(path) = &sort_by {
        let mut keyed: Vec<(serde_json::Value, Object)> = objs.into_iter().map(|o| (o.to_json(), o)).collect();
        keyed.sort_by(|(a, _), (b, _)| {
            jsonpath::compare(path.query(a).first().copied(), path.query(b).first().copied())
        });
        objs = keyed.into_iter().map(|(_, o)| o).collect();
    }
    let asked = if name.is_some() { format::Asked::One } else { format::Asked::Many };
    if !(a.watch && objs.is_empty() && output.is_table()) {
        format::print(&objs, &output, asked, &a.table);
    }
    if !a.watch {
        return Ok(0);
    }
    // What was last shown of each object: an event that changes nothing
    // shown (a host's lease renewal) prints nothing.
    let mut shown: std::collections::HashMap<String, String> =
        objs.iter().map(|o| (o.meta().name.clone(), format::change_key(o, &output))).collect();
    let mut columns = format::Aligned::default();
    let mut printed_header = !objs.is_empty() || a.table.no_headers;
    if output.is_table() {
        let mut rows = vec![format::header_with(kind, &output, &a.table)];
        rows.extend(objs.iter().map(|o| format::row_with(o, &output, &a.table)));
        columns.fit(&rows);
    }
    let fields = name.map(|n| format!("metadata.name={n}")).unwrap_or_default();
    let mut stream = watch_any(client, kind, &rv, selector, &fields).await?;
    while let Some(ev) = stream.next().await {
        let (deleted, o) = ev?;
        let key = format::change_key(&o, &output);
        let name = o.meta().name.clone();
        if deleted {
            shown.remove(&name);
        } else if shown.get(&name) == Some(&key) {
            continue;
        } else {
            shown.insert(name, key);
        }
        if output.is_table() {
            let mut rows = Vec::new();
            if !printed_header {
                rows.push(format::header_with(kind, &output, &a.table));
                printed_header = true;
            }
            rows.push(format::row_with(&o, &output, &a.table));
            columns.fit(&rows);
            for r in &rows {
                print!("{}", columns.line(r));
            }
        } else {
            format::print(&[o], &output, format::Asked::One, &a.table);
        }
    }
    Ok(0)
}

/// `get`'s options besides the kind, name and format.
struct GetArgs {
    selector: String,
    watch: bool,
    sort_by: Option<String>,
    table: format::TableOpts,
}

/// Watches objects of `kind`; each event is (deleted, the object).
async fn watch_any(
    client: &Client,
    kind: Kind,
    rv: &str,
    labels: &str,
    fields: &str,
) -> CliResult<futures::stream::BoxStream<'static, CliResult<(bool, Object)>>> {
    use testbus_client::{ApiResource, EventType};
    async fn w<K: ApiResource>(
        c: &Client,
        rv: &str,
        l: &str,
        f: &str,
    ) -> CliResult<futures::stream::BoxStream<'static, CliResult<(bool, Object)>>> {
        let s = c.api::<K>().watch(rv, l, f).await?;
        Ok(s.filter_map(|e| async move {
            match e {
                Ok(e) if e.kind == EventType::Compacted => {
                    Some(Err(CliError::incomplete("the watch fell behind; run the command again")))
                }
                Ok(e) => {
                    let deleted = e.kind == EventType::Deleted;
                    e.object.map(|o| Ok((deleted, o.into_object())))
                }
                Err(s) => Some(Err(s.into())),
            }
        })
        .boxed())
    }
    match kind {
        Kind::Host => w::<Host>(client, rv, labels, fields).await,
        Kind::Test => w::<testbus_proto::Test>(client, rv, labels, fields).await,
        Kind::Process => w::<testbus_proto::Process>(client, rv, labels, fields).await,
        Kind::HostPool => w::<testbus_proto::HostPool>(client, rv, labels, fields).await,
    }
}

/// What `describe` shows besides the object: of a test, the end of each
/// failed process's stderr; of a process lost with its agent (whose
/// status never got its output's size), the bytes that arrived.
#[derive(Default)]
struct Context {
    tails: Vec<logs::FailedTail>,
    arrived: Option<[u64; 2]>,
}

fn describe(o: &Object, cx: &Context) {
    let m = o.meta();
    println!("Kind:         {}", o.kind());
    println!("Name:         {}", m.name);
    println!("UID:          {}", m.uid);
    println!("Created:      {} ({} ago)", m.creation_timestamp, testbus_proto::time::age(&m.creation_timestamp));
    if !m.labels.is_empty() {
        let l: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Labels:       {}", l.join(", "));
    }
    if !m.deletion_timestamp.is_empty() {
        println!("Deleting:     since {}", m.deletion_timestamp);
    }
    match o {
        Object::Test(t) => {
            let s = t.status();
            println!("Phase:        {}", s.phase);
            if testbus_proto::phase::test_terminal(&s.phase) {
                // How it ended, in words (its Finished condition read
                // "Finished False TimedOut", as if it had not finished).
                let how = if s.message.is_empty() { s.reason.clone() } else { format!("{}: {}", s.reason, s.message) };
                println!("Finished:     {} ({how})", s.phase);
            } else if !s.reason.is_empty() || !s.message.is_empty() {
                println!("Reason:       {} {}", s.reason, s.message);
            }
            if !s.start_time.is_empty() {
                println!("Started:      {}", s.start_time);
            }
            if !s.completion_time.is_empty() {
                println!("Completed:    {}", s.completion_time);
            }
            println!("Hosts:");
            for h in &t.spec().hosts {
                let caps = if h.capabilities.is_empty() { "any".to_string() } else { h.capabilities.join(",") };
                println!("  {} × {} [{}]", h.count.unwrap_or(1), h.role, caps);
            }
            if !s.claims.is_empty() {
                println!("Claims:");
                for (r, h) in &s.claims {
                    println!("  {r:<12} {h}");
                }
            }
            println!("Steps:");
            // The expanded graph: child tests' steps as `<child>.<step>`.
            for ex in testbus_proto::steps::expand(t.spec()) {
                let st = &ex.step;
                let ss = s.steps.iter().find(|x| x.name == st.name);
                println!("  {:<16} {:<10} on {}", st.name, ss.map_or("Waiting", |x| x.phase.as_str()), st.on.join(","));
                for p in ss.map(|x| x.processes.as_slice()).unwrap_or_default() {
                    let end = p.exit_code.map(|c| format!("exit {c}")).unwrap_or_else(|| p.signal.clone());
                    println!("      {:<12} {:<14} {:<10} {end} {}", p.role, p.host, p.phase, p.message);
                    let tail = cx.tails.iter().find(|x| x.step == st.name && x.role == p.role && x.host == p.host);
                    for l in tail.map(|x| x.lines.as_slice()).unwrap_or_default() {
                        println!("        stderr | {l}");
                    }
                }
            }
            // The verdict is said above once the test has ended.
            let ended = testbus_proto::phase::test_terminal(&s.phase);
            let finished = testbus_proto::states::ConditionType::Finished;
            let shown: Vec<_> = s.conditions.iter().filter(|c| !(ended && c.r#type == finished)).cloned().collect();
            print_conditions(&shown);
        }
        Object::Host(h) => {
            let s = h.status();
            println!("Phase:        {}{}", s.phase, if h.spec().unschedulable { " (cordoned)" } else { "" });
            if h.spec().unschedulable {
                let why = &h.spec().unschedulable_reason;
                println!("Cordoned:     {}", if why.is_empty() { "(no reason given)" } else { why });
            }
            if !s.message.is_empty() {
                println!("Message:      {}", s.message);
            }
            if let Some(c) = s.claim.as_ref() {
                println!("Claimed by:   test/{} as {}", c.test, c.role);
            }
            println!("Lease:        renewed {} (every {}s)", s.lease_renew_time, s.lease_duration_seconds);
            println!(
                "Capabilities: {}",
                s.capabilities.iter().chain(&h.spec().capabilities).cloned().collect::<Vec<_>>().join(", ")
            );
            println!("Vars:");
            for (k, v) in &s.vars {
                println!("  {k} = {v}");
            }
            if let Some(f) = &s.facts {
                println!(
                    "Facts:        {} / kernel {} / {} / {} cpus / {} MiB / agent {} / {}",
                    f.os,
                    f.kernel,
                    f.arch,
                    f.cpus,
                    f.memory_bytes >> 20,
                    f.agent_version,
                    f.transport
                );
            }
            print_conditions(&s.conditions);
        }
        Object::HostPool(p) => {
            let (sp, s) = (p.spec(), p.status());
            println!("Provider:     {} {}", sp.provider, if sp.uri.is_empty() { "qemu:///system" } else { &sp.uri });
            println!("Image:        {}", sp.image);
            println!("Capabilities: {}", sp.capabilities.join(", "));
            let max = sp.max.map(|m| m.to_string()).unwrap_or_else(|| "default".into());
            println!(
                "Guests:       min {} max {max}, {} MiB, {} vCPU each",
                sp.min,
                if sp.memory == 0 { 256 } else { sp.memory },
                sp.cpus.max(1)
            );
            let or = |v: &str, default: &str| if v.is_empty() { default.to_string() } else { v.to_string() };
            println!("Timeouts:     idle {}, boot {}", or(&sp.idle_timeout, "10m"), or(&sp.boot_timeout, "3m"));
            if !sp.network.is_empty() {
                println!("Network:      {}", sp.network);
            }
            if !s.message.is_empty() {
                println!("Message:      {}", s.message);
            }
            if !s.guests.is_empty() {
                println!("Guests:");
                for g in &s.guests {
                    println!("  {:<20} {:<10} {:<15} {}", g.name, g.phase, g.address, g.message);
                }
            }
            print_conditions(&s.conditions);
        }
        Object::Process(p) => {
            let (sp, s) = (p.spec(), p.status());
            println!("Test:         {} (step {}, role {})", sp.test, sp.step, sp.role);
            println!("Host:         {}", sp.host_name);
            if !sp.argv.is_empty() {
                println!("Argv:         {:?}", sp.argv);
            } else {
                println!("Script:       {} bytes", sp.script.len());
            }
            println!("Phase:        {}", s.phase);
            if let Some(c) = s.exit_code {
                println!("Exit code:    {c}");
            }
            if !s.signal.is_empty() {
                println!("Signal:       {}", s.signal);
            }
            if !s.message.is_empty() {
                println!("Message:      {} ({})", s.message, s.reason);
            }
            let kept = |truncated: bool| if truncated { " (truncated: only the first part is kept)" } else { "" };
            // A lost process's status was written without its agent, which
            // alone knew the sizes: what the server holds is said instead.
            let (out, err, whence) = match cx.arrived {
                Some([out, err]) => (out, err, " (what arrived before it was lost)"),
                None => (s.stdout_bytes, s.stderr_bytes, ""),
            };
            println!(
                "Output:       {out} bytes stdout{}, {err} bytes stderr{}{whence}",
                kept(s.stdout_truncated),
                kept(s.stderr_truncated)
            );
        }
    }
    print_events(o);
}

/// How many of an object's latest events `describe` shows.
const EVENTS_SHOWN: usize = 12;

/// `Events:` as kubectl shows them: type, reason, age, message.
fn print_events(o: &Object) {
    let evs = events::of(o);
    if evs.is_empty() {
        return;
    }
    println!("Events:");
    let mut rows = vec![vec!["  TYPE".to_string(), "REASON".into(), "AGE".into(), "MESSAGE".into()]];
    for e in evs.iter().skip(evs.len().saturating_sub(EVENTS_SHOWN)) {
        rows.push(vec![
            format!("  {}", if e.warning { "Warning" } else { "Normal" }),
            e.reason.clone(),
            testbus_proto::time::age(&e.time),
            e.message.clone(),
        ]);
    }
    print!("{}", format::table(&rows));
}

/// A test with nothing to run that does not say it is driven from
/// outside: it would sit Running 0/0 holding its hosts until its timeout.
fn open_warning(t: &testbus_proto::Test) -> Option<String> {
    let sp = t.spec();
    if !sp.steps.is_empty() || !sp.tests.is_empty() || sp.open {
        return None;
    }
    let timeout = if sp.timeout.is_empty() { "1h" } else { sp.timeout.as_str() };
    Some(format!(
        "test/{} has no steps: it holds its hosts until `testbusctl finish {}` or its timeout ({timeout}); \
         set spec.open: true if that is what you mean",
        t.name(),
        t.name()
    ))
}

/// `describe`'s Conditions section (none when there are none).
fn print_conditions(conditions: &[testbus_proto::Condition]) {
    if !conditions.is_empty() {
        println!("Conditions:");
        for c in conditions {
            println!("  {:<10} {:<6} {:<14} {}", c.r#type, c.status, c.reason, c.message);
        }
    }
}

/// What `cordon` and `uncordon` do to a host.
enum Cordon {
    /// Unschedulable, saying why.
    On { reason: String },
    /// Schedulable again; failures before now no longer count towards
    /// quarantine.
    Off,
}

async fn set_cordon(client: &Client, host: &str, to: Cordon) -> CliResult {
    let api = client.api::<Host>();
    let on = matches!(to, Cordon::On { .. });
    loop {
        let mut h = api.get(host).await?;
        h.spec_mut().unschedulable = on;
        h.spec_mut().unschedulable_reason = match &to {
            Cordon::On { reason } => reason.clone(),
            Cordon::Off => String::new(),
        };
        if !on {
            // Failures before now no longer count towards quarantine.
            h.meta_mut().annotations.insert("testbus.io/healthy-since".into(), testbus_proto::time::now());
        }
        match api.update(h).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::Aborted => continue,
            Err(s) => return Err(s.into()),
        }
    }
    println!("host/{host} {}", if on { "cordoned" } else { "uncordoned" });
    Ok(0)
}

async fn dispatch(cli: Cli) -> CliResult {
    let server = cli.server.clone();
    match cli.cmd {
        Cmd::Apply { files, wait, timeout } => {
            // Invalid input is refused before any connection is made.
            let objs = read_manifests(&files)?;
            apply(&connect(&server).await?, objs, wait, timeout).await
        }
        Cmd::Get { kind, names, output, selector, watch, sort_by, no_headers, show_labels, label_columns } => {
            let (kind, names) = get_targets(&kind, names)?;
            let table = format::TableOpts { no_headers, show_labels, label_columns };
            get(&connect(&server).await?, kind, names, output, &GetArgs { selector, watch, sort_by, table }).await
        }
        Cmd::Describe { kind, name } => {
            let (kind, name) = match name {
                Some(n) if !kind.contains('/') => (objects::parse_kind(&kind)?, n),
                None if kind.contains('/') => objects::parse_ref(&kind, &Kind::ALL)?,
                _ => return Err(CliError::usage("describe: give KIND NAME or KIND/NAME")),
            };
            let client = connect(&server).await?;
            let o = objects::get(&client, kind, &name).await?;
            let mut cx = Context::default();
            match &o {
                Object::Test(t) => cx.tails = logs::failed_tails(&client, t, None).await?,
                Object::Process(p) if p.status().phase == ProcessPhase::Lost => {
                    cx.arrived = Some(logs::output_sizes(&client, p.name()).await?);
                }
                _ => {}
            }
            describe(&o, &cx);
            Ok(0)
        }
        Cmd::Delete { kind, names, selector, all } => {
            let all_kinds = Kind::ALL;
            // What to delete: KIND/NAME refs, KIND NAME..., or KIND with -l
            // or --all (exactly one way).
            let mut targets: Vec<(Kind, String)> = Vec::new();
            let pick = match (kind.contains('/'), names.is_empty(), &selector, all) {
                (true, _, None, false) => {
                    for r in std::iter::once(&kind).chain(&names) {
                        targets.push(objects::parse_ref(r, &all_kinds)?);
                    }
                    None
                }
                (false, false, None, false) => {
                    let k = objects::parse_kind(&kind)?;
                    targets.extend(names.iter().map(|n| (k, n.clone())));
                    None
                }
                (false, true, Some(sel), false) => {
                    testbus_proto::selector::LabelSelector::parse(sel)
                        .map_err(|e| CliError::usage(format!("-l: {e}")))?;
                    Some((objects::parse_kind(&kind)?, sel.clone()))
                }
                (false, true, None, true) => Some((objects::parse_kind(&kind)?, String::new())),
                _ => {
                    return Err(CliError::usage(
                        "delete: give KIND/NAME..., KIND NAME..., KIND -l SELECTOR or KIND --all (one of them)",
                    ))
                }
            };
            let client = connect(&server).await?;
            if let Some((k, sel)) = pick {
                let (objs, _) = objects::list(&client, k, &sel, "").await?;
                targets.extend(objs.iter().map(|o| (k, o.meta().name.clone())));
                if targets.is_empty() {
                    eprintln!("No resources found.");
                }
            }
            let mut code = 0;
            for (k, n) in targets {
                match objects::delete(&client, k, &n).await {
                    Ok(()) => println!("{}/{n} deleted", format::kind_slug(k)),
                    Err(e) => {
                        eprintln!("testbusctl: {}", e.message);
                        code = e.code;
                    }
                }
            }
            Ok(code)
        }
        Cmd::Logs { target, role, step, follow, tail, since, since_time, timestamps } => {
            let (kind, name) = match target.contains('/') {
                true => objects::parse_ref(&target, &[Kind::Test, Kind::Process])?,
                false => (Kind::Test, target.clone()),
            };
            let client = connect(&server).await?;
            let follow = if follow { logs::Follow::Yes } else { logs::Follow::No };
            let since_unix_ms = since
                .map(|d| std::time::SystemTime::now().checked_sub(d).unwrap_or(std::time::UNIX_EPOCH))
                .or(since_time)
                .map(testbus_proto::time::unix_ms);
            let lines = logs::Lines { tail, since_unix_ms, timestamps };
            match kind {
                Kind::Process => logs::copy_process(&client, &name, None, follow, &lines).await?,
                _ => {
                    let sel = logs::Select { role, step, lines };
                    logs::test_logs(&client, &name, &sel, follow, logs::Prefix::Always).await?
                }
            }
            Ok(0)
        }
        Cmd::Wait { target, timeout } if target.starts_with("process/") || target.starts_with("processes/") => {
            let (_, name) = objects::parse_ref(&target, &[Kind::Process])?;
            script::wait(&connect(&server).await?, &name, timeout).await
        }
        Cmd::Wait { target, timeout } => {
            let name = objects::test_name(&target)?;
            progress::wait(&connect(&server).await?, &[name], timeout, progress::Progress::Quiet).await
        }
        Cmd::Rerun { test, failed_only, pool, wait } => {
            let (client, test) = (connect(&server).await?, objects::test_name(&test)?);
            let req = testbus_proto::RerunRequest { test: test.clone(), failed_only, pool: pool.unwrap_or_default() };
            let made = client.tests().rerun(req).await?.into_inner();
            println!("test/{} created (a rerun of test/{test})", made.name());
            if !wait {
                return Ok(0);
            }
            progress::wait(&client, &[made.name().to_string()], None, progress::Progress::Shown).await
        }
        Cmd::Kill { target, grace, no_wait } => {
            let (_, name) = objects::parse_ref(&target, &[Kind::Process])?;
            script::kill(&connect(&server).await?, &name, grace, !no_wait).await
        }
        Cmd::Cordon { host, reason } => set_cordon(&connect(&server).await?, &host, Cordon::On { reason }).await,
        Cmd::Uncordon { host } => set_cordon(&connect(&server).await?, &host, Cordon::Off).await,
        Cmd::Results { target, output } => {
            let name = objects::test_name(&target)?;
            let client = connect(&server).await?;
            let t = client.api::<testbus_proto::Test>().get(&name).await?;
            let outputs = match output {
                results::ReportFormat::Junit => results::outputs(&client, &t).await?,
                _ => Default::default(),
            };
            print!("{}", results::render(&t, output, &outputs));
            Ok(0)
        }
        Cmd::Create { what: CreateCmd::Test { name, claims, env, timeout, wait_claimed } } => {
            let claims = claims.iter().map(|c| script::parse_claim(c)).collect::<CliResult<Vec<_>>>()?;
            let env = parse_env("--env", &env)?;
            script::create_test(&connect(&server).await?, &name, claims, env, timeout, wait_claimed).await
        }
        Cmd::Exec { test, roles, env, stdin, timeout, detach, argv } => {
            let env = parse_env("--env", &env)?;
            let stdin = match stdin.as_deref() {
                None => None,
                Some("-") => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).map_err(|e| CliError::usage(format!("--stdin -: {e}")))?;
                    Some(s)
                }
                Some(f) => Some(std::fs::read_to_string(f).map_err(|e| CliError::usage(format!("--stdin {f}: {e}")))?),
            };
            let a = script::ExecArgs { argv, env, stdin, timeout, files: vec![] };
            let (client, test) = (connect(&server).await?, objects::test_name(&test)?);
            if detach {
                for p in script::start_processes(&client, &test, &roles, a).await? {
                    println!("process/{}", p.name());
                }
                return Ok(0);
            }
            script::exec(&client, &test, &roles, a).await
        }
        Cmd::Cp { src, dest } => script::cp(&connect(&server).await?, &src, &dest).await,
        Cmd::Getenv { test, name } => {
            script::getenv(&connect(&server).await?, &objects::test_name(&test)?, &name).await
        }
        Cmd::Setenv { test, vars } => {
            let env = parse_env("setenv", &vars)?;
            script::setenv(&connect(&server).await?, &objects::test_name(&test)?, env).await
        }
        Cmd::Result { test, path, outcome, message } => {
            script::result(&connect(&server).await?, &objects::test_name(&test)?, &path, &outcome, message).await
        }
        Cmd::Finish { test, failed } => {
            let how = if failed { script::Finish::Failed } else { script::Finish::AsResults };
            script::finish(&connect(&server).await?, &objects::test_name(&test)?, how).await
        }
        Cmd::Cancel { test, message } => {
            script::cancel(&connect(&server).await?, &objects::test_name(&test)?, message.unwrap_or_default()).await
        }
        Cmd::Snapshot { action, host, name } => {
            use testbus_proto::pool::SnapshotAction;
            let name = match (action, name) {
                (SnapshotAction::List, None) => String::new(),
                (SnapshotAction::List, Some(_)) => return Err(CliError::usage("snapshot list: takes HOST only")),
                (_, Some(n)) => n,
                (a, None) => return Err(CliError::usage(format!("snapshot {}: give HOST NAME", a.as_str()))),
            };
            let client = connect(&server).await?;
            let req = testbus_proto::SnapshotRequest {
                host: host.clone(),
                action: action.as_str().into(),
                name: name.clone(),
            };
            let r = testbus_proto::host_pools_client::HostPoolsClient::new(client.channel()).snapshot(req).await?;
            match action {
                SnapshotAction::List => {
                    for s in r.into_inner().snapshots {
                        println!("{s}");
                    }
                }
                SnapshotAction::Revert => println!("host/{host} reverted to snapshot {name}"),
                SnapshotAction::Create | SnapshotAction::Delete => {
                    println!("snapshot {name} of host/{host} {}d", action.as_str())
                }
            }
            Ok(0)
        }
        Cmd::Completion { shell } => {
            let script = complete::registration(&shell).map_err(|e| CliError::failed(e.to_string()))?;
            print!("{}", String::from_utf8_lossy(&script));
            Ok(0)
        }
        Cmd::Sync { name, roles, timeout } => intest::sync(name, roles, timeout).await,
        Cmd::Send { key, value } => intest::send(key, value).await,
        Cmd::Recv { key, from, timeout } => intest::recv(key, from, timeout).await,
        Cmd::Run(cmd) => run::run(&connect(&server).await?, cmd.into_args()?).await,
    }
}

/// `run`'s flags, as given.
#[derive(clap::Args)]
struct RunCmd {
    /// A capability the hosts must have (repeatable).
    #[arg(long = "capability", value_name = "CAP")]
    capabilities: Vec<String>,
    /// Run on this host.
    #[arg(long)]
    host: Option<String>,
    /// Only on hosts whose labels match this selector, e.g. 'rack in (a,b),!flaky'.
    #[arg(short = 'l', long = "selector")]
    selector: Option<String>,
    /// How many hosts to run on.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// An extra environment variable, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Stop the command after this long (exit 3).
    #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
    timeout: Option<String>,
    /// Give up waiting for hosts after this long (exit 3). Default:
    /// --timeout when given, else 1h.
    #[arg(long, value_parser = parse_duration_str, value_name = "DURATION")]
    pending_timeout: Option<String>,
    /// Give the command this stdin (read to its end first).
    #[arg(short = 'i', long = "stdin")]
    stdin: bool,
    /// Delete the test this long after it ends; "never" keeps it.
    #[arg(long, default_value = "1h", value_parser = parse_ttl, value_name = "DURATION|never")]
    ttl_after_finished: String,
    /// The command and its arguments, after --.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

impl RunCmd {
    fn into_args(self) -> CliResult<run::RunArgs> {
        if self.count == 0 {
            return Err(CliError::usage("--count: must be >= 1"));
        }
        Ok(run::RunArgs {
            env: parse_env("--env", &self.env)?,
            selector: self.selector.unwrap_or_default(),
            // A command bounded in time is bounded in its wait for hosts
            // too (it waited an hour for a selector nothing matched).
            pending_timeout: self.pending_timeout.or_else(|| self.timeout.clone()),
            capabilities: self.capabilities,
            host: self.host,
            count: self.count,
            timeout: self.timeout,
            stdin: self.stdin,
            ttl_after_finished: self.ttl_after_finished,
            argv: self.argv,
        })
    }
}

fn main() {
    complete::answer_if_asked::<Cli>();
    let cli = Cli::parse();
    let server = config::server(cli.server.as_deref());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testbusctl: cannot start: {e}");
            std::process::exit(error::FAILED);
        }
    };
    let code = match rt.block_on(dispatch(cli)) {
        Ok(c) => c,
        Err(e) => {
            // The connection failed: say so plainly when the address
            // answers, but not in HTTP/2 (how a failed call looks varies
            // with timing).
            let silent = e.message.contains("said nothing");
            let answer =
                (e.code == error::UNREACHABLE && !silent).then(|| error::answers_without_http2(&server)).flatten();
            match answer {
                Some(error::Answer::Tls) => {
                    let tls = server.replacen("http://", "https://", 1);
                    eprintln!("testbusctl: {server} speaks TLS: use {tls} (and a config from `user create`)");
                }
                Some(error::Answer::Text(answer)) => {
                    eprintln!("testbusctl: {server} {}: it answered {answer:?}", error::NOT_TESTBUS);
                }
                _ if e.message.starts_with(error::NOT_TESTBUS) => eprintln!("testbusctl: {server} {}", e.message),
                _ => match e.message.strip_prefix("cannot reach the server: ") {
                    Some(why) => eprintln!("testbusctl: cannot reach the server at {server}: {why}"),
                    None => eprintln!("testbusctl: {}", e.message),
                },
            }
            e.code
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` documents every flag and argument of every command.
    #[test]
    fn every_argument_is_documented() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "testbusctl", &mut missing);
        assert!(missing.is_empty(), "undocumented: {missing:#?}");
        Cli::command().debug_assert();
    }

    /// README's command-line section and `--help` agree: every command and
    /// every flag is in the README, and every flag the README's table gives
    /// a command exists.
    #[test]
    fn the_readme_matches_help() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let section = readme.split("## Command line").nth(1).unwrap().split("\n## ").next().unwrap();
        let cli = Cli::command();
        let mut problems = Vec::new();
        for sub in cli.get_subcommands().filter(|c| c.get_name() != "help") {
            let name = sub.get_name();
            if !readme.contains(&format!("testbusctl {name}")) && !section.contains(&format!("`{name}`")) {
                problems.push(format!("command {name} is not in the README"));
            }
            let longs: Vec<&str> = sub.get_arguments().filter_map(|a| a.get_long()).collect();
            for a in sub.get_arguments().filter(|a| !matches!(a.get_long(), None | Some("help" | "server"))) {
                let long = format!("--{}", a.get_long().unwrap_or_default());
                // `-w` as a word: `[-w]`, `-w ` or `` `-w` ``.
                let short_used = a.get_short().is_some_and(|c| {
                    let s = format!("-{c}");
                    readme.match_indices(&s).any(|(i, _)| {
                        let before = readme[..i].chars().next_back().unwrap_or(' ');
                        let after = readme[i + s.len()..].chars().next().unwrap_or(' ');
                        " [`".contains(before) && !after.is_alphanumeric() && after != '-'
                    })
                });
                if !readme.contains(&long) && !short_used {
                    problems.push(format!("{name} {long} is not in the README"));
                }
            }
            // Flags the table's rows for this command name.
            for row in section.lines().filter(|r| r.starts_with(&format!("| `testbusctl {name} "))) {
                let usage = row.split('|').nth(1).unwrap_or_default();
                for word in usage.split(|c: char| c.is_whitespace() || "[]`,|".contains(c)) {
                    if let Some(flag) = word.strip_prefix("--").filter(|f| !f.is_empty()) {
                        let flag = flag.split('=').next().unwrap_or_default();
                        if !longs.contains(&flag) {
                            problems.push(format!("README: {name} has no --{flag}"));
                        }
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
