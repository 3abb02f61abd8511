//! testbus-relay: carries client connections from a downstream endpoint,
//! where clients connect, toward the control plane upstream. Between two
//! relays, every client connection is multiplexed over one link (a serial
//! line, vsock, SSH, stdio or a socket); on a serial line the link is made
//! reliable by `ReliableLink`. The relay knows nothing of gRPC: it moves
//! bytes, with half-close, so TLS stays end to end.
//!
//! Ownership: each link incarnation is one task (the multiplexer) plus, on
//! serial, the link's own tasks; when the line fails they all end, every
//! client stream over them closes, and a supervisor loop builds the next
//! incarnation. Clients reconnect by themselves (gRPC channels do).
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use testbus_relay::endpoint::Endpoint;
use testbus_relay::{link, mux};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

#[derive(Parser, Debug)]
#[command(name = "testbus-relay", version, about = "Carry client connections toward the control plane")]
struct Args {
    /// How log lines are written on stderr: text, or json (one object per
    /// line: timestamp, level, target, message and the event's fields).
    #[arg(long, env = "TESTBUS_LOG_FORMAT", default_value = "text")]
    log_format: testbus_telemetry::LogFormat,
    /// Where clients come from: tcp:HOST:PORT or unix:/PATH (clients
    /// connect), or a link from another relay: serial:/DEV[?baud=N],
    /// serial:stdio (the serial framing on stdin/stdout, for a line another
    /// process carries), vsock:CID:PORT (listens on PORT),
    /// ssh:[USER@]HOST[:PORT] (runs a relay there), stdio,
    /// mux+tcp:HOST:PORT or mux+unix:/PATH (listen).
    #[arg(long)]
    downstream: Endpoint,
    /// Toward the control plane: tcp:HOST:PORT or unix:/PATH (one
    /// connection per client), or a link to another relay: serial:,
    /// vsock:CID:PORT, ssh:, stdio, mux+tcp: or mux+unix: (connect).
    #[arg(long)]
    upstream: Endpoint,
    /// Pace serial links to this line rate (10 bits a byte), so that a pty
    /// behaves like a real line of that speed.
    #[arg(long)]
    baud: Option<u32>,
    /// What agents behind a unix downstream report as their transport
    /// (default: the upstream link's kind; a relay started over ssh by
    /// another one is told "ssh").
    #[arg(long)]
    transport: Option<String>,
    /// A serial link is given up when nothing arrived for this long.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    link_timeout: Duration,
    /// End when stdin closes: a relay started by another process (the
    /// control plane, for a pool guest) ends with it, however it ends.
    #[arg(long)]
    exit_with_stdin: bool,
    /// Clients carried at once, plain connections and a link's streams
    /// alike; one more is closed as soon as it comes. Code behind this
    /// relay (a guest's, which can speak a link's framing itself) cannot
    /// use up the control plane's connections (they all come from this
    /// relay's address).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_clients: u32,
    /// Serve this relay's Prometheus metrics at http://ADDR/metrics: its
    /// serial links' frames sent, retransmitted and rejected. Plain HTTP:
    /// bind it to loopback or a management network. Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// What this relay's serial links count.
    #[arg(skip)]
    counters: link::LinkCounters,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a duration like 6s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        _ => Err(format!("{s:?}: expected a duration like 6s or 500ms")),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

/// Which way a link faces: its relay opens client streams on it
/// (upstream) or accepts them (downstream).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Upstream,
    Downstream,
}

async fn connect_tcp(addr: &str) -> std::io::Result<BoxIo> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// Where client connections go.
#[derive(Clone)]
enum Upstream {
    /// One connection per client.
    Plain(Endpoint),
    /// A stream on the current link, when one is up.
    Link(watch::Receiver<Option<mux::Opener>>),
}

impl Upstream {
    async fn open(&self) -> anyhow::Result<BoxIo> {
        match self {
            Upstream::Plain(Endpoint::Tcp { addr, .. }) => {
                Ok(connect_tcp(addr).await.with_context(|| format!("connecting to tcp:{addr}"))?)
            }
            Upstream::Plain(Endpoint::Unix { path, .. }) => Ok(Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| format!("connecting to unix:{}", path.display()))?,
            )),
            Upstream::Plain(other) => anyhow::bail!("{other} is not a plain endpoint"),
            Upstream::Link(rx) => {
                let mut rx = rx.clone();
                // A client arriving while the link is being rebuilt waits
                // for it a little.
                let opener = tokio::time::timeout(Duration::from_secs(15), async {
                    loop {
                        if let Some(o) = rx.borrow_and_update().clone().filter(|o| !o.is_closed()) {
                            return Some(o);
                        }
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                })
                .await
                .ok()
                .flatten()
                .context("the upstream link is down")?;
                Ok(Box::new(opener.open().await.context("opening a stream on the upstream link")?))
            }
        }
    }
}

/// Joins a client to a new upstream connection, both ways with half-close.
/// The clients a relay carries at once, across its whole downstream
/// (plain connections and a link's streams alike): at most
/// `--max-clients`. Code behind a relay (a guest's root, which can speak a
/// link's framing itself) cannot use up the control plane's connections,
/// which all come from the relay's address.
struct ClientSlots {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    max: u32,
    refused: std::sync::atomic::AtomicU64,
}

impl ClientSlots {
    fn new(max: u32) -> std::sync::Arc<ClientSlots> {
        std::sync::Arc::new(ClientSlots {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(max as usize)),
            max,
            refused: Default::default(),
        })
    }

    /// Carries `client` toward `to` while a slot is free; closes it at once
    /// otherwise.
    fn serve(&self, client: BoxIo, to: Upstream) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let refused = self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            // Said on the first refusal and every 1000th after.
            if refused % 1000 == 1 {
                tracing::warn!(max_clients = self.max, refused, "a client over --max-clients closed");
            }
            return;
        };
        tokio::spawn(async move {
            serve_client(client, to).await;
            drop(slot);
        });
    }
}

async fn serve_client(mut client: BoxIo, upstream: Upstream) {
    match upstream.open().await {
        Ok(mut up) => {
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up).await {
                tracing::debug!(error = %e, "connection ended");
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "upstream unreachable; dropping client"),
    }
}

/// Opens one incarnation of a single-line link: the byte stream, and the
/// ssh process behind it if any (killed when dropped).
async fn open_line(ep: &Endpoint, side: Side, args: &Args) -> anyhow::Result<(BoxIo, Option<tokio::process::Child>)> {
    match ep {
        Endpoint::Tcp { addr, .. } => {
            Ok((connect_tcp(addr).await.with_context(|| format!("connecting to {ep}"))?, None))
        }
        Endpoint::Unix { path, .. } => Ok((
            Box::new(tokio::net::UnixStream::connect(path).await.with_context(|| format!("connecting to {ep}"))?),
            None,
        )),
        Endpoint::Vsock { cid, port } => {
            let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                .await
                .with_context(|| format!("connecting to {ep}"))?;
            Ok((Box::new(s), None))
        }
        Endpoint::Stdio => Ok((Box::new(tokio::io::join(tokio::io::stdin(), tokio::io::stdout())), None)),
        Endpoint::Serial { path, baud } => {
            let port = tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), *baud))
                .with_context(|| format!("opening {ep}"))?;
            Ok((reliable(port, args), None))
        }
        Endpoint::SerialStdio => Ok((reliable(tokio::io::join(tokio::io::stdin(), tokio::io::stdout()), args), None)),
        Endpoint::Ssh { target, port, relay, remote, config } => {
            let mut cmd = tokio::process::Command::new("ssh");
            cmd.args(["-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]);
            if let Some(c) = config {
                cmd.arg("-F").arg(c);
            }
            if let Some(p) = port {
                cmd.args(["-p", &p.to_string()]);
            }
            // The far relay holds the mirror image of this link on stdio.
            let (far_side, default_remote) = match side {
                Side::Upstream => ("--downstream", "tcp:127.0.0.1:7780"),
                Side::Downstream => ("--upstream", "unix:/run/testbus-relay.sock"),
            };
            let other = if side == Side::Upstream { "--upstream" } else { "--downstream" };
            cmd.arg(target).arg("--").arg(relay).args([far_side, "stdio", other]);
            cmd.arg(remote.as_deref().unwrap_or(default_remote));
            if side == Side::Downstream {
                cmd.args(["--transport", "ssh"]);
            }
            cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).kill_on_drop(true);
            let mut child = cmd.spawn().context("running ssh")?;
            let (Some(out), Some(inp)) = (child.stdout.take(), child.stdin.take()) else {
                anyhow::bail!("ssh without pipes");
            };
            Ok((Box::new(tokio::io::join(out, inp)), Some(child)))
        }
    }
}

/// The serial link's framing (acknowledged, retransmitted frames) over
/// `line`: the stream it carries.
fn reliable(line: impl AsyncRead + AsyncWrite + Send + 'static, args: &Args) -> BoxIo {
    let cfg = link::LinkConfig {
        baud: args.baud,
        dead_after: args.link_timeout,
        counters: args.counters.clone(),
        ..Default::default()
    };
    let (stream, task) = link::ReliableLink::spawn(line, cfg);
    tokio::spawn(async move {
        if let Ok(Ok(stats)) = task.await {
            tracing::info!(?stats, "serial link closed");
        }
    });
    Box::new(stream)
}

/// Runs a single-line link until it fails, again and again: serial, ssh,
/// stdio, and outgoing socket links. Upstream, the current session's
/// opener is published for clients; downstream, its inbound streams are
/// served. A stdio link cannot be reopened: the relay exits with it.
async fn supervise_line(
    ep: Endpoint,
    side: Side,
    args: std::sync::Arc<Args>,
    to: Option<Upstream>,
    clients: std::sync::Arc<ClientSlots>,
    publish: watch::Sender<Option<mux::Opener>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match open_line(&ep, side, &args).await {
            Ok((io, child)) => {
                let started = tokio::time::Instant::now();
                tracing::info!(link = %ep, ?side, "link open");
                let result = run_session(io, side, to.clone(), &clients, &publish).await;
                drop(child);
                tracing::warn!(link = %ep, result = ?result, "link down");
                if started.elapsed() > Duration::from_secs(5) {
                    backoff = Duration::from_millis(100);
                }
            }
            Err(e) => tracing::warn!(link = %ep, error = %format!("{e:#}"), "cannot open the link"),
        }
        if matches!(ep, Endpoint::Stdio | Endpoint::SerialStdio) {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One multiplexed session over `io`, until the link ends.
/// Upstream, its opener is published for clients while it lasts;
/// downstream, its inbound streams are served toward `to`.
async fn run_session(
    io: BoxIo,
    side: Side,
    to: Option<Upstream>,
    clients: &ClientSlots,
    publish: &watch::Sender<Option<mux::Opener>>,
) -> Result<(), String> {
    let mode = if side == Side::Upstream { yamux::Mode::Client } else { yamux::Mode::Server };
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<mux::MuxStream>(256);
    let (opener, task) = mux::start(io, mode, inbound_tx);
    if side == Side::Upstream {
        publish.send_replace(Some(opener.clone()));
    }
    let serve = async {
        while let Some(s) = inbound_rx.recv().await {
            match &to {
                Some(to) => clients.serve(Box::new(s), to.clone()),
                None => tracing::warn!("the far relay opened a stream toward clients; refused"),
            }
        }
    };
    let result = tokio::select! {
        r = task => match r { Ok(Ok(())) => Ok(()), Ok(Err(e)) => Err(e.to_string()), Err(e) => Err(e.to_string()) },
        _ = serve => Ok(()),
    };
    publish.send_replace(None);
    drop(opener);
    result
}

/// The upstream side: plain, or a link kept up by a supervisor. A stdio
/// link cannot be reopened: the relay exits when it ends.
fn start_upstream(args: &std::sync::Arc<Args>) -> Upstream {
    let ep = args.upstream.clone();
    if !ep.is_link() {
        return Upstream::Plain(ep);
    }
    let (tx, rx) = watch::channel(None);
    let args = args.clone();
    tokio::spawn(async move {
        supervise_line(ep, Side::Upstream, args, None, ClientSlots::new(1), tx).await;
        std::process::exit(0);
    });
    Upstream::Link(rx)
}

/// What each accepted connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    /// One client's byte stream (plain).
    Client,
    /// A link session multiplexing many (mux).
    Link,
}

impl Carries {
    fn of(mux: bool) -> Carries {
        if mux {
            Carries::Link
        } else {
            Carries::Client
        }
    }
}

/// Accepts connections from a listener; each is a client (plain) or a
/// link session (mux).
async fn accept_loop<L, F, Fut>(
    mut accept: F,
    each: Carries,
    to: Upstream,
    clients: std::sync::Arc<ClientSlots>,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<L>>,
    L: Io + 'static,
{
    loop {
        let s = accept().await?;
        let to = to.clone();
        if each == Carries::Link {
            let clients = clients.clone();
            tokio::spawn(async move {
                let (publish, _) = watch::channel(None);
                let r = run_session(Box::new(s), Side::Downstream, Some(to), &clients, &publish).await;
                tracing::info!(result = ?r, "downstream link closed");
            });
        } else {
            clients.serve(Box::new(s), to);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let on_stdio = |e: &Endpoint| matches!(e, Endpoint::Stdio | Endpoint::SerialStdio);
    if on_stdio(&args.upstream) && on_stdio(&args.downstream) {
        anyhow::bail!("--downstream and --upstream cannot both be on stdio");
    }
    // The metrics listener ends with this function (the guard cancels it).
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        let mut registry = prometheus_client::registry::Registry::with_prefix("testbus_relay");
        args.counters.register(&mut registry);
        testbus_telemetry::serve_metrics(addr, std::sync::Arc::new(registry), metrics_stop.clone())
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
    }
    let _stop_metrics = metrics_stop.drop_guard();
    let args = std::sync::Arc::new(args);
    let to = start_upstream(&args);
    let clients = ClientSlots::new(args.max_clients);
    let down = args.downstream.clone();
    match &down {
        Endpoint::Tcp { addr, mux } => {
            let lis = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--downstream {down}"))?;
            accept_loop(
                || async {
                    let (s, _) = lis.accept().await?;
                    s.set_nodelay(true)?;
                    Ok(s)
                },
                Carries::of(*mux),
                to,
                clients,
            )
            .await
        }
        Endpoint::Unix { path, mux } => {
            let _ = std::fs::remove_file(path);
            let lis = tokio::net::UnixListener::bind(path).with_context(|| format!("--downstream {down}"))?;
            // Agents behind this relay report how they reach the control
            // plane (a Host fact) from this file next to the socket.
            let transport = match &args.transport {
                Some(t) => t.as_str(),
                None if args.upstream.is_link() => args.upstream.transport(),
                None => "direct",
            };
            let mut sidecar = path.clone().into_os_string();
            sidecar.push(".transport");
            std::fs::write(&sidecar, transport).with_context(|| format!("writing {}", sidecar.to_string_lossy()))?;
            accept_loop(|| async { Ok(lis.accept().await?.0) }, Carries::of(*mux), to, clients).await
        }
        Endpoint::Vsock { cid, port } => {
            let lis = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                .with_context(|| format!("--downstream {down}"))?;
            accept_loop(|| async { Ok(lis.accept().await?.0) }, Carries::Link, to, clients).await
        }
        Endpoint::Serial { .. } | Endpoint::SerialStdio | Endpoint::Ssh { .. } | Endpoint::Stdio => {
            supervise_line(down, Side::Downstream, args.clone(), Some(to), clients, watch::channel(None).0).await;
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    testbus_telemetry::init_logging(args.log_format);
    if args.exit_with_stdin {
        tokio::spawn(async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            while stdin.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            tracing::info!("stdin closed; ending");
            std::process::exit(0);
        });
    }
    if let Err(e) = run(args).await {
        eprintln!("testbus-relay: {e:#}");
        std::process::exit(1);
    }
    // A link on stdio ended: exit now. Returning would drop the runtime,
    // which waits for its blocking stdin read, and that waits for input
    // that may never come (the far side's writer still holds the pipe).
    std::process::exit(0);
}
