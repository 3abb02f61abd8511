//! The behaviour every `Store` must have. Each check is a generic function;
//! the embedded store runs them below, and other stores call the same ones.
use super::*;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

fn put(k: &str, v: &str) -> Op {
    Op::Put(k.to_string(), v.as_bytes().to_vec())
}
fn absent(k: &str) -> Compare {
    Compare::ModRevision(k.to_string(), 0)
}

pub async fn create_get_cas<S: Store>(s: &S) {
    let r1 = s.txn(vec![absent("/a/x")], vec![put("/a/x", "1")]).await.unwrap();
    assert!(r1.succeeded);
    // Creating again fails: the key exists.
    let again = s.txn(vec![absent("/a/x")], vec![put("/a/x", "2")]).await.unwrap();
    assert!(!again.succeeded);
    let kv = s.get("/a/x").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision), (b"1".as_slice(), r1.revision, r1.revision));
    // CAS with a stale revision fails, with the right one succeeds.
    let stale =
        s.txn(vec![Compare::ModRevision("/a/x".into(), r1.revision + 100)], vec![put("/a/x", "3")]).await.unwrap();
    assert!(!stale.succeeded);
    let ok = s.txn(vec![Compare::ModRevision("/a/x".into(), r1.revision)], vec![put("/a/x", "3")]).await.unwrap();
    assert!(ok.succeeded && ok.revision > r1.revision);
    let kv = s.get("/a/x").await.unwrap().unwrap();
    assert_eq!(kv.create_revision, r1.revision);
    assert_eq!(kv.mod_revision, ok.revision);
    // Delete with CAS.
    let del =
        s.txn(vec![Compare::ModRevision("/a/x".into(), ok.revision)], vec![Op::Delete("/a/x".into())]).await.unwrap();
    assert!(del.succeeded);
    assert!(s.get("/a/x").await.unwrap().is_none());
}

/// A prefix holding more than one gRPC message (4 MiB) lists whole, in key
/// order, at the store's revision; a neighbouring prefix is left out.
pub async fn a_list_larger_than_a_message_is_whole<S: Store>(s: &S) {
    let value = |i: usize| vec![b'a' + (i % 26) as u8; 100 * 1024];
    let mut last = 0;
    for i in 0..50 {
        last = s.txn(vec![], vec![Op::Put(format!("/big/{i:03}"), value(i))]).await.unwrap().revision;
    }
    s.txn(vec![], vec![put("/big0", "beside"), put("/bif", "before")]).await.unwrap();
    let (kvs, rev) = s.list("/big/").await.unwrap();
    assert_eq!(kvs.len(), 50);
    for (i, kv) in kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("/big/{i:03}"));
        assert_eq!(kv.value, value(i), "{}", kv.key);
    }
    assert!(rev > last, "the list is at the latest revision: {rev} <= {last}");
}

pub async fn multi_key_transactions_are_atomic<S: Store>(s: &S) {
    let keys: Vec<String> = (0..50).map(|i| format!("/t/{i:03}")).collect();
    let r = s.txn(keys.iter().map(|k| absent(k)).collect(), keys.iter().map(|k| put(k, "v")).collect()).await.unwrap();
    assert!(r.succeeded);
    let (items, rev) = s.list("/t/").await.unwrap();
    assert_eq!(items.len(), 50);
    assert!(items.iter().all(|kv| kv.mod_revision == r.revision), "one revision per transaction");
    assert!(rev >= r.revision);
    // One failing compare: nothing of the transaction is applied.
    let mut compares: Vec<Compare> =
        items.iter().map(|kv| Compare::ModRevision(kv.key.clone(), kv.mod_revision)).collect();
    compares.push(absent("/t/000"));
    let r2 = s.txn(compares, keys.iter().map(|k| put(k, "w")).collect()).await.unwrap();
    assert!(!r2.succeeded);
    let (items, _) = s.list("/t/").await.unwrap();
    assert!(items.iter().all(|kv| kv.value == b"v"));
    // list is prefix-exact.
    s.txn(vec![], vec![put("/tt", "x")]).await.unwrap();
    assert_eq!(s.list("/t/").await.unwrap().0.len(), 50);
}

pub async fn concurrent_cas_has_one_winner<S: Store>(s: Arc<S>) {
    let r = s.txn(vec![absent("/race")], vec![put("/race", "0")]).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.txn(vec![Compare::ModRevision("/race".into(), r.revision)], vec![put("/race", &i.to_string())])
                .await
                .unwrap()
                .succeeded
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
}

async fn next(w: &mut EventStream) -> Event {
    tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("event in time").unwrap().unwrap()
}

pub async fn watch_from_revision<S: Store>(s: &S) {
    let start = s.revision().await.unwrap();
    let a = s.txn(vec![], vec![put("/w/a", "1")]).await.unwrap().revision;
    s.txn(vec![], vec![put("/other", "x")]).await.unwrap();
    // A watch from the past replays history, then continues live.
    let mut w = s.watch("/w/", start).await.unwrap();
    let b = s.txn(vec![], vec![put("/w/b", "2")]).await.unwrap().revision;
    let d = s.txn(vec![], vec![Op::Delete("/w/a".into())]).await.unwrap().revision;
    let e1 = next(&mut w).await;
    assert_eq!((e1.kv().key.as_str(), e1.revision()), ("/w/a", a));
    let e2 = next(&mut w).await;
    assert_eq!((e2.kv().key.as_str(), e2.revision()), ("/w/b", b));
    let e3 = next(&mut w).await;
    assert!(matches!(&e3, Event::Delete(kv) if kv.key == "/w/a" && kv.value == b"1"));
    assert_eq!(e3.revision(), d);
    // Resuming from the middle gives exactly the rest.
    let mut w2 = s.watch("/w/", a).await.unwrap();
    assert_eq!(next(&mut w2).await.revision(), b);
    assert_eq!(next(&mut w2).await.revision(), d);
}

/// `compact` makes the store drop its history up to its current revision.
pub async fn compaction_is_reported<S: Store, F: std::future::Future<Output = ()>>(s: &S, compact: impl FnOnce() -> F) {
    let old = s.revision().await.unwrap();
    for i in 0..5 {
        s.txn(vec![], vec![put("/c/k", &i.to_string())]).await.unwrap();
    }
    compact().await;
    match s.watch("/c/", old).await {
        Err(StoreError::Compacted { .. }) => {}
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    // A recent revision still works.
    let now = s.revision().await.unwrap();
    assert!(s.watch("/c/", now).await.is_ok());
}

#[cfg(test)]
mod embedded_store {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn open(dir: &tempfile::TempDir, retain: u64) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("store.redb"), retain).unwrap()
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 100);
        create_get_cas(&s).await;
        multi_key_transactions_are_atomic(&s).await;
        a_list_larger_than_a_message_is_whole(&s).await;
        watch_from_revision(&s).await;
        compaction_is_reported(&s, || async {
            // The embedded store keeps the last 100 revisions.
            for i in 0..150 {
                s.txn(vec![], vec![put("/c/fill", &i.to_string())]).await.unwrap();
            }
        })
        .await;
        concurrent_cas_has_one_winner(Arc::new(s)).await;
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_revision() {
        let dir = tempfile::tempdir().unwrap();
        let rev = {
            let s = open(&dir, 100);
            s.txn(vec![], vec![put("/k", "v")]).await.unwrap().revision
        };
        let s = open(&dir, 100);
        assert_eq!(s.revision().await.unwrap(), rev);
        assert_eq!(s.get("/k").await.unwrap().unwrap().value, b"v");
        let next = s.txn(vec![], vec![put("/k", "w")]).await.unwrap().revision;
        assert_eq!(next, rev + 1, "revisions continue after a restart");
    }

    #[tokio::test]
    async fn a_closed_store_unlocks_its_file_while_handles_live_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 100);
        s.txn(vec![], vec![put("/k", "v")]).await.unwrap();
        let late = s.clone(); // a task that outlived the server
        s.close().await;
        let again = EmbeddedStore::open(&dir.path().join("store.redb"), 100).expect("the file is unlocked");
        assert_eq!(again.get("/k").await.unwrap().unwrap().value, b"v");
        let err = late.get("/k").await.unwrap_err();
        assert!(err.to_string().contains("the store is closed"), "{err}");
        let err = late.txn(vec![], vec![put("/k", "w")]).await.unwrap_err();
        assert!(err.to_string().contains("the store is closed"), "{err}");
        assert_eq!(again.get("/k").await.unwrap().unwrap().value, b"v", "nothing written after the close");
    }

    #[tokio::test]
    async fn oversized_values_are_rejected_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 100);
        let big = vec![0u8; crate::store::embedded::MAX_VALUE_BYTES + 1];
        let err = s.txn(vec![], vec![put("/ok", "1"), Op::Put("/big".into(), big)]).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }));
        assert!(s.get("/ok").await.unwrap().is_none(), "nothing of the transaction is applied");
    }
}

#[cfg(test)]
mod etcd_store {
    use super::*;
    use crate::store::etcd::EtcdStore;
    use testbus_tests::etcd::EtcdCluster;

    async fn compact_all(url: &str) {
        let (endpoints, _) = crate::store::etcd::parse_url(url).unwrap();
        let mut c = etcd_client::Client::connect(&endpoints, None).await.unwrap();
        let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
        c.compact(rev, None).await.unwrap();
    }

    async fn suite(url: &str) {
        let s = EtcdStore::connect(url).await.unwrap();
        create_get_cas(&s).await;
        multi_key_transactions_are_atomic(&s).await;
        a_list_larger_than_a_message_is_whole(&s).await;
        watch_from_revision(&s).await;
        compaction_is_reported(&s, || compact_all(url)).await;
        concurrent_cas_has_one_winner(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_single_node() {
        let etcd = EtcdCluster::start(1);
        suite(&etcd.url("/conformance")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_three_members() {
        let etcd = EtcdCluster::start(3);
        suite(&etcd.url("/conformance")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefixes_keep_stores_apart_and_large_values_are_refused() {
        let etcd = EtcdCluster::start(1);
        let a = EtcdStore::connect(&etcd.url("/a")).await.unwrap();
        let b = EtcdStore::connect(&etcd.url("/b")).await.unwrap();
        a.txn(vec![], vec![put("/k", "in a")]).await.unwrap();
        assert!(b.get("/k").await.unwrap().is_none());
        assert_eq!(a.list("/").await.unwrap().0[0].key, "/k");
        let big = vec![0u8; crate::store::etcd::MAX_VALUE_BYTES + 1];
        let err = a.txn(vec![], vec![put("/ok", "1"), Op::Put("/big".into(), big)]).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        assert!(a.get("/ok").await.unwrap().is_none(), "nothing of the transaction is applied");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_resumes_after_its_member_restarts() {
        let mut etcd = EtcdCluster::start(1);
        let s = EtcdStore::connect(&etcd.url("/resume")).await.unwrap();
        let start = s.revision().await.unwrap();
        let mut w = s.watch("/w/", start).await.unwrap();
        let a = s.txn(vec![], vec![put("/w/a", "1")]).await.unwrap().revision;
        assert_eq!(next(&mut w).await.revision(), a);
        etcd.kill_member(0);
        // The broken watch says so instead of hanging.
        let end = tokio::time::timeout(Duration::from_secs(30), w.next()).await.expect("the watch notices");
        assert!(!matches!(end, Some(Ok(_))), "{end:?}");
        etcd.restart_member(0);
        let b = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Ok(r) = s.txn(vec![], vec![put("/w/b", "2")]).await {
                    return r.revision;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("writes after the restart");
        // Resuming from the last revision seen delivers exactly what came after.
        let mut w2 = s.watch("/w/", a).await.unwrap();
        let e = next(&mut w2).await;
        assert_eq!((e.kv().key.as_str(), e.revision()), ("/w/b", b));
    }

    /// Writes `key`, retrying for up to 30s while the cluster elects a
    /// leader or regains quorum.
    async fn write_within(s: &EtcdStore, key: &str, value: &str) {
        let r = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if s.txn(vec![], vec![put(key, value)]).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(r.is_ok(), "writing {key} did not succeed within 30s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_quorum_writes_fail_clearly_and_resume_with_it() {
        let mut etcd = EtcdCluster::start(3);
        let s = EtcdStore::connect(&etcd.url("/quorum")).await.unwrap();
        s.txn(vec![], vec![put("/q/a", "1")]).await.unwrap();
        etcd.kill_member(2);
        // Two of three: still a quorum (once a new leader is elected, if
        // the killed member led).
        write_within(&s, "/q/b", "2").await;
        etcd.kill_member(1);
        let err = tokio::time::timeout(Duration::from_secs(30), s.txn(vec![], vec![put("/q/c", "3")]))
            .await
            .expect("a write without quorum fails within its timeout")
            .unwrap_err();
        assert!(matches!(err, StoreError::Backend(ref m) if m.starts_with("etcd:")), "{err}");
        etcd.restart_member(1);
        write_within(&s, "/q/c", "3").await;
        let (items, _) = s.list("/q/").await.unwrap();
        let values: Vec<&[u8]> = items.iter().map(|kv| kv.value.as_slice()).collect();
        assert_eq!(values, [b"1".as_slice(), b"2", b"3"], "nothing lost or corrupted");
    }
}
