//! The provider against kube's mock layer: each test's verifier takes the
//! requests the provider makes, in order, asserts what each asks, and
//! answers as an API server would (no cluster runs here).
use super::*;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn provider() -> (KubernetesProvider, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    (KubernetesProvider { namespace: "lab".into(), client: tokio::sync::OnceCell::new_with(Some(client)) }, handle)
}

fn spec() -> GuestSpec {
    let mut pool = HostPool::default();
    pool.meta_mut().name = "web".into();
    *pool.spec_mut() = testbus_proto::HostPoolSpec {
        provider: "kubernetes".into(),
        image: "registry.lab/testbus-agent:1".into(),
        address: "cp.lab:7780".into(),
        namespace: "lab".into(),
        memory: 128,
        cpus: 2,
        capabilities: vec!["k8s".into()],
        pod_template: "metadata: {labels: {team: qa}}\nspec:\n  nodeSelector: {disk: ssd}\n  containers: [{name: sidecar, image: busybox}]\n".into(),
        ..Default::default()
    };
    GuestSpec {
        name: "web-0a1b2".into(),
        pool: Arc::new(pool),
        state_dir: "/nonexistent".into(),
        address: None,
        boot: Duration::from_secs(30),
    }
}

struct Tokens(Option<&'static str>);

#[async_trait]
impl JoinTokens for Tokens {
    async fn token(&self, _guest: &str) -> Result<Option<String>, GuestError> {
        Ok(self.0.map(String::from))
    }
}

/// Takes the next request: asserts its method and that its path and query
/// start with `path`; answers `status` with `body`; returns the request's
/// URI and its body as JSON (Null if none).
async fn answer(handle: &mut Handle, method: Method, path: &str, status: u16, body: Value) -> (String, Value) {
    let (req, send) = handle.next_request().await.expect("the provider made a request");
    let uri = req.uri().to_string();
    assert_eq!(req.method(), method, "{uri}");
    assert!(uri.starts_with(path), "{uri} (expected {path})");
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
    );
    (uri, sent)
}

/// Answers a watch with these events, one JSON line each.
async fn answer_watch(handle: &mut Handle, path: &str, events: &[Value]) -> String {
    let (req, send) = handle.next_request().await.expect("the provider watched");
    let uri = req.uri().to_string();
    assert_eq!(req.method(), Method::GET);
    assert!(uri.starts_with(path) && uri.contains("watch=true"), "{uri}");
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(e).unwrap());
        body.push(b'\n');
    }
    send.send_response(Response::builder().body(Body::from(body)).unwrap());
    uri
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message})
}

/// A pod as the API shows it: its phase, whether the agent is ready, and
/// a waiting reason of the agent's container.
fn pod_json(rv: &str, phase: &str, ready: bool, waiting: Option<&str>) -> Value {
    let state = match waiting {
        Some(r) => json!({"waiting": {"reason": r, "message": "back-off pulling image"}}),
        None => json!({"running": {}}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0a1b2", "namespace": "lab", "resourceVersion": rv},
        "status": {"phase": phase, "containerStatuses": [{
            "name": "testbus-agent", "ready": ready, "restartCount": 0, "image": "x", "imageID": "",
            "state": state
        }]}
    })
}

const NS: &str = "/api/v1/namespaces/lab";

/// The requests up to the pod's creation, answered; returns the Secret and
/// the pod the provider sent.
async fn made(h: &mut Handle) -> (Value, Value) {
    answer(h, Method::GET, &format!("{NS}/configmaps/testbus-pool-web"), 404, status(404, "NotFound", "not found"))
        .await;
    let (_, cm) = answer(
        h,
        Method::POST,
        &format!("{NS}/configmaps"),
        201,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "testbus-pool-web", "uid": "u-1"}}),
    )
    .await;
    assert_eq!(cm["metadata"]["labels"]["testbus.io/pool"], "web");
    let (_, secret) = answer(
        h,
        Method::POST,
        &format!("{NS}/secrets"),
        201,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "web-0a1b2-join"}}),
    )
    .await;
    let (_, pod) = answer(h, Method::POST, &format!("{NS}/pods"), 201, pod_json("5", "Pending", false, None)).await;
    (secret, pod)
}

#[tokio::test]
async fn a_guest_is_a_pod_of_the_template_owned_by_its_pools_configmap_and_ready_when_its_agent_is() {
    let (p, mut h) = provider();
    let verifier = tokio::spawn(async move {
        let (secret, pod) = made(&mut h).await;
        // The token is in a Secret of the guest's own, owned by the pool's
        // ConfigMap (deleted with it), and nowhere in the pod.
        assert_eq!(secret["metadata"]["name"], "web-0a1b2-join");
        assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(secret["stringData"]["token"], "tok-1");
        assert!(!pod.to_string().contains("tok-1"), "{pod}");
        let ps = &pod["spec"];
        assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "ConfigMap");
        assert_eq!(pod["metadata"]["labels"]["testbus.io/pool"], "web");
        assert_eq!(pod["metadata"]["labels"]["team"], "qa", "the template's labels are kept");
        assert_eq!(ps["nodeSelector"]["disk"], "ssd");
        assert_eq!(ps["restartPolicy"], "Never");
        assert_eq!(ps["automountServiceAccountToken"], false, "a test is no cluster client");
        let containers = ps["containers"].as_array().unwrap();
        assert_eq!(containers[0]["name"], "sidecar");
        let agent = &containers[1];
        assert_eq!(agent["name"], "testbus-agent");
        assert_eq!(agent["image"], "registry.lab/testbus-agent:1");
        assert_eq!(agent["command"][0], "/usr/bin/testbus-agent");
        let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(&args[..4], ["--server", "https://cp.lab:7780", "--name", "web-0a1b2"]);
        assert!(args.windows(2).any(|w| w == ["--capability", "k8s"]), "{args:?}");
        assert_eq!(agent["env"][0]["valueFrom"]["secretKeyRef"]["name"], "web-0a1b2-join");
        assert_eq!(agent["resources"]["limits"]["memory"], "128Mi");
        assert_eq!(agent["resources"]["limits"]["cpu"], "2");
        // Readiness: a read, then a watch from its revision until the
        // agent's container is ready.
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("5", "Pending", false, None)).await;
        let uri = answer_watch(
            &mut h,
            &format!("{NS}/pods?"),
            &[
                json!({"type": "MODIFIED", "object": pod_json("6", "Running", false, None)}),
                json!({"type": "MODIFIED", "object": pod_json("7", "Running", true, None)}),
            ],
        )
        .await;
        assert!(uri.contains("resourceVersion=5") && uri.contains("fieldSelector=metadata.name%3Dweb-0a1b2"), "{uri}");
    });
    let said = parking_lot::Mutex::new(Vec::new());
    let r = p.create(&spec(), &Tokens(Some("tok-1")), &|s: &str| said.lock().push(s.to_string())).await;
    drop(p); // a request the verifier still waits for fails it
    verifier.await.unwrap();
    r.unwrap();
    assert_eq!(said.lock().as_slice(), ["waiting for its pod to be ready"]);
}

#[tokio::test]
async fn an_expired_watch_reads_the_pod_again_and_watches_on_from_there() {
    let (p, mut h) = provider();
    let verifier = tokio::spawn(async move {
        made(&mut h).await;
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("5", "Pending", false, None)).await;
        let gone = status(410, "Expired", "too old resource version: 5 (90)");
        answer_watch(&mut h, &format!("{NS}/pods?"), &[json!({"type": "ERROR", "object": gone})]).await;
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("90", "Pending", false, None)).await;
        let uri = answer_watch(
            &mut h,
            &format!("{NS}/pods?"),
            &[json!({"type": "MODIFIED", "object": pod_json("91", "Running", true, None)})],
        )
        .await;
        assert!(uri.contains("resourceVersion=90"), "{uri}");
    });
    let r = p.create(&spec(), &Tokens(Some("t")), &|_: &str| {}).await;
    drop(p); // a request the verifier still waits for fails it
    verifier.await.unwrap();
    r.unwrap();
}

#[tokio::test]
async fn a_pod_that_cannot_pull_its_image_fails_with_the_reason() {
    let (p, mut h) = provider();
    let verifier = tokio::spawn(async move {
        made(&mut h).await;
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("5", "Pending", false, None)).await;
        answer_watch(
            &mut h,
            &format!("{NS}/pods?"),
            &[json!({"type": "MODIFIED", "object": pod_json("6", "Pending", false, Some("ImagePullBackOff"))})],
        )
        .await;
    });
    let r = p.create(&spec(), &Tokens(Some("t")), &|_: &str| {}).await;
    drop(p);
    verifier.await.unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("ImagePullBackOff") && e.contains("back-off pulling image"), "{e}");
}

#[tokio::test]
async fn api_errors_are_said_in_the_apis_words() {
    let (p, mut h) = provider();
    let verifier = tokio::spawn(async move {
        answer(
            &mut h,
            Method::GET,
            &format!("{NS}/configmaps/testbus-pool-web"),
            403,
            status(403, "Forbidden", "configmaps is forbidden: User \"testbus\" cannot get resource"),
        )
        .await;
    });
    let r = p.create(&spec(), &Tokens(Some("t")), &|_: &str| {}).await;
    drop(p);
    verifier.await.unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("403 Forbidden") && e.contains("cannot get resource"), "{e}");
    // Without TLS there is no token to join with: refused before any call.
    let (p, _h) = provider();
    let e = p.create(&spec(), &Tokens(None), &|_: &str| {}).await.unwrap_err().to_string();
    assert!(e.contains("TLS listener"), "{e}");
}

#[tokio::test]
async fn pods_are_observed_listed_deleted_and_the_pool_released() {
    let (p, mut h) = provider();
    let verifier = tokio::spawn(async move {
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("7", "Running", true, None)).await;
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 404, status(404, "NotFound", "gone")).await;
        let (uri, _) = answer(
            &mut h,
            Method::GET,
            &format!("{NS}/pods?"),
            200,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                {"metadata": {"name": "web-0a1b2"}}, {"metadata": {"name": "other-11111"}}]}),
        )
        .await;
        assert!(uri.contains("labelSelector=testbus.io%2Fpool"), "{uri}");
        let (_, del) =
            answer(&mut h, Method::DELETE, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("8", "Running", true, None))
                .await;
        assert_eq!(del["gracePeriodSeconds"], 0, "{del}");
        // Its Host goes only once the pod is gone: looked at until then.
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 200, pod_json("9", "Running", true, None)).await;
        answer(&mut h, Method::GET, &format!("{NS}/pods/web-0a1b2"), 404, status(404, "NotFound", "gone")).await;
        answer(&mut h, Method::DELETE, &format!("{NS}/secrets/web-0a1b2-join"), 404, status(404, "NotFound", "gone"))
            .await;
        let (_, del) =
            answer(&mut h, Method::DELETE, &format!("{NS}/configmaps/testbus-pool-web"), 200, status(200, "", ""))
                .await;
        assert_eq!(del["propagationPolicy"], "Background", "{del}");
    });
    let s = spec();
    assert_eq!(p.observe(&s).await.unwrap(), Observed::Up { linked: true });
    assert_eq!(p.observe(&s).await.unwrap(), Observed::Down("its pod is gone".into()));
    assert_eq!(p.guests("web-").await.unwrap(), ["web-0a1b2"]);
    p.destroy(&s).await.unwrap();
    p.release_pool(&s.pool).await.unwrap();
    verifier.await.unwrap();
    assert!(!p.cleans_in_place(&s.pool), "a released pod is replaced");
}

#[test]
fn a_pod_state_names_what_keeps_it_from_running() {
    let pod = |v: Value| -> Pod { serde_json::from_value(v).unwrap() };
    assert_eq!(pod_state(&pod(pod_json("1", "Running", true, None))), PodState::Ready);
    assert_eq!(pod_state(&pod(pod_json("1", "Running", false, None))), PodState::Starting);
    assert_eq!(pod_state(&pod(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}))), PodState::Starting);
    let unschedulable = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "status": {"phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient memory."}]}});
    assert_eq!(
        pod_state(&pod(unschedulable)),
        PodState::Stuck("Unschedulable: 0/3 nodes are available: 3 Insufficient memory.".into())
    );
    let failed =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "status": {"phase": "Failed", "reason": "Evicted"}});
    assert_eq!(pod_state(&pod(failed)), PodState::Stuck("its pod failed: Evicted".into()));
    let crash = pod(pod_json("1", "Running", false, Some("CrashLoopBackOff")));
    assert!(matches!(pod_state(&crash), PodState::Stuck(w) if w.contains("CrashLoopBackOff")));
}
