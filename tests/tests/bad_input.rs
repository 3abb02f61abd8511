//! Hostile input: the corpus in tests/corpus/manifests (hack/gen-corpus
//! writes it) through the CLI and straight at the server, and garbage bytes
//! at every RPC method. Every case must be refused with an error naming
//! what is wrong, nothing may be stored, and no daemon may fall over.
use std::path::PathBuf;
use testbus_proto::{Object, Test};
use testbus_tests::{repo_root, Cluster, RawCodec};

fn corpus() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/corpus/manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn expectation(path: &PathBuf) -> String {
    let raw = std::fs::read(path).unwrap();
    let first = raw.split(|b| *b == b'\n').next().unwrap();
    String::from_utf8_lossy(first).trim_start_matches("# expect:").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_is_refused_field_by_field_and_nothing_is_stored() {
    let c = Cluster::start(1).await;
    let files = corpus();
    assert!(files.len() >= 100, "{} cases", files.len());
    let mut sent_to_server = 0;
    let client = c.client().await;
    for f in &files {
        let expect = expectation(f);
        let out = c.ctl(&["apply", "-f", f.to_str().unwrap()]);
        assert_eq!(out.code, 2, "{}: {out:?}", f.display());
        assert!(out.stderr.contains(&expect), "{}: expected {expect:?} in {:?}", f.display(), out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}: {}", f.display(), out.stderr);
        // What parses goes to the server too, past the CLI's checks.
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        let Ok(objs) = testbus_proto::manifest::parse("corpus", &text) else { continue };
        for o in objs {
            if o.validate().is_ok() {
                continue; // a good document in a bad file
            }
            let r = match o {
                Object::Test(t) => client.api::<Test>().create(t).await.map(|_| ()),
                Object::Host(h) => client.api::<testbus_proto::Host>().create(h).await.map(|_| ()),
                Object::Process(p) => client.api::<testbus_proto::Process>().create(p).await.map(|_| ()),
                Object::HostPool(p) => client.api::<testbus_proto::HostPool>().create(p).await.map(|_| ()),
            };
            let s = r.expect_err(&format!("{}: the server accepted it", f.display()));
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}: {s:?}", f.display());
            sent_to_server += 1;
        }
    }
    assert!(sent_to_server >= 60, "only {sent_to_server} cases reached the server");
    let tests = c.ctl(&["get", "tests", "-o", "name"]);
    assert_eq!((tests.code, tests.stdout.as_str()), (0, ""), "nothing stored");
    let procs = c.ctl(&["get", "processes", "-o", "name"]);
    assert_eq!(procs.stdout, "");
    assert_eq!(c.ctl(&["get", "hostpools", "-o", "name"]).stdout, "", "nothing stored");
    assert_eq!(c.ctl(&["get", "hosts", "-o", "name"]).stdout, "host/host-0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_at_every_method_are_refused_and_the_server_stays_up() {
    let c = Cluster::start(1).await;
    let ch = c.client().await.channel();
    let payloads: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], // a length past the end
        vec![0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // an over-long varint
        vec![0x1a, 0x03, 0xff, 0xfe, 0xfd],       // invalid UTF-8 in a string field
        b"\x0a\x02..".to_vec(),                   // a name of ".."
        vec![],                                   // an empty message
        vec![0x22, 0x02, 0x22, 0x00],             // nested garbage
    ];
    let mut methods = Vec::new();
    for svc in ["Hosts", "Tests", "Processes"] {
        for m in ["Create", "Get", "List", "Update", "UpdateStatus", "Delete"] {
            methods.push(format!("/testbus.v1.{svc}/{m}"));
        }
    }
    for m in [
        "Tests/Claim",
        "Tests/SetEnv",
        "Tests/RecordResult",
        "Tests/Finish",
        "Hosts/RenewLease",
        "Output/Append",
        "Sync/Send",
        "Blobs/Stat",
    ] {
        methods.push(format!("/testbus.v1.{m}"));
    }
    let mut refused = 0;
    for m in &methods {
        for p in &payloads {
            let mut grpc = tonic::client::Grpc::new(ch.clone());
            grpc.ready().await.unwrap();
            let path: http::uri::PathAndQuery = m.parse().unwrap();
            let r = grpc.unary(tonic::Request::new(p.clone()), path, RawCodec).await;
            // A few empty or harmless messages are valid requests (an
            // empty List lists everything).
            if let Err(s) = r {
                assert!(s.code() != tonic::Code::Unknown && s.code() != tonic::Code::Unavailable, "{m}: {s:?}");
                refused += 1;
            }
        }
    }
    assert!(refused >= methods.len() * 4, "only {refused} refused");
    // Still up and intact.
    let out = c.ctl(&["get", "hosts", "-o", "name"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "host/host-0\n"), "{out:?}");
    assert_eq!(c.ctl(&["run", "--", "true"]).code, 0);
}
