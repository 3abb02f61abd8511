//! The HostPool controller: reconcile(pool) reads the pool, its guests'
//! Hosts and the pending tests, asks `pool_plan` what to do, and starts
//! each guest operation (create, clean, destroy) as a task of its own; the
//! task reports back by requeueing the pool. Libvirt is reached only
//! through `testbus-pool-libvirt`, on blocking threads.
//!
//! Ownership: `Guests` holds what this controller knows of each guest
//! (phase, message, the task working on it) and the host side of its link
//! (a `testbus-relay` child process, killed when dropped). Both live as
//! long as the controllers; a restarted control plane finds its guests
//! again in libvirt and links them anew.
use crate::error::{Doing, Error};
use crate::pool_plan::{self, GuestPhase, GuestView};
use crate::runtime::Action;
use crate::Context;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use testbus_pool_libvirt::{
    Console, GuestLink, GuestSpec, GuestState, Libvirt, LineStream, ProviderError, CLEAN_SNAPSHOT, VSOCK_MARK,
    VSOCK_PORT, WAITING_MARK,
};
use testbus_proto::pool::CLEAN_ANNOTATION;
use testbus_proto::states::{ConditionStatus, ConditionType};
use testbus_proto::{phase, time, Condition, Guest, Host, HostPool, Resource};
use tonic::{Code, Status};

/// Finalizer of every pool that made something in libvirt: its guests,
/// disks, domains and network go first.
pub const POOL_FINALIZER: &str = "testbus.io/pool-cleanup";

/// How long a guest may take from start to waiting for its go.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// The pool's bootTimeout, or BOOT_DEADLINE.
fn boot_deadline(pool: &HostPool) -> Duration {
    testbus_proto::duration::parse(&pool.spec().boot_timeout).unwrap_or(BOOT_DEADLINE)
}
/// How long its agent may take to register once linked.
pub const LINK_DEADLINE: Duration = Duration::from_secs(60);

/// Where the pool controller keeps guest state and finds the relay.
#[derive(Debug, Clone)]
pub struct PoolsConfig {
    /// Guests' disks and console logs: DIR/GUEST/.
    pub state_dir: PathBuf,
    /// The `testbus-relay` binary that carries each guest's link.
    pub relay: PathBuf,
    /// The control plane's address for the relays: its TLS listener
    /// (`tcp:IP:PORT`), or without TLS its local socket.
    pub upstream: String,
    /// Whether guests join with a token (the upstream is a TLS listener)
    /// rather than speak plain to the local socket.
    pub tls: bool,
    /// The `vhost-device-vsock` binary that serves vsock guests' device
    /// (found on PATH when the control plane starts).
    pub vsock_device: PathBuf,
    /// Where the time guest work took is reported (metrics).
    pub timings: GuestTimings,
}

/// What a pool did to a guest, timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestWork {
    /// From nothing to a guest Ready for a test: disk, boot, snapshot, link.
    Create,
    /// Its clean snapshot loaded in place.
    Revert,
    /// Ready for a test again after one: the revert, the link and the
    /// agent's registration.
    Clean,
}

impl GuestWork {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestWork::Create => "create",
            GuestWork::Revert => "revert",
            GuestWork::Clean => "clean",
        }
    }
}

/// Receives how long each successful guest work took, by pool; the default
/// drops them.
#[derive(Clone, Default)]
pub struct GuestTimings(Option<Arc<GuestTimer>>);

type GuestTimer = dyn Fn(&str, GuestWork, Duration) + Send + Sync;

impl GuestTimings {
    pub fn new(f: impl Fn(&str, GuestWork, Duration) + Send + Sync + 'static) -> GuestTimings {
        GuestTimings(Some(Arc::new(f)))
    }

    fn record(&self, pool: &str, work: GuestWork, took: Duration) {
        if let Some(f) = &self.0 {
            f(pool, work, took);
        }
    }
}

impl std::fmt::Debug for GuestTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "GuestTimings(recorded)" } else { "GuestTimings(dropped)" })
    }
}

struct GuestRun {
    pool: String,
    phase: GuestPhase,
    message: String,
    address: String,
    created: String,
    cleanings: u32,
    /// The last snapshot request taken on (its id): the cache of Hosts may
    /// not show its outcome yet when the pool is reconciled again, and a
    /// request is carried out once.
    snapshot_taken: Option<String>,
    /// A task works on it.
    busy: bool,
    /// The host side of its link.
    link: Option<tokio::process::Child>,
    /// The QEMU run the link was made for (a revert starts a new one).
    linked_run: Option<u32>,
    /// A vsock guest's vhost-device-vsock (None for a serial guest).
    device: Option<tokio::process::Child>,
}

/// What the controller knows of every guest, and their links.
pub struct Guests {
    runs: Mutex<HashMap<String, GuestRun>>,
    /// One libvirt connection per URI, opened on first use.
    providers: Mutex<HashMap<String, Arc<Libvirt>>>,
    /// Per pool: failures in a row, when creating may be tried again, and
    /// the last failure.
    backoff: Mutex<HashMap<String, (u32, SystemTime, String)>>,
    /// Every guest task (create, clean, destroy, relink): each ends when
    /// its operation does (bounded by bootTimeout and LINK_DEADLINE) or
    /// when `stop` is cancelled, and `shutdown` waits for them all.
    tasks: tokio_util::task::TaskTracker,
    /// A child of the controllers' stop: a replica that stops leading
    /// cancels its guest tasks with its controllers, at once, even when
    /// its controllers' task is aborted before it gets to `shutdown`.
    stop: tokio_util::sync::CancellationToken,
}

impl Guests {
    /// `stop`: the controllers' (a child of it is taken).
    pub fn new(stop: &tokio_util::sync::CancellationToken) -> Guests {
        Guests {
            runs: Mutex::default(),
            providers: Mutex::default(),
            backoff: Mutex::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            stop: stop.child_token(),
        }
    }

    /// Runs one guest operation as a task of its own, cancelled (dropped:
    /// the relay and device children it holds are killed) on shutdown. A
    /// guest left half made is found by the next control plane (`adopt`).
    fn spawn(&self, guest: String, op: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {
                    tracing::info!(%guest, "guest work stopped with the controllers (left for the next leader)");
                }
                _ = op => {}
            }
        });
    }

    /// Cancels every guest task and waits until they have ended; then the
    /// links and devices of the guests go (dropped with their runs).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.runs.lock().clear();
    }
}

impl Guests {
    fn set(&self, name: &str, phase: GuestPhase, message: impl Into<String>) {
        if let Some(g) = self.runs.lock().get_mut(name) {
            g.phase = phase;
            g.message = message.into();
        }
    }
}

fn uri(pool: &HostPool) -> String {
    let u = &pool.spec().uri;
    if u.is_empty() {
        "qemu:///system".into()
    } else {
        u.clone()
    }
}

/// Runs a blocking libvirt call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ProviderError::Image(format!("a libvirt call panicked: {e}"))))
}

/// Why a pool could not make, clean, link or remove a guest: said on the
/// guest and the pool, and logged (the pool backs off after failures in a
/// row).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// libvirt, or the image and disks it works on.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// A file or a process of the guest's on this machine.
    #[error("{what}: {source}")]
    Local {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest did not come up in time (it did not boot, had no line, or
    /// its agent did not register), or it stopped.
    #[error("{0}")]
    NotUp(String),
    /// The API refused or failed (a join token, the guest's Host).
    #[error("{0}")]
    Api(String),
}

impl From<Status> for GuestError {
    fn from(s: Status) -> GuestError {
        GuestError::Api(s.message().to_string())
    }
}

impl From<Error> for GuestError {
    fn from(e: Error) -> GuestError {
        GuestError::Api(e.to_string())
    }
}

impl GuestError {
    fn local(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> GuestError {
        let what = what.to_string();
        move |source| GuestError::Local { what, source }
    }
}

async fn provider(ctx: &Context, uri: &str) -> Result<Arc<Libvirt>, ProviderError> {
    if let Some(p) = ctx.guests.providers.lock().get(uri).filter(|p| p.alive()).cloned() {
        return Ok(p);
    }
    let u = uri.to_string();
    let p = Arc::new(blocking(move || Libvirt::open(&u)).await?);
    ctx.guests.providers.lock().insert(uri.to_string(), p.clone());
    Ok(p)
}

/// The pool's Available condition.
fn available(status: ConditionStatus, reason: &str, message: &str) -> Condition {
    Condition::new(ConditionType::Available, status, reason, message)
}

pub async fn report_trouble(ctx: &Context, name: &str, trouble: crate::runtime::Trouble) {
    crate::runtime::report_trouble(ctx.client.api::<HostPool>(), name, trouble, |p| &mut p.status_mut().conditions)
        .await
}

pub async fn reconcile(ctx: &Arc<Context>, name: &str) -> Result<Action, Error> {
    let Some(pool) = ctx.pools.get(name) else {
        return Ok(Action::AwaitChange);
    };
    let Some(cfg) = ctx.cfg.pools.clone() else {
        return Ok(Action::AwaitChange);
    };
    if !pool.meta().deletion_timestamp.is_empty() {
        return delete_pool(ctx, &pool, &cfg).await;
    }
    // Without its relay no guest could be linked: none is made (each
    // would boot, fail to link and be made again), and none is touched.
    if !cfg.relay.exists() {
        let msg = format!(
            "this control plane cannot link guests: {} is missing (install testbus-relay beside testbus-control-plane)",
            cfg.relay.display()
        );
        write_status(ctx, &pool, Some(available(ConditionStatus::False, "RelayMissing", &msg))).await?;
        return Ok(Action::Requeue(Duration::from_secs(30)));
    }
    let uri = uri(&pool);
    let lv = match provider(ctx, &uri).await {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("cannot reach libvirt: {e}");
            write_status(ctx, &pool, Some(available(ConditionStatus::False, "LibvirtUnreachable", &msg))).await?;
            return Ok(Action::Requeue(Duration::from_secs(5)));
        }
    };
    adopt(ctx, &pool, &lv).await;
    check_alive(ctx, &pool, &lv).await;
    start_snapshots(ctx, &pool, &lv);
    let views = views(ctx, &pool);
    let demand = pool_plan::demand(&pool, ctx.tests.list().iter().map(|t| t.as_ref()));
    let plan = pool_plan::plan(&pool, &views, demand, SystemTime::now());
    let backoff = ctx.guests.backoff.lock().get(pool.name()).cloned();
    let create = match &backoff {
        Some((_, until, _)) if *until > SystemTime::now() => 0,
        _ => plan.create,
    };
    // The finalizer comes before the first thing made in libvirt (network,
    // disk, domain): a pool that never made anything is deleted at once,
    // even while libvirt is unreachable.
    if create > 0 && !pool.meta().finalizers.iter().any(|f| f == POOL_FINALIZER) {
        let mut next = (*pool).clone();
        next.meta_mut().finalizers.push(POOL_FINALIZER.into());
        ctx.client.api::<HostPool>().update(next).await.doing("putting the pool's finalizer")?;
        return Ok(Action::AwaitChange);
    }
    for _ in 0..create {
        start_create(ctx, &pool, &lv, &cfg, &plan.for_tests);
    }
    for g in &plan.clean {
        // A vsock guest cannot be snapshotted (vhost-user-vsock cannot be
        // migrated): it is cleaned by making a new one.
        if is_vsock(&pool) {
            start_destroy(ctx, &pool, &lv, &cfg, g);
        } else {
            start_clean(ctx, &pool, &lv, &cfg, g);
        }
    }
    for g in &plan.destroy {
        start_destroy(ctx, &pool, &lv, &cfg, g);
    }
    let what = if create > 0 && !plan.for_tests.is_empty() {
        format!("creating {create} guests for test {}", plan.for_tests.join(", "))
    } else if create > 0 {
        format!("creating {create} guests (min {})", pool.spec().min)
    } else if plan.capped {
        format!("at max {}", pool.spec().max.unwrap_or(pool_plan::DEFAULT_MAX))
    } else if let Some((n, until, last)) = backoff.filter(|(_, u, _)| *u > SystemTime::now()) {
        let secs = until.duration_since(SystemTime::now()).unwrap_or_default().as_secs();
        let msg = format!("{n} guests failed in a row (the last: {last}); creating again in {secs}s");
        write_status(ctx, &pool, Some(available(ConditionStatus::False, "GuestsFailing", &msg))).await?;
        return Ok(Action::Requeue(Duration::from_secs(2)));
    } else {
        pool_plan::summary(&views)
    };
    write_status(ctx, &pool, Some(available(ConditionStatus::True, "Reconciled", &what))).await?;
    // Guests on their way, and idle guests, are looked at again soon.
    Ok(Action::Requeue(Duration::from_secs(2)))
}

/// Guests of the pool that libvirt has but this controller does not know
/// (a restarted control plane): known again, relinked.
async fn adopt(ctx: &Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>) {
    let prefix = format!("{}-", pool.name());
    let l = lv.clone();
    let names = match blocking(move || l.guests(&prefix)).await {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!(pool = pool.name(), error = %e, "cannot list the pool's guests");
            return;
        }
    };
    tracing::debug!(pool = pool.name(), ?names, "guests in libvirt");
    let in_libvirt = names.clone();
    for n in names {
        if ctx.guests.runs.lock().contains_key(&n) {
            continue;
        }
        let host = ctx.hosts.get(&n);
        let ours = match &host {
            Some(h) => testbus_proto::pool::pool_of(h) == Some(pool.name()),
            // Made by an earlier control plane that stopped before the
            // guest registered: named as this pool names its guests.
            None => is_guest_of(pool.name(), &n),
        };
        if !ours {
            continue;
        }
        // A vsock guest's device went with the control plane that started
        // it: the guest cannot be linked again, and is replaced; so is one
        // that never registered (its boot may not have been seen through).
        let (phase, message) = if host.is_none() {
            (GuestPhase::Failed, "found after a restart before it registered; replacing it")
        } else if is_vsock(pool) {
            (GuestPhase::Failed, "found again after a restart: its vsock device is gone; replacing it")
        } else {
            (GuestPhase::Linking, "found again; relinking")
        };
        tracing::info!(pool = pool.name(), guest = %n, why = message, "guest found");
        ctx.guests.runs.lock().insert(
            n.clone(),
            GuestRun {
                pool: pool.name().into(),
                phase,
                message: message.into(),
                address: String::new(),
                created: String::new(),
                cleanings: 0,
                snapshot_taken: None,
                busy: false,
                link: None,
                linked_run: None,
                device: None,
            },
        );
        if phase == GuestPhase::Linking {
            relink(ctx.clone(), pool, lv, &n);
        }
    }
    // A guest an earlier control plane began to make and died before
    // libvirt had its domain left only its state dir (and, on a remote
    // daemon, maybe its volumes): removed. (A guest this one is making is
    // in `runs` from before its dir exists.)
    let Some(cfg) = ctx.cfg.pools.clone() else { return };
    let leftovers = leftover_dirs(&cfg, pool.name(), &ctx.guests.runs.lock());
    for n in leftovers.into_iter().filter(|n| !in_libvirt.contains(n)) {
        let (l, dir, image) = (lv.clone(), cfg.state_dir.join(&n), PathBuf::from(&pool.spec().image));
        tracing::info!(pool = pool.name(), guest = %n, "removing what a guest never made left behind");
        if let Err(e) = blocking(move || l.destroy_guest(&n, &dir, &image)).await {
            tracing::warn!(pool = pool.name(), error = %e, "cannot remove a guest's leftovers");
        }
    }
}

/// The state dirs named as `pool`'s guests whose guest nobody knows.
fn leftover_dirs(cfg: &PoolsConfig, pool: &str, runs: &HashMap<String, GuestRun>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(&cfg.state_dir) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_guest_of(pool, n) && !runs.contains_key(n))
        .collect()
}

/// A Ready guest whose domain no longer runs (its QEMU was killed, the
/// machine rebooted) has failed: it is destroyed and replaced; its Host
/// is lost like any host whose lease runs out.
async fn check_alive(ctx: &Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>) {
    let ready: Vec<String> = ctx
        .guests
        .runs
        .lock()
        .iter()
        .filter(|(_, g)| g.pool == pool.name() && g.phase == GuestPhase::Ready && !g.busy)
        .map(|(n, _)| n.clone())
        .collect();
    for n in ready {
        let device_ended = ctx
            .guests
            .runs
            .lock()
            .get_mut(&n)
            .and_then(|g| g.device.as_mut())
            .is_some_and(|d| d.try_wait().ok().flatten().is_some());
        if device_ended {
            tracing::warn!(pool = pool.name(), guest = %n, "the guest's vsock device ended");
            ctx.guests.set(&n, GuestPhase::Failed, "its vsock device (vhost-device-vsock) ended");
            continue;
        }
        let (l, name) = (lv.clone(), n.clone());
        // One libvirt call per guest: whether (and as which QEMU run) it runs.
        let run = match blocking(move || l.state(&name)).await {
            Ok(GuestState::Running(run)) => run,
            // A snapshot is being taken or reverted: looked at again later.
            Ok(GuestState::Starting) => continue,
            Ok(GuestState::Stopped(why)) => {
                tracing::warn!(pool = pool.name(), guest = %n, why, "the guest no longer runs");
                ctx.guests.set(&n, GuestPhase::Failed, format!("{why} (QEMU ended)"));
                continue;
            }
            Err(_) => continue, // libvirt unreachable: said by the next reconcile
        };
        // Its link ended, or QEMU was started again (a snapshot revert:
        // a new pty): linked again, without a go (the guest is past it).
        let ended = ctx.guests.runs.lock().get_mut(&n).is_some_and(|g| {
            let exited = match g.link.as_mut() {
                Some(child) => child.try_wait().ok().flatten().is_some(),
                None => true,
            };
            exited || g.linked_run != Some(run)
        });
        if ended {
            relink(ctx.clone(), pool, lv, &n);
        }
    }
}

/// Links a running guest again (found after a restart, or its link ended).
fn relink(ctx: Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>, name: &str) {
    let Some(cfg) = ctx.cfg.pools.clone() else { return };
    {
        let mut runs = ctx.guests.runs.lock();
        let Some(g) = runs.get_mut(name) else { return };
        if g.busy {
            return;
        }
        g.busy = true;
    }
    let (lv, pool_name, name) = (lv.clone(), pool.name().to_string(), name.to_string());
    ctx.clone().guests.spawn(name.clone(), async move {
        let r = link(&ctx, &lv, &cfg, &name, LinkStart::Again).await;
        finish(&ctx, &pool_name, &name, r.map(|_| GuestPhase::Ready));
    });
}

fn views(ctx: &Context, pool: &HostPool) -> Vec<GuestView> {
    let runs = ctx.guests.runs.lock();
    runs.iter()
        .filter(|(_, g)| g.pool == pool.name())
        .map(|(name, g)| {
            let host = ctx.hosts.get(name);
            let claim = host.as_ref().and_then(|h| h.status().claim.clone());
            let claimed = claim.is_some();
            // Its test has ended (or is going): the guest is cleaned and free
            // again in seconds, sooner than a new one boots.
            let freeing = claim.is_some_and(|c| {
                ctx.tests
                    .get(&c.test)
                    .is_none_or(|t| phase::test_terminal(&t.status().phase) || !t.meta().deletion_timestamp.is_empty())
            });
            let clean = host
                .as_ref()
                .is_some_and(|h| testbus_proto::pool::clean_enough(h) && testbus_proto::pool::pool_of(h).is_some());
            let idle_since =
                pool.status().guests.iter().find(|x| &x.name == name).and_then(|x| time::parse(&x.idle_since));
            GuestView { name: name.clone(), phase: g.phase, busy: g.busy, claimed, freeing, clean, idle_since }
        })
        .collect()
}

/// Writes the pool's guests (from what the controller knows and their
/// Hosts) and its condition, when they changed.
async fn write_status(ctx: &Context, pool: &HostPool, cond: Option<Condition>) -> Result<(), Error> {
    let mut guests: Vec<Guest> = {
        let runs = ctx.guests.runs.lock();
        runs.iter()
            .filter(|(_, g)| g.pool == pool.name())
            .map(|(name, g)| {
                let host = ctx.hosts.get(name);
                let idle = g.phase == GuestPhase::Ready
                    && host
                        .as_ref()
                        .is_some_and(|h| h.status().claim.is_none() && testbus_proto::pool::clean_enough(h));
                let before = pool.status().guests.iter().find(|x| &x.name == name);
                let idle_since = match (idle, before.map(|b| b.idle_since.as_str())) {
                    (true, Some(s)) if !s.is_empty() => s.to_string(),
                    (true, _) => time::now(),
                    (false, _) => String::new(),
                };
                Guest {
                    name: name.clone(),
                    phase: g.phase.as_str().into(),
                    message: g.message.clone(),
                    address: g.address.clone(),
                    created: g.created.clone(),
                    idle_since,
                    cleanings: g.cleanings,
                }
            })
            .collect()
    };
    guests.sort_by(|a, b| a.name.cmp(&b.name));
    let mut next = pool.clone();
    let s = next.status_mut();
    s.guests = guests;
    s.observed_generation = pool.meta().generation;
    if let Some(c) = cond {
        s.message = c.message.clone();
        crate::test_plan::set_condition(&mut s.conditions, c);
        // set_condition keeps the old one when only its time differs.
    }
    if next.status() == pool.status() {
        return Ok(());
    }
    match ctx.client.api::<HostPool>().update_status(next).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::Aborted => Ok(()), // seen again next time
        Err(status) => Err(Error::Api { what: "writing the pool's status", status }),
    }
}

fn new_guest_name(pool: &str) -> String {
    let n = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let x = (n ^ (n >> 29) ^ u128::from(std::process::id())) as u32;
    format!("{pool}-{:05x}", x & 0xfffff)
}

use testbus_proto::pool::is_guest_of;
use testbus_proto::states::HostPhase;

/// The address of the guest's `i`th slot on the pool network: one /24 per
/// network name, inside 10.251.0.0/16.
fn network_address(network: &str, i: usize) -> String {
    let h = network.bytes().fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b))) % 250 + 1;
    format!("10.251.{h}.{}/24", 10 + i)
}

/// A join token for guest `name` only, short-lived: the guest's agent gets
/// its certificate with it, as any agent does (nothing is baked into the
/// image, and a token read by code in the guest joins no other host).
async fn guest_token(ctx: &Context, cfg: &PoolsConfig, name: &str) -> Result<Option<String>, GuestError> {
    if !cfg.tls {
        return Ok(None);
    }
    let Some(pool) = ctx.guests.runs.lock().get(name).map(|g| g.pool.clone()) else {
        return Err(GuestError::NotUp("the guest is no longer known".into()));
    };
    // Good for one join, as a guest of its pool (its certificate says so,
    // which is how its Host gets the pool's label); a new one for the
    // same guest replaces it.
    let req = testbus_proto::CreateTokenRequest {
        ttl: "15m".into(),
        pool,
        host_name: name.into(),
        role: String::new(),
        uses: 1,
    };
    match ctx.client.auth().create_token(req).await {
        Ok(r) => Ok(Some(r.into_inner().token)),
        Err(s) => Err(GuestError::Api(format!("cannot make a join token for it: {}", s.message()))),
    }
}

fn guest_spec(pool: &HostPool, cfg: &PoolsConfig, name: &str, address: Option<String>, emulated: bool) -> GuestSpec {
    let sp = pool.spec();
    let args = testbus_proto::pool::agent_args(pool, emulated);
    GuestSpec {
        name: name.into(),
        image: sp.image.clone().into(),
        state_dir: cfg.state_dir.join(name),
        memory_mib: if sp.memory == 0 { 256 } else { sp.memory },
        cpus: sp.cpus.max(1),
        agent_args: args,
        network: address.map(|a| (sp.network.clone(), a)),
        link: if is_vsock(pool) {
            GuestLink::Vsock { vhost_socket: cfg.state_dir.join(name).join("vhost.sock") }
        } else {
            GuestLink::Serial
        },
        token: None,
    }
}

fn is_vsock(pool: &HostPool) -> bool {
    pool.spec().link == "vsock"
}

/// Starts a vsock guest's device (vhost-device-vsock, which QEMU connects
/// to), and waits until it listens.
async fn start_device(cfg: &PoolsConfig, state_dir: &std::path::Path) -> Result<tokio::process::Child, GuestError> {
    std::fs::create_dir_all(state_dir).map_err(GuestError::local(state_dir.display()))?;
    let socket = state_dir.join("vhost.sock");
    let _ = std::fs::remove_file(&socket);
    let log =
        std::fs::File::create(state_dir.join("vsock-device.log")).map_err(GuestError::local("vsock-device.log"))?;
    // It has no way of its own to notice the control plane's death (the
    // relays end with their stdin): setpriv (util-linux) has the kernel
    // kill it when the thread that started it ends. That is a runtime
    // worker thread (this is async code), which ends only with the
    // runtime, as the control plane exits (a task's panic is caught; it
    // does not end the thread).
    let mut child = tokio::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&cfg.vsock_device)
        .args(["--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(state_dir.join("vsock.sock"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(GuestError::local(format!(
            "starting setpriv --pdeathsig KILL -- {} (hack/setup installs it)",
            cfg.vsock_device.display()
        )))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(GuestError::NotUp(format!("{} exited ({st}) before it listened", cfg.vsock_device.display())));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(GuestError::NotUp(format!("{} did not listen within 10s", cfg.vsock_device.display())));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(child)
}

fn start_create(ctx: &Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>, cfg: &PoolsConfig, for_tests: &[String]) {
    let name = new_guest_name(pool.name());
    let address = (!pool.spec().network.is_empty()).then(|| {
        let used: Vec<String> = ctx.guests.runs.lock().values().map(|g| g.address.clone()).collect();
        (0..250)
            .map(|i| network_address(&pool.spec().network, i))
            .find(|a| !used.contains(a))
            .unwrap_or_else(|| network_address(&pool.spec().network, 0))
    });
    let why = if for_tests.is_empty() { "for min".to_string() } else { format!("for test {}", for_tests.join(", ")) };
    ctx.guests.runs.lock().insert(
        name.clone(),
        GuestRun {
            pool: pool.name().into(),
            phase: GuestPhase::Creating,
            message: why,
            address: address.clone().unwrap_or_default(),
            created: time::now(),
            cleanings: 0,
            snapshot_taken: None,
            busy: true,
            link: None,
            linked_run: None,
            device: None,
        },
    );
    let spec = guest_spec(pool, cfg, &name, address.clone(), lv.emulated());
    let (ctx, lv, cfg, pool_name, network) =
        (ctx.clone(), lv.clone(), cfg.clone(), pool.name().to_string(), pool.spec().network.clone());
    let boot = boot_deadline(pool);
    ctx.clone().guests.spawn(name.clone(), async move {
        let started = tokio::time::Instant::now();
        let r = async {
            if address.is_some() {
                let (l, n) = (lv.clone(), network.clone());
                blocking(move || l.ensure_network(&n)).await?;
            }
            let vsock = matches!(spec.link, GuestLink::Vsock { .. });
            let mut spec = spec;
            if vsock {
                spec.token = guest_token(&ctx, &cfg, &spec.name).await?;
                let device = start_device(&cfg, &spec.state_dir).await?;
                if let Some(g) = ctx.guests.runs.lock().get_mut(&spec.name) {
                    g.device = Some(device);
                }
            }
            let (l, s) = (lv.clone(), spec.clone());
            let console = blocking(move || l.create_guest(&s)).await?;
            ctx.guests.set(&spec.name, GuestPhase::Booting, "booting");
            let mark = if vsock { VSOCK_MARK } else { WAITING_MARK };
            match console {
                Console::File(log) => wait_for_mark(&log, mark, boot).await?,
                Console::Stream(line) => {
                    let waited = tokio::task::spawn_blocking(move || line.wait_for(mark, boot)).await;
                    let waited = waited.map_err(|e| GuestError::NotUp(format!("waiting for its boot: {e}")))?;
                    waited.map_err(|why| {
                        GuestError::NotUp(format!(
                            "did not boot within {}: {why}",
                            testbus_proto::duration::format(boot)
                        ))
                    })?
                }
            }
            if !vsock {
                let (l, n) = (lv.clone(), spec.name.clone());
                blocking(move || l.snapshot(&n, CLEAN_SNAPSHOT)).await?;
            }
            link(&ctx, &lv, &cfg, &spec.name, LinkStart::Go).await
        }
        .await;
        if r.is_ok() {
            cfg.timings.record(&pool_name, GuestWork::Create, started.elapsed());
        }
        finish(&ctx, &pool_name, &name, r.map(|_| GuestPhase::Ready));
    });
}

/// Waits until the guest's console log says `mark` (it waits for its go,
/// or links over vsock).
async fn wait_for_mark(log: &std::path::Path, mark: &str, within: Duration) -> Result<(), GuestError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(mark)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("nothing");
            let within = testbus_proto::duration::format(within);
            return Err(GuestError::NotUp(format!("did not boot within {within} (console: {last})")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a guest's link starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkStart {
    /// The guest has just started from its clean snapshot: it is given its
    /// go (time and join token) first, and marked clean once registered.
    Go,
    /// The guest runs on (its relay died, the control plane restarted): the
    /// link is made again, nothing else.
    Again,
}

/// Starts the host side of the guest's link on its pty, then waits until
/// its agent has registered since (see [`LinkStart`]).
async fn link(
    ctx: &Context,
    lv: &Arc<Libvirt>,
    cfg: &PoolsConfig,
    name: &str,
    start: LinkStart,
) -> Result<(), GuestError> {
    let go = start == LinkStart::Go;
    ctx.guests.set(name, GuestPhase::Linking, "linking");
    let old = ctx.guests.runs.lock().get_mut(name).and_then(|g| g.link.take());
    if let Some(mut old) = old {
        // Gone before the new one opens the pty (it holds a lock on it).
        let _ = old.kill().await;
    }
    // A guest being reverted (by its clean, or `testbusctl snapshot
    // revert`) has no pty until its new QEMU is up: waited for, never
    // taken for a dead guest (destroying it would kill the revert).
    let vsock = ctx.guests.runs.lock().get(name).is_some_and(|g| g.device.is_some());
    let deadline = tokio::time::Instant::now() + LINK_DEADLINE;
    let (pty, run) = loop {
        let (l, n) = (lv.clone(), name.to_string());
        match blocking(move || Ok((l.link_pty(&n)?, l.state(&n)?))).await? {
            (_, GuestState::Running(run)) if vsock => break (None, run),
            (Some(pty), GuestState::Running(run)) => break (Some(pty), run),
            (_, GuestState::Stopped(why)) => return Err(GuestError::NotUp(why)),
            _ if tokio::time::Instant::now() > deadline => {
                return Err(GuestError::NotUp(format!(
                    "it has no serial pty {}s after starting (is it running?)",
                    LINK_DEADLINE.as_secs()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // Whole seconds: the guest's clock is set from the go (or its RTC) to
    // the second.
    let since = SystemTime::now() - Duration::from_secs(1);
    let log =
        std::fs::File::create(cfg.state_dir.join(name).join("relay.log")).map_err(GuestError::local("relay.log"))?;
    let child = if lv.is_remote() {
        // The pty is on the libvirt host: the line comes through libvirt,
        // and this machine's relay speaks the serial framing over it.
        // (Opened, written and dropped on blocking threads: a remote
        // connection's calls, its close included, wait on the network.)
        let go = if go { Some(guest_token(ctx, cfg, name).await?) } else { None };
        let (l, n) = (lv.clone(), name.to_string());
        let line = blocking(move || {
            let line = l.open_line(&n, 1)?;
            if let Some(token) = go {
                let text = testbus_pool_libvirt::go_line(SystemTime::now(), token.as_deref());
                line.write_all(text.as_bytes()).map_err(|e| ProviderError::Image(format!("giving the go: {e}")))?;
            }
            Ok(line)
        })
        .await?;
        let spawned = tokio::process::Command::new(&cfg.relay)
            .args(["--downstream", "serial:stdio", "--upstream", &cfg.upstream, "--transport", "serial"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(GuestError::local(format!("starting {}", cfg.relay.display())));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tokio::task::spawn_blocking(move || drop(line));
                return Err(e);
            }
        };
        carry_line(line, &mut child).map_err(GuestError::local("carrying the link"))?;
        child
    } else {
        let (downstream, transport) = match pty {
            Some(pty) => {
                // The pty is raw (no echo, no line editing) before anything
                // crosses it.
                let stty =
                    tokio::process::Command::new("stty").arg("-F").arg(&pty).args(["raw", "-echo"]).status().await;
                if !stty.is_ok_and(|s| s.success()) {
                    return Err(GuestError::NotUp(format!("cannot set {} raw", pty.display())));
                }
                if go {
                    let token = guest_token(ctx, cfg, name).await?;
                    let line = testbus_pool_libvirt::go_line(SystemTime::now(), token.as_deref());
                    tokio::fs::write(&pty, line)
                        .await
                        .map_err(GuestError::local(format!("giving the go on {}", pty.display())))?;
                }
                (format!("serial:{}", pty.display()), "serial")
            }
            // Where vhost-device-vsock brings the guest's connections to the
            // host's VSOCK_PORT; the guest's relay retries until it listens.
            None => {
                let socket = testbus_pool_libvirt::vsock_socket(&cfg.state_dir.join(name), VSOCK_PORT);
                (format!("mux+unix:{}", socket.display()), "vsock")
            }
        };
        tokio::process::Command::new(&cfg.relay)
            .arg("--downstream")
            .arg(downstream)
            .args(["--upstream", &cfg.upstream, "--transport", transport, "--exit-with-stdin"])
            // Its stdin is a pipe this process holds: if the control plane
            // dies, the relay sees it close and ends too.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(GuestError::local(format!("starting {}", cfg.relay.display())))?
    };
    if let Some(g) = ctx.guests.runs.lock().get_mut(name) {
        g.link = Some(child);
        g.linked_run = Some(run);
    }
    registered(ctx, name, since, start).await
}

/// Waits until the guest's agent has registered since `since` (its lease
/// renewed after the go: the guest's clock was set from it); a guest given
/// its go is then marked clean, once.
async fn registered(ctx: &Context, name: &str, since: SystemTime, start: LinkStart) -> Result<(), GuestError> {
    let go = start == LinkStart::Go;
    let deadline = tokio::time::Instant::now() + LINK_DEADLINE;
    let mut marked = false;
    loop {
        if let Some(h) = ctx.hosts.get(name) {
            let renewed = time::parse(&h.status().lease_renew_time);
            if h.status().phase == HostPhase::Ready && renewed.is_some_and(|t| t > since) {
                // Relinked (not started from its clean snapshot): whether
                // it is clean is for the plan to see. Marked once, and done
                // once the cache the plan reads shows it (or a test has
                // already claimed it: the mark is never written twice, or
                // it could mark a used guest clean).
                if !go || (marked && (testbus_proto::pool::clean_enough(&h) || h.status().claim.is_some())) {
                    return Ok(());
                }
                if !marked {
                    mark_clean(ctx, name).await?;
                    marked = true;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(GuestError::NotUp(format!("its agent did not register within {}s", LINK_DEADLINE.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Carries a remote guest's link line to its relay's stdin and back, on
/// two threads of their own (libvirt's stream calls block). Each ends when
/// its side does and ends the other: the relay exiting (or killed, as a
/// new link replaces it) closes its stdout, and the sender aborts the
/// stream; the guest's QEMU ending ends the stream, and the receiver
/// closes the relay's stdin, which ends the relay. If the control plane
/// dies, so do the threads and the pipes: the relay ends.
fn carry_line(line: LineStream, relay: &mut tokio::process::Child) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let missing = || std::io::Error::other("the relay has no pipes");
    let mut to_relay = std::fs::File::from(relay.stdin.take().ok_or_else(missing)?.into_owned_fd()?);
    let mut from_relay = std::fs::File::from(relay.stdout.take().ok_or_else(missing)?.into_owned_fd()?);
    let (rx, tx) = (line.clone(), line.clone());
    pump("link-from-guest", move |b| rx.read(b), move |b| to_relay.write_all(b), line.clone())?;
    pump("link-to-guest", move |b| from_relay.read(b), move |b| tx.write_all(b), line)?;
    Ok(())
}

/// Copies from `read` to `write` on a thread of its own until either
/// fails or `read` ends, then aborts `line` (which ends the other pump).
fn pump(
    name: &str,
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize> + Send + 'static,
    mut write: impl FnMut(&[u8]) -> std::io::Result<()> + Send + 'static,
    line: LineStream,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n @ 1..) = read(&mut buf) {
            if write(&buf[..n]).is_err() {
                break;
            }
        }
        line.abort();
    })?;
    Ok(())
}

/// Marks the guest's Host clean, giving it the pool's layer of env and
/// files (and naming the pool) in the same write: it may be claimed again.
async fn mark_clean(ctx: &Context, name: &str) -> Result<(), Error> {
    let api = ctx.client.api::<Host>();
    loop {
        let mut h = api.get(name).await.doing("reading the guest's host")?;
        if h.meta().annotations.get(CLEAN_ANNOTATION).is_some_and(|v| v == "true") {
            return Ok(());
        }
        if let Some(pool) = testbus_proto::pool::pool_of(&h).and_then(|p| ctx.pools.get(p)) {
            let sp = h.spec_mut();
            sp.pool = pool.name().to_string();
            sp.env = pool.spec().env.clone();
            sp.files = pool.spec().files.clone();
        }
        h.meta_mut().annotations.insert(CLEAN_ANNOTATION.into(), "true".into());
        match api.update(h).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::Aborted => continue,
            Err(status) => return Err(Error::Api { what: "marking the guest clean", status }),
        }
    }
}

/// Takes an idle guest's clean mark away unless a test has claimed it:
/// true when no test can claim it any more (or its Host is gone).
async fn withdraw(ctx: &Context, name: &str) -> Result<bool, Status> {
    let api = ctx.client.api::<Host>();
    let Some(mut h) = api.get_opt(name).await? else { return Ok(true) };
    if h.status().claim.is_some() {
        return Ok(false);
    }
    h.meta_mut().annotations.remove(CLEAN_ANNOTATION);
    match api.update(h).await {
        Ok(_) => Ok(true),
        Err(s) if matches!(s.code(), Code::Aborted | Code::NotFound) => Ok(s.code() == Code::NotFound),
        Err(s) => Err(s),
    }
}

fn start_clean(ctx: &Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>, cfg: &PoolsConfig, name: &str) {
    {
        let mut runs = ctx.guests.runs.lock();
        let Some(g) = runs.get_mut(name) else { return };
        if g.busy {
            return;
        }
        g.busy = true;
        g.phase = GuestPhase::Cleaning;
        g.message = "reverting to its clean snapshot".into();
    }
    let (ctx, lv, cfg, pool_name, name) =
        (ctx.clone(), lv.clone(), cfg.clone(), pool.name().to_string(), name.to_string());
    ctx.clone().guests.spawn(name.clone(), async move {
        let r = async {
            let old = ctx.guests.runs.lock().get_mut(&name).and_then(|g| g.link.take());
            if let Some(mut old) = old {
                let _ = old.kill().await;
            }
            let started = tokio::time::Instant::now();
            let (l, n) = (lv.clone(), name.clone());
            blocking(move || l.load_in_place(&n, CLEAN_SNAPSHOT)).await?;
            let reverted = started.elapsed();
            cfg.timings.record(&pool_name, GuestWork::Revert, reverted);
            link(&ctx, &lv, &cfg, &name, LinkStart::Go).await?;
            cfg.timings.record(&pool_name, GuestWork::Clean, started.elapsed());
            tracing::info!(guest = %name, ?reverted, linked = ?started.elapsed() - reverted, "guest clean again");
            Ok(())
        }
        .await;
        if r.is_ok() {
            if let Some(g) = ctx.guests.runs.lock().get_mut(&name) {
                g.cleanings += 1;
            }
        }
        finish(&ctx, &pool_name, &name, r.map(|_| GuestPhase::Ready));
    });
}

/// Snapshot requests on the pool's guests' Hosts (written by the API's
/// `HostPools.Snapshot`), each carried out when its guest is not busy with
/// other work, its outcome written back on the Host.
fn start_snapshots(ctx: &Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>) {
    let guests = ctx.hosts.filter(|h| testbus_proto::pool::pool_of(h) == Some(pool.name()));
    for h in guests {
        let Some(order) = testbus_proto::pool::pending_snapshot(&h) else { continue };
        let name = h.name().to_string();
        let before = {
            let mut runs = ctx.guests.runs.lock();
            let Some(g) = runs.get_mut(&name) else { continue };
            if g.snapshot_taken.as_ref() == Some(&order.id) {
                continue; // carried out; the cache has not seen its outcome yet
            }
            if g.busy {
                continue; // looked at again when its work is done
            }
            g.busy = true;
            g.snapshot_taken = Some(order.id.clone());
            g.phase
        };
        let (ctx, lv, pool_name) = (ctx.clone(), lv.clone(), pool.name().to_string());
        ctx.clone().guests.spawn(name.clone(), async move {
            use testbus_proto::pool::{SnapshotAction, SnapshotOutcome};
            let (l, n, o) = (lv.clone(), name.clone(), order.clone());
            let done = blocking(move || {
                match o.action {
                    SnapshotAction::Create => l.snapshot(&n, &o.name)?,
                    SnapshotAction::Revert => l.revert(&n, &o.name)?,
                    SnapshotAction::Delete => l.delete_snapshot(&n, &o.name)?,
                    SnapshotAction::List => {}
                }
                l.snapshots(&n)
            })
            .await;
            let outcome = match done {
                Ok(snapshots) => SnapshotOutcome { id: order.id.clone(), error: String::new(), snapshots },
                Err(e) => SnapshotOutcome { id: order.id.clone(), error: e.to_string(), snapshots: Vec::new() },
            };
            tracing::info!(guest = %name, action = ?order.action, snapshot = %order.name, error = %outcome.error, "snapshot request carried out");
            if let Err(s) = write_snapshot_outcome(&ctx, &name, &outcome).await {
                tracing::warn!(guest = %name, error = %s, "cannot write a snapshot request's outcome");
            }
            if let Some(g) = ctx.guests.runs.lock().get_mut(&name) {
                g.busy = false;
                g.phase = before;
            }
            ctx.pool_queue.add(&pool_name);
        });
    }
}

/// Writes what a snapshot request came to on the guest's Host.
async fn write_snapshot_outcome(
    ctx: &Context,
    name: &str,
    outcome: &testbus_proto::pool::SnapshotOutcome,
) -> Result<(), Error> {
    let text = serde_json::to_string(outcome).map_err(|e| Status::internal(e.to_string()))?;
    let api = ctx.client.api::<Host>();
    loop {
        let Some(mut h) = api.get_opt(name).await? else { return Ok(()) };
        h.meta_mut().annotations.insert(testbus_proto::pool::SNAPSHOT_RESULT.into(), text.clone());
        match api.update(h).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::Aborted => continue,
            Err(status) => return Err(Error::Api { what: "writing a snapshot request's outcome", status }),
        }
    }
}

fn start_destroy(ctx: &Arc<Context>, pool: &HostPool, lv: &Arc<Libvirt>, cfg: &PoolsConfig, name: &str) {
    let idle;
    {
        let mut runs = ctx.guests.runs.lock();
        let Some(g) = runs.get_mut(name) else { return };
        if g.busy && g.phase != GuestPhase::Failed {
            return;
        }
        g.busy = true;
        idle = g.phase == GuestPhase::Ready;
        // An idle guest stays Ready (busy) until it is withdrawn: counted
        // as Deleting, a claim that beats the withdrawal would have the
        // plan make a second guest for the same test.
        if !idle {
            g.phase = GuestPhase::Deleting;
        }
    }
    let (ctx, lv, cfg, pool, pool_name, name) =
        (ctx.clone(), lv.clone(), cfg.clone(), pool.clone(), pool.name().to_string(), name.to_string());
    ctx.clone().guests.spawn(name.clone(), async move {
        // An idle guest is withdrawn from scheduling first, in a write
        // that fails if a test claimed it since the cache the plan read.
        if idle {
            let withdrawn = matches!(withdraw(&ctx, &name).await, Ok(true));
            if let Some(g) = ctx.guests.runs.lock().get_mut(&name) {
                if withdrawn {
                    g.phase = GuestPhase::Deleting;
                } else {
                    g.busy = false;
                }
            }
            if !withdrawn {
                ctx.pool_queue.add(&pool_name);
                return;
            }
        }
        let r = destroy(&ctx, &lv, &cfg, &pool, &name).await;
        match r {
            Ok(()) => {
                ctx.guests.runs.lock().remove(&name);
                ctx.pool_queue.add(&pool_name);
            }
            Err(e) => finish(&ctx, &pool_name, &name, Err(e)),
        }
    });
}

async fn destroy(
    ctx: &Context,
    lv: &Arc<Libvirt>,
    cfg: &PoolsConfig,
    pool: &HostPool,
    name: &str,
) -> Result<(), GuestError> {
    let old = ctx.guests.runs.lock().get_mut(name).and_then(|g| g.link.take());
    if let Some(mut old) = old {
        let _ = old.kill().await;
    }
    let (l, n, dir, image) =
        (lv.clone(), name.to_string(), cfg.state_dir.join(name), PathBuf::from(&pool.spec().image));
    blocking(move || l.destroy_guest(&n, &dir, &image)).await?;
    // QEMU is gone: its vsock device may go too.
    let device = ctx.guests.runs.lock().get_mut(name).and_then(|g| g.device.take());
    if let Some(mut device) = device {
        let _ = device.kill().await;
    }
    match ctx.client.api::<Host>().delete(name).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(GuestError::Api(s.message().to_string())),
    }
}

/// A guest task ended: its new phase, or why it failed (the pool backs off
/// creating after failures in a row).
fn finish(ctx: &Context, pool: &str, name: &str, r: Result<GuestPhase, GuestError>) {
    {
        let mut runs = ctx.guests.runs.lock();
        if let Some(g) = runs.get_mut(name) {
            g.busy = false;
            match &r {
                Ok(p) => {
                    g.phase = *p;
                    g.message.clear();
                }
                Err(e) => {
                    tracing::warn!(pool, guest = name, error = %e, "guest failed");
                    g.phase = GuestPhase::Failed;
                    g.message = e.to_string();
                }
            }
        }
    }
    let mut backoff = ctx.guests.backoff.lock();
    match r {
        Ok(_) => {
            backoff.remove(pool);
        }
        Err(e) => {
            let n = backoff.get(pool).map_or(1, |(n, _, _)| n + 1);
            let wait = Duration::from_secs(2u64.saturating_pow(n.min(6)).min(60));
            backoff.insert(pool.to_string(), (n, SystemTime::now() + wait, e.to_string()));
        }
    }
    drop(backoff);
    ctx.pool_queue.add(pool);
}

/// Deleting a pool: every guest it has goes (domain, disk, Host), then its
/// network, then the finalizer.
async fn delete_pool(ctx: &Arc<Context>, pool: &HostPool, cfg: &PoolsConfig) -> Result<Action, Error> {
    if !pool.meta().finalizers.iter().any(|f| f == POOL_FINALIZER) {
        return Ok(Action::AwaitChange);
    }
    let uri = uri(pool);
    let lv = match provider(ctx, &uri).await {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("cannot delete the pool's guests: cannot reach libvirt: {e}");
            write_status(ctx, pool, Some(available(ConditionStatus::False, "LibvirtUnreachable", &msg))).await?;
            return Ok(Action::Requeue(Duration::from_secs(5)));
        }
    };
    // A guest with work under way (being made, cleaned, relinked) is
    // destroyed only once that work has ended (bounded by bootTimeout and
    // the link deadline): destroyed under it, the work made its files and
    // disk again afterwards, and they were left behind.
    let busy: Vec<String> = ctx
        .guests
        .runs
        .lock()
        .iter()
        .filter(|(_, g)| g.pool == pool.name() && g.busy)
        .map(|(n, _)| n.clone())
        .collect();
    if !busy.is_empty() {
        let msg = format!("deleting: waiting for the work on guest {} to end first", busy.join(", "));
        write_status(ctx, pool, Some(available(ConditionStatus::False, "Deleting", &msg))).await?;
        return Ok(Action::Requeue(Duration::from_millis(500)));
    }
    let mut names: Vec<String> =
        ctx.guests.runs.lock().iter().filter(|(_, g)| g.pool == pool.name()).map(|(n, _)| n.clone()).collect();
    let prefix = format!("{}-", pool.name());
    let l = lv.clone();
    if let Ok(found) = blocking(move || l.guests(&prefix)).await {
        for n in found {
            let ours = ctx.hosts.get(&n).is_none_or(|h| testbus_proto::pool::pool_of(&h) == Some(pool.name()));
            if ours && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    // With the dirs of guests that never got as far as libvirt.
    for n in leftover_dirs(cfg, pool.name(), &ctx.guests.runs.lock()) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    for n in &names {
        if let Err(e) = destroy(ctx, &lv, cfg, pool, n).await {
            let msg = format!("cannot destroy guest {n}: {e}");
            write_status(ctx, pool, Some(available(ConditionStatus::False, "DeleteFailed", &msg))).await?;
            return Ok(Action::Requeue(Duration::from_secs(5)));
        }
        ctx.guests.runs.lock().remove(n);
    }
    let (l, image) = (lv.clone(), PathBuf::from(&pool.spec().image));
    if let Err(e) = blocking(move || l.forget_image(&image)).await {
        tracing::warn!(pool = pool.name(), error = %e, "cannot drop libvirt's view of the image directory");
    }
    if !pool.spec().network.is_empty() {
        let (l, net) = (lv.clone(), pool.spec().network.clone());
        if let Err(e) = blocking(move || l.delete_network(&net)).await {
            tracing::warn!(pool = pool.name(), error = %e, "cannot delete the pool's network");
        }
    }
    let mut next = pool.clone();
    next.meta_mut().finalizers.retain(|f| f != POOL_FINALIZER);
    match ctx.client.api::<HostPool>().update(next).await {
        Ok(_) => Ok(Action::AwaitChange),
        Err(s) if s.code() == Code::NotFound => Ok(Action::AwaitChange),
        Err(status) => Err(Error::Api { what: "removing the pool's finalizer", status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica that stops leading cancels its controllers' stop token:
    /// its guest tasks end with it at once (they used to have a token of
    /// their own, so a deposed leader whose controllers' task was aborted
    /// went on calling libvirt and writing to the API).
    #[tokio::test]
    async fn guest_tasks_end_with_the_controllers_stop() {
        let stop = tokio_util::sync::CancellationToken::new();
        let guests = Guests::new(&stop);
        let wrote = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = wrote.clone();
        guests.spawn("g".into(), async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            w.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        stop.cancel();
        guests.tasks.close();
        tokio::time::timeout(Duration::from_secs(10), guests.tasks.wait()).await.expect("the guest task ended");
        assert!(!wrote.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn guests_are_told_apart_by_their_pool() {
        let name = new_guest_name("a");
        assert!(is_guest_of("a", &name), "{name}");
        assert!(!is_guest_of("a", "a-b-12345"), "pool a-b's guest");
        assert!(is_guest_of("a-b", "a-b-12345"));
        for not in ["a-1234", "a-123456", "a-1234g", "a12345", "b-12345", "a-"] {
            assert!(!is_guest_of("a", not), "{not}");
        }
    }
}
