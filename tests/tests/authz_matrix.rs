//! Every gRPC method of `testbus.v1`, called by each identity over TLS:
//! an admin, a viewer, the agent of the host the request names ("own"),
//! the agent of another host ("other") and a client without a certificate
//! ("anonymous"). The methods are read from the `.proto` service
//! definitions (the descriptor set the server's reflection serves), so a
//! new method without a row here fails this test.
//!
//! Each request names host-0's objects and is built to fail *after*
//! authorization where it is allowed (a stale resource version, a name that
//! does not exist, an invalid value checked late): so "allowed" and
//! "refused" are told apart by the code alone, and nothing is changed.
//! Refused is PermissionDenied or Unauthenticated; anything else got past
//! authorization.
use prost::Message;
use std::collections::BTreeMap;
use std::time::Duration;
use testbus_client::{Client, Tls};
use testbus_proto::states::ProcessPhase;
use testbus_proto::{Host, Process, Resource, Test};
use testbus_tests::{needs_root, wait_for, Cluster, RawCodec as Raw};
use tonic::Code;

const HTTPS: &str = "https://10.77.0.1:7780";

/// Who may call each method: admin, viewer, own agent, other agent,
/// anonymous ('y' allowed, '-' refused).
const MATRIX: &[(&str, &str)] = &[
    ("Hosts/Create", "y-y--"),
    ("Hosts/Get", "yyy--"),
    ("Hosts/List", "yy---"),
    ("Hosts/Watch", "yy---"),
    ("Hosts/Update", "y-y--"),
    ("Hosts/UpdateStatus", "y-y--"),
    ("Hosts/Delete", "y----"),
    ("Hosts/RenewLease", "y-y--"),
    ("Tests/Create", "y----"),
    ("Tests/Get", "yyy--"),
    ("Tests/List", "yy---"),
    ("Tests/Watch", "yy---"),
    ("Tests/Update", "y----"),
    ("Tests/UpdateStatus", "y----"),
    ("Tests/Delete", "y----"),
    ("Tests/Claim", "y----"),
    ("Tests/SetEnv", "y----"),
    ("Tests/RecordResult", "y----"),
    ("Tests/Finish", "y----"),
    ("Tests/Exec", "y----"),
    ("Tests/Rerun", "y----"),
    ("HostPools/Create", "y----"),
    ("HostPools/Get", "yy---"),
    ("HostPools/List", "yy---"),
    ("HostPools/Watch", "yy---"),
    ("HostPools/Update", "y----"),
    ("HostPools/UpdateStatus", "y----"),
    ("HostPools/Delete", "y----"),
    ("HostPools/Snapshot", "y----"),
    ("Processes/Create", "y----"),
    ("Processes/Get", "yyy--"),
    ("Processes/List", "yyy--"),
    ("Processes/Watch", "yyy--"),
    ("Processes/Update", "y-y--"),
    ("Processes/UpdateStatus", "y-y--"),
    ("Processes/Delete", "y----"),
    ("Output/Append", "y-y--"),
    ("Output/Read", "yy---"),
    ("Sync/Barrier", "y-y--"),
    ("Sync/Send", "y-y--"),
    ("Sync/Recv", "y-y--"),
    ("Blobs/Upload", "y----"),
    ("Blobs/Stat", "yyyy-"),
    ("Blobs/Download", "yyyy-"),
    ("Auth/Join", "y---y"),
    ("Auth/Renew", "y-yy-"),
    ("Auth/CreateToken", "y----"),
    ("Auth/Revoke", "y----"),
    ("Auth/RevokeToken", "y----"),
];

const IDENTITIES: [&str; 5] = ["admin", "viewer", "own agent", "other agent", "anonymous"];

/// The methods of every `testbus.v1` service, from the descriptor set:
/// "Service/Method" with whether the client and the server stream.
fn methods() -> Vec<(String, bool, bool)> {
    let set = prost_types::FileDescriptorSet::decode(testbus_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set");
    let mut out = Vec::new();
    for f in set.file.iter().filter(|f| f.package() == "testbus.v1") {
        for s in &f.service {
            for m in &s.method {
                out.push((format!("{}/{}", s.name(), m.name()), m.client_streaming(), m.server_streaming()));
            }
        }
    }
    out
}

/// What the requests name, read once as an admin.
struct Targets {
    host: Host,
    test: Test,
    process: Process,
}

/// The request each method gets: host-0's objects, failing after
/// authorization (stale versions, names that do not exist, values checked
/// late) wherever it is allowed.
fn request(method: &str, t: &Targets) -> Vec<u8> {
    let stale = |mut o: testbus_proto::ObjectMeta| {
        o.resource_version = "1".into();
        Some(o)
    };
    let host = Host { metadata: stale(t.host.meta().clone()), ..t.host.clone() };
    let test = Test { metadata: stale(t.test.meta().clone()), ..t.test.clone() };
    let process = Process { metadata: stale(t.process.meta().clone()), ..t.process.clone() };
    let get = |name: &str| testbus_proto::GetRequest { name: name.into() }.encode_to_vec();
    let delete =
        |name: &str| testbus_proto::DeleteRequest { name: name.into(), resource_version: "1".into() }.encode_to_vec();
    let on_host = testbus_proto::ListRequest { field_selector: "spec.hostName=host-0".into(), ..Default::default() };
    let watch_host =
        testbus_proto::WatchRequest { field_selector: "spec.hostName=host-0".into(), ..Default::default() };
    let pool = testbus_proto::HostPool {
        metadata: Some(testbus_proto::ObjectMeta {
            name: "no-such-pool".into(),
            resource_version: "1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = t.process.name().to_string();
    let (kind, verb) = method.split_once('/').unwrap();
    match (kind, verb) {
        // As an agent registers: its name, nothing of the controllers'.
        ("Hosts", "Create") => Host {
            metadata: Some(testbus_proto::ObjectMeta { name: "host-0".into(), ..Default::default() }),
            ..Default::default()
        }
        .encode_to_vec(),
        ("Hosts", "Update") | ("Hosts", "UpdateStatus") => host.encode_to_vec(),
        ("Hosts", "Get") => get("host-0"),
        ("Hosts", "Delete") => delete("host-0"),
        ("Hosts", "RenewLease") => {
            testbus_proto::RenewLeaseRequest { name: "host-0".into(), agent_id: "not-its-agent".into(), release: false }
                .encode_to_vec()
        }
        ("Tests", "Create") | ("Tests", "Update") | ("Tests", "UpdateStatus") => test.encode_to_vec(),
        ("Tests", "Get") => get(t.test.name()),
        ("Tests", "Delete") => delete(t.test.name()),
        ("Tests", "Claim") => testbus_proto::ClaimRequest {
            test: t.test.name().into(),
            test_resource_version: "1".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        ("Tests", "SetEnv") => {
            testbus_proto::SetEnvRequest { test: "no-such-test".into(), env: [("A".into(), "b".into())].into() }
                .encode_to_vec()
        }
        ("Tests", "RecordResult") => testbus_proto::RecordResultRequest {
            test: "no-such-test".into(),
            path: "a".into(),
            outcome: "pass".into(),
            message: String::new(),
        }
        .encode_to_vec(),
        ("Tests", "Finish") => {
            testbus_proto::FinishRequest { test: "no-such-test".into(), ..Default::default() }.encode_to_vec()
        }
        ("Tests", "Rerun") => {
            testbus_proto::RerunRequest { test: "no-such-test".into(), ..Default::default() }.encode_to_vec()
        }
        ("Tests", "Exec") => testbus_proto::ExecRequest {
            test: "no-such-test".into(),
            on: vec![],
            command: Some(testbus_proto::Step { argv: vec!["true".into()], ..Default::default() }),
        }
        .encode_to_vec(),
        ("HostPools", "Create") => testbus_proto::HostPool {
            metadata: Some(testbus_proto::ObjectMeta { name: "p".into(), ..Default::default() }),
            ..Default::default()
        }
        .encode_to_vec(),
        ("HostPools", "Update") | ("HostPools", "UpdateStatus") => pool.encode_to_vec(),
        ("HostPools", "Get") => get("no-such-pool"),
        ("HostPools", "Delete") => delete("no-such-pool"),
        ("HostPools", "Snapshot") => {
            testbus_proto::SnapshotRequest { host: "host-0".into(), action: "list".into(), name: String::new() }
                .encode_to_vec()
        }
        ("Processes", "Create") | ("Processes", "Update") | ("Processes", "UpdateStatus") => process.encode_to_vec(),
        ("Processes", "Get") => get(&p),
        ("Processes", "Delete") => delete(&p),
        (_, "List") => on_host.encode_to_vec(),
        (_, "Watch") => watch_host.encode_to_vec(),
        ("Output", "Append") => {
            testbus_proto::OutputChunk { process: p, offset: 1 << 40, ..Default::default() }.encode_to_vec()
        }
        ("Output", "Read") => {
            testbus_proto::ReadOutputRequest { process: p, follow: false, stdin: false }.encode_to_vec()
        }
        ("Sync", "Barrier") => testbus_proto::BarrierRequest {
            process: p,
            name: "matrix".into(),
            timeout: "1ms".into(),
            roles: vec!["nobody".into()],
        }
        .encode_to_vec(),
        ("Sync", "Send") => {
            testbus_proto::SendRequest { process: p, key: "matrix".into(), value: b"v".to_vec() }.encode_to_vec()
        }
        ("Sync", "Recv") => {
            testbus_proto::RecvRequest { process: p, key: "matrix".into(), from: String::new(), timeout: "1ms".into() }
                .encode_to_vec()
        }
        ("Blobs", "Upload") => {
            testbus_proto::UploadRequest { digest: format!("sha256:{}", "0".repeat(64)), data: b"x".to_vec() }
                .encode_to_vec()
        }
        ("Blobs", "Stat") => {
            testbus_proto::StatBlobRequest { digest: format!("sha256:{}", "0".repeat(64)) }.encode_to_vec()
        }
        ("Blobs", "Download") => {
            testbus_proto::DownloadRequest { digest: format!("sha256:{}", "0".repeat(64)) }.encode_to_vec()
        }
        ("Auth", "Join") => testbus_proto::JoinRequest {
            token: "junk".into(),
            host_name: "matrix".into(),
            csr: String::new(),
            take_over: false,
        }
        .encode_to_vec(),
        ("Auth", "Renew") => testbus_proto::RenewRequest { csr: "junk".into() }.encode_to_vec(),
        ("Auth", "CreateToken") => {
            testbus_proto::CreateTokenRequest { ttl: "0s".into(), ..Default::default() }.encode_to_vec()
        }
        ("Auth", "Revoke") => {
            testbus_proto::RevokeRequest { host_name: "Not A Name".into(), user_name: String::new() }.encode_to_vec()
        }
        ("Auth", "RevokeToken") => testbus_proto::RevokeTokenRequest { token: "junk".into() }.encode_to_vec(),
        _ => panic!("{method}: no request for this method; add it (and its row in MATRIX)"),
    }
}

/// Calls `method` with `body` on `channel`: its code (Ok for a success, or
/// a stream that opened).
async fn call(
    channel: tonic::transport::Channel,
    method: &str,
    client_stream: bool,
    server_stream: bool,
    body: Vec<u8>,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let path: http::uri::PathAndQuery = format!("/testbus.v1.{method}").parse().unwrap();
    let mut req = tonic::Request::new(body.clone());
    req.set_timeout(Duration::from_secs(10));
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match (client_stream, server_stream) {
        (false, false) => code(grpc.unary(req, path, Raw).await.map(|_| ())),
        (false, true) => code(grpc.server_streaming(req, path, Raw).await.map(|_| ())),
        (true, false) => {
            let stream = tonic::Request::new(futures::stream::iter([body]));
            code(grpc.client_streaming(stream, path, Raw).await.map(|_| ()))
        }
        (true, true) => {
            code(grpc.streaming(tonic::Request::new(futures::stream::iter([body])), path, Raw).await.map(|_| ()))
        }
    }
}

fn refused(code: Code) -> bool {
    matches!(code, Code::PermissionDenied | Code::Unauthenticated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_each_identity_as_the_matrix_says() {
    if !needs_root("the authorization matrix (TLS in network namespaces)") {
        return;
    }
    // Every method has a row, and every row a method.
    let methods = methods();
    let rows: BTreeMap<&str, &str> = MATRIX.iter().copied().collect();
    for (m, _, _) in &methods {
        assert!(rows.contains_key(m.as_str()), "{m}: a method without a row in MATRIX: say who may call it");
    }
    for m in rows.keys() {
        assert!(methods.iter().any(|(n, _, _)| n == m), "{m}: a row for a method the .proto does not define");
    }

    let c = Cluster::start(2).await;
    let _run = KillOnDrop(c.ctl_spawn(&["run", "--host", "host-0", "--", "sleep", "120"]));
    let client = c.client().await;
    let process = wait_for(Duration::from_secs(30), "a process on host-0 to run", || async {
        let (ps, _) = client.api::<Process>().list("", "spec.hostName=host-0").await.ok()?;
        ps.into_iter().find(|p| p.status().phase == ProcessPhase::Running)
    })
    .await;
    let test = client.api::<Test>().get(&process.spec().test).await.unwrap();
    let host = client.api::<Host>().get("host-0").await.unwrap();
    let targets = std::sync::Arc::new(Targets { host, test, process });

    let admin = testbus_pki::ClientFile::load(&c.dir.path().join("admin.yaml")).unwrap();
    let viewer = testbus_pki::ClientFile::load(&c.write_user_config("vera", "viewer")).unwrap();
    let user_tls = |f: &testbus_pki::ClientFile| {
        Tls::new(
            testbus_pki::client_config(&f.certificate_authority, Some((&f.client_certificate, &f.client_key))).unwrap(),
        )
    };
    let anonymous = Tls::new(testbus_pki::client_config(&admin.certificate_authority, None).unwrap());
    let tls = [user_tls(&admin), user_tls(&viewer), c.agent_tls("host-0"), c.agent_tls("host-1"), anonymous];

    let t = targets.clone();
    let answers: Vec<(String, [Code; 5])> = c.in_node("host-0", move || async move {
        let mut channels = Vec::new();
        for tls in tls {
            let client = Client::connect_with(HTTPS, Some(tls)).await.expect("connect");
            channels.push(client.channel());
        }
        let mut out = Vec::new();
        for (m, cs, ss) in methods {
            let mut codes = [Code::Ok; 5];
            for (i, ch) in channels.iter().enumerate() {
                codes[i] = call(ch.clone(), &m, cs, ss, request(&m, &t)).await;
            }
            out.push((m, codes));
        }
        out
    });
    let mut wrong = Vec::new();
    for (m, codes) in &answers {
        let want = rows[m.as_str()].as_bytes();
        for (i, code) in codes.iter().enumerate() {
            let allowed = want[i] == b'y';
            if allowed == refused(*code) || *code == Code::Unavailable {
                wrong.push(format!(
                    "{m} by {}: {:?}, expected {}",
                    IDENTITIES[i],
                    code,
                    if allowed { "allowed" } else { "refused" }
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{} answers differ from the matrix:\n{}", wrong.len(), wrong.join("\n"));
    // Nothing the allowed calls did changed what they named.
    let after = client.api::<Host>().get("host-0").await.unwrap();
    assert_eq!(after.status().claim, targets.host.status().claim);
    assert!(client.api::<Test>().get(targets.test.name()).await.unwrap().meta().deletion_timestamp.is_empty());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
