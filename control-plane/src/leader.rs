//! Leader election among control-plane replicas sharing one etcd: the
//! controllers run on one replica at a time.
//!
//! A replica campaigns by creating the leader key bound to an etcd lease
//! (create-if-absent, in one transaction). The winner runs the controllers
//! and keeps the lease alive every third of its TTL; the others watch the
//! key and campaign again when it disappears. A leader that cannot renew
//! its lease stops its controllers before the lease can expire, so two
//! replicas never reconcile at once for longer than a renewal period.
use crate::store::etcd::EtcdStore;
use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use std::time::Duration;
use tokio::sync::broadcast;

/// Runs `start(stop)` whenever this replica leads, until `shutdown`.
pub async fn run_while_leader<F>(
    store: EtcdStore,
    id: String,
    ttl: Duration,
    mut start: F,
    mut shutdown: broadcast::Receiver<()>,
) where
    F: FnMut(broadcast::Receiver<()>) -> tokio::task::JoinHandle<()>,
{
    let key = store.qualified("/leader");
    let ttl_secs = ttl.as_secs().max(2) as i64;
    loop {
        let mut client = store.client();
        // Campaign until elected, with a fresh lease each time: one granted
        // for an earlier attempt may have expired while this replica waited.
        let lease = loop {
            let lease = match client.lease_grant(ttl_secs, None).await {
                Ok(l) => l.id(),
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot get a lease");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.recv() => return,
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
                Ok(r) if r.succeeded() => break lease,
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
                        _ = shutdown.recv() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: campaign failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.recv() => return,
                    }
                }
            }
        };
        tracing::info!(%id, "elected leader: running the controllers");
        let (stop_tx, stop_rx) = broadcast::channel(1);
        let controllers = start(stop_rx);
        let lost = match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::select! {
                    _ = shutdown.recv() => {
                        let _ = stop_tx.send(());
                        let _ = client.lease_revoke(lease).await;
                        let _ = controllers.await;
                        return;
                    }
                    _ = tokio::time::sleep(ttl / 3) => {
                        let renewed = keeper.keep_alive().await.is_ok()
                            && matches!(tokio::time::timeout(ttl / 3, stream.message()).await, Ok(Ok(Some(r))) if r.ttl() > 0);
                        if !renewed {
                            break "the lease could not be renewed";
                        }
                    }
                }
            },
            Err(_) => "the lease could not be kept alive",
        };
        tracing::warn!(%id, why = lost, "lost leadership: stopping the controllers");
        let _ = stop_tx.send(());
        if tokio::time::timeout(Duration::from_secs(5), controllers).await.is_err() {
            tracing::warn!("controllers did not stop in time");
        }
    }
}
