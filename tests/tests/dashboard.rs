//! The dashboard in a real browser (Debian's headless Chromium driven by
//! selenium through chromedriver), and who may open it. The browser runs
//! in the control plane's network namespace: it reaches nothing but the
//! namespaces this test made.
use std::path::{Path, PathBuf};
use std::process::Command;
use testbus_proto::Resource;
use testbus_tests::{bin_dir, needs_root, repo_root, Cluster};

/// The top of the Python scripts that speak HTTPS to the dashboard
/// (they set `base` and `ca` from their arguments): `call` answers
/// [status, Location, Set-Cookie, body], following no redirect.
const HTTP_CALL: &str = r#"
import json, re, ssl, sys, urllib.request, urllib.error, urllib.parse
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None
def call(path, cert=None, key=None, data=None, cookie=None, origin=None):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(cert, key)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
    req = urllib.request.Request(base + path, data=data)
    if cookie:
        req.add_header('Cookie', cookie)
    if origin:
        req.add_header('Origin', origin)
    try:
        with opener.open(req, timeout=10) as r:
            return [r.status, r.headers.get('Location'), r.headers.get('Set-Cookie'), r.read(20000).decode()]
    except urllib.error.HTTPError as e:
        return [e.code, e.headers.get('Location'), e.headers.get('Set-Cookie'), e.read(2000).decode()]
"#;

/// A dashboard login token (`--viewer` or `--admin`), made through the
/// control plane's socket.
fn dashboard_token(c: &Cluster, role: &str) -> String {
    let out = Command::new(bin_dir().join("testbus-control-plane"))
        .args(["token", "create", role, "--ttl", "1h", "--data-dir"])
        .arg(c.dir.path().join("cp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn viewer_token(c: &Cluster) -> String {
    dashboard_token(c, "--viewer")
}

fn admin_token(c: &Cluster) -> String {
    dashboard_token(c, "--admin")
}

/// Where the browser test leaves its screenshots (hack/screenshots copies
/// them to docs/).
fn screenshots() -> PathBuf {
    let d = repo_root().join("target/dashboard-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `python3 ARGS…` in the control plane's namespace, bounded in time.
fn python_in_cp(c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let home = c.dir.path().join("browser-home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = c.command_in("cp", Path::new("/usr/bin/timeout"));
    cmd.args(["--kill-after=5", "180", "/usr/bin/python3"]).args(args).env("HOME", &home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// What the issue asks of the browser: log in with a viewer token, see an
/// applied test appear without a reload, its step graph turn green, its
/// output follow line by line as printed (and filter it), download and
/// parse its JUnit report, open a host page and the label's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_follows_a_test_live_on_the_dashboard() {
    if !needs_root("the dashboard tests") {
        return;
    }
    let c = Cluster::start(1).await;
    let token = viewer_token(&c);
    let go = c.dir.path().join("go");
    let manifest = c.dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: testbus/v1
kind: Test
metadata: {{name: web, labels: {{suite: web}}}}
spec:
  hosts: [{{role: a}}]
  steps:
  - name: one
    on: [a]
    argv: [sh, -c, "echo first-line; while [ ! -e {go} ]; do sleep 0.05; done; echo second-line; echo to-stderr >&2"]
  - {{name: two, on: [a], after: [one], argv: ["true"]}}
"#,
            go = go.display()
        ),
    )
    .unwrap();
    let script = repo_root().join("tests/scripts/dashboard.py");
    let shots = screenshots();
    let ctl = bin_dir().join("testbusctl");
    let admin = c.dir.path().join("admin.yaml");
    let out = python_in_cp(
        &c,
        &[
            script.to_str().unwrap(),
            &c.agent_server,
            &token,
            shots.to_str().unwrap(),
            ctl.to_str().unwrap(),
            manifest.to_str().unwrap(),
            go.to_str().unwrap(),
            &admin_token(&c),
        ],
        &[("TESTBUS_CONFIG", admin.to_str().unwrap()), ("TESTBUS_SERVER", &c.server)],
    );
    let seen = json_of(&out);
    assert!(seen["bad_login"].as_str().unwrap().contains("token create --viewer"), "{seen}");
    let lines: Vec<&str> = seen["log_lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    let at = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap_or_else(|| panic!("no {s} in {lines:?}"));
    assert!(at("first-line") < at("second-line"), "{lines:?}");
    assert!(lines[at("first-line")].starts_with("one a@host-0"), "each line says where it came from: {lines:?}");
    at("to-stderr");
    assert!(seen["search"].as_str().unwrap().starts_with("1 of 3 lines"), "{seen}");
    assert_eq!(seen["processes"], 2, "{seen}");
    assert_eq!(seen["junit_cases"], serde_json::json!(["web.one/a@host-0", "web.two/a@host-0"]), "{seen}");
    assert!(seen["junit_out"].as_str().unwrap().contains("first-line\nsecond-line"), "{seen}");
    assert_eq!(seen["host_title"], "host/host-0 Ready", "{seen}");
    assert!(seen["host_processes"].as_i64().unwrap() >= 2, "{seen}");
    // Newest run first: web-3 failed in its second step.
    let cells = serde_json::json!(["Succeeded", "Failed", "Succeeded", "Succeeded", "Succeeded", "Succeeded"]);
    assert_eq!(seen["history_cells"], cells, "{seen}");
    assert_eq!(seen["history_tip"], "one: Succeeded (web-3)", "{seen}");
    assert!(seen["history_legend"].as_i64().unwrap() >= 5, "{seen}");
    assert_eq!(seen["history_points"], 3, "{seen}");
    // Issue 28's dashboard items: lines in the order received across
    // processes, timestamps on request; a failed run's stderr on its page;
    // an admin's Cancel and Rerun, which a viewer does not get.
    assert_eq!(seen["ordered"], serde_json::json!(["a1", "b1", "b2", "a2"]), "{seen}");
    let (hidden, shown) = (seen["times_hidden"].as_str().unwrap(), seen["times_shown"].as_str().unwrap());
    assert!(hidden.starts_with("p a@host-0") && shown.ends_with(hidden), "{seen}");
    let stamp = &shown[..12];
    assert!(stamp.len() == 12 && stamp.as_bytes()[2] == b':' && stamp.as_bytes()[8] == b'.', "{seen}");
    assert!(seen["failed_run"].as_str().unwrap().starts_with("test/web-3"), "{seen}");
    assert!(seen["failed_stderr"].as_str().unwrap().contains("broke-it"), "{seen}");
    assert_eq!(seen["viewer_buttons"], 0, "{seen}");
    let cancelled = seen["cancelled"].as_str().unwrap();
    assert!(cancelled.contains("cancelled by admin \"dashboard-session-"), "{seen}");
    assert_eq!(seen["rerun_of"], "A rerun of slow.", "{seen}");
    let slow = c.test("slow").await;
    assert_eq!((slow.status().phase.as_str(), slow.status().reason.as_str()), ("Cancelled", "Cancelled"));
    for page in ["overview", "test", "logs", "host", "history"] {
        assert!(shots.join(format!("{page}.png")).exists(), "a screenshot of the {page} page");
    }
}

/// Who may look, and what bad requests get: anonymous browsers are sent to
/// log in, agents are refused, viewers' certificates and viewer tokens let
/// in; join tokens do not log in, viewer tokens do not join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lets_in_viewers_only() {
    if !needs_root("the dashboard tests") {
        return;
    }
    let c = Cluster::start(1).await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "echo", "hi"]);
    assert_eq!(out.code, 0, "{out:?}");
    let viewer = testbus_pki::ClientFile::load(&c.write_user_config("bob", "viewer")).unwrap();
    let [ca, cert, key] = c.pem_files("bob", &viewer);
    let [acert, akey] = c.agent_pem_files("host-0");
    let join = c.create_token("1h").await;
    let script = HTTP_CALL.to_string()
        + r#"
base, ca, cert, key, acert, akey, join, view = sys.argv[1:9]
form = lambda t: urllib.parse.urlencode({'token': t}).encode()
login = lambda t: call('/login', data=form(t), origin=base)
ok = login(view)
session = ok[2].split(';')[0] if ok[2] else None
with_cookie = call('/tests/' + 'nope', cookie=session)[0]
overview_with_cookie = call('/', cookie=session)[0]
cross_site = call('/login', data=form(view), origin='https://evil.example')[0]
no_origin = call('/login', data=form(view))[0]
deep = call('/tests/a/b/c/d', cert, key)[0]
before_logout = call('/', cookie=session)[0]
cross_logout = call('/logout', data=b'', cookie=session, origin='https://evil.example')[0]
after_cross_logout = call('/', cookie=session)[0]
logout = call('/logout', data=b'', cookie=session, origin=base)
after_logout = call('/', cookie=session)[:2]
print(json.dumps({
    'anonymous': call('/')[:2],
    'agent': call('/', acert, akey)[0],
    'viewer': call('/', cert, key)[0],
    'join_as_login': login(join)[0],
    'login': ok[:2],
    'cookie': ok[2],
    'with_cookie': with_cookie,
    'overview_with_cookie': overview_with_cookie,
    'bad_cookie': call('/', cookie='testbus_session=tbjoin.x')[:2],
    'bad_page': call('/events?page=../../etc', cert, key)[0],
    'two_targets': call('/logs?test=a&process=b', cert, key)[0],
    'unknown_report': call('/tests/x/report.exe', cert, key)[0],
    'unknown_logs': call('/logs?process=nope', cert, key)[0],
    'escaped': call('/tests/%3Cscript%3E', cert, key)[3].count('<script>'),
    'cross_site_login': cross_site,
    'login_without_origin': no_origin,
    'deep_unknown': deep,
    'logout': [before_logout, cross_logout, after_cross_logout, logout[0], logout[1], logout[2], after_logout],
}))
"#;
    let args = ["-c", &script, &c.agent_server, &ca, &cert, &key, &acert, &akey, &join, &viewer_token(&c)];
    let v = json_of(&python_in_cp(&c, &args, &[]));
    assert_eq!(v["anonymous"], serde_json::json!([303, "/login"]), "{v}");
    assert_eq!(v["agent"], 403, "{v}");
    assert_eq!(v["viewer"], 200, "{v}");
    assert_eq!(v["join_as_login"], 401, "{v}");
    assert_eq!(v["login"], serde_json::json!([303, "/"]), "{v}");
    let cookie = v["cookie"].as_str().unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert_eq!((v["with_cookie"].as_i64(), v["overview_with_cookie"].as_i64()), (Some(404), Some(200)), "{v}");
    assert_eq!(v["bad_cookie"], serde_json::json!([303, "/login"]), "{v}");
    assert_eq!(v["bad_page"], 400, "{v}");
    assert_eq!(v["two_targets"], 400, "{v}");
    assert_eq!(v["unknown_report"], 404, "{v}");
    assert_eq!(v["unknown_logs"], 404, "{v}");
    assert_eq!(v["escaped"], 0, "{v}");
    // Login CSRF: a form from another site (or one that names no origin)
    // logs nobody in.
    assert_eq!((v["cross_site_login"].as_i64(), v["login_without_origin"].as_i64()), (Some(403), Some(403)), "{v}");
    assert_eq!(v["deep_unknown"], 404, "{v}");
    // Log out: refused from another site; from the dashboard, the session
    // ends (its token is revoked: the old cookie logs nothing in).
    let l = &v["logout"];
    assert_eq!((l[0].as_i64(), l[1].as_i64(), l[2].as_i64()), (Some(200), Some(403), Some(200)), "{v}");
    assert_eq!((l[3].as_i64(), l[4].as_str()), (Some(303), Some("/login")), "{v}");
    assert!(l[5].as_str().unwrap_or_default().contains("Max-Age=0"), "{v}");
    assert_eq!(l[6], serde_json::json!([303, "/login"]), "{v}");

    // A viewer token joins nothing (it is not where join tokens are).
    let token = viewer_token(&c);
    let dir = c.dir.path().join("sneaky");
    let out = c
        .command_in("host-0", Path::new("/usr/bin/timeout"))
        .arg("30")
        .arg(bin_dir().join("testbus-agent"))
        .args(["--server", &c.agent_server, "--join-token", &token, "--name", "sneaky", "--data-dir"])
        .arg(&dir)
        .arg("--config-dir")
        .arg(dir.join("etc"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && log.contains("token: unknown, wrong, used up, revoked or expired"), "{log}");
}

/// The dashboard's actions (issue 28): a POST from its own pages, by an
/// admin, with that session's CSRF token; anything less is refused and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_actions_need_an_admin_and_its_csrf_token() {
    if !needs_root("the dashboard tests") {
        return;
    }
    let c = Cluster::start(1).await;
    let done1 = testbus_tests::manifest(
        &c,
        "done1.yaml",
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: done1}\nspec:\n  hosts: [{role: a}]\n  \
         steps: [{name: s, on: [a], argv: [\"true\"]}]\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &done1, "--wait"]).code, 0);
    let viewer = testbus_pki::ClientFile::load(&c.write_user_config("bob", "viewer")).unwrap();
    let [ca, _, _] = c.pem_files("bob", &viewer);
    let script = HTTP_CALL.to_string()
        + r#"
base, ca, admin, view = sys.argv[1:5]
def session(token):
    r = call('/login', data=urllib.parse.urlencode({'token': token}).encode(), origin=base)
    return r[2].split(';')[0]
a, v = session(admin), session(view)
page = call('/tests/done1', cookie=a)[3]
csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
form = lambda t: urllib.parse.urlencode({'csrf': t}).encode()
out = {
    'viewer_page_forms': call('/tests/done1', cookie=v)[3].count('name="csrf"'),
    'viewer': call('/tests/done1/rerun', data=form(csrf), cookie=v, origin=base)[0::3],
    'wrong_csrf': call('/tests/done1/rerun', data=form('0' * 64), cookie=a, origin=base)[0],
    'no_csrf': call('/tests/done1/rerun', data=b'', cookie=a, origin=base)[0],
    'cross_site': call('/tests/done1/rerun', data=form(csrf), cookie=a, origin='https://evil.example')[0],
    'no_origin': call('/tests/done1/rerun', data=form(csrf), cookie=a)[0],
    'get': call('/tests/done1/rerun', cookie=a)[0],
    'anonymous': call('/tests/done1/rerun', data=form(csrf), cookie=None, origin=base)[0],
    'cancel_finished': call('/tests/done1/cancel', data=form(csrf), cookie=a, origin=base)[0],
    'rerun': call('/tests/done1/rerun', data=form(csrf), cookie=a, origin=base)[:2],
}
print(json.dumps(out))
"#;
    let args = ["-c", &script, &c.agent_server, &ca, &admin_token(&c), &viewer_token(&c)];
    let v = json_of(&python_in_cp(&c, &args, &[]));
    assert_eq!(v["viewer_page_forms"], 0, "{v}");
    assert_eq!(v["viewer"][0], 403, "{v}");
    assert!(v["viewer"][1].as_str().unwrap().contains("may not cancel or rerun"), "{v}");
    assert_eq!(v["wrong_csrf"], 403, "{v}");
    assert!(v["no_csrf"].as_i64().unwrap() >= 400, "{v}");
    assert_eq!((v["cross_site"].as_i64(), v["no_origin"].as_i64()), (Some(403), Some(403)), "{v}");
    assert_eq!(v["get"], 405, "{v}");
    assert!(v["anonymous"].as_i64().unwrap() >= 400, "{v}");
    // Cancelling a finished test is refused by the API (it is immutable).
    assert_eq!(v["cancel_finished"], 409, "{v}");
    // One rerun was made, by the one complete request.
    assert_eq!(v["rerun"][0], 303, "{v}");
    let to = v["rerun"][1].as_str().unwrap();
    assert!(to.starts_with("/tests/done1-"), "{v}");
    let (tests, _) = c.client().await.api::<testbus_proto::Test>().list("", "").await.unwrap();
    let reruns: Vec<_> = tests.iter().filter(|t| t.meta().labels.contains_key("testbus.io/rerun-of")).collect();
    assert_eq!(reruns.len(), 1, "{tests:?}");
    assert_eq!(format!("/tests/{}", reruns[0].meta().name), to);
    assert_eq!(reruns[0].spec(), c.test("done1").await.spec());
}

/// An `--insecure` listener answers requests that name a loopback host
/// only, on every path (`/metrics` and `/login` too), and takes no name
/// that merely starts like one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_listener_answers_loopback_names_only_on_every_path() {
    let c = Cluster::start_loopback_insecure(0, &[]).await;
    let script = r#"
import http.client, json, sys
host, port = sys.argv[1].split('//')[1].split(':')
def get(path, name, method='GET'):
    con = http.client.HTTPConnection(host, int(port), timeout=10)
    con.putrequest(method, path, skip_host=True)
    con.putheader('Host', name)
    if method == 'POST':
        con.putheader('Content-Type', 'application/x-www-form-urlencoded')
        con.putheader('Content-Length', '0')
    con.endheaders()
    return con.getresponse().status
out = {}
for name in ['localhost:' + port, 'evil.example', 'localhost:17780@evil.example', '127.0.0.1:80@evil.example']:
    out[name] = [get('/metrics', name), get('/', name), get('/login', name), get('/login', name, 'POST')]
print(json.dumps(out))
"#;
    let out = Command::new("/usr/bin/python3").args(["-c", script, &c.agent_server]).output().unwrap();
    let v = json_of(&out);
    let port = c.agent_server.rsplit(':').next().unwrap();
    // (The loopback POST passes the gate and is refused for its empty form.)
    assert_eq!(v[format!("localhost:{port}")], serde_json::json!([200, 200, 200, 422]), "{v}");
    for evil in ["evil.example", "localhost:17780@evil.example", "127.0.0.1:80@evil.example"] {
        assert_eq!(v[evil], serde_json::json!([403, 403, 403, 403]), "{evil}: {v}");
    }
}
