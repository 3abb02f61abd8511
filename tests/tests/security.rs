//! Security: TLS on every TCP listener, identities from certificates, and
//! the authorization rules, checked against real daemons in network
//! namespaces (every cluster here serves TLS and its agents joined with a
//! token, as in every other e2e test).
use std::path::Path;
use std::time::Duration;
use testbus_client::Client;
use testbus_pki::{ClientFile, Role};
use testbus_proto::states::{HostPhase, ProcessPhase};
use testbus_proto::{phase, Host, Process, Resource, Test};
use testbus_tests::{bin_dir, metric_sum, needs_root, wait_for, Cluster, CtlOutput};
use tonic::Code;

const HTTPS: &str = "https://10.77.0.1:7780";

fn write_config(path: &Path, f: &ClientFile) {
    f.save(path).unwrap();
}

fn admin_file(c: &Cluster) -> ClientFile {
    ClientFile::load(&c.dir.path().join("admin.yaml")).unwrap()
}

/// testbusctl in host-0's namespace toward the TLS listener, with `config`.
fn ctl_tls(c: &Cluster, config: &Path, args: &[&str]) -> CtlOutput {
    let mut all = vec!["--server", HTTPS];
    all.extend_from_slice(args);
    c.ctl_with(config, &all, None)
}

fn test_manifest(c: &Cluster) -> std::path::PathBuf {
    let path = c.dir.path().join("t.yaml");
    std::fs::write(
        &path,
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: t}\nspec:\n  hosts: [{role: a}]\n  steps: [{name: s, on: [a], argv: [\"true\"]}]\n",
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_nothing_and_a_viewer_only_reads() {
    if !needs_root("the security tests") {
        return;
    }
    let mut c = Cluster::start(1).await;
    c.ctl_node = Some("host-0".into());
    let admin = admin_file(&c);

    // No credentials at all: testbusctl says what is missing, exit 5.
    let bare = c.dir.path().join("bare.yaml");
    write_config(&bare, &ClientFile { server: HTTPS.into(), ..Default::default() });
    let out = ctl_tls(&c, &bare, &["get", "hosts"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("no credentials for https://10.77.0.1:7780") && out.stderr.contains("user create"));
    // The CA but no certificate: the server refuses, exit 5.
    let ca_only = c.dir.path().join("ca-only.yaml");
    write_config(
        &ca_only,
        &ClientFile {
            server: HTTPS.into(),
            certificate_authority: admin.certificate_authority.clone(),
            ..Default::default()
        },
    );
    let out = ctl_tls(&c, &ca_only, &["get", "hosts"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("a client without a certificate may not list Host"), "{out:?}");

    // A config file that is not one: exit 2, naming it and the field.
    let junk = c.dir.path().join("junk.yaml");
    std::fs::write(&junk, "server: https://x\nclientCert: oops\n").unwrap();
    let out = ctl_tls(&c, &junk, &["get", "hosts"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("junk.yaml") && out.stderr.contains("clientCert"), "{out:?}");

    // The admin's config works over TLS (the control for the refusals).
    let out = ctl_tls(&c, &c.dir.path().join("admin.yaml"), &["get", "hosts", "-o", "name"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host/host-0\n"), "{out:?}");

    // A viewer reads everything and writes nothing.
    let viewer = c.write_user_config("alice", "viewer");
    let out = ctl_tls(&c, &viewer, &["get", "hosts", "-o", "name"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host/host-0\n"), "{out:?}");
    let manifest = test_manifest(&c);
    let out = ctl_tls(&c, &viewer, &["apply", "-f", manifest.to_str().unwrap()]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("viewer \"alice\" may not"), "{out:?}");
    for args in [&["delete", "host/host-0"][..], &["cordon", "host-0"], &["run", "--", "true"]] {
        let out = ctl_tls(&c, &viewer, args);
        assert_eq!(out.code, 5, "{args:?}: {out:?}");
    }
    assert_eq!(c.ctl(&["get", "tests", "-o", "name"]).stdout, "", "nothing was created");
    assert!(
        !c.host_phase("host-0", HostPhase::Ready.as_str()).await.spec().unschedulable,
        "the viewer's cordon changed nothing"
    );

    // A certificate of another CA is refused, even for a name and role
    // the real CA issues.
    let (other, _) = testbus_pki::Ca::create().unwrap();
    let forged = other.issue("admin", Role::Admin, Duration::from_secs(3600)).unwrap();
    let forged_file = c.dir.path().join("forged.yaml");
    write_config(
        &forged_file,
        &ClientFile {
            server: HTTPS.into(),
            certificate_authority: admin.certificate_authority.clone(),
            client_certificate: forged.cert,
            client_key: forged.key,
        },
    );
    let out = ctl_tls(&c, &forged_file, &["get", "hosts", "-o", "name"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    // And a server of another CA is not trusted by the client.
    let mut wrong_ca = admin.clone();
    wrong_ca.certificate_authority = other.cert_pem().to_string();
    let wrong = c.dir.path().join("wrong-ca.yaml");
    write_config(&wrong, &wrong_ca);
    let out = ctl_tls(&c, &wrong, &["get", "hosts"]);
    assert_eq!(out.code, 5, "a TLS refusal is exit 5, said in a sentence: {out:?}");
    assert!(out.stderr.contains("not signed by the CA in your config"), "{out:?}");

    // Python's grpcio, with the admin's files: a list works, and the
    // viewer's delete is PERMISSION_DENIED.
    let viewer_file = ClientFile::load(&viewer).unwrap();
    let [ca, admin_crt, admin_key] = c.pem_files("admin", &admin);
    let [_, viewer_crt, viewer_key] = c.pem_files("viewer", &viewer_file);
    let script = r#"
import sys, grpc
ca, cert, key, vcert, vkey = [open(p, 'rb').read() for p in sys.argv[1:6]]
def call(cert, key, method, req=b''):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel('10.77.0.1:7780', creds) as ch:
        f = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return f(req, timeout=10)
hosts = call(cert, key, '/testbus.v1.Hosts/List')
print('listed', b'host-0' in hosts)
try:
    call(vcert, vkey, '/testbus.v1.Hosts/Delete', b'\x0a\x06host-0')
    print('deleted')
except grpc.RpcError as e:
    print('refused', e.code().name)
"#;
    let args = [ca, admin_crt, admin_key, viewer_crt, viewer_key];
    let out = c
        .command_in("host-0", Path::new("/usr/bin/python3"))
        .arg("-c")
        .arg(script)
        .args(&args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, "listed True\nrefused PERMISSION_DENIED\n", "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_acts_only_for_its_own_host_and_a_revoked_one_not_at_all() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(2).await;
    // A process on host-1, running (the run is ended with the test, even
    // a failed one).
    let _run = KillOnDrop(c.ctl_spawn(&["run", "--host", "host-1", "--", "sleep", "120"]));
    let client = c.client().await;
    let theirs = wait_for(Duration::from_secs(30), "the process on host-1 to run", || async {
        let (ps, _) = client.api::<Process>().list("", "spec.hostName=host-1").await.ok()?;
        ps.into_iter().find(|p| p.status().phase == ProcessPhase::Running)
    })
    .await;
    let host1 = client.api::<Host>().get("host-1").await.unwrap();
    let host0 = client.api::<Host>().get("host-0").await.unwrap();

    // Host-0's agent's certificate, used from host-0's namespace.
    let tls = c.agent_tls("host-0");
    let theirs_name = theirs.name().to_string();
    let results = c.in_node("host-0", move || async move {
        let a = Client::connect_with(HTTPS, Some(tls)).await.expect("connect with the agent's certificate");
        let code = |r: Result<(), tonic::Status>| r.map_err(|s| (s.code(), s.message().to_string()));
        let mut out = Vec::new();
        // Its own host and processes: allowed.
        out.push(("own lease", code(a.hosts().renew_lease(testbus_proto::RenewLeaseRequest {
            name: "host-0".into(),
            agent_id: host0.status().agent_id.clone(),
            release: false,
        }).await.map(|_| ()))));
        out.push(("own processes", code(a.api::<Process>().list("", "spec.hostName=host-0").await.map(|_| ()))));
        // Its own host's spec (it would uncordon itself): refused.
        let mut cordoned = host0.clone();
        cordoned.spec_mut().unschedulable = true;
        out.push(("own spec", code(a.api::<Host>().update(cordoned).await.map(|_| ()))));
        // Another host's status, processes and output: refused.
        out.push(("host-1 status", code(a.api::<Host>().update_status(host1.clone()).await.map(|_| ()))));
        out.push(("host-1 get", code(a.api::<Host>().get("host-1").await.map(|_| ()))));
        // Giving up another host's lease would end its tests at once.
        let release = testbus_proto::RenewLeaseRequest {
            name: "host-1".into(),
            agent_id: host1.status().agent_id.clone(),
            release: true,
        };
        out.push(("host-1 lease release", code(a.hosts().renew_lease(release).await.map(|_| ()))));
        // Nor may it stop another host's process, saying why.
        let mut stop = theirs.clone();
        (stop.spec_mut().stop, stop.spec_mut().stop_reason) = (true, "forged".into());
        out.push(("host-1 process stop", code(a.api::<Process>().update(stop).await.map(|_| ()))));
        out.push(("all processes", code(a.api::<Process>().list("", "").await.map(|_| ()))));
        let mut p = theirs.clone();
        p.status_mut().phase = ProcessPhase::Succeeded.into();
        out.push(("host-1 process status", code(a.api::<Process>().update_status(p).await.map(|_| ()))));
        let chunk = testbus_proto::OutputChunk {
            process: theirs.name().to_string(),
            data: b"forged\n".to_vec().into(),
            ..Default::default()
        };
        out.push(("host-1 output", code(a.output().append(chunk).await.map(|_| ()))));
        // Nor say bytes of its output were lost (an agent's own field).
        let lost = testbus_proto::OutputChunk { process: theirs.name().to_string(), offset: 100, lost: 100, ..Default::default() };
        out.push(("host-1 output lost", code(a.output().append(lost).await.map(|_| ()))));
        let send = testbus_proto::SendRequest { process: theirs.name().into(), key: "k".into(), value: b"v".to_vec() };
        out.push(("host-1 send", code(testbus_proto::sync_client::SyncClient::new(a.channel()).send(send).await.map(|_| ()))));
        // Nor may it make tests or processes, or delete anything.
        let t: Test = match testbus_proto::manifest::parse("t", "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: x}\nspec: {hosts: [{role: a}], steps: [{name: s, on: [a], argv: [\"true\"]}]}\n").unwrap().pop() {
            Some(testbus_proto::Object::Test(t)) => t,
            _ => unreachable!(),
        };
        out.push(("create test", code(a.api::<Test>().create(t).await.map(|_| ()))));
        out.push(("delete host-0", code(a.api::<Host>().delete("host-0").await.map(|_| ()))));
        out
    });
    for (what, r) in &results {
        match *what {
            "own lease" | "own processes" => assert!(r.is_ok(), "{what}: {r:?}"),
            _ => {
                let (code, msg) = r.as_ref().expect_err(what);
                assert_eq!(*code, Code::PermissionDenied, "{what}: {msg}");
                assert!(msg.starts_with("agent \"host-0\" may not"), "{what}: {msg}");
            }
        }
    }
    // The process on host-1 was not touched.
    let still = client.api::<Process>().get(&theirs_name).await.unwrap();
    assert_eq!(still.status().phase, ProcessPhase::Running);

    // Revoked: the same certificate is refused from now on.
    let out = std::process::Command::new(bin_dir().join("testbus-control-plane"))
        .args(["agent", "revoke", "host-0", "--data-dir"])
        .arg(c.dir.path().join("cp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tls = c.agent_tls("host-0");
    let refused = c.in_node("host-0", move || async move {
        let a = Client::connect_with(HTTPS, Some(tls)).await.unwrap();
        a.api::<Process>().list("", "spec.hostName=host-0").await.map(|_| ())
    });
    let refused = refused.expect_err(&format!("revoked, yet served:\n{}", c.read_log("control-plane")));
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("revoked"), "{refused:?}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent named `name` started with `token` in host-0's namespace: its
/// exit code if it ends (None once it has a certificate, or after 30 s:
/// then it is killed), and its log.
fn join_with(c: &Cluster, name: &str, token: &str) -> (Option<i32>, String) {
    let dir = c.dir.path().join(format!("join-{name}"));
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    let log = dir.join("agent.log");
    let mut child = c
        .command_in("host-0", &bin_dir().join("testbus-agent"))
        .args(["--server", &c.agent_server, "--name", name, "--join-token", token, "--lease-duration", "2s"])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--config-dir")
        .arg(dir.join("etc"))
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if std::time::Instant::now() > deadline || dir.join("tls/agent.crt").exists() {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_tokens_are_refused() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(1).await;
    let real: testbus_pki::JoinToken = c.join_token.parse().unwrap();

    // Forged: the right CA, a secret nobody made.
    let forged = testbus_pki::JoinToken::new(&real.ca).to_string();
    let (code, log) = join_with(&c, "forger", &forged);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("token: unknown, wrong, used up, revoked or expired"), "{log}");

    // Another control plane's: the agent refuses this server (its CA is
    // not the pinned one) before sending anything.
    let (other, _) = testbus_pki::Ca::create().unwrap();
    let foreign = testbus_pki::JoinToken { ca: other.fingerprint(), ..real.clone() }.to_string();
    let (code, log) = join_with(&c, "lost", &foreign);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("not the one the join token names"), "{log}");

    // Expired.
    let r = c
        .client()
        .await
        .auth()
        .create_token(testbus_proto::CreateTokenRequest {
            ttl: "1s".into(),
            pool: String::new(),
            host_name: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expires = testbus_proto::time::parse(&r.expires).unwrap();
    wait_for(Duration::from_secs(10), "the token to expire", || async {
        (std::time::SystemTime::now() > expires + Duration::from_secs(1)).then_some(())
    })
    .await;
    let (code, log) = join_with(&c, "late", &r.token);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("token: unknown, wrong, used up, revoked or expired"), "{log}");

    // A pool's token joins that pool's guests only.
    let r = c
        .client()
        .await
        .auth()
        .create_token(testbus_proto::CreateTokenRequest {
            ttl: "1h".into(),
            pool: "web".into(),
            host_name: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (code, log) = join_with(&c, "db-1", &r.token);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("for guests of pool \"web\""), "{log}");
    let (code, log) = join_with(&c, "web-0a1b2", &r.token);
    assert_eq!(code, None, "web-0a1b2 joined and ran: {log}");
    assert!(log.contains("joined"), "{log}");

    // Bad input to Join and CreateToken.
    let client = c.client().await;
    for (ttl, pool, field) in
        [("0s", "", "ttl:"), ("8d", "", "ttl:"), ("soon", "", "ttl:"), ("1h", "Bad_Pool", "pool:")]
    {
        let req = testbus_proto::CreateTokenRequest {
            ttl: ttl.into(),
            pool: pool.into(),
            host_name: String::new(),
            role: String::new(),
            uses: 0,
        };
        let e = client.auth().create_token(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{e:?}");
    }
    let bad = client
        .auth()
        .join(testbus_proto::JoinRequest {
            token: "junk".into(),
            host_name: "h".into(),
            csr: String::new(),
            take_over: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().starts_with("token:"), "{bad:?}");
    let bad = client
        .auth()
        .join(testbus_proto::JoinRequest {
            token: c.join_token.clone(),
            host_name: "Not A Name".into(),
            csr: String::new(),
            take_over: false,
        })
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("hostName:"), "{bad:?}");
    let bad = client
        .auth()
        .join(testbus_proto::JoinRequest {
            token: c.join_token.clone(),
            host_name: "h".into(),
            csr: "x".repeat(100_000),
            take_over: false,
        })
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("csr:"), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_their_certificates_before_they_expire() {
    if !needs_root("the security tests") {
        return;
    }
    let mut c = Cluster::start_full(1, &[], &["--agent-cert-ttl", "6s"]).await;
    let first = std::fs::read_to_string(c.dir.path().join("host-0/tls/agent.crt")).unwrap();
    let first_id = testbus_pki::identity_of_pem(&first).unwrap();
    // Renewed at 4 s, 8 s, ...: wait until the first has expired.
    wait_for(Duration::from_secs(60), "two renewals, past the first certificate's expiry", || async {
        let renewals = c.read_log("host-0").matches("renewed the certificate").count();
        (renewals >= 2 && std::time::SystemTime::now() > first_id.not_after).then_some(())
    })
    .await;
    let now = std::fs::read_to_string(c.dir.path().join("host-0/tls/agent.crt")).unwrap();
    assert_ne!(now, first);
    // Restarted without a token, the agent connects anew with what it
    // renewed (the first certificate has expired) and runs a test.
    c.kill_agent(0);
    c.join_token.clear();
    c.start_agent(0);
    wait_for(Duration::from_secs(30), "the agent to register again", || async {
        c.read_log("host-0").matches("registered").nth(1).map(|_| ())
    })
    .await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "echo", "still trusted"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "still trusted\n"), "{out:?}\n{}", c.read_log("host-0"));
}

/// A process speaks for itself only: one that asks its agent to send as
/// a process of another test (a forged `process` in a raw request to the
/// agent's socket) sends as itself, into its own test; the other test
/// never sees the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_cannot_send_for_a_test_it_is_not_in() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(3).await;
    // The victim listens on host-0 (host-2 keeps a second process of its
    // test running, so that somebody could send).
    let path = testbus_tests::manifest(
        &c,
        "victim.yaml",
        r#"apiVersion: testbus/v1
kind: Test
metadata: {name: victim}
spec:
  hosts: [{role: listener, selector: index=0}, {role: idle, selector: index=2}]
  steps:
    - {name: listen, on: [listener], argv: [testbusctl, recv, k, --timeout, 8s]}
    - {name: idle, on: [idle], argv: [sleep, "10"]}
"#,
    );
    assert_eq!(c.ctl(&["apply", "-f", &path]).code, 0);
    let client = c.client().await;
    let target = wait_for(Duration::from_secs(30), "the victim's listener to run", || async {
        let (ps, _) = client.api::<Process>().list("", "spec.hostName=host-0").await.ok()?;
        ps.into_iter().find(|p| p.status().phase == ProcessPhase::Running)
    })
    .await;
    // SendRequest{process: TARGET, key: "k", value: "forged"}, by hand.
    let script = r#"
import os, sys, grpc
proc = sys.argv[1].encode()
req = b'\x0a' + bytes([len(proc)]) + proc + b'\x12\x01k' + b'\x1a\x06forged'
ch = grpc.insecure_channel('unix:' + os.environ['TESTBUS_AGENT_SOCKET'])
ch.unary_unary('/testbus.v1.Sync/Send', request_serializer=lambda b: b, response_deserializer=lambda b: b)(req, timeout=10)
print('sent')
"#;
    let out = c.ctl(&["run", "--host", "host-1", "--", "/usr/bin/python3", "-c", script, target.name()]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "sent\n"), "{out:?}");
    // The victim's recv times out: nothing came for it.
    let out = c.ctl(&["wait", "test/victim", "--timeout", "60s"]);
    assert_ne!(out.code, 0, "the victim's test succeeded: {out:?}");
    let logs = c.ctl(&["logs", "test/victim"]);
    assert!(!logs.stdout.contains("forged"), "{logs:?}");
    let listener = client.api::<Process>().get(target.name()).await.unwrap();
    assert_eq!(listener.status().exit_code, Some(3), "recv timed out: {:?}", listener.status());
}

/// `/metrics` on the API's own port, over TLS: a viewer scrapes it and
/// Prometheus's own parser reads it; without a certificate it is 401, with
/// an agent's 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_the_api_port_to_viewers() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(1).await;
    let out = c.ctl(&["run", "--host", "host-0", "--", "echo", "counted"]);
    assert_eq!(out.code, 0, "{out:?}");
    let viewer = ClientFile::load(&c.write_user_config("bob", "viewer")).unwrap();
    let [ca, cert, key] = c.pem_files("bob", &viewer);
    let [acert, akey] = c.agent_pem_files("host-0");
    let url = "https://10.77.0.1:7780/metrics";
    let (status, samples) = c.scrape("host-0", url, &[ca.clone(), cert, key]);
    let (anonymous, _) = c.scrape("host-0", url, std::slice::from_ref(&ca));
    let (agent, _) = c.scrape("host-0", url, &[ca, acert, akey]);
    assert_eq!((status, anonymous, agent), (200, 401, 403));
    let value = |name: &str, label: &str, want: &str| {
        let labels: &[(&str, &str)] = if label.is_empty() { &[] } else { &[(label, want)] };
        metric_sum(&samples, name, labels)
    };
    assert!(value("testbus_api_requests_total", "method", "Claim") >= 1.0);
    assert!(value("testbus_api_request_duration_seconds_count", "method", "Claim") >= 1.0);
    assert_eq!(value("testbus_tests", "phase", "Succeeded"), 1.0);
    assert_eq!(value("testbus_hosts", "phase", "Ready"), 1.0);
    // Every phase is a series, zeros included, so alerts can be written on
    // them before the first host fails.
    let has = |name: &str, phase: &str| samples[name].as_array().unwrap().iter().any(|s| s[0]["phase"] == phase);
    assert!(has("testbus_hosts", "NotReady") && has("testbus_tests", "Error"), "{samples}");
    assert_eq!(value("testbus_hosts", "phase", "NotReady"), 0.0);
    assert_eq!(value("testbus_pending_tests", "", ""), 0.0);
    assert!(value("testbus_processes_started_total", "", "") >= 1.0, "{samples}");
    assert!(value("testbus_processes_ended_total", "phase", "Succeeded") >= 1.0);
    assert!(value("testbus_output_bytes_total", "", "") >= "counted\n".len() as f64);
    assert!(value("testbus_store_writes_total", "", "") >= 5.0);
    assert!(value("testbus_watch_connections", "", "") >= 1.0, "the agent's and the controllers' watches");
    assert!(value("testbus_claim_duration_seconds_count", "", "") >= 1.0);
}

/// A call's outcome: its code and message when refused.
type Outcome = Result<(), (Code, String)>;

/// What root code in a test could do with its agent's certificate (issue
/// 27, items 1–4), each refused: read another host's processes by
/// repeating the field selector, release its own claim while its test
/// runs, mark its host clean or healthy or move it between pools, and
/// hold its objects forever with finalizers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_certificate_reaches_nothing_outside_its_own_part() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(2).await;
    let _mine = KillOnDrop(c.ctl_spawn(&["run", "--host", "host-0", "--", "sleep", "120"]));
    let _theirs = KillOnDrop(c.ctl_spawn(&["run", "--host", "host-1", "--", "sleep", "120"]));
    let client = c.client().await;
    let running = |host: &'static str| {
        let client = client.clone();
        async move {
            wait_for(Duration::from_secs(30), "a process to run", || async {
                let (ps, _) = client.api::<Process>().list("", &format!("spec.hostName={host}")).await.ok()?;
                ps.into_iter().find(|p| p.status().phase == ProcessPhase::Running)
            })
            .await
        }
    };
    let (mine, _) = (running("host-0").await, running("host-1").await);
    let claimed = client.api::<Host>().get("host-0").await.unwrap();
    let test = claimed.status().claim.clone().expect("host-0 is claimed by its test").test;

    let tls = c.agent_tls("host-0");
    let mine_name = mine.name().to_string();
    let results = c.in_node("host-0", move || async move {
        let a = Client::connect_with(HTTPS, Some(tls)).await.expect("connect with the agent's certificate");
        let code = |r: Result<(), tonic::Status>| r.map_err(|s| (s.code(), s.message().to_string()));
        let mut out: Vec<(String, Outcome)> = Vec::new();
        // 1. One field, one value: every repetition is refused, whatever
        // the order or spacing; the list an agent gets is its own.
        for sel in [
            "spec.hostName=host-0,spec.hostName=host-1",
            "spec.hostName=host-1,spec.hostName=host-0",
            " spec.hostName = host-1 , spec.hostName = host-0 ",
        ] {
            let listed = a.api::<Process>().list("", sel).await;
            out.push((format!("list {sel}"), code(listed.map(|_| ()))));
            let watched = a.api::<Process>().watch("", "", sel).await;
            out.push((format!("watch {sel}"), code(watched.map(|_| ()))));
        }
        let own = a.api::<Process>().list("", "spec.hostName=host-0").await.expect("its own processes");
        assert!(own.0.iter().all(|p| p.spec().host_name == "host-0"), "{:?}", own.0);
        // 2. Its claim, and the rest the controllers write.
        let h = a.api::<Host>().get("host-0").await.unwrap();
        let mut released = h.clone();
        released.status_mut().claim = None;
        out.push(("release the claim".into(), code(a.api::<Host>().update_status(released).await.map(|_| ()))));
        let mut phase = h.clone();
        phase.status_mut().phase = "NotReady".into();
        out.push(("rewrite phase".into(), code(a.api::<Host>().update_status(phase).await.map(|_| ()))));
        let mut failures = h.clone();
        failures.status_mut().infra_failures += 1;
        out.push(("count failures".into(), code(a.api::<Host>().update_status(failures).await.map(|_| ()))));
        // 3. Marks: clean, pool, health.
        for (what, f) in [
            (
                "mark clean",
                (|h: &mut Host| {
                    h.meta_mut().annotations.insert("testbus.io/clean".into(), "true".into());
                }) as fn(&mut Host),
            ),
            ("join a pool", |h| {
                h.meta_mut().labels.insert("testbus.io/pool".into(), "vms".into());
            }),
            ("healthy since", |h| {
                h.meta_mut().annotations.insert("testbus.io/healthy-since".into(), "2999-01-01T00:00:00Z".into());
            }),
            // 4. Finalizers on its Host.
            ("host finalizer", |h| h.meta_mut().finalizers.push("example.com/forever".into())),
        ] {
            let mut changed = h.clone();
            f(&mut changed);
            out.push((what.into(), code(a.api::<Host>().update(changed).await.map(|_| ()))));
        }
        // 4. Finalizers on its Process.
        let mut p = a.api::<Process>().get(&mine_name).await.unwrap();
        p.meta_mut().finalizers.push("example.com/forever".into());
        out.push(("process finalizer".into(), code(a.api::<Process>().update(p).await.map(|_| ()))));
        // Its own labels stay its own (the control).
        let mut labelled = a.api::<Host>().get("host-0").await.unwrap();
        labelled.meta_mut().labels.insert("rack".into(), "r9".into());
        out.push(("own label".into(), code(a.api::<Host>().update(labelled).await.map(|_| ()))));
        out
    });
    for (what, r) in &results {
        match what.as_str() {
            "own label" => assert!(r.is_ok(), "{what}: {r:?}"),
            w if w.starts_with("list") || w.starts_with("watch") => {
                let (code, msg) = r.as_ref().expect_err(what);
                assert_eq!(*code, Code::InvalidArgument, "{what}: {msg}");
                assert!(msg.contains("spec.hostName is given more than once"), "{what}: {msg}");
            }
            _ => {
                let (code, msg) = r.as_ref().expect_err(what);
                assert_eq!(*code, Code::PermissionDenied, "{what}: {msg}");
                assert!(msg.starts_with("agent \"host-0\" may not"), "{what}: {msg}");
            }
        }
    }
    let after = client.api::<Host>().get("host-0").await.unwrap();
    assert_eq!(after.status().claim.as_ref().map(|c| c.test.as_str()), Some(test.as_str()), "still claimed");
    assert!(after.meta().finalizers.is_empty() && !after.meta().annotations.contains_key("testbus.io/clean"));
    assert_eq!(after.meta().labels.get("rack").map(String::as_str), Some("r9"));
    let p = client.api::<Process>().get(mine.name()).await.unwrap();
    assert!(p.meta().finalizers.is_empty(), "{:?}", p.meta());
    // The agent's data dir (journal, key, the tests' work dirs) is its own.
    use std::os::unix::fs::PermissionsExt;
    for d in ["host-0", "host-0/work"] {
        let mode = std::fs::metadata(c.dir.path().join(d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d}");
    }
    let journal = std::fs::metadata(c.dir.path().join("host-0/journal")).unwrap().permissions().mode();
    assert_eq!(journal & 0o077, 0, "the journal is mode {journal:o}");
}

/// A join token for `name` through the API: the certificate, or the
/// refusal.
async fn join_as(c: &Cluster, token: &str, name: &str) -> Result<testbus_pki::Identity, tonic::Status> {
    let (csr, _key) = testbus_pki::new_csr(name).unwrap();
    let req = testbus_proto::JoinRequest { token: token.into(), host_name: name.into(), csr, take_over: false };
    let creds = c.client().await.auth().join(req).await?.into_inner();
    Ok(testbus_pki::identity_of_pem(&creds.certificate).unwrap())
}

async fn token_with(c: &Cluster, pool: &str, uses: u32) -> String {
    let req = testbus_proto::CreateTokenRequest { ttl: "1h".into(), pool: pool.into(), uses, ..Default::default() };
    c.client().await.auth().create_token(req).await.unwrap().into_inner().token
}

fn control_plane(c: &Cluster, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_dir().join("testbus-control-plane"))
        .args(args)
        .arg("--data-dir")
        .arg(c.dir.path().join("cp"))
        .output()
        .unwrap()
}

/// Join tokens mint only the names they may (issue 27, item 5): not a
/// live agent's host, not a pool's look-alike; hosts and users are
/// revoked apart; a token can be limited in uses and revoked, and a
/// revoked host does not join again with the token it used; tokens an
/// admin made never stop a pool from making one per clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_mint_only_what_they_may() {
    if !needs_root("the security tests") {
        return;
    }
    let mut c = Cluster::start(1).await;
    c.ctl_node = Some("host-0".into());
    let any = token_with(&c, "", 0).await;

    // A live agent's host: refused, with the take-over sentence.
    let e = join_as(&c, &any, "host-0").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("held by another agent") && e.message().contains("--take-over"), "{e:?}");

    // Hosts and users are apart: an agent named alice is no user alice,
    // and revoking either leaves the other.
    let viewer = c.write_user_config("alice", "viewer");
    let admin_t3 = c.write_user_config("t3", "admin");
    let alice_agent = join_as(&c, &any, "alice").await.unwrap();
    assert_eq!((alice_agent.role, alice_agent.subject().as_str()), (Role::Agent, "host:alice"));
    for name in ["alice", "t3"] {
        let out = control_plane(&c, &["agent", "revoke", name]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for cfg in [&viewer, &admin_t3] {
        let out = ctl_tls(&c, cfg, &["get", "hosts", "-o", "name"]);
        assert_eq!((out.code, out.stdout.as_str()), (0, "host/host-0\n"), "{cfg:?}: {out:?}");
    }
    let out = control_plane(&c, &["user", "revoke", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ctl_tls(&c, &viewer, &["get", "hosts"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("revoked"), "{out:?}");

    // A revoked host does not join again with the token it used; a new
    // token joins it.
    let e = join_as(&c, &any, "alice").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked after this token was made"), "{e:?}");
    join_as(&c, &token_with(&c, "", 0).await, "alice").await.unwrap();

    // --uses: one join, then used up.
    let once = token_with(&c, "", 1).await;
    join_as(&c, &once, "u1").await.unwrap();
    let e = join_as(&c, &once, "u2").await.unwrap_err();
    assert!(e.message().contains("used up"), "{e:?}");
    // token revoke, by the token or its id.
    let revoked = token_with(&c, "", 0).await;
    let out = control_plane(&c, &["token", "revoke", revoked.split('.').nth(2).unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(join_as(&c, &revoked, "r1").await.is_err());
    let out = control_plane(&c, &["token", "revoke", &revoked]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no token"));

    // A pool's token: its guests' names exactly, and the certificate says
    // the pool, which its Host then carries whatever the agent asks.
    let vms = token_with(&c, "vms", 0).await;
    for look_alike in ["vms-x-0a1b2", "vms-0a1b", "vms-x"] {
        let e = join_as(&c, &vms, look_alike).await.unwrap_err();
        assert!(e.message().contains("for guests of pool \"vms\""), "{look_alike}: {e:?}");
    }
    let guest = join_as(&c, &vms, "vms-0a1b2").await.unwrap();
    assert_eq!(guest.pool.as_deref(), Some("vms"));

    // The cap on live tokens: an admin's thousand leave a pool's clean its
    // token.
    let client = c.client().await;
    let mut refused = None;
    for _ in 0..=1000 {
        let req = testbus_proto::CreateTokenRequest { ttl: "1h".into(), ..Default::default() };
        if let Err(e) = client.auth().create_token(req).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a thousand live tokens at most");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    for _ in 0..3 {
        let req = testbus_proto::CreateTokenRequest {
            ttl: "15m".into(),
            pool: "vms".into(),
            host_name: "vms-0a1b2".into(),
            uses: 1,
            ..Default::default()
        };
        client.auth().create_token(req).await.expect("a guest's token for its clean");
    }
}

/// The data dir holds every test's secrets: 0700 and its files 0600
/// whatever the umask the control plane was started with, nobody else
/// reads a secret from it, and a store left readable by others is refused
/// at start with what to do (issue 27, item 6).
#[test]
fn the_data_dir_is_its_owners_alone_whatever_the_umask() {
    if !needs_root("the data dir test (it reads as nobody)") {
        return;
    }
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    // The control plane's data dir inside a dir anyone may enter, as
    // /var/lib is.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("cp");
    let start = || {
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("umask 000; exec \"$0\" --data-dir \"$1\" --listen 127.0.0.1:0 --no-controllers")
            .arg(bin_dir().join("testbus-control-plane"))
            .arg(&data)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut cp = KillOnDrop(start());
    let sock = data.join("api.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "the control plane never made its socket");
        assert!(cp.0.try_wait().unwrap().is_none(), "the control plane exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A test with a secret, and a file of output-like data through the API.
    let manifest = tmp.path().join("t.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: t}\nspec:\n  env: {DB_PASSWORD: hunter2}\n  hosts: [{role: a}]\n  steps: [{name: s, on: [a], argv: [\"true\"]}]\n",
    )
    .unwrap();
    let ctl = std::process::Command::new(bin_dir().join("testbusctl"))
        .args(["--server", &format!("unix:{}", sock.display()), "apply", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(ctl.status.success(), "{}", String::from_utf8_lossy(&ctl.stderr));

    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir");
    let mut seen = 0;
    let mut dirs = vec![data.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let t = std::fs::symlink_metadata(&p).unwrap().file_type();
            if t.is_dir() {
                dirs.push(p.clone());
            }
            let m = mode(&p);
            assert_eq!(m & 0o077, 0, "{} is mode {m:04o}", p.display());
            seen += usize::from(t.is_file() || t.is_socket());
        }
    }
    assert!(seen >= 4, "the store, the socket, the CA and its key at least");
    // Nobody else finds the secret.
    let nobody = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "grep", "-c", "hunter2"])
        .arg(data.join("store.redb"))
        .output()
        .unwrap();
    assert!(!nobody.status.success(), "nobody read the store: {nobody:?}");
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("Permission denied"), "{nobody:?}");
    let root = std::process::Command::new("grep").args(["-c", "hunter2"]).arg(data.join("store.redb")).output();
    assert!(root.unwrap().status.success(), "the control: the secret is in the store");

    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(cp.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
    cp.0.wait().unwrap();
    // Left readable by others: refused, saying what to do.
    std::fs::set_permissions(data.join("store.redb"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = start().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("store.redb is readable by other users (mode 0644)") && err.contains("chmod 600"), "{err}");
}

/// One identity holds at most its share of watches and of the dashboard's
/// live streams (issue 27, item 10: one viewer held all 256 stream slots,
/// and idle watches had no bound but memory): the next is refused, naming
/// the limit, while others still get theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_holds_only_its_share_of_watches_and_streams() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(1).await;
    let viewer = ClientFile::load(&c.write_user_config("wanda", "viewer")).unwrap();
    let tls = testbus_client::Tls::new(
        testbus_pki::client_config(
            &viewer.certificate_authority,
            Some((&viewer.client_certificate, &viewer.client_key)),
        )
        .unwrap(),
    );
    let agent = c.agent_tls("host-0");
    let (refused, others) = c.in_node("host-0", move || async move {
        // Several connections: one carries a bounded number of streams.
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(Client::connect_with(HTTPS, Some(tls.clone())).await.unwrap());
        }
        let mut held = Vec::new();
        let mut refused = None;
        for i in 0..1100 {
            match clients[i % 8].api::<Host>().watch("", "", "").await {
                Ok(w) => held.push(w),
                Err(e) => {
                    refused = Some((held.len(), e));
                    break;
                }
            }
        }
        // Another identity still watches.
        let a = Client::connect_with(HTTPS, Some(agent)).await.unwrap();
        let others = a.api::<Process>().watch("", "", "spec.hostName=host-0").await.map(|_| ());
        (refused, others)
    });
    let (n, e) = refused.expect("a viewer's watches are bounded");
    assert_eq!(n, 1024, "{e:?}");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("viewer \"wanda\" holds 1024 watches, the most one identity may"), "{e:?}");
    assert!(others.is_ok(), "{others:?}");

    // Dashboard streams: 16 per identity.
    let [ca, cert, key] = c.pem_files("wanda", &viewer);
    let script = r#"
import http.client, ssl, sys
ca, cert, key = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
ctx.load_cert_chain(cert, key)
held, codes = [], []
for i in range(18):
    con = http.client.HTTPSConnection('10.77.0.1', 7780, context=ctx, timeout=10)
    con.request('GET', '/events?page=overview')
    r = con.getresponse()
    codes.append(r.status)
    held.append((con, r))
print(' '.join(map(str, codes)))
"#;
    let out = c
        .command_in("host-0", std::path::Path::new("/usr/bin/python3"))
        .args(["-c", script, &ca, &cert, &key])
        .output()
        .unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    let want = format!("{}429 429\n", "200 ".repeat(16));
    assert_eq!(codes, want, "{}", String::from_utf8_lossy(&out.stderr));
}

/// A process's streamed stdin (issue 30): its test's driver (an admin)
/// writes it; its own host's agent reads it, and nothing else of anyone's
/// output; no agent writes any stdin, its own processes' included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reads_only_its_own_processes_stdin_and_writes_none() {
    if !needs_root("the security tests") {
        return;
    }
    let c = Cluster::start(2).await;
    assert_eq!(c.ctl(&["create", "test", "pipe", "--claim", "a:2", "--wait-claimed"]).code, 0);
    let admin = c.client().await;
    let exec = |stream: bool| testbus_proto::ExecRequest {
        test: "pipe".into(),
        on: vec![],
        command: Some(testbus_proto::Step { argv: vec!["cat".into()], stdin_stream: stream, ..Default::default() }),
    };
    let made = admin.tests().exec(exec(true)).await.unwrap().into_inner().processes;
    let on = |host: &str| made.iter().find(|p| p.spec().host_name == host).unwrap().name().to_string();
    let (own, theirs) = (on("host-0"), on("host-1"));
    let plain = admin.tests().exec(exec(false)).await.unwrap().into_inner().processes;
    let plain_own = plain.iter().find(|p| p.spec().host_name == "host-0").unwrap().name().to_string();
    // The driver writes a process's stdin; one without stdinStream takes none.
    let stdin_chunk = |process: &str, data: &[u8]| testbus_proto::OutputChunk {
        process: process.into(),
        stream: testbus_proto::OutputStream::Stdin as i32,
        data: data.to_vec().into(),
        ..Default::default()
    };
    let wrote = admin.output().append(stdin_chunk(&own, b"from the driver\n")).await.unwrap().into_inner();
    assert_eq!(wrote.length, 16);
    let e = admin.output().append(stdin_chunk(&plain_own, b"x")).await.unwrap_err();
    assert!(e.code() == Code::FailedPrecondition && e.message().contains("no streamed stdin"), "{e:?}");
    c.wait_output(&format!("process/{own}"), "from the driver").await;

    let tls = c.agent_tls("host-0");
    let (own2, theirs2) = (own.clone(), theirs.clone());
    let results = c.in_node("host-0", move || async move {
        let a = Client::connect_with(HTTPS, Some(tls)).await.expect("connect with the agent's certificate");
        let read = |process: &str, stdin: bool| testbus_proto::ReadOutputRequest {
            process: process.into(),
            follow: false,
            stdin,
        };
        let mut out = Vec::new();
        let mut mine = a.output().read(read(&own2, true)).await.map(|r| r.into_inner());
        let first = match &mut mine {
            Ok(s) => s.message().await.map(|c| c.map(|c| c.data.to_vec())),
            Err(e) => Err(e.clone()),
        };
        out.push(("own stdin", first.map(|d| String::from_utf8_lossy(&d.unwrap_or_default()).into_owned())));
        let code = |r: Result<tonic::Response<tonic::codec::Streaming<testbus_proto::OutputChunk>>, tonic::Status>| {
            r.map(|_| String::new())
        };
        out.push(("host-1 stdin", code(a.output().read(read(&theirs2, true)).await)));
        out.push(("own stdout", code(a.output().read(read(&own2, false)).await)));
        let forged = testbus_proto::OutputChunk {
            process: own2.clone(),
            stream: testbus_proto::OutputStream::Stdin as i32,
            offset: 16,
            data: b"forged\n".to_vec().into(),
            ..Default::default()
        };
        out.push(("own stdin write", a.output().append(forged).await.map(|_| String::new())));
        out
    });
    for (what, r) in &results {
        match *what {
            "own stdin" => assert_eq!(r.as_deref().ok(), Some("from the driver\n"), "{what}: {r:?}"),
            _ => {
                let e = r.as_ref().expect_err(what);
                assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
                assert!(e.message().starts_with("agent \"host-0\" may not"), "{what}: {e:?}");
            }
        }
    }
    // Closed: the process reads end of file and ends, with what it was sent.
    for p in [&own, &theirs] {
        let mut proc = admin.api::<Process>().get(p).await.unwrap();
        proc.spec_mut().stdin_closed = true;
        admin.api::<Process>().update(proc).await.unwrap();
    }
    for p in [&own, &theirs] {
        let ended = wait_for(Duration::from_secs(30), "cat to end", || async {
            let p = admin.api::<Process>().get(p).await.ok()?;
            phase::process_terminal(&p.status().phase).then_some(p)
        })
        .await;
        assert_eq!(ended.status().phase, ProcessPhase::Succeeded, "{ended:?}");
    }
    assert_eq!(c.ctl(&["logs", &format!("process/{own}")]).stdout, "from the driver\n");
}
