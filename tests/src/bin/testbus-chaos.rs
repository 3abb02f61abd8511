//! `hack/chaos`: claims under faults, checked as a property (see
//! `testbus_tests::chaos`). Needs root: every agent, replica and etcd
//! member runs in a network namespace of its own.
#![forbid(unsafe_code)]
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use testbus_tests::chaos;

#[derive(Parser)]
#[command(about = "Run a random multi-role workload over a replicated testbus while a nemesis kills, pauses and \
                   partitions its parts; then check the history (no host held twice, no process run twice, every \
                   test ended, no acknowledged create lost, no result changed)")]
struct Args {
    /// Minutes of faults.
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<u64>,
    /// Seconds of faults (instead of --minutes; default 120).
    #[arg(long)]
    seconds: Option<u64>,
    /// The seed of the workload and the nemesis (default: from the clock;
    /// printed either way, to replay a run).
    #[arg(long)]
    seed: Option<u64>,
    /// Agents, each in a network namespace of its own (6 to 150: a test
    /// claims up to 6 hosts).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(6..=150))]
    agents: u64,
    /// Tests kept in flight.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=100))]
    in_flight: u64,
    /// The longest a fault is held, in seconds (longer than the lease plus
    /// its grace loses hosts).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=120))]
    max_hold: u64,
    /// The agents' lease and the control plane's grace, e.g. `2s,1s`
    /// (default: theirs, 10s and 5s).
    #[arg(long)]
    lease: Option<String>,
    /// Where the history, the report and (on a failure) the logs go
    /// (default: target/chaos/SEED).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let a = Args::parse();
    if !testbus_tests::is_root() {
        eprintln!("hack/chaos: needs root (agents, replicas and etcd members run in network namespaces)");
        return std::process::ExitCode::from(2);
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let secs = a.minutes.map(|m| m * 60).or(a.seconds).unwrap_or(120);
    let out = a.out.unwrap_or_else(|| testbus_tests::repo_root().join("target/chaos").join(seed.to_string()));
    let opts = chaos::Options {
        seed,
        faults_for: Duration::from_secs(secs),
        max_hold: Duration::from_secs(a.max_hold),
        agents: a.agents as usize,
        in_flight: a.in_flight as usize,
        bound: Duration::from_secs(240),
        lease: match a.lease.as_deref().map(|l| l.split_once(',')) {
            None => None,
            Some(Some((l, g))) => Some((l.to_string(), g.to_string())),
            Some(None) => {
                eprintln!("hack/chaos: --lease: expected LEASE,GRACE (e.g. 2s,1s)");
                return std::process::ExitCode::from(2);
            }
        },
        out,
    };
    eprintln!("hack/chaos: seed {seed}, {secs} s of faults (replay: hack/chaos --seed {seed} --seconds {secs})");
    // Ctrl-C or SIGTERM drops the run, and with it the cluster: every
    // process it started (paused ones too) is killed and its namespaces
    // deleted.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let report = tokio::select! {
        r = chaos::run(&opts) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("hack/chaos: interrupted; the cluster is torn down");
            return std::process::ExitCode::from(130);
        }
        _ = term.recv() => {
            eprintln!("hack/chaos: terminated; the cluster is torn down");
            return std::process::ExitCode::from(143);
        }
    };
    print!("{}", report.markdown(&opts));
    if report.clean() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
