//! testbus controllers: level-triggered reconcile loops that talk to the API
//! only through the client.
//!
//! - [`runtime`]: the machinery every controller shares: a watch reflected
//!   into a [`Cache`], a deduplicating [`Queue`], and workers that run a
//!   reconcile per key and act on its `Action`.
//! - [`hosts`]: host leases (Ready / NotReady, with a Ready condition),
//!   quarantine after infrastructure failures ([`health`]), release of
//!   orphaned claims.
//! - [`test_lifecycle`]: a test's reconcile: the pending queue, its end
//!   before a claim, then driving a running test by [`test_plan`]'s pure
//!   decisions (steps, processes, results, timeouts, host loss, release).
//! - [`schedule`]: the gang scheduler's pass over every pending test.
//! - [`pools`]: HostPools of libvirt guests, decided by [`pool_plan`].
#![forbid(unsafe_code)]

pub mod error;
pub mod health;
pub mod hosts;
pub mod pool_plan;
pub mod pools;
pub mod runtime;
pub mod schedule;
pub mod test_lifecycle;
pub mod test_plan;
pub mod wakes;

use runtime::{reflect, Cache, Queue};
use std::sync::Arc;
use std::time::Duration;
use testbus_client::Client;
use testbus_proto::{Host, HostPool, Process, Resource, Test};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Config {
    /// How long past its lease a host still counts as Ready.
    pub lease_grace: Duration,
    /// Infrastructure failures in a row that quarantine a host (0: never).
    pub quarantine_after: u32,
    /// Where HostPool guests live; None: pools are not served.
    pub pools: Option<pools::PoolsConfig>,
    /// Retries of a test that failed for the infrastructure's sake, for
    /// steps that do not say (`retry.infrastructure`).
    pub infrastructure_retries: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config { lease_grace: Duration::from_secs(5), quarantine_after: 3, pools: None, infrastructure_retries: 0 }
    }
}

/// The least time between a running test's status writes that only
/// refresh process results (see [`test_lifecycle::ResultWrites`]).
pub const RESULT_WRITE_INTERVAL: Duration = Duration::from_millis(250);

/// Everything a reconcile reads and writes through.
pub struct Context {
    pub client: Client,
    /// When these controllers started (leases are not judged from before).
    pub started: std::time::SystemTime,
    pub cfg: Config,
    pub hosts: Arc<Cache<Host>>,
    pub tests: Arc<Cache<Test>>,
    pub processes: Arc<Cache<Process>>,
    pub pools: Arc<Cache<HostPool>>,
    pub host_queue: Arc<Queue>,
    pub test_queue: Arc<Queue>,
    /// The scheduler's: one key, a pass over every pending test.
    pub schedule_queue: Arc<Queue>,
    pub pool_queue: Arc<Queue>,
    /// The pool controller's guests and their links.
    pub guests: pools::Guests,
    pub result_writes: test_lifecycle::ResultWrites,
    /// Each host's last terminal processes, for quarantine.
    pub ledger: health::Ledger,
}

impl Context {
    /// Puts what a change wakes on the queues (see [`wakes`]).
    fn wake(&self, w: wakes::Wakes) {
        for h in &w.hosts {
            self.host_queue.add(h);
        }
        for t in &w.tests {
            self.test_queue.add(t);
        }
        if w.schedule {
            self.schedule_queue.add(test_lifecycle::SCHEDULE);
        }
        for p in &w.pools {
            self.pool_queue.add(p);
        }
        if w.all_pools {
            for p in self.pools.list() {
                self.pool_queue.add(p.name());
            }
        }
    }
}

/// Feeds `cache` from a watch of its kind, calling `on_change` for every
/// change, until `stop`.
fn spawn_reflector<K: testbus_client::ApiResource + 'static>(
    tasks: &mut tokio::task::JoinSet<()>,
    client: &Client,
    cache: &Arc<Cache<K>>,
    stop: &CancellationToken,
    on_change: impl FnMut(&runtime::Change<K>) + Send + 'static,
) {
    tasks.spawn(reflect(client.api::<K>(), cache.clone(), on_change, stop.child_token()));
}

/// Runs the controllers until shutdown.
///
/// Every task is given a child of `stop`: one started after the stop was
/// sent sees it too. Returns once every task has ended; an error if a cache
/// could not sync (its watch ended first).
pub async fn run(client: Client, cfg: Config, stop: CancellationToken) -> Result<(), runtime::NeverSynced> {
    let ctx = Arc::new(Context {
        client: client.clone(),
        started: std::time::SystemTime::now(),
        cfg,
        hosts: Cache::new(),
        tests: Cache::new(),
        processes: Cache::new(),
        pools: Cache::new(),
        host_queue: Queue::new(),
        test_queue: Queue::new(),
        schedule_queue: Queue::new(),
        pool_queue: Queue::new(),
        guests: pools::Guests::new(&stop),
        result_writes: test_lifecycle::ResultWrites::new(RESULT_WRITE_INTERVAL),
        ledger: Default::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    {
        let c = ctx.clone();
        spawn_reflector(&mut tasks, &client, &ctx.hosts, &stop, move |(old, new)| {
            c.wake(wakes::host(old.as_deref(), new.as_deref()))
        });
        let c = ctx.clone();
        spawn_reflector(&mut tasks, &client, &ctx.pools, &stop, move |(old, new)| {
            c.wake(wakes::pool(old.as_deref(), new.as_deref()))
        });
        let c = ctx.clone();
        spawn_reflector(&mut tasks, &client, &ctx.tests, &stop, move |(old, new)| {
            c.wake(wakes::test(old.as_deref(), new.as_deref()))
        });
        let c = ctx.clone();
        spawn_reflector(&mut tasks, &client, &ctx.processes, &stop, move |(old, new)| {
            // A process seen ended counts for (or against) its host.
            if let Some(p) = new.as_ref().filter(|p| testbus_proto::phase::process_terminal(&p.status().phase)) {
                c.ledger.record(p);
            }
            c.wake(wakes::process(old.as_deref(), new.as_deref()))
        });
    }
    // Reconcile only from complete caches.
    let synced = async {
        ctx.hosts.wait_synced().await?;
        ctx.tests.wait_synced().await?;
        ctx.pools.wait_synced().await?;
        ctx.processes.wait_synced().await
    };
    if let Err(e) = synced.await {
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        return Err(e);
    }
    tracing::info!("controllers: caches synced");
    spawn_workers(&mut tasks, &ctx, &stop);
    while tasks.join_next().await.is_some() {}
    ctx.guests.shutdown().await;
    Ok(())
}

/// One worker per queue: hosts, tests, the scheduler and pools, each
/// reconciling the keys its queue hands out until `stop`.
fn spawn_workers(tasks: &mut tokio::task::JoinSet<()>, ctx: &Arc<Context>, stop: &CancellationToken) {
    {
        let c = ctx.clone();
        tasks.spawn(runtime::run_worker(
            ctx.host_queue.clone(),
            move |name| {
                let c = c.clone();
                async move { hosts::reconcile(&c, &name).await }
            },
            {
                let c = ctx.clone();
                move |name, trouble| {
                    let c = c.clone();
                    async move { hosts::report_trouble(&c, &name, trouble).await }
                }
            },
            stop.child_token(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(runtime::run_worker(
            ctx.test_queue.clone(),
            move |name| {
                let c = c.clone();
                async move { test_lifecycle::reconcile(&c, &name).await }
            },
            {
                let c = ctx.clone();
                move |name, trouble| {
                    let c = c.clone();
                    async move { test_lifecycle::report_trouble(&c, &name, trouble).await }
                }
            },
            stop.child_token(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(runtime::run_worker(
            ctx.schedule_queue.clone(),
            move |_name: String| {
                let c = c.clone();
                async move {
                    let began = tokio::time::Instant::now();
                    let r = test_lifecycle::schedule_pass(&c).await;
                    // Changes that come meanwhile (a burst of deletions, a
                    // fleet registering) wait a moment and share one pass.
                    tokio::time::sleep(test_lifecycle::coalesce_after(began.elapsed())).await;
                    r
                }
            },
            |_name: String, trouble: runtime::Trouble| async move {
                if let runtime::Trouble::Failing { error, count } = trouble {
                    tracing::warn!(%error, count, "the scheduler's pass keeps failing");
                }
            },
            stop.child_token(),
        ));
    }
    // Several pool workers (the queue never hands one pool to two): a
    // provider that is slow to answer (a hung API, bounded by
    // pools::PROVIDER_CALL_DEADLINE) holds up its own pools only.
    for _ in 0..pools::WORKERS {
        let c = ctx.clone();
        tasks.spawn(runtime::run_worker(
            ctx.pool_queue.clone(),
            move |name| {
                let c = c.clone();
                async move { pools::reconcile(&c, &name).await }
            },
            {
                let c = ctx.clone();
                move |name, trouble| {
                    let c = c.clone();
                    async move { pools::report_trouble(&c, &name, trouble).await }
                }
            },
            stop.child_token(),
        ));
    }
}
