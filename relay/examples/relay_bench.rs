//! Relay benchmarks, driven by `hack/bench`; prints JSON.
//!
//! - `link`: bytes through a `ReliableLink` pair paced at a line rate,
//!   against that line rate (10 bits a byte), on a clean line and with
//!   noise (corruption, loss, duplication, invention at a per-byte rate).
//! - `proxy`: throughput and round-trip latency of a tcp echo service
//!   reached directly, through socat, through one testbus-relay, and
//!   through two relays joined by a multiplexed link; the relays and socat
//!   are started here and killed by PID at the end.
//!
//!   relay_bench link [--baud N] [--seconds S]
//!   relay_bench proxy --relay PATH [--mb N] [--pings N]
// A benchmark measures the real clock (the daemons' ban on std's Instant
// is for time that tests drive).
#![allow(clippy::disallowed_types)]
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testbus_relay::link::{LinkConfig, ReliableLink};
use testbus_relay::noise::{copy_noisy, Noise};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Sends for `secs` through a paced link pair with `rate` noise; bytes/s.
async fn link_rate(baud: u32, secs: f64, rate: f64) -> anyhow::Result<(f64, u64)> {
    let (a, a_line) = tokio::io::duplex(64 << 10);
    let (b, b_line) = tokio::io::duplex(64 << 10);
    let (ar, aw) = tokio::io::split(a_line);
    let (br, bw) = tokio::io::split(b_line);
    tokio::spawn(copy_noisy(ar, bw, Noise::uniform(rate / 4.0), 1));
    tokio::spawn(copy_noisy(br, aw, Noise::uniform(rate / 4.0), 2));
    let cfg = LinkConfig { baud: Some(baud), ..Default::default() };
    let (mut x, tx) = ReliableLink::spawn(a, cfg.clone());
    let (mut y, _) = ReliableLink::spawn(b, cfg);
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 4096];
        loop {
            if x.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    // Wait for the link to come up, then count what arrives in `secs`.
    let mut buf = vec![0u8; 64 << 10];
    anyhow::ensure!(y.read(&mut buf).await? > 0, "the link closed before any data");
    let start = Instant::now();
    let mut got = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        match tokio::time::timeout(Duration::from_millis(200), y.read(&mut buf)).await {
            Ok(Ok(0)) => anyhow::bail!("the link closed"),
            Ok(Ok(n)) => got += n as u64,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
    }
    let rate_bps = got as f64 / start.elapsed().as_secs_f64();
    writer.abort();
    tx.abort();
    Ok((rate_bps, got))
}

async fn link(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let baud: u32 = flag(args, "--baud", 115_200);
    let secs: f64 = flag(args, "--seconds", 10.0);
    let line = baud as f64 / 10.0;
    let mut out = Vec::new();
    for rate in [0.0, 1e-4] {
        let (bps, bytes) = link_rate(baud, secs, rate).await?;
        out.push(serde_json::json!({
            "byte_error_rate": rate,
            "bytes_per_s": bps.round(),
            "line_bytes_per_s": line,
            "fraction_of_line_rate": (bps / line * 1000.0).round() / 1000.0,
            "bytes": bytes,
        }));
    }
    Ok(serde_json::json!({ "baud": baud, "seconds": secs, "results": out }))
}

/// An echo service: answers every byte, for latency, and swallows bulk
/// data on a second port, for throughput.
async fn services() -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let addrs = (echo.local_addr()?, sink.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"k").await;
            });
        }
    });
    Ok(addrs)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Ends the children at the end of a run, by PID.
struct Children(Vec<Child>);
impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_listening(port: u16) {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Median and p99 round trip of one byte, in microseconds.
async fn latency(port: u16, pings: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    let mut rtts = Vec::with_capacity(pings);
    for i in 0..pings + 50 {
        let t = Instant::now();
        s.write_all(b"x").await?;
        s.read_exact(&mut b).await?;
        if i >= 50 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    Ok((rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100]))
}

/// MB/s of `mb` MiB sent to the sink.
async fn throughput(port: u16, mb: usize) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let chunk = vec![0x33u8; 256 << 10];
    let t = Instant::now();
    for _ in 0..mb * 4 {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let mut k = [0u8; 1];
    s.read_exact(&mut k).await?;
    Ok(mb as f64 * 1.048_576 / t.elapsed().as_secs_f64())
}

async fn proxy(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let relay: String = flag(args, "--relay", "target/release/testbus-relay".to_string());
    let mb: usize = flag(args, "--mb", 200);
    let pings: usize = flag(args, "--pings", 2000);
    let (echo, sink) = services().await?;
    let mut kids = Children(Vec::new());
    let quiet = |mut c: Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    // For each way of reaching the services: (ports for echo and sink).
    let mut ways: Vec<(&str, u16, u16)> = vec![("direct", echo.port(), sink.port())];
    for (name, target) in [("socat", 0), ("relay", 1), ("relay-mux-2-hops", 2)] {
        let mut ports = Vec::new();
        for upstream in [echo, sink] {
            let p = free_port();
            match target {
                0 => {
                    let mut c = Command::new("socat");
                    c.args([
                        format!("TCP-LISTEN:{p},bind=127.0.0.1,fork,reuseaddr,nodelay"),
                        format!("TCP:{upstream},nodelay"),
                    ]);
                    kids.0.push(quiet(c).spawn()?);
                }
                1 => {
                    let mut c = Command::new(&relay);
                    c.args(["--downstream", &format!("tcp:127.0.0.1:{p}"), "--upstream", &format!("tcp:{upstream}")]);
                    kids.0.push(quiet(c).spawn()?);
                }
                _ => {
                    let mid = free_port();
                    let mut far = Command::new(&relay);
                    far.args([
                        "--downstream",
                        &format!("mux+tcp:127.0.0.1:{mid}"),
                        "--upstream",
                        &format!("tcp:{upstream}"),
                    ]);
                    kids.0.push(quiet(far).spawn()?);
                    wait_listening(mid).await;
                    let mut near = Command::new(&relay);
                    near.args([
                        "--downstream",
                        &format!("tcp:127.0.0.1:{p}"),
                        "--upstream",
                        &format!("mux+tcp:127.0.0.1:{mid}"),
                    ]);
                    kids.0.push(quiet(near).spawn()?);
                }
            }
            wait_listening(p).await;
            ports.push(p);
        }
        ways.push((name, ports[0], ports[1]));
    }
    let mut out = Vec::new();
    for (name, e, s) in ways {
        let (p50, p99) = latency(e, pings).await?;
        let mbps = throughput(s, mb).await?;
        out.push(serde_json::json!({ "via": name, "rtt_us_p50": p50, "rtt_us_p99": p99, "mb_per_s": mbps.round() }));
    }
    drop(kids);
    Ok(serde_json::json!({ "mb": mb, "pings": pings, "results": out }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let v = match args.first().map(String::as_str) {
        Some("link") => link(&args).await?,
        Some("proxy") => proxy(&args).await?,
        _ => {
            anyhow::bail!("usage: relay_bench link [--baud N] [--seconds S] | proxy --relay PATH [--mb N] [--pings N]")
        }
    };
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
