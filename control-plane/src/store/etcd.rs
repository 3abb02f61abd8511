//! The etcd store: the `Store` semantics on etcd v3, for several control
//! planes sharing one state (`--store etcd://h1:2379,h2:2379[/prefix]`).
//!
//! etcd already has what the trait promises: one global revision bumped
//! by each writing transaction, mod/create revisions per key, compare-and-
//! swap transactions and watches from a revision with compaction reported.
//! This only maps keys under a prefix and errors to the trait's.
use super::*;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use std::time::Duration;

/// etcd's default request limit is 1.5 MiB; leave room for the key and
/// the transaction around the value.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024 - 4096;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

/// Keys per page of a list.
const LIST_PAGE: i64 = 512;

/// The largest response a list page (or a watch response: one
/// transaction's events) may be; values are at most [`MAX_VALUE_BYTES`],
/// so a page of one key always fits.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The end of the range of keys that start with `prefix` (etcd's
/// `range_end` for a prefix): its last byte below 0xff incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(b) = end.pop() {
        if b < 0xff {
            end.push(b + 1);
            return end;
        }
    }
    // Every byte 0xff (or none): to the end of the keyspace.
    vec![0]
}

/// A response larger than the client would decode.
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::OutOfRange && s.message().contains("too large"))
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// The request never reached a server (its endpoint refused the
/// connection): safe to send again, and the balanced channel will pick
/// another member.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable && s.message().contains("connect"),
        _ => false,
    }
}

/// A read that failed because the cluster is between leaders ("leader
/// changed", "no leader"): reading again cannot change anything.
fn read_again(e: &etcd_client::Error) -> bool {
    not_sent(e) || matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// Runs a write `f`, again while its request was not sent (a dead member),
/// for up to a few seconds. A write that may have been applied is not
/// repeated: its caller decides (a compare-and-swap tells).
async fn retry<T, F, Fut>(f: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    retry_while(f, not_sent).await
}

/// Runs a read `f`, again while the cluster elects a leader or a member is
/// unreachable, for up to a few seconds.
async fn retry_read<T, F, Fut>(f: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    retry_while(f, read_again).await
}

async fn retry_while<T, F, Fut>(mut f: F, again: fn(&etcd_client::Error) -> bool) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let start = tokio::time::Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match f().await {
            Err(e) if again(&e) && start.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, tries, elapsed = ?start.elapsed(), "etcd request failed");
                return Err(e);
            }
            r => return r,
        }
    }
}

/// `etcd://h1:2379,h2:2379[/prefix]` → endpoints and key prefix.
pub fn parse_url(url: &str) -> Result<(Vec<String>, String), String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"))?;
    let (hosts, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, "/testbus".to_string()),
    };
    let endpoints: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("http://{h}")).collect();
    if endpoints.is_empty() || prefix == "/" {
        return Err(format!("{url:?}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"));
    }
    Ok((endpoints, prefix))
}

impl EtcdStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (endpoints, prefix) = parse_url(url).map_err(StoreError::Backend)?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            // Without quorum a request fails after this rather than hanging.
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_require_leader(true);
        let client = Client::connect(&endpoints, Some(opts)).await.map_err(backend)?;
        Ok(EtcdStore { client, prefix })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// `k` under this store's prefix (for keys outside the `Store` API,
    /// such as the leader key).
    pub fn qualified(&self, k: &str) -> String {
        self.key(k)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        let key = String::from_utf8_lossy(kv.key());
        KeyValue {
            key: key.strip_prefix(&self.prefix).unwrap_or(&key).to_string(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision().max(0) as u64,
            mod_revision: kv.mod_revision().max(0) as u64,
        }
    }
}

#[tonic::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = retry_read(|| {
            let (mut kv, k) = (self.client.kv_client(), self.key(key));
            async move { kv.get(k, None).await }
        })
        .await
        .map_err(backend)?;
        Ok(resp.kvs().first().map(|kv| self.kv(kv)))
    }

    /// In pages of at most [`LIST_PAGE`] keys, every page at the revision
    /// of the first (one consistent snapshot): a prefix holding more than a
    /// response may carry (gRPC's 4 MiB by default; 733 tests and their
    /// 3,000 processes were more, and every replica's lists failed for
    /// good) is read whole. A page too large even for
    /// [`MAX_RESPONSE_BYTES`] is asked for again with half as many keys.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let start = self.key(prefix).into_bytes();
        let end = prefix_end(&start);
        let (mut out, mut from, mut rev, mut limit) = (Vec::new(), start, 0i64, LIST_PAGE);
        loop {
            let page = retry_read(|| {
                let mut kv = self.client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
                let opts = GetOptions::new().with_range(end.clone()).with_limit(limit).with_revision(rev);
                let key = from.clone();
                async move { kv.get(key, Some(opts)).await }
            })
            .await;
            let resp = match page {
                Err(e) if too_large(&e) && limit > 1 => {
                    limit = (limit / 2).max(1);
                    continue;
                }
                other => other.map_err(backend)?,
            };
            if rev == 0 {
                rev = resp.header().map(|h| h.revision()).unwrap_or(0).max(0);
            }
            out.extend(resp.kvs().iter().map(|kv| self.kv(kv)));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, rev as u64)),
            }
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        for op in &ops {
            if let Op::Put(key, value) = op {
                if value.len() > MAX_VALUE_BYTES {
                    return Err(StoreError::TooLarge { key: key.clone(), size: value.len(), limit: MAX_VALUE_BYTES });
                }
            }
        }
        let when: Vec<EtcdCompare> = compares
            .iter()
            .map(|Compare::ModRevision(k, rev)| EtcdCompare::mod_revision(self.key(k), CompareOp::Equal, *rev as i64))
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(self.key(&k), v, None),
                Op::Delete(k) => TxnOp::delete(self.key(&k), None),
            })
            .collect();
        let txn = Txn::new().when(when).and_then(then);
        let resp = retry(|| {
            let (mut kv, t) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(t).await }
        })
        .await
        .map_err(backend)?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
        Ok(TxnOutcome { succeeded: resp.succeeded(), revision })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream, StoreError> {
        // etcd reports a compacted start revision only after the watch was
        // created; a read at that revision answers now.
        if after < self.revision().await? {
            let at = GetOptions::new().with_revision(after as i64 + 1).with_count_only();
            if let Err(e) = retry_read(|| {
                let (mut kv, k, o) = (self.client.kv_client(), self.key(prefix), at.clone());
                async move { kv.get(k, Some(o)).await }
            })
            .await
            {
                let msg = e.to_string();
                if msg.contains("compacted") {
                    return Err(StoreError::Compacted { requested: after, oldest: 0 });
                }
                return Err(backend(e));
            }
        }
        let opts = WatchOptions::new().with_prefix().with_start_revision(after as i64 + 1).with_prev_key();
        let mut stream = retry_read(|| {
            let (mut w, k, o) = (
                self.client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES),
                self.key(prefix),
                opts.clone(),
            );
            async move { w.watch(k, Some(o)).await }
        })
        .await
        .map_err(backend)?;
        // The first answer says whether the watch exists; a compacted start
        // revision cancels it at once.
        match stream.message().await.map_err(backend)? {
            Some(r) if r.compact_revision() > 0 => {
                return Err(StoreError::Compacted { requested: after, oldest: r.compact_revision() as u64 + 1 })
            }
            Some(r) if r.canceled() => {
                return Err(StoreError::Backend(format!("etcd: watch canceled: {}", r.cancel_reason())))
            }
            Some(_) => {}
            None => return Err(StoreError::Backend("etcd: watch ended at once".into())),
        }
        let this = self.clone();
        let events = futures::stream::unfold(Some(stream), move |state| {
            let this = this.clone();
            async move {
                let mut stream = state?;
                match stream.message().await {
                    Ok(Some(r)) if r.compact_revision() > 0 => Some((
                        vec![Err(StoreError::Compacted { requested: after, oldest: r.compact_revision() as u64 + 1 })],
                        None,
                    )),
                    Ok(Some(r)) if r.canceled() => Some((
                        vec![Err(StoreError::Backend(format!("etcd: watch canceled: {}", r.cancel_reason())))],
                        None,
                    )),
                    Ok(Some(r)) => {
                        let evs = r
                            .events()
                            .iter()
                            .filter_map(|e| {
                                let kv = e.kv()?;
                                Some(Ok(match e.event_type() {
                                    EventType::Put => Event::Put(this.kv(kv)),
                                    EventType::Delete => {
                                        let mut last = e.prev_kv().map(|p| this.kv(p)).unwrap_or_else(|| this.kv(kv));
                                        last.mod_revision = kv.mod_revision().max(0) as u64;
                                        Event::Delete(last)
                                    }
                                }))
                            })
                            .collect();
                        Some((evs, Some(stream)))
                    }
                    Ok(None) => Some((vec![Err(StoreError::Backend("etcd: watch ended".into()))], None)),
                    Err(e) => Some((vec![Err(backend(e))], None)),
                }
            }
        });
        Ok(events.flat_map(futures::stream::iter).boxed())
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let resp = retry_read(|| {
            let (mut kv, k) = (self.client.kv_client(), self.key("/"));
            async move { kv.get(k, Some(GetOptions::new().with_prefix().with_count_only())).await }
        })
        .await
        .map_err(backend)?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/testbus/tests/"), b"/testbus/tests0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("etcd://a:2379,b:2379/x/y/").unwrap(),
            (vec!["http://a:2379".to_string(), "http://b:2379".to_string()], "/x/y".to_string())
        );
        assert_eq!(parse_url("etcd://a:2379").unwrap().1, "/testbus");
        for bad in ["http://a:2379", "etcd://", "etcd:///p", "etcd://a:1/"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
