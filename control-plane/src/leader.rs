//! Leader election among control-plane replicas sharing one etcd: the
//! controllers run on one replica at a time.
//!
//! A replica campaigns by creating the leader key bound to an etcd lease
//! (create-if-absent, in one transaction). The winner runs the controllers
//! and keeps the lease alive every third of its TTL; the others watch the
//! key and campaign again when it disappears.
//!
//! A leader checks its lease every third of the TTL and waits at most
//! another third for the answer, so it knows it lost the lease at most
//! 2/3 TTL after its last renewal. It then cancels its controllers and
//! aborts whatever has not ended within [`stop_margin`] (TTL/6), and joins
//! them: they are gone by 5/6 TTL, before the lease can expire and another
//! replica be elected. Two replicas never reconcile at once.
use crate::store::etcd::EtcdStore;
use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Runs `start(stop)` whenever this replica leads, until `shutdown`.
pub async fn run_while_leader<F>(store: EtcdStore, id: String, ttl: Duration, mut start: F, shutdown: CancellationToken)
where
    F: FnMut(CancellationToken) -> JoinHandle<()>,
{
    let key = store.qualified("/leader");
    let ttl_secs = ttl.as_secs().max(2) as i64;
    loop {
        let mut client = store.client();
        // Campaign until elected, with a fresh lease each time: one granted
        // for an earlier attempt may have expired while this replica waited.
        // When the lease was last made good for a whole TTL, by this
        // replica's clock: before it was asked for, then when each renewal
        // that succeeded was sent (etcd renews on receipt, later still).
        let (lease, mut renewed_at) = loop {
            let asked = tokio::time::Instant::now();
            let lease = match client.lease_grant(ttl_secs, None).await {
                Ok(l) => l.id(),
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot get a lease");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), id.clone(), Some(PutOptions::new().with_lease(lease)))]);
            let outcome = client.txn(txn).await;
            if !matches!(&outcome, Ok(r) if r.succeeded()) {
                let _ = client.lease_revoke(lease).await;
            }
            match outcome {
                Ok(r) if r.succeeded() => break (lease, asked),
                Ok(r) => {
                    // Someone leads: wait for the key to go (or re-check
                    // after a while, in case the watch misses it).
                    let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                    let opts = WatchOptions::new().with_start_revision(rev + 1);
                    let gone = async {
                        if let Ok(mut w) = client.watch(key.clone(), Some(opts)).await {
                            while let Ok(Some(resp)) = w.message().await {
                                if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                                    return;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = gone => {}
                        _ = tokio::time::sleep(ttl) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: campaign failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        tracing::info!(%id, "elected leader: running the controllers");
        let stop = shutdown.child_token();
        let controllers = start(stop.clone());
        let lost = match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        stop_within(controllers, &stop, stop_margin(ttl)).await;
                        let _ = client.lease_revoke(lease).await;
                        return;
                    }
                    _ = tokio::time::sleep_until(renewed_at + ttl / 3) => {
                        // Renewed by 2/3 of the TTL, or the term is given up
                        // then: its controllers are stopped within the
                        // margin, before the lease can expire.
                        let sent = tokio::time::Instant::now();
                        let renewal = async {
                            keeper.keep_alive().await.is_ok()
                                && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
                        };
                        let by = renewed_at + ttl * 2 / 3;
                        if !tokio::time::timeout_at(by, renewal).await.unwrap_or(false) {
                            break "the lease could not be renewed";
                        }
                        renewed_at = sent;
                    }
                }
            },
            Err(_) => "the lease could not be kept alive",
        };
        tracing::warn!(%id, why = lost, "lost leadership: stopping the controllers");
        if stop_within(controllers, &stop, stop_margin(ttl)).await == Stopped::Aborted {
            tracing::warn!("the controllers did not stop in time: aborted");
        }
    }
}

/// How long a term's controllers may take to stop before they are aborted.
pub fn stop_margin(ttl: Duration) -> Duration {
    ttl / 6
}

/// How a term's controllers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// They stopped when told.
    Joined,
    /// They were aborted at the margin (and then joined).
    Aborted,
}

/// Cancels a term's controllers, aborts them if they have not ended within
/// `margin`, and joins them: when this returns, none of them runs.
pub async fn stop_within(mut controllers: JoinHandle<()>, stop: &CancellationToken, margin: Duration) -> Stopped {
    stop.cancel();
    if tokio::time::timeout(margin, &mut controllers).await.is_ok() {
        return Stopped::Joined;
    }
    controllers.abort();
    let _ = controllers.await;
    Stopped::Aborted
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Controllers that stop when told are joined; ones stuck in a call
    /// are aborted at the margin, and gone when `stop_within` returns.
    #[tokio::test(start_paused = true)]
    async fn a_lost_term_ends_its_controllers_within_the_margin() {
        let ttl = Duration::from_secs(3);
        let stop = CancellationToken::new();
        let s = stop.clone();
        let polite = tokio::spawn(async move { s.cancelled().await });
        let started = tokio::time::Instant::now();
        assert_eq!(stop_within(polite, &stop, stop_margin(ttl)).await, Stopped::Joined);
        assert_eq!(started.elapsed(), Duration::ZERO);

        let stop = CancellationToken::new();
        let running = Arc::new(AtomicBool::new(true));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let flag = Flag(running.clone());
        let stuck = tokio::spawn(async move {
            let _flag = flag;
            // A reconcile waiting on a call that never answers.
            std::future::pending::<()>().await
        });
        let started = tokio::time::Instant::now();
        assert_eq!(stop_within(stuck, &stop, stop_margin(ttl)).await, Stopped::Aborted);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert!(!running.load(Ordering::SeqCst), "the stuck controller still ran");
        // Detected at most 2/3 TTL after the last renewal, gone 1/6 later.
        assert!(ttl * 2 / 3 + stop_margin(ttl) < ttl);
    }
}
