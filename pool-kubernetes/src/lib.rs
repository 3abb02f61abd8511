//! testbus's kubernetes provider: the guests of a HostPool as pods. This
//! crate alone knows the Kubernetes API (through `kube` and `k8s-openapi`).
//!
//! A guest is a pod made from the pool's pod template (node selectors,
//! tolerations, sidecars) plus testbus's own container, `testbus-agent`:
//! the pool's image running `/usr/bin/testbus-agent`, which dials the
//! control plane's TLS listener at the pool's `address` and joins with a
//! short-lived token from a Secret of its own. Nothing links it on the
//! control plane's side. The pod never restarts (an agent that ended is a
//! lost host) and gets no service-account token (a test is no cluster
//! client).
//!
//! Everything made for a pool is owned (`ownerReferences`) by one
//! ConfigMap per pool, `testbus-pool-NAME`, and labelled
//! `testbus.io/pool=NAME`: deleting the pool deletes that ConfigMap, and
//! Kubernetes' garbage collector whatever a crashed control plane left.
//! Pods are never reused: a released guest's pod is deleted, and a new one
//! made (a clean state).
//!
//! Tested only against kube's mock layer (`tower-test`): no cluster runs
//! on the machines this project is built on. README.md says how to try it
//! on a real one.
#![forbid(unsafe_code)]

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use testbus_pool_provider::{
    async_trait, GuestError, GuestSpec, JoinTokens, LinkConfig, LinkStart, Observed, Provider, ProviderKind,
};
use testbus_proto::pool::{AGENT_CONTAINER, POOL_LABEL};
use testbus_proto::{HostPool, Resource};

/// The Secret key the join token is under.
pub const TOKEN_KEY: &str = "token";

/// The namespace of a pool that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How long a deleted pod may take to be gone.
const POD_GONE_DEADLINE: Duration = Duration::from_secs(60);

/// How long one watch request may last before it is made again.
const WATCH_SECONDS: u32 = 60;

/// `provider: kubernetes`: one provider per namespace. Its client comes
/// from the control plane's environment (in-cluster, or `KUBECONFIG`) on
/// first use, or is given (the tests' mock).
pub struct KubernetesKind {
    client: Option<kube::Client>,
}

impl KubernetesKind {
    /// A client from the environment, made on first use.
    pub fn from_env() -> KubernetesKind {
        KubernetesKind { client: None }
    }

    /// This client for every pool (a mock in tests).
    pub fn with_client(client: kube::Client) -> KubernetesKind {
        KubernetesKind { client: Some(client) }
    }
}

fn namespace(pool: &HostPool) -> String {
    match pool.spec().namespace.as_str() {
        "" => DEFAULT_NAMESPACE.into(),
        ns => ns.into(),
    }
}

impl ProviderKind for KubernetesKind {
    fn key(&self, pool: &HostPool) -> String {
        namespace(pool)
    }

    fn open(&self, pool: &HostPool, _links: &LinkConfig) -> Arc<dyn Provider> {
        Arc::new(KubernetesProvider {
            namespace: namespace(pool),
            client: tokio::sync::OnceCell::new_with(self.client.clone()),
        })
    }
}

/// One namespace's pods of every kubernetes pool.
pub struct KubernetesProvider {
    namespace: String,
    client: tokio::sync::OnceCell<kube::Client>,
}

/// Says what the API said, or why it could not be asked.
fn api_error(doing: &str) -> impl FnOnce(kube::Error) -> GuestError + '_ {
    move |e| match e {
        kube::Error::Api(s) => {
            GuestError::Substrate(format!("{doing}: the Kubernetes API said {} {}: {}", s.code, s.reason, s.message))
        }
        e => GuestError::Substrate(format!("{doing}: {e}")),
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The ConfigMap everything of `pool` is owned by.
pub fn anchor_name(pool: &str) -> String {
    format!("testbus-pool-{pool}")
}

/// The Secret with guest `name`'s join token.
pub fn secret_name(name: &str) -> String {
    format!("{name}-join")
}

fn labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(POOL_LABEL.to_string(), pool.to_string())])
}

/// How a pod stands, from its status (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not running yet: being scheduled, pulling, starting.
    Starting,
    /// Its agent's container runs and is ready.
    Ready,
    /// It will not get anywhere without help (an image that cannot be
    /// pulled, no node to run on, a container that keeps failing), or it
    /// ended: why.
    Stuck(String),
}

/// Container waiting reasons that do not go away by waiting (a first
/// `ErrImagePull` may: a registry hiccup; it becomes `ImagePullBackOff`).
const STUCK_WAITING: [&str; 5] =
    ["ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff"];

/// Reads a pod's status (pure).
pub fn pod_state(pod: &Pod) -> PodState {
    let Some(st) = &pod.status else { return PodState::Starting };
    match st.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            let why = st.message.clone().or_else(|| st.reason.clone()).unwrap_or_else(|| "its agent ended".into());
            return PodState::Stuck(format!("its pod {}: {why}", st.phase.as_deref().unwrap_or("").to_lowercase()));
        }
        _ => {}
    }
    for c in st.container_statuses.iter().flatten() {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if STUCK_WAITING.contains(&reason.as_str()) {
                let msg = w.message.clone().unwrap_or_default();
                return PodState::Stuck(format!("its container {} is {reason}: {msg}", c.name));
            }
        }
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return PodState::Stuck(format!("its container {} ended (exit code {})", c.name, t.exit_code));
        }
    }
    for cond in st.conditions.iter().flatten() {
        if cond.type_ == "PodScheduled" && cond.status == "False" && cond.reason.as_deref() == Some("Unschedulable") {
            return PodState::Stuck(format!("Unschedulable: {}", cond.message.clone().unwrap_or_default()));
        }
    }
    let agent_ready = st.container_statuses.iter().flatten().any(|c| c.name == AGENT_CONTAINER && c.ready);
    if st.phase.as_deref() == Some("Running") && agent_ready {
        PodState::Ready
    } else {
        PodState::Starting
    }
}

/// Guest `spec`'s pod (pure): the pool's template, its name, labels and
/// owner, and the agent's container with its token from `secret`.
pub fn pod(spec: &GuestSpec, owner: &OwnerReference) -> Result<Pod, GuestError> {
    let sp = spec.pool.spec();
    let template: k8s_openapi::api::core::v1::PodTemplateSpec = if sp.pod_template.is_empty() {
        Default::default()
    } else {
        let v: serde_json::Value = serde_norway::from_str(&sp.pod_template)
            .map_err(|e| GuestError::Substrate(format!("spec.podTemplate: {e}")))?;
        serde_json::from_value(v).map_err(|e| GuestError::Substrate(format!("spec.podTemplate: {e}")))?
    };
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = Some(spec.name.clone());
    meta.labels.get_or_insert_with(BTreeMap::new).extend(labels(spec.pool.name()));
    meta.owner_references = Some(vec![owner.clone()]);
    let mut ps = template.spec.unwrap_or_default();
    ps.restart_policy = Some("Never".into());
    ps.automount_service_account_token = Some(false);
    ps.enable_service_links = Some(false);
    ps.hostname = Some(spec.name.clone());
    let mut args = vec![
        "--server".to_string(),
        format!("https://{}", sp.address),
        "--name".into(),
        spec.name.clone(),
        "--data-dir".into(),
        "/var/lib/testbus".into(),
        "--take-over".into(),
        "--transport".into(),
        "kubernetes".into(),
    ];
    args.extend(testbus_proto::pool::agent_args(&spec.pool, false));
    let mut limits = BTreeMap::new();
    if sp.memory != 0 {
        limits.insert(
            "memory".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(format!("{}Mi", sp.memory)),
        );
    }
    if sp.cpus != 0 {
        limits.insert("cpu".to_string(), k8s_openapi::apimachinery::pkg::api::resource::Quantity(sp.cpus.to_string()));
    }
    let token = k8s_openapi::api::core::v1::EnvVar {
        name: "TESTBUS_JOIN_TOKEN".into(),
        value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
            secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                name: secret_name(&spec.name),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    ps.containers.push(k8s_openapi::api::core::v1::Container {
        name: AGENT_CONTAINER.into(),
        image: Some(sp.image.clone()),
        command: Some(vec!["/usr/bin/testbus-agent".into()]),
        args: Some(args),
        env: Some(vec![token]),
        resources: (!limits.is_empty())
            .then(|| k8s_openapi::api::core::v1::ResourceRequirements { limits: Some(limits), ..Default::default() }),
        ..Default::default()
    });
    Ok(Pod { metadata: meta, spec: Some(ps), status: None })
}

impl KubernetesProvider {
    async fn client(&self) -> Result<kube::Client, GuestError> {
        self.client
            .get_or_try_init(|| async {
                kube::Client::try_default().await.map_err(|e| {
                    GuestError::Substrate(format!(
                        "no Kubernetes client (in-cluster, or KUBECONFIG) for this control plane: {e}"
                    ))
                })
            })
            .await
            .cloned()
    }

    async fn api<K>(&self) -> Result<Api<K>, GuestError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Ok(Api::namespaced(self.client().await?, &self.namespace))
    }

    /// The pool's ConfigMap (made if missing), as the owner of what is made
    /// for its guests.
    async fn anchor(&self, pool: &str) -> Result<OwnerReference, GuestError> {
        let maps: Api<ConfigMap> = self.api().await?;
        let name = anchor_name(pool);
        let found = match maps.get_opt(&name).await.map_err(api_error("reading the pool's ConfigMap"))? {
            Some(m) => m,
            None => {
                let mut m = ConfigMap::default();
                m.metadata.name = Some(name.clone());
                m.metadata.labels = Some(labels(pool));
                match maps.create(&PostParams::default(), &m).await {
                    Ok(m) => m,
                    Err(e) if is_code(&e, 409) => {
                        maps.get(&name).await.map_err(api_error("reading the pool's ConfigMap"))?
                    }
                    Err(e) => return Err(api_error("making the pool's ConfigMap")(e)),
                }
            }
        };
        Ok(OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name,
            uid: found.metadata.uid.unwrap_or_default(),
            ..Default::default()
        })
    }

    /// Watches the pod until it is Ready (Ok), stuck (Err), or `within`
    /// has passed. A watch that ends is made again from the last revision
    /// seen; one the API has expired (410 Gone) from a fresh read.
    async fn wait_ready(&self, name: &str, within: Duration) -> Result<(), GuestError> {
        let pods: Api<Pod> = self.api().await?;
        let wait = async {
            let mut version = String::new();
            loop {
                if version.is_empty() {
                    let p = pods.get(name).await.map_err(api_error("reading the guest's pod"))?;
                    match pod_state(&p) {
                        PodState::Ready => return Ok(()),
                        PodState::Stuck(why) => return Err(GuestError::NotUp(why)),
                        PodState::Starting => {}
                    }
                    version = p.metadata.resource_version.unwrap_or_default();
                }
                let wp = WatchParams::default().fields(&format!("metadata.name={name}")).timeout(WATCH_SECONDS);
                let mut events =
                    pods.watch(&wp, &version).await.map_err(api_error("watching the guest's pod"))?.boxed();
                while let Some(ev) = events.try_next().await.map_err(api_error("watching the guest's pod"))? {
                    match ev {
                        WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                            match pod_state(&p) {
                                PodState::Ready => return Ok(()),
                                PodState::Stuck(why) => return Err(GuestError::NotUp(why)),
                                PodState::Starting => {}
                            }
                            version = p.metadata.resource_version.unwrap_or_default();
                        }
                        WatchEvent::Deleted(_) => return Err(GuestError::NotUp("its pod was deleted".into())),
                        WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
                        WatchEvent::Error(s) if s.code == 410 => {
                            version.clear(); // expired: read it again
                            break;
                        }
                        WatchEvent::Error(s) => {
                            return Err(GuestError::Substrate(format!("watching the guest's pod: {}", s.message)));
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(r) => r,
            Err(_) => Err(GuestError::NotUp(format!(
                "its pod was not ready within {}",
                testbus_proto::duration::format(within)
            ))),
        }
    }
}

#[async_trait]
impl Provider for KubernetesProvider {
    async fn reach(&self) -> Result<(), GuestError> {
        let client = self.client().await?;
        client.apiserver_version().await.map(|_| ()).map_err(api_error("cannot reach the Kubernetes API"))
    }

    async fn guests(&self, prefix: &str) -> Result<Vec<String>, GuestError> {
        let pods: Api<Pod> = self.api().await?;
        let listed = pods.list(&ListParams::default().labels(POOL_LABEL)).await.map_err(api_error("listing pods"))?;
        let mut names: Vec<String> =
            listed.items.into_iter().filter_map(|p| p.metadata.name).filter(|n| n.starts_with(prefix)).collect();
        names.sort();
        Ok(names)
    }

    async fn create(
        &self,
        spec: &GuestSpec,
        join: &dyn JoinTokens,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), GuestError> {
        let Some(token) = join.token(&spec.name).await? else {
            return Err(GuestError::Unsupported(
                "kubernetes pools need the control plane's TLS listener (pods join with a token)".into(),
            ));
        };
        let owner = self.anchor(spec.pool.name()).await?;
        let secrets: Api<Secret> = self.api().await?;
        let mut secret = Secret::default();
        secret.metadata.name = Some(secret_name(&spec.name));
        secret.metadata.labels = Some(labels(spec.pool.name()));
        secret.metadata.owner_references = Some(vec![owner.clone()]);
        secret.string_data = Some(BTreeMap::from([(TOKEN_KEY.to_string(), token)]));
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            // Left by an earlier attempt at this guest: its token is stale.
            Err(e) if is_code(&e, 409) => {
                let _ = secrets.delete(&secret_name(&spec.name), &DeleteParams::default()).await;
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .map_err(api_error("making the guest's Secret"))?;
            }
            Err(e) => return Err(api_error("making the guest's Secret")(e)),
        }
        let pods: Api<Pod> = self.api().await?;
        pods.create(&PostParams::default(), &pod(spec, &owner)?).await.map_err(api_error("making the guest's pod"))?;
        progress("waiting for its pod to be ready");
        self.wait_ready(&spec.name, spec.boot).await
    }

    async fn link(&self, _spec: &GuestSpec, _start: LinkStart, _join: &dyn JoinTokens) -> Result<(), GuestError> {
        Ok(()) // its agent dials the control plane itself
    }

    async fn observe(&self, spec: &GuestSpec) -> Result<Observed, GuestError> {
        let pods: Api<Pod> = self.api().await?;
        Ok(match pods.get_opt(&spec.name).await.map_err(api_error("reading the guest's pod"))? {
            None => Observed::Down("its pod is gone".into()),
            Some(p) => match pod_state(&p) {
                PodState::Ready => Observed::Up { linked: true },
                PodState::Starting => Observed::Busy,
                PodState::Stuck(why) => Observed::Down(why),
            },
        })
    }

    fn cleans_in_place(&self, _pool: &HostPool) -> bool {
        false
    }

    async fn clean(&self, spec: &GuestSpec, _join: &dyn JoinTokens) -> Result<(), GuestError> {
        Err(GuestError::Unsupported(format!("pod {} is replaced, never cleaned", spec.name)))
    }

    fn relinkable(&self, _pool: &HostPool) -> Result<(), String> {
        Ok(())
    }

    async fn destroy(&self, spec: &GuestSpec) -> Result<(), GuestError> {
        let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::background() };
        let pods: Api<Pod> = self.api().await?;
        match pods.delete(&spec.name, &now).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => {}
            Err(e) => return Err(api_error("deleting the guest's pod")(e)),
        }
        // Gone before its Host is: an agent still running would register
        // its Host again.
        let deadline = tokio::time::Instant::now() + POD_GONE_DEADLINE;
        while pods.get_opt(&spec.name).await.map_err(api_error("reading the guest's pod"))?.is_some() {
            if tokio::time::Instant::now() > deadline {
                return Err(GuestError::NotUp(format!(
                    "its pod was still there {}s after it was deleted",
                    POD_GONE_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let secrets: Api<Secret> = self.api().await?;
        match secrets.delete(&secret_name(&spec.name), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) => Err(api_error("deleting the guest's Secret")(e)),
        }
    }

    async fn release_pool(&self, pool: &HostPool) -> Result<(), GuestError> {
        // Its dependents (anything a crashed control plane left) go with
        // it, by Kubernetes' garbage collector.
        let maps: Api<ConfigMap> = self.api().await?;
        match maps.delete(&anchor_name(pool.name()), &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) => Err(api_error("deleting the pool's ConfigMap")(e)),
        }
    }
}

#[cfg(test)]
mod tests;
