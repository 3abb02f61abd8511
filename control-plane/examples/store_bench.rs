//! Store throughput, embedded against etcd, in one run (driven by
//! `hack/bench`): writes per second with one writer and with many, and the
//! rate and delay at which a watcher sees those writes. Prints JSON.
//!
//!   store_bench [--etcd etcd://HOST:PORT] [--seconds S] [--writers N] [--dir DIR]
// A benchmark measures the real clock (the daemons' ban on std's Instant
// is for time that tests drive).
#![allow(clippy::disallowed_types)]
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testbus_control_plane::store::{embedded::EmbeddedStore, etcd::EtcdStore, Compare, Op, Store};
use testbus_tests::percentile;

const VALUE_BYTES: usize = 1024;

struct Args {
    etcd: Option<String>,
    seconds: f64,
    writers: usize,
    dir: Option<std::path::PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { etcd: None, seconds: 5.0, writers: 16, dir: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--etcd" => a.etcd = Some(value()?),
            "--seconds" => a.seconds = value()?.parse().map_err(|_| anyhow::anyhow!("--seconds: a number"))?,
            "--writers" => a.writers = value()?.parse().map_err(|_| anyhow::anyhow!("--writers: a count"))?,
            "--dir" => a.dir = Some(value()?.into()),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    anyhow::ensure!(a.writers > 0, "--writers: at least 1");
    Ok(a)
}

/// Creates keys (each a compare-and-swap on the key being absent, as the
/// API's creates are) from `writers` tasks for `secs`; returns the count.
/// Each value starts with the write's start time, for the watcher.
async fn write_for(store: Arc<dyn Store>, tag: &str, writers: usize, secs: f64, t0: Instant) -> anyhow::Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, stop, done, tag) = (store.clone(), stop.clone(), done.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/bench/{tag}/{w}/{i}");
                let mut value = vec![b'x'; VALUE_BYTES];
                value[..16].copy_from_slice(&t0.elapsed().as_nanos().to_le_bytes());
                let r = store.txn(vec![Compare::ModRevision(key.clone(), 0)], vec![Op::Put(key, value)]).await?;
                anyhow::ensure!(r.succeeded, "a create of a fresh key failed its compare");
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed))
}

async fn measure(name: &str, store: Arc<dyn Store>, a: &Args) -> anyhow::Result<serde_json::Value> {
    let t0 = Instant::now();
    // One writer: the latency of a durable write bounds it.
    let start = Instant::now();
    let n1 = write_for(store.clone(), "one", 1, a.seconds, t0).await?;
    let one = n1 as f64 / start.elapsed().as_secs_f64();

    // Many writers, with a watcher on the same prefix.
    let from = store.revision().await?;
    let mut events = store.watch("/bench/many/", from).await?;
    let start = Instant::now();
    let total = std::sync::OnceLock::new();
    let writes = async {
        let n = write_for(store.clone(), "many", a.writers, a.seconds, t0).await?;
        let elapsed = start.elapsed();
        let _ = total.set(n);
        Ok::<_, anyhow::Error>((n, elapsed))
    };
    let watch = async {
        let mut seen = 0u64;
        let mut delays = Vec::new();
        let mut last = start;
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.seconds * 4.0 + 30.0);
        // Until every write has been seen (or the deadline passes).
        while total.get().is_none_or(|t| seen < *t) && tokio::time::Instant::now() < deadline {
            let ev = match tokio::time::timeout(Duration::from_millis(100), events.next()).await {
                Ok(Some(ev)) => ev?,
                Ok(None) => anyhow::bail!("the watch ended"),
                Err(_) => continue,
            };
            let v = &ev.kv().value;
            let sent = u128::from_le_bytes(v[..16].try_into()?);
            delays.push((t0.elapsed().as_nanos().saturating_sub(sent)) as f64 / 1e6);
            seen += 1;
            last = Instant::now();
        }
        Ok::<_, anyhow::Error>((seen, delays, last))
    };
    let ((n, write_elapsed), (seen, mut delays, last)) = tokio::try_join!(writes, watch)?;
    anyhow::ensure!(seen == n, "{name}: the watcher saw {seen} of {n} writes");
    delays.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "store": name,
        "writes_per_s_1_writer": one.round(),
        "writers": a.writers,
        "writes_per_s": (n as f64 / write_elapsed.as_secs_f64()).round(),
        "watch_events_per_s": (seen as f64 / (last - start).as_secs_f64()).round(),
        "watch_delay_ms_p50": percentile(&delays, 0.5),
        "watch_delay_ms_p99": percentile(&delays, 0.99),
        "writes": n,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("testbus-store-bench-{}", std::process::id()));
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let mut results = Vec::new();
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("bench.redb"), 1_000_000)?);
    results.push(measure("embedded", embedded, &a).await?);
    if let Some(url) = &a.etcd {
        let etcd: Arc<dyn Store> = Arc::new(EtcdStore::connect(url).await?);
        results.push(measure("etcd", etcd, &a).await?);
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}
