//! Plain HTTP served beside gRPC on the same listeners (axum routes merged
//! with tonic's): `/metrics` in Prometheus's text format, and the
//! dashboard.
//!
//! The dashboard reads only through the API and the watch hub, as every
//! other client does: objects through [`ResourceService`] with the caller's
//! scope, output through [`OutputService`]'s `Read`, changes through hub
//! subscriptions. It writes a login cookie (and, at log-out, deletes that
//! session's token), and an admin's two actions through the API as that
//! caller: Cancel (`Tests.Finish` with `cancel`) and Rerun (`Tests.Create`
//! of a copy).
//!
//! Who may look: a caller admitted as for the API (`auth::authorize_caller`:
//! a viewer's or an admin's certificate, the local socket, an `--insecure`
//! listener), or a browser holding a dashboard login token in its cookie
//! (`token create --viewer`, or `--admin` to act). Agents may not.
//!
//! Forms: every POST must come from this dashboard's own pages (its Origin
//! or Referer) and, for actions, carry the caller's CSRF token
//! ([`csrf_token`]), which another site can neither read nor make.
//!
//! Live pages: each `<main>` names an events URL; a server-sent event
//! `change` there (debounced; fed by the hub, never by polling) makes the
//! page fetch itself again as a fragment and swap it in.
mod graph;
mod live;
mod pages;

use crate::api::ResourceService;
use crate::authz::{Caller, Scope, Verb};
use crate::output::OutputService;
use crate::state::ApiState;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::Markup;
use std::sync::Arc;
use testbus_proto::{Host, HostPool, ListRequest, Process, Resource, Test};

/// What every dashboard handler holds.
#[derive(Clone)]
pub struct Web {
    st: ApiState,
    output: OutputService,
    /// Login cookies are marked Secure when the listeners speak TLS.
    secure_cookie: bool,
    /// Live streams (page events and logs) open at once, all browsers
    /// together: each holds a task and hub subscriptions.
    streams: Arc<tokio::sync::Semaphore>,
    /// The same, per identity (a viewer, a dashboard session): one caller
    /// cannot hold them all.
    streams_per_identity: Arc<crate::quota::Quota>,
    /// Made at start: the CSRF tokens of callers without a session cookie
    /// are digests of it (see [`csrf_token`]).
    csrf_secret: Arc<[u8; 32]>,
}

/// Live streams one identity may hold at once (a few browser tabs).
pub const MAX_LIVE_STREAMS_PER_IDENTITY: usize = 16;

/// Live streams the dashboard serves at once; more are refused (503) until
/// some end.
pub const MAX_LIVE_STREAMS: usize = 256;

/// The login cookie: a viewer token.
const SESSION_COOKIE: &str = "testbus_session";
/// Asks for the page's `<main>` alone (the live refresh).
const FRAGMENT_HEADER: &str = "x-testbus-fragment";

pub fn routes(st: ApiState, output: OutputService) -> axum::Router {
    let secure_cookie = st.pki.is_some();
    let web = Web {
        st,
        output,
        secure_cookie,
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_LIVE_STREAMS)),
        streams_per_identity: crate::quota::Quota::new("live streams", MAX_LIVE_STREAMS_PER_IDENTITY),
        csrf_secret: Arc::new(rand::random()),
    };
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(overview))
        .route("/tests/{name}", get(test_page))
        .route("/tests/{name}/logs", get(test_logs))
        .route("/tests/{name}/cancel", axum::routing::post(cancel_test))
        .route("/tests/{name}/rerun", axum::routing::post(rerun_test))
        .route("/tests/{file}/{report}", get(report))
        .route("/processes/{name}/logs", get(process_logs))
        .route("/hosts/{name}", get(host_page))
        .route("/history", get(history))
        .route("/events", get(live::events))
        .route("/logs", get(live::logs))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/static/app.js", get(|| async { asset("text/javascript", include_str!("assets/app.js")) }))
        .route("/static/style.css", get(|| async { asset("text/css", include_str!("assets/style.css")) }))
        .layer(axum::middleware::from_fn(loopback_names_only))
        .with_state(web)
}

/// An `--insecure` listener admits whoever reaches it, which a web page
/// can make a browser do by rebinding its own name to 127.0.0.1: every
/// plain HTTP request there (pages, `/metrics`, `/login`) must name a
/// loopback host.
async fn loopback_names_only(req: Request, next: axum::middleware::Next) -> Response {
    if matches!(caller(&req), Caller::Insecure) && !loopback_host(&request_host(&req)) {
        return (
            StatusCode::FORBIDDEN,
            "an insecure listener serves the dashboard to loopback names only (Host: 127.0.0.1, localhost, [::1])\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// What answers a request no route serves: gRPC's Unimplemented to gRPC
/// clients, 404 to everyone else.
pub async fn fallback(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("no such method").into_http::<axum::body::Body>().into_response();
    }
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}

/// The host a request names: its Host header (HTTP/1.1), or its URI's
/// authority (HTTP/2's `:authority`).
fn request_host(req: &Request) -> String {
    host_of(req.headers(), req.uri())
}

fn host_of(headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default()
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// Why a caller may not look, as the answer it gets.
pub(crate) enum Refused {
    /// No identity: a page sends the browser to log in.
    Login,
    Status(tonic::Status),
}

impl Refused {
    fn into_response(self, page: bool) -> Response {
        match self {
            Refused::Login if page => Redirect::to("/login").into_response(),
            Refused::Login => (StatusCode::UNAUTHORIZED, "log in with a viewer token at /login\n").into_response(),
            Refused::Status(s) => (http_status(s.code()), format!("{}\n", s.message())).into_response(),
        }
    }
}

/// A caller the dashboard let in: what it may read, and who it is to the
/// API (a browser with a viewer token is a viewer there too, one with an
/// admin token an admin).
pub(crate) struct Admitted {
    pub scope: Scope,
    pub caller: Caller,
    pub headers: HeaderMap,
    /// Its login cookie, for a browser's session (what its CSRF token is
    /// made from: [`Web::csrf`]).
    pub session: Option<String>,
}

/// The token an admitted caller's forms must carry: a digest of its login
/// cookie (a browser's session: the same on every replica), else of this
/// dashboard's secret and the caller's identity (a certificate, the local
/// socket, an insecure listener). Pages of another site can neither read
/// it (the same-origin policy) nor make it (they know neither input).
fn csrf_token(secret: &[u8; 32], session: Option<&str>, caller: &Caller) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"testbus-dashboard-csrf\0");
    match session {
        Some(token) => h.update(token.as_bytes()),
        None => {
            h.update(secret);
            h.update(caller.describe().as_bytes());
        }
    }
    hex::encode(h.finalize())
}

impl Web {
    /// The one gate of every dashboard request: a viewer, an admin, the
    /// local socket or an insecure listener; agents are refused.
    pub(crate) async fn admit(&self, caller: Caller, headers: HeaderMap) -> Result<Admitted, Refused> {
        match crate::auth::authorize_caller(self.st.pki.as_deref(), &caller, Verb::Get, crate::authz::Target::Dashboard)
        {
            Ok(Scope::All) => return Ok(Admitted { scope: Scope::All, caller, headers, session: None }),
            Ok(Scope::Host { .. }) => {
                return Err(Refused::Status(tonic::Status::permission_denied(format!(
                    "{}: agents do not read the dashboard",
                    caller.describe()
                ))))
            }
            Err(s) if !matches!(caller, Caller::Anonymous) => return Err(Refused::Status(s)),
            Err(_) => {}
        }
        let Some(token) = cookie(&headers, SESSION_COOKIE) else { return Err(Refused::Login) };
        match crate::auth::check_dashboard_token(&self.st, token).await {
            Ok((role, _)) => {
                // Each session is an identity of its own (its quotas).
                let id = token.parse::<testbus_pki::JoinToken>().map(|t| t.id).unwrap_or_default();
                let caller = Caller::Certified {
                    name: format!("dashboard-session-{id}"),
                    role,
                    issued: std::time::SystemTime::now(),
                    pool: None,
                };
                let session = Some(token.to_string());
                Ok(Admitted { scope: Scope::All, caller, headers, session })
            }
            Err(_) => Err(Refused::Login),
        }
    }

    pub(crate) async fn list<K: crate::api::Policy>(
        &self,
        scope: &Scope,
        req: ListRequest,
    ) -> Result<Vec<K>, Response> {
        ResourceService::<K>::new(self.st.clone()).list(scope, req).await.map(|(v, _)| v).map_err(status_page)
    }

    async fn get<K: crate::api::Policy>(&self, scope: &Scope, name: &str) -> Result<K, Response> {
        let req = testbus_proto::GetRequest { name: name.to_string() };
        ResourceService::<K>::new(self.st.clone()).get(scope, req).await.map_err(status_page)
    }
}

/// Whether `host` (a Host header: `NAME[:PORT]`) names a loopback host:
/// `localhost`, a loopback IPv4 address or `[::1]`, with a port of digits
/// or none; nothing else (no user info, no path, no other name that
/// happens to start like one).
fn loopback_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6, port),
            None => return false,
        },
        None => host.find(':').map_or((host, ""), |i| (&host[..i], &host[i..])),
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let loopback = if host.starts_with('[') {
        name.parse::<std::net::Ipv6Addr>().is_ok_and(|ip| ip.is_loopback())
    } else {
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    };
    port_ok && loopback
}

/// Whether a form POST comes from a page of this dashboard: its Origin (or,
/// without one, its Referer) is this server's own. A cross-site form that
/// logs a browser in as someone else (login CSRF) or out is refused.
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri, tls: bool) -> bool {
    let own = format!("{}://{}", if tls { "https" } else { "http" }, host_of(headers, uri));
    let value = |h| headers.get(h).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    match (value(header::ORIGIN), value(header::REFERER)) {
        (Some(origin), _) => origin == own,
        (None, Some(referer)) => referer == own || referer.starts_with(&format!("{own}/")),
        (None, None) => false,
    }
}

fn cross_site() -> Response {
    (StatusCode::FORBIDDEN, "refused: this form was not sent from this dashboard's own pages\n").into_response()
}

/// A live stream's share of both limits: the dashboard's and its caller's.
pub(crate) struct StreamPermit {
    _all: tokio::sync::OwnedSemaphorePermit,
    _mine: Option<crate::quota::QuotaGuard>,
}

/// A permit for one more live stream of `caller`, if fewer than
/// MAX_LIVE_STREAMS are open and the caller holds fewer than its share;
/// otherwise the answer that says which limit.
fn stream_permit(web: &Web, caller: &Caller) -> Result<StreamPermit, (StatusCode, String)> {
    let mine = web
        .streams_per_identity
        .take(caller)
        .map_err(|s| (StatusCode::TOO_MANY_REQUESTS, format!("{}\n", s.message())))?;
    let Ok(all) = web.streams.clone().try_acquire_owned() else {
        let msg = format!("the dashboard serves {MAX_LIVE_STREAMS} live streams at most; try again later\n");
        return Err((StatusCode::SERVICE_UNAVAILABLE, msg));
    };
    Ok(StreamPermit { _all: all, _mine: mine })
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The one mapping of the API's answers to HTTP's, for every dashboard
/// response (pages and plain text alike).
fn http_status(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists | tonic::Code::Aborted => StatusCode::CONFLICT,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn status_page(s: tonic::Status) -> Response {
    let code = http_status(s.code());
    (code, pages::layout("error", None, maud::html! { h1 { (code) } p.why { (s.message()) } })).into_response()
}

pub(crate) fn caller(req: &Request) -> Caller {
    Caller::in_extensions(req.extensions())
}

/// A page, or its `<main>` alone when the live refresh asks for it.
fn page(headers: &HeaderMap, title: &str, live: Option<&str>, main: Markup) -> Response {
    let html = if headers.contains_key(FRAGMENT_HEADER) { main } else { pages::layout(title, live, main) };
    ([(header::CACHE_CONTROL, "no-store"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], html).into_response()
}

/// Admits the request or returns the answer that refuses it.
macro_rules! admit {
    ($web:expr, $req:expr, $page:expr) => {{
        match $web.admit(caller(&$req), $req.headers().clone()).await {
            Ok(a) => {
                // A browser without a certificate that its session let in:
                // its connection has proven itself.
                crate::authz::ConnInfo::prove($req.extensions());
                a
            }
            Err(r) => return r.into_response($page),
        }
    }};
}
pub(crate) use admit;

async fn metrics(State(web): State<Web>, req: Request) -> Response {
    // Scrapers present a certificate; they have no login page.
    if let Err(s) =
        crate::auth::authorize_caller(web.st.pki.as_deref(), &caller(&req), Verb::Get, crate::authz::Target::Metrics)
    {
        return Refused::Status(s).into_response(false);
    }
    match web.st.metrics.render(web.st.store.as_ref()).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

#[derive(serde::Deserialize, Default)]
struct Paging {
    hosts: Option<usize>,
    tests: Option<usize>,
}

async fn overview(State(web): State<Web>, Query(paging): Query<Paging>, req: Request) -> Response {
    let Admitted { scope, headers, .. } = admit!(web, req, true);
    let tests: Vec<Test> = match web.list(&scope, ListRequest::default()).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut hosts: Vec<Host> = match web.list(&scope, ListRequest::default()).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let pools: Vec<HostPool> = match web.list(&scope, ListRequest::default()).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    hosts.sort_by(|a, b| a.name().cmp(b.name()));
    let mut newest: Vec<&Test> = tests.iter().collect();
    newest.sort_by(|a, b| {
        b.meta().creation_timestamp.cmp(&a.meta().creation_timestamp).then_with(|| a.name().cmp(b.name()))
    });
    let mut queue: Vec<&Test> = tests.iter().filter(|t| testbus_proto::states::waits_for_hosts(t)).collect();
    queue.sort_by(|a, b| testbus_controllers::schedule::queue_order(a, b));
    let clamp = |p: Option<usize>, n: usize, per: usize| p.unwrap_or(1).clamp(1, n.div_ceil(per).max(1));
    let o = pages::Overview {
        host_page: clamp(paging.hosts, hosts.len(), pages::HOSTS_PER_PAGE),
        test_page: clamp(paging.tests, newest.len(), pages::TESTS_PER_PAGE),
        tests: &newest,
        queue: &queue,
        hosts: &hosts,
        pools: &pools,
    };
    page(&headers, "overview", Some("/events?page=overview"), pages::overview(&o))
}

async fn test_page(State(web): State<Web>, Path(name): Path<String>, req: Request) -> Response {
    let Admitted { scope, headers, caller, session } = admit!(web, req, true);
    let t = match web.get::<Test>(&scope, &name).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    // The end of each failed process's stderr, as `describe` shows it.
    let mut failed = Vec::new();
    for (step, p) in testbus_report::failed_processes(&t, None).into_iter().take(pages::FAILED_SHOWN) {
        let Ok(out) = live::read_all(&web, &caller, &p.name).await else { continue };
        let lines = testbus_report::last_lines(&out.stderr, testbus_report::FAILED_TAIL_LINES);
        if !lines.is_empty() {
            failed.push(pages::FailedOutput { step: step.to_string(), process: p.clone(), lines });
        }
    }
    let csrf = web.csrf(session.as_deref(), &caller);
    let extras = pages::TestExtras { failed, csrf, may_act: web.may_act(&caller) };
    page(&headers, &format!("test/{name}"), Some(&format!("/events?page=test/{name}")), pages::test(&t, &extras))
}

impl Web {
    /// The CSRF token of `caller`'s forms (`session`: its login cookie).
    fn csrf(&self, session: Option<&str>, caller: &Caller) -> String {
        csrf_token(&self.csrf_secret, session, caller)
    }

    /// Whether `caller` may cancel and rerun tests (an admin).
    fn may_act(&self, caller: &Caller) -> bool {
        crate::auth::authorize_caller(self.st.pki.as_deref(), caller, Verb::Finish, testbus_proto::Kind::Test.into())
            .is_ok()
            && crate::auth::authorize_caller(
                self.st.pki.as_deref(),
                caller,
                Verb::Create,
                testbus_proto::Kind::Test.into(),
            )
            .is_ok()
    }

    /// The checks of an action's POST, in order: from this dashboard's own
    /// pages, by a caller who may act, with that caller's CSRF token.
    async fn admit_action(&self, req: Request) -> Result<Caller, Response> {
        let tls = self.secure_cookie;
        if !same_origin(req.headers(), req.uri(), tls) {
            return Err(cross_site());
        }
        let admitted = match self.admit(caller(&req), req.headers().clone()).await {
            Ok(a) => a,
            Err(r) => return Err(r.into_response(false)),
        };
        if !self.may_act(&admitted.caller) {
            let msg = format!("{} may not cancel or rerun tests (an admin may)\n", admitted.caller.describe());
            return Err((StatusCode::FORBIDDEN, msg).into_response());
        }
        crate::authz::ConnInfo::prove(req.extensions());
        use axum::extract::FromRequest;
        let axum::Form(form) =
            axum::Form::<ActionForm>::from_request(req, &()).await.map_err(IntoResponse::into_response)?;
        use subtle::ConstantTimeEq;
        let expected = self.csrf(admitted.session.as_deref(), &admitted.caller);
        if !bool::from(form.csrf.as_bytes().ct_eq(expected.as_bytes())) {
            let msg = "csrf: this form's token is not this session's; reload the page and try again\n";
            return Err((StatusCode::FORBIDDEN, msg).into_response());
        }
        Ok(admitted.caller)
    }
}

#[derive(serde::Deserialize)]
struct ActionForm {
    csrf: String,
}

/// The API's answer to a request made for `caller`.
fn as_caller<T>(caller: Caller, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(caller);
    r
}

/// `POST /tests/NAME/cancel`: the test ends Cancelled ("cancelled by …"),
/// and the browser goes back to its page.
async fn cancel_test(State(web): State<Web>, Path(name): Path<String>, req: Request) -> Response {
    let caller = match web.admit_action(req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let svc = ResourceService::<Test>::new(web.st.clone());
    let msg = testbus_proto::FinishRequest { test: name.clone(), cancel: true, ..Default::default() };
    match testbus_proto::tests_server::Tests::finish(&svc, as_caller(caller, msg)).await {
        Ok(_) => Redirect::to(&format!("/tests/{name}")).into_response(),
        Err(s) => status_page(s),
    }
}

/// `POST /tests/NAME/rerun`: a new test with the same spec and labels
/// (named as the first run was: its generateName, or NAME-), annotated
/// with the run it repeats; the browser goes to its page.
async fn rerun_test(State(web): State<Web>, Path(name): Path<String>, req: Request) -> Response {
    let caller = match web.admit_action(req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let t: Test = match web.get(&Scope::All, &name).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let rerun = testbus_proto::RerunRequest { test: t.name().into(), ..Default::default() };
    let svc = ResourceService::<Test>::new(web.st.clone());
    match testbus_proto::tests_server::Tests::rerun(&svc, as_caller(caller, rerun)).await {
        Ok(made) => Redirect::to(&format!("/tests/{}", made.into_inner().name())).into_response(),
        Err(s) => status_page(s),
    }
}

pub use testbus_proto::rerun::RERUN_OF;

async fn host_page(State(web): State<Web>, Path(name): Path<String>, req: Request) -> Response {
    let Admitted { scope, headers, .. } = admit!(web, req, true);
    let h: Host = match web.get(&scope, &name).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let req = ListRequest { field_selector: format!("spec.hostName={name}"), ..Default::default() };
    let mut procs: Vec<Process> = web.list(&scope, req).await.unwrap_or_default();
    procs.sort_by(|a, b| b.meta().creation_timestamp.cmp(&a.meta().creation_timestamp));
    procs.truncate(100);
    page(&headers, &format!("host/{name}"), Some(&format!("/events?page=host/{name}")), pages::host(&h, &procs))
}

async fn test_logs(State(web): State<Web>, Path(name): Path<String>, req: Request) -> Response {
    let Admitted { scope, headers, .. } = admit!(web, req, true);
    if let Err(r) = web.get::<Test>(&scope, &name).await {
        return r;
    }
    let back = maud::html! { "Every process of " a href={"/tests/" (name)} { "test/" (name) } ", as it prints." };
    page(
        &headers,
        &format!("logs of {name}"),
        None,
        pages::logs(&format!("test/{name}: output"), back, &stream_url("test", &name)),
    )
}

async fn process_logs(State(web): State<Web>, Path(name): Path<String>, req: Request) -> Response {
    let Admitted { scope, headers, .. } = admit!(web, req, true);
    let p: Process = match web.get(&scope, &name).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let back = maud::html! {
        "Step " (p.spec().step) " of " a href={"/tests/" (p.spec().test)} { "test/" (p.spec().test) }
        " on " a href={"/hosts/" (p.spec().host_name)} { (p.spec().host_name) }
    };
    page(
        &headers,
        &format!("logs of {name}"),
        None,
        pages::logs(&format!("process/{name}"), back, &stream_url("process", &name)),
    )
}

fn stream_url(what: &str, name: &str) -> String {
    // Names are DNS labels (validated on create): nothing to escape.
    format!("/logs?{what}={name}")
}

/// `/tests/NAME/report.xml|tap|json|txt`: the report `testbusctl results`
/// prints, as a download.
async fn report(State(web): State<Web>, Path((name, file)): Path<(String, String)>, req: Request) -> Response {
    let Admitted { scope, caller, .. } = admit!(web, req, false);
    let (fmt, kind) = match file.as_str() {
        "report.xml" => (testbus_report::ReportFormat::Junit, "application/xml"),
        "report.tap" => (testbus_report::ReportFormat::Tap, "text/plain; charset=utf-8"),
        "report.json" => (testbus_report::ReportFormat::Json, "application/json"),
        "report.txt" => (testbus_report::ReportFormat::Text, "text/plain; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "report.xml, report.tap, report.json or report.txt\n").into_response(),
    };
    let t: Test = match web.get(&scope, &name).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut outputs = std::collections::HashMap::new();
    if fmt == testbus_report::ReportFormat::Junit {
        for p in t.status().steps.iter().flat_map(|s| &s.processes) {
            if let Ok(o) = live::read_all(&web, &caller, &p.name).await {
                outputs.insert(p.name.clone(), o);
            }
        }
    }
    let body = testbus_report::render(&t, fmt, &outputs);
    let disposition = format!("attachment; filename=\"{name}-{file}\"");
    ([(header::CONTENT_TYPE, kind.to_string()), (header::CONTENT_DISPOSITION, disposition)], body).into_response()
}

#[derive(serde::Deserialize, Default)]
struct HistoryQuery {
    #[serde(default)]
    label: String,
}

async fn history(State(web): State<Web>, Query(q): Query<HistoryQuery>, req: Request) -> Response {
    let Admitted { scope, headers, .. } = admit!(web, req, true);
    let mut runs: Vec<Test> = Vec::new();
    if !q.label.is_empty() {
        let req = ListRequest { label_selector: q.label.clone(), ..Default::default() };
        runs = match web.list(&scope, req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
    }
    runs.sort_by(|a, b| {
        a.meta().creation_timestamp.cmp(&b.meta().creation_timestamp).then_with(|| a.name().cmp(b.name()))
    });
    let skip = runs.len().saturating_sub(pages::HISTORY_RUNS);
    let refs: Vec<&Test> = runs.iter().skip(skip).collect();
    page(&headers, "history", Some("/events?page=history"), pages::history(&q.label, &refs))
}

async fn login_page(req: Request) -> Response {
    page(req.headers(), "log in", None, pages::login(None))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(web): State<Web>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    if !same_origin(&headers, &uri, web.secure_cookie) {
        return cross_site();
    }
    match crate::auth::check_dashboard_token(&web.st, f.token.trim()).await {
        Ok((_, expires)) => {
            let left = expires.saturating_sub(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            );
            let secure = if web.secure_cookie { "; Secure" } else { "" };
            let cookie = format!(
                "{SESSION_COOKIE}={}; Path=/; Max-Age={left}; HttpOnly; SameSite=Strict{secure}",
                f.token.trim()
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(s) => {
            (StatusCode::UNAUTHORIZED, page(&headers, "log in", None, pages::login(Some(s.message())))).into_response()
        }
    }
}

/// Ends the browser's session: its login token is revoked (a copy of the
/// cookie logs nothing in after this) and the cookie cleared.
async fn logout(State(web): State<Web>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    if !same_origin(&headers, &uri, web.secure_cookie) {
        return cross_site();
    }
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        if let Err(s) = crate::auth::end_dashboard_session(&web.st, token).await {
            tracing::debug!(error = %s.message(), "logging out a session that was not live");
        }
    }
    let secure = if web.secure_cookie { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's CSRF token follows its cookie (the same on every
    /// replica); a caller without one gets one from this dashboard's secret
    /// and its identity. No two callers share one.
    #[test]
    fn csrf_tokens_are_the_callers_own() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let viewer = Caller::Certified {
            name: "dashboard-session-x".into(),
            role: testbus_pki::Role::Viewer,
            issued: std::time::SystemTime::now(),
            pool: None,
        };
        let session = csrf_token(&a, Some("tbjoin.one"), &viewer);
        assert_eq!(session, csrf_token(&b, Some("tbjoin.one"), &viewer), "the cookie alone decides");
        assert_ne!(session, csrf_token(&a, Some("tbjoin.two"), &viewer));
        assert_eq!(session.len(), 64);
        let local = csrf_token(&a, None, &Caller::Local);
        assert_ne!(local, csrf_token(&b, None, &Caller::Local), "another dashboard, another secret");
        assert_ne!(local, csrf_token(&a, None, &Caller::Insecure));
        assert_ne!(local, csrf_token(&a, None, &viewer));
    }

    /// One mapping of the API's answers (a refusal at the gate was always
    /// 403, a NotFound there included; a page's was 404).
    #[test]
    fn every_response_maps_the_apis_answers_one_way() {
        assert_eq!(http_status(tonic::Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(tonic::Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(tonic::Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        let refused = Refused::Status(tonic::Status::not_found("x")).into_response(false);
        assert_eq!(refused.status(), status_page(tonic::Status::not_found("x")).status());
    }

    #[test]
    fn an_insecure_listener_answers_loopback_names_only() {
        for ok in ["127.0.0.1:7780", "localhost:7780", "localhost", "[::1]:7780", "[::1]", "127.9.9.9", "LOCALHOST:1"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:7780",
            "evil.example",
            "10.0.0.1:7780",
            "[::2]:80",
            "localhost.evil.example",
            "localhost:17780@evil.example",
            "127.0.0.1:80@evil.example",
            "localhost:80/x",
            "localhost:",
            "localhost:123456",
            "[::1]evil",
            "[::1]:80:80",
            "[127.0.0.1]",
            "",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn forms_are_taken_from_this_dashboards_own_pages_only() {
        let uri: axum::http::Uri = "/login".parse().unwrap();
        let with = |pairs: &[(header::HeaderName, &str)]| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, "10.0.0.1:7780".parse().unwrap());
            for (k, v) in pairs {
                m.insert(k.clone(), v.parse().unwrap());
            }
            same_origin(&m, &uri, true)
        };
        assert!(with(&[(header::ORIGIN, "https://10.0.0.1:7780")]));
        assert!(with(&[(header::REFERER, "https://10.0.0.1:7780/login")]));
        assert!(!with(&[(header::ORIGIN, "https://evil.example")]));
        assert!(!with(&[(header::ORIGIN, "http://10.0.0.1:7780")]), "another scheme is another origin");
        assert!(!with(&[(header::ORIGIN, "null")]));
        assert!(!with(&[(header::REFERER, "https://10.0.0.1:7780.evil.example/")]));
        assert!(!with(&[(header::ORIGIN, "https://evil.example"), (header::REFERER, "https://10.0.0.1:7780/")]));
        assert!(!with(&[]), "neither: refused");
    }
}
