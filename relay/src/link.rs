//! `ReliableLink`: a reliable, ordered byte stream over a line that may
//! corrupt, drop, duplicate or invent bytes (a serial port), built from
//! `LinkFramer` frames: sequence numbers, cumulative and selective
//! acknowledgements, retransmission within a window, keepalives.
//!
//! Each end of a link is a session with a random id. Frames name their
//! sender's session and the session they are meant for, so frames of an
//! earlier incarnation are ignored, and a peer that restarted (a rebooted
//! guest, a reopened pty) is noticed at its first frame: the link then
//! ends with `PeerRestarted`, the multiplexer above it ends, and the relay
//! builds a new link; clients reconnect.
//!
//! [`ReliableLink::spawn`] runs the protocol in two tasks (the writer paces
//! frames out at the line rate and sends acknowledgements ahead of data)
//! and hands back one end of an in-memory pipe: the reliable stream.
use crate::framer::{Frame, FrameReader, Kind, MAX_ENCODED, MAX_PAYLOAD};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Pace writes to this line rate (10 bits a byte), as a real line
    /// would; None: as fast as the device takes them.
    pub baud: Option<u32>,
    /// Frames in flight without acknowledgement.
    pub window: usize,
    /// Sent when nothing else was for this long.
    pub keepalive: Duration,
    /// The link is dead when nothing valid arrived for this long.
    pub dead_after: Duration,
    /// Counted as the link runs (a relay's metrics): shared by the links a
    /// relay runs in turn, so a link that died and was replaced counts on.
    pub counters: LinkCounters,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            baud: None,
            window: 32,
            keepalive: Duration::from_secs(1),
            dead_after: Duration::from_secs(6),
            counters: LinkCounters::default(),
        }
    }
}

/// Live counters of links, as Prometheus counters (clones share them).
#[derive(Debug, Clone, Default)]
pub struct LinkCounters {
    pub frames_sent: prometheus_client::metrics::counter::Counter,
    pub retransmitted: prometheus_client::metrics::counter::Counter,
    pub rejected: prometheus_client::metrics::counter::Counter,
}

impl LinkCounters {
    /// Registers them as `link_frames_sent_total`,
    /// `link_retransmissions_total` and `link_frames_rejected_total`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("link_frames_sent", "Data frames sent on serial links (first sends)", self.frames_sent.clone());
        r.register(
            "link_retransmissions",
            "Frames sent again for want of an acknowledgement",
            self.retransmitted.clone(),
        );
        r.register("link_frames_rejected", "Frames received damaged (bad checksum or framing)", self.rejected.clone());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the line failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the line closed")]
    Closed,
    #[error("nothing arrived for {0:?}")]
    Silent(Duration),
    #[error("the peer restarted")]
    PeerRestarted,
}

/// Counters of a link, for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkStats {
    pub frames_sent: u64,
    pub retransmitted: u64,
    pub rejected: u64,
}

struct Pending {
    payload: Vec<u8>,
    sent: Instant,
    retransmitted: bool,
}

pub struct ReliableLink;

impl ReliableLink {
    /// Runs a link over `line`; returns the reliable stream and the task,
    /// which ends with the link (the stream then reads EOF).
    pub fn spawn<L>(line: L, cfg: LinkConfig) -> (DuplexStream, tokio::task::JoinHandle<Result<LinkStats, LinkError>>)
    where
        L: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (app, inner) = tokio::io::duplex(256 << 10);
        let task = tokio::spawn(run(line, inner, cfg));
        (app, task)
    }
}

/// Time to put `bytes` on a line of `baud`.
fn line_time(bytes: usize, baud: Option<u32>) -> Duration {
    match baud {
        Some(b) if b > 0 => Duration::from_secs_f64(bytes as f64 * 10.0 / b as f64),
        _ => Duration::ZERO,
    }
}

/// Writes frames, control frames first, at the line rate.
async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut control: mpsc::Receiver<Vec<u8>>,
    mut data: mpsc::Receiver<Vec<u8>>,
    baud: Option<u32>,
) -> std::io::Result<()> {
    let mut free_at = Instant::now();
    loop {
        let bytes = tokio::select! {
            biased;
            c = control.recv() => match c { Some(c) => c, None => return Ok(()) },
            d = data.recv() => match d { Some(d) => d, None => return Ok(()) },
        };
        if baud.is_some() {
            tokio::time::sleep_until(free_at).await;
        }
        w.write_all(&bytes).await?;
        w.flush().await?;
        free_at = free_at.max(Instant::now()) + line_time(bytes.len(), baud);
    }
}

struct State {
    me: u32,
    peer: u32,
    /// The peer has named us: data may flow.
    peer_knows_me: bool,
    next_seq: u32,
    unacked: BTreeMap<u32, Pending>,
    expected: u32,
    early: BTreeMap<u32, Vec<u8>>,
    srtt: Duration,
    min_rto: Duration,
    /// The highest sequence number acknowledged: anything unacked below it
    /// was probably lost (the line keeps order).
    highest_acked: u32,
    last_rx: Instant,
    last_tx: Instant,
    ack_due: bool,
    stats: LinkStats,
}

impl State {
    fn frame(&self, kind: Kind, seq: u32, payload: Vec<u8>) -> Frame {
        let mut sack = 0u32;
        for (&s, _) in self.early.range(self.expected + 1..self.expected + 33) {
            sack |= 1 << (s - self.expected - 1);
        }
        Frame { kind, src: self.me, dst: self.peer, seq, ack: self.expected, sack, payload }
    }

    fn rto(&self) -> Duration {
        (self.srtt * 2).max(self.min_rto)
    }

    /// Takes what `f` acknowledges off the unacked set.
    fn acknowledged(&mut self, f: &Frame, now: Instant) {
        let acked: Vec<u32> = self
            .unacked
            .keys()
            .copied()
            .filter(|&s| s < f.ack || (s > f.ack && s - f.ack <= 32 && f.sack & (1 << (s - f.ack - 1)) != 0))
            .collect();
        for s in acked {
            self.highest_acked = self.highest_acked.max(s);
            if let Some(p) = self.unacked.remove(&s) {
                if !p.retransmitted {
                    let sample = now.saturating_duration_since(p.sent);
                    self.srtt = (self.srtt * 7 + sample) / 8;
                }
            }
        }
    }
}

async fn run<L>(line: L, app: DuplexStream, cfg: LinkConfig) -> Result<LinkStats, LinkError>
where
    L: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut line_r, line_w) = tokio::io::split(line);
    let (mut app_r, mut app_w) = tokio::io::split(app);
    // Received bytes reach the application through a bounded queue, so a
    // slow reader never stops this task from acknowledging and sending:
    // when the queue is full, new frames are dropped unacknowledged and
    // come again later.
    let (deliver_tx, mut deliver_rx) = mpsc::channel::<Vec<u8>>(256);
    let deliver = tokio::spawn(async move {
        while let Some(b) = deliver_rx.recv().await {
            if app_w.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let (control_tx, control_rx) = mpsc::channel::<Vec<u8>>(64);
    // A short data queue keeps the time a frame waits to go out (and so the
    // retransmission timeout) small.
    let (data_tx, data_rx) = mpsc::channel::<Vec<u8>>(2);
    let mut writer = tokio::spawn(writer(line_w, control_rx, data_rx, cfg.baud));

    let frame_time = line_time(MAX_ENCODED, cfg.baud);
    let now = Instant::now();
    let mut st = State {
        me: loop {
            let id = rand::random::<u32>();
            if id != 0 {
                break id;
            }
        },
        peer: 0,
        peer_knows_me: false,
        next_seq: 1,
        unacked: BTreeMap::new(),
        expected: 1,
        early: BTreeMap::new(),
        srtt: Duration::from_millis(50) + frame_time * 2,
        min_rto: Duration::from_millis(40) + frame_time * 4,
        highest_acked: 0,
        last_rx: now,
        last_tx: now - Duration::from_secs(3600),
        ack_due: false,
        stats: LinkStats::default(),
    };
    let mut reader = FrameReader::default();
    let mut rbuf = vec![0u8; 16 << 10];
    let mut abuf = vec![0u8; MAX_PAYLOAD];
    let mut app_open = true;
    let mut frames = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let result = loop {
        // The window spans sequence numbers, not frames in flight: a lost
        // frame holds back what may be sent after it, which bounds what the
        // receiver must keep out of order.
        let oldest = st.unacked.keys().next().copied().unwrap_or(st.next_seq);
        let can_send = st.peer_knows_me && app_open && ((st.next_seq - oldest) as usize) < cfg.window;
        tokio::select! {
            r = line_r.read(&mut rbuf) => {
                let n = match r {
                    Ok(0) => break Err(LinkError::Closed),
                    Ok(n) => n,
                    Err(e) => break Err(e.into()),
                };
                reader.push(&rbuf[..n], &mut frames);
                cfg.counters.rejected.inc_by(reader.rejected.saturating_sub(st.stats.rejected));
                st.stats.rejected = reader.rejected;
                let mut fatal = None;
                let now = Instant::now();
                for f in frames.drain(..) {
                    // Frames for an earlier incarnation of ours are stale.
                    if f.dst != 0 && f.dst != st.me {
                        continue;
                    }
                    if st.peer == 0 {
                        st.peer = f.src;
                        st.ack_due = true;
                    } else if f.src != st.peer {
                        fatal = Some(LinkError::PeerRestarted);
                        break;
                    }
                    st.last_rx = now;
                    if f.dst == st.me && !st.peer_knows_me {
                        st.peer_knows_me = true;
                        tracing::info!(me = st.me, peer = st.peer, "link up");
                    }
                    if f.dst != st.me {
                        // The peer does not know us yet: answer its hello.
                        st.ack_due = true;
                        continue;
                    }
                    st.acknowledged(&f, now);
                    if f.kind == Kind::Data {
                        st.ack_due = true;
                        if f.seq == st.expected {
                            match deliver_tx.try_send(f.payload) {
                                Ok(()) => st.expected += 1,
                                Err(mpsc::error::TrySendError::Full(_)) => {}
                                Err(mpsc::error::TrySendError::Closed(_)) => app_open = false,
                            }
                            while let Some(p) = st.early.remove(&st.expected) {
                                match deliver_tx.try_send(p) {
                                    Ok(()) => st.expected += 1,
                                    Err(e) => {
                                        st.early.insert(st.expected, e.into_inner());
                                        break;
                                    }
                                }
                            }
                        } else if f.seq > st.expected && f.seq - st.expected <= 4 * cfg.window as u32 {
                            st.early.insert(f.seq, f.payload);
                        }
                    }
                }
                if let Some(e) = fatal {
                    break Err(e);
                }
                if st.ack_due {
                    st.ack_due = false;
                    let kind = if st.peer_knows_me { Kind::Ack } else { Kind::Hello };
                    let _ = control_tx.try_send(st.frame(kind, 0, Vec::new()).encode());
                    st.last_tx = Instant::now();
                }
            }
            r = app_r.read(&mut abuf), if can_send => {
                match r {
                    Ok(0) | Err(_) => app_open = false,
                    Ok(n) => {
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        let payload = abuf[..n].to_vec();
                        let wire = st.frame(Kind::Data, seq, payload.clone()).encode();
                        if data_tx.send(wire).await.is_err() {
                            break Err(LinkError::Closed);
                        }
                        let now = Instant::now();
                        st.unacked.insert(seq, Pending { payload, sent: now, retransmitted: false });
                        st.stats.frames_sent += 1;
                        cfg.counters.frames_sent.inc();
                        st.last_tx = now;
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now.duration_since(st.last_rx) > cfg.dead_after {
                    break Err(LinkError::Silent(cfg.dead_after));
                }
                if !st.peer_knows_me {
                    if now.duration_since(st.last_tx) >= Duration::from_millis(200) {
                        let _ = control_tx.try_send(st.frame(Kind::Hello, 0, Vec::new()).encode());
                        st.last_tx = now;
                    }
                    continue;
                }
                // Retransmit, ahead of new data, what has waited longer than
                // the timeout, and sooner what later frames overtook (lost:
                // the line keeps order).
                let rto = st.rto();
                let due: Vec<u32> = st
                    .unacked
                    .iter()
                    .filter(|(&s, p)| {
                        let waited = now.duration_since(p.sent);
                        waited >= rto || (s < st.highest_acked && waited >= st.srtt + st.srtt / 2)
                    })
                    .map(|(&s, _)| s)
                    .collect();
                for s in due {
                    let Some(p) = st.unacked.get(&s) else { continue };
                    let wire = st.frame(Kind::Data, s, p.payload.clone()).encode();
                    if control_tx.try_send(wire).is_err() {
                        break;
                    }
                    if let Some(p) = st.unacked.get_mut(&s) {
                        p.sent = now;
                        p.retransmitted = true;
                    }
                    st.stats.retransmitted += 1;
                    cfg.counters.retransmitted.inc();
                    st.last_tx = now;
                }
                if now.duration_since(st.last_tx) >= cfg.keepalive {
                    let _ = control_tx.try_send(st.frame(Kind::Ping, 0, Vec::new()).encode());
                    st.last_tx = now;
                }
                if !app_open && st.unacked.is_empty() {
                    break Ok(st.stats);
                }
            }
            w = &mut writer => {
                break match w {
                    Ok(Ok(())) => Err(LinkError::Closed),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(LinkError::Closed),
                };
            }
        }
    };
    drop(deliver_tx);
    let mut deliver = deliver;
    if result.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut deliver).await;
    }
    deliver.abort();
    finish(writer, result).await
}

async fn finish(
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    result: Result<LinkStats, LinkError>,
) -> Result<LinkStats, LinkError> {
    writer.abort();
    if let Err(e) = &result {
        tracing::warn!(error = %e, "link ended");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::Noise;

    /// Two link ends joined by a line with noise each way.
    fn pair(rate: f64, cfg: LinkConfig) -> (DuplexStream, DuplexStream) {
        let (a, a_line) = tokio::io::duplex(64 << 10);
        let (b, b_line) = tokio::io::duplex(64 << 10);
        let (ar, aw) = tokio::io::split(a_line);
        let (br, bw) = tokio::io::split(b_line);
        tokio::spawn(crate::noise::copy_noisy(ar, bw, Noise::uniform(rate), 1));
        tokio::spawn(crate::noise::copy_noisy(br, aw, Noise::uniform(rate), 2));
        let (x, _) = ReliableLink::spawn(a, cfg.clone());
        let (y, _) = ReliableLink::spawn(b, cfg);
        (x, y)
    }

    async fn exchange(x: DuplexStream, y: DuplexStream, len: usize) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let (mut xr, mut xw) = tokio::io::split(x);
        let (mut yr, mut yw) = tokio::io::split(y);
        let d1 = data.clone();
        let send_x = tokio::spawn(async move { xw.write_all(&d1).await.unwrap() });
        let d2 = data.clone();
        let send_y = tokio::spawn(async move { yw.write_all(&d2).await.unwrap() });
        let mut got_y = vec![0u8; len];
        let mut got_x = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(60), async {
            yr.read_exact(&mut got_y).await.unwrap();
            xr.read_exact(&mut got_x).await.unwrap();
        })
        .await
        .expect("the data arrived in time");
        send_x.await.unwrap();
        send_y.await.unwrap();
        assert!(got_y == data, "x → y intact");
        assert!(got_x == data, "y → x intact");
    }

    #[tokio::test]
    async fn a_clean_line_carries_bytes_both_ways() {
        let (x, y) = pair(0.0, LinkConfig::default());
        exchange(x, y, 300_000).await;
    }

    #[tokio::test]
    async fn a_noisy_line_delivers_every_byte_intact_and_in_order() {
        // 1e-4 per byte of each of corruption, loss, duplication and
        // invention: about one full frame in three is damaged.
        let (x, y) = pair(1e-4, LinkConfig::default());
        exchange(x, y, 200_000).await;
    }

    #[tokio::test]
    async fn stale_frames_are_ignored_and_a_restarted_peer_ends_the_link() {
        let (a, mut b) = tokio::io::duplex(64 << 10);
        let (_x, task) = ReliableLink::spawn(a, LinkConfig::default());
        // Play the far end by hand: read x's hello to learn its session.
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        let mut buf = [0u8; 4096];
        while frames.is_empty() {
            let n = b.read(&mut buf).await.unwrap();
            reader.push(&buf[..n], &mut frames);
        }
        let x_id = frames[0].src;
        let hello = |src, dst| Frame { kind: Kind::Hello, src, dst, seq: 0, ack: 1, sack: 0, payload: vec![] };
        b.write_all(&hello(111, x_id).encode()).await.unwrap();
        // A frame meant for an earlier incarnation of x changes nothing.
        b.write_all(&hello(333, x_id ^ 1).encode()).await.unwrap();
        let data = Frame { kind: Kind::Data, src: 111, dst: x_id, seq: 1, ack: 1, sack: 0, payload: b"hi".to_vec() };
        b.write_all(&data.encode()).await.unwrap();
        // x acknowledges it, naming us as 111.
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = b.read(&mut buf).await.unwrap();
                reader.push(&buf[..n], &mut frames);
                if frames.iter().any(|f| f.kind == Kind::Ack && f.dst == 111 && f.ack == 2) {
                    return;
                }
            }
        })
        .await;
        assert!(acked.is_ok(), "x acknowledged the data");
        assert!(!task.is_finished());
        // The far end restarts: a new session that does not know x yet.
        b.write_all(&hello(222, 0).encode()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), task).await.expect("x ends").unwrap();
        assert!(matches!(r, Err(LinkError::PeerRestarted)), "{r:?}");
    }
}
