//! The kubernetes provider in a real control plane: no cluster can run
//! here (its requests are checked against kube's mock layer in
//! pool-kubernetes/src/tests.rs), so this checks what a control plane
//! without one does with such a pool: it says why on the pool, makes
//! nothing, and deletes the pool at once.
use std::time::Duration;
use testbus_proto::{HostPool, Resource};
use testbus_tests::{manifest, wait_for, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_pool_without_a_cluster_says_so_and_makes_nothing() {
    let mut c = Cluster::start(0).await;
    c.kill_control_plane();
    let nowhere = c.dir.path().join("no-kubeconfig");
    c.cp_env.push(("KUBECONFIG".into(), nowhere.display().to_string()));
    c.cp_env.push(("KUBERNETES_SERVICE_HOST".into(), String::new()));
    c.start_control_plane().await;
    let p = manifest(
        &c,
        "pool.yaml",
        "apiVersion: testbus/v1\nkind: HostPool\nmetadata: {name: tbk}\nspec:\n  provider: kubernetes\n  image: localhost/testbus-guest\n  address: 10.77.0.1:7780\n  capabilities: [pod]\n  min: 1\n",
    );
    assert_eq!(c.ctl(&["apply", "-f", &p]).code, 0);
    let client = c.client().await;
    let cond = wait_for(Duration::from_secs(30), "the pool to say it has no cluster", || async {
        let p = client.api::<HostPool>().get("tbk").await.ok()?;
        p.status().conditions.iter().find(|c| c.reason == "KubernetesUnreachable").cloned()
    })
    .await;
    assert!(cond.message.contains("no Kubernetes client"), "{cond:?}");
    let p = client.api::<HostPool>().get("tbk").await.unwrap();
    assert!(p.status().guests.is_empty() && p.meta().finalizers.is_empty(), "{p:?}");
    assert_eq!(c.ctl(&["delete", "hostpool/tbk"]).code, 0);
    wait_for(Duration::from_secs(10), "the pool to go", || async {
        client.api::<HostPool>().get_opt("tbk").await.ok()?.is_none().then_some(())
    })
    .await;
}

/// The pool examples no test applies as they are (a cluster, a bare host
/// plumbed by hand) are valid: parsed and checked as the API checks them.
#[test]
fn the_examples_no_test_applies_are_valid() {
    use testbus_proto::validate::Validate;
    for name in ["pool-kubernetes.yaml", "pool-mixed-substrates.yaml"] {
        let path = testbus_tests::repo_root().join("manifests/examples").join(name);
        let objects = testbus_proto::manifest::parse(name, &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(!objects.is_empty(), "{name}");
        for o in objects {
            let r = match &o {
                testbus_proto::Object::HostPool(p) => p.validate(),
                testbus_proto::Object::Test(t) => t.validate(),
                other => panic!("{name}: unexpected {:?}", other.kind()),
            };
            r.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
