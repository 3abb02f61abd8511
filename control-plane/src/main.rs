#![deny(unsafe_code)]
use clap::Parser;
use std::path::PathBuf;
use testbus_control_plane::server::{self, Listen};

/// mimalloc, as in the agent (see its `main.rs` for why, and why
/// `no_thp`): every request decodes, clones and encodes objects made of
/// many small allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`; the bindings name
/// no constant for it): how long freed pages stay committed before they
/// are given back to the system, 1,000 ms by default in mimalloc 3.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system at once. With the default delay a
/// page is purged only when the thread that freed it allocates again, and
/// idle tokio workers do not: after 5,000 tests were created and deleted
/// the control plane stayed at 195 MiB, 107 MiB with this (idle: 31 MiB).
#[allow(unsafe_code)]
fn give_freed_memory_back() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option
    // table (an atomic); the option and its value are valid for it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// The testbus control plane: API server, store, and controllers.
///
/// Serves with TLS on every TCP listener (its CA and certificate are made
/// in DATA_DIR/pki on first start); the unix socket DATA_DIR/api.sock is
/// plain and admin. Credentials are handed out by the subcommands.
#[derive(Parser, Debug)]
#[command(name = "testbus-control-plane", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Users (testbusctl's credentials).
    #[command(subcommand)]
    User(UserCommand),
    /// Join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Agents' certificates.
    #[command(subcommand)]
    Agent(AgentCommand),
}

#[derive(clap::Subcommand, Debug)]
enum UserCommand {
    /// Writes a testbusctl config file (server, CA, a certificate for NAME
    /// and its key), signed by the CA in the data dir. Works whether the
    /// control plane runs or not.
    #[command(
        after_help = "Examples:\n  testbus-control-plane user create alice --role viewer --out alice.yaml\n  TESTBUS_CONFIG=alice.yaml testbusctl get hosts"
    )]
    Create {
        /// The user's name: lower-case letters, digits and '-' (a DNS label).
        name: String,
        /// admin: everything; viewer: read everything, write nothing.
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        /// Where to write it (default: stdout); an existing file only with
        /// --force.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite --out.
        #[arg(long)]
        force: bool,
        /// The address the config names (https://HOST:PORT, or several
        /// comma-separated). Default: the one the control plane with this
        /// data dir last served TLS on, else https://127.0.0.1:7780.
        #[arg(long)]
        server: Option<String>,
        /// How long the certificate is valid.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        ttl: std::time::Duration,
        #[arg(long, env = "TESTBUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Refuses every certificate of user NAME issued until now (a host of
    /// the same name is not touched: `agent revoke` names hosts). Asks the
    /// running control plane.
    Revoke {
        name: String,
        #[arg(long, env = "TESTBUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Prints a join token: `testbus-agent --server https://… --join-token
    /// TOKEN` needs nothing else (the token pins this control plane's CA).
    /// Asks the running control plane, through its socket in the data dir.
    Create {
        /// How long it may be used to join (1s to 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Only guests of this HostPool (hosts named POOL-…) may join with it.
        #[arg(long, conflicts_with = "viewer")]
        pool: Option<String>,
        /// A token that logs a browser in to the dashboard (read only)
        /// instead of one an agent joins with.
        #[arg(long)]
        viewer: bool,
        /// A token that logs a browser in to the dashboard with an admin's
        /// rights: its pages then cancel and rerun tests.
        #[arg(long, conflicts_with_all = ["viewer", "pool", "uses"])]
        admin: bool,
        /// How many agents may join with it (default: any number until it
        /// expires).
        #[arg(long, conflicts_with = "viewer", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        uses: Option<u32>,
        #[arg(long, env = "TESTBUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Deletes a token (join or viewer): nothing joins or logs in with it
    /// again. TOKEN is the token as `token create` printed it, or its id
    /// (its third dot-separated part). Certificates it gave are not
    /// touched: `agent revoke` them.
    Revoke {
        token: String,
        #[arg(long, env = "TESTBUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AgentCommand {
    /// Refuses every certificate of host NAME issued until now (its agent
    /// must join again with a new token: the tokens made before this do
    /// not join it again). A user of the same name is not touched. Asks
    /// the running control plane.
    Revoke {
        name: String,
        #[arg(long, env = "TESTBUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct Serve {
    /// How log lines are written on stderr: text, or json (one object per
    /// line: timestamp, level, target, message and the event's fields).
    #[arg(long, env = "TESTBUS_LOG_FORMAT", default_value = "text")]
    log_format: testbus_telemetry::LogFormat,
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
    /// Serve without TLS (development only; loopback addresses only).
    #[arg(long)]
    insecure: bool,
    /// The server's certificate chain (PEM); default: issued at start by
    /// the CA in DATA_DIR/pki, for every --listen and --advertise address.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA client certificates are checked against (PEM); default: the
    /// CA in DATA_DIR/pki.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// How long an agent's certificate is valid; agents renew at two
    /// thirds of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    agent_cert_ttl: std::time::Duration,
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
    /// How many times a test is tried again on other hosts when a step
    /// fails for the infrastructure's sake (its host lost, its agent gone
    /// without a keeper, a spawn failure other than its command), for steps
    /// that do not say (`retry: {infrastructure: N}`). Test failures (a
    /// non-zero exit, a missing command, a timeout) are never retried.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10))]
    infrastructure_retries: u32,
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
    /// (Default 1024, and at most a quarter of the open-files limit; one
    /// given here is kept up to --max-connections.)
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// Most TCP connections served at once; one more is answered with
    /// UNAVAILABLE saying so, and closed. 0: three quarters of the
    /// open-files limit (raised to its hard limit at start).
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Where podman pools' containers and images are kept (podman's
    /// `--root DIR/root --runroot DIR/run`). Default: podman's own storage.
    #[arg(long, value_name = "DIR")]
    podman_storage: Option<PathBuf>,
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

/// The running control plane's socket in `data_dir`.
async fn local_client(data_dir: Option<PathBuf>) -> anyhow::Result<testbus_client::Client> {
    let dir = data_dir.unwrap_or_else(default_data_dir);
    let sock = dir.join("api.sock");
    // A control plane started a moment ago (`testbus-control-plane &` in a
    // script) is waited for, a few seconds at most.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match testbus_client::Client::connect(&format!("unix:{}", sock.display())).await {
            Ok(c) => return Ok(c),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(anyhow::anyhow!("{e}\n(is the control plane with --data-dir {} running?)", dir.display()))
            }
        }
    }
}

async fn command(cmd: Command) -> anyhow::Result<()> {
    use anyhow::Context;
    match cmd {
        Command::User(UserCommand::Create { name, role, out, force, server, ttl, data_dir }) => {
            testbus_proto::validate::dns_label(&name).map_err(|e| anyhow::anyhow!("NAME {name:?}: {e}"))?;
            if let Some(path) = out.as_ref().filter(|p| p.exists() && !force) {
                anyhow::bail!("--out {}: exists; --force overwrites it", path.display());
            }
            let data_dir = data_dir.unwrap_or_else(default_data_dir);
            let server = server.unwrap_or_else(|| {
                std::fs::read_to_string(data_dir.join(testbus_control_plane::server::ADVERTISE_FILE))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "https://127.0.0.1:7780".into())
            });
            let dir = data_dir.join("pki");
            let ca = testbus_pki::Ca::load(&dir)?.with_context(|| {
                format!("no CA in {}: start the control plane once with this --data-dir", dir.display())
            })?;
            let role: testbus_pki::Role = role.parse().map_err(anyhow::Error::msg)?;
            let issued = ca.issue(&name, role, ttl)?;
            let file = testbus_pki::ClientFile {
                server,
                certificate_authority: ca.cert_pem().to_string(),
                client_certificate: issued.cert,
                client_key: issued.key,
            };
            match out {
                Some(path) => {
                    file.save(&path)?;
                    eprintln!(
                        "wrote {} ({role} {name}); use it with TESTBUS_CONFIG={}",
                        path.display(),
                        path.display()
                    );
                }
                None => print!("{}", serde_norway::to_string(&file)?),
            }
        }
        Command::User(UserCommand::Revoke { name, data_dir }) => {
            let client = local_client(data_dir).await?;
            client
                .auth()
                .revoke(testbus_proto::RevokeRequest { host_name: String::new(), user_name: name.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            eprintln!("revoked every certificate of user {name} issued until now");
        }
        Command::Token(TokenCommand::Revoke { token, data_dir }) => {
            let client = local_client(data_dir).await?;
            client
                .auth()
                .revoke_token(testbus_proto::RevokeTokenRequest { token })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            eprintln!("the token is revoked");
        }
        Command::Token(TokenCommand::Create { ttl, pool, viewer, admin, uses, data_dir }) => {
            let client = local_client(data_dir).await?;
            let r = client
                .auth()
                .create_token(testbus_proto::CreateTokenRequest {
                    ttl,
                    pool: pool.unwrap_or_default(),
                    host_name: String::new(),
                    role: match (viewer, admin) {
                        (true, _) => "viewer".into(),
                        (_, true) => "admin".into(),
                        _ => String::new(),
                    },
                    uses: uses.unwrap_or(0),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("{}", r.token);
            eprintln!("valid until {}", r.expires);
        }
        Command::Agent(AgentCommand::Revoke { name, data_dir }) => {
            let client = local_client(data_dir).await?;
            client
                .auth()
                .revoke(testbus_proto::RevokeRequest { host_name: name.clone(), user_name: String::new() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            eprintln!("revoked every certificate of host {name} issued until now");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    give_freed_memory_back();
    let Args { command: cmd, serve: args } = Args::parse();
    testbus_telemetry::init_logging(args.log_format);
    if let Some(cmd) = cmd {
        if let Err(e) = command(cmd).await {
            eprintln!("testbus-control-plane: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cfg = server::Config {
        listen: args.listen,
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        store: args.store,
        insecure: args.insecure,
        controllers: (!args.no_controllers).then_some(testbus_controllers::Config {
            lease_grace: args.lease_grace,
            quarantine_after: args.quarantine_after,
            pools: None, // filled in by the server, which knows its data dir
            infrastructure_retries: args.infrastructure_retries,
        }),
        watch_cache: 100_000,
        output_limit: args.max_output_bytes,
        min_free_bytes: args.min_free_bytes,
        advertise: args.advertise,
        handshake_timeout: args.handshake_timeout,
        max_connections_per_peer: args.max_connections_per_peer,
        max_connections: args.max_connections,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        client_ca: args.client_ca,
        agent_cert_ttl: args.agent_cert_ttl,
        podman_storage: args.podman_storage,
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

#[cfg(test)]
mod allocator_tests {
    /// The option set is purge_delay: its default is 1,000 (ms, mimalloc
    /// 3's `options.c`), and the option after it (use_numa_nodes, 16 in the
    /// bindings) defaults to 0.
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: mi_option_get reads an integer from mimalloc's table.
        let (delay, next) = unsafe {
            (libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY), libmimalloc_sys::mi_option_get(16))
        };
        assert_eq!(delay, 1000, "mimalloc's default purge delay");
        assert_eq!(next, 0, "use_numa_nodes, after it, defaults to 0");
        super::give_freed_memory_back();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) }, 0);
    }
}
