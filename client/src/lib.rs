//! The typed client every other crate uses.
//!
//! [`Client::connect`] takes the server address of the command-line contract:
//! `http(s)://host:port`, a comma-separated list of them, `unix:/path`, or
//! `unix+tls:/path` (TLS through a socket, a relay's).
//! [`Api<K>`] gives the same verbs for every kind; [`watcher`] turns
//! list + watch into one stream that survives disconnects and compaction;
//! [`transfer`] moves blobs. The contract (types, manifests, validation)
//! is `testbus_proto`'s; connections, failover between replicas and TLS
//! are this crate's.
#![forbid(unsafe_code)]

pub mod transfer;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::time::Duration;
use testbus_proto::auth_client::AuthClient;
use testbus_proto::host_pools_client::HostPoolsClient;
use testbus_proto::hosts_client::HostsClient;
use testbus_proto::output_client::OutputClient;
use testbus_proto::processes_client::ProcessesClient;
use testbus_proto::tests_client::TestsClient;
use testbus_proto::{DeleteRequest, GetRequest, Host, HostPool, ListRequest, Process, Resource, Test, WatchRequest};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7780";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid server address {0:?}: {1}")]
    InvalidAddress(String, String),
    #[error("cannot reach the server at {0}: {1}")]
    Unreachable(String, String),
}

#[derive(Clone)]
pub struct Client {
    channel: Channel,
    server: String,
    connector: Connector,
}

enum Target {
    /// One replica, or several that the connection fails over between.
    Http(Vec<Endpoint>),
    /// A socket path, and whether TLS is spoken over it.
    Unix(String, bool),
}

fn parse_server(server: &str) -> Result<Target, ConnectError> {
    let bad = |m: &str| ConnectError::InvalidAddress(server.to_string(), m.to_string());
    for (scheme, tls) in [("unix:", false), ("unix+tls:", true)] {
        if let Some(path) = server.strip_prefix(scheme) {
            if path.is_empty() {
                return Err(bad(&format!("{scheme} needs a socket path")));
            }
            return Ok(Target::Unix(path.to_string(), tls));
        }
    }
    let mut eps = Vec::new();
    for s in server.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // `HOST:PORT` without a scheme is plain `http://HOST:PORT`.
        let s = if s.contains("://") { s.to_string() } else { format!("http://{s}") };
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(bad("expected HOST:PORT, http://host:port, https://host:port or unix:/path"));
        }
        let ep = Endpoint::from_shared(s.clone()).map_err(|e| bad(&e.to_string()))?;
        if ep.uri().host().is_none() {
            return Err(bad(&format!("{s:?} has no host")));
        }
        eps.push(keepalive(ep).tcp_nodelay(true).connect_timeout(CONNECT_TIMEOUT));
    }
    if eps.is_empty() {
        return Err(bad("empty"));
    }
    Ok(Target::Http(eps))
}

/// How long one address may take to accept a connection before the next
/// replica is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client's connection, with two guards.
///
/// - A plain connection's peer must answer within `first_answer` of the
///   first bytes sent to it: a listener that accepts and stays silent (a
///   stuck process, a port forward to nowhere) failed a call only when
///   HTTP/2's keepalive gave up, 20 s later. Once the peer has said
///   anything, that guard is off. (A TLS peer has answered by then.)
/// - Once `cut` is cancelled ([`Client::fail_over`]), every read and write
///   fails, so the channel drops the connection and connects again: a
///   peer that accepts calls and answers none (a replica cut off one way,
///   or stopped) keeps a live-looking connection for 20 s otherwise.
struct GuardedIo<S> {
    inner: S,
    first_answer: Option<Duration>,
    /// Set at the first write while `first_answer` holds.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    cut: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<S> GuardedIo<S> {
    fn new(inner: S, first_answer: Option<Duration>, cut: tokio_util::sync::CancellationToken) -> Self {
        GuardedIo { inner, first_answer, deadline: None, cut: Box::pin(cut.cancelled_owned()) }
    }

    fn cut(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the client gave this connection up (its calls were not answered)",
            )),
            std::task::Poll::Pending => Ok(()),
        }
    }

    fn writing(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        self.cut(cx)?;
        if let (Some(limit), None) = (self.first_answer, &self.deadline) {
            self.deadline = Some(Box::pin(tokio::time::sleep(limit)));
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for GuardedIo<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if let Err(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if buf.filled().len() > before {
                self.first_answer = None;
                self.deadline = None;
            }
            return r;
        }
        if let (Some(limit), Some(d)) = (self.first_answer, self.deadline.as_mut()) {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the server accepted the connection but said nothing in {}s", limit.as_secs()),
                )));
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for GuardedIo<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(e) = self.writing(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(e) = self.writing(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.cut(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn keepalive(ep: Endpoint) -> Endpoint {
    ep.http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// TLS settings of a client: the configuration new connections use. It
/// can be replaced (an agent renews its certificate) without a new
/// channel: connections made after that use the new one, those already
/// made keep the identity they were made with.
#[derive(Clone)]
pub struct Tls(std::sync::Arc<parking_lot::RwLock<std::sync::Arc<rustls::ClientConfig>>>);

impl Tls {
    pub fn new(config: rustls::ClientConfig) -> Tls {
        Tls(std::sync::Arc::new(parking_lot::RwLock::new(std::sync::Arc::new(config))))
    }

    pub fn replace(&self, config: rustls::ClientConfig) {
        *self.0.write() = std::sync::Arc::new(config);
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.0.read().clone())
    }
}

/// A connection of any kind (TCP or unix, with or without TLS).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

#[derive(Debug, Clone)]
enum Addr {
    /// `https` says whether to speak TLS (and the host is what the
    /// server's certificate is checked against).
    Tcp { host: String, port: u16, https: bool },
    /// `unix+tls:` speaks TLS (checked against
    /// [`testbus_pki::SERVER_NAME`]): a relay's socket whose other end is
    /// the control plane's TLS listener. `unix:` is plain: the control
    /// plane's own socket.
    Unix { path: String, tls: bool },
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp { host, port, .. } => write!(f, "{host}:{port}"),
            Addr::Unix { path, tls: false } => write!(f, "unix:{path}"),
            Addr::Unix { path, tls: true } => write!(f, "unix+tls:{path}"),
        }
    }
}

/// Connects to the first address of a list that answers, starting with
/// the one that answered last, and speaks TLS on it where it should. The
/// channel calls it again whenever its connection breaks, so a client
/// follows the replicas that are alive: in-flight calls on a dead
/// connection fail with `Unavailable` and the next call goes to another
/// replica.
#[derive(Clone)]
struct Connector {
    addrs: std::sync::Arc<Vec<Addr>>,
    tls: Option<Tls>,
    last_good: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Cuts the connection made last (see [`Client::fail_over`]).
    current: std::sync::Arc<parking_lot::Mutex<tokio_util::sync::CancellationToken>>,
}

impl Connector {
    /// A connection to `addr`, and how long its peer has to answer first
    /// (plain TCP only; see [`GuardedIo`]).
    async fn connect_one(addr: &Addr, tls: Option<&Tls>) -> std::io::Result<(Box<dyn Io>, Option<Duration>)> {
        let other = |e: String| std::io::Error::other(e);
        match addr {
            Addr::Tcp { host, port, https } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                let _ = s.set_nodelay(true);
                if !*https {
                    // (A TLS server has answered by now; a plain one only
                    // answers HTTP/2's preface, once it is sent.)
                    return Ok((Box::new(s), Some(CONNECT_TIMEOUT)));
                }
                let tls = tls.ok_or_else(|| other("https needs TLS settings (a CA to check the server by)".into()))?;
                let name =
                    rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| other(format!("{host}: {e}")))?;
                Ok((Box::new(tls.connector().connect(name, s).await?), None))
            }
            Addr::Unix { path, tls: secure } => {
                let s = tokio::net::UnixStream::connect(path).await?;
                if !*secure {
                    return Ok((Box::new(s), None));
                }
                let tls =
                    tls.ok_or_else(|| other("unix+tls needs TLS settings (a CA to check the server by)".into()))?;
                let name = rustls::pki_types::ServerName::try_from(testbus_pki::SERVER_NAME)
                    .map_err(|e| other(e.to_string()))?;
                Ok((Box::new(tls.connector().connect(name, s).await?), None))
            }
        }
    }

    async fn connect(self) -> std::io::Result<TokioIo<Box<dyn Io>>> {
        use std::sync::atomic::Ordering;
        let n = self.addrs.len();
        let start = self.last_good.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let ix = (start + i) % n;
            let addr = &self.addrs[ix];
            match tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_one(addr, self.tls.as_ref())).await {
                Ok(Ok((s, first_answer))) => {
                    self.last_good.store(ix, Ordering::Relaxed);
                    let cut = tokio_util::sync::CancellationToken::new();
                    *self.current.lock() = cut.clone();
                    return Ok(TokioIo::new(Box::new(GuardedIo::new(s, first_answer, cut))));
                }
                Ok(Err(e)) if n == 1 => return Err(e),
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: timed out")),
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, errors.join("; ")))
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}

impl Target {
    /// The endpoint (its URI only names the first address; the connector
    /// picks the real one) and the connector.
    fn into_parts(self, tls: Option<Tls>) -> (Endpoint, Connector) {
        let (ep, addrs) = match self {
            Target::Unix(path, tls) => {
                // The URI is ignored by the connector; it only has to parse.
                (keepalive(Endpoint::from_static("http://localhost")), vec![Addr::Unix { path, tls }])
            }
            Target::Http(eps) => {
                let addrs = eps
                    .iter()
                    .map(|e| {
                        let u = e.uri();
                        let https = u.scheme_str() == Some("https");
                        let host = u.host().unwrap_or_default().trim_matches(|c| c == '[' || c == ']').to_string();
                        let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
                        Addr::Tcp { host, port, https }
                    })
                    .collect();
                (eps[0].clone(), addrs)
            }
        };
        // The connector tries each address within CONNECT_TIMEOUT: the
        // channel must give it time to get past a replica that accepts and
        // then stays silent (a stopped one) to the next.
        let n = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
        let ep = ep.connect_timeout(CONNECT_TIMEOUT.saturating_mul(n) + Duration::from_secs(1));
        let connector = Connector {
            addrs: std::sync::Arc::new(addrs),
            tls,
            last_good: Default::default(),
            current: Default::default(),
        };
        (ep, connector)
    }
}

impl Client {
    /// Connects now; fails if the server cannot be reached.
    pub async fn connect(server: &str) -> Result<Client, ConnectError> {
        Self::connect_with(server, None).await
    }

    /// Connects now with TLS settings (used for `https://` addresses and
    /// unix sockets).
    pub async fn connect_with(server: &str, tls: Option<Tls>) -> Result<Client, ConnectError> {
        let unreachable = |e: tonic::transport::Error| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let s_msg = s.to_string();
                if !msg.contains(&s_msg) {
                    msg = format!("{msg}: {s_msg}");
                }
                src = s.source();
            }
            ConnectError::Unreachable(server.to_string(), msg)
        };
        let (ep, connector) = parse_server(server)?.into_parts(tls);
        let channel = ep.connect_with_connector(connector.clone()).await.map_err(unreachable)?;
        Ok(Client { channel, server: server.to_string(), connector })
    }

    /// Connects on first use and reconnects by itself: for daemons that must
    /// start while the server is down.
    pub fn lazy(server: &str) -> Result<Client, ConnectError> {
        Self::lazy_with(server, None)
    }

    pub fn lazy_with(server: &str, tls: Option<Tls>) -> Result<Client, ConnectError> {
        let (ep, connector) = parse_server(server)?.into_parts(tls);
        Ok(Client { channel: ep.connect_with_connector_lazy(connector.clone()), server: server.to_string(), connector })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Gives up the connection in use for the next address, for calls
    /// that time out on it (a replica cut off one way, or stopped, accepts
    /// calls and answers none, and its connection looks alive for 20 s
    /// more): calls on it fail now, and the next one connects again, to
    /// the next address first. False (nothing done) with one address:
    /// there is nowhere else to go, and HTTP/2's keepalive ends a dead
    /// connection.
    pub fn fail_over(&self) -> bool {
        use std::sync::atomic::Ordering;
        let n = self.connector.addrs.len();
        if n < 2 {
            return false;
        }
        let _ = self.connector.last_good.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
        self.connector.current.lock().cancel();
        true
    }

    pub fn api<K: ApiResource>(&self) -> Api<K> {
        Api { channel: self.channel.clone(), _k: std::marker::PhantomData }
    }

    /// Tests' calls; an Exec answer carries one whole Process per member
    /// (its stdin and env each), past tonic's 4 MiB default.
    pub fn tests(&self) -> TestsClient<Channel> {
        TestsClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    pub fn hosts(&self) -> HostsClient<Channel> {
        HostsClient::new(self.channel.clone())
    }

    pub fn output(&self) -> OutputClient<Channel> {
        OutputClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    pub fn auth(&self) -> AuthClient<Channel> {
        AuthClient::new(self.channel.clone())
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// Why a call failed, in a few words a person can read: the innermost
/// cause ("connection refused"), else the status's message. For logs that
/// would otherwise carry tonic's whole debug dump.
pub fn cause(s: &tonic::Status) -> String {
    let mut last = None;
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        last = Some(e.to_string());
        src = e.source();
    }
    let text = last.unwrap_or_else(|| s.message().to_string());
    // "Connection refused (os error 111)" -> "connection refused"
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) if chars.clone().next().is_some_and(char::is_lowercase) => c.to_lowercase().chain(chars).collect(),
        _ => text,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Compacted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "Added",
            EventType::Modified => "Modified",
            EventType::Deleted => "Deleted",
            EventType::Bookmark => "Bookmark",
            EventType::Compacted => "Compacted",
        }
    }
    pub fn parse(s: &str) -> Option<EventType> {
        [Self::Added, Self::Modified, Self::Deleted, Self::Bookmark, Self::Compacted]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// One event of a watch.
#[derive(Debug, Clone)]
pub struct WatchEvent<K> {
    pub kind: EventType,
    pub object: Option<K>,
    pub resource_version: String,
}

/// The verbs every kind has, bound to the generated client of that kind.
pub trait ApiResource: Resource {
    fn create(ch: Channel, obj: Self) -> impl Future<Output = Result<Self, Status>> + Send;
    fn get(ch: Channel, name: String) -> impl Future<Output = Result<Self, Status>> + Send;
    fn list(ch: Channel, req: ListRequest) -> impl Future<Output = Result<(Vec<Self>, String), Status>> + Send;
    fn watch(
        ch: Channel,
        req: WatchRequest,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<WatchEvent<Self>, Status>>, Status>> + Send;
    fn update(ch: Channel, obj: Self) -> impl Future<Output = Result<Self, Status>> + Send;
    fn update_status(ch: Channel, obj: Self) -> impl Future<Output = Result<Self, Status>> + Send;
    fn delete(ch: Channel, req: DeleteRequest) -> impl Future<Output = Result<Self, Status>> + Send;
}

macro_rules! api_resource {
    ($ty:ident, $client:ident) => {
        impl ApiResource for $ty {
            async fn create(ch: Channel, obj: Self) -> Result<Self, Status> {
                Ok($client::new(ch).create(obj).await?.into_inner())
            }
            async fn get(ch: Channel, name: String) -> Result<Self, Status> {
                Ok($client::new(ch).get(GetRequest { name }).await?.into_inner())
            }
            async fn list(ch: Channel, req: ListRequest) -> Result<(Vec<Self>, String), Status> {
                let l = $client::new(ch).max_decoding_message_size(256 << 20).list(req).await?.into_inner();
                Ok((l.items, l.resource_version))
            }
            async fn watch(
                ch: Channel,
                req: WatchRequest,
            ) -> Result<BoxStream<'static, Result<WatchEvent<Self>, Status>>, Status> {
                let s = $client::new(ch).watch(req).await?.into_inner();
                Ok(s.map(|r| {
                    r.and_then(|e| {
                        let kind = EventType::parse(&e.r#type)
                            .ok_or_else(|| Status::internal(format!("unknown event type {:?}", e.r#type)))?;
                        Ok(WatchEvent { kind, object: e.object, resource_version: e.resource_version })
                    })
                })
                .boxed())
            }
            async fn update(ch: Channel, obj: Self) -> Result<Self, Status> {
                Ok($client::new(ch).update(obj).await?.into_inner())
            }
            async fn update_status(ch: Channel, obj: Self) -> Result<Self, Status> {
                Ok($client::new(ch).update_status(obj).await?.into_inner())
            }
            async fn delete(ch: Channel, req: DeleteRequest) -> Result<Self, Status> {
                Ok($client::new(ch).delete(req).await?.into_inner())
            }
        }
    };
}

api_resource!(Host, HostsClient);
api_resource!(Test, TestsClient);
api_resource!(Process, ProcessesClient);
api_resource!(HostPool, HostPoolsClient);

/// The verbs for one kind.
pub struct Api<K> {
    channel: Channel,
    _k: std::marker::PhantomData<fn() -> K>,
}

impl<K> Clone for Api<K> {
    fn clone(&self) -> Self {
        Api { channel: self.channel.clone(), _k: std::marker::PhantomData }
    }
}

impl<K: ApiResource> Api<K> {
    pub async fn create(&self, obj: K) -> Result<K, Status> {
        K::create(self.channel.clone(), obj.with_type_meta()).await
    }
    pub async fn get(&self, name: &str) -> Result<K, Status> {
        K::get(self.channel.clone(), name.to_string()).await
    }
    /// None when the object does not exist.
    pub async fn get_opt(&self, name: &str) -> Result<Option<K>, Status> {
        match self.get(name).await {
            Ok(o) => Ok(Some(o)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }
    pub async fn list(&self, label_selector: &str, field_selector: &str) -> Result<(Vec<K>, String), Status> {
        K::list(
            self.channel.clone(),
            ListRequest { label_selector: label_selector.into(), field_selector: field_selector.into() },
        )
        .await
    }
    pub async fn watch(
        &self,
        resource_version: &str,
        label_selector: &str,
        field_selector: &str,
    ) -> Result<BoxStream<'static, Result<WatchEvent<K>, Status>>, Status> {
        K::watch(
            self.channel.clone(),
            WatchRequest {
                resource_version: resource_version.into(),
                label_selector: label_selector.into(),
                field_selector: field_selector.into(),
            },
        )
        .await
    }
    pub async fn update(&self, obj: K) -> Result<K, Status> {
        K::update(self.channel.clone(), obj).await
    }
    pub async fn update_status(&self, obj: K) -> Result<K, Status> {
        K::update_status(self.channel.clone(), obj).await
    }
    pub async fn delete(&self, name: &str) -> Result<K, Status> {
        K::delete(self.channel.clone(), DeleteRequest { name: name.into(), resource_version: String::new() }).await
    }

    /// Read-modify-write of the status with compare-and-swap, retried on
    /// conflict. `f` returns false to leave the object as it is.
    pub async fn patch_status(&self, name: &str, f: impl FnMut(&mut K) -> bool) -> Result<K, Status> {
        self.patch_status_from(name, None, f).await
    }

    /// [`Api::patch_status`] starting from `known`, a copy the caller
    /// already holds (from a watch, or its own last write), rather than a
    /// read: one round trip when that copy is current. A stale copy costs a
    /// conflict and then a read; `f` declining the known copy also reads,
    /// since the stored object may differ.
    pub async fn patch_status_from(
        &self,
        name: &str,
        known: Option<K>,
        mut f: impl FnMut(&mut K) -> bool,
    ) -> Result<K, Status> {
        if let Some(mut obj) = known {
            if f(&mut obj) {
                match self.update_status(obj).await {
                    Err(s) if s.code() == Code::Aborted => {}
                    r => return r,
                }
            }
        }
        loop {
            let mut obj = self.get(name).await?;
            if !f(&mut obj) {
                return Ok(obj);
            }
            match self.update_status(obj).await {
                Err(s) if s.code() == Code::Aborted => continue,
                r => return r,
            }
        }
    }
}

/// What a [`watcher`] reports.
#[derive(Debug, Clone)]
pub enum WatcherEvent<K> {
    /// A complete, consistent listing: replace what you knew.
    Restarted(Vec<K>),
    Applied(K),
    Deleted(K),
}

/// What a [`watcher_with`] does when its stream breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Watch again from the last revision seen: the events missed are
    /// replayed in order, each object's earlier states included.
    Resume,
    /// List again: each object once, as it is now. For a watcher whose
    /// own memory may go back in time (an agent in a guest reverted to a
    /// snapshot): a replay from its old revision would show it Processes
    /// as they were before it ran them, and it would run them again.
    Relist,
}

/// List, then watch from the listing's revision. When the stream breaks
/// (the connection went, the server restarted), the watch resumes from the
/// last revision seen, and lists again only when the server says that
/// revision is gone (a Compacted event, or OUT_OF_RANGE), as kube's watcher
/// does: a reconnect costs a watch call, not a listing of every object.
/// Retries back off with jitter. The stream never ends; errors are logged
/// at debug and retried.
pub fn watcher<K: ApiResource>(
    api: Api<K>,
    label_selector: String,
    field_selector: String,
) -> impl Stream<Item = WatcherEvent<K>> + Send {
    watcher_with(api, label_selector, field_selector, Reconnect::Resume)
}

/// Where a watcher is.
enum State<K> {
    List,
    /// The stream broke after this revision: watch again from it.
    Resume(String),
    Watch(BoxStream<'static, Result<WatchEvent<K>, Status>>, String),
}

/// [`watcher`], choosing what a reconnect does.
pub fn watcher_with<K: ApiResource>(
    api: Api<K>,
    label_selector: String,
    field_selector: String,
    reconnect: Reconnect,
) -> impl Stream<Item = WatcherEvent<K>> + Send {
    let after_break = move |rv: String| match reconnect {
        Reconnect::Resume => State::Resume(rv),
        Reconnect::Relist => State::List,
    };
    let backoff_max = Duration::from_secs(5);
    futures::stream::unfold((State::<K>::List, Duration::from_millis(50)), move |(state, mut backoff)| {
        let api = api.clone();
        let ls = label_selector.clone();
        let fs = field_selector.clone();
        async move {
            let mut state = state;
            loop {
                match state {
                    State::List => match api.list(&ls, &fs).await {
                        Ok((items, rv)) => match api.watch(&rv, &ls, &fs).await {
                            Ok(stream) => {
                                return Some((
                                    WatcherEvent::Restarted(items),
                                    (State::Watch(stream, rv), Duration::from_millis(50)),
                                ))
                            }
                            Err(s) => {
                                tracing::debug!(kind = %K::KIND, error = %s, "watch failed");
                                sleep_jittered(&mut backoff, backoff_max).await;
                                state = State::List;
                            }
                        },
                        Err(s) => {
                            tracing::debug!(kind = %K::KIND, error = %s, "list failed");
                            sleep_jittered(&mut backoff, backoff_max).await;
                            state = State::List;
                        }
                    },
                    State::Resume(rv) => match api.watch(&rv, &ls, &fs).await {
                        Ok(stream) => state = State::Watch(stream, rv),
                        Err(s) if s.code() == tonic::Code::OutOfRange => state = State::List,
                        Err(s) => {
                            tracing::debug!(kind = %K::KIND, error = %s, "watch failed; resuming");
                            sleep_jittered(&mut backoff, backoff_max).await;
                            state = State::Resume(rv);
                        }
                    },
                    State::Watch(mut stream, rv) => match stream.next().await {
                        Some(Ok(ev)) => {
                            let rv = if ev.resource_version.is_empty() { rv } else { ev.resource_version.clone() };
                            let out = match (ev.kind, ev.object) {
                                (EventType::Added | EventType::Modified, Some(o)) => WatcherEvent::Applied(o),
                                (EventType::Deleted, Some(o)) => WatcherEvent::Deleted(o),
                                (EventType::Compacted, _) => {
                                    state = State::List;
                                    continue;
                                }
                                _ => {
                                    state = State::Watch(stream, rv);
                                    continue;
                                }
                            };
                            return Some((out, (State::Watch(stream, rv), Duration::from_millis(50))));
                        }
                        Some(Err(s)) => {
                            tracing::debug!(kind = %K::KIND, error = %s, "watch broke; resuming");
                            sleep_jittered(&mut backoff, backoff_max).await;
                            state = after_break(rv);
                        }
                        None => {
                            sleep_jittered(&mut backoff, backoff_max).await;
                            state = after_break(rv);
                        }
                    },
                }
            }
        }
    })
}

async fn sleep_jittered(backoff: &mut Duration, max: Duration) {
    // Jitter from the clock's low bits: good enough to spread reconnects.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let jitter = Duration::from_nanos(u64::from(nanos) % (backoff.as_nanos() as u64 / 2 + 1));
    tokio::time::sleep(*backoff / 2 + jitter).await;
    *backoff = (*backoff * 2).min(max);
}
