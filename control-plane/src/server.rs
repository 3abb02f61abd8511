//! Wiring: open the store, start the hub, serve the API on every listener,
//! run the controllers, stop on a shutdown signal.
use crate::api::ResourceService;
use crate::authz::Caller;
use crate::hub::Hub;
use crate::output::OutputService;
use crate::state::ApiState;
use crate::store::{embedded::EmbeddedStore, Store};
use anyhow::{bail, Context};
use futures::StreamExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use testbus_proto::auth_server::AuthServer;
use testbus_proto::blobs_server::BlobsServer;
use testbus_proto::host_pools_server::HostPoolsServer;
use testbus_proto::hosts_server::HostsServer;
use testbus_proto::output_server::OutputServer;
use testbus_proto::processes_server::ProcessesServer;
use testbus_proto::sync_server::SyncServer;
use testbus_proto::tests_server::TestsServer;
use testbus_proto::{Host, HostPool, Process, Test};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Listen::Unix(p.into()));
        }
        let s = s.strip_prefix("tcp://").unwrap_or(s);
        s.parse::<SocketAddr>()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?} is not HOST:PORT (an IP address and port) or unix:/path"))
    }
}

pub struct Config {
    pub listen: Vec<Listen>,
    pub data_dir: PathBuf,
    pub store: String,
    pub insecure: bool,
    pub controllers: Option<testbus_controllers::Config>,
    /// Events kept in the watch cache.
    pub watch_cache: usize,
    /// Bytes kept of each output stream of a process.
    pub output_limit: u64,
    /// Writes (objects, blobs) are refused while less is free in the data dir.
    pub min_free_bytes: u64,
    /// The address other replicas reach this one at (see `advertise()`).
    pub advertise: Option<String>,
    /// How long a TCP connection may take to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Most TCP connections served for one peer address at once.
    /// None: the default, 1024 and at most a quarter of the open-files
    /// limit.
    pub max_connections_per_peer: Option<usize>,
    /// Most TCP connections served at once (0: from the open-files limit).
    pub max_connections: usize,
    /// The server's certificate chain and key (PEM files); default: issued
    /// at start by the CA in `DATA_DIR/pki`, made on first start.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The CA client certificates are checked against; default: the CA in
    /// `DATA_DIR/pki`.
    pub client_ca: Option<PathBuf>,
    /// How long an agent's certificate is valid (it renews it at 2/3).
    pub agent_cert_ttl: Duration,
    /// Podman pools' containers and images live in a storage of their own
    /// here (podman's `--root DIR/root --runroot DIR/run`); default:
    /// podman's.
    pub podman_storage: Option<PathBuf>,
}

/// The TLS of a server: how it accepts connections, and its credentials.
struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    pki: Arc<crate::auth::Pki>,
    /// This replica's client credentials toward the others (copying blobs).
    peer_tls: testbus_client::Tls,
}

/// Every name this server is reached at: its listeners' addresses (all of
/// this machine's for an unspecified one), the advertised host, loopback
/// and the host name.
fn server_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for l in &cfg.listen {
        if let Listen::Tcp(a) = l {
            if a.ip().is_unspecified() {
                names.extend(if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip().to_string()));
            } else {
                names.push(a.ip().to_string());
            }
        }
    }
    if let Some(host) = cfg.advertise.as_deref().and_then(|a| a.parse::<tonic::transport::Uri>().ok()) {
        if let Some(h) = host.host() {
            names.push(h.trim_matches(|c| c == '[' || c == ']').to_string());
        }
    }
    if let Ok(h) = nix::unistd::gethostname() {
        names.push(h.to_string_lossy().into_owned());
    }
    names
}

fn read_pem(flag: &str, path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

impl Config {
    /// The CA (made on first start) and the server's certificate.
    fn tls(&self) -> anyhow::Result<ServerTls> {
        use testbus_pki::{Ca, Role};
        let dir = self.data_dir.join("pki");
        let (ca, chain, key) = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => (Ca::load(&dir)?, read_pem("--tls-cert", c)?, read_pem("--tls-key", k)?),
            (None, None) => {
                let (ca, made) = Ca::load_or_create(&dir).with_context(|| format!("the CA in {}", dir.display()))?;
                if made {
                    tracing::info!(dir = %dir.display(), fingerprint = %ca.fingerprint(), "made a new CA");
                }
                let issued = ca.issue_server(&server_names(self), Duration::from_secs(365 * 86400))?;
                let chain = format!("{}{}", issued.cert, ca.cert_pem());
                (Some(ca), chain, issued.key)
            }
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        let client_ca = match (&self.client_ca, &ca) {
            (Some(p), _) => read_pem("--client-ca", p)?,
            (None, Some(ca)) => ca.cert_pem().to_string(),
            (None, None) => bail!("--client-ca: needed with --tls-cert when DATA_DIR/pki holds no CA"),
        };
        let server = testbus_pki::server_config(&chain, &key, &client_ca).context("the server's TLS")?;
        // This replica, as a client of the others: a certificate of its own
        // if it can sign one, else its server certificate (which may be
        // used as a client's).
        let replica_id = crate::blobs::replica_id(&self.data_dir).context("the replica id in the data dir")?;
        let peer = match &ca {
            Some(ca) => {
                let i = ca.issue(&replica_id, Role::Replica, Duration::from_secs(365 * 86400))?;
                testbus_pki::client_config(&client_ca, Some((&i.cert, &i.key)))?
            }
            None => testbus_pki::client_config(&client_ca, Some((&chain, &key)))?,
        };
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            pki: Arc::new(crate::auth::Pki::new(ca, client_ca, self.agent_cert_ttl)),
            peer_tls: testbus_client::Tls::new(peer),
        })
    }
}

/// Most TCP connections from one address waiting to send their HTTP/2
/// preface at once; past it, the oldest of them is closed.
pub const MAX_HANDSHAKES_PER_PEER: usize = 256;
/// Most concurrent calls (watches, log follows, ...) on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// HTTP/2 pings on idle connections: a peer that does not answer one within
/// the same time is gone, and its connection (and its watches) with it.
pub const KEEPALIVE: Duration = Duration::from_secs(20);
/// How long a stopping server lets open calls finish before it cuts them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection whose next bytes can be looked at without reading them.
trait Peek {
    async fn peek_bytes(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl Peek for tokio::net::TcpStream {
    async fn peek_bytes(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.peek(buf).await
    }
}

impl Peek for tokio::net::UnixStream {
    async fn peek_bytes(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        loop {
            self.readable().await?;
            let peeked = self.try_io(tokio::io::Interest::READABLE, || {
                nix::sys::socket::recv(self.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                    .map_err(std::io::Error::from)
            });
            match peeked {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

/// How HTTP/1 requests (to `/metrics` and the dashboard, whose forms
/// post) begin: a method we serve and a space.
const HTTP1_STARTS: [&[u8]; 3] = [b"GET ", b"HEAD ", b"POST "];

/// Whether `s` sends the start of the HTTP/2 preface (what every gRPC
/// client sends first), or of an HTTP/1 GET or POST, within `limit`. Looked at
/// without reading, so the server still gets every byte.
async fn sends_preface(s: &impl Peek, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 24];
    loop {
        match tokio::time::timeout_at(deadline, s.peek_bytes(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && HTTP1_STARTS.iter().any(|m| n >= m.len() && buf.starts_with(m)) => return true,
            Ok(Ok(n))
                if n > 0 && (buf[..n] == PREFACE[..n] || HTTP1_STARTS.iter().any(|m| m.starts_with(&buf[..n]))) =>
            {
                if n == PREFACE.len() {
                    return true;
                }
            }
            // Closed, an error, bytes that are no HTTP/2 or GET, or too slow.
            _ => return false,
        }
        // Part of it so far: the rest is looked for shortly.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(10))).await.is_err() {
            return false;
        }
    }
}

/// Connections counted by peer address.
type PeerCounts = Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// How many TCP connections are served: in all, and for one peer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConnectionLimits {
    total: usize,
    per_peer: usize,
}

/// Why a connection was not taken.
#[derive(Debug, PartialEq, Eq)]
enum Full {
    Total(usize),
    Peer(usize),
}

impl Full {
    /// What the refused client is told (one line, ASCII: a grpc-message).
    fn message(&self) -> String {
        match self {
            Full::Total(n) => format!(
                "the control plane serves its limit of {n} connections (--max-connections); try again later, or raise the limit and the open-files limit (ulimit -n) where it runs"
            ),
            Full::Peer(n) => format!(
                "the control plane serves its limit of {n} connections from this address (--max-connections-per-peer); try again later"
            ),
        }
    }
}

/// One connection's place in the counts, given back when dropped.
struct PeerSlot {
    counts: PeerCounts,
    total: Arc<std::sync::atomic::AtomicUsize>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    /// A slot, if fewer than the limits are counted (in all, and for `ip`).
    fn take(
        counts: &PeerCounts,
        total: &Arc<std::sync::atomic::AtomicUsize>,
        ip: std::net::IpAddr,
        limits: ConnectionLimits,
    ) -> Result<PeerSlot, Full> {
        use std::sync::atomic::Ordering;
        let mut c = counts.lock();
        // Counted under the peers' lock: no two takes pass one limit.
        if total.load(Ordering::Relaxed) >= limits.total {
            return Err(Full::Total(limits.total));
        }
        let n = c.entry(ip).or_insert(0);
        if *n >= limits.per_peer {
            return Err(Full::Peer(limits.per_peer));
        }
        *n += 1;
        total.fetch_add(1, Ordering::Relaxed);
        Ok(PeerSlot { counts: counts.clone(), total: total.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        self.total.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// How long a refused connection is answered before it is closed.
const REFUSED_FOR: Duration = Duration::from_secs(2);

/// The TCP connections served, counted across every listener, and the
/// refused ones being answered.
#[derive(Clone)]
struct Served {
    limits: ConnectionLimits,
    peers: PeerCounts,
    total: Arc<std::sync::atomic::AtomicUsize>,
    /// Refused connections answered at once: each holds a descriptor for
    /// up to [`REFUSED_FOR`], and they are not counted as served. Past
    /// this many, one more is closed at once, unanswered.
    refusing: Arc<tokio::sync::Semaphore>,
}

impl Served {
    fn new(limits: ConnectionLimits, fd_limit: u64) -> Served {
        let answered = usize::try_from(fd_limit / 16).unwrap_or(usize::MAX).clamp(1, 256);
        Served {
            limits,
            peers: Default::default(),
            total: Default::default(),
            refusing: Arc::new(tokio::sync::Semaphore::new(answered)),
        }
    }
}

/// Serves a connection over the limits for a moment: every call on it
/// fails with UNAVAILABLE (gRPC's "try again later": agents and the CLI
/// treat it as a server they cannot reach yet) saying which limit, then it
/// is closed. A client sees why, not a bare closed connection; the
/// connections being served go on as they were.
async fn refuse<S>(s: S, why: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
        let why = why.clone();
        async move {
            // A trailers-only gRPC answer: the status in the headers.
            http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", (tonic::Code::Unavailable as i32).to_string())
                .header("grpc-message", why)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_concurrent_streams(16)
        .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
    let _ = tokio::time::timeout(REFUSED_FOR, conn).await;
}

/// Connections waiting for their HTTP/2 preface, by peer (a TCP peer's
/// address; `()` for the local socket, whose peers all count as one). A
/// peer over [`MAX_HANDSHAKES_PER_PEER`] loses its oldest one: a flood of
/// silent connections is bounded, and a real client from the same peer
/// (whose preface comes at once) still gets in.
#[derive(Clone)]
struct Handshakes<P>(Arc<parking_lot::Mutex<HandshakeState<P>>>);

impl<P> Default for Handshakes<P> {
    fn default() -> Self {
        Handshakes(Arc::new(parking_lot::Mutex::new(HandshakeState { next: 0, by_peer: Default::default() })))
    }
}

/// One address's connections in handshake, oldest first, each with what
/// closes it.
type Waiting = std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>;

struct HandshakeState<P> {
    next: u64,
    by_peer: std::collections::HashMap<P, Waiting>,
}

impl<P: std::hash::Hash + Eq + Copy> Handshakes<P> {
    /// Admits a connection from `ip`; the receiver fires if it is evicted.
    fn admit(&self, ip: P) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let (evict, evicted) = tokio::sync::oneshot::channel();
        let mut st = self.0.lock();
        st.next += 1;
        let id = st.next;
        let q = st.by_peer.entry(ip).or_default();
        if q.len() >= MAX_HANDSHAKES_PER_PEER {
            if let Some((_, oldest)) = q.pop_front() {
                let _ = oldest.send(());
            }
        }
        q.push_back((id, evict));
        (id, evicted)
    }

    /// The connection `id` from `ip` is done with its handshake.
    fn leave(&self, ip: P, id: u64) {
        let mut st = self.0.lock();
        if let Some(q) = st.by_peer.get_mut(&ip) {
            q.retain(|(i, _)| *i != id);
            if q.is_empty() {
                st.by_peer.remove(&ip);
            }
        }
    }
}

/// A served connection: a TCP one holds its peer's slot for as long as the
/// server keeps it. Every connection is cut (reads and writes fail) when
/// `cut` is cancelled, which is how a stopping server ends watches and log
/// follows that would otherwise keep their connection, and the state it
/// serves, alive after the server stopped.
struct Conn<S> {
    stream: S,
    /// Who is on the other end, as the transport proved it: every request
    /// of the connection carries it (see `authz`).
    info: crate::authz::ConnInfo,
    _slot: Option<PeerSlot>,
    cut: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

/// How long a connection without a client certificate may stay without
/// proving itself (a join, a dashboard login, a page its session opened):
/// idle anonymous connections hold no descriptors for long.
pub const ANONYMOUS_GRACE: Duration = Duration::from_secs(5);

impl<S> Conn<S> {
    /// `cut`: the server's; the connection is cut with it, and one without
    /// a certificate also [`ANONYMOUS_GRACE`] after it came unless it has
    /// proven itself by then.
    fn new(stream: S, caller: Caller, slot: Option<PeerSlot>, cut: &CancellationToken) -> Self {
        let info = crate::authz::ConnInfo::new(caller);
        let mine = cut.child_token();
        if !info.proven() {
            let (info, mine) = (info.clone(), mine.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(ANONYMOUS_GRACE) => {}
                    _ = mine.cancelled() => return,
                }
                if !info.proven() {
                    tracing::debug!("a connection without a certificate made no call that proved it; closed");
                    mine.cancel();
                }
            });
        }
        Conn { stream, info, _slot: slot, cut: Box::pin(mine.cancelled_owned()) }
    }

    /// An error once the server cut its connections.
    fn check_cut(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match std::future::Future::poll(self.cut.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "server stopped",
            ))),
            std::task::Poll::Pending => std::task::Poll::Ready(Ok(())),
        }
    }
}

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = crate::authz::ConnInfo;
    fn connect_info(&self) -> crate::authz::ConnInfo {
        self.info.clone()
    }
}

/// A TCP connection, with TLS or (`--insecure`) without.
type TcpConn = Box<dyn testbus_client::Io>;

/// Who a TLS client is: what its certificate (verified by the handshake
/// against the client CA) names, or nobody.
fn caller_of(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Caller {
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Caller::Anonymous;
    };
    match testbus_pki::identity_of(cert) {
        Ok(id) => Caller::Certified { name: id.name, role: id.role, issued: id.issued, pool: id.pool },
        Err(e) => {
            tracing::debug!(error = %e, "a client certificate of the CA names no testbus identity");
            Caller::Anonymous
        }
    }
}

/// In the data dir: the address this control plane serves TLS on, for
/// `user create` to put in configs by default.
pub const ADVERTISE_FILE: &str = "advertise";

/// Lines about refused TLS handshakes: at most this many a minute.
const HANDSHAKE_LINES_PER_MINUTE: u32 = 10;
static HANDSHAKE_LOG: LogBudget = LogBudget::new(HANDSHAKE_LINES_PER_MINUTE);
/// Lines about connections refused at a limit: as few.
static REFUSAL_LOG: LogBudget = LogBudget::new(HANDSHAKE_LINES_PER_MINUTE);

/// A budget of log lines per minute for what a peer can cause at will.
struct LogBudget {
    per_minute: u32,
    /// The minute's start, lines said in it, lines held back since the
    /// last one said.
    state: parking_lot::Mutex<Option<(tokio::time::Instant, u32, u64)>>,
}

impl LogBudget {
    const fn new(per_minute: u32) -> LogBudget {
        LogBudget { per_minute, state: parking_lot::Mutex::new(None) }
    }

    /// Some(lines held back since the last one) if a line may be said now.
    fn take(&self) -> Option<u64> {
        self.take_at(tokio::time::Instant::now())
    }

    fn take_at(&self, now: tokio::time::Instant) -> Option<u64> {
        let mut st = self.state.lock();
        let (start, said, held) = st.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= Duration::from_secs(60) {
            (*start, *said) = (now, 0);
        }
        if *said < self.per_minute {
            *said += 1;
            Some(std::mem::take(held))
        } else {
            *held += 1;
            None
        }
    }
}

/// Makes a freshly accepted connection ready to serve within `limit`: the
/// TLS handshake, or (insecure) the start of the HTTP/2 preface. None: it
/// failed or was too slow.
async fn handshake(
    s: tokio::net::TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    limit: Duration,
) -> Option<(TcpConn, Caller)> {
    match tls {
        None => sends_preface(&s, limit).await.then(|| (Box::new(s) as TcpConn, Caller::Insecure)),
        Some(acceptor) => {
            let peer = s.peer_addr().ok();
            match tokio::time::timeout(limit, acceptor.accept(s)).await {
                Ok(Ok(t)) => {
                    let caller = caller_of(&t);
                    Some((Box::new(t), caller))
                }
                Ok(Err(e)) => {
                    // Said where an operator looks (an expired user
                    // certificate left no trace), at most a few lines a
                    // minute whatever a hostile client sends.
                    if let Some(suppressed) = HANDSHAKE_LOG.take() {
                        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                        tracing::warn!(%peer, error = %e, suppressed, "TLS handshake refused");
                    }
                    None
                }
                Err(_) => None,
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Conn<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.check_cut(cx))?;
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.check_cut(cx))?;
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.check_cut(cx))?;
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.check_cut(cx))?;
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and hands on those that finish their TLS
/// handshake (insecure: start HTTP/2) in time: a connection that never
/// does is closed after `limit` instead of holding a slot forever; one address has at most
/// [`MAX_HANDSHAKES_PER_PEER`] connections in that state, and `served`
/// holds the limits on those being served (shared by every listener). Ends when the server does (`tx` closed).
async fn accept_http2(
    lis: tokio::net::TcpListener,
    tx: tokio::sync::mpsc::Sender<Conn<TcpConn>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Duration,
    served: Served,
    cut: CancellationToken,
) {
    let pending = Handshakes::default();
    loop {
        let (s, peer) = tokio::select! {
            r = lis.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of fds, say: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let ip = peer.ip();
        let (id, mut evicted) = pending.admit(ip);
        let (tx, served, pending, cut, tls) = (tx.clone(), served.clone(), pending.clone(), cut.clone(), tls.clone());
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let ready = tokio::select! {
                r = handshake(s, tls.as_ref(), limit) => r,
                _ = &mut evicted => None,
            };
            pending.leave(ip, id);
            let Some((s, caller)) = ready else {
                tracing::debug!(%peer, "no TLS handshake or HTTP/2 preface in time; closed");
                return;
            };
            let slot = match PeerSlot::take(&served.peers, &served.total, ip, served.limits) {
                Ok(slot) => slot,
                Err(full) => {
                    if let Some(suppressed) = REFUSAL_LOG.take() {
                        tracing::warn!(%peer, limit = ?full, suppressed, "connection over the limit; refused");
                    }
                    // Answered while few are; else closed at once.
                    if let Ok(_answering) = served.refusing.clone().try_acquire_owned() {
                        refuse(s, full.message()).await;
                    }
                    return;
                }
            };
            let _ = tx.send(Conn::new(s, caller, Some(slot), &cut)).await;
        });
    }
}

/// Accepts connections on the local socket and hands on those that start
/// HTTP/2 within `limit`, as [`accept_http2`] does for TCP. Its peers are
/// all local and admin (the socket's permissions say who): they share one
/// handshake quota and have no connection limit.
async fn accept_local(
    lis: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::Sender<Conn<tokio::net::UnixStream>>,
    limit: Duration,
    cut: CancellationToken,
) {
    let pending = Handshakes::<()>::default();
    loop {
        let s = tokio::select! {
            r = lis.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let (id, mut evicted) = pending.admit(());
        let (tx, pending, cut) = (tx.clone(), pending.clone(), cut.clone());
        tokio::spawn(async move {
            let ok = tokio::select! {
                ok = sends_preface(&s, limit) => ok,
                _ = &mut evicted => false,
            };
            pending.leave((), id);
            if ok {
                let _ = tx.send(Conn::new(s, Caller::Local, None, &cut)).await;
            } else {
                tracing::debug!("local socket: no HTTP/2 preface in time; closed");
            }
        });
    }
}

/// Where the state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// redb in the data dir: one replica.
    Embedded,
    /// etcd at this URL: replicas share it.
    Etcd(String),
}

/// Where pool guests' relays bring their agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestUpstream {
    pub address: String,
    /// The agents speak TLS there (and join with a token).
    pub tls: bool,
}

/// The control plane's startup choices, decided and checked from its
/// `Config` before anything starts ([`Config::startup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub store: StoreChoice,
    /// It serves TLS (unless `--insecure`).
    pub tls: bool,
    pub guest_upstream: GuestUpstream,
    /// The address `user create` puts in configs when not told one
    /// (`DATA_DIR/advertise`): the first TCP listener's, where it names a
    /// host and TLS is served; None removes the file.
    pub advertised: Option<String>,
}

impl Config {
    /// Decides the startup choices; an error names the flag that is wrong.
    /// Pure: nothing is opened, bound or started.
    pub fn startup(&self) -> anyhow::Result<Startup> {
        let tcp: Vec<SocketAddr> = self
            .listen
            .iter()
            .filter_map(|l| match l {
                Listen::Tcp(a) => Some(*a),
                Listen::Unix(_) => None,
            })
            .collect();
        if let Some(a) = tcp.iter().find(|a| self.insecure && !a.ip().is_loopback()) {
            bail!(
                "--listen {a}: --insecure serves without TLS, on loopback addresses only; leave it out to serve with TLS"
            );
        }
        let store = match self.store.as_str() {
            "" | "embedded" => StoreChoice::Embedded,
            url if url.starts_with("etcd://") => {
                crate::store::etcd::parse_url(url).map_err(|e| anyhow::anyhow!("--store {e}"))?;
                StoreChoice::Etcd(url.to_string())
            }
            other => bail!("--store {other:?}: expected \"embedded\" or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"),
        };
        let tls = !self.insecure;
        // Guests' agents join and speak TLS through their relay to the
        // first TCP listener (loopback for an unspecified one); without TLS
        // (or a TCP listener) they reach the local socket.
        let guest_upstream = match tcp.first() {
            Some(a) if tls => {
                let a = if a.ip().is_unspecified() {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
                } else {
                    *a
                };
                GuestUpstream { address: format!("tcp:{a}"), tls: true }
            }
            _ => GuestUpstream { address: format!("unix:{}", self.local_socket().display()), tls: false },
        };
        let advertised = tcp.iter().find(|a| !a.ip().is_unspecified()).filter(|_| tls).map(|a| format!("https://{a}"));
        Ok(Startup { store, tls, guest_upstream, advertised })
    }

    /// The unix socket the control plane always offers in its data dir.
    pub fn local_socket(&self) -> PathBuf {
        self.data_dir.join("api.sock")
    }

    /// The address other replicas reach this one at: `--advertise`, else the
    /// first TCP listener with a specific address, else the local socket.
    pub fn advertise(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.advertise {
            testbus_client::Client::lazy(a).map_err(|e| anyhow::anyhow!("--advertise {e}"))?;
            return Ok(a.clone());
        }
        Ok(self
            .listen
            .iter()
            .find_map(|l| match l {
                Listen::Tcp(a) if !a.ip().is_unspecified() => {
                    Some(format!("{}://{a}", if self.insecure { "http" } else { "https" }))
                }
                _ => None,
            })
            .unwrap_or_else(|| format!("unix:{}", self.local_socket().display())))
    }
}

/// Serves until `shutdown` is cancelled (or a listener fails).
/// Where `name` is on PATH (as a shell finds it), else `name` itself, for
/// the error of the spawn to name.
fn on_path(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// The data dir holds every test's secrets (the store, output, blobs,
/// keys): 0700, and everything this process creates is its owner's alone
/// (umask 077, whatever it was started with). A store others can read
/// (left so by an earlier version, or by hand) is refused with what to do.
fn private_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    testbus_pki::private_dir(dir).with_context(|| format!("--data-dir {}", dir.display()))?;
    let store = dir.join("store.redb");
    if let Ok(m) = std::fs::metadata(&store) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by other users (mode {mode:04o}), and it holds every test's secrets: \
                 `chmod 600 {}` (and check who read it), then start again",
                store.display(),
                store.display()
            );
        }
    }
    Ok(())
}

/// Raises this process's soft limit of open files to its hard limit (a
/// control plane holds a connection per agent and per watcher): the soft
/// limit it ends up with.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the open files limit");
                hard
            }
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "could not raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The most connections one address may hold: by default 1024 and at most
/// a quarter of the open files limit (a third of the total), so that no
/// one address (or anonymous crowd) can take every descriptor and an admin
/// always gets in; a limit the operator gave is kept, up to the total (a
/// fleet behind one NAT address may need most of it).
fn per_peer_cap(flag: Option<usize>, total: usize) -> usize {
    match flag {
        Some(n) => n.min(total).max(1),
        None => DEFAULT_PER_PEER.min(total / 3).max(1),
    }
}

/// Connections one address may hold unless told otherwise.
const DEFAULT_PER_PEER: usize = 1024;

/// The most TCP connections served at once: the flag's (0: as many as the
/// open-files limit leaves room for), and at most three quarters of that
/// limit: the store, blobs, logs and the local socket need descriptors too,
/// and a connection refused with a reason beats an accept that fails.
fn total_cap(flag: usize, fd_limit: u64) -> usize {
    let room = usize::try_from(fd_limit / 4 * 3).unwrap_or(usize::MAX);
    (if flag == 0 { room } else { flag.min(room) }).max(1)
}

pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let startup = cfg.startup()?;
    private_data_dir(&cfg.data_dir)?;
    let fd_limit = raise_fd_limit();
    let tls = if startup.tls { Some(cfg.tls()?) } else { None };
    // With etcd, several replicas may share the state: the controllers
    // then run on the elected leader only.
    let mut etcd = None;
    let store: Arc<dyn Store> = match &startup.store {
        StoreChoice::Embedded => Arc::new(
            EmbeddedStore::open_with_reserve(&cfg.data_dir.join("store.redb"), 100_000, cfg.min_free_bytes)
                .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
        ),
        StoreChoice::Etcd(url) => {
            let s = crate::store::etcd::EtcdStore::connect(url)
                .await
                .with_context(|| format!("--store {url}: cannot reach etcd"))?;
            etcd = Some(s.clone());
            Arc::new(s)
        }
    };
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let store: Arc<dyn Store> = Arc::new(crate::metrics::CountedStore { inner: store, metrics: metrics.clone() });
    // From here every way out, an error included, goes through one drain:
    // tasks joined, the hub stopped, the store closed last.
    let served = match Hub::start(cfg.watch_cache, store.clone()).await.context("starting the watch cache") {
        Ok(hub) => {
            let mut running = Running::new(shutdown.child_token());
            let shared = (store.clone(), hub.clone());
            let served = serve(&cfg, &startup, &shutdown, &mut running, shared, etcd, tls, metrics, fd_limit).await;
            running.drain().await;
            hub.stop().await;
            served
        }
        Err(e) => Err(e),
    };
    // Connection tasks of tonic may still hold a handle of the store for a
    // moment: closing it here is what keeps "the store is closed when run
    // returns" true (a new server may open the same data dir at once).
    store.close().await;
    served
}

/// What a serving control plane has started: each stops with `stop` and
/// is joined by [`Running::drain`], whichever way `run` ends.
struct Running {
    stop: CancellationToken,
    /// Cut when the grace period is over: ends every connection still open.
    cut: CancellationToken,
    /// The listeners' servers.
    servers: tokio::task::JoinSet<Result<(), tonic::transport::Error>>,
    /// The janitor, the sync feed, revocations, the controllers or the
    /// leader election.
    background: tokio::task::JoinSet<()>,
}

impl Running {
    fn new(stop: CancellationToken) -> Running {
        Running {
            stop,
            cut: CancellationToken::new(),
            servers: tokio::task::JoinSet::new(),
            background: tokio::task::JoinSet::new(),
        }
    }

    /// Stops everything and joins it. Calls in flight may finish, but
    /// watches, log follows and waits do not end by themselves: after
    /// SHUTDOWN_GRACE whatever is still connected is cut off, so a
    /// connected agent cannot hold the process up.
    async fn drain(mut self) {
        self.stop.cancel();
        let servers = &mut self.servers;
        let drain = async { while servers.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
            self.cut.cancel();
            self.servers.shutdown().await;
        }
        let background = &mut self.background;
        let joined = async { while background.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, joined).await.is_err() {
            tracing::warn!("background tasks still running after the grace period; aborting them");
            self.background.shutdown().await;
        }
    }
}

/// Serves until `shutdown`, or until a listener fails: what may fail after
/// the watch cache started, each task it starts in `running`.
#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &Config,
    startup: &Startup,
    shutdown: &CancellationToken,
    running: &mut Running,
    (store, hub): (Arc<dyn Store>, Arc<Hub>),
    etcd: Option<crate::store::etcd::EtcdStore>,
    tls: Option<ServerTls>,
    metrics: Arc<crate::metrics::Metrics>,
    fd_limit: u64,
) -> anyhow::Result<()> {
    let Running { stop, cut, servers, background } = running;
    let stop = stop.clone();
    let pki = tls.as_ref().map(|t| t.pki.clone());
    let blobs = blob_store(cfg, &store, etcd.is_some(), tls.as_ref(), pki.clone())?;
    // With a shared store, output lives there so that every replica reads it.
    let shared = etcd.is_some().then(|| store.clone());
    let state = ApiState::new(store, hub, blobs.clone(), pki, metrics);
    if let Some(pki) = &state.pki {
        pki.load(state.store.as_ref()).await.context("reading revocations")?;
        if etcd.is_some() {
            pki.check_shared_ca(&state).await?;
        }
    }
    let output = OutputService::new(cfg.data_dir.join("output"), state.clone(), cfg.output_limit, shared)?;
    let janitor = output.spawn_janitor(stop.child_token());
    background.spawn(async move {
        let _ = janitor.await;
    });
    if let (Some(pki), true) = (&state.pki, etcd.is_some()) {
        background.spawn(pki.clone().follow_revocations(state.store.clone(), stop.child_token()));
    }
    let (sync, sync_feed) = crate::sync::SyncService::new(state.clone(), stop.child_token());
    background.spawn(async move {
        let _ = sync_feed.await;
    });

    let routes = api_routes(&state, output, sync, blobs).await?;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Browsers and Prometheus may speak HTTP/1.1 to /metrics.
        .accept_http1(true)
        // Each watch is a stream: a client cannot hold more than this many
        // open on one connection (and one address more than
        // --max-connections-per-peer connections).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .layer(crate::metrics::CallsLayer(state.metrics.clone()))
        .add_routes(routes);

    write_advertise(cfg, startup)?;
    // One count for every TCP listener: the limits are the process's.
    let served = {
        let total = total_cap(cfg.max_connections, fd_limit);
        Served::new(ConnectionLimits { total, per_peer: per_peer_cap(cfg.max_connections_per_peer, total) }, fd_limit)
    };
    let mut listens = cfg.listen.clone();
    listens.push(Listen::Unix(cfg.local_socket()));
    for l in listens {
        let router = router.clone();
        let signal = stop.clone().cancelled_owned();
        match l {
            Listen::Tcp(addr) => {
                let lis = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--listen {addr}"))?;
                tracing::info!(%addr, "serving");
                // serve_with_incoming ignores the builder's tcp_nodelay: it
                // is set on each accepted socket (a 1 KiB call is ~44 ms
                // without), by the acceptor that checks the handshake.
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
                tokio::spawn(accept_http2(lis, tx, acceptor, cfg.handshake_timeout, served.clone(), cut.clone()));
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
                servers.spawn(async move { router.serve_with_incoming_shutdown(incoming, signal).await });
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(|| format!("--listen unix:{}", path.display()))?;
                }
                let lis = tokio::net::UnixListener::bind(&path)
                    .with_context(|| format!("--listen unix:{}", path.display()))?;
                // Whoever may connect is admin: its owner, until an admin
                // chmods it (a socket outside the data dir).
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("--listen unix:{}", path.display()))?;
                tracing::info!(path = %path.display(), "serving");
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                tokio::spawn(accept_local(lis, tx, cfg.handshake_timeout, cut.clone()));
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
                servers.spawn(async move { router.serve_with_incoming_shutdown(incoming, signal).await });
            }
        }
    }

    start_controllers(cfg, startup, &state, etcd, &stop, background)?;

    tokio::select! {
        _ = shutdown.cancelled() => {
            tracing::info!("shutting down");
            Ok(())
        }
        Some(r) = servers.join_next() => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("a listener stopped")),
            Ok(Err(e)) => Err(e).context("serving"),
            Err(e) => Err(e).context("serving"),
        },
    }
}

/// The blob store in the data dir; with replicas (`shared`), it records
/// and fetches blobs among them.
fn blob_store(
    cfg: &Config,
    store: &Arc<dyn Store>,
    shared: bool,
    tls: Option<&ServerTls>,
    pki: Option<Arc<crate::auth::Pki>>,
) -> anyhow::Result<crate::blobs::BlobStore> {
    let mut blobs = crate::blobs::BlobStore::open(&cfg.data_dir.join("blobs"), cfg.min_free_bytes)
        .context("opening the blob store")?
        .with_pki(pki);
    if shared {
        let id = crate::blobs::replica_id(&cfg.data_dir).context("the replica id in the data dir")?;
        let advertise = cfg.advertise()?;
        tracing::info!(replica = %id, %advertise, "sharing blobs with the other replicas");
        let tls = tls.map(|t| t.peer_tls.clone());
        blobs = blobs.with_peers(crate::blobs::Peers { store: store.clone(), id, advertise, tls });
    }
    Ok(blobs)
}

/// Every service on the listeners: gRPC's (health and reflection
/// included) and, beside them, plain HTTP's (`/metrics`, the dashboard).
async fn api_routes(
    state: &ApiState,
    output: OutputService,
    sync: crate::sync::SyncService,
    blobs: crate::blobs::BlobStore,
) -> anyhow::Result<tonic::service::Routes> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<HostsServer<ResourceService<Host>>>().await;
    health_reporter.set_serving::<TestsServer<ResourceService<Test>>>().await;
    health_reporter.set_serving::<ProcessesServer<ResourceService<Process>>>().await;
    health_reporter.set_serving::<HostPoolsServer<ResourceService<HostPool>>>().await;
    health_reporter.set_serving::<OutputServer<OutputService>>().await;
    health_reporter.set_serving::<SyncServer<crate::sync::SyncService>>().await;
    health_reporter.set_serving::<BlobsServer<crate::blobs::BlobStore>>().await;
    health_reporter.set_serving::<AuthServer<crate::auth::AuthService>>().await;
    // Reflection in both versions: v1, and v1alpha, which Google's own
    // clients (grpcio-reflection, grpcurl before 1.9) still speak.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(testbus_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(testbus_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut grpc = tonic::service::Routes::builder();
    grpc.add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(HostsServer::new(ResourceService::<Host>::new(state.clone())).max_decoding_message_size(8 << 20))
        .add_service(TestsServer::new(ResourceService::<Test>::new(state.clone())).max_decoding_message_size(8 << 20))
        .add_service(
            ProcessesServer::new(ResourceService::<Process>::new(state.clone())).max_decoding_message_size(8 << 20),
        )
        .add_service(
            HostPoolsServer::new(ResourceService::<HostPool>::new(state.clone())).max_decoding_message_size(8 << 20),
        )
        .add_service(OutputServer::new(output.clone()).max_decoding_message_size(8 << 20))
        .add_service(SyncServer::new(sync).max_decoding_message_size(4 << 20))
        .add_service(BlobsServer::new(blobs).max_decoding_message_size(4 << 20))
        .add_service(AuthServer::new(crate::auth::AuthService::new(state.clone())));
    // Plain HTTP beside gRPC on the same listeners: /metrics and the
    // dashboard.
    let web = crate::web::routes(state.clone(), output);
    Ok(tonic::service::Routes::from(grpc.routes().into_axum_router().merge(web).fallback(crate::web::fallback)))
}

/// The address `user create` puts in configs when not told one
/// (`DATA_DIR/advertise`): the first TCP listener's, where it names a host.
fn write_advertise(cfg: &Config, startup: &Startup) -> anyhow::Result<()> {
    let advertise_file = cfg.data_dir.join(ADVERTISE_FILE);
    match &startup.advertised {
        Some(url) => {
            std::fs::write(&advertise_file, url).with_context(|| format!("writing {}", advertise_file.display()))?
        }
        None => {
            let _ = std::fs::remove_file(&advertise_file);
        }
    }
    Ok(())
}

/// The substrates this control plane makes pool guests on, by the name a
/// pool's `spec.provider` gives.
fn providers(cfg: &Config) -> testbus_pool_provider::Providers {
    let podman = testbus_pool_podman::Podman::new(cfg.podman_storage.as_deref());
    testbus_pool_provider::Providers::default()
        .register("libvirt", testbus_pool_libvirt::LibvirtKind)
        .register("podman", testbus_pool_podman::PodmanKind(podman))
        .register("kubernetes", testbus_pool_kubernetes::KubernetesKind::from_env())
}

/// Starts the controllers (on the elected leader only, when replicas share
/// an etcd), if this control plane runs them, with pool guests' links
/// made by the `testbus-relay` beside this binary.
fn start_controllers(
    cfg: &Config,
    startup: &Startup,
    state: &ApiState,
    etcd: Option<crate::store::etcd::EtcdStore>,
    stop: &CancellationToken,
    background: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let Some(mut ccfg) = cfg.controllers.clone() else { return Ok(()) };
    // Pool guests' links are testbus-relay processes next to this
    // binary, toward this replica's local socket.
    let relay = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("testbus-relay")));
    if let (None, Some(relay)) = (&ccfg.pools, relay) {
        let GuestUpstream { address: upstream, tls: guest_tls } = startup.guest_upstream.clone();
        ccfg.pools = Some(testbus_controllers::pools::PoolsConfig {
            state_dir: std::path::absolute(cfg.data_dir.join("guests")).unwrap_or_else(|_| cfg.data_dir.join("guests")),
            links: testbus_pool_provider::LinkConfig {
                relay,
                upstream,
                tls: guest_tls,
                vsock_device: on_path("vhost-device-vsock"),
            },
            providers: providers(cfg),
            timings: state.metrics.guest_timings(),
        });
    }
    let client = testbus_client::Client::lazy(&format!("unix:{}", cfg.local_socket().display()))?;
    let run_controllers = move |stop: CancellationToken| {
        let (client, ccfg) = (client.clone(), ccfg.clone());
        tokio::spawn(async move {
            if let Err(e) = testbus_controllers::run(client, ccfg, stop).await {
                tracing::error!(error = %e, "the controllers could not start");
            }
        })
    };
    match etcd {
        Some(store) => {
            let id = format!("{}@{}", std::process::id(), cfg.data_dir.display());
            background.spawn(crate::leader::run_while_leader(
                store,
                id,
                Duration::from_secs(3),
                run_controllers,
                stop.child_token(),
            ));
        }
        None => {
            let controllers = run_controllers(stop.child_token());
            background.spawn(async move {
                let _ = controllers.await;
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_client::{watcher, Client, WatcherEvent};
    use testbus_proto::Resource;

    /// The total and the per-peer limits each refuse the one over them,
    /// saying which; a slot given back makes room again.
    #[test]
    fn connection_slots_keep_both_limits() {
        let (counts, total) = (PeerCounts::default(), Arc::default());
        let limits = ConnectionLimits { total: 3, per_peer: 2 };
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = PeerSlot::take(&counts, &total, a, limits).unwrap();
        let _a2 = PeerSlot::take(&counts, &total, a, limits).unwrap();
        assert_eq!(PeerSlot::take(&counts, &total, a, limits).err(), Some(Full::Peer(2)));
        let _b1 = PeerSlot::take(&counts, &total, b, limits).unwrap();
        assert_eq!(PeerSlot::take(&counts, &total, b, limits).err(), Some(Full::Total(3)));
        assert!(Full::Total(3).message().contains("--max-connections"));
        drop(a1);
        assert!(PeerSlot::take(&counts, &total, b, limits).is_ok());
        assert_eq!(total_cap(0, 20_000), 15_000);
        assert_eq!(total_cap(100, 20_000), 100);
        assert_eq!(total_cap(1_000_000, 20_000), 15_000);
        // By default a quarter of the descriptors (a third of the total) at
        // most; as the operator says up to the total.
        assert_eq!(per_peer_cap(None, 15_000), 1024);
        assert_eq!(per_peer_cap(None, 768), 256);
        assert_eq!(per_peer_cap(Some(10_100), 15_000), 10_100);
        assert_eq!(per_peer_cap(Some(20_000), 15_000), 15_000);
    }

    #[test]
    fn a_log_budget_says_a_few_lines_a_minute_and_counts_the_rest() {
        let budget = LogBudget::new(2);
        let t0 = tokio::time::Instant::now();
        assert_eq!(budget.take_at(t0), Some(0));
        assert_eq!(budget.take_at(t0), Some(0));
        assert_eq!(budget.take_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(budget.take_at(t0 + Duration::from_secs(2)), None);
        // The next minute says how many were held back.
        assert_eq!(budget.take_at(t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(budget.take_at(t0 + Duration::from_secs(62)), Some(0));
        assert_eq!(budget.take_at(t0 + Duration::from_secs(63)), None);
    }

    /// A listener that fails after the tasks started (the janitor, the
    /// sync feed, the controllers) goes through the same drain as a
    /// shutdown: `run` returns its error with everything joined and the
    /// store closed, so the data dir opens again at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listener_failing_after_the_tasks_started_is_drained_like_a_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        cfg.listen = vec![Listen::Unix(file.join("sub/api.sock"))];
        cfg.controllers =
            Some(testbus_controllers::Config { lease_grace: Duration::from_secs(1), ..Default::default() });
        let r = tokio::time::timeout(Duration::from_secs(60), run(cfg, CancellationToken::new()))
            .await
            .expect("run returns");
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("--listen unix:") && e.contains("a-file/sub/api.sock"), "{e}");
        let again = crate::store::embedded::EmbeddedStore::open_with_reserve(&dir.path().join("store.redb"), 1000, 0);
        assert!(again.is_ok(), "the store is still held: {:?}", again.err());
    }

    /// The startup choices are decided, and bad flags refused naming the
    /// flag, before anything is opened or bound.
    #[test]
    fn startup_choices_are_decided_and_checked_before_anything_starts() {
        let dir = std::path::Path::new("/nonexistent/testbus");
        let tcp = |a: &str| Listen::Tcp(a.parse().unwrap());
        let mut cfg = config(dir);
        cfg.listen = vec![tcp("0.0.0.0:7780"), tcp("10.1.2.3:7781")];
        let s = cfg.startup().unwrap();
        assert_eq!((s.store, s.tls), (StoreChoice::Embedded, true));
        assert_eq!(s.guest_upstream, GuestUpstream { address: "tcp:127.0.0.1:7780".into(), tls: true });
        assert_eq!(s.advertised.as_deref(), Some("https://10.1.2.3:7781"));
        cfg.store = "etcd://127.0.0.1:2379/tb".into();
        assert_eq!(cfg.startup().unwrap().store, StoreChoice::Etcd("etcd://127.0.0.1:2379/tb".into()));
        cfg.store = "redis://x".into();
        assert!(cfg.startup().unwrap_err().to_string().starts_with("--store \"redis://x\""));
        cfg.store = "etcd://".into();
        assert!(cfg.startup().unwrap_err().to_string().starts_with("--store"));
        // Insecure: loopback only; guests reach the local socket.
        let mut cfg = config(dir);
        cfg.insecure = true;
        cfg.listen = vec![tcp("127.0.0.1:7780")];
        let s = cfg.startup().unwrap();
        assert_eq!((s.tls, s.advertised), (false, None));
        assert_eq!(
            s.guest_upstream,
            GuestUpstream { address: "unix:/nonexistent/testbus/api.sock".into(), tls: false }
        );
        cfg.listen.push(tcp("10.1.2.3:7781"));
        let e = cfg.startup().unwrap_err().to_string();
        assert!(e.starts_with("--listen 10.1.2.3:7781: --insecure"), "{e}");
    }

    fn config(dir: &std::path::Path) -> Config {
        Config {
            listen: vec![],
            data_dir: dir.to_path_buf(),
            store: "embedded".into(),
            insecure: false,
            controllers: None,
            watch_cache: 1000,
            output_limit: 1 << 20,
            min_free_bytes: 0,
            advertise: None,
            handshake_timeout: Duration::from_secs(10),
            max_connections_per_peer: Some(16),
            max_connections: 0,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            agent_cert_ttl: Duration::from_secs(3600),
            podman_storage: None,
        }
    }

    fn test_named(name: &str) -> Test {
        let text = format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: {name}}}
spec: {{hosts: [{{role: a}}], steps: [{{name: s, on: [a], argv: ["true"]}}]}}
"#
        );
        match testbus_proto::manifest::parse("t", &text).unwrap().pop() {
            Some(testbus_proto::Object::Test(t)) => t,
            _ => unreachable!(),
        }
    }

    async fn serve(dir: &std::path::Path) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let stop = CancellationToken::new();
        let server = tokio::spawn(run(config(dir), stop.clone()));
        let sock = format!("unix:{}", dir.join("api.sock").display());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = Client::connect(&sock).await {
                if c.api::<Test>().list("", "").await.is_ok() {
                    break;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "the server did not come up");
            if server.is_finished() {
                panic!("the server ended: {:?}", server.await);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (stop, server)
    }

    /// A watcher whose stream broke used to list every object again; it
    /// now resumes from the last revision it saw (here across a restart of
    /// the server, which missed nothing), and lists only when told that
    /// revision is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watcher_resumes_after_a_restart_without_listing_again() {
        let dir = tempfile::tempdir().unwrap();
        let (stop, server) = serve(dir.path()).await;
        let client = Client::lazy(&format!("unix:{}", dir.path().join("api.sock").display())).unwrap();
        let tests = client.api::<Test>();
        let events = watcher(tests.clone(), String::new(), String::new());
        futures::pin_mut!(events);
        async fn next<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
            tokio::time::timeout(Duration::from_secs(30), s.next()).await.expect("an event").expect("never ends")
        }
        assert!(matches!(next(&mut events).await, WatcherEvent::Restarted(items) if items.is_empty()));
        tests.create(test_named("t1")).await.unwrap();
        assert!(matches!(next(&mut events).await, WatcherEvent::Applied(t) if t.name() == "t1"));

        stop.cancel();
        server.await.unwrap().unwrap();
        let (stop, server) = serve(dir.path()).await;
        tests.create(test_named("t2")).await.unwrap();
        match next(&mut events).await {
            WatcherEvent::Applied(t) => assert_eq!(t.name(), "t2"),
            other => panic!("expected t2 applied, not a relist: {other:?}"),
        }

        // Written while nobody served, the server's watch cache starts
        // after the watcher's revision: it is told so, and lists again.
        stop.cancel();
        server.await.unwrap().unwrap();
        {
            let store = EmbeddedStore::open(&dir.path().join("store.redb"), 100_000).unwrap();
            let mut t3 = test_named("t3");
            t3.meta_mut().uid = "u3".into();
            store
                .txn(
                    vec![],
                    vec![crate::store::Op::Put(crate::hub::key(testbus_proto::Kind::Test, "t3"), t3.to_stored())],
                )
                .await
                .unwrap();
        }
        let (stop, server) = serve(dir.path()).await;
        match next(&mut events).await {
            WatcherEvent::Restarted(items) => {
                let mut names: Vec<&str> = items.iter().map(|t| t.name()).collect();
                names.sort();
                assert_eq!(names, ["t1", "t2", "t3"]);
            }
            other => panic!("expected a relist: {other:?}"),
        }
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
