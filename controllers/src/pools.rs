//! The HostPool controller: reconcile(pool) reads the pool, its guests'
//! Hosts and the pending tests, asks `pool_plan` what to do, and starts
//! each guest operation (create, clean, destroy) as a task of its own; the
//! task reports back by requeueing the pool. The substrate is reached only
//! through the pool's [`Provider`] (`spec.provider`, registered by the
//! control plane in [`PoolsConfig::providers`]): this crate knows no
//! substrate's API.
//!
//! Ownership: `Guests` holds what this controller knows of each guest
//! (phase, message, the task working on it) and one provider object per
//! provider key, which holds the host side of its guests' links. Both live
//! as long as the controllers; a restarted control plane finds its guests
//! again through the provider and links them anew.
use crate::error::{Doing, Error};
use crate::pool_plan::{self, GuestPhase, GuestView};
use crate::runtime::Action;
use crate::Context;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use testbus_pool_provider::{
    async_trait, GuestError, GuestSpec, JoinTokens, LinkConfig, LinkStart, Observed, Provider, Providers,
};
use testbus_proto::pool::CLEAN_ANNOTATION;
use testbus_proto::states::{ConditionStatus, ConditionType};
use testbus_proto::{phase, time, Condition, Guest, Host, HostPool, Resource};
use tonic::{Code, Status};

/// Finalizer of every pool that made something on its substrate: its
/// guests (and their network) go first.
pub const POOL_FINALIZER: &str = "testbus.io/pool-cleanup";

/// How long a guest may take from start to waiting for its link.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// The pool's bootTimeout, or BOOT_DEADLINE.
fn boot_deadline(pool: &HostPool) -> Duration {
    testbus_proto::duration::parse(&pool.spec().boot_timeout).unwrap_or(BOOT_DEADLINE)
}
/// How long its agent may take to register once linked.
pub const LINK_DEADLINE: Duration = Duration::from_secs(60);

/// Pools reconciled at once.
pub const WORKERS: usize = 4;

/// How long a provider may take to answer a call a reconcile waits for
/// (reach, list, observe); past it, the pool says so and is looked at
/// again later.
pub const PROVIDER_CALL_DEADLINE: Duration = Duration::from_secs(15);

/// `call`, or an error saying it did not answer in time.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, GuestError>>,
) -> Result<T, GuestError> {
    match tokio::time::timeout(PROVIDER_CALL_DEADLINE, call).await {
        Ok(r) => r,
        Err(_) => Err(GuestError::Substrate(format!("{what}: no answer within {}s", PROVIDER_CALL_DEADLINE.as_secs()))),
    }
}

/// Where the pool controller keeps guest state, what links guests, and
/// the providers it makes them with.
#[derive(Debug, Clone)]
pub struct PoolsConfig {
    /// Guests' own directories (logs, sockets, disks): DIR/GUEST/.
    pub state_dir: PathBuf,
    /// The relay (and devices) that carry guests' links.
    pub links: LinkConfig,
    /// The substrates pools may name in `spec.provider`.
    pub providers: Providers,
    /// Where the time guest work took is reported (metrics).
    pub timings: GuestTimings,
}

/// What a pool did to a guest, timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestWork {
    /// From nothing to a guest Ready for a test: disk, boot, snapshot, link.
    Create,
    /// Its clean state brought back in place (a snapshot loaded).
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
}

impl GuestRun {
    fn new(pool: &str, phase: GuestPhase, message: impl Into<String>, busy: bool) -> GuestRun {
        GuestRun {
            pool: pool.into(),
            phase,
            message: message.into(),
            address: String::new(),
            created: String::new(),
            cleanings: 0,
            snapshot_taken: None,
            busy,
        }
    }
}

/// What the controller knows of every guest, and the providers.
pub struct Guests {
    runs: Mutex<HashMap<String, GuestRun>>,
    /// One provider object per provider and key (a libvirt URI), opened on
    /// first use; each holds its guests' links.
    providers: Mutex<HashMap<(String, String), Arc<dyn Provider>>>,
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

    /// Runs one guest operation as a task of its own, cancelled (dropped)
    /// on shutdown. A guest left half made is found by the next control
    /// plane (`adopt`).
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
    /// providers go, and with them the links of the guests.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.runs.lock().clear();
        self.providers.lock().clear();
    }

    fn set(&self, name: &str, phase: GuestPhase, message: impl Into<String>) {
        if let Some(g) = self.runs.lock().get_mut(name) {
            g.phase = phase;
            g.message = message.into();
        }
    }
}

/// The provider of the pool's `spec.provider`, opened on first use; None
/// if this control plane has no such provider.
fn provider(ctx: &Context, cfg: &PoolsConfig, pool: &HostPool) -> Option<Arc<dyn Provider>> {
    let kind = cfg.providers.get(&pool.spec().provider)?;
    let key = (pool.spec().provider.clone(), kind.key(pool));
    let mut providers = ctx.guests.providers.lock();
    Some(providers.entry(key).or_insert_with(|| kind.open(pool, &cfg.links)).clone())
}

/// A condition reason for the pool's provider: `LibvirtUnreachable`.
fn provider_reason(pool: &HostPool, what: &str) -> String {
    let p = &pool.spec().provider;
    let mut cs = p.chars();
    let title: String = cs.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(cs).collect();
    format!("{title}{what}")
}

/// What a guest of `pool` is, for its provider.
fn guest_spec(ctx: &Context, cfg: &PoolsConfig, pool: &Arc<HostPool>, name: &str) -> GuestSpec {
    let address = ctx.guests.runs.lock().get(name).map(|g| g.address.clone()).filter(|a| !a.is_empty());
    GuestSpec {
        name: name.into(),
        pool: pool.clone(),
        state_dir: cfg.state_dir.join(name),
        address,
        boot: boot_deadline(pool),
    }
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
    let Some(p) = provider(ctx, &cfg, &pool) else {
        let msg = format!(
            "this control plane has no provider {:?} (it has: {})",
            pool.spec().provider,
            cfg.providers.names().join(", ")
        );
        write_status(ctx, &pool, Some(available(ConditionStatus::False, "UnknownProvider", &msg))).await?;
        return Ok(Action::Requeue(Duration::from_secs(30)));
    };
    if !pool.meta().deletion_timestamp.is_empty() {
        return delete_pool(ctx, &pool, &cfg, &p).await;
    }
    // Without its relay no guest could be linked: none is made (each
    // would boot, fail to link and be made again), and none is touched.
    if !cfg.links.relay.exists() {
        let msg = format!(
            "this control plane cannot link guests: {} is missing (install testbus-relay beside testbus-control-plane)",
            cfg.links.relay.display()
        );
        write_status(ctx, &pool, Some(available(ConditionStatus::False, "RelayMissing", &msg))).await?;
        return Ok(Action::Requeue(Duration::from_secs(30)));
    }
    if let Err(e) = bounded("reaching its provider", p.reach()).await {
        let reason = provider_reason(&pool, "Unreachable");
        write_status(ctx, &pool, Some(available(ConditionStatus::False, &reason, &e.to_string()))).await?;
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
    adopt(ctx, &pool, &p).await;
    check_alive(ctx, &pool, &p).await;
    start_snapshots(ctx, &pool, &p);
    let views = views(ctx, &pool);
    let demand = pool_plan::demand(&pool, ctx.tests.list().iter().map(|t| t.as_ref()));
    let plan = pool_plan::plan(&pool, &views, demand, SystemTime::now());
    let backoff = ctx.guests.backoff.lock().get(pool.name()).cloned();
    let create = match &backoff {
        Some((_, until, _)) if *until > SystemTime::now() => 0,
        _ => plan.create,
    };
    // The finalizer comes before the first thing made on the substrate
    // (network, disk, guest): a pool that never made anything is deleted
    // at once, even while its substrate is unreachable.
    if create > 0 && !pool.meta().finalizers.iter().any(|f| f == POOL_FINALIZER) {
        let mut next = (*pool).clone();
        next.meta_mut().finalizers.push(POOL_FINALIZER.into());
        ctx.client.api::<HostPool>().update(next).await.doing("putting the pool's finalizer")?;
        return Ok(Action::AwaitChange);
    }
    for _ in 0..create {
        start_create(ctx, &pool, &p, &cfg, &plan.for_tests);
    }
    for g in &plan.clean {
        if p.cleans_in_place(&pool) {
            start_clean(ctx, &pool, &p, &cfg, g);
        } else {
            start_destroy(ctx, &pool, &p, &cfg, g);
        }
    }
    for g in &plan.destroy {
        start_destroy(ctx, &pool, &p, &cfg, g);
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

/// Guests of the pool that the substrate has but this controller does not
/// know (a restarted control plane): known again, relinked.
async fn adopt(ctx: &Arc<Context>, pool: &Arc<HostPool>, p: &Arc<dyn Provider>) {
    let Some(cfg) = ctx.cfg.pools.clone() else { return };
    let names = match bounded("listing its guests", p.guests(&format!("{}-", pool.name()))).await {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!(pool = pool.name(), error = %e, "cannot list the pool's guests");
            return;
        }
    };
    tracing::debug!(pool = pool.name(), ?names, "guests on the substrate");
    let found = names.clone();
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
        // One that never registered is replaced (its boot may not have
        // been seen through), and so is one its provider cannot link
        // again (a vsock guest's device went with the old control plane).
        let (phase, message) = match (&host, p.relinkable(pool)) {
            (None, _) => (GuestPhase::Failed, "found after a restart before it registered; replacing it".to_string()),
            (Some(_), Err(why)) => (GuestPhase::Failed, format!("found again after a restart: {why}; replacing it")),
            (Some(_), Ok(())) => (GuestPhase::Linking, "found again; relinking".to_string()),
        };
        tracing::info!(pool = pool.name(), guest = %n, why = message, "guest found");
        let mut run = GuestRun::new(pool.name(), phase, message, false);
        if !pool.spec().network.is_empty() {
            // Kept (a podman guest is made anew with it at its next clean),
            // and given to no other guest.
            let spec = GuestSpec { address: None, ..guest_spec(ctx, &cfg, pool, &n) };
            match bounded("reading a guest's address", p.address(&spec)).await {
                Ok(a) => run.address = a.unwrap_or_default(),
                Err(e) => tracing::warn!(pool = pool.name(), guest = %n, error = %e, "cannot read the guest's address"),
            }
        }
        ctx.guests.runs.lock().insert(n.clone(), run);
        if phase == GuestPhase::Linking {
            relink(ctx.clone(), pool, p, &n);
        }
    }
    // A guest an earlier control plane began to make and died before the
    // substrate had it left only its state dir (and maybe more the
    // provider made): removed. (A guest this one is making is in `runs`
    // from before its dir exists.)
    let leftovers = leftover_dirs(&cfg, pool.name(), &ctx.guests.runs.lock());
    for n in leftovers.into_iter().filter(|n| !found.contains(n)) {
        tracing::info!(pool = pool.name(), guest = %n, "removing what a guest never made left behind");
        if let Err(e) = p.destroy(&guest_spec(ctx, &cfg, pool, &n)).await {
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

/// A Ready guest that no longer runs (its QEMU or container was killed,
/// the machine rebooted) has failed: it is destroyed and replaced; its Host
/// is lost like any host whose lease runs out. One whose link ended is
/// linked again.
async fn check_alive(ctx: &Arc<Context>, pool: &Arc<HostPool>, p: &Arc<dyn Provider>) {
    let Some(cfg) = ctx.cfg.pools.clone() else { return };
    let ready: Vec<String> = ctx
        .guests
        .runs
        .lock()
        .iter()
        .filter(|(_, g)| g.pool == pool.name() && g.phase == GuestPhase::Ready && !g.busy)
        .map(|(n, _)| n.clone())
        .collect();
    for n in ready {
        match bounded("looking at a guest", p.observe(&guest_spec(ctx, &cfg, pool, &n))).await {
            Ok(Observed::Up { linked: true }) | Ok(Observed::Busy) => {}
            // Its link ended, or its run was started again (a snapshot
            // revert: a new pty): linked again, without a go (the guest is
            // past it).
            Ok(Observed::Up { linked: false }) => relink(ctx.clone(), pool, p, &n),
            Ok(Observed::Down(why)) => {
                tracing::warn!(pool = pool.name(), guest = %n, why, "the guest no longer runs");
                ctx.guests.set(&n, GuestPhase::Failed, why);
            }
            Err(_) => continue, // unreachable: said by the next reconcile
        }
    }
}

/// Links a running guest again (found after a restart, or its link ended).
fn relink(ctx: Arc<Context>, pool: &Arc<HostPool>, p: &Arc<dyn Provider>, name: &str) {
    let Some(cfg) = ctx.cfg.pools.clone() else { return };
    {
        let mut runs = ctx.guests.runs.lock();
        let Some(g) = runs.get_mut(name) else { return };
        if g.busy {
            return;
        }
        g.busy = true;
    }
    let (p, pool, name) = (p.clone(), pool.clone(), name.to_string());
    ctx.clone().guests.spawn(name.clone(), async move {
        let spec = guest_spec(&ctx, &cfg, &pool, &name);
        let r = link(&ctx, &cfg, &p, &spec, LinkStart::Again).await;
        finish(&ctx, pool.name(), &name, r.map(|_| GuestPhase::Ready));
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

/// Join tokens for one guest only, short-lived: the guest's agent gets its
/// certificate with one, as any agent does (nothing is baked into the
/// image, and a token read by code in the guest joins no other host).
struct GuestTokens<'a> {
    ctx: &'a Context,
    tls: bool,
}

/// How long a guest's join token is good for: until its guest has
/// booted, and then some (15 minutes at least).
fn token_ttl(ctx: &Context, name: &str) -> String {
    let pool = ctx.guests.runs.lock().get(name).map(|g| g.pool.clone());
    let boot = pool.and_then(|p| ctx.pools.get(&p)).map(|p| boot_deadline(&p)).unwrap_or(BOOT_DEADLINE);
    testbus_proto::duration::format((boot + LINK_DEADLINE).max(Duration::from_secs(15 * 60)))
}

#[async_trait]
impl JoinTokens for GuestTokens<'_> {
    async fn token(&self, name: &str) -> Result<Option<String>, GuestError> {
        if !self.tls {
            return Ok(None);
        }
        let Some(pool) = self.ctx.guests.runs.lock().get(name).map(|g| g.pool.clone()) else {
            return Err(GuestError::NotUp("the guest is no longer known".into()));
        };
        // Good for one join, as a guest of its pool (its certificate says
        // so, which is how its Host gets the pool's label); a new one for
        // the same guest replaces it.
        let req = testbus_proto::CreateTokenRequest {
            ttl: token_ttl(self.ctx, name),
            pool,
            host_name: name.into(),
            role: String::new(),
            uses: 1,
        };
        match self.ctx.client.auth().create_token(req).await {
            Ok(r) => Ok(Some(r.into_inner().token)),
            Err(s) => Err(GuestError::Api(format!("cannot make a join token for it: {}", s.message()))),
        }
    }
}

fn start_create(
    ctx: &Arc<Context>,
    pool: &Arc<HostPool>,
    p: &Arc<dyn Provider>,
    cfg: &PoolsConfig,
    for_tests: &[String],
) {
    let name = new_guest_name(pool.name());
    let why = if for_tests.is_empty() { "for min".to_string() } else { format!("for test {}", for_tests.join(", ")) };
    let mut run = GuestRun::new(pool.name(), GuestPhase::Creating, why, true);
    run.created = time::now();
    {
        let mut runs = ctx.guests.runs.lock();
        if !pool.spec().network.is_empty() {
            let used: Vec<&str> = runs.values().map(|g| g.address.as_str()).collect();
            run.address = (0..250)
                .map(|i| network_address(&pool.spec().network, i))
                .find(|a| !used.contains(&a.as_str()))
                .unwrap_or_else(|| network_address(&pool.spec().network, 0));
        }
        runs.insert(name.clone(), run);
    }
    let spec = guest_spec(ctx, cfg, pool, &name);
    let (ctx, p, cfg) = (ctx.clone(), p.clone(), cfg.clone());
    ctx.clone().guests.spawn(name.clone(), async move {
        let started = tokio::time::Instant::now();
        let r = async {
            let tokens = GuestTokens { ctx: &ctx, tls: cfg.links.tls };
            let progress = |what: &str| ctx.guests.set(&spec.name, GuestPhase::Booting, what);
            p.create(&spec, &tokens, &progress).await?;
            link(&ctx, &cfg, &p, &spec, LinkStart::Go).await
        }
        .await;
        if r.is_ok() {
            cfg.timings.record(spec.pool.name(), GuestWork::Create, started.elapsed());
        }
        finish(&ctx, spec.pool.name(), &name, r.map(|_| GuestPhase::Ready));
    });
}

/// Makes the host side of the guest's link, then waits until its agent has
/// registered since (see [`LinkStart`]).
async fn link(
    ctx: &Context,
    cfg: &PoolsConfig,
    p: &Arc<dyn Provider>,
    spec: &GuestSpec,
    start: LinkStart,
) -> Result<(), GuestError> {
    ctx.guests.set(&spec.name, GuestPhase::Linking, "linking");
    // Whole seconds: the guest's clock is set from the go (or its RTC) to
    // the second.
    let since = SystemTime::now() - Duration::from_secs(1);
    p.link(spec, start, &GuestTokens { ctx, tls: cfg.links.tls }).await?;
    registered(ctx, &spec.name, since, start).await
}

/// Waits until the guest's agent has registered since `since` (its lease
/// renewed after the go: the guest's clock was set from it); a guest given
/// its go is then marked clean, once.
async fn registered(ctx: &Context, name: &str, since: SystemTime, start: LinkStart) -> Result<(), GuestError> {
    let go = start == LinkStart::Go;
    let deadline = tokio::time::Instant::now() + LINK_DEADLINE;
    let mut marked: Option<u64> = None;
    loop {
        if let Some(h) = ctx.hosts.get(name) {
            let renewed = time::parse(&h.status().lease_renew_time);
            // Marked once (never twice, or it could mark a used guest
            // clean), and done once the cache the plan reads has caught up
            // with the mark: whatever it shows since (clean, or claimed,
            // or claimed and used already: a container is claimed, used
            // and released in less than a poll) is the plan's to see.
            if marked.is_some_and(|rv| revision(&h) >= rv) {
                return Ok(());
            }
            if marked.is_none() && h.status().phase == HostPhase::Ready && renewed.is_some_and(|t| t > since) {
                // Relinked (not started clean): whether it is clean is for
                // the plan to see.
                if !go {
                    return Ok(());
                }
                marked = Some(mark_clean(ctx, name).await.map_err(|e| GuestError::Api(e.to_string()))?);
                continue;
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(GuestError::NotUp(format!("its agent did not register within {}s", LINK_DEADLINE.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Host's revision (0 if it has none).
fn revision(h: &Host) -> u64 {
    h.meta().resource_version.parse().unwrap_or(0)
}

/// Marks the guest's Host clean, giving it the pool's layer of env and
/// files (and naming the pool) in the same write: it may be claimed again.
/// Returns the revision of the Host that says so.
async fn mark_clean(ctx: &Context, name: &str) -> Result<u64, Error> {
    let api = ctx.client.api::<Host>();
    loop {
        let mut h = api.get(name).await.doing("reading the guest's host")?;
        if h.meta().annotations.get(CLEAN_ANNOTATION).is_some_and(|v| v == "true") {
            return Ok(revision(&h));
        }
        if let Some(pool) = testbus_proto::pool::pool_of(&h).and_then(|p| ctx.pools.get(p)) {
            let sp = h.spec_mut();
            sp.pool = pool.name().to_string();
            sp.env = pool.spec().env.clone();
            sp.files = pool.spec().files.clone();
        }
        h.meta_mut().annotations.insert(CLEAN_ANNOTATION.into(), "true".into());
        match api.update(h).await {
            Ok(h) => return Ok(revision(&h)),
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

fn start_clean(ctx: &Arc<Context>, pool: &Arc<HostPool>, p: &Arc<dyn Provider>, cfg: &PoolsConfig, name: &str) {
    {
        let mut runs = ctx.guests.runs.lock();
        let Some(g) = runs.get_mut(name) else { return };
        if g.busy {
            return;
        }
        g.busy = true;
        g.phase = GuestPhase::Cleaning;
        g.message = "bringing back its clean state".into();
    }
    let spec = guest_spec(ctx, cfg, pool, name);
    let (ctx, p, cfg) = (ctx.clone(), p.clone(), cfg.clone());
    ctx.clone().guests.spawn(name.to_string(), async move {
        let pool_name = spec.pool.name();
        let r = async {
            let started = tokio::time::Instant::now();
            p.clean(&spec, &GuestTokens { ctx: &ctx, tls: cfg.links.tls }).await?;
            let reverted = started.elapsed();
            cfg.timings.record(pool_name, GuestWork::Revert, reverted);
            link(&ctx, &cfg, &p, &spec, LinkStart::Go).await?;
            cfg.timings.record(pool_name, GuestWork::Clean, started.elapsed());
            tracing::info!(guest = %spec.name, ?reverted, linked = ?started.elapsed() - reverted, "guest clean again");
            Ok(())
        }
        .await;
        if r.is_ok() {
            if let Some(g) = ctx.guests.runs.lock().get_mut(&spec.name) {
                g.cleanings += 1;
            }
        }
        finish(&ctx, pool_name, &spec.name, r.map(|_| GuestPhase::Ready));
    });
}

/// Snapshot requests on the pool's guests' Hosts (written by the API's
/// `HostPools.Snapshot`), each carried out when its guest is not busy with
/// other work, its outcome written back on the Host.
fn start_snapshots(ctx: &Arc<Context>, pool: &Arc<HostPool>, p: &Arc<dyn Provider>) {
    let Some(cfg) = ctx.cfg.pools.clone() else { return };
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
        let spec = guest_spec(ctx, &cfg, pool, &name);
        let (ctx, p) = (ctx.clone(), p.clone());
        ctx.clone().guests.spawn(name.clone(), async move {
            use testbus_proto::pool::SnapshotOutcome;
            let outcome = match p.snapshot(&spec, order.action, &order.name).await {
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
            ctx.pool_queue.add(spec.pool.name());
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

fn start_destroy(ctx: &Arc<Context>, pool: &Arc<HostPool>, p: &Arc<dyn Provider>, cfg: &PoolsConfig, name: &str) {
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
    let spec = guest_spec(ctx, cfg, pool, name);
    let (ctx, p) = (ctx.clone(), p.clone());
    ctx.clone().guests.spawn(name.to_string(), async move {
        let (pool_name, name) = (spec.pool.name(), spec.name.as_str());
        // An idle guest is withdrawn from scheduling first, in a write
        // that fails if a test claimed it since the cache the plan read.
        if idle {
            let withdrawn = matches!(withdraw(&ctx, name).await, Ok(true));
            if let Some(g) = ctx.guests.runs.lock().get_mut(name) {
                if withdrawn {
                    g.phase = GuestPhase::Deleting;
                } else {
                    g.busy = false;
                }
            }
            if !withdrawn {
                ctx.pool_queue.add(pool_name);
                return;
            }
        }
        match destroy(&ctx, &p, &spec).await {
            Ok(()) => {
                ctx.guests.runs.lock().remove(name);
                ctx.pool_queue.add(pool_name);
            }
            Err(e) => finish(&ctx, pool_name, name, Err(e)),
        }
    });
}

/// Removes the guest from its substrate, then its Host.
async fn destroy(ctx: &Context, p: &Arc<dyn Provider>, spec: &GuestSpec) -> Result<(), GuestError> {
    p.destroy(spec).await?;
    match ctx.client.api::<Host>().delete(&spec.name).await {
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

/// Deleting a pool: every guest it has goes (from the substrate, then its
/// Host), then what else the provider made for it, then the finalizer.
async fn delete_pool(
    ctx: &Arc<Context>,
    pool: &Arc<HostPool>,
    cfg: &PoolsConfig,
    p: &Arc<dyn Provider>,
) -> Result<Action, Error> {
    if !pool.meta().finalizers.iter().any(|f| f == POOL_FINALIZER) {
        return Ok(Action::AwaitChange);
    }
    if let Err(e) = bounded("reaching its provider", p.reach()).await {
        let msg = format!("cannot delete the pool's guests: {e}");
        let reason = provider_reason(pool, "Unreachable");
        write_status(ctx, pool, Some(available(ConditionStatus::False, &reason, &msg))).await?;
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
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
    if let Ok(found) = bounded("listing its guests", p.guests(&format!("{}-", pool.name()))).await {
        for n in found {
            // Named as its guests are (pool `web` must not take `web-api`'s),
            // and not another pool's by its Host.
            let ours = is_guest_of(pool.name(), &n)
                && ctx.hosts.get(&n).is_none_or(|h| testbus_proto::pool::pool_of(&h) == Some(pool.name()));
            if ours && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    // With the dirs of guests that never got as far as the substrate.
    for n in leftover_dirs(cfg, pool.name(), &ctx.guests.runs.lock()) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    for n in &names {
        if let Err(e) = bounded("removing a guest", destroy(ctx, p, &guest_spec(ctx, cfg, pool, n))).await {
            let msg = format!("cannot destroy guest {n}: {e}");
            write_status(ctx, pool, Some(available(ConditionStatus::False, "DeleteFailed", &msg))).await?;
            return Ok(Action::Requeue(Duration::from_secs(5)));
        }
        ctx.guests.runs.lock().remove(n);
    }
    // Kept until what it made besides its guests is gone too (a network, a
    // Kubernetes ConfigMap that owns what a crashed control plane left).
    if let Err(e) = bounded("removing what it made", p.release_pool(pool)).await {
        let msg = format!("cannot remove what the pool made besides its guests: {e}");
        write_status(ctx, pool, Some(available(ConditionStatus::False, "DeleteFailed", &msg))).await?;
        return Ok(Action::Requeue(Duration::from_secs(5)));
    }
    let mut next = (**pool).clone();
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
