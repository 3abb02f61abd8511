//! The dashboard's pages as pure functions of the objects they show: the
//! handlers read through the API, these only render (maud escapes every
//! value). Each page is a `<main>` the browser swaps in place when the
//! server-sent events say something it shows changed.
use maud::{html, Markup, DOCTYPE};
use std::collections::{BTreeMap, HashMap, HashSet};
use testbus_proto::states::TestPhase;
use testbus_proto::{Host, HostPool, Process, Resource, Test};

/// Hosts on one page of the overview (10,000 hosts are 100 pages).
pub const HOSTS_PER_PAGE: usize = 100;
/// Tests on one page of the overview.
pub const TESTS_PER_PAGE: usize = 50;
/// Runs in a history matrix.
pub const HISTORY_RUNS: usize = 40;
/// Steps and results (columns) in a history matrix.
pub const HISTORY_COLUMNS: usize = 200;

/// The page around a `<main>`; `live` is the events URL that keeps it fresh.
pub fn layout(title: &str, live: Option<&str>, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · testbus" }
                link rel="stylesheet" href="/static/style.css";
                script src="/static/app.js" defer {}
            }
            body {
                nav {
                    a.brand href="/" { "testbus" }
                    a href="/" { "Overview" }
                    a href="/history" { "History" }
                    span #live-state {}
                    form.logout method="post" action="/logout" { button #logout { "log out" } }
                }
                main data-live=[live] { (main) }
            }
        }
    }
}

pub fn phase_badge(p: &str) -> Markup {
    let p = if p.is_empty() { TestPhase::Pending.as_str() } else { p };
    html! { span class={"badge phase-" (p)} { (p) } }
}

fn seconds(start: &str, end: &str) -> Option<f64> {
    let (a, b) = (testbus_proto::time::parse(start)?, testbus_proto::time::parse(end)?);
    b.duration_since(a).ok().map(|d| d.as_secs_f64())
}

fn duration(start: &str, end: &str) -> String {
    match seconds(start, end) {
        Some(s) if s < 10.0 => format!("{s:.2}s"),
        Some(s) if s < 600.0 => format!("{s:.0}s"),
        Some(s) => format!("{:.0}m", s / 60.0),
        None if !start.is_empty() => "running".into(),
        None => String::new(),
    }
}

/// The history of runs labelled k=v, percent-encoded.
fn history_link(k: &str, v: &str) -> String {
    let enc: String = format!("{k}={v}")
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/history?label={enc}")
}

fn test_link(name: &str) -> Markup {
    html! { a href={"/tests/" (name)} { (name) } }
}

fn host_link(name: &str) -> Markup {
    html! { a href={"/hosts/" (name)} { (name) } }
}

fn pager(what: &str, param: &str, page: usize, total: usize, per: usize) -> Markup {
    let pages = total.div_ceil(per).max(1);
    html! {
        @if pages > 1 {
            p.pager {
                @if page > 1 { a href={"?" (param) "=" (page - 1)} { "← previous" } " " }
                "page " (page) " of " (pages) " (" (total) " " (what) ")"
                @if page < pages { " " a href={"?" (param) "=" (page + 1)} { "next →" } }
            }
        }
    }
}

/// What the overview shows; `tests` newest first, `queue` in queue order.
pub struct Overview<'a> {
    pub tests: &'a [&'a Test],
    pub queue: &'a [&'a Test],
    pub hosts: &'a [Host],
    pub pools: &'a [HostPool],
    pub host_page: usize,
    pub test_page: usize,
}

pub fn overview(o: &Overview) -> Markup {
    let mut by_phase: BTreeMap<&str, usize> = BTreeMap::new();
    for t in o.tests {
        let p = t.status().phase.as_str();
        *by_phase.entry(if p.is_empty() { TestPhase::Pending.as_str() } else { p }).or_default() += 1;
    }
    let mut hosts_by_phase: BTreeMap<&str, usize> = BTreeMap::new();
    for h in o.hosts {
        *hosts_by_phase.entry(h.status().phase.as_str()).or_default() += 1;
    }
    let tests_page = o.tests.iter().skip((o.test_page - 1) * TESTS_PER_PAGE).take(TESTS_PER_PAGE);
    let hosts_page = o.hosts.iter().skip((o.host_page - 1) * HOSTS_PER_PAGE).take(HOSTS_PER_PAGE);
    html! {
        section #summary {
            h2 { "Tests" }
            ul.counts #tests-by-phase {
                @for (p, n) in &by_phase { li data-phase=(p) { (phase_badge(p)) " " span.n { (n) } } }
                @if by_phase.is_empty() { li { "no tests" } }
            }
            h2 { "Hosts" }
            ul.counts #hosts-by-phase {
                @for (p, n) in &hosts_by_phase { li { (phase_badge(p)) " " span.n { (n) } } }
            }
        }
        section #queue {
            h2 { "Pending queue (" (o.queue.len()) ")" }
            @if o.queue.is_empty() { p.muted { "Nothing waits for hosts." } }
            @else {
                table {
                    tr { th { "#" } th { "test" } th { "priority" } th { "why pending" } }
                    @for (i, t) in o.queue.iter().enumerate().take(TESTS_PER_PAGE) {
                        tr {
                            td { (i + 1) }
                            td { (test_link(t.name())) }
                            td { (t.spec().priority) }
                            td.why { (why(t).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
        section #tests {
            h2 { "Tests" }
            table {
                tr { th { "test" } th { "phase" } th { "hosts" } th { "created" } th { "took" } th { "labels" } }
                @for t in tests_page {
                    tr id={"test-" (t.name())} {
                        td { (test_link(t.name())) }
                        td { (phase_badge(&t.status().phase)) }
                        td { (t.status().claims.len()) }
                        td.time { (t.meta().creation_timestamp) }
                        td { (duration(&t.status().start_time, &t.status().completion_time)) }
                        td { @for (k, v) in &t.meta().labels { a.label href=(history_link(k, v)) { (k) "=" (v) } " " } }
                    }
                }
            }
            (pager("tests", "tests", o.test_page, o.tests.len(), TESTS_PER_PAGE))
        }
        section #hosts {
            h2 { "Hosts" }
            table {
                tr { th { "host" } th { "phase" } th { "claimed by" } th { "pool" } th { "transport" } th { "capabilities" } }
                @for h in hosts_page {
                    tr id={"host-" (h.name())} {
                        td { (host_link(h.name())) }
                        td { (phase_badge(&h.status().phase)) @if h.spec().unschedulable { " " span.badge { "cordoned" } } }
                        td { @if let Some(c) = &h.status().claim { (test_link(&c.test)) " as " (c.role) } }
                        td { (h.spec().pool) }
                        td { @if let Some(f) = &h.status().facts { (f.transport) } }
                        td.caps { (h.status().capabilities.join(" ")) }
                    }
                }
            }
            (pager("hosts", "hosts", o.host_page, o.hosts.len(), HOSTS_PER_PAGE))
        }
        @if !o.pools.is_empty() {
            section #pools {
                h2 { "Pools" }
                @for p in o.pools {
                    h3 { (p.name()) " " span.muted { (p.status().guests.len()) " guests · " (p.status().message) } }
                    table {
                        tr { th { "guest" } th { "phase" } th { "address" } th { "cleanings" } th { "message" } }
                        @for g in &p.status().guests {
                            tr { td { (host_link(&g.name)) } td { (phase_badge(&g.phase)) } td { (g.address) } td { (g.cleanings) } td { (g.message) } }
                        }
                    }
                }
            }
        }
    }
}

/// A test's page: roles and hosts, the step graph, processes, results,
/// trace and downloads.
/// Why a test is as it is: its own reason once it has one (a finished
/// test's), else, while it waits, what its Scheduled condition says (the
/// queue showed a stray ": " and a pending test's page nothing).
fn why(t: &Test) -> Option<String> {
    let s = t.status();
    let (reason, message) = if !s.reason.is_empty() {
        (s.reason.as_str(), s.message.as_str())
    } else {
        use testbus_proto::states::{ConditionStatus, ConditionType};
        let waits = s.conditions.iter().find(|c| c.is(ConditionType::Scheduled, ConditionStatus::False))?;
        (waits.reason.as_str(), waits.message.as_str())
    };
    Some(match (reason, message) {
        ("", m) => m.to_string(),
        (r, "") => r.to_string(),
        (r, m) => format!("{r}: {m}"),
    })
    .filter(|w| !w.is_empty())
}

/// Failed processes whose stderr a test's page shows at most.
pub const FAILED_SHOWN: usize = 8;

/// The end of a failed process's stderr, as a test's page shows it.
pub struct FailedOutput {
    pub step: String,
    pub process: testbus_proto::ProcessResult,
    pub lines: Vec<String>,
}

/// What a test's page shows besides the test.
pub struct TestExtras {
    /// Its failed processes' stderr tails.
    pub failed: Vec<FailedOutput>,
    /// The caller's CSRF token, carried by the action forms.
    pub csrf: String,
    /// The caller may cancel and rerun (an admin): the page has the
    /// buttons.
    pub may_act: bool,
}

pub fn test(t: &Test, x: &TestExtras) -> Markup {
    let s = t.status();
    let steps = testbus_proto::steps::expand(t.spec());
    let ended = testbus_proto::phase::test_terminal(&s.phase);
    let deleting = !t.meta().deletion_timestamp.is_empty();
    html! {
        h1 { "test/" (t.name()) " " (phase_badge(&s.phase)) }
        // A test that succeeded is no warning ("Completed" was shown in the
        // warning colour).
        @let ok = s.phase == "Succeeded";
        @if let Some(why) = why(t) { p.why[!ok] #reason { (why) } }
        @if x.may_act && !deleting {
            div.actions {
                @if !ended {
                    form method="post" action={"/tests/" (t.name()) "/cancel"} {
                        input type="hidden" name="csrf" value=(x.csrf);
                        button #cancel-test type="submit" title="End it Cancelled: its processes are stopped, its hosts released" { "Cancel" }
                    }
                } @else {
                    form method="post" action={"/tests/" (t.name()) "/rerun"} {
                        input type="hidden" name="csrf" value=(x.csrf);
                        button #rerun-test type="submit" title="Run it again: a new test with this spec and labels" { "Rerun" }
                    }
                }
            }
        }
        @if let Some(of) = t.meta().labels.get(super::RERUN_OF) { p.muted { "A rerun of " (test_link(of)) "." } }
        @if !x.failed.is_empty() {
            section #failed-stderr {
                h2 { "Why it failed: the end of stderr" }
                @for f in &x.failed {
                    h3 {
                        "step " (f.step) " · " (f.process.role) "@" (host_link(&f.process.host)) " · "
                        a href={"/processes/" (f.process.name) "/logs"} { "all output" }
                    }
                    pre.stderr-tail { @for l in &f.lines { (l) "\n" } }
                }
            }
        }
        p {
            "created " span.time { (t.meta().creation_timestamp) }
            @if !s.start_time.is_empty() { " · ran " (duration(&s.start_time, &s.completion_time)) }
            @for (k, v) in &t.meta().labels { " · " a.label href=(history_link(k, v)) { "history of " (k) "=" (v) } }
        }
        p.downloads {
            "Report: "
            a #download-junit href={"/tests/" (t.name()) "/report.xml"} download { "JUnit" } " · "
            a href={"/tests/" (t.name()) "/report.tap"} download { "TAP" } " · "
            a href={"/tests/" (t.name()) "/report.json"} download { "JSON" } " · "
            a #test-logs href={"/tests/" (t.name()) "/logs"} { "all output, live" }
        }
        h2 { "Roles" }
        table #roles {
            tr { th { "role" } th { "count" } th { "capabilities" } th { "claimed hosts" } }
            @for r in &t.spec().hosts {
                tr {
                    td { (r.role) }
                    td { (r.count.unwrap_or(1)) }
                    td { (r.capabilities.join(" ")) @if !r.host.is_empty() { " host=" (r.host) } @if !r.selector.is_empty() { " " (r.selector) } }
                    td {
                        @for (member, host) in &s.claims {
                            @if member_of(member, &r.role, r.count.unwrap_or(1)) { (member) " → " (host_link(host)) " " }
                        }
                    }
                }
            }
        }
        h2 { "Steps" }
        div.graph-box { (super::graph::svg(&steps, &s.steps)) }
        h2 { "Processes" }
        table #processes {
            tr { th { "step" } th { "role" } th { "host" } th { "phase" } th { "exit" } th { "took" } th { "message" } th {} }
            @for st in &s.steps {
                @for p in &st.processes {
                    tr data-phase=(p.phase) {
                        td { (st.name) }
                        td { (p.role) }
                        td { (host_link(&p.host)) }
                        td { (phase_badge(&p.phase)) }
                        td { @if let Some(c) = p.exit_code { (c) } @if !p.signal.is_empty() { (p.signal) } }
                        td { (duration(&p.start_time, &p.finish_time)) }
                        td { (p.message) }
                        td { a href={"/processes/" (p.name) "/logs"} { "output" } }
                    }
                }
            }
        }
        @if !s.results.is_empty() {
            h2 { "Results" }
            (results_tree(&s.results))
        }
        @if let Some(tr) = &s.trace {
            details #trace {
                summary { "Trace: what this run used" }
                table {
                    tr { th { "member" } th { "os" } th { "kernel" } th { "arch" } th { "agent" } th { "transport" } }
                    @for (m, f) in &tr.hosts { tr { td { (m) } td { (f.os) } td { (f.kernel) } td { (f.arch) } td { (f.agent_version) } td { (f.transport) } } }
                }
                @if !tr.files.is_empty() {
                    table { tr { th { "file" } th { "digest" } } @for (p, d) in &tr.files { tr { td { (p) } td.mono { (d) } } } }
                }
                @if !tr.env.is_empty() {
                    table { tr { th { "env" } th { "value" } } @for (k, v) in &tr.env { tr { td.mono { (k) } td.mono { (v) } } } }
                }
            }
        }
    }
}

fn member_of(member: &str, role: &str, count: u32) -> bool {
    member == role || count > 1 && member.strip_prefix(role).is_some_and(|n| n.parse::<u32>().is_ok())
}

/// Recorded results as a tree of their dotted paths.
fn results_tree(results: &[testbus_proto::TestResult]) -> Markup {
    #[derive(Default)]
    struct Node<'a> {
        children: BTreeMap<&'a str, Node<'a>>,
        leaf: Option<&'a testbus_proto::TestResult>,
    }
    let mut root = Node::default();
    for r in results {
        let mut n = &mut root;
        for part in r.path.split('.') {
            n = n.children.entry(part).or_default();
        }
        n.leaf = Some(r);
    }
    fn render(n: &Node) -> Markup {
        html! {
            ul.tree {
                @for (name, c) in &n.children {
                    li {
                        @if let Some(r) = c.leaf {
                            span class={"badge outcome-" (r.outcome)} { (r.outcome) } " " (name)
                            @if !r.message.is_empty() { span.muted { " — " (r.message) } }
                        } @else { (name) }
                        @if !c.children.is_empty() { (render(c)) }
                    }
                }
            }
        }
    }
    html! { div #results { (render(&root)) } }
}

pub fn host(h: &Host, processes: &[Process]) -> Markup {
    let s = h.status();
    html! {
        h1 { "host/" (h.name()) " " (phase_badge(&s.phase)) }
        @if !s.message.is_empty() { p.why { (s.message) } }
        table #host-facts {
            tr { th { "claimed by" } td { @if let Some(c) = &s.claim { (test_link(&c.test)) " as " (c.role) } @else { "—" } } }
            tr { th { "pool" } td { (h.spec().pool) } }
            tr { th { "cordoned" } td { @if h.spec().unschedulable { "yes: " (h.spec().unschedulable_reason) } @else { "no" } } }
            tr { th { "capabilities" } td { (s.capabilities.join(" ")) } }
            @if let Some(f) = &s.facts {
                tr { th { "transport" } td { (f.transport) } }
                tr { th { "system" } td { (f.os) " · " (f.kernel) " · " (f.arch) " · " (f.cpus) " CPUs · " (f.memory_bytes >> 20) " MiB" } }
                tr { th { "agent" } td { (f.agent_version) } }
            }
            tr { th { "lease renewed" } td.time { (s.lease_renew_time) } }
            tr { th { "infrastructure failures" } td { (s.infra_failures) } }
        }
        @if !s.vars.is_empty() {
            h2 { "Published variables" }
            table { @for (k, v) in &s.vars { tr { td.mono { (k) } td.mono { (v) } } } }
        }
        @if !s.conditions.is_empty() {
            h2 { "Conditions" }
            table {
                tr { th { "type" } th { "status" } th { "reason" } th { "message" } }
                @for c in &s.conditions { tr { td { (c.r#type) } td { (c.status) } td { (c.reason) } td { (c.message) } } }
            }
        }
        h2 { "Processes here" }
        table #host-processes {
            tr { th { "process" } th { "test" } th { "step" } th { "phase" } th { "exit" } }
            @for p in processes {
                tr {
                    td { a href={"/processes/" (p.name()) "/logs"} { (p.name()) } }
                    td { (test_link(&p.spec().test)) }
                    td { (p.spec().step) }
                    td { (phase_badge(&p.status().phase)) }
                    td { @if let Some(c) = p.status().exit_code { (c) } }
                }
            }
        }
    }
}

/// A log page: the lines come from `stream` (server-sent events).
pub fn logs(title: &str, back: Markup, stream: &str) -> Markup {
    html! {
        h1 { (title) }
        p { (back) " Lines are in the order the server received them, across processes." }
        p.search {
            input #log-search type="search" placeholder="search (text or /regex/)" autofocus; " "
            label { input #log-times type="checkbox"; " timestamps" } " "
            span #log-count {}
        }
        pre #log data-stream=(stream) {}
        p #log-end.muted {}
    }
}

/// Runs sharing a label: a matrix of runs × steps and results, and their
/// durations over time. `runs` are oldest first.
pub fn history(label: &str, runs: &[&Test]) -> Markup {
    // Each run's steps and results by name, and the columns in the order
    // first seen (at most HISTORY_COLUMNS: a test records up to 10,000
    // results).
    let cells: Vec<HashMap<&str, &str>> = runs
        .iter()
        .map(|t| {
            let s = t.status();
            let steps = s.steps.iter().map(|x| (x.name.as_str(), x.phase.as_str()));
            steps.chain(s.results.iter().map(|r| (r.path.as_str(), r.outcome.as_str()))).collect()
        })
        .collect();
    let mut columns: Vec<&str> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for t in runs {
        let s = t.status();
        for c in s.steps.iter().map(|x| x.name.as_str()).chain(s.results.iter().map(|r| r.path.as_str())) {
            if columns.len() < HISTORY_COLUMNS && seen.insert(c) {
                columns.push(c);
            }
        }
    }
    let points: Vec<(usize, f64)> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, t)| seconds(&t.status().start_time, &t.status().completion_time).map(|s| (i, s)))
        .collect();
    html! {
        h1 { "History" }
        form method="get" action="/history" {
            "label " input name="label" value=(label) placeholder="suite=nfs"; " " button { "show" }
        }
        @if label.is_empty() { p.muted { "Name a label the runs share (key=value) to see them side by side." } }
        @else if runs.is_empty() { p.muted { "No test has " (label) "." } }
        @else {
            h2 { (runs.len()) @if runs.len() == 1 { " run" } @else { " runs" } " with " (label) }
            (duration_plot(&points, runs.len()))
            p #history-legend {
                "Each row a run (newest first), each column a step or a recorded result; a cell links to its run. "
                @for (class, word) in LEGEND {
                    span.legend { span class={"swatch cell " (class)} {} " " (word) } " "
                }
            }
            div.matrix-box {
                table #history {
                    tr { th { "run" } th { "phase" } @for c in &columns { th.col { (c) } } }
                    @for (t, by_name) in runs.iter().zip(&cells).rev() {
                        tr {
                            td { (test_link(t.name())) br; span.time { (t.meta().creation_timestamp) } }
                            td { (phase_badge(&t.status().phase)) }
                            @for c in &columns {
                                @let v = by_name.get(c).copied().unwrap_or_default();
                                @let tip = if v.is_empty() { format!("{c}: not in this run ({})", t.name()) } else { format!("{c}: {v} ({})", t.name()) };
                                td class={"cell phase-" (v) " outcome-" (v)} title=(tip) data-value=(v) {
                                    a.cell-link href={"/tests/" (t.name())} aria-label=(tip) {}
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The history matrix's legend: a cell's classes, and what they mean.
const LEGEND: [(&str, &str); 6] = [
    ("phase-Succeeded", "step succeeded / result pass"),
    ("phase-Failed", "step failed / result fail"),
    ("phase-Skipped", "step skipped / result skip"),
    ("phase-Running", "running"),
    ("phase-Waiting", "waiting"),
    ("phase-", "not in that run"),
];

/// Run durations as an SVG line: x the run (oldest left), y seconds.
fn duration_plot(points: &[(usize, f64)], runs: usize) -> Markup {
    let (w, h, pad) = (640.0, 160.0, 30.0);
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(0.001);
    let x = |i: usize| pad + (w - 2.0 * pad) * if runs > 1 { i as f64 / (runs - 1) as f64 } else { 0.5 };
    let y = |s: f64| h - pad - (h - 2.0 * pad) * s / max;
    let line: Vec<String> = points.iter().map(|&(i, s)| format!("{:.1},{:.1}", x(i), y(s))).collect();
    html! {
        svg #durations xmlns="http://www.w3.org/2000/svg" width=(w) height=(h) viewBox={"0 0 " (w) " " (h)} {
            line x1=(pad) y1=(h - pad) x2=(w - pad) y2=(h - pad) stroke="#999" {}
            line x1=(pad) y1=(pad) x2=(pad) y2=(h - pad) stroke="#999" {}
            text x="2" y=(pad - 8.0) { (format!("{max:.1}s")) }
            text x="2" y=(h - 8.0) { "0s" }
            polyline points=(line.join(" ")) fill="none" stroke="#2b6cb0" stroke-width="2" {}
            @for &(i, s) in points { circle cx=(x(i)) cy=(y(s)) r="3" fill="#2b6cb0" { title { (format!("{s:.2}s")) } } }
        }
    }
}

pub fn login(error: Option<&str>) -> Markup {
    html! {
        h1 { "Log in" }
        p { "The dashboard takes a viewer token: " code { "testbus-control-plane token create --viewer --ttl 8h" } }
        @if let Some(e) = error { p.why #login-error { (e) } }
        form method="post" action="/login" {
            input name="token" type="password" size="80" placeholder="tbjoin.…" autofocus; " "
            button { "log in" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{HostClaim, HostStatus, ObjectMeta, TestStatus};

    fn test_named(name: &str, phase: &str) -> Test {
        Test {
            metadata: Some(ObjectMeta { name: name.into(), ..Default::default() }),
            status: Some(TestStatus { phase: phase.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn the_overview_counts_every_test_but_shows_a_page_of_hosts() {
        let tests: Vec<Test> =
            (0..3).map(|i| test_named(&format!("t{i}"), if i == 0 { "" } else { "Succeeded" })).collect();
        let refs: Vec<&Test> = tests.iter().collect();
        let hosts: Vec<Host> = (0..250)
            .map(|i| Host {
                metadata: Some(ObjectMeta { name: format!("h{i:03}"), ..Default::default() }),
                status: Some(HostStatus {
                    phase: "Ready".into(),
                    claim: (i == 0).then(|| HostClaim { test: "t1".into(), role: "<b>".into(), ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let o = Overview { tests: &refs, queue: &refs[..1], hosts: &hosts, pools: &[], host_page: 3, test_page: 1 };
        let html = overview(&o).into_string();
        assert!(html.contains(r#"<li data-phase="Succeeded"><span class="badge phase-Succeeded">Succeeded</span> <span class="n">2</span>"#), "{html}");
        assert!(html.contains("host-h200") && html.contains("host-h249") && !html.contains("host-h199"));
        assert!(html.contains("page 3 of 3 (250 hosts)"));
        assert!(!html.contains("<b>"), "escaped");
    }

    /// What a viewer's page of a test gets besides the test: nothing.
    fn looker() -> TestExtras {
        TestExtras { failed: vec![], csrf: String::new(), may_act: false }
    }

    /// A failed test's page shows the end of each failed process's stderr;
    /// an admin's has the button that fits the test (Cancel while it runs,
    /// Rerun once it ended), with the caller's CSRF token; a viewer's none.
    #[test]
    fn a_test_page_shows_failed_stderr_and_an_admins_actions() {
        let mut t = test_named("f", "Failed");
        let p = testbus_proto::ProcessResult {
            name: "f-s-a".into(),
            role: "a".into(),
            host: "h".into(),
            phase: "Failed".into(),
            ..Default::default()
        };
        let failed = vec![FailedOutput { step: "s".into(), process: p, lines: vec!["boom <b>".into(), "end".into()] }];
        let admin = TestExtras { failed, csrf: "c5rf".into(), may_act: true };
        let page = test(&t, &admin).into_string();
        assert!(page.contains("<pre class=\"stderr-tail\">boom &lt;b&gt;\nend\n</pre>"), "{page}");
        assert!(page.contains(r#"action="/tests/f/rerun""#) && !page.contains("/cancel"), "{page}");
        assert!(page.contains(r#"name="csrf" value="c5rf""#), "{page}");
        t.status_mut().phase = "Running".into();
        let page = test(&t, &TestExtras { failed: vec![], csrf: "c5rf".into(), may_act: true }).into_string();
        assert!(page.contains(r#"action="/tests/f/cancel""#) && !page.contains("/rerun"), "{page}");
        assert!(!page.contains("failed-stderr"), "{page}");
        let page = test(&t, &looker()).into_string();
        assert!(!page.contains("<form"), "a viewer gets no buttons: {page}");
    }

    #[test]
    fn a_pending_test_says_why_it_waits_on_its_page_and_in_the_queue() {
        let mut t = test_named("w", "Pending");
        t.status_mut().conditions.push(testbus_proto::Condition {
            r#type: "Scheduled".into(),
            status: "False".into(),
            reason: "Unsatisfiable".into(),
            message: "no host has capability nfs-sever".into(),
            ..Default::default()
        });
        let page = test(&t, &looker()).into_string();
        assert!(
            page.contains(r#"<p class="why" id="reason">Unsatisfiable: no host has capability nfs-sever"#),
            "{page}"
        );
        // A test that succeeded is said plainly, not in the warning colour.
        let mut done = test_named("d", "Succeeded");
        done.status_mut().reason = "Completed".into();
        let page = test(&done, &looker()).into_string();
        assert!(page.contains(r#"<p class="" id="reason">Completed</p>"#), "{page}");
        let refs = [&t];
        let o = Overview { tests: &refs, queue: &refs, hosts: &[], pools: &[], host_page: 1, test_page: 1 };
        let html = overview(&o).into_string();
        assert!(html.contains(r#"<td class="why">Unsatisfiable: no host has capability nfs-sever</td>"#), "{html}");
        // Nothing to say: no stray separator.
        let quiet = test_named("q", "Pending");
        let refs = [&quiet];
        let o = Overview { tests: &refs, queue: &refs, hosts: &[], pools: &[], host_page: 1, test_page: 1 };
        assert!(overview(&o).into_string().contains(r#"<td class="why"></td>"#));
    }

    #[test]
    fn label_links_are_percent_encoded() {
        assert_eq!(history_link("suite", "nfs"), "/history?label=suite%3Dnfs");
        assert_eq!(history_link("a", "b,c&d#e"), "/history?label=a%3Db%2Cc%26d%23e");
    }

    #[test]
    fn results_nest_by_their_dotted_paths() {
        let r =
            |p: &str, o: &str| testbus_proto::TestResult { path: p.into(), outcome: o.into(), ..Default::default() };
        let html =
            results_tree(&[r("users.create", "pass"), r("users.verify", "fail"), r("top", "skip")]).into_string();
        assert!(html.contains("<li>users<ul class=\"tree\">"), "{html}");
        assert!(html.contains("outcome-fail\">fail</span> verify"), "{html}");
    }
}
