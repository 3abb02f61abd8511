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

/// What became of a payload handed to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    Taken,
    /// The application's queue is full: the frame is dropped unacknowledged
    /// and comes again later.
    Full,
    /// The application went away.
    Closed,
}

/// The link protocol, apart from I/O: a synchronous state machine fed what
/// happened (frames in, the application's bytes, the clock) that answers
/// with the frames to send and the bytes to deliver. [`run`] is its I/O
/// loop; the tests drive two of them over a simulated line.
pub(crate) struct LinkMachine {
    me: u32,
    peer: u32,
    /// The peer has named us: data may flow.
    peer_knows_me: bool,
    /// The application may still send (it has not closed its end).
    app_open: bool,
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
    window: usize,
    keepalive: Duration,
    dead_after: Duration,
    stats: LinkStats,
}

impl LinkMachine {
    /// A new session `me` (never 0) on a line of `baud`.
    pub(crate) fn new(me: u32, now: Instant, cfg: &LinkConfig) -> LinkMachine {
        let frame_time = line_time(MAX_ENCODED, cfg.baud);
        LinkMachine {
            me,
            peer: 0,
            peer_knows_me: false,
            app_open: true,
            next_seq: 1,
            unacked: BTreeMap::new(),
            expected: 1,
            early: BTreeMap::new(),
            srtt: Duration::from_millis(50) + frame_time * 2,
            min_rto: Duration::from_millis(40) + frame_time * 4,
            highest_acked: 0,
            last_rx: now,
            last_tx: now - Duration::from_secs(3600),
            window: cfg.window,
            keepalive: cfg.keepalive,
            dead_after: cfg.dead_after,
            stats: LinkStats::default(),
        }
    }

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

    #[cfg(test)]
    pub(crate) fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Whether the application's next bytes may be taken: the peer knows
    /// us and the window has room. The window spans sequence numbers, not
    /// frames in flight: a lost frame holds back what may be sent after it,
    /// which bounds what the receiver must keep out of order.
    pub(crate) fn can_send(&self) -> bool {
        let oldest = self.unacked.keys().next().copied().unwrap_or(self.next_seq);
        self.peer_knows_me && self.app_open && ((self.next_seq - oldest) as usize) < self.window
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

    /// Frames that arrived: payloads in order go to `deliver`; answers the
    /// control frame to send (an acknowledgement, or a hello while the
    /// peer does not know us), if one is due. An error: the peer restarted.
    pub(crate) fn on_frames(
        &mut self,
        frames: impl IntoIterator<Item = Frame>,
        now: Instant,
        deliver: &mut dyn FnMut(Vec<u8>) -> Delivered,
    ) -> Result<Option<Frame>, LinkError> {
        let mut ack_due = false;
        for f in frames {
            // Frames for an earlier incarnation of ours are stale.
            if f.dst != 0 && f.dst != self.me {
                continue;
            }
            if self.peer == 0 {
                self.peer = f.src;
                ack_due = true;
            } else if f.src != self.peer {
                return Err(LinkError::PeerRestarted);
            }
            self.last_rx = now;
            if f.dst == self.me && !self.peer_knows_me {
                self.peer_knows_me = true;
                tracing::info!(me = self.me, peer = self.peer, "link up");
            }
            if f.dst != self.me {
                // The peer does not know us yet: answer its hello.
                ack_due = true;
                continue;
            }
            self.acknowledged(&f, now);
            if f.kind == Kind::Data {
                ack_due = true;
                self.receive(f.seq, f.payload, deliver);
            }
        }
        if !ack_due {
            return Ok(None);
        }
        self.last_tx = now;
        let kind = if self.peer_knows_me { Kind::Ack } else { Kind::Hello };
        Ok(Some(self.frame(kind, 0, Vec::new())))
    }

    /// A data frame: delivered if it is the next expected (with what
    /// waited behind it), kept if it came early within reach, else dropped.
    fn receive(&mut self, seq: u32, payload: Vec<u8>, deliver: &mut dyn FnMut(Vec<u8>) -> Delivered) {
        if seq == self.expected {
            match deliver(payload) {
                Delivered::Taken => self.expected += 1,
                Delivered::Full => return,
                Delivered::Closed => {
                    self.app_open = false;
                    return;
                }
            }
            while let Some(p) = self.early.remove(&self.expected) {
                match deliver(p.clone()) {
                    Delivered::Taken => self.expected += 1,
                    Delivered::Full | Delivered::Closed => {
                        self.early.insert(self.expected, p);
                        break;
                    }
                }
            }
        } else if seq > self.expected && seq - self.expected <= 4 * self.window as u32 {
            self.early.insert(seq, payload);
        }
    }

    /// The application's next bytes (when [`Self::can_send`]): the data
    /// frame that carries them.
    pub(crate) fn on_app_data(&mut self, payload: Vec<u8>, now: Instant) -> Frame {
        let seq = self.next_seq;
        self.next_seq += 1;
        let f = self.frame(Kind::Data, seq, payload.clone());
        self.unacked.insert(seq, Pending { payload, sent: now, retransmitted: false });
        self.stats.frames_sent += 1;
        self.last_tx = now;
        f
    }

    /// The application closed its end: once all it sent is acknowledged,
    /// the link ends well.
    pub(crate) fn on_app_closed(&mut self) {
        self.app_open = false;
    }

    /// The clock ticked: frames are handed to `send` (retransmissions, a
    /// hello or a keepalive; `send` answers false when the line's queue is
    /// full, and the rest waits for the next tick). Answers how the link
    /// ends, when it does: silent past `dead_after`, or done.
    pub(crate) fn on_tick(
        &mut self,
        now: Instant,
        send: &mut dyn FnMut(Frame) -> bool,
    ) -> Option<Result<LinkStats, LinkError>> {
        if now.duration_since(self.last_rx) > self.dead_after {
            return Some(Err(LinkError::Silent(self.dead_after)));
        }
        if !self.peer_knows_me {
            if now.duration_since(self.last_tx) >= Duration::from_millis(200) {
                send(self.frame(Kind::Hello, 0, Vec::new()));
                self.last_tx = now;
            }
            return None;
        }
        // Retransmit, ahead of new data, what has waited longer than the
        // timeout, and sooner what later frames overtook (lost: the line
        // keeps order).
        let rto = self.rto();
        let due: Vec<u32> = self
            .unacked
            .iter()
            .filter(|(&s, p)| {
                let waited = now.duration_since(p.sent);
                waited >= rto || (s < self.highest_acked && waited >= self.srtt + self.srtt / 2)
            })
            .map(|(&s, _)| s)
            .collect();
        for s in due {
            let Some(p) = self.unacked.get(&s) else { continue };
            if !send(self.frame(Kind::Data, s, p.payload.clone())) {
                break;
            }
            if let Some(p) = self.unacked.get_mut(&s) {
                p.sent = now;
                p.retransmitted = true;
            }
            self.stats.retransmitted += 1;
            self.last_tx = now;
        }
        if now.duration_since(self.last_tx) >= self.keepalive {
            send(self.frame(Kind::Ping, 0, Vec::new()));
            self.last_tx = now;
        }
        (!self.app_open && self.unacked.is_empty()).then_some(Ok(self.stats))
    }
}

/// The link's I/O: the line, the application's pipe, the writer task and
/// the clock feed one [`LinkMachine`].
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
    let me = loop {
        let id = rand::random::<u32>();
        if id != 0 {
            break id;
        }
    };
    let mut m = LinkMachine::new(me, Instant::now(), &cfg);
    let mut reader = FrameReader::default();
    let mut rbuf = vec![0u8; 16 << 10];
    let mut abuf = vec![0u8; MAX_PAYLOAD];
    let mut frames = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut to_app = |p: Vec<u8>| match deliver_tx.try_send(p) {
        Ok(()) => Delivered::Taken,
        Err(mpsc::error::TrySendError::Full(_)) => Delivered::Full,
        Err(mpsc::error::TrySendError::Closed(_)) => Delivered::Closed,
    };
    let result = loop {
        let can_send = m.can_send();
        tokio::select! {
            r = line_r.read(&mut rbuf) => {
                let n = match r {
                    Ok(0) => break Err(LinkError::Closed),
                    Ok(n) => n,
                    Err(e) => break Err(e.into()),
                };
                reader.push(&rbuf[..n], &mut frames);
                cfg.counters.rejected.inc_by(reader.rejected.saturating_sub(m.stats.rejected));
                m.stats.rejected = reader.rejected;
                match m.on_frames(frames.drain(..), Instant::now(), &mut to_app) {
                    Ok(Some(ack)) => {
                        let _ = control_tx.try_send(ack.encode());
                    }
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
            }
            r = app_r.read(&mut abuf), if can_send => match r {
                Ok(0) | Err(_) => m.on_app_closed(),
                Ok(n) => {
                    let f = m.on_app_data(abuf[..n].to_vec(), Instant::now());
                    if data_tx.send(f.encode()).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                    cfg.counters.frames_sent.inc();
                }
            },
            _ = tick.tick() => {
                let before = m.stats.retransmitted;
                let ended = m.on_tick(Instant::now(), &mut |f| control_tx.try_send(f.encode()).is_ok());
                cfg.counters.retransmitted.inc_by(m.stats.retransmitted - before);
                if let Some(r) = ended {
                    break r;
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
    use rand::{Rng, SeedableRng};

    /// A simulated line between two [`LinkMachine`]s, on a simulated clock
    /// (a millisecond a step): frames are lost, duplicated and delayed
    /// (reordered) at the given rates, and the receiving application is
    /// sometimes full.
    struct Line {
        loss: f64,
        dup: f64,
        reorder: f64,
        full: f64,
        rng: rand::rngs::StdRng,
    }

    impl Line {
        /// Puts `f` on the line at `now` (ms), as the line treats it.
        fn carry(&mut self, f: Frame, now: u64, q: &mut Vec<(u64, Frame)>) {
            if self.rng.random_bool(self.loss) {
                return;
            }
            let delay = |rng: &mut rand::rngs::StdRng, reorder: f64| {
                1 + if rng.random_bool(reorder) { rng.random_range(1..40) } else { 0 }
            };
            if self.rng.random_bool(self.dup) {
                q.push((now + delay(&mut self.rng, self.reorder), f.clone()));
            }
            q.push((now + delay(&mut self.rng, self.reorder), f));
        }
    }

    /// Sends `data` from a to b (and `data` reversed from b to a) over a
    /// simulated line; what each application got.
    fn simulate(data: &[u8], mut line: Line, chunk: usize) -> (Vec<u8>, Vec<u8>, [LinkStats; 2]) {
        let cfg = LinkConfig { dead_after: Duration::from_secs(600), ..LinkConfig::default() };
        let t0 = Instant::now();
        let mut ends = [LinkMachine::new(1, t0, &cfg), LinkMachine::new(2, t0, &cfg)];
        let mut outgoing: [Vec<u8>; 2] = [data.to_vec(), data.iter().rev().copied().collect()];
        let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        // Frames in flight toward each end, with the ms they arrive at.
        let mut toward: [Vec<(u64, Frame)>; 2] = [Vec::new(), Vec::new()];
        for ms in 0..600_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for i in 0..2 {
                let (me, other) = (i, 1 - i);
                while ends[me].can_send() && !outgoing[me].is_empty() {
                    let n = outgoing[me].len().min(chunk);
                    let f = ends[me].on_app_data(outgoing[me].drain(..n).collect(), now);
                    line.carry(f, ms, &mut toward[other]);
                }
                let (due, later): (Vec<_>, Vec<_>) = toward[me].drain(..).partition(|(at, _)| *at <= ms);
                toward[me] = later;
                let full = line.rng.random_bool(line.full);
                let mut deliver = |p: Vec<u8>| {
                    if full {
                        return Delivered::Full;
                    }
                    got[me].extend_from_slice(&p);
                    Delivered::Taken
                };
                let ack = ends[me].on_frames(due.into_iter().map(|(_, f)| f), now, &mut deliver).expect("no restart");
                if let Some(ack) = ack {
                    line.carry(ack, ms, &mut toward[other]);
                }
                if ms % 10 == 0 {
                    let mut sent = Vec::new();
                    let end = ends[me].on_tick(now, &mut |f| {
                        sent.push(f);
                        true
                    });
                    assert!(end.is_none(), "the link ended at {ms} ms: {end:?}");
                    for f in sent {
                        line.carry(f, ms, &mut toward[other]);
                    }
                }
            }
            if got[1].len() == data.len() && got[0].len() == data.len() {
                break;
            }
        }
        (got[1].clone(), got[0].clone(), [ends[0].stats(), ends[1].stats()])
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Whatever the line loses, duplicates or reorders, and however
        /// often the receiver is full, every byte arrives once and in
        /// order, both ways.
        #[test]
        fn every_byte_arrives_once_and_in_order_whatever_the_line_does(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..20_000),
            loss in 0.0f64..0.3,
            dup in 0.0f64..0.2,
            reorder in 0.0f64..0.2,
            full in 0.0f64..0.3,
            chunk in 1usize..MAX_PAYLOAD,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let line = Line { loss, dup, reorder, full, rng: rand::rngs::StdRng::seed_from_u64(seed) };
            let (at_b, at_a, stats) = simulate(&data, line, chunk);
            let back: Vec<u8> = data.iter().rev().copied().collect();
            proptest::prop_assert!(at_b == data, "a → b: {} of {} bytes, or out of order", at_b.len(), data.len());
            proptest::prop_assert!(at_a == back, "b → a: {} of {} bytes, or out of order", at_a.len(), back.len());
            proptest::prop_assert!(stats.iter().all(|s| s.frames_sent >= 1));
        }
    }

    /// A lossless line needs no retransmission, and a slow receiver only
    /// delays (the decisions, without I/O).
    #[test]
    fn a_clean_line_retransmits_nothing() {
        let line = Line { loss: 0.0, dup: 0.0, reorder: 0.0, full: 0.0, rng: rand::rngs::StdRng::seed_from_u64(1) };
        let data: Vec<u8> = (0..50_000).map(|i| (i % 251) as u8).collect();
        let (at_b, at_a, stats) = simulate(&data, line, 700);
        assert!(at_b == data && at_a.len() == data.len());
        assert_eq!(stats.map(|s| s.retransmitted), [0, 0]);
    }

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
