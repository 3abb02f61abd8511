//! Server-sent events: page changes fed by watch-hub subscriptions, and
//! output followed through the Output API.
//!
//! Each stream is one task that ends when the browser goes away (its
//! channel closes) or what it follows ends; hub subscriptions are dropped
//! with it. Changes are debounced: a burst of writes is one `change`.
use super::{admit, caller, Admitted, Web};
use crate::hub::{Filter, HubEvent};
use axum::extract::{Query, Request, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use testbus_client::EventType;
use testbus_proto::output_server::Output as _;
use testbus_proto::{Kind, Object, Resource};
use tokio::sync::mpsc;

/// Changes closer together than this are one `change` event.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Processes one test's log stream follows at most.
const MAX_FOLLOWED: usize = 128;
/// Longest line sent; the rest is cut (the full output is in `testbusctl logs`).
const MAX_LINE: usize = 4096;

#[derive(serde::Deserialize)]
pub(super) struct LiveQuery {
    page: String,
}

/// What a page shows, to decide whether an event changes it. (A page of
/// one object subscribes to that object alone: the hub filters by name.)
enum Watched {
    /// Tests, hosts (only what the overview shows of them) and pools.
    Overview { hosts: HashMap<String, u64> },
    /// Every event of its subscriptions is a change.
    Everything,
}

/// Only the object named `name`, filtered where the hub fans out.
fn named(name: &str) -> Filter {
    let fields = testbus_proto::selector::FieldSelector { name: Some(name.to_string()), ..Default::default() };
    Filter { fields, ..Default::default() }
}

/// The part of a host the overview shows: a lease renewal alone is not a
/// change (10,000 hosts renew every few seconds).
fn host_digest(h: &testbus_proto::Host) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut s = std::collections::hash_map::DefaultHasher::new();
    let st = h.status();
    (&st.phase, &st.capabilities, h.spec().unschedulable, &h.spec().pool).hash(&mut s);
    st.claim.as_ref().map(|c| (&c.test, &c.role)).hash(&mut s);
    st.facts.as_ref().map(|f| &f.transport).hash(&mut s);
    s.finish()
}

impl Watched {
    fn changed_by(&mut self, e: &HubEvent) -> bool {
        match (self, &e.object) {
            (Watched::Overview { hosts }, Object::Host(h)) if e.kind == EventType::Deleted => {
                hosts.remove(h.name());
                true
            }
            (Watched::Overview { hosts }, Object::Host(h)) => {
                let d = host_digest(h);
                hosts.insert(h.name().to_string(), d) != Some(d)
            }
            _ => true,
        }
    }
}

pub(super) async fn events(State(web): State<Web>, Query(q): Query<LiveQuery>, req: Request) -> Response {
    let Admitted { scope, caller, .. } = admit!(web, req, false);
    let hub = &web.st.hub;
    let sub = |kind: Kind, index: Option<String>, filter: Filter| hub.watch(kind, None, index, filter);
    let all = Filter::default;
    let (watched, subs) = match q.page.split_once('/') {
        None if q.page == "overview" => {
            let hosts: Vec<testbus_proto::Host> = match web.list(&scope, Default::default()).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let hosts = hosts.iter().map(|h| (h.name().to_string(), host_digest(h))).collect();
            let subs =
                vec![sub(Kind::Test, None, all()), sub(Kind::Host, None, all()), sub(Kind::HostPool, None, all())];
            (Watched::Overview { hosts }, subs)
        }
        None if q.page == "history" => (Watched::Everything, vec![sub(Kind::Test, None, all())]),
        Some(("test", name)) => (Watched::Everything, vec![sub(Kind::Test, None, named(name))]),
        Some(("host", name)) => {
            let subs = vec![sub(Kind::Host, None, named(name)), sub(Kind::Process, Some(name.into()), all())];
            (Watched::Everything, subs)
        }
        _ => {
            let msg = "page: overview, history, test/NAME or host/NAME\n";
            return (axum::http::StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    let permit = match super::stream_permit(&web, &caller) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    // Subscriptions from now: nothing can be too old. Each ends with a
    // None, so that losing any of them ends the stream (and the browser
    // reconnects afresh) instead of going on deaf to that kind.
    let subs: Vec<_> =
        subs.into_iter().filter_map(Result::ok).map(|s| s.map(Some).chain(futures::stream::iter([None]))).collect();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(4);
    tokio::spawn(async move {
        debounce(futures::stream::select_all(subs), watched, tx).await;
        drop(permit);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

/// Sends `change` once per burst of events that change what is watched;
/// ends when the browser goes away or the hub drops a subscription (the
/// browser reconnects and starts afresh).
async fn debounce(
    mut events: impl futures::Stream<Item = Option<Arc<HubEvent>>> + Unpin,
    mut watched: Watched,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    loop {
        let e = tokio::select! {
            _ = tx.closed() => return,
            e = events.next() => e,
        };
        let Some(Some(e)) = e else { return };
        if !watched.changed_by(&e) {
            continue;
        }
        let mut revision = e.revision;
        let until = tokio::time::Instant::now() + DEBOUNCE;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                e = events.next() => match e {
                    Some(Some(e)) => {
                        watched.changed_by(&e);
                        revision = revision.max(e.revision);
                    }
                    _ => break,
                },
            }
        }
        if tx.send(Ok(Event::default().event("change").data(revision.to_string()))).await.is_err() {
            return;
        }
    }
}

/// A process's output (not followed) as a report keeps it.
pub(super) async fn read_all(
    web: &Web,
    caller: &crate::authz::Caller,
    process: &str,
) -> Result<testbus_report::Output, tonic::Status> {
    let mut stream = read(web, caller, process, false).await?;
    let mut tail = testbus_report::OutputTail::default();
    while let Some(c) = stream.next().await {
        let c = c?;
        if !c.notice {
            tail.push(c.stream, &c.data);
        }
    }
    Ok(tail.finish())
}

async fn read(
    web: &Web,
    caller: &crate::authz::Caller,
    process: &str,
    follow: bool,
) -> Result<futures::stream::BoxStream<'static, Result<testbus_proto::OutputChunk, tonic::Status>>, tonic::Status> {
    let mut req =
        tonic::Request::new(testbus_proto::ReadOutputRequest { process: process.into(), follow, stdin: false });
    req.extensions_mut().insert(caller.clone());
    Ok(web.output.read(req).await?.into_inner())
}

#[derive(serde::Deserialize)]
pub(super) struct LogsQuery {
    test: Option<String>,
    process: Option<String>,
}

/// One line as the log page gets it.
#[derive(serde::Serialize)]
struct Line<'a> {
    /// Where it came from: `step role@host`.
    from: &'a str,
    stderr: bool,
    text: &'a str,
    /// When the server received its first byte (ms since the epoch; 0:
    /// not known): the page orders lines of different processes by it.
    time: i64,
}

/// Output of a process, or of every process of a test as they start, line
/// by line (`data:` JSON of [`Line`]); `end` when all of it was sent.
pub(super) async fn logs(State(web): State<Web>, Query(q): Query<LogsQuery>, req: Request) -> Response {
    let Admitted { scope, caller, .. } = admit!(web, req, false);
    let target = match (q.test, q.process) {
        (Some(t), None) => Followed::Test(t),
        (None, Some(p)) => Followed::Process(p),
        _ => return (axum::http::StatusCode::BAD_REQUEST, "test=NAME or process=NAME\n").into_response(),
    };
    // Refused or unknown: answered now, not as a stream that ends at once.
    let first = match &target {
        Followed::Test(name) => web.get::<testbus_proto::Test>(&scope, name).await.map(|_| ()),
        Followed::Process(name) => web.get::<testbus_proto::Process>(&scope, name).await.map(|_| ()),
    };
    if let Err(r) = first {
        return r;
    }
    let permit = match super::stream_permit(&web, &caller) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        follow(web, caller, target, tx).await;
        drop(permit);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

enum Followed {
    Test(String),
    Process(String),
}

type Chunks = futures::stream::BoxStream<'static, (String, Result<testbus_proto::OutputChunk, tonic::Status>)>;

/// Follows output until all of it was sent or the browser went away.
async fn follow(web: Web, caller: crate::authz::Caller, target: Followed, tx: mpsc::Sender<Result<Event, Infallible>>) {
    let mut streams: futures::stream::SelectAll<Chunks> = futures::stream::SelectAll::new();
    let mut followed: HashSet<String> = HashSet::new();
    let mut from: HashMap<String, String> = HashMap::new();
    // Partial lines, by process and stream, with the time of their first
    // byte.
    let mut partial: HashMap<(String, bool), (Vec<u8>, i64)> = HashMap::new();
    // A test's processes appear as its steps start: its changes say when.
    let (mut changes, test) = match &target {
        Followed::Test(name) => {
            let sub = web.st.hub.watch(Kind::Test, None, None, named(name)).ok();
            (sub, Some(name.clone()))
        }
        Followed::Process(_) => (None, None),
    };
    let mut test_done = test.is_none();
    let mut look = true;
    loop {
        if look {
            look = false;
            let (found, done) = to_follow(&web, &target).await;
            test_done = done;
            for (name, label) in found {
                if followed.len() >= MAX_FOLLOWED || followed.contains(&name) {
                    continue;
                }
                // Not yet readable (its output not begun): tried again at
                // the next look.
                if let Ok(s) = read(&web, &caller, &name, true).await {
                    let n = name.clone();
                    streams.push(s.map(move |c| (n.clone(), c)).boxed());
                    followed.insert(name.clone());
                    from.insert(name, label);
                }
            }
        }
        // A stream that ended may leave its last line without a newline.
        if streams.is_empty() {
            for ((name, stderr), (buf, time)) in partial.drain() {
                if !buf.is_empty() {
                    let label = from.get(&name).cloned().unwrap_or_default();
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if send(&tx, &Line { from: &label, stderr, text: &text, time }).await.is_err() {
                        return;
                    }
                }
            }
        }
        if streams.is_empty() && test_done {
            let _ = tx.send(Ok(Event::default().event("end").data("all output was sent"))).await;
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            e = async { match changes.as_mut() { Some(c) => c.next().await, None => std::future::pending().await } } => match e {
                Some(_) => look = true,
                // The hub dropped it (this stream fell behind): a new one,
                // and a look for what was missed meanwhile.
                None => {
                    changes = web.st.hub.watch(Kind::Test, None, None, named(test.as_deref().unwrap_or_default())).ok();
                    look = true;
                }
            },
            next = streams.next(), if !streams.is_empty() => {
                let Some((name, Ok(chunk))) = next else { continue };
                let label = from.get(&name).cloned().unwrap_or_default();
                let time = chunk.time_unix_ms;
                if chunk.notice {
                    let line = Line { from: &label, stderr: true, text: &String::from_utf8_lossy(&chunk.data), time };
                    if send(&tx, &line).await.is_err() { return; }
                    continue;
                }
                let stderr = chunk.stream == 1;
                let (buf, started) = partial.entry((name, stderr)).or_default();
                if buf.is_empty() {
                    *started = time;
                }
                buf.extend_from_slice(&chunk.data);
                let lines = take_lines(buf);
                // The first line began when the partial one did; the
                // others, and what is left, in this chunk.
                let first = *started;
                if !lines.is_empty() {
                    *started = time;
                }
                for (i, text) in lines.into_iter().enumerate() {
                    let time = if i == 0 { first } else { time };
                    if send(&tx, &Line { from: &label, stderr, text: &text, time }).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The processes of `target` there are now, each with how its lines are
/// labelled (`step role@host`), and whether the test has ended (or is
/// gone): a process has no more to come.
async fn to_follow(web: &Web, target: &Followed) -> (Vec<(String, String)>, bool) {
    match target {
        Followed::Process(name) => match web.get::<testbus_proto::Process>(&crate::authz::Scope::All, name).await {
            Ok(p) => {
                (vec![(name.clone(), format!("{} {}@{}", p.spec().step, p.spec().role, p.spec().host_name))], true)
            }
            Err(_) => (vec![], true),
        },
        Followed::Test(name) => match web.get::<testbus_proto::Test>(&crate::authz::Scope::All, name).await {
            Ok(t) => {
                let done = testbus_proto::phase::test_terminal(&t.status().phase);
                let found = t
                    .status()
                    .steps
                    .iter()
                    .flat_map(|s| {
                        s.processes.iter().map(move |p| (p.name.clone(), format!("{} {}@{}", s.name, p.role, p.host)))
                    })
                    .collect();
                (found, done)
            }
            Err(_) => (vec![], true),
        },
    }
}

/// The whole lines at the front of `buf`, taken out of it in one pass (the
/// rest stays for the next chunk). Of an unfinished line longer than
/// MAX_LINE, the first MAX_LINE characters are sent marked " …" and the
/// rest dropped; what follows of it comes as another line.
fn take_lines(buf: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
        out.push(line_text(&buf[start..start + i]));
        start += i + 1;
    }
    buf.drain(..start);
    if buf.len() > MAX_LINE {
        out.push(line_text(buf) + " …");
        buf.clear();
    }
    out
}

/// A line as sent: at most MAX_LINE characters, invalid UTF-8 replaced.
fn line_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(4 * MAX_LINE)]).chars().take(MAX_LINE).collect()
}

async fn send(tx: &mpsc::Sender<Result<Event, Infallible>>, line: &Line<'_>) -> Result<(), ()> {
    let data = serde_json::to_string(line).map_err(|_| ())?;
    tx.send(Ok(Event::default().data(data))).await.map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{Host, HostStatus, ObjectMeta};

    fn host(phase: &str, renewed: &str) -> Arc<HubEvent> {
        let h = Host {
            metadata: Some(ObjectMeta { name: "h".into(), ..Default::default() }),
            status: Some(HostStatus { phase: phase.into(), lease_renew_time: renewed.into(), ..Default::default() }),
            ..Default::default()
        };
        Arc::new(HubEvent { kind: EventType::Modified, object: Object::Host(h), revision: 1 })
    }

    /// 10,000 hosts renew their leases every few seconds: the overview
    /// must not redraw for that, only for what it shows.
    #[test]
    fn a_lease_renewal_does_not_change_the_overview() {
        let first = host("Ready", "t1");
        let Object::Host(h) = &first.object else { unreachable!() };
        let mut w = Watched::Overview { hosts: HashMap::from([("h".to_string(), host_digest(h))]) };
        assert!(!w.changed_by(&host("Ready", "t2")));
        assert!(w.changed_by(&host("NotReady", "t2")));
        assert!(!w.changed_by(&host("NotReady", "t3")));
    }

    #[test]
    fn output_is_cut_into_lines_in_one_pass() {
        let mut buf = b"one\ntwo\nthr".to_vec();
        assert_eq!(take_lines(&mut buf), ["one", "two"]);
        assert_eq!(buf, b"thr");
        buf.extend_from_slice(b"ee\n\xff\n");
        assert_eq!(take_lines(&mut buf), ["three", "\u{fffd}"]);
        assert!(buf.is_empty());
        // 4 MiB of newlines is 4 Mi empty lines, in linear time.
        let mut buf = vec![b'\n'; 4 << 20];
        assert_eq!(take_lines(&mut buf).len(), 4 << 20);
        // A line without end, longer than MAX_LINE: cut and marked.
        let mut buf = vec![b'x'; 3 * MAX_LINE];
        let lines = take_lines(&mut buf);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].chars().count(), MAX_LINE + 2);
        assert!(buf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_event() {
        let (tx, mut rx) = mpsc::channel(4);
        let events = futures::stream::iter(vec![host("Ready", "a"), host("NotReady", "b"), host("Ready", "c")])
            .map(Some)
            .chain(futures::stream::pending());
        let task = tokio::spawn(debounce(Box::pin(events), Watched::Everything, tx));
        assert!(rx.recv().await.is_some());
        tokio::time::sleep(DEBOUNCE * 10).await;
        assert!(rx.try_recv().is_err(), "three changes at once, one event");
        drop(rx);
        task.await.unwrap();
    }
}
