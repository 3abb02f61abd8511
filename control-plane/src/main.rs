#![forbid(unsafe_code)]
use clap::Parser;
use std::path::PathBuf;
use testbus_control_plane::server::{self, Listen};

/// mimalloc, as in the agent (see its `main.rs` for why, and why
/// `no_thp`): every request decodes, clones and encodes objects made of
/// many small allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The testbus control plane: API server, store, and controllers.
#[derive(Parser, Debug)]
#[command(name = "testbus-control-plane", version)]
struct Args {
    /// Address to serve on: HOST:PORT or unix:/path. Repeatable. A unix
    /// socket is always offered at DATA_DIR/api.sock as well.
    #[arg(long, default_value = "127.0.0.1:7780")]
    listen: Vec<Listen>,
    /// Where the store file and process output live.
    #[arg(long, env = "TESTBUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// "embedded" (one file in the data dir) or
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (default prefix /testbus).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Serve without TLS on non-loopback addresses (development only).
    #[arg(long)]
    insecure: bool,
    /// Do not run the controllers in this process.
    #[arg(long)]
    no_controllers: bool,
    /// Bytes kept of each output stream (stdout, stderr) of a process; the
    /// rest is counted, not kept, and marked as truncated.
    #[arg(long, default_value_t = testbus_control_plane::output::DEFAULT_LIMIT)]
    max_output_bytes: u64,
    /// Refuse writes while less than this many bytes are free in the data
    /// dir (reads go on).
    #[arg(long, default_value_t = 64 << 20)]
    min_free_bytes: u64,
    /// How long past its lease a host is still considered Ready.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    lease_grace: std::time::Duration,
    /// With a shared store: the address other replicas reach this one at to
    /// copy blobs (http://HOST:PORT or unix:/path). Default: the first
    /// --listen address with a specific IP, else the data dir's socket.
    #[arg(long)]
    advertise: Option<String>,
    /// Infrastructure failures in a row (processes lost, or failed before
    /// they ran) after which a host is quarantined: made unschedulable until
    /// `testbusctl uncordon`. 0: never.
    #[arg(long, default_value_t = 3)]
    quarantine_after: u32,
    /// How long a connection (TCP or the local socket) may take to start
    /// HTTP/2 before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: std::time::Duration,
    /// Most TCP connections served for one peer address at once (a relay
    /// host carries a connection or two per guest behind it).
    #[arg(long, default_value_t = 1024)]
    max_connections_per_peer: usize,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    testbus_proto::duration::parse(s).map_err(|e| e.to_string())
}

fn default_data_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/lib/testbus")
    } else {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into());
        home.join(".local/share/testbus")
    }
}

/// Root chooses the system data dir (the uid of our own /proc entry).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

#[tokio::main]
async fn main() {
    testbus_telemetry::init_logging();
    let args = Args::parse();
    let cfg = server::Config {
        listen: args.listen,
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        store: args.store,
        insecure: args.insecure,
        controllers: (!args.no_controllers).then_some(testbus_controllers::Config {
            lease_grace: args.lease_grace,
            quarantine_after: args.quarantine_after,
            pools: None, // filled in by the server, which knows its data dir
        }),
        watch_cache: 100_000,
        output_limit: args.max_output_bytes,
        min_free_bytes: args.min_free_bytes,
        advertise: args.advertise,
        handshake_timeout: args.handshake_timeout,
        max_connections_per_peer: args.max_connections_per_peer,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        on_signal.cancel();
    });
    if let Err(e) = server::run(cfg, shutdown).await {
        eprintln!("testbus-control-plane: {e:#}");
        std::process::exit(1);
    }
}
